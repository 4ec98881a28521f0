"""Intraday replay from the journal, a real gateway process (``--journal-dir``, the suite's
loop): ``start=`` as ns, as ISO 8601 and 0 with the official client and on the wire, two
subscriptions with different starts, aged out, the hand-over to live under load with
per-record sequence numbers, recovery after ``kill -9`` (a replay holds every record a live
session saw, with its symbology, with no publisher connected), sendfile used, and a journal
write error answered with a clear ErrorMsg."""

from __future__ import annotations

import os
import re
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import databento_dbn as d
import numpy as np
import pytest

from gateway import control
from gateway.dbn import RTYPE_ERROR, RTYPE_SYMBOL_MAPPING, RTYPE_SYSTEM, encode_publisher_metadata
from gateway.replay.refusals import iso_ns
from tests.integration.helpers import (
    KEY,
    GatewayProcess,
    OfficialSession,
    RawClient,
    data_records,
    gateway,
    metric_at_least,
    poll_until,
    start_gateway,
)

DATASET = "REPLAY.TEST"
SYMBOLS = {"S1": 101, "S2": 102, "S3": 103, "S4": 104}
IDS = list(SYMBOLS.values())
TRADES = 0x00


@pytest.fixture
def journal_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="gateway-replay-") as tmp:
        yield Path(tmp)


def make_trades(n: int, t0: int, first: int = 0) -> list[bytes]:
    """Trades whose ``sequence`` counts from ``first``; ts_event 1 µs apart with ±3 µs of
    jitter (not monotonic), instruments in turn."""
    out = []
    for i in range(first, first + n):
        jitter = ((i * 7919) % 7 - 3) * 1000
        out.append(
            bytes(
                d.TradeMsg(
                    publisher_id=1,
                    instrument_id=IDS[i % len(IDS)],
                    ts_event=t0 + i * 1000 + jitter,
                    price=100_000_000_000 + i,
                    size=1,
                    action=d.Action.TRADE,  # type: ignore[arg-type]  # stubs type enum members as str
                    side=d.Side.BID,  # type: ignore[arg-type]  # stubs type enum members as str
                    depth=0,
                    ts_recv=t0 + i * 1000,
                    sequence=i,
                )
            )
        )
    return out


def seq_of(rec: bytes) -> int:
    return int(struct.unpack_from("<I", rec, 44)[0])


def ts_of(rec: bytes) -> int:
    return int(struct.unpack_from("<Q", rec, 8)[0])


def iid_of(rec: bytes) -> int:
    return int(struct.unpack_from("<I", rec, 4)[0])


def text_of(rec: bytes) -> str:
    return rec[16:318].split(b"\0", 1)[0].decode()


