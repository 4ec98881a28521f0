"""The ``books`` scenario: live fan-out of the synthetic MBO feed to N sessions with the
gateway's order books off (``[books] enabled = false``) and on (``true``), in one run.

The records are the synthetic feed's MBO mode (gateway/feeds/synthetic_mbo.py: 50
instruments, seed 17, generated once per run, ``records`` of them), carried to the gateway
by a publisher on its ``ingest://…?backpressure=1`` port: lossless (the gateway stops
reading the publisher while a session is over its high-water mark), so the fan-out runs
as fast as the gateway can serve it and every session must get every record. (The
embedded ``synthetic:`` feed is paced at its ``rate`` and never waits for its sessions: at
saturation it would measure the slow-reader policy, not the fan-out.) With books on the
gateway applies every chunk to its books (one native call per chunk, after the fan-out);
nobody subscribes to a derived schema, so this is the cost of keeping the books that
``snapshot=1`` needs.

Parts (one case each, in this order, interleaved ``repeats`` times so that a drift of the
shared machine touches every part alike):

* ``books-off`` / ``books-on``: N sessions subscribed to ``mbo`` (every instrument), the
  publisher writes every record as fast as the gateway takes them. Throughput = records
  delivered (all sessions) ÷ (last record at the last session − first at any), as in
  ``fanout``; the gateway's CPU seconds per million records delivered; loss (each session
  checks the count and that ``sequence`` runs without a break); the gateway's
  ``gateway_books_*`` metrics after the case (proof that the books were built, or not).
* ``synthetic-off`` / ``synthetic-on``: the embedded feed itself
  (``synthetic:?schemas=mbo&rate=100000&instruments=50&seed=17``, as ``make run`` serves
  it, at a rate the machine sustains) fanned out to the same N sessions for ``window_s``:
  the gateway's CPU per record delivered (its generator included, the same in both) and
  that every session's ``sequence`` runs unbroken.

Target (issue 17): books on within 20 % of books off: median throughput on ÷ off ≥ 0.80
at N = 100. ``--quick`` (only with ``--scenarios books``) runs N = 3, one repeat, few
records: a correctness run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import select
import socket
import statistics
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Final

import numpy as np

from bench.peers import GatewayServer, startup_fields
from bench.procs import MachineCpu, raise_nofile
from bench.records import API_KEY, DATASET
from gateway import control

if TYPE_CHECKING:
    from bench.scenarios import Harness, Plan

__all__ = [
    "BOOKS_PARTS",
    "THROUGHPUT_TARGET",
    "BooksBench",
    "BooksPlan",
    "append_books_section",
    "books_cases",
    "books_plan",
    "books_rows",
    "books_summary",
    "books_targets",
    "write_books_outputs",
]

#: the parts, in the order each repeat runs them: (part, books enabled)
BOOKS_PARTS: Final = (
    ("books-off", False),
    ("books-on", True),
    ("synthetic-off", False),
    ("synthetic-on", True),
)
#: the parts the target reads (lossless, at the gateway's pace)
TARGET_PARTS: Final = ("books-off", "books-on")
THROUGHPUT_TARGET: Final = 0.80
#: the target holds at this many sessions (a --quick run's N=3 is a correctness run)
TARGET_N: Final = 100
MBO_LEN: Final = 56
RTYPE_MBO: Final = 0xA0
RTYPE_ERROR: Final = 0x15
RTYPE_SYMBOL_MAPPING: Final = 0x16
RTYPE_SYSTEM: Final = 0x17
SYSTEM_ACK: Final = 1
SYSTEM_SLOW: Final = 2
#: the sequence field's offset in an MBO record
OFF_SEQUENCE: Final = 52
RECV_BUFFER: Final = 1 << 20
SEND_SLICE: Final = 1 << 20
STREAM_SEED: Final = 17
STREAM_INSTRUMENTS: Final = 50
#: records generated per call (the feed's 10 ms tick at a million records/s)
STREAM_STEP: Final = 10_000


@dataclass(frozen=True)
class BooksPlan:
    n: int
    repeats: int
    #: MBO records the publisher writes per case
    records: int
    #: the embedded feed's rate (records/s) and how long its parts are measured
    synthetic_rate: int = 100_000
    window_s: float = 4.0
    instruments: int = STREAM_INSTRUMENTS
    seed: int = STREAM_SEED


def books_plan(plan: Plan, repeats: int | None = None) -> BooksPlan:
    if plan.quick:
        return BooksPlan(
            n=3, repeats=repeats or 1, records=30_000, synthetic_rate=20_000, window_s=1.0
        )
    return BooksPlan(n=100, repeats=repeats or 5, records=1_200_000)


# --- the stream ---------------------------------------------------------------------------


def write_stream(path: Path, records: int, instruments: int, seed: int) -> int:
    """The synthetic feed's MBO records (about ``records``, whole events) into ``path``;
    their count. Same arguments, same records."""
    from gateway.feeds.synthetic import SyntheticGenerator, SyntheticOptions

    gen = SyntheticGenerator(SyntheticOptions(instruments=instruments, seed=seed, schemas=("mbo",)))
    start = 1_764_547_200_000_000_000  # 2025-12-01 UTC: fixed, so the bytes are too
    made = 0
    step = 0
    with open(path, "wb") as f:
        while made < records:
            for chunk in gen.make(STREAM_STEP, start + step * 10_000_000, 10_000_000):
                f.write(chunk)
                made += len(chunk) // MBO_LEN
            step += 1
    return made


def stream_symbols(instruments: int) -> dict[str, int]:
    from gateway.feeds.synthetic import instrument_table

    return dict(instrument_table(instruments))


# --- the publisher ------------------------------------------------------------------------


def publisher_main(ctrl: Connection, port: int, path: str, instruments: int) -> None:
    """Connects to the gateway's ingest port, sends the Metadata, reports ``("ready",)``;
    on ``("go",)`` writes the stream (blocking writes: the gateway's pace), reports
    ``("done", records, start_ns, end_ns, error)``; exits on ``("exit",)``."""
    from gateway.dbn import encode_publisher_metadata

    data = Path(path).read_bytes()
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.settimeout(None)
    sock.sendall(encode_publisher_metadata(DATASET, time.time_ns(), stream_symbols(instruments)))
    ctrl.send(("ready",))
    error = ""
    start = end = 0
    try:
        if ctrl.recv()[0] == "go":
            view = memoryview(data)
            start = time.monotonic_ns()
            for at in range(0, len(view), SEND_SLICE):
                sock.sendall(view[at : at + SEND_SLICE])
            end = time.monotonic_ns()
    except OSError as exc:
        error = f"{type(exc).__name__}: {exc}"
    ctrl.send(("done", len(data) // MBO_LEN, start, end, error))
    try:
        while ctrl.recv()[0] != "exit":
            pass
    except EOFError:
        pass
    sock.close()


# --- the receivers ------------------------------------------------------------------------


@dataclass
class Session:
    """One ``mbo`` session's counters (what a receiver reports for it)."""

    index: int
    records: int = 0
    gaps: int = 0
    first_ns: int = 0
    last_ns: int = 0
    acks: int = 0
    slow_warnings: int = 0
    closed: str = ""
    notes: list[str] = field(default_factory=list)


class _Conn:
    def __init__(self, index: int, sock: socket.socket) -> None:
        self.s = Session(index)
        self.sock = sock
        self.buf = bytearray(RECV_BUFFER)
        self.view = memoryview(self.buf)
        self.fill = 0
        self.metadata = False
        self.next_seq = -1

    def note(self, text: str) -> None:
        if len(self.s.notes) < 5:
            self.s.notes.append(text)

    def parse(self, now: int) -> None:
        """Every whole record in the buffer; the rest moves to its start."""
        buf, end, pos = self.buf, self.fill, 0
        s = self.s
        if not self.metadata:
            if end < 8:
                return
            if bytes(buf[:3]) != b"DBN":
                raise ValueError("stream does not start with DBN Metadata")
            need = 8 + int.from_bytes(buf[4:8], "little")
            if end < need:
                return
            self.metadata = True
            pos = need
        while end - pos >= 2:
            size = buf[pos] * 4
            if size < 16:
                raise ValueError(f"record length {size} < 16")
            if end - pos < size:
                break
            if buf[pos + 1] == RTYPE_MBO and size == MBO_LEN:
                n = (end - pos) // MBO_LEN
                rows = np.frombuffer(buf, np.uint8, count=n * MBO_LEN, offset=pos)
                rows = rows.reshape(n, MBO_LEN)
                good = (rows[:, 0] == MBO_LEN // 4) & (rows[:, 1] == RTYPE_MBO)
                if not good.all():
                    n = int(np.argmin(good))
                seq = np.ndarray(
                    (n,), dtype="<u4", buffer=buf, offset=pos + OFF_SEQUENCE, strides=(MBO_LEN,)
                ).astype(np.int64)
                breaks = int(np.count_nonzero(np.diff(seq) != 1))
                if self.next_seq >= 0 and seq[0] != self.next_seq:
                    breaks += 1
                if breaks:
                    s.gaps += breaks
                    self.note(f"sequence break near {int(seq[0])}")
                self.next_seq = (int(seq[-1]) + 1) & 0xFFFFFFFF
                if not s.first_ns:
                    s.first_ns = now
                s.last_ns = now
                s.records += n
                pos += n * MBO_LEN
                continue
            rtype = buf[pos + 1]
            if rtype == RTYPE_SYSTEM:
                code = buf[pos + size - 1]
                s.acks += code == SYSTEM_ACK
                s.slow_warnings += code == SYSTEM_SLOW
            elif rtype == RTYPE_ERROR:
                text = bytes(buf[pos + 16 : pos + size - 2]).split(b"\0", 1)[0]
                self.note("gateway error: " + text.decode("ascii", "replace"))
            elif rtype != RTYPE_SYMBOL_MAPPING:
                self.note(f"unexpected rtype 0x{rtype:02x}")
            pos += size
        if pos:
            self.buf[: end - pos] = self.buf[pos:end]
            self.fill = end - pos


def _line(sock: socket.socket, pending: bytearray) -> str:
    while b"\n" not in pending:
        data = sock.recv(4096)
        if not data:
            raise ConnectionError("gateway closed the connection during the handshake")
        pending += data
    line, _, rest = bytes(pending).partition(b"\n")
    pending[:] = rest
    return line.decode("ascii", "replace")


def _open_session(port: int, index: int) -> _Conn:
    """Connect, authenticate, subscribe to ``mbo`` for every instrument, start; the
    connection once the Metadata and the subscription's ack are in."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    pending = bytearray()
    _line(sock, pending)  # lsg_version=...
    cram = _line(sock, pending)
    if not cram.startswith("cram="):
        raise ConnectionError(f"expected cram=, got {cram[:60]!r}")
    sock.sendall(
        control.encode_auth(
            control.cram_response(cram[5:], API_KEY),
            DATASET,
            compression="none",
            slow_reader_behavior="warn",
            client="bench",
        )
    )
    reply = _line(sock, pending)
    if not reply.startswith("success=1"):
        raise ConnectionError(f"gateway refused the session: {reply[:200]}")
    sock.sendall(
        control.encode_subscription("mbo", control.ALL_SYMBOLS, stype_in="instrument_id", sub_id=1)
        + control.START_SESSION
    )
    conn = _Conn(index, sock)
    conn.buf[: len(pending)] = pending
    conn.fill = len(pending)
    conn.parse(time.monotonic_ns())
    while not (conn.metadata and conn.s.acks):
        got = sock.recv_into(conn.view[conn.fill :])
        if not got:
            raise ConnectionError("gateway closed the connection before the stream")
        conn.fill += got
        conn.parse(time.monotonic_ns())
    sock.setblocking(False)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    return conn


def receiver_main(ctrl: Connection, port: int, indices: list[int]) -> None:
    """Opens the sessions ``indices`` (reports ``("ready", {index: error or ""})``), then
    reads them all; on ``("expect", records, timeout_s)`` reports ``("result",
    [Session, ...])`` once every session has that many records (or at the timeout); on
    ``("stats",)`` reports ``("stats", [Session, ...])`` at once; exits on ``("close",)``."""
    raise_nofile()
    conns: dict[int, _Conn] = {}
    status: dict[int, str] = {}
    for i in indices:
        try:
            conn = _open_session(port, i)
        except (OSError, ValueError) as exc:
            status[i] = f"{type(exc).__name__}: {exc}"
            continue
        conns[conn.sock.fileno()] = conn
        status[i] = ""
    ctrl.send(("ready", status))
    ep = select.epoll()
    ep.register(ctrl.fileno(), select.EPOLLIN)
    for fd in conns:
        ep.register(fd, select.EPOLLIN)
    want = -1
    deadline = 0.0
    try:
        while True:
            for fd, _ in ep.poll(0.05):
                if fd == ctrl.fileno():
                    msg = ctrl.recv()
                    if msg[0] == "close":
                        return
                    if msg[0] == "expect":
                        want, deadline = int(msg[1]), time.monotonic() + float(msg[2])
                    elif msg[0] == "stats":
                        ctrl.send(("stats", [dataclasses.replace(c.s) for c in conns.values()]))
                    continue
                conn = conns[fd]
                try:
                    got = conn.sock.recv_into(conn.view[conn.fill :])
                except BlockingIOError:
                    continue
                except OSError as exc:
                    got, conn.s.closed = 0, f"{type(exc).__name__}: {exc}"
                if not got:
                    conn.s.closed = conn.s.closed or "gateway closed the session"
                    ep.unregister(fd)
                    continue
                conn.fill += got
                try:
                    conn.parse(time.monotonic_ns())
                except ValueError as exc:
                    conn.s.closed = f"bad stream: {exc}"
                    ep.unregister(fd)
            if want >= 0:
                pending = [c for c in conns.values() if c.s.records < want and not c.s.closed]
                if not pending or time.monotonic() > deadline:
                    ctrl.send(("result", [c.s for c in conns.values()]))
                    want = -1
    finally:
        for conn in conns.values():
            conn.sock.close()
        ep.close()


# --- one case -----------------------------------------------------------------------------


class BooksBench:
    def __init__(self, harness: Harness, plan: BooksPlan) -> None:
        self.h = harness
        self.plan = plan
        self.stream: Path | None = None
        self.stream_records = 0
        self.stream_s = 0.0

    def _stream(self) -> Path:
        if self.stream is None:
            plan = self.plan
            path = self.h.workdir / f"books-mbo-{plan.records}-{plan.seed}.bin"
            t0 = time.process_time()
            self.stream_records = write_stream(path, plan.records, plan.instruments, plan.seed)
            self.stream_s = time.process_time() - t0
            self.stream = path
            self.h.cleanups.append(lambda: path.unlink(missing_ok=True))
        return self.stream

    def off(self) -> dict[str, Any]:
        return self.case(False)

    def on(self) -> dict[str, Any]:
        return self.case(True)

    def synthetic_off(self) -> dict[str, Any]:
        return self.synthetic(False)

    def synthetic_on(self) -> dict[str, Any]:
        return self.synthetic(True)

    def _receivers(self, port: int, children: list[Any]) -> dict[int, str]:
        """Two receiver processes with the plan's N sessions between them (appended to
        ``children`` as they start); the sessions that failed, with why."""
        from bench.scenarios import CTX, _Child

        n = self.plan.n
        for share in (list(range(n))[0::2], list(range(n))[1::2]):
            if not share:
                continue
            parent, child = CTX.Pipe()
            proc = CTX.Process(target=receiver_main, args=(child, port, share), daemon=True)
            proc.start()
            child.close()
            children.append(_Child(proc, parent))
        failed: dict[int, str] = {}
        for c in children:
            failed.update({i: e for i, e in c.recv(120, "sessions")[1].items() if e})
        if len(failed) == n:
            raise RuntimeError(f"no session got streaming: {next(iter(failed.values()))}")
        return failed

    def synthetic(self, books: bool) -> dict[str, Any]:
        """The embedded feed (``synthetic:?schemas=mbo&rate=…``) fanned out to N sessions
        for ``window_s``: the gateway's CPU for it (the generator's included), books off
        or on; every session must see an unbroken ``sequence``."""
        plan = self.plan
        uri = (
            f"synthetic:?schemas=mbo&rate={plan.synthetic_rate}&instruments={plan.instruments}"
            f"&seed={plan.seed}"
        )
        workdir = self.h.workdir / f"books-synthetic-{'on' if books else 'off'}"
        server = SyntheticServer(workdir, uri, books).start()
        children: list[Any] = []
        try:
            failed = self._receivers(server.port, children)
            before = _stats(children)
            feed0 = scrape_books(server.metrics_port)
            cpu0, mach0, t0 = server.cpu_seconds(), MachineCpu.read(), time.monotonic()
            load0 = os.getloadavg()[0]
            time.sleep(plan.window_s)
            after = _stats(children)
            cpu1, mach1, t1 = server.cpu_seconds(), MachineCpu.read(), time.monotonic()
            metrics = scrape_books(server.metrics_port)
            alive = server.alive()
        finally:
            for c in children:
                c.send(("close",))
            for c in children:
                c.stop()
            server.stop()
        window = t1 - t0
        delivered = sum(s.records - before[i].records for i, s in after.items() if i in before)
        fed = _feed_records(metrics) - _feed_records(feed0)
        gaps = sum(s.gaps for s in after.values())
        closed = {i: s.closed for i, s in after.items() if s.closed}
        notes = [note for s in after.values() for note in s.notes][:5]
        if not alive:
            notes.append("the gateway exited during the case")
        failed_all = {**failed, **closed}
        cpu = cpu1 - cpu0
        return {
            "status": "ok",
            "part": "synthetic-on" if books else "synthetic-off",
            "books": books,
            "feed": uri,
            "window_s": round(window, 3),
            "records": fed,
            "expected": fed * len(after),
            "delivered": delivered,
            "lost": 0,
            "extra": 0,
            "gaps": gaps,
            "unexpected": 0,
            "failed_sessions": len(failed_all),
            "loss_free": not (gaps or failed_all or notes),
            "throughput_rps": round(delivered / window) if window else 0,
            "feed_rps": round(fed / window) if window else 0,
            "server_cpu_s": round(cpu, 3),
            "server_cpu_fraction": round(cpu / window, 3) if window else None,
            "server_cpu_s_per_m": round(cpu / delivered * 1e6, 4) if delivered else None,
            "machine_busy": round(mach1.since(mach0), 3),
            "load_avg_1m": [round(load0, 2), round(os.getloadavg()[0], 2)],
            "slow_warnings": sum(s.slow_warnings for s in after.values()),
            "books_metrics": metrics,
            "notes": notes + [f"session {i}: {why}" for i, why in list(failed_all.items())[:3]],
        }

    def case(self, books: bool) -> dict[str, Any]:
        from bench.scenarios import CTX, _Child

        plan = self.plan
        path = self._stream()
        workdir = self.h.workdir / f"books-{'on' if books else 'off'}"
        workdir.mkdir(parents=True, exist_ok=True)
        server = GatewayServer(workdir, extra_config={"books": {"enabled": books}}).start()
        children: list[_Child] = []
        pub: _Child | None = None
        try:
            parent, child = CTX.Pipe()
            proc = CTX.Process(
                target=publisher_main,
                args=(child, server.ingest_port, str(path), plan.instruments),
                daemon=True,
            )
            proc.start()
            child.close()
            pub = _Child(proc, parent)
            pub.recv(60, "the publisher")
            server.wait_feed_up()
            failed = self._receivers(server.port, children)
            cpu0, mach0 = server.cpu_seconds(), MachineCpu.read()
            load0 = os.getloadavg()[0]
            pub.send(("go",))
            _, records, start_ns, end_ns, error = pub.recv(600, "the publisher to finish")
            for c in children:
                c.send(("expect", records, 60 + plan.n * 0.2))
            sessions: list[Session] = []
            for c in children:
                sessions += c.recv(180, "session results")[1]
            cpu1, mach1 = server.cpu_seconds(), MachineCpu.read()
            metrics = scrape_books(server.metrics_port)
            alive = server.alive()
        finally:
            for c in children:
                c.send(("close",))
            if pub is not None:
                pub.send(("exit",))
            for c in [*children, *([pub] if pub is not None else [])]:
                c.stop()
            server.stop()
        return summarize(
            books=books,
            n=plan.n,
            records=records,
            sessions=sessions,
            failed=failed,
            cpu_s=cpu1 - cpu0,
            machine_busy=mach1.since(mach0),
            publish_s=(end_ns - start_ns) / 1e9,
            publisher_error=error,
            metrics=metrics,
            server_alive=alive,
            load=(load0, os.getloadavg()[0]),
            stream=(self.stream_records, self.stream_s, plan.instruments, plan.seed),
        )


class SyntheticServer(GatewayServer):
    """``gateway serve`` whose one feed (named as the bench's dataset) is the embedded
    ``synthetic:?schemas=mbo&…`` feed, with ``[books] enabled`` as asked."""

    def __init__(self, workdir: Path, uri: str, books: bool) -> None:
        super().__init__(workdir)
        self.uri = uri
        self.books = books

    def start(self) -> SyntheticServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = self.workdir / "gateway.toml"
        cfg.write_text(
            'host = "127.0.0.1"\nport = 0\nmetrics_port = 0\nloop = "uvloop"\n'
            'log_level = "warning"\n'
            f'[[api_keys]]\nkey = "{API_KEY}"\nmax_sessions = {self.max_sessions}\n'
            f"[limits]\nmax_connections = {self.max_sessions + 1000}\n"
            f"[books]\nenabled = {'true' if self.books else 'false'}\n"
            f'[feeds]\n"{DATASET}" = "{self.uri}"\n'
        )
        log = self.workdir / "gateway.stderr.log"
        self.logs.append(log)
        with open(log, "ab") as err:
            self.proc = subprocess.Popen(
                self.command(cfg),
                cwd=self.tree,
                stdout=subprocess.PIPE,
                stderr=err,
                preexec_fn=raise_nofile,
            )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 20
        try:
            while time.monotonic() < deadline and not self.port:
                line = self.proc.stdout.readline().decode()
                if not line:
                    tail = log.read_text(errors="replace").strip().splitlines()[-1:]
                    raise RuntimeError(
                        f"gateway exited while starting (see {log})"
                        + (f": {tail[0][:300]}" if tail else "")
                    )
                if line.startswith("listening "):
                    fields = startup_fields(line)
                    self.port = int(fields["port"])
                    self.metrics_port = int(fields.get("metrics_port", 0))
            if not self.port:
                raise RuntimeError("gateway did not report its port")
        except BaseException:
            self.stop()
            raise
        return self


def _stats(children: list[Any]) -> dict[int, Session]:
    """Every session's counters now, by index."""
    for c in children:
        c.send(("stats",))
    return {s.index: s for c in children for s in c.recv(60, "session stats")[1]}


def _feed_records(metrics: dict[str, float]) -> int:
    return int(sum(v for k, v in metrics.items() if k.startswith("gateway_feed_records_in")))


def scrape_books(port: int) -> dict[str, float]:
    """The gateway's ``gateway_books_*`` samples (books held, orders, records applied…)
    and the feed's records in."""
    if not port:
        return {}
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(("gateway_books", "gateway_feed_records_in_total")):
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                continue
    return out


def summarize(
    *,
    books: bool,
    n: int,
    records: int,
    sessions: list[Session],
    failed: dict[int, str],
    cpu_s: float,
    machine_busy: float,
    publish_s: float,
    publisher_error: str,
    metrics: dict[str, float],
    server_alive: bool,
    load: tuple[float, float],
    stream: tuple[int, float, int, int],
) -> dict[str, Any]:
    delivered = sum(s.records for s in sessions)
    got = {s.index: s for s in sessions}
    lost = sum(max(0, records - got[i].records) if i in got else records for i in range(n))
    extra = sum(max(0, s.records - records) for s in sessions)
    gaps = sum(s.gaps for s in sessions)
    closed = {s.index: s.closed for s in sessions if s.closed}
    failed_all = {**failed, **closed}
    firsts = [s.first_ns for s in sessions if s.first_ns]
    lasts = [s.last_ns for s in sessions if s.last_ns]
    span = (max(lasts) - min(firsts)) / 1e9 if firsts and lasts else 0.0
    notes = [note for s in sessions for note in s.notes][:5]
    applied = sum(v for k, v in metrics.items() if k.startswith("gateway_books_records"))
    if books and applied < records:
        notes.append(f"books on, but the books applied {applied:,.0f} of {records:,} records")
    if not books and applied:
        notes.append(f"books off, but the books applied {applied:,.0f} records")
    if not server_alive:
        notes.append("the gateway exited during the case")
    return {
        "status": "ok",
        "part": "books-on" if books else "books-off",
        "books": books,
        "records": records,
        "expected": records * n,
        "delivered": delivered,
        "lost": lost,
        "extra": extra,
        "gaps": gaps,
        "unexpected": 0,
        "failed_sessions": len(failed_all),
        "loss_free": not (lost or extra or gaps or failed_all or publisher_error or notes),
        "throughput_rps": round(delivered / span) if span else 0,
        "feed_rps": round(records / span) if span else 0,
        "span_s": round(span, 3),
        "publish_s": round(publish_s, 3),
        "server_cpu_s": round(cpu_s, 3),
        "server_cpu_s_per_m": round(cpu_s / delivered * 1e6, 4) if delivered else None,
        "server_cpu_us_per_feed_record": round(cpu_s / records * 1e6, 3) if records else None,
        "machine_busy": round(machine_busy, 3),
        "load_avg_1m": [round(x, 2) for x in load],
        "slow_warnings": sum(s.slow_warnings for s in sessions),
        "books_metrics": metrics,
        "publisher_error": publisher_error,
        "notes": notes + [f"session {i}: {why}" for i, why in list(failed_all.items())[:3]],
        "stream": {
            "records": stream[0],
            "generated_cpu_s": round(stream[1], 3),
            "instruments": stream[2],
            "seed": stream[3],
            "source": "gateway.feeds.synthetic (schemas=mbo)",
        },
    }


def books_cases(
    h: Harness, repeats: int | None = None
) -> list[tuple[str, int, dict[str, Any], Any]]:
    """(system, n, params, run) for every case: each part once per repeat, interleaved."""
    plan = books_plan(h.plan, repeats)
    bench = BooksBench(h, plan)
    out = []
    runs = {
        "books-off": bench.off,
        "books-on": bench.on,
        "synthetic-off": bench.synthetic_off,
        "synthetic-on": bench.synthetic_on,
    }
    for rep in range(plan.repeats):
        for part, _ in BOOKS_PARTS:
            params: dict[str, Any] = {"part": part, "repeat": rep}
            if part.startswith("synthetic"):
                params["rate"] = plan.synthetic_rate
            out.append(("gateway", plan.n, params, runs[part]))
    return out


# --- the report ---------------------------------------------------------------------------


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def books_rows(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """part -> every run's figures and their medians."""
    rows: dict[str, dict[str, Any]] = {}
    for r in results:
        if r.get("scenario") != "books":
            continue
        part = str((r.get("params") or {}).get("part"))
        row = rows.setdefault(
            part,
            {
                "part": part,
                "n": r.get("n"),
                "runs": 0,
                "ok_runs": 0,
                "errors": [],
                "loss_free": True,
                "throughput_rps": [],
                "feed_rps": [],
                "server_cpu_s_per_m": [],
                "machine_busy": [],
            },
        )
        row["runs"] += 1
        if r.get("status") != "ok":
            row["errors"].append(f"{r.get('status')}: {str(r.get('reason', ''))[:200]}")
            row["loss_free"] = False
            continue
        row["ok_runs"] += 1
        row["loss_free"] = row["loss_free"] and bool(r.get("loss_free"))
        for key in ("throughput_rps", "feed_rps", "server_cpu_s_per_m", "machine_busy"):
            if r.get(key) is not None:
                row[key].append(float(r[key]))
    for row in rows.values():
        for key in ("throughput_rps", "feed_rps", "server_cpu_s_per_m", "machine_busy"):
            row[f"median_{key}"] = _median(row[key])
    return rows


def books_figures(results: list[dict[str, Any]]) -> dict[str, Any]:
    """On ÷ off: throughput and CPU per record (lossless parts), CPU per record at the
    embedded feed's rate (None where a part is missing)."""
    rows = books_rows(results)

    def ratio(key: str, on: str, off: str) -> float | None:
        a = rows.get(on, {}).get(f"median_{key}")
        b = rows.get(off, {}).get(f"median_{key}")
        return round(a / b, 3) if a and b else None

    return {
        "throughput_ratio": ratio("throughput_rps", "books-on", "books-off"),
        "cpu_ratio": ratio("server_cpu_s_per_m", "books-on", "books-off"),
        "synthetic_cpu_ratio": ratio("server_cpu_s_per_m", "synthetic-on", "synthetic-off"),
    }


def books_targets(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The target, when the scenario ran (else none)."""
    from bench.replay_report import _target

    rows = books_rows(results)
    if not rows:
        return []
    n = next(iter(rows.values())).get("n")
    ratio = books_figures(results)["throughput_ratio"]
    name = f"books N={n}: fan-out with books on within 20% of books off"
    why = ""
    if n != TARGET_N:
        why = f"N={n}: the target is for N={TARGET_N} (a correctness run)"
    for part in TARGET_PARTS:
        row = rows.get(part)
        if why:
            break
        if row is None:
            why = f"{part} not run"
        elif not row["ok_runs"]:
            why = f"{part}: " + "; ".join(row["errors"][:1])
        elif not row["loss_free"]:
            why = f"{part}: not loss-free"
    if ratio is None:
        return [_target(name, "-", f">= {THROUGHPUT_TARGET:.2f}x", None, None, why or "no data")]
    off, on = rows["books-off"], rows["books-on"]
    measured = (
        f"{on['median_throughput_rps'] / 1e6:.2f} vs {off['median_throughput_rps'] / 1e6:.2f} "
        f"M rec/s (medians of {on['ok_runs']} and {off['ok_runs']})"
    )
    ok = None if n != TARGET_N or why else ratio >= THROUGHPUT_TARGET
    return [_target(name, measured, f">= {THROUGHPUT_TARGET:.2f}x", ratio, ok, why)]


def books_summary(r: dict[str, Any]) -> str:
    """One case on one line (the progress output)."""
    text = (
        f"{r.get('part', '')}: {r.get('throughput_rps', 0) / 1e6:.2f} M rec/s delivered "
        f"({r.get('feed_rps', 0) / 1e3:,.0f}k feed rec/s), "
        f"{r.get('server_cpu_s_per_m') or 0:.3f} gateway CPU s/M"
    )
    if r.get("server_cpu_fraction") is not None:
        text += f", gateway {100 * r['server_cpu_fraction']:.0f}% of a core"
    return text


def _f(value: float | None, scale: float = 1.0, fmt: str = ".2f") -> str:
    return "-" if value is None else format(value / scale, fmt)


def books_table(results: list[dict[str, Any]]) -> list[str]:
    rows = books_rows(results)
    if not rows:
        return []
    fig = books_figures(results)
    lines = [
        "",
        "## Books: fan-out of the synthetic MBO feed, order books off vs on",
        "",
        "| part | N | runs | M rec/s delivered (median; runs) | feed k rec/s | "
        "gateway CPU s/M | complete |",
        "|---|---|---|---|---|---|---|",
    ]
    for part, _ in BOOKS_PARTS:
        row = rows.get(part)
        if row is None:
            continue
        runs = ", ".join(f"{v / 1e6:.2f}" for v in row["throughput_rps"])
        lines.append(
            f"| {part} | {row['n']} | {row['ok_runs']}/{row['runs']} | "
            f"{_f(row['median_throughput_rps'], 1e6)} ({runs}) | "
            f"{_f(row['median_feed_rps'], 1e3, ',.0f')} | "
            f"{_f(row['median_server_cpu_s_per_m'], 1, '.3f')} | "
            f"{'yes' if row['loss_free'] else 'NO'} |"
        )
    lines += [
        "",
        f"Books on ÷ off, lossless at the gateway's pace: throughput "
        f"{_f(fig['throughput_ratio'])}, gateway CPU per record {_f(fig['cpu_ratio'])} "
        f"(target: throughput ≥ {THROUGHPUT_TARGET:.2f}); the embedded feed at its rate: "
        f"gateway CPU per record {_f(fig['synthetic_cpu_ratio'])}.",
    ]
    return lines


def write_books_plot(outdir: Path, results: list[dict[str, Any]], caption: str = "") -> str:
    """``books.png``: throughput and gateway CPU per million records, books off vs on
    (bars: medians, dots: runs); its name ("" if nothing)."""
    rows = books_rows(results)
    if not any(rows.get(p, {}).get("median_throughput_rps") for p, _ in BOOKS_PARTS):
        return ""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig_data = books_figures(results)
    colors = {False: "#7f7f7f", True: "#1f77b4"}
    labels = {
        "books-off": "off",
        "books-on": "on",
        "synthetic-off": "off",
        "synthetic-on": "on",
    }
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    n = next(iter(rows.values()))["n"]
    rate = next(
        (
            (r.get("params") or {}).get("rate")
            for r in results
            if r.get("scenario") == "books" and (r.get("params") or {}).get("rate")
        ),
        0,
    )
    panels = (
        (
            axes[0],
            "throughput_rps",
            1e6,
            [p for p in TARGET_PARTS if rows.get(p)],
            "million records/s delivered (all sessions)",
            f"lossless fan-out at the gateway's pace, N={n} mbo sessions\n"
            f"books on ÷ off: {_f(fig_data['throughput_ratio'])} "
            f"(target ≥ {THROUGHPUT_TARGET:.2f})",
        ),
        (
            axes[1],
            "server_cpu_s_per_m",
            1.0,
            [p for p, _ in BOOKS_PARTS if rows.get(p)],
            "gateway CPU seconds per million records delivered",
            f"gateway CPU per record: lossless (on ÷ off {_f(fig_data['cpu_ratio'])}), "
            f"\nembedded feed at {int(rate or 0) // 1000}k rec/s "
            f"(on ÷ off {_f(fig_data['synthetic_cpu_ratio'])})",
        ),
    )
    for ax, key, scale, parts, label, title in panels:
        for x, part in enumerate(parts):
            row = rows[part]
            med = row[f"median_{key}"]
            if med is None:
                continue
            ax.bar(x, med / scale, color=colors[part.endswith("-on")], alpha=0.8)
            ax.scatter(
                [x + 0.3] * len(row[key]),
                [v / scale for v in row[key]],
                color="black",
                s=12,
                zorder=3,
            )
            ax.annotate(
                f"{med / scale:.3g}",
                (x, med / scale),
                textcoords="offset points",
                xytext=(0, 4),
                ha="center",
                fontsize=8,
                bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.85},
                zorder=4,
            )
        ax.set_xticks(
            range(len(parts)),
            [
                ("ingest\nbooks " if p.startswith("books") else "synthetic:\nbooks ") + labels[p]
                for p in parts
            ],
            fontsize=8,
        )
        ax.set_title(title, fontsize=9)
        ax.set_ylabel(label, fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    if caption:
        fig.text(0.5, 0.005, caption, ha="center", va="bottom", fontsize=7, color="#555555")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    name = "books.png"
    fig.savefig(outdir / name, dpi=110)
    plt.close(fig)
    return name


def write_books_outputs(
    outdir: Path, doc: dict[str, Any], caption: str, log: IO[str] | None = None
) -> dict[str, Any]:
    """``books.json``, ``BOOKS.md`` and ``books.png`` when the scenario ran (else {})."""
    results = doc["results"]
    rows = books_rows(results)
    if not rows:
        return {}
    meta = doc["meta"]
    out: dict[str, Any] = {
        "machine": meta.get("machine"),
        "versions": meta.get("versions"),
        "run_id": meta.get("run_id"),
        "rows": rows,
        "figures": books_figures(results),
        "targets": books_targets(results),
        "json": "books.json",
        "markdown": "BOOKS.md",
        "plot": "",
    }
    try:
        out["plot"] = write_books_plot(outdir, results, caption)
    except Exception as exc:  # a plot is a nicety; never lose the numbers over it
        if log is not None:
            print(f"books plot failed: {exc}", file=log)
    (outdir / "books.json").write_text(json.dumps(out, indent=1, default=str))
    m = meta.get("machine") or {}
    lines = [
        f"# Books: fan-out with order books off vs on, {meta.get('run_id', '?')}",
        "",
        f"Machine: {m.get('cpu_model', '?')}, {m.get('cores', '?')} CPUs "
        f"({m.get('usable_cpus', '?')} usable), {m.get('memory_gib', '?')} GiB, kernel "
        f"{m.get('kernel', '?')}; {m.get('date', '')}",
        *books_table(results),
        "",
    ]
    for t in out["targets"]:
        lines.append(
            f"Target: {t['target']}: {t['measured']} -> {t['status']}"
            + (f" ({t['detail']})" if t["detail"] else "")
        )
    if out["plot"]:
        lines += ["", f"![books]({out['plot']})", ""]
    (outdir / "BOOKS.md").write_text("\n".join(lines))
    return out


def append_books_section(path: Path, results: list[dict[str, Any]]) -> None:
    """Add the books section to RESULTS.md, before its closing ``Plots:`` line."""
    section = books_table(results)
    if not section or not path.exists():
        return
    text = path.read_text()
    at = text.rfind("\nPlots: ")
    block = "\n".join(section) + "\n"
    text = text.rstrip("\n") + "\n" + block if at < 0 else text[:at] + block + text[at:]
    path.write_text(text)
