"""The ``replay`` scenario: intraday replay from the journal, measured against its limits.

One journal is written first (``JournalStore`` in this process, the API the gateway's feeds
append with): the bench's MBP-1 records of 1,000 instruments, ``sequence`` = the record's
position, ``ts_event`` rising by a fixed step and ending just before the live publisher's
records, in chunks of 800 records, with the instruments' symbols learnt first. Every replay
is then served by a real gateway process (``gateway serve`` with ``[journal] dir`` on that
directory) over real sockets; each reader is its own process, parses the whole stream
(vectorised: MBP-1 runs as numpy rows, gateway records one by one) and checks it: sequence
continuity, foreign instruments, the ``REPLAY_COMPLETED`` SystemMsg, no ErrorMsg.

Parts (one case each, run in this order):

* ``sendfile``: one session replays the whole journal (``start=0``, ``ALL_SYMBOLS`` of
  ``mbp-1``, no ts_out, no zstd: the sendfile path), and the raw limit: a bare
  ``os.sendfile`` loop of the same journal files to the same reader. Alternated,
  ``sendfile_repeats`` times each; medians and their ratio.
* ``filtered``: one session replays the journal for 10 instruments (the copy path: every
  record is scanned, 1 % sent); records scanned per second.
* ``beside-live``: ``live_sessions`` live sessions at ``live_rate`` rec/s (the latency
  scenario's machinery; p99 over every live session's samples), alone and with
  ``concurrent`` replays of the journal's last ``concurrent_bytes`` each running beside
  them, once per throttle in ``beside_steps`` (``replay_step_bytes`` and the gateway-wide
  ``replay_bytes_per_s`` cap), interleaved for ``beside_rounds`` rounds;
  the p99 ratio per throttle and the replays' own throughput.
* ``fanout-journal``: the fan-out scenario (N = ``fanout_n``, lossless ingest at full
  speed) with the journal off and on, alternated ``repeats`` times; the ratio of medians.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import statistics
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt

from bench.peers import GatewayServer
from bench.records import (
    API_KEY,
    BATCH,
    DATASET,
    FIRST_ID,
    INSTRUMENTS,
    OFF_INSTRUMENT,
    OFF_SEQUENCE,
    REC_LEN,
    TILE,
    Schedule,
    symbol_of,
    template_records,
)
from gateway import control

if TYPE_CHECKING:
    from bench.peers import Server
    from bench.scenarios import Harness

__all__ = ["REPLAY_PARTS", "ReplayBench", "ReplayPlan", "replay_plan"]

#: the parts of the scenario, in the order they run
REPLAY_PARTS: Final = ("sendfile", "filtered", "beside-live", "fanout-journal")
#: the last prebuilt record's ts_event: just before the template's (the live publisher's)
TS_END: Final = 1_700_000_000_000_000_000
#: the prebuilt records span this much ts_event time
TS_SPAN: Final = 3600 * 10**9
RTYPE_MBP1: Final = 0x01
RTYPE_ERROR: Final = 0x15
RTYPE_SYSTEM: Final = 0x17
#: the instruments of the filtered replay: 10 spread over the 1,000
FILTERED_IDS: Final = tuple(FIRST_ID + k * (INSTRUMENTS // 10) for k in range(10))
RECV_BUF: Final = 4 << 20


@dataclass(frozen=True)
class ReplayPlan:
    journal_bytes: int
    repeats: int
    #: gateway and raw runs of the sendfile part (alternated; medians)
    sendfile_repeats: int
    concurrent: int
    concurrent_bytes: int
    live_sessions: int
    live_rate: int
    live_duration_s: float
    #: throttles tried beside the live sessions: (replay_step_bytes, replay_bytes_per_s;
    #: 0 = no cap)
    beside_steps: tuple[tuple[int, int], ...]
    #: rounds of (alone, each step), interleaved; medians per setting
    beside_rounds: int
    fanout_n: int
    timeout_s: float


def replay_plan(quick: bool) -> ReplayPlan:
    if quick:
        return ReplayPlan(
            journal_bytes=8 << 20,
            repeats=1,
            sendfile_repeats=1,
            concurrent=2,
            concurrent_bytes=2 << 20,
            live_sessions=3,
            live_rate=10_000,
            live_duration_s=0.5,
            beside_steps=((1 << 20, 0),),
            beside_rounds=1,
            fanout_n=3,
            timeout_s=60.0,
        )
    return ReplayPlan(
        journal_bytes=1 << 30,
        repeats=3,
        sendfile_repeats=5,
        concurrent=10,
        concurrent_bytes=256 << 20,
        live_sessions=100,
        live_rate=50_000,
        live_duration_s=4.0,
        beside_steps=(
            (1 << 20, 0),
            (256 << 10, 0),
            (256 << 10, 200_000_000),
            (256 << 10, 100_000_000),
            (256 << 10, 50_000_000),
        ),
        beside_rounds=2,
        fanout_n=100,
        timeout_s=600.0,
    )


# --- the journal ------------------------------------------------------------------------


@dataclass(frozen=True)
class JournalInfo:
    directory: Path
    records: int
    ts_step: int
    build_s: float

    @property
    def ts_base(self) -> int:
        return TS_END - self.records * self.ts_step

    def ts_of(self, position: int) -> int:
        return self.ts_base + position * self.ts_step

    def rt_files(self) -> list[Path]:
        """The journal's MBP-1 files in segment order: the bytes a full replay reads."""
        return sorted((self.directory / DATASET).glob(f"*/rt-{RTYPE_MBP1:02x}.dbn"))


