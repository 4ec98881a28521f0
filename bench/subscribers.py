"""Subscriber worker processes: many connections per process, epoll, ``recv_into``.

A worker owns a share of a run's subscriber connections. It connects them (non-blocking,
at most ``max_inflight`` handshakes at a time), speaks each system's handshake, then only
reads: every readable socket is drained with ``recv_into`` into one preallocated buffer
and parsed with numpy (``bench.parsers``). Per-connection record counts are published in
a shared array so publishers can pace themselves on the slowest subscriber.

The harness drives a worker over a pipe::

    ("connect", [ConnSpec, ...], max_inflight, timeout_s)  -> ("ready", ReadyReport)
    ("expect", {index: records}, timeout_s)                -> ("result", WorkerResult)
    ("stats",)                                             -> ("stats", {index: counters})
    ("close",)                                             -> exits
"""

from __future__ import annotations

import errno
import gc
import os
import select
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from bench.parsers import (
    DbnParser,
    FrameParser,
    NatsParser,
    ParseError,
    RawParser,
    RecordSink,
    RecvClock,
    RedisParser,
    ZmtpParser,
    ZstdLayer,
    zmtp_frame,
)
from bench.records import (
    API_KEY,
    DATASET,
    FIRST_ID,
    INSTRUMENTS,
    nats_subject,
    redis_channel,
    symbol_of,
    zmq_topic,
)
from gateway import control

__all__ = ["ConnResult", "ConnSpec", "ReadyReport", "WorkerConfig", "WorkerResult", "worker_main"]

RECV_SIZE: Final = 256 * 1024
CARRY_MAX: Final = 64 * 1024
#: a deferred connection's buffer is parsed once less than this is free
DEFER_FREE: Final = 64 * 1024
EPOLLIN: Final = select.EPOLLIN
EPOLLOUT: Final = select.EPOLLOUT
EPOLLERR: Final = select.EPOLLERR | select.EPOLLHUP


@dataclass(frozen=True)
class ConnSpec:
    index: int
    system: str
    port: int
    #: instrument ids to subscribe to; None: everything (ALL_SYMBOLS / one subject)
    instruments: tuple[int, ...] | None = None
    zstd: bool = False
    #: gateway: an extra subscription unique to this session (no fan-out sharing)
    distinct_tag: int | None = None
    heartbeat_s: int | None = None
    probe: bool = False


@dataclass(frozen=True)
class WorkerConfig:
    per_instrument: bool = False
    #: sample every Nth record's send stamp (0: no latency)
    latency_every: int = 0
    #: per-connection receive buffer: received bytes are parsed in bulk when it fills up or
    #: the worker has nothing to read (0: parse every recv in one shared buffer)
    conn_buffer: int = 0
    #: about how many wire bytes one record takes (progress estimate between parses)
    frame_len: int = 80


@dataclass
class ReadyReport:
    ready: dict[int, tuple[int, int]] = field(default_factory=dict)  # index -> (start, ready)
    failed: dict[int, str] = field(default_factory=dict)


@dataclass
class ConnResult:
    index: int
    records: int = 0
    expected: int = 0
    gaps: int = 0
    unexpected: int = 0
    wire_bytes: int = 0
    plain_bytes: int = 0
    first_ns: int = 0
    last_ns: int = 0
    heartbeats: int = 0
    control: int = 0
    closed: str = ""
    notes: list[str] = field(default_factory=list)


@dataclass
class WorkerResult:
    conns: list[ConnResult]
    #: HdrHistogram-encoded latency (µs) over every connection / the probe connection
    latency_all: str = ""
    latency_probe: str = ""
    samples: int = 0


