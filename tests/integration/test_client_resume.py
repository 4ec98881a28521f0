"""The project's resuming client against real gateway processes with a journal.

(a) Across gateway restarts: a test publisher feeds an ingest dataset with trades that
    carry a sequence number; the client reads on while the gateway is stopped with
    SIGTERM, restarted on the same port and journal directory, killed with SIGKILL and
    restarted again. Its stream has no duplicate and no hole: it is byte for byte what a
    ``start=0`` session on the last gateway replays from the journal (the records each
    gateway journaled, in order), and the sequence numbers run on by one except where a
    new publisher took over.
(b) On jittered timestamps: the synthetic feed's ts_event goes backwards now and then, so
    "resubscribe from the last ts_event" could not be exact. A reference session and a
    resuming one both replay from ``start=0``; the resuming one has its socket shut under
    it twice. Over the same span both streams are identical.
(c) The same on the LIVE sample looped: eight schemas in one session (chunks of mixed
    rtypes), ts_event going backwards, and every pass byte-identical to the last — only a
    count from a position can tell those records apart.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import databento_dbn as d
import numpy as np

from gateway.checkpoint import Backoff
from gateway.client_resume import ResumingClient
from gateway.dbn import GATEWAY_RTYPES, SCHEMA_RTYPE, encode_publisher_metadata, index_records
from gateway.journal import JournalStore
from tests.integration.helpers import (
    DATA,
    KEY,
    GatewayProcess,
    apoll_until,
    start_gateway,
)

TRADE_LEN = 48
_GATEWAY = np.array(sorted(GATEWAY_RTYPES), dtype=np.uint8)
SYMBOLS = {"AAA": 11, "BBB": 12, "CCC": 13}
BACKOFF = Backoff(initial_s=0.05, max_s=0.5, max_elapsed_s=20.0)


class Sink:
    """Reads a client's batches in a task; keeps the data records' bytes."""

    def __init__(self, client: ResumingClient) -> None:
        self.client = client
        self.data = bytearray()
        self.n = 0
        #: checkpoint seq -> data records handed over up to it (every record of the
        #: chunks up to that seq, by the checkpoint's promise)
        self.upto: dict[int, int] = {}
        self.error: BaseException | None = None
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            async for batch in self.client.batches():
                idx = batch.index
                keep = ~np.isin(idx.rtypes, _GATEWAY)
                kept = int(np.count_nonzero(keep))
                if kept:
                    self.data += idx.select(keep)
                    self.n += kept
                cursor = self.client.cursor
                if cursor.seq is not None:
                    self.upto.setdefault(cursor.seq, self.n - cursor.count)
        except Exception as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    async def past_a_checkpoint(self, count: int) -> None:
        """Wait for ``count`` records, a checkpoint, and records after it in hand."""

        def ready() -> bool:
            cursor = self.client.cursor
            return self.count >= count and cursor.seq is not None and cursor.count > 0

        await apoll_until(ready, 15.0, 0.005, "records after a checkpoint")

    @property
    def count(self) -> int:
        assert self.error is None, f"client failed: {self.error!r}"
        return self.n

    def sequences(self) -> np.ndarray:
        rows = np.frombuffer(bytes(self.data), dtype=np.uint8).reshape(-1, TRADE_LEN)
        return rows[:, 44:48].copy().view("<u4").ravel().astype(np.int64)

    async def close(self) -> None:
        await self.client.close()
        await asyncio.wait_for(self.task, 10.0)


class Publisher:
    """Feeds an ingest port in a thread: Metadata, then trades numbered from ``first``,
    20 every 2 ms, until stopped or the gateway goes away."""

    def __init__(self, port: int, first: int) -> None:
        self.first = first
        self.sent = 0
        self._stop = threading.Event()
        self._sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._sock.sendall(encode_publisher_metadata("ING.R", time.time_ns(), SYMBOLS))
            while not self._stop.is_set():
                now = time.time_ns()
                seqs = range(self.first + self.sent, self.first + self.sent + 20)
                self._sock.sendall(b"".join(_trade(s, now) for s in seqs))
                self.sent += 20
                self._stop.wait(0.002)
        except OSError:
            pass  # the gateway went away

    @property
    def next(self) -> int:
        return self.first + self.sent

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10.0)
        self._sock.close()


def _trade(seq: int, now: int) -> bytes:
    return bytes(
        d.TradeMsg(
            publisher_id=1,
            instrument_id=11 + seq % 3,
            ts_event=now - (seq * 7919) % 50_000,  # jittered, as real feeds are
            price=100_000_000_000 + seq,
            size=1,
            action=d.Action.TRADE,  # type: ignore[arg-type]  # stubs type enum members as str
            side=d.Side.BID,  # type: ignore[arg-type]  # stubs type enum members as str
            depth=0,
            ts_recv=now,
            sequence=seq,
        )
    )


def check_against_journal(jdir: Path, dataset: str, rtypes: set[int], *sinks: Sink) -> None:
    """Each sink had, at every checkpoint P it saw, exactly the records of ``rtypes`` the
    journal holds in chunks up to P (read from the journal files once the gateway is gone):
    nothing missed, nothing twice, even where records repeat byte for byte."""
    store = JournalStore.open(jdir, retention_s=8_640_000.0)
    try:
        journal = store.dataset(dataset)
        per_seq: dict[int, int] = {}
        for entry in journal.entries(rtypes, 0, journal.last_seq, max_rows=1 << 22):
            per_seq[entry.seq] = per_seq.get(entry.seq, 0) + entry.count
    finally:
        store.close()
    seqs = sorted(per_seq)
    totals = np.cumsum([per_seq[q] for q in seqs]).tolist()
    for sink in sinks:
        assert sink.upto, "no checkpoint seen"
        for seq, count in sink.upto.items():
            k = bisect.bisect_right(seqs, seq)
            assert count == (totals[k - 1] if k else 0), (seq, count)


def _break(fd: int) -> None:
    """Shut the connection down under its transport (both loops: through a duplicate fd,
    as uvloop's transport sockets refuse shutdown())."""
    with socket.socket(fileno=os.dup(fd)) as sock:
        sock.shutdown(socket.SHUT_RDWR)


@contextlib.contextmanager
def journal_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="gateway-journal-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.asynccontextmanager
async def gateways() -> AsyncIterator[list[GatewayProcess]]:
    """Every gateway the test starts, stopped (by PID) and cleaned up at the end."""
    started: list[GatewayProcess] = []
    try:
        yield started
    finally:
        for gw in started:
            gw.stop()  # SIGTERM by PID if still running (a killed one has exited)
            gw.cleanup()


async def _start(started: list[GatewayProcess], jdir: Path, *args: str) -> GatewayProcess:
    gw = await asyncio.to_thread(
        start_gateway, "--journal-dir", str(jdir), *args, feeds={"ING.R": "ingest://127.0.0.1:0"}
    )
    started.append(gw)
    return gw


async def _connect(port: int, dataset: str, start: int | None = None) -> ResumingClient:
    client = await ResumingClient.connect("127.0.0.1", port, KEY, dataset, backoff=BACKOFF)
    await client.subscribe("trades", "ALL_SYMBOLS", start=start)
    await client.start()
    return client


async def test_resume_across_sigterm_and_kill9_restarts_without_gap_or_duplicate() -> None:
    with journal_dir() as jdir:
        async with gateways() as started:
            gw = await _start(started, jdir)
            port = gw.port
            sink = Sink(await _connect(port, "ING.R"))
            pub = Publisher(gw.ingest_ports["ING.R"], 0)
            takeovers = []
            try:
                for how in ("sigterm", "kill"):
                    # records flowing, a checkpoint seen, records after it in hand
                    await sink.past_a_checkpoint(sink.count + 300)
                    if how == "sigterm":
                        await asyncio.to_thread(gw.stop)
                    else:
                        gw.proc.kill()
                        await asyncio.to_thread(gw.proc.wait, 10)
                    pub.stop()
                    gw = await _start(started, jdir, "--port", str(port))
                    takeovers.append(pub.next)
                    pub = Publisher(gw.ingest_ports["ING.R"], pub.next)
                # the last publisher's records all arrive
                await apoll_until(lambda: pub.sent >= 300, 15.0, 0.01, "the last publisher")
            finally:
                pub.stop()
            last = pub.next
            await apoll_until(
                lambda: sink.count and sink.sequences()[-1] == last - 1,
                15.0,
                0.01,
                "every record of the last publisher",
            )
            await sink.close()
            # the reference: everything the journal holds, replayed on the last gateway
            ref = Sink(await _connect(port, "ING.R", start=0))
            await apoll_until(lambda: ref.count >= sink.count, 15.0, 0.01, "the replay")
            await ref.close()
        check_against_journal(jdir, "ING.R", {SCHEMA_RTYPE["trades"]}, sink, ref)
    client = sink.client
    assert client.gaps == [] and client.reconnects >= 2
    assert client.cursor.dropped > 0  # records the client had were replayed and dropped
    seqs = sink.sequences()
    assert seqs[0] == 0
    steps = np.diff(seqs)
    jumps = seqs[1:][steps != 1]
    # no duplicate, no going back; a jump only where a new publisher took over (the records
    # a dying gateway never read are the publisher's loss, not the client's)
    assert (steps > 0).all()
    assert set(jumps.tolist()) <= set(takeovers)
    assert bytes(ref.data[: len(sink.data)]) == bytes(sink.data)
    assert ref.client.reconnects == 0


async def test_resume_on_jittered_timestamps_matches_a_session_that_never_dropped() -> None:
    feed = {"SYN.J": "synthetic:?rate=20000&instruments=20&schemas=trades&seed=3"}
    with journal_dir() as jdir:
        async with gateways() as started:
            gw = await asyncio.to_thread(start_gateway, "--journal-dir", str(jdir), feeds=feed)
            started.append(gw)
            ref = Sink(await _connect(gw.port, "SYN.J", start=0))
            sink = Sink(await _connect(gw.port, "SYN.J", start=0))
            for _ in range(2):
                await sink.past_a_checkpoint(sink.count + 2000)
                live = sink.client.live
                assert live is not None
                _break(live._writer.get_extra_info("socket").fileno())
            want = sink.count + 4000
            await apoll_until(
                lambda: sink.count >= want and ref.count >= want, 15.0, 0.01, "both sessions"
            )
            await sink.close()
            await ref.close()
        check_against_journal(jdir, "SYN.J", {SCHEMA_RTYPE["trades"]}, sink, ref)
    n = min(sink.count, ref.count)
    assert n >= want
    assert bytes(sink.data[: n * TRADE_LEN]) == bytes(ref.data[: n * TRADE_LEN])
    assert sink.client.reconnects == 2 and sink.client.gaps == []
    assert sink.client.cursor.dropped > 0 and ref.client.reconnects == 0
    seqs = sink.sequences()[:n]
    assert (np.diff(seqs) == 1).all()  # the feed's own numbering: nothing missed or twice
    rows = np.frombuffer(bytes(sink.data[: n * TRADE_LEN]), dtype=np.uint8).reshape(-1, TRADE_LEN)
    ts_event = rows[:, 8:16].copy().view("<u8").ravel()
    assert (np.diff(ts_event.astype(np.int64)) < 0).any()  # the timestamps do jitter


LIVE_SCHEMAS = ("mbo", "mbp-1", "mbp-10", "trades", "ohlcv-1s", "ohlcv-1m", "statistics")


async def test_resume_on_the_live_sample_looped_matches_a_session_that_never_dropped() -> None:
    feed = {"LIVE.J": f"file:{DATA / 'LIVE' / 'test_data.live.dbn.zst'}?pace=max&loop=1"}
    # the sample spans days of ts_event: keep all of it
    config = "[journal]\nretention_s = 8640000.0\nsegment_span_s = 86400.0\n"
    with journal_dir() as jdir:
        async with gateways() as started:
            gw = await asyncio.to_thread(
                start_gateway, "--journal-dir", str(jdir), feeds=feed, config=config
            )
            started.append(gw)
            sinks = []
            for _ in range(2):
                client = await ResumingClient.connect(
                    "127.0.0.1", gw.port, KEY, "LIVE.J", backoff=BACKOFF
                )
                for schema in (*LIVE_SCHEMAS, "definition"):
                    await client.subscribe(schema, "ALL_SYMBOLS", start=0)
                await client.start()
                sinks.append(Sink(client))
            ref, sink = sinks
            for _ in range(2):
                await sink.past_a_checkpoint(sink.count + 150)
                live = sink.client.live
                assert live is not None
                _break(live._writer.get_extra_info("socket").fileno())
            want = sink.count + 300
            await apoll_until(
                lambda: sink.count >= want and ref.count >= want, 15.0, 0.01, "both sessions"
            )
            await sink.close()
            await ref.close()
        rtypes = {SCHEMA_RTYPE[s] for s in (*LIVE_SCHEMAS, "definition")}
        check_against_journal(jdir, "LIVE.J", rtypes, sink, ref)
    size = min(len(sink.data), len(ref.data))
    assert size and bytes(sink.data[:size]) == bytes(ref.data[:size])
    assert sink.client.reconnects == 2 and sink.client.gaps == []
    assert sink.client.cursor.dropped > 0 and ref.client.reconnects == 0
    index, used = index_records(bytes(sink.data[:size]))
    records = [
        bytes(index.data[o : o + n]) for o, n in zip(index.offsets, index.lengths, strict=True)
    ]
    assert len(set(index.rtypes.tolist())) >= 7  # mixed rtypes in one stream
    assert len(records) > 2 * len(set(records))  # the same bytes over and over