def build_journal(directory: Path, nbytes: int) -> JournalInfo:
    """Write ``nbytes`` (rounded up to whole 800-record chunks) of MBP-1 records into a
    journal at ``directory`` with the gateway's own journal API."""
    from gateway.dbn import index_records
    from gateway.journal import JournalStore

    t0 = time.perf_counter()
    records = -(-nbytes // (REC_LEN * BATCH)) * BATCH
    step = max(1, TS_SPAN // records)
    base = TS_END - records * step
    shutil.rmtree(directory, ignore_errors=True)
    store = JournalStore.open(
        directory, retention_s=10 * 365 * 86400.0, max_bytes=1 << 40, segment_span_s=10 * TS_SPAN
    )
    try:
        journal = store.dataset(DATASET)
        ids = range(FIRST_ID, FIRST_ID + INSTRUMENTS)
        journal.learn([(symbol_of(i), i) for i in ids], ts=base)
        lap = template_records(Schedule())
        for first in range(0, records, TILE):
            count = min(TILE, records - first)
            recs = lap[:count].copy()
            recs["sequence"] = np.arange(first, first + count, dtype=np.uint32)
            recs["ts_event"] = base + np.arange(first, first + count, dtype=np.uint64) * step
            recs["ts_recv"] = recs["ts_event"]
            raw = recs.tobytes()
            for off in range(0, len(raw), BATCH * REC_LEN):
                index, _ = index_records(raw[off : off + BATCH * REC_LEN])
                if not journal.append(index):
                    raise RuntimeError("the journal refused a chunk (disabled?)")
    finally:
        store.close()
    return JournalInfo(directory, records, step, round(time.perf_counter() - t0, 2))


# --- the reader -------------------------------------------------------------------------


class StreamCheck:
    """Walks a DBN record stream as it arrives and checks it.

    MBP-1 records are taken in runs (numpy rows): ``sequence`` must continue from the
    previous record (``seq_from`` given), instruments must be among ``instruments`` (given).
    Gateway records are looked at one by one: SystemMsgs saying a replay finished, ErrorMsgs.
    """

    def __init__(
        self, *, seq_from: int | None = None, instruments: tuple[int, ...] | None = None
    ) -> None:
        self.next_seq = seq_from
        self.instruments = np.asarray(instruments, dtype=np.uint32) if instruments else None
        self.records = 0
        #: MBP-1 records before the first sequence break
        self.first_run = 0
        self.breaks = 0
        self.foreign = 0
        self.finished = 0
        self.other = 0
        self.errors: list[str] = []

    def walk(self, arr: npt.NDArray[np.uint8], pos: int, end: int) -> int:
        """Check the whole records of ``arr[pos:end]``; the position of the first partial
        record."""
        while end - pos >= 2:
            length = int(arr[pos]) * 4
            if length < 16:
                raise RuntimeError(f"bad record length {length} at stream offset {pos}")
            if end - pos < length:
                break
            if arr[pos + 1] == RTYPE_MBP1 and length == REC_LEN:
                k = (end - pos) // REC_LEN
                rows = arr[pos : pos + k * REC_LEN].reshape(k, REC_LEN)
                bad = (rows[:, 0] != REC_LEN // 4) | (rows[:, 1] != RTYPE_MBP1)
                if bad.any():
                    k = int(bad.argmax())
                    rows = rows[:k]
                self._rows(rows)
                pos += k * REC_LEN
                continue
            self._gateway_record(arr[pos : pos + length].tobytes())
            pos += length
        return pos

    def _rows(self, rows: npt.NDArray[np.uint8]) -> None:
        k = len(rows)
        if self.next_seq is not None:
            seq = rows[:, OFF_SEQUENCE : OFF_SEQUENCE + 4].copy().view("<u4").ravel()
            want = (np.arange(self.next_seq, self.next_seq + k) & 0xFFFFFFFF).astype(np.uint32)
            broken = np.flatnonzero(seq != want)
            if len(broken):
                if self.breaks == 0:
                    self.first_run = self.records + int(broken[0])
                # a break: count it, then follow the sequence as it now goes
                self.breaks += int(np.count_nonzero(np.diff(seq.astype(np.int64)) != 1)) + (
                    1 if broken[0] == 0 else 0
                )
            self.next_seq = int(seq[-1]) + 1
        if self.instruments is not None:
            iid = rows[:, OFF_INSTRUMENT : OFF_INSTRUMENT + 4].copy().view("<u4").ravel()
            self.foreign += int(np.count_nonzero(~np.isin(iid, self.instruments)))
        self.records += k
        if self.breaks == 0:
            self.first_run = self.records

    def _gateway_record(self, rec: bytes) -> None:
        rtype = rec[1]
        if rtype == RTYPE_SYSTEM and b"Finished " in rec and b" replay" in rec:
            self.finished += 1
        elif rtype == RTYPE_ERROR:
            self.errors.append(rec[16:].split(b"\0", 1)[0].decode("utf-8", "replace"))
        else:
            self.other += 1

    def summary(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "first_run": self.first_run,
            "breaks": self.breaks,
            "foreign": self.foreign,
            "finished": self.finished,
            "errors": self.errors[:3],
        }


def _read_line(sock: socket.socket, pending: bytearray) -> str:
    while b"\n" not in pending:
        data = sock.recv(4096)
        if not data:
            raise RuntimeError("gateway closed the connection during the handshake")
        pending += data
    line, _, rest = bytes(pending).partition(b"\n")
    pending[:] = rest
    return line.decode("utf-8", "replace")


def read_stream(
    sock: socket.socket,
    check: StreamCheck,
    *,
    gateway: bool,
    deadline: float,
    head: bytes = b"",
) -> dict[str, Any]:
    """Read ``sock`` into one buffer, checking records as they arrive, until the replay
    finished (gateway) or EOF (raw); times are ``perf_counter_ns``."""
    buf = bytearray(RECV_BUF)
    arr = np.frombuffer(buf, dtype=np.uint8)
    view = memoryview(buf)
    fill = len(head)
    buf[:fill] = head
    pos = 0
    total = 0
    t_first = time.perf_counter_ns() if head else 0
    meta_left = -1 if gateway else 0  # -1: the Metadata's length is not known yet
    sock.settimeout(1.0)
    while True:
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {total:,} bytes ({check.summary()})")
        try:
            n = sock.recv_into(view[fill:])
        except TimeoutError:
            continue
        if n == 0:
            break
        if not t_first:
            t_first = time.perf_counter_ns()
        total += n
        fill += n
        if meta_left < 0 and fill - pos >= 8:
            if bytes(buf[pos : pos + 3]) != b"DBN":
                raise RuntimeError("the stream does not start with DBN Metadata")
            meta_left = 8 + int.from_bytes(buf[pos + 4 : pos + 8], "little")
        if meta_left > 0:
            skip = min(meta_left, fill - pos)
            pos += skip
            meta_left -= skip
        if meta_left == 0:
            pos = check.walk(arr, pos, fill)
        if gateway and (check.finished or check.errors):
            break
        if pos == fill:
            pos = fill = 0
        elif fill > RECV_BUF - (1 << 20):
            rest = fill - pos
            buf[:rest] = buf[pos:fill]
            pos, fill = 0, rest
    t_done = time.perf_counter_ns()
    return {"bytes": total, "t_first": t_first, "t_done": t_done, **check.summary()}


def replay_reader(
    conn: Connection,
    port: int,
    *,
    symbols: tuple[int, ...] | None,
    start: int,
    seq_from: int | None,
    timeout_s: float,
) -> None:
    """A process: one replay session; sends ("ready",) once authenticated, waits for
    ("go",), then subscribes and starts, reads the replay and sends ("done", result)."""
    result: dict[str, Any]
    try:
        deadline = time.monotonic() + timeout_s
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        pending = bytearray()
        _read_line(sock, pending)  # lsg_version=...
        cram = _read_line(sock, pending)
        if not cram.startswith("cram="):
            raise RuntimeError(f"expected cram=, got {cram[:60]!r}")
        sock.sendall(
            control.encode_auth(
                control.cram_response(cram[5:], API_KEY),
                DATASET,
                slow_reader_behavior="warn",
                client="bench-replay",
            )
        )
        reply = _read_line(sock, pending)
        if not reply.startswith("success=1"):
            raise RuntimeError(f"gateway refused the session: {reply[:200]}")
        conn.send(("ready",))
        conn.recv()
        if symbols is None:
            sub = control.encode_subscription(
                "mbp-1", control.ALL_SYMBOLS, stype_in="instrument_id", sub_id=1, start=start
            )
        else:
            sub = control.encode_subscription(
                "mbp-1", [symbol_of(i) for i in symbols], sub_id=1, start=start
            )
        t_start = time.perf_counter_ns()
        sock.sendall(sub + control.START_SESSION)
        check = StreamCheck(seq_from=seq_from, instruments=symbols)
        result = read_stream(sock, check, gateway=True, deadline=deadline, head=bytes(pending))
        result["t_start"] = t_start
        sock.close()
    except Exception as exc:
        result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    conn.send(("done", result))


def raw_sender(conn: Connection, files: list[str]) -> None:
    """A process: the raw limit's sender. Listens, reports its port, and sends ``files``
    to the one client with a bare blocking ``os.sendfile`` loop, then closes."""
    listener = socket.create_server(("127.0.0.1", 0))
    conn.send(("port", listener.getsockname()[1]))
    client, _ = listener.accept()
    cpu0 = time.process_time()
    sent = 0
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            offset = 0
            while offset < size:
                n = os.sendfile(client.fileno(), fd, offset, size - offset)
                if n == 0:
                    break
                offset += n
            sent += offset
        finally:
            os.close(fd)
    client.close()
    listener.close()
    conn.send(("sent", sent, time.process_time() - cpu0))


def raw_reader(conn: Connection, port: int, timeout_s: float) -> None:
    result: dict[str, Any]
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        check = StreamCheck(seq_from=0)
        result = read_stream(sock, check, gateway=False, deadline=time.monotonic() + timeout_s)
        sock.close()
    except Exception as exc:
        result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    conn.send(("done", result))


# --- the scenario -----------------------------------------------------------------------


def _rate(result: dict[str, Any], key: str = "bytes", since: str = "t_first") -> float:
    span = (result["t_done"] - result[since]) / 1e9
    return result[key] / span if span > 0 else 0.0


def _loss_fields(expected: int, delivered: int, **more: int) -> dict[str, Any]:
    gaps = more.get("gaps", 0)
    unexpected = more.get("unexpected", 0)
    failed = more.get("failed_sessions", 0)
    lost = max(0, expected - delivered)
    return {
        "expected": expected,
        "delivered": delivered,
        "lost": lost,
        "extra": 0,
        "gaps": gaps,
        "unexpected": unexpected,
        "failed_sessions": failed,
        "loss_free": lost == 0 and gaps == 0 and unexpected == 0 and failed == 0,
    }


class ReplayBench:
    """The replay scenario's cases over one journal, built on first use."""

    def __init__(self, harness: Harness, plan: ReplayPlan) -> None:
        self.h = harness
        self.plan = plan
        self.dir = harness.workdir / "replay-journal"
        self._info: JournalInfo | None = None

    @property
    def info(self) -> JournalInfo:
        if self._info is None:
            self._info = build_journal(self.dir, self.plan.journal_bytes)
        return self._info

    def close(self) -> None:
        """Remove the journals (a full run's is over 1 GiB)."""
        shutil.rmtree(self.dir, ignore_errors=True)
        for d in self.h.workdir.glob("fanout-journal-*"):
            shutil.rmtree(d, ignore_errors=True)

    def journal_config(self, **more: Any) -> dict[str, Any]:
        return {
            "journal": {
                "dir": str(self.dir),
                "retention_s": 10 * 365 * 86400.0,
                "max_bytes": 1 << 40,
                "segment_span_s": 10 * TS_SPAN / 1e9,
                **more,
            }
        }

    def _gateway(self) -> GatewayServer:
        return GatewayServer(
            self.h.workdir,
            extra_config=self.journal_config(),
            workers=self.h.gateway_workers,
        ).start()

    def _readers(self, port: int, count: int, **kw: Any) -> list[tuple[Any, Connection]]:
        from bench.scenarios import CTX

        out = []
        for _ in range(count):
            parent, child = CTX.Pipe()
            proc = CTX.Process(
                target=replay_reader,
                args=(child, port),
                kwargs={**kw, "timeout_s": self.plan.timeout_s},
                daemon=True,
            )
            proc.start()
            child.close()
            out.append((proc, parent))
        for _proc, parent in out:
            if not parent.poll(60):
                raise RuntimeError("a replay reader did not get authenticated")
            msg = parent.recv()
            if msg[0] != "ready":
                raise RuntimeError(f"replay reader failed: {msg[1].get('error')}")
        return out

    def _finish(self, readers: list[tuple[Any, Connection]]) -> list[dict[str, Any]]:
        results = []
        for proc, parent in readers:
            if parent.poll(self.plan.timeout_s + 30):
                results.append(parent.recv()[1])
            else:
                results.append({"error": "no result from the replay reader"})
            proc.join(5)
            if proc.is_alive():
                proc.terminate()  # only this child, by its PID
                proc.join(5)
        return results

    def _replay(self, port: int, **kw: Any) -> dict[str, Any]:
        readers = self._readers(port, 1, **kw)
        for _, parent in readers:
            parent.send(("go",))
        return self._finish(readers)[0]

    def _raw(self) -> dict[str, Any]:
        from bench.scenarios import CTX

        files = [str(p) for p in self.info.rt_files()]
        s_parent, s_child = CTX.Pipe()
        sender = CTX.Process(target=raw_sender, args=(s_child, files), daemon=True)
        sender.start()
        s_child.close()
        if not s_parent.poll(30):
            raise RuntimeError("the raw sender did not start")
        port = s_parent.recv()[1]
        r_parent, r_child = CTX.Pipe()
        reader = CTX.Process(
            target=raw_reader, args=(r_child, port, self.plan.timeout_s), daemon=True
        )
        reader.start()
        r_child.close()
        try:
            if not r_parent.poll(self.plan.timeout_s + 30):
                raise RuntimeError("no result from the raw reader")
            result: dict[str, Any] = r_parent.recv()[1]
            if s_parent.poll(30):
                result["sender_cpu_s"] = s_parent.recv()[2]
        finally:
            for p in (reader, sender):
                p.join(10)
                if p.is_alive():
                    p.terminate()  # only this child, by its PID
                    p.join(5)
        return result

    # --- parts --------------------------------------------------------------------------

    def sendfile(self) -> dict[str, Any]:
        info = self.info
        load = os.getloadavg()[0]
        runs: list[dict[str, Any]] = []
        raws: list[dict[str, Any]] = []
        gw = self._gateway()
        try:
            for _ in range(self.plan.sendfile_repeats):
                raws.append(self._raw())
                cpu0 = gw.cpu_seconds()
                runs.append(self._replay(gw.port, symbols=None, start=0, seq_from=0))
                runs[-1]["sender_cpu_s"] = gw.cpu_seconds() - cpu0
            metrics = _scrape(gw)
        finally:
            gw.stop()
        for r in runs + raws:
            if "error" in r:
                raise RuntimeError(r["error"])
        gw_rates = [_rate(r) for r in runs]
        raw_rates = [_rate(r) for r in raws]
        gw_med, raw_med = statistics.median(gw_rates), statistics.median(raw_rates)
        worst = min(runs, key=lambda r: r["first_run"])
        out = _loss_fields(
            info.records,
            min(worst["first_run"], info.records),
            gaps=sum(r["breaks"] for r in runs + raws),
            unexpected=sum(r["finished"] != 1 for r in runs),
            failed_sessions=sum(bool(r["errors"]) for r in runs),
        )
        out.update(
            status="ok",
            journal_bytes=info.records * REC_LEN,
            journal_records=info.records,
            journal_build_s=info.build_s,
            replay_bytes_per_s=[round(x) for x in gw_rates],
            raw_bytes_per_s=[round(x) for x in raw_rates],
            replay_median_bps=round(gw_med),
            raw_median_bps=round(raw_med),
            ratio=round(gw_med / raw_med, 3) if raw_med else 0.0,
            replay_catchup_s=[round((r["t_done"] - r["t_start"]) / 1e9, 3) for r in runs],
            # CPU seconds of the sending process per GiB sent: the gateway (whole process,
            # its planner and pump included) and the raw sender (a blocking sendfile loop)
            replay_cpu_s_per_gib=[_per_gib(r) for r in runs],
            raw_cpu_s_per_gib=[_per_gib(r) for r in raws],
            raw_records=[r["records"] for r in raws],
            replay_metrics=metrics,
            load_avg_1m=[round(load, 2), round(os.getloadavg()[0], 2)],
        )
        if any(r["records"] != info.records for r in raws):
            out["loss_free"] = False
            out["notes"] = [f"raw reader records {[r['records'] for r in raws]}"]
        return out

    def filtered(self) -> dict[str, Any]:
        info = self.info
        counts = Schedule().published_per_instrument(info.records)
        want = int(counts[np.asarray(FILTERED_IDS) - FIRST_ID].sum())
        load = os.getloadavg()[0]
        gw = self._gateway()
        try:
            runs = [
                self._replay(gw.port, symbols=FILTERED_IDS, start=0, seq_from=None)
                for _ in range(self.plan.repeats)
            ]
            metrics = _scrape(gw)
        finally:
            gw.stop()
        for r in runs:
            if "error" in r:
                raise RuntimeError(r["error"])
        scanned = [info.records / ((r["t_done"] - r["t_start"]) / 1e9) for r in runs]
        out = _loss_fields(
            want,
            min(r["records"] for r in runs),
            unexpected=sum(r["foreign"] for r in runs) + sum(r["finished"] != 1 for r in runs),
            failed_sessions=sum(bool(r["errors"]) for r in runs),
        )
        out.update(
            status="ok",
            instruments=len(FILTERED_IDS),
            journal_records=info.records,
            records_sent=[r["records"] for r in runs],
            scanned_per_s=[round(x) for x in scanned],
            scanned_median_per_s=round(statistics.median(scanned)),
            replay_metrics=metrics,
            load_avg_1m=[round(load, 2), round(os.getloadavg()[0], 2)],
        )
        return out

    @contextmanager
    def _beside(self, server: Server) -> Iterator[dict[str, Any]]:
        """``concurrent`` replays of the journal's last ``concurrent_bytes`` while the
        live case runs; their figures go into the dict once all have finished."""
        info = self.info
        tail = min(info.records, -(-self.plan.concurrent_bytes // REC_LEN))
        first = info.records - tail
        readers = self._readers(
            server.port,
            self.plan.concurrent,
            symbols=None,
            start=info.ts_of(first),
            seq_from=first,
        )
        out: dict[str, Any] = {"replays": self.plan.concurrent, "replay_records_each": tail}
        t0 = time.perf_counter_ns()
        for _, parent in readers:
            parent.send(("go",))
        try:
            yield out
        finally:
            t_live_done = time.perf_counter_ns()
            results = self._finish(readers)
            out["results"] = results
            out["live_window_s"] = round((t_live_done - t0) / 1e9, 3)
            out["metrics"] = _scrape(server)

    def _live(self, step: tuple[int, int] | None) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """One live case, alone (``step`` None) or beside the replays at that throttle
        (replay_step_bytes, replay_bytes_per_s): the case and the replays' figures."""
        plan = self.plan
        extra_cfg: dict[str, Any] = {}
        if step is not None:
            extra_cfg["replay_step_bytes"] = step[0]
            if step[1]:
                extra_cfg["replay_bytes_per_s"] = step[1]
        case = self.h.latency(
            "gateway",
            plan.live_sessions,
            plan.live_rate,
            duration_s=plan.live_duration_s,
            gateway_config=self.journal_config(**extra_cfg),
            during=None if step is None else self._beside,
        )
        if case.get("status") != "ok":
            raise RuntimeError(f"live case failed: {case.get('reason')}")
        if step is None:
            return case, None
        extra = case.pop("beside", {})
        results: list[dict[str, Any]] = extra.get("results", [])
        errors = [r["error"] for r in results if "error" in r]
        if errors:
            raise RuntimeError(f"replay beside live failed: {errors[0]}")
        tail = int(extra["replay_records_each"])
        loss = _loss_fields(
            tail * len(results),
            sum(min(r["first_run"], tail) for r in results),
            unexpected=sum(r["finished"] != 1 for r in results),
            failed_sessions=sum(bool(r["errors"]) for r in results),
        )
        t_start = min(r["t_start"] for r in results)
        t_done = max(r["t_done"] for r in results)
        total = sum(r["bytes"] for r in results)
        return case, {
            **loss,
            "replay_bytes_total": total,
            "replay_bytes_per_s": round(total / ((t_done - t_start) / 1e9)),
            "replay_each_s": [_seconds(r) for r in results],
            "replay_sequence_breaks": [r["breaks"] for r in results],
            "live_window_s": extra.get("live_window_s"),
            "replay_metrics": extra.get("metrics"),
        }

    def beside_live(self) -> dict[str, Any]:
        """The live case alone and beside the replays once per ``replay_step_bytes`` in
        ``beside_steps`` (the throttle: bytes one replay hands the kernel per loop turn),
        interleaved for ``beside_rounds`` rounds; medians per setting. Live p99 is over
        every live session's samples (the probe's alone is in the figures too)."""
        plan = self.plan
        self.info  # noqa: B018 - build the journal before the live runs start
        load = os.getloadavg()[0]
        settings: list[tuple[int, int] | None] = [None, *plan.beside_steps]
        runs: dict[tuple[int, int] | None, list[tuple[dict[str, Any], dict[str, Any] | None]]] = {
            s: [] for s in settings
        }
        for _ in range(plan.beside_rounds):
            for setting in settings:
                runs[setting].append(self._live(setting))
        totals = dict.fromkeys(_LOSS_KEYS, 0)
        loss_free = True
        for pairs in runs.values():
            for case, replays in pairs:
                for k in _LOSS_KEYS:
                    totals[k] += case[k] + (replays[k] if replays else 0)
                loss_free = loss_free and bool(case["loss_free"])
                loss_free = loss_free and (replays is None or bool(replays["loss_free"]))

        def p99s(setting: tuple[int, int] | None, who: str) -> list[float]:
            return [_p99(case, who) or 0.0 for case, _ in runs[setting]]

        alone_all = statistics.median(p99s(None, "all"))
        alone_probe = statistics.median(p99s(None, "probe"))
        steps: list[dict[str, Any]] = []
        for step in plan.beside_steps:
            assert step is not None
            p99_all = statistics.median(p99s(step, "all"))
            p99_probe = statistics.median(p99s(step, "probe"))
            figures = [r for _, r in runs[step] if r is not None]
            steps.append(
                {
                    "replay_step_bytes": step[0],
                    "replay_cap_bytes_per_s": step[1],
                    "live_p99_us": p99_all,
                    "live_p99_ratio": round(p99_all / alone_all, 3) if alone_all else None,
                    "live_p99_us_runs": p99s(step, "all"),
                    "live_probe_p99_us": p99_probe,
                    "live_probe_p99_us_runs": p99s(step, "probe"),
                    "replay_bytes_per_s": round(
                        statistics.median(f["replay_bytes_per_s"] for f in figures)
                    ),
                    "replay_bytes_per_s_runs": [f["replay_bytes_per_s"] for f in figures],
                    "replay_bytes_total": figures[-1]["replay_bytes_total"],
                    "replay_each_s": [x for f in figures for x in f["replay_each_s"]],
                    "replay_sequence_breaks": [f["replay_sequence_breaks"] for f in figures],
                    "live_window_s": [f["live_window_s"] for f in figures],
                    "replay_metrics": figures[-1]["replay_metrics"],
                    "live_achieved_rate": [c.get("achieved_rate") for c, _ in runs[step]],
                }
            )
        within = [s for s in steps if (s["live_p99_ratio"] or float("inf")) <= 1.5]
        # the throttle the target is judged on: the fastest replays that keep live p99 within
        # 1.5x, else the gentlest setting tried
        chosen = (
            max(within, key=lambda s: s["replay_bytes_per_s"])
            if within
            else min(steps, key=lambda s: s["live_p99_ratio"] or float("inf"))
        )
        out: dict[str, Any] = dict(totals)
        out.update(
            status="ok",
            loss_free=loss_free,
            live_sessions=plan.live_sessions,
            live_rate=plan.live_rate,
            rounds=plan.beside_rounds,
            replays=plan.concurrent,
            replay_mib_each=round(plan.concurrent_bytes / 2**20),
            live_p99_us_alone=alone_all,
            live_p99_us_alone_runs=p99s(None, "all"),
            live_probe_p99_us_alone=alone_probe,
            live_probe_p99_us_alone_runs=p99s(None, "probe"),
            live_latency_alone=[case.get("latency") for case, _ in runs[None]],
            steps=steps,
            chosen_step_bytes=chosen["replay_step_bytes"],
            chosen_cap_bytes_per_s=chosen["replay_cap_bytes_per_s"],
            live_p99_us_beside=chosen["live_p99_us"],
            live_p99_ratio=chosen["live_p99_ratio"],
            replay_bytes_per_s=chosen["replay_bytes_per_s"],
            load_avg_1m=[round(load, 2), round(os.getloadavg()[0], 2)],
        )
        return out

    def fanout_journal(self) -> dict[str, Any]:
        plan, h = self.plan, self.h
        off: list[dict[str, Any]] = []
        on: list[dict[str, Any]] = []
        load = os.getloadavg()[0]
        for i in range(plan.repeats):
            off.append(h.fanout("gateway", plan.fanout_n))
            jdir = h.workdir / f"fanout-journal-{i}"
            try:
                on.append(h.fanout("gateway", plan.fanout_n, {"journal": {"dir": str(jdir)}}))
            finally:
                shutil.rmtree(jdir, ignore_errors=True)
        for case in off + on:
            if case.get("status") != "ok":
                raise RuntimeError(f"fanout case failed: {case.get('reason')}")
        med_off = statistics.median(c["throughput_rps"] for c in off)
        med_on = statistics.median(c["throughput_rps"] for c in on)
        out = {
            k: sum(c[k] for c in off + on)
            for k in (
                "expected",
                "delivered",
                "lost",
                "extra",
                "gaps",
                "unexpected",
                "failed_sessions",
            )
        }
        out.update(
            status="ok",
            loss_free=all(c["loss_free"] for c in off + on),
            throughput_rps_off=[c["throughput_rps"] for c in off],
            throughput_rps_on=[c["throughput_rps"] for c in on],
            median_rps_off=round(med_off),
            median_rps_on=round(med_on),
            ratio=round(med_on / med_off, 3) if med_off else 0.0,
            server_cpu_s_per_m_off=[c.get("server_cpu_s_per_m") for c in off],
            server_cpu_s_per_m_on=[c.get("server_cpu_s_per_m") for c in on],
            load_avg_1m=[round(load, 2), round(os.getloadavg()[0], 2)],
        )
        return out


_LOSS_KEYS: Final = (
    "expected",
    "delivered",
    "lost",
    "extra",
    "gaps",
    "unexpected",
    "failed_sessions",
)


def _per_gib(result: dict[str, Any]) -> float | None:
    cpu = result.get("sender_cpu_s")
    return (
        round(cpu / (result["bytes"] / 2**30), 3) if cpu is not None and result["bytes"] else None
    )


def _seconds(result: dict[str, Any]) -> float:
    return round(float(result["t_done"] - result["t_start"]) / 1e9, 3)


def _p99(case: dict[str, Any], who: str = "all") -> float | None:
    """p99 in us over every live session's samples ("all") or the last-served one's."""
    lat = (case.get("latency") or {}).get(who)
    return float(lat["p99"]) if lat else None


def _scrape(server: Server) -> dict[str, float]:
    """The gateway's replay counters from /metrics (proof of the path the bytes took)."""
    import urllib.request

    port = getattr(server, "metrics_port", 0)
    if not port:
        return {}
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(("gateway_replay_bytes_total", "gateway_replays_refused_total")):
            name, _, value = line.rpartition(" ")
            if float(value):
                out[name] = float(value)
    return out


def with_plan(plan: ReplayPlan, **changes: Any) -> ReplayPlan:
    return dataclasses.replace(plan, **changes)