class _Conn:
    """One subscriber connection: handshake state, then a stream parser."""

    def __init__(self, spec: ConnSpec, cfg: WorkerConfig) -> None:
        self.spec = spec
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setblocking(False)
        self.fd = self.sock.fileno()
        self.state = "connecting"
        self.inbuf = b""
        self.out = b""
        self.carry = b""
        self.start_ns = 0
        self.ready_ns = 0
        self.expected = -1
        self.done_ns = 0
        self.closed = ""
        self.wire_bytes = 0
        wanted = None
        if spec.instruments is not None and cfg.per_instrument:
            wanted = np.zeros(INSTRUMENTS, dtype=np.bool_)
            wanted[np.asarray(spec.instruments) - FIRST_ID] = True
        self.sink = RecordSink(cfg.per_instrument, wanted, cfg.latency_every)
        self.parser: FrameParser = _PARSERS[spec.system](self.sink)
        self.zstd = ZstdLayer() if spec.zstd else None
        self.acks_needed = 1 + (spec.distinct_tag is not None)
        # Deferred parsing: bytes accumulate in an own buffer, with each recv's time.
        self.buf: bytearray | None = None
        self.view: memoryview | None = None
        self.arr: npt.NDArray[np.uint8] | None = None
        self.fill = 0
        self.clock = RecvClock()
        if cfg.conn_buffer and not spec.zstd:
            self.buf = bytearray(cfg.conn_buffer)
            self.view = memoryview(self.buf)
            self.arr = np.frombuffer(self.buf, dtype=np.uint8)

    # --- handshakes: bytes in, bytes out, until the stream starts -----------------------

    def greeting(self) -> bytes:
        system = self.spec.system
        if system == "redis":
            chans = (
                [redis_channel(None)]
                if self.spec.instruments is None
                else [redis_channel(i) for i in self.spec.instruments]
            )
            return _resp_command("SUBSCRIBE", *chans)
        if system == "zmq":
            greeting = b"\xff" + b"\0" * 8 + b"\x7f" + bytes([3, 0]) + b"NULL".ljust(20, b"\0")
            greeting += b"\0" + b"\0" * 31
            return greeting + _zmtp_ready("SUB")
        return b""

    def handshake(self, data: bytes) -> bytes:
        """Consume handshake bytes; return what to send. Sets state 'streaming' when done,
        leaving any stream bytes in ``self.inbuf`` for the parser."""
        self.inbuf += data
        system = self.spec.system
        if system == "gateway":
            return self._gateway_handshake()
        if system == "nats":
            return self._nats_handshake()
        if system == "redis":
            self.state = "streaming"  # confirmations are parsed as stream control messages
            return b""
        if system == "zmq":
            return self._zmtp_handshake()
        self.state = "streaming"
        return b""

    def _gateway_handshake(self) -> bytes:
        spec = self.spec
        lines = self.inbuf.split(b"\n")
        if self.state == "connected":
            if len(lines) < 3:
                return b""
            cram = lines[1].decode()
            if not cram.startswith("cram="):
                raise ParseError(f"gateway: expected cram=, got {cram[:60]!r}")
            auth = control.encode_auth(
                control.cram_response(cram[5:], API_KEY),
                DATASET,
                compression="zstd" if spec.zstd else "none",
                heartbeat_interval_s=spec.heartbeat_s or None,
                slow_reader_behavior="warn",
                client="bench",
            )
            self.inbuf = b"\n".join(lines[2:])
            self.state = "auth"
            return auth
        if self.state == "auth":
            if len(lines) < 2:
                return b""
            reply = lines[0].decode("ascii", "replace")
            if not reply.startswith("success=1"):
                raise ParseError(f"gateway refused the session: {reply[:200]}")
            self.inbuf = b"\n".join(lines[1:])
            if spec.instruments is None:
                out = control.encode_subscription(
                    "mbp-1", control.ALL_SYMBOLS, stype_in="instrument_id", sub_id=1
                )
            else:
                symbols = [symbol_of(i) for i in spec.instruments]
                out = control.encode_subscription("mbp-1", symbols, sub_id=1)
            if spec.distinct_tag is not None:
                out += control.encode_subscription(
                    "trades", str(spec.distinct_tag), stype_in="instrument_id", sub_id=2
                )
            self.state = "streaming"
            return out + control.START_SESSION
        return b""

    def _nats_handshake(self) -> bytes:
        if self.state == "connected":
            if b"\r\n" not in self.inbuf:
                return b""
            line, _, rest = self.inbuf.partition(b"\r\n")
            if not line.startswith(b"INFO"):
                raise ParseError(f"NATS: expected INFO, got {line[:60]!r}")
            self.inbuf = rest
            self.state = "sub"
            out = b'CONNECT {"verbose":false,"pedantic":false,"echo":false,"name":"bench"}\r\n'
            if self.spec.instruments is None:
                out += b"SUB md 1\r\n"
            else:
                out += b"".join(
                    f"SUB {nats_subject(i)} {100 + k}\r\n".encode()
                    for k, i in enumerate(self.spec.instruments)
                )
            return out + b"PING\r\n"
        if self.state == "sub":
            while b"\r\n" in self.inbuf:
                line, _, rest = self.inbuf.partition(b"\r\n")
                self.inbuf = rest
                if line == b"PONG":
                    self.state = "streaming"
                    return b""
                if line.startswith(b"-ERR"):
                    raise ParseError(f"NATS: {line.decode('ascii', 'replace')}")
        return b""

    def _zmtp_handshake(self) -> bytes:
        if len(self.inbuf) < 64:
            return b""
        if self.inbuf[:1] != b"\xff" or self.inbuf[9:10] != b"\x7f":
            raise ParseError("ZMTP: bad greeting")
        got = zmtp_frame(self.inbuf, 64, len(self.inbuf))
        if got is None:
            return b""
        flags, start, size = got
        if not flags & 0x04 or self.inbuf[start + 1 : start + 6] != b"READY":
            raise ParseError("ZMTP: expected READY")
        self.inbuf = self.inbuf[start + size :]
        self.state = "streaming"
        # Subscriptions only once the server's READY is in: libzmq reads any frame that
        # arrives before its own handshake is complete as a (bad) handshake command.
        topics = (
            [zmq_topic(None)]
            if self.spec.instruments is None
            else [zmq_topic(i) for i in self.spec.instruments]
        )
        return b"".join(_zmtp_frame(b"\x01" + t) for t in topics)

    @property
    def ready(self) -> bool:
        if self.state != "streaming":
            return False
        parser = self.parser
        if isinstance(parser, DbnParser):
            return parser.metadata and parser.acks >= self.acks_needed
        if isinstance(parser, RedisParser):
            n = 1 if self.spec.instruments is None else len(self.spec.instruments)
            return parser.subscribed >= n
        return True

    def result(self) -> ConnResult:
        s = self.sink
        p = self.parser
        notes = list(s.notes) + list(p.errors)
        heartbeats = 0
        if isinstance(p, DbnParser):
            heartbeats = p.heartbeats
            notes += [f"gateway error: {e}" for e in p.gateway_errors]
        return ConnResult(
            index=self.spec.index,
            records=s.records,
            expected=self.expected,
            gaps=s.gaps,
            unexpected=s.unexpected,
            wire_bytes=self.wire_bytes,
            plain_bytes=self.zstd.plain_bytes if self.zstd else self.wire_bytes,
            first_ns=s.first_ns,
            last_ns=self.done_ns or s.last_ns,
            heartbeats=heartbeats,
            control=p.control,
            closed=self.closed,
            notes=notes[:5],
        )


