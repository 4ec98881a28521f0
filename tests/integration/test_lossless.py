"""Lossless ingest (``backpressure=1``) against the default (never wait for a session)."""

from __future__ import annotations

import asyncio
import select
import socket
import threading
import time

import numpy as np

from gateway.client import LiveClient
from gateway.dbn import GATEWAY_RTYPES, encode_publisher_metadata
from gateway.feeds.synthetic import SyntheticGenerator, SyntheticOptions
from tests.integration.helpers import (
    KEY,
    apoll_until,
    error_texts,
    gateway,
    metric,
    metric_samples,
)

SESSIONS = 20
GATEWAY_RECORD_TYPES = np.array(sorted(GATEWAY_RTYPES), dtype=np.uint8)


class Publisher(threading.Thread):
    """Writes as fast as the gateway takes it, counting the times its socket was full."""

    def __init__(self, port: int, payload: bytes, rate: float | None = None) -> None:
        super().__init__(daemon=True)
        self.rate = rate  # bytes per second, None: as fast as possible
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        self.sock.setblocking(False)
        self.payload = payload
        self.blocked = 0
        self.done = threading.Event()

    def send(self, payload: bytes) -> None:
        view = memoryview(payload)
        deadline = time.monotonic() + 60
        while view and time.monotonic() < deadline:
            try:
                sent = self.sock.send(view[: 256 * 1024])
                view = view[sent:]
            except BlockingIOError:
                self.blocked += 1
                select.select([], [self.sock], [], 1.0)
        assert not view, "publisher could not finish in 60 s"

    def run(self) -> None:
        if self.rate is None:
            self.send(self.payload)
        else:
            step = 64 * 1024
            started = time.monotonic()
            for off in range(0, len(self.payload), step):
                self.send(self.payload[off : off + step])
                delay = started + (off + step) / self.rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
        self.done.set()


