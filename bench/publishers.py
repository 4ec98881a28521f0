"""Publisher processes: one per run, writing the record stream in each system's framing.

* gateway: a DBN publisher on the gateway's ``ingest://`` port (Metadata, then records);
* nats / redis: pipelined ``PUB`` / ``PUBLISH`` commands (Redis with ``CLIENT REPLY OFF``);
* zmq: the publisher *is* the server: an XPUB socket (``XPUB_NODROP``, so a full
  subscriber pipe blocks the sender instead of dropping) sending one message per record;
* raw: the raw limit: a plain sender writing the same ring of record bytes to N accepted
  sockets with non-blocking sends and epoll.

Throughput runs write ``BATCH`` records per write as fast as the system takes them, for a
fixed time; every publisher except raw also paces itself on the subscribers' shared
progress counters so the records in flight stay under a memory budget (peers that do not
push back would otherwise buffer without bound). Latency runs write every millisecond the
records due at a fixed rate, stamped with ``time.perf_counter_ns()`` just before the write.

The harness drives a publisher over a pipe::

    publisher -> ("listening", port)          zmq and raw only, right after binding
    publisher -> ("ready",)                   connected, handshake done
    harness   -> ("go",)
    publisher -> ("done", PublishReport)
    harness   -> ("exit",)
"""

from __future__ import annotations

import select
import socket
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Final, cast

import numpy as np
import numpy.typing as npt

from bench.records import BATCH, FIRST_ID, REC_LEN, TILE, Schedule, layout_for, metadata_bytes

__all__ = ["PublishJob", "PublishReport", "publisher_main"]

#: records prepared per step (sequence numbers written in one vectorised assignment)
BLOCK: Final = 8 * BATCH
STALL_S: Final = 30.0
RAW_MAX_SEND: Final = 1 << 20
#: laps of the schedule in the raw sender's ring (how far its fastest socket may lead)
RAW_LAPS: Final = 1


@dataclass(frozen=True)
class PublishJob:
    system: str
    port: int = 0
    per_instrument: bool = False
    with_mappings: bool = False
    duration_s: float = 1.0
    max_records: int = 1 << 31
    #: records per second (latency runs); 0 = as fast as the system takes them
    rate: float = 0.0
    #: stamps go into records only after this many seconds (warm-up)
    warmup_s: float = 0.0
    #: raw: connections to accept; zmq: subscription messages to wait for
    expect_peers: int = 0
    #: pace on the subscribers' progress so that at most this many records are in flight
    #: per subscriber (0: no pacing)
    window: int = 0
    #: filtered: the instrument ids each subscriber wants (pacing needs per-subscriber counts)
    subscriptions: tuple[tuple[int, ...], ...] | None = None


@dataclass
class PublishReport:
    records: int = 0
    start_ns: int = 0
    end_ns: int = 0
    paced_s: float = 0.0
    error: str = ""
    writes: int = 0
    notes: list[str] = field(default_factory=list)


class Stalled(Exception):
    pass


class _Pacer:
    """Blocks until the slowest subscriber is within ``window`` records of the writer."""

    def __init__(self, job: PublishJob, progress: Any, schedule: Schedule) -> None:
        self.window = job.window
        self.progress: npt.NDArray[np.int64] = np.frombuffer(progress, dtype=np.int64)
        self.schedule = schedule
        self.subs: npt.NDArray[np.int64] | None = None
        if job.subscriptions is not None:
            width = max(len(s) for s in job.subscriptions)
            subs = np.full((len(job.subscriptions), width), -1, dtype=np.int64)
            for i, s in enumerate(job.subscriptions):
                subs[i, : len(s)] = np.asarray(s) - FIRST_ID
            self.subs = subs
        self.waited_s = 0.0

    def expected_at(self, records: int) -> npt.NDArray[np.int64] | int:
        if self.subs is None:
            return records
        counts = np.r_[self.schedule.published_per_instrument(records), 0]
        return np.asarray(counts[self.subs].sum(axis=1), dtype=np.int64)

    def wait(self, upto: int) -> None:
        if not self.window:
            return
        target = upto - self.window
        if target <= 0:
            return
        need = self.expected_at(target)
        if bool((self.progress >= need).all()):
            return
        started = time.perf_counter()
        while not bool((self.progress >= need).all()):
            time.sleep(0.0002)
            if time.perf_counter() - started > STALL_S:
                raise Stalled(f"subscribers made no progress for {STALL_S:g} s")
        self.waited_s += time.perf_counter() - started


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _read_line(sock: socket.socket, sep: bytes = b"\r\n") -> bytes:
    data = b""
    while sep not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed during the handshake")
        data += chunk
    return data