_PARSERS: dict[str, type[FrameParser]] = {
    "gateway": DbnParser,
    "raw": RawParser,
    "nats": NatsParser,
    "redis": RedisParser,
    "zmq": ZmtpParser,
}


def _resp_command(*parts: str) -> bytes:
    out = [f"*{len(parts)}\r\n".encode()]
    for p in parts:
        b = p.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


def _zmtp_frame(body: bytes, flags: int = 0) -> bytes:
    if len(body) > 255:
        return bytes([flags | 0x02]) + len(body).to_bytes(8, "big") + body
    return bytes([flags, len(body)]) + body


def _zmtp_ready(socket_type: str) -> bytes:
    name = b"Socket-Type"
    value = socket_type.encode()
    body = b"\x05READY" + bytes([len(name)]) + name + len(value).to_bytes(4, "big") + value
    return _zmtp_frame(body, 0x04)


class _Worker:
    def __init__(self, ctrl: Connection, cfg: WorkerConfig, progress: Any) -> None:
        self.ctrl = ctrl
        self.cfg = cfg
        self.progress: npt.NDArray[np.int64] = np.frombuffer(progress, dtype=np.int64)
        self.ep = select.epoll()
        self.ep.register(ctrl.fileno(), EPOLLIN)
        self.conns: dict[int, _Conn] = {}
        self.pending: deque[ConnSpec] = deque()
        self.inflight = 0
        self.max_inflight = 1
        self.connect_deadline = 0.0
        self.expect_deadline = 0.0
        self.waiting: str = ""  # "connect" | "expect" | ""
        self.remaining: set[int] = set()
        self.report = ReadyReport()
        self.buf = bytearray(RECV_SIZE + CARRY_MAX)
        self.view = memoryview(self.buf)
        self.arr = np.frombuffer(self.buf, dtype=np.uint8)
        self.zbuf = bytearray(RECV_SIZE)
        self.zview = memoryview(self.zbuf)
        self.running = True
        #: parse every recv at once (handshakes, the expect phase) instead of in bulk
        self.immediate = False
        #: deferred connections holding unparsed bytes
        self.dirty: set[_Conn] = set()
        self.frame_len = max(1, cfg.frame_len)

    # --- control ----------------------------------------------------------------------

    def on_ctrl(self) -> None:
        while self.ctrl.poll():
            msg = self.ctrl.recv()
            cmd = msg[0]
            if cmd == "connect":
                self.pending.extend(msg[1])
                self.max_inflight = max(1, int(msg[2]))
                self.connect_deadline = time.monotonic() + float(msg[3])
                self.waiting = "connect"
                self.report = ReadyReport()
                # No cyclic GC while the connections are made: collections scanning the
                # growing set of connection objects were ~20 % of building them (a 1,000-
                # session storm); they are frozen (never scanned again) once all are up.
                gc.disable()
                self.start_connects()
            elif cmd == "expect":
                self.immediate = True
                self.flush_all()
                by_index = {c.spec.index: c for c in self.conns.values()}
                for index, count in msg[1].items():
                    c = by_index.get(index)
                    if c is not None:
                        c.expected = int(count)
                self.remaining = {
                    c.fd
                    for c in self.conns.values()
                    if not c.closed and c.sink.records < c.expected
                }
                for c in self.conns.values():
                    if c.expected >= 0 and c.sink.records >= c.expected and not c.done_ns:
                        c.done_ns = c.sink.last_ns
                self.expect_deadline = time.monotonic() + float(msg[2])
                self.waiting = "expect"
            elif cmd == "stats":
                self.flush_all()
                self.ctrl.send(
                    (
                        "stats",
                        {
                            c.spec.index: (c.sink.records, c.parser.control, self._heartbeats(c))
                            for c in self.conns.values()
                        },
                    )
                )
            elif cmd == "close":
                self.running = False

    @staticmethod
    def _heartbeats(c: _Conn) -> int:
        return c.parser.heartbeats if isinstance(c.parser, DbnParser) else 0

    def start_connects(self) -> None:
        while self.pending and self.inflight < self.max_inflight:
            spec = self.pending.popleft()
            c = _Conn(spec, self.cfg)
            c.start_ns = time.perf_counter_ns()
            err = c.sock.connect_ex(("127.0.0.1", spec.port))
            if err not in (0, errno.EINPROGRESS):
                self.report.failed[spec.index] = f"connect: {os.strerror(err)}"
                c.sock.close()
                continue
            self.conns[c.fd] = c
            self.inflight += 1
            self.ep.register(c.fd, EPOLLOUT | EPOLLIN)

    def check_connect_done(self) -> None:
        if self.waiting != "connect":
            return
        if self.pending or self.inflight:
            if time.monotonic() < self.connect_deadline:
                return
            for c in list(self.conns.values()):
                if not c.ready_ns and not c.closed:
                    self.fail(c, f"not streaming after the connect timeout (state {c.state})")
            for spec in self.pending:
                self.report.failed[spec.index] = "never connected (timeout)"
            self.pending.clear()
        self.waiting = ""
        gc.freeze()
        gc.enable()
        self.ctrl.send(("ready", self.report))

    def check_expect_done(self) -> None:
        if self.waiting != "expect":
            return
        if self.remaining and time.monotonic() < self.expect_deadline:
            return
        self.waiting = ""
        self.ctrl.send(("result", self.result()))

    def result(self) -> WorkerResult:
        from hdrh.histogram import HdrHistogram

        hist_all = HdrHistogram(1, 600_000_000, 3)
        hist_probe = HdrHistogram(1, 600_000_000, 3)
        samples = 0
        for c in self.conns.values():
            if not c.sink.latency:
                continue
            lat_us = np.concatenate(c.sink.latency) // 1000
            np.clip(lat_us, 1, 600_000_000, out=lat_us)
            values, counts = np.unique(lat_us, return_counts=True)
            samples += len(lat_us)
            for v, n in zip(values.tolist(), counts.tolist(), strict=True):
                hist_all.record_value(v, n)
                if c.spec.probe:
                    hist_probe.record_value(v, n)

        def enc(h: HdrHistogram) -> str:
            return h.encode().decode() if h.get_total_count() else ""

        return WorkerResult(
            conns=[c.result() for c in self.conns.values()],
            latency_all=enc(hist_all),
            latency_probe=enc(hist_probe),
            samples=samples,
        )

    # --- connections ------------------------------------------------------------------

    def fail(self, c: _Conn, why: str) -> None:
        if c.closed:
            return
        c.closed = why
        self.remaining.discard(c.fd)
        if not c.ready_ns:
            self.report.failed[c.spec.index] = why
            self.inflight -= 1
        try:
            self.ep.unregister(c.fd)
        except (OSError, ValueError):
            pass
        c.sock.close()

    def send(self, c: _Conn, data: bytes) -> None:
        data = c.out + data
        if not data:
            return
        try:
            sent = c.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self.fail(c, f"send: {exc}")
            return
        had = bool(c.out)
        c.out = data[sent:]
        if had != bool(c.out):
            self.ep.modify(c.fd, EPOLLIN | (EPOLLOUT if c.out else 0))

    def on_event(self, c: _Conn, events: int) -> None:
        if c.state == "connecting":
            err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.fail(c, f"connect: {os.strerror(err)}")
                return
            c.state = "connected"
            self.ep.modify(c.fd, EPOLLIN)
            self.send(c, c.greeting())
            if c.spec.system == "raw":
                c.state = "streaming"
                self.mark_ready(c)
            if not events & EPOLLIN:
                return
        if events & EPOLLOUT and c.out:
            self.send(c, b"")
        if events & (EPOLLIN | EPOLLERR):
            self.read(c)

    def mark_ready(self, c: _Conn) -> None:
        if not c.ready_ns and c.ready:
            c.ready_ns = time.perf_counter_ns()
            self.report.ready[c.spec.index] = (c.start_ns, c.ready_ns)
            self.inflight -= 1
            self.start_connects()

    def read(self, c: _Conn) -> None:
        if c.state != "streaming":
            try:
                data = c.sock.recv(65536)
            except BlockingIOError:
                return
            except OSError as exc:
                self.fail(c, f"recv: {exc}")
                return
            if not data:
                self.fail(c, f"closed by the server during the handshake ({c.state})")
                return
            c.wire_bytes += len(data)
            try:
                reply = c.handshake(data)
            except ParseError as exc:
                self.fail(c, str(exc))
                return
            if reply:
                self.send(c, reply)
            if c.state == "streaming" and c.inbuf:
                rest, c.inbuf = c.inbuf, b""
                if c.buf is not None:
                    self.append_deferred(c, rest)
                else:
                    self.stream(c, rest)
            self.mark_ready(c)
            return
        if c.buf is not None:
            self.recv_deferred(c)
        else:
            self.stream(c, None)
        if not c.ready_ns and not c.closed:
            self.mark_ready(c)

    def stream(self, c: _Conn, data: bytes | None) -> None:
        """Parse stream bytes: ``data`` given (handshake leftovers) or read from the socket."""
        carry = c.carry
        k = len(carry)
        zstd = c.zstd
        if data is None:
            target = self.zview if zstd is not None else self.view[k : k + RECV_SIZE]
            if zstd is None and k > CARRY_MAX:
                target = self.zview
            try:
                n = c.sock.recv_into(target)
            except BlockingIOError:
                return
            except OSError as exc:
                self.fail(c, f"recv: {exc}")
                return
            if n == 0:
                self.fail(c, "closed by the server")
                return
            c.wire_bytes += n
            if zstd is not None:
                data = zstd.feed(self.zview[:n])
            elif k > CARRY_MAX:
                data = bytes(self.zview[:n])
        elif zstd is not None:
            data = zstd.feed(data)
        now = time.perf_counter_ns()
        try:
            if data is None:
                # In place: the carry sits right before the bytes just received.
                if k:
                    self.buf[:k] = carry
                end = k + n
                used = c.parser.parse(self.buf, self.arr, 0, end, now)
                c.carry = bytes(self.buf[used:end])
            else:
                whole = carry + data if carry else data
                arr = np.frombuffer(whole, dtype=np.uint8)
                used = c.parser.parse(whole, arr, 0, len(whole), now)
                c.carry = whole[used:]
        except ParseError as exc:
            self.fail(c, str(exc))
            return
        self.after_parse(c, now)

    # --- deferred parsing ---------------------------------------------------------------

    def recv_deferred(self, c: _Conn) -> None:
        """The hot path: one recv_into the connection's own buffer, its time noted; the
        parse waits until the buffer fills up, the worker idles or the run ends."""
        assert c.view is not None and c.buf is not None
        try:
            n = c.sock.recv_into(c.view[c.fill :])
        except BlockingIOError:
            return
        except OSError as exc:
            self.fail(c, f"recv: {exc}")
            return
        if n == 0:
            self.flush(c)
            self.fail(c, "closed by the server")
            return
        c.fill += n
        c.wire_bytes += n
        c.clock.mark(c.fill, time.perf_counter_ns())
        self.progress[c.spec.index] = c.sink.records + c.fill // self.frame_len
        if self.immediate or not c.ready_ns or len(c.buf) - c.fill < DEFER_FREE:
            self.flush(c)
        else:
            self.dirty.add(c)

    def append_deferred(self, c: _Conn, data: bytes) -> None:
        assert c.buf is not None
        if c.fill + len(data) > len(c.buf):
            self.flush(c)
        c.buf[c.fill : c.fill + len(data)] = data
        c.fill += len(data)
        c.clock.mark(c.fill, time.perf_counter_ns())
        self.flush(c)

    def flush(self, c: _Conn) -> None:
        self.dirty.discard(c)
        if not c.fill or c.closed:
            return
        assert c.buf is not None and c.arr is not None
        try:
            used = c.parser.parse(c.buf, c.arr, 0, c.fill, c.clock)
        except ParseError as exc:
            self.fail(c, str(exc))
            return
        tail = c.fill - used
        if tail:
            c.buf[:tail] = c.buf[used : c.fill]
        c.fill = tail
        c.clock.clear()
        self.after_parse(c, c.sink.last_ns)

    def flush_all(self) -> None:
        for c in list(self.dirty):
            self.flush(c)

    def after_parse(self, c: _Conn, now: int) -> None:
        if c.parser.reply:
            reply, c.parser.reply = c.parser.reply, b""
            self.send(c, reply)
        records = c.sink.records
        self.progress[c.spec.index] = records
        if c.expected >= 0 and records >= c.expected and not c.done_ns:
            c.done_ns = now
            self.remaining.discard(c.fd)

    def run(self) -> None:
        poll = self.ep.poll
        conns = self.conns
        ctrl_fd = self.ctrl.fileno()
        while self.running:
            events = poll(0.05 if not self.dirty else 0.002)
            if not events and self.dirty:
                self.flush_all()
            for fd, ev in events:
                if fd == ctrl_fd:
                    self.on_ctrl()
                    continue
                c = conns.get(fd)
                if c is None or c.closed:
                    continue
                if c.buf is not None and c.ready_ns and ev == EPOLLIN:
                    self.recv_deferred(c)
                else:
                    self.on_event(c, ev)
            self.check_connect_done()
            self.check_expect_done()
        for c in self.conns.values():
            if not c.closed:
                c.sock.close()


def worker_main(ctrl: Connection, cfg: WorkerConfig, progress: Any) -> None:
    """Entry point of a subscriber worker process."""
    from bench.procs import raise_nofile

    raise_nofile()
    worker = _Worker(ctrl, cfg, progress)
    try:
        worker.run()
    except KeyboardInterrupt:
        pass
    finally:
        ctrl.close()