def _records(n: int, seed: int) -> tuple[dict[str, int], bytes]:
    gen = SyntheticGenerator(SyntheticOptions(instruments=20, seed=seed, schemas=("mbp-1",)))
    t0 = time.time_ns()
    blob = b"".join(b"".join(gen.make(1000, t0 + k, 1000)) for k in range(n // 1000))
    return dict(gen.instruments), blob


class Reader:
    def __init__(self, client: LiveClient, delay: float = 0.0) -> None:
        self.client = client
        self.delay = delay
        self.data = bytearray()
        self.gateway_records: list[bytes] = []
        self.reading = asyncio.Event()
        self.reading.set()
        self.ended = False
        self.task = asyncio.get_running_loop().create_task(self.run())

    async def run(self) -> None:
        async for batch in self.client.batches():
            idx = batch.index
            ours = np.isin(idx.rtypes, GATEWAY_RECORD_TYPES)
            if ours.any():
                self.gateway_records += [
                    bytes(r) for rt, _, r in batch.records() if rt in GATEWAY_RTYPES
                ]
            self.data += idx.select(~ours) if ours.any() else idx.data
            if self.delay:
                await asyncio.sleep(self.delay)
            await self.reading.wait()
        self.ended = True


async def _connect_all(port: int, dataset: str) -> list[LiveClient]:
    clients = []
    for i in range(SESSIONS):
        # The last session is the slow one: a small receive buffer so the kernel does not
        # absorb the whole test for it.
        rcvbuf = 32 * 1024 if i == SESSIONS - 1 else None
        c = await LiveClient.connect("127.0.0.1", port, KEY, dataset, rcvbuf=rcvbuf)
        await c.subscribe("mbp-1", "ALL_SYMBOLS")
        await c.start()
        clients.append(c)
    return clients


CONFIG = """
[slow_reader]
stall_timeout_s = 5.0
"""


async def test_lossless_feed_slows_publisher_and_cuts_a_stalled_session() -> None:
    symbols, first = _records(100_000, seed=1)
    _, second = _records(12_000, seed=2)
    with gateway(
        "--metrics-port",
        "0",
        config=CONFIG,
        feeds={"L.FEED": "ingest://127.0.0.1:0?backpressure=1"},
    ) as gw:
        clients = await _connect_all(gw.port, "L.FEED")
        try:
            await _lossless_scenario(gw, clients, symbols, first, second)
        finally:
            for c in clients:
                await c.close()


async def _lossless_scenario(gw, clients, symbols, first, second) -> None:  # type: ignore[no-untyped-def]
    readers = [Reader(c) for c in clients[:-1]]
    slow = Reader(clients[-1], delay=0.02)
    pub = Publisher(
        gw.ingest_ports["L.FEED"],
        encode_publisher_metadata("L.FEED", time.time_ns(), symbols) + first,
    )
    pub.start()
    everyone = [*readers, slow]
    await apoll_until(lambda: all(len(r.data) >= len(first) for r in everyone), 90)
    assert all(bytes(r.data) == first for r in everyone)  # every record, in order
    assert pub.blocked > 0  # the publisher's writes blocked: TCP slowed it
    # feed metrics are exported on the gateway's tick: wait for the pauses to show
    m = await apoll_until(
        lambda: (
            (m := metric_samples(gw.metrics_port))
            and metric(m, "gateway_feed_pauses_total", dataset="L.FEED") > 0
            and m
        ),
        what="gateway_feed_pauses_total > 0",
    )
    assert metric(m, "gateway_records_skipped_total") == 0
    # No slow-reader warning (SystemMsg code 2) and no ErrorMsg (skip notice) to anyone.
    for r in everyone:
        assert not [rec for rec in r.gateway_records if rec[1] == 0x17 and rec[319] == 2]
        assert not error_texts(r.gateway_records)

    # Now the slow session stops reading: it is cut after the stall timeout and the
    # others go on losslessly.
    slow.reading.clear()
    total = len(first)
    cut = False
    for _ in range(60):
        await asyncio.to_thread(pub.send, second)
        total += len(second)
        m = metric_samples(gw.metrics_port)
        if metric(m, "gateway_slow_reader_events_total", event="disconnect") >= 1:
            cut = True
            break
    assert cut, "the stalled session was never disconnected"
    await apoll_until(lambda: all(len(r.data) >= total for r in readers), 90)
    for r in readers:
        assert len(r.data) == total and bytes(r.data[: len(first)]) == first
        assert not error_texts(r.gateway_records)
    slow.reading.set()
    await apoll_until(lambda: slow.ended, 30)
    errors = error_texts(slow.gateway_records)
    assert errors and "stalled a lossless feed for more than 5 s" in errors[-1][1]
    pub.sock.close()


async def test_default_feed_never_waits_for_a_slow_session() -> None:
    symbols, first = _records(150_000, seed=3)
    with gateway("--metrics-port", "0", feeds={"D.FEED": "ingest://127.0.0.1:0"}) as gw:
        clients = await _connect_all(gw.port, "D.FEED")
        try:
            await _default_scenario(gw, clients, symbols, first)
        finally:
            for c in clients:
                await c.close()


async def _default_scenario(gw, clients, symbols, first) -> None:  # type: ignore[no-untyped-def]
    readers = [Reader(c) for c in clients[:-1]]
    stalled = Reader(clients[-1])
    stalled.reading.clear()
    # A live feed at 4 MB/s that the healthy sessions keep up with.
    pub = Publisher(
        gw.ingest_ports["D.FEED"],
        encode_publisher_metadata("D.FEED", time.time_ns(), symbols) + first,
        rate=4e6,
    )
    pub.start()
    await apoll_until(lambda: all(len(r.data) >= len(first) for r in readers), 90)
    assert all(bytes(r.data) == first for r in readers)
    # feed metrics are exported on the gateway's tick: once the export counts every record
    # in, it has also counted any pause
    n_records = len(first) // 80
    m = await apoll_until(
        lambda: (
            (m := metric_samples(gw.metrics_port))
            and metric(m, "gateway_feed_records_in_total", dataset="D.FEED") >= n_records
            and m
        ),
        what=f"gateway_feed_records_in_total >= {n_records}",
    )
    assert metric(m, "gateway_feed_pauses_total", dataset="D.FEED") == 0  # never slowed
    stalled.reading.set()

    def caught_up() -> bool:
        # every record either reached the stalled reader or was skipped, and it was told
        skipped = metric(metric_samples(gw.metrics_port), "gateway_records_skipped_total")
        return bool(
            error_texts(stalled.gateway_records) and len(stalled.data) + skipped * 80 == len(first)
        )

    await apoll_until(caught_up, 30, 0.05, what="the stalled reader caught up and told")
    got = len(stalled.data)
    notices = error_texts(stalled.gateway_records)
    skipped = metric(metric_samples(gw.metrics_port), "gateway_records_skipped_total")
    # mbp-1 defaults to skip: it skipped while behind, then was told exactly how many
    # records it missed, and got the rest in order.
    assert 0 < skipped and skipped * 80 == len(first) - got
    assert notices and notices[0][0] == 7
    assert notices[0][1] == f"Skipped {int(skipped)} records after slow reading"
    seqs = np.frombuffer(bytes(stalled.data), dtype=np.uint8).reshape(-1, 80)[:, 44:48]
    seqs = seqs.copy().view("<u4").ravel()
    assert (np.diff(seqs.astype(np.int64)) > 0).all()
    pub.sock.close()