class _Publisher:
    def __init__(self, ctrl: Connection, job: PublishJob, progress: Any) -> None:
        self.ctrl = ctrl
        self.job = job
        self.schedule = Schedule()
        self.pacer = _Pacer(job, progress, self.schedule)
        self.layout = layout_for(job.system, job.per_instrument)
        frames = self.layout.build(self.schedule)
        #: records in the ring of frames (the raw sender keeps several laps in flight)
        self.ring = TILE * (RAW_LAPS if job.system == "raw" else 1)
        self.frames = np.tile(frames, self.ring // TILE)
        self.recs = self.frames["rec"]
        self.frame_len = self.layout.frame_len
        self.mv = memoryview(cast(Any, self.frames.view(np.uint8).reshape(-1)))
        self.report = PublishReport()
        self.sock: socket.socket | None = None

    # --- setup per system ---------------------------------------------------------------

    def setup(self) -> None:
        job = self.job
        if job.system == "gateway":
            self.sock = _connect(job.port)
            self.sock.sendall(metadata_bytes(time.time_ns(), job.with_mappings))
        elif job.system == "nats":
            self.sock = _connect(job.port)
            _read_line(self.sock)
            self.sock.sendall(
                b'CONNECT {"verbose":false,"pedantic":false,"name":"pub"}\r\nPING\r\n'
            )
            if b"PONG" not in _read_line(self.sock):
                raise ConnectionError("NATS: no PONG")
        elif job.system == "redis":
            self.sock = _connect(job.port)
            self.sock.sendall(b"*3\r\n$6\r\nCLIENT\r\n$5\r\nREPLY\r\n$3\r\nOFF\r\n")
        self.ctrl.send(("ready",))

    # --- the stream -------------------------------------------------------------------

    def prepare(self, start: int, count: int) -> None:
        """Write the sequence numbers of records [start, start + count)."""
        pos = start % self.ring
        self.recs["sequence"][pos : pos + count] = self.schedule.sequences(
            start, count, self.job.per_instrument
        )

    def stamp(self, start: int, count: int, stamp: int) -> None:
        pos = start % self.ring
        self.recs["ts_recv"][pos : pos + count] = stamp

    def write(self, start: int, count: int) -> None:
        pos = start % self.ring
        f = self.frame_len
        assert self.sock is not None
        self.sock.sendall(self.mv[pos * f : (pos + count) * f])
        self.report.writes += 1

    def run_throughput(self, send: Any) -> None:
        job = self.job
        end_at = time.perf_counter() + job.duration_s
        g = 0
        while g < job.max_records:
            count = min(BLOCK, TILE - g % TILE, job.max_records - g)
            self.pacer.wait(g + count)
            self.prepare(g, count)
            for b in range(0, count, BATCH):
                send(g + b, min(BATCH, count - b))
            g += count
            self.report.records = g
            if time.perf_counter() >= end_at:
                break

    def run_rate(self, send: Any) -> None:
        job = self.job
        total = min(job.max_records, int(job.rate * job.duration_s))
        tick = 0.001
        t0 = time.perf_counter()
        warm_until_ns = time.perf_counter_ns() + int(job.warmup_s * 1e9)
        g = 0
        k = 0
        while g < total:
            k += 1
            next_at = t0 + k * tick
            delay = next_at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            due = min(total, int((time.perf_counter() - t0) * job.rate))
            while g < due:
                count = min(due - g, TILE - g % TILE)
                self.pacer.wait(g + count)
                self.prepare(g, count)
                # The stamp is the last thing before the write.
                stamp = time.perf_counter_ns()
                self.stamp(g, count, stamp if stamp >= warm_until_ns else 0)
                send(g, count)
                g += count
            self.report.records = g

    def zmq_run(self) -> None:
        import zmq

        job = self.job
        ctx = zmq.Context(io_threads=1)
        sock = ctx.socket(zmq.XPUB)
        sock.setsockopt(zmq.XPUB_VERBOSE, 1)
        sock.setsockopt(zmq.XPUB_NODROP, 1)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind("tcp://127.0.0.1:*")
        endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.ctrl.send(("listening", int(endpoint.rsplit(":", 1)[1])))
        self.ctrl.send(("ready",))
        self.wait_go()
        seen = 0
        deadline = time.monotonic() + 30
        while seen < job.expect_peers and time.monotonic() < deadline:
            if sock.poll(100, zmq.POLLIN):
                msg = sock.recv()
                if msg[:1] == b"\x01":
                    seen += 1
        if seen < job.expect_peers:
            self.report.notes.append(f"only {seen} of {job.expect_peers} subscriptions arrived")
        mv = self.mv
        f = self.frame_len

        def send(start: int, count: int) -> None:
            pos = start % self.ring
            for i in range(pos * f, (pos + count) * f, f):
                sock.send(mv[i : i + f], copy=True)
            self.report.writes += 1

        self.stream(send)
        self.finish()
        self.wait_exit()
        sock.close(0)
        ctx.term()

    def raw_run(self) -> None:
        job = self.job
        lsock = socket.socket()
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(4096)
        self.ctrl.send(("listening", lsock.getsockname()[1]))
        self.ctrl.send(("ready",))
        self.wait_go()
        lsock.settimeout(30)
        socks: dict[int, socket.socket] = {}
        try:
            while len(socks) < job.expect_peers:
                s, _ = lsock.accept()
                s.setblocking(False)
                socks[s.fileno()] = s
        except TimeoutError:
            self.report.error = f"only {len(socks)} of {job.expect_peers} subscribers connected"
        self.report.start_ns = time.perf_counter_ns()
        self._raw_send(socks)
        self.report.end_ns = time.perf_counter_ns()
        self.finish()
        self.wait_exit()
        for s in socks.values():
            s.close()
        lsock.close()

    def _raw_send(self, socks: dict[int, socket.socket]) -> None:
        """Every socket gets the whole stream from one ring of RAW_LAPS x TILE records; a
        block of the ring is rewritten for its next lap once every socket has sent past it."""
        job = self.job
        ep = select.epoll()
        pos = {fd: 0 for fd in socks}  # bytes sent per socket
        parked: set[int] = set()
        for fd in socks:
            ep.register(fd, select.EPOLLOUT)
        ring_records = self.ring
        ring = ring_records * REC_LEN
        gen = 0
        while gen < min(ring_records, job.max_records):
            count = min(BLOCK, job.max_records - gen, TILE - gen % TILE)
            self.prepare(gen, count)
            gen += count
        end_at = time.perf_counter() + job.duration_s
        stop = job.max_records
        mv = self.mv
        while socks:
            limit = gen * REC_LEN
            for fd, _ in ep.poll(0.01):
                p = pos[fd]
                if p >= limit:
                    if fd not in parked:
                        ep.modify(fd, 0)
                        parked.add(fd)
                    continue
                off = p % ring
                n = min(limit - p, ring - off, RAW_MAX_SEND)
                try:
                    pos[fd] = p + socks[fd].send(mv[off : off + n])
                except BlockingIOError:
                    pass
                except OSError as exc:
                    self.report.notes.append(f"raw: a subscriber socket failed: {exc}")
                    ep.unregister(fd)
                    socks.pop(fd).close()
                    del pos[fd]
                    parked.discard(fd)
            if not pos:
                break
            if stop > gen and time.perf_counter() >= end_at:
                stop = gen
            slowest = min(pos.values()) // REC_LEN
            grew = False
            while gen < stop and slowest >= gen - ring_records + BLOCK:
                count = min(BLOCK, stop - gen, TILE - gen % TILE)
                self.prepare(gen, count)
                gen += count
                grew = True
            if grew:
                for fd in parked:
                    ep.modify(fd, select.EPOLLOUT)
                parked.clear()
            if gen >= stop and slowest >= gen:
                break
        self.report.records = gen
        ep.close()

    # --- common -----------------------------------------------------------------------

    def stream(self, send: Any) -> None:
        self.report.start_ns = time.perf_counter_ns()
        try:
            if self.job.rate:
                self.run_rate(send)
            else:
                self.run_throughput(send)
        except Stalled as exc:
            self.report.error = str(exc)
        except OSError as exc:
            self.report.error = f"write failed: {exc}"
        self.report.end_ns = time.perf_counter_ns()
        self.report.paced_s = self.pacer.waited_s

    def wait_go(self) -> None:
        while True:
            msg = self.ctrl.recv()
            if msg[0] == "go":
                return
            if msg[0] == "exit":
                raise SystemExit(0)

    def wait_exit(self) -> None:
        while self.ctrl.recv()[0] != "exit":
            pass

    def finish(self) -> None:
        self.ctrl.send(("done", self.report))

    def run(self) -> None:
        if self.job.system == "zmq":
            self.zmq_run()
            return
        if self.job.system == "raw":
            self.raw_run()
            return
        self.setup()
        self.wait_go()
        self.stream(self.write)
        self.finish()
        self.wait_exit()
        if self.sock is not None:
            self.sock.close()


def publisher_main(ctrl: Connection, job: PublishJob, progress: Any) -> None:
    """Entry point of a publisher process."""
    from bench.procs import raise_nofile

    raise_nofile()
    try:
        _Publisher(ctrl, job, progress).run()
    except (SystemExit, KeyboardInterrupt):
        pass
    except Exception as exc:  # report, don't hang the harness
        try:
            ctrl.send(("done", PublishReport(error=f"{type(exc).__name__}: {exc}")))
        except OSError:
            pass
    finally:
        ctrl.close()
