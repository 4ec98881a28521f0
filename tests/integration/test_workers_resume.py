"""Replays and resume through worker processes (``--workers 2 --journal-dir``): each
worker follows the journal the supervisor writes (gateway/journal/follower.py).

(a) A ``start=0`` replay through each worker, while the feed runs, hands over to live with
    every sequence once, and its records are byte for byte what one process (``--workers
    1`` on the same journal directory) replays afterwards.
(b) The project's ResumingClient, on a worker that is killed with SIGKILL, resumes on
    another one (the supervisor restarts the dead one) with no gap and no duplicate.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.dbn import SCHEMA_RTYPE
from tests.integration.helpers import (
    GatewayProcess,
    apoll_until,
    poll_until,
    socket_owner,
    start_gateway,
)
from tests.integration.test_client_resume import (
    Publisher as SeqPublisher,
    Sink,
    _connect,
    check_against_journal,
    gateways,
    journal_dir,
)
from tests.integration.test_replay import (
    DATASET,
    IDS,
    Publisher,
    Stream,
    _contiguous,
    completed,
    iid_of,
    ts_of,
)

FEEDS = {DATASET: "ingest://127.0.0.1:0"}
WORKERS = ("--workers", "2")


# --- which worker holds a connection (from /proc: no log wording involved) -----------------


def worker_pids(gw: GatewayProcess) -> list[int]:
    """The supervisor's children: its workers."""
    pid = gw.proc.pid
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def worker_of(gw: GatewayProcess, sock: socket.socket) -> int | None:
    """The pid of the worker process serving the connection of ``sock`` (None: none yet)."""
    return socket_owner(gw.port, sock.getsockname()[1], worker_pids(gw))


@pytest.fixture
def jdir() -> Iterator[Path]:
    with journal_dir() as path:
        yield path


# --- (a) ---------------------------------------------------------------------------------


@pytest.mark.slow_e2e  # the follower and the planner, byte for byte: not a loop check
def test_start_replays_through_each_worker_are_what_one_process_replays(jdir: Path) -> None:
    t0 = time.time_ns() - 30 * 10**9
    gw = start_gateway(*WORKERS, "--journal-dir", str(jdir), feeds=FEEDS)
    streams: list[Stream] = []
    pub: Publisher | None = None
    replays: dict[int, list[bytes]] = {}
    try:
        poll_until(lambda: len(worker_pids(gw)) == 2, 10.0, 0.02, "two workers")
        live = Stream(gw.port)
        streams.append(live)
        live.read_until(lambda s: len(s.records) >= 1)  # its ack: it is streaming
        pub = Publisher(gw.ingest_ports[DATASET], t0, per_slice=200, every_s=0.01)
        pub.start()
        live.read_until(lambda s: s.trades > 2000)
        # Replays from 0 while the feed runs, until each worker has served one (the
        # kernel spreads connections over the workers by their port: a few at a time).
        # One more replays a named symbol from a later start (copies, not file ranges).
        mid = t0 + 1500 * 1000
        named = Stream(gw.port, {"symbols": "S1", "start": mid})
        streams.append(named)
        opened: list[tuple[int, Stream]] = []
        for _ in range(4):
            batch = [Stream(gw.port, {"start": 0}) for _ in range(4)]
            streams.extend(batch)
            for replay in batch:
                sock = replay.client.sock
                pid = poll_until(lambda: worker_of(gw, sock), 5.0, 0.01, "its worker")  # noqa: B023
                opened.append((pid, replay))
            if len({pid for pid, _ in opened}) == 2:
                break
        assert len({pid for pid, _ in opened}) == 2, "every replay landed on the same worker"
        for _, replay in opened:
            replay.read_until(completed)
        want = pub.sent + 1000
        for pid, replay in opened:
            replay.read_until(lambda s: s.trades > want)  # noqa: B023
            _contiguous(replay.records)  # every sequence once, across replay -> live
            replays.setdefault(pid, replay.data())
        assert pub.is_alive(), "the feed must still run at the hand-overs"
        named.read_until(completed)
        named.read_until(lambda s: s.trades > 500)
        pub.stop.set()
        pub.join(10)
        sent = pub.sent
        live.read_until(lambda s: s.trades >= sent)
        everything = live.data()
    finally:
        if pub is not None:
            pub.stop.set()
            pub.join(10)
        for s in streams:
            s.close()
        assert gw.stop() == 0, gw.log()[-3000:]
        gw.cleanup()
    assert len(everything) == sent
    # One process on the same journal replays the same bytes.
    with_one = start_gateway("--journal-dir", str(jdir), feeds=FEEDS)
    try:
        ref = Stream(with_one.port, {"start": 0})
        ref.read_until(completed)
        reference = ref.data()
        ref.close()
    finally:
        assert with_one.stop() == 0
        with_one.cleanup()
    assert reference == everything
    for got in replays.values():
        assert got == reference[: len(got)]
    selected = [r for r in reference if iid_of(r) == IDS[0] and ts_of(r) >= mid]
    assert named.data() == selected[: len(named.data())] and len(named.data()) > 500


# --- (b) ---------------------------------------------------------------------------------


async def test_resuming_client_survives_kill_9_of_its_worker(jdir: Path) -> None:
    async with gateways() as started:
        gw = await asyncio.to_thread(
            start_gateway,
            *WORKERS,
            "--journal-dir",
            str(jdir),
            feeds={"ING.R": "ingest://127.0.0.1:0"},
        )
        started.append(gw)
        await apoll_until(lambda: len(worker_pids(gw)) == 2, 10.0, 0.02, "two workers")
        pub = SeqPublisher(gw.ingest_ports["ING.R"], 0)
        try:
            sink = Sink(await _connect(gw.port, "ING.R", start=0))
            await sink.past_a_checkpoint(500)
            live = sink.client.live
            assert live is not None
            sock = live._writer.get_extra_info("socket")
            victim = await apoll_until(lambda: worker_of(gw, sock), 5.0, 0.01, "its worker")
            os.kill(victim, signal.SIGKILL)
            # the client resumes on a live worker; the supervisor starts a new one
            await apoll_until(lambda: sink.client.reconnects >= 1, 10.0, 0.01, "a resume")
            await apoll_until(
                lambda: len(pids := worker_pids(gw)) == 2 and victim not in pids,
                10.0,
                0.02,
                "the worker restarted",
            )
            await sink.past_a_checkpoint(sink.count + 500)
        finally:
            pub.stop()
        last = pub.next
        await apoll_until(
            lambda: sink.count and sink.sequences()[-1] == last - 1,
            15.0,
            0.01,
            "every record published",
        )
        await sink.close()
    check_against_journal(jdir, "ING.R", {SCHEMA_RTYPE["trades"]}, sink)
    client = sink.client
    assert client.gaps == [] and client.reconnects == 1
    assert client.cursor.dropped > 0  # records the client had were replayed and dropped
    assert sink.sequences().tolist() == list(range(last))  # nothing missed, nothing twice