class Stream:
    """A raw session: auth, subscriptions (trades ALL_SYMBOLS by default), start, then
    records parsed as they come."""

    def __init__(self, port: int, *subs: dict[str, Any], extra: str = "") -> None:
        self.client = RawClient(port)
        reply = self.client.handshake(KEY, DATASET, extra)
        assert reply.startswith("success=1"), reply
        for i, sub in enumerate(subs or ({},), 1):  # none: ALL_SYMBOLS trades, live
            self.client.send(
                control.encode_subscription(
                    sub.get("schema", "trades"),
                    sub.get("symbols", "ALL_SYMBOLS"),
                    sub_id=i,
                    start=sub.get("start"),
                )
            )
        self.client.start()
        self.buf = bytearray()
        self.records: list[bytes] = []
        self.metadata = False
        self.ended = False
        #: where the first ``Finished trades replay`` SystemMsg is in ``records``
        self.finished_at: int | None = None
        self.trades = 0

    def _parse(self) -> None:
        buf = self.buf
        if not self.metadata:
            if len(buf) < 8:
                return
            size = 8 + int.from_bytes(buf[4:8], "little")
            if len(buf) < size:
                return
            del buf[:size]
            self.metadata = True
        off = 0
        while off < len(buf) and off + buf[off] * 4 <= len(buf):
            size = buf[off] * 4
            rec = bytes(buf[off : off + size])
            if rec[1] == TRADES:
                self.trades += 1
            elif self.finished_at is None and rec[1] == RTYPE_SYSTEM:
                if text_of(rec) == "Finished trades replay":
                    self.finished_at = len(self.records)
            self.records.append(rec)
            off += size
        del buf[:off]

    def read_until(self, done: Callable[[Stream], bool], timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while not done(self):
            left = deadline - time.monotonic()
            assert left > 0, f"timed out with {len(self.records)} records"
            try:
                data = self.client.recv_some(min(left, 2.0))
            except TimeoutError:
                continue
            except ConnectionError:
                data = b""
            if not data:
                self.ended = True
                assert done(self), f"ended with {len(self.records)} records"
                return
            self.buf += data
            self._parse()

    def data(self) -> list[bytes]:
        return [r for r in self.records if r[1] == TRADES]

    def close(self) -> None:
        self.client.close()


def completed(stream: Stream) -> bool:
    return stream.finished_at is not None


def has_error(stream: Stream) -> bool:
    return any(r[1] == RTYPE_ERROR for r in stream.records)


def publish(port: int, t0: int, records: list[bytes]) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(encode_publisher_metadata(DATASET, t0, SYMBOLS) + b"".join(records))
    return sock


def _journaled(gw: GatewayProcess, records: list[bytes]) -> None:
    """A live session has received every one of ``records`` (write-ahead: all journaled)."""
    live = Stream(gw.port)
    try:
        live.read_until(lambda s: len(s.records) >= 1)  # its ack: it is streaming
        pub = publish(gw.ingest_ports[DATASET], ts_of(records[0]), records)
        live.read_until(lambda s: s.trades >= len(records))
        pub.close()
    finally:
        live.close()


def test_start_as_ns_iso_and_zero_two_starts_and_aged_out(journal_dir: Path) -> None:
    t0 = time.time_ns() - 60 * 10**9
    records = make_trades(3000, t0)
    feeds = {DATASET: "ingest://127.0.0.1:0"}
    metrics = ("--metrics-port", "0")
    with gateway("--journal-dir", str(journal_dir), *metrics, feeds=feeds) as gw:
        _journaled(gw, records)
        # start=0, the official client: every record kept, mappings, REPLAY_COMPLETED.
        everything = OfficialSession(
            gw.port, DATASET, [{"schema": "trades", "symbols": "ALL_SYMBOLS", "start": 0}]
        )
        # two subscriptions, different starts: ns, and ISO 8601 (the client converts it)
        k, j = 1200, 2100
        two = OfficialSession(
            gw.port,
            DATASET,
            [
                {"schema": "trades", "symbols": ["S1"], "start": ts_of(records[k])},
                {"schema": "trades", "symbols": ["S2"], "start": iso_ns(ts_of(records[j]))},
            ],
        )
        for s in (everything, two):
            s.start()
        for s in (everything, two):
            assert s.wait_for(
                lambda rs: any(
                    isinstance(r, d.SystemMsg) and r.code == d.SystemCode.REPLAY_COMPLETED
                    for r in rs
                )
            )
        assert [bytes(r) for r in data_records(everything.records)] == records
        maps = {(r.stype_in_symbol, r.instrument_id) for r in everything.records if r.rtype == 0x16}
        assert maps == set(SYMBOLS.items())
        want = [
            r
            for r in records
            if (iid_of(r) == 101 and ts_of(r) >= ts_of(records[k]))
            or (iid_of(r) == 102 and ts_of(r) >= ts_of(records[j]))
        ]
        assert [bytes(r) for r in data_records(two.records)] == want
        for s in (everything, two):
            assert s.stop() is None
        # ISO 8601 on the wire, with nanoseconds.
        start = ts_of(records[2500])
        iso = Stream(gw.port, {"start": iso_ns(start)})
        iso.read_until(completed)
        assert iso.data() == [r for r in records if ts_of(r) >= start]
        iso.close()
        # Older than the oldest record kept: a fatal REPLAY_DATA_AGED_OUT naming it.
        oldest = min(map(ts_of, records))
        aged = Stream(gw.port, {"start": oldest - 1})
        aged.read_until(has_error)
        (err,) = [r for r in aged.records if r[1] == RTYPE_ERROR]
        assert err[318] == 8  # REPLAY_DATA_AGED_OUT
        assert iso_ns(oldest) in text_of(err) and str(oldest) in text_of(err)
        aged.close()
        # Whole parts went out with os.sendfile (the pump's count at the syscall, this loop).
        sent = [int(m) for m in re.findall(r"sendfile_bytes=(\d+)", gw.log())]
        assert sent and max(sent) >= 48 * 3000
        metric_at_least(gw.metrics_port, "gateway_replay_bytes_total", sum(sent), path="sendfile")
        metric_at_least(gw.metrics_port, "gateway_replays_refused_total", 1, reason="aged_out")


class Publisher(threading.Thread):
    """Publishes trades with a running sequence, ``per_slice`` records every ``every_s``,
    until stopped or the gateway goes away."""

    def __init__(self, port: int, t0: int, per_slice: int = 600, every_s: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.sendall(encode_publisher_metadata(DATASET, t0, SYMBOLS))
        self.t0 = t0
        self.per_slice = per_slice
        self.every_s = every_s
        self.sent = 0
        self.stop = threading.Event()

    def run(self) -> None:
        template = np.frombuffer(make_trades(1, self.t0)[0], dtype=np.uint8)
        ids = np.array(IDS, dtype=np.uint32)
        try:
            while not self.stop.is_set():
                seqs = np.arange(self.sent, self.sent + self.per_slice, dtype=np.uint64)
                rows = np.tile(template, (self.per_slice, 1))
                rows[:, 4:8] = ids[seqs % len(ids)].view(np.uint8).reshape(-1, 4)
                ts = (self.t0 + seqs * 1000).astype(np.uint64)
                rows[:, 8:16] = ts.view(np.uint8).reshape(-1, 8)
                rows[:, 44:48] = seqs.astype(np.uint32).view(np.uint8).reshape(-1, 4)
                self.sock.sendall(rows.tobytes())
                self.sent += self.per_slice
                time.sleep(self.every_s)
        except OSError:
            pass
        finally:
            self.sock.close()


def _contiguous(records: list[bytes]) -> list[int]:
    seqs = [seq_of(r) for r in records if r[1] == TRADES]
    assert seqs == list(range(len(seqs))), "a gap or a duplicate"
    return seqs


def test_handover_under_load_then_kill_9_and_recovery(journal_dir: Path) -> None:
    t0 = time.time_ns() - 30 * 10**9
    feeds = {DATASET: "ingest://127.0.0.1:0"}
    gw = start_gateway("--journal-dir", str(journal_dir), feeds=feeds)
    streams: list[Stream] = []
    pub: Publisher | None = None
    try:
        live = Stream(gw.port)
        streams.append(live)
        live.read_until(lambda s: len(s.records) >= 1)  # its ack: it is streaming
        pub = Publisher(gw.ingest_ports[DATASET], t0)
        pub.start()
        live.read_until(lambda s: s.trades > 5000)
        # A replay from 0 while the feed runs: every sequence once, across replay -> live.
        replay = Stream(gw.port, {"start": 0})
        streams.append(replay)
        replay.read_until(completed)
        live_from = pub.sent
        replay.read_until(lambda s: s.trades > live_from + 5000)
        assert pub.is_alive(), "the feed must still run at the hand-over"
        seqs = _contiguous(replay.records)
        at = replay.finished_at
        assert at is not None and 0 < at < len(replay.records) - 1000
        # kill -9 while the live session reads and the publisher publishes.
        live.read_until(lambda s: s.trades > seqs[-1] + 3000)
        os.kill(gw.proc.pid, signal.SIGKILL)
        gw.proc.wait(10)
        live.read_until(lambda s: s.ended, timeout=10)  # to the end of its stream
        seen = _contiguous(live.records)
    finally:
        if pub is not None:
            pub.stop.set()
            pub.join(10)
        for stream in streams:
            stream.close()
        gw.stop()
        gw.cleanup()
    # Restart on the same journal, no publisher: a replay from 0 holds all the live session saw.
    with gateway("--journal-dir", str(journal_dir), feeds=feeds) as again:
        back = Stream(again.port, {"start": 0})
        try:
            back.read_until(completed)
            got = _contiguous(back.records)
            assert len(got) >= len(seen)
            maps = [r for r in back.records if r[1] == RTYPE_SYMBOL_MAPPING]
            dec = d.DBNDecoder(has_metadata=False, input_version=3)
            dec.write(b"".join(maps))
            decoded = [m for m in dec.decode() if isinstance(m, d.SymbolMappingMsg)]
            assert {(m.stype_in_symbol, m.instrument_id) for m in decoded} == set(SYMBOLS.items())
        finally:
            back.close()


def _fsize_limited_python(tmp: Path, limit_bytes: int) -> str:
    wrapper = tmp / "python-fsize"
    wrapper.write_text(f'#!/bin/sh\nulimit -f {limit_bytes // 512}\nexec {sys.executable} "$@"\n')
    wrapper.chmod(0o700)
    return str(wrapper)


def test_a_journal_write_error_answers_replays_with_a_clear_error(journal_dir: Path) -> None:
    feeds = {DATASET: "synthetic:?rate=4000&instruments=4&schemas=trades"}
    with tempfile.TemporaryDirectory(prefix="gateway-fsize-") as tmp:
        python = _fsize_limited_python(Path(tmp), 64 * 1024)
        with gateway("--journal-dir", str(journal_dir), feeds=feeds, python=python) as gw:
            poll_until(lambda: "disabled" in gw.log(), 15.0, 0.05, "the journal to be disabled")
            s = Stream(gw.port, {"start": 0})
            s.read_until(has_error)
            (err,) = [r for r in s.records if r[1] == RTYPE_ERROR]
            assert text_of(err) == (
                f"Replay is not available: the journal of {DATASET} stopped after a write error"
            )
            assert str(journal_dir) not in text_of(err)
            s.close()
