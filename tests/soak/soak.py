"""Soak harness: a real gateway under a steady synthetic feed, hundreds of sessions joining
and leaving at random, stalled readers and hostile clients; every promise is checked at the
end and a broken one makes the exit status non-zero.

    .venv/bin/python -m tests.soak.soak --duration 60 --sessions 200

Layout
------
* The controller (this process) starts the gateway as a real process
  (``tests.integration.helpers.start_gateway``, synthetic feed ``SOAK``), runs the
  *reference* session (ALL_SYMBOLS trades + mbp-1 for the whole run), the hostile clients,
  and samples the gateway's RSS, fd count and ``/metrics``.
* ``--workers`` reader processes run the session *slots* with asyncio. A slot joins with a
  random plan, reads, leaves (half-close and drain to EOF, close, or reset) and rejoins until
  the end. ``--stalled`` of the slots are stalled readers (small SO_RCVBUF; they stop reading):
  half of them ``skip`` (mbp-1 only: they must be told "Skipped N records" when they resume),
  half ``warn`` (they get SLOW_READER_WARNING SystemMsgs and are cut at the hard cap; a
  ``--late-resume`` share of those resumes only after the gateway's cut grace period, and must
  then not see a clean end of stream that hides what was lost).
  Healthy sessions ask for ``slow_reader_behavior=warn`` so CPU noise never costs them
  records: they must receive everything.
* Readers never make a Python object per record: a read is cut into runs of same-size
  records with numpy and checked run by run, and sockets are polled every ``--poll-ms``
  (``pause_reading`` in between) so that 200 sessions fit a shared 2-core machine.

What is checked
---------------
Online, per session: the stream starts with a valid Metadata header; every data record has an
rtype and instrument of the subscription; the embedded ``sequence`` (u32 at byte 44 of trades
and mbp-1 records) strictly increases, and is contiguous (diff == 1) for ALL_SYMBOLS
trades + mbp-1 sessions. At the end, against the reference stream: the records of the
session's subscription between its first and last sequence, minus the gaps announced by skip
notices, are all there (count, sum and sum of squares of the sequence numbers per rtype);
each notice's N equals the records in its gap; a session read to EOF got exactly the number
of records the gateway logged as sent. Globally: no traceback in the gateway log, RSS at the
end within ``--rss-tolerance`` of RSS after warm-up, the fd count back to its baseline, the
gateway exits 0 on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import multiprocessing
import os
import random
import re
import resource
import socket
import struct
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gateway import control
from gateway.client import FrameDecompressor
from gateway.feeds.synthetic import instrument_table
from gateway.server import ConnectionLimits
from tests.support.wire import AsyncRawClient, error_records

CUT_GRACE_S = ConnectionLimits().cut_grace_s  # the default, which the soak does not change

__all__ = [
    "HOSTILE_ACTIONS",
    "Env",
    "Plan",
    "SoakConfig",
    "SoakReport",
    "SoakSession",
    "fd_count",
    "hostile_once",
    "main",
    "rss_kib",
    "run",
]

DATASET = "SOAK"
HOST = "127.0.0.1"
SEQ_OFFSET = 44  # u32 sequence in TradeMsg (48 B) and Mbp1Msg (80 B)
TS_RECV_OFFSET = 32  # u64 ts_recv (wall clock, ns) in both
#: records published this long after a session's start and before it left must all be there
EDGE_NS = 3_000_000_000
SCHEMA_RTYPE = {"trades": 0x00, "mbp-1": 0x01}
RTYPE_ERROR, RTYPE_MAPPING, RTYPE_SYSTEM = 0x15, 0x16, 0x17
GATEWAY_RTYPES = (RTYPE_ERROR, RTYPE_MAPPING, RTYPE_SYSTEM)
ERR_UNRESOLVED, ERR_INVALID, ERR_INTERNAL, ERR_SKIPPED = 4, 5, 6, 7
SYS_WARNING = 2
SKIP_TEXT = re.compile(r"Skipped (\d+) records after slow reading")
MASK64 = (1 << 64) - 1
UNKNOWN_SYMBOL = "NOSUCH.SYM"
SOAK_CLIENT = "soak"


# --- configuration ------------------------------------------------------------------------


@dataclass
class SoakConfig:
    duration: float = 60.0
    #: concurrent session slots, stalled ones included
    sessions: int = 200
    stalled: int = 10
    hostile: int = 5
    workers: int = 2
    rate: float = 10_000.0
    instruments: int = 100
    seed: int = 1
    #: RSS "after warm-up" is sampled this many seconds in (default: once the first stalled
    #: warn sessions can have reached the hard cap, so their buffers are in the baseline)
    warmup: float | None = None
    poll_ms: float = 50.0
    min_life: float = 3.0
    max_life: float = 15.0
    skip_stall_min: float = 3.0
    skip_stall_max: float = 6.0
    stall_rcvbuf: int = 64 * 1024
    behind_bytes: int = 1 << 20
    behind_age_s: float = 2.0
    resume_bytes: int = 256 << 10
    warning_interval_s: float = 0.5
    hard_cap_bytes: int = 8 << 20
    handshake_timeout_s: float = 3.0
    #: SO_SNDBUF of the gateway's client sockets (0: kernel autotuning, up to tcp_wmem max,
    #: 4 MiB here, which hides a stalled reader from the slow-reader policy for seconds)
    sndbuf: int = 128 * 1024
    rss_tolerance: float = 0.10
    #: fraction of the warn-stall slots (at least one if > 0) that resume only after the
    #: gateway's cut grace period: they must not see a clean end of stream without the
    #: disconnect ErrorMsg (failures tagged "late-cut")
    late_resume: float = 0.2
    #: gateway event loop: uvloop | asyncio (default: GATEWAY_TEST_LOOP or uvloop)
    loop: str = ""
    #: print progress lines while running
    progress: bool = True

    @property
    def warmup_s(self) -> float:
        if self.warmup is not None:
            return self.warmup
        slowest_cut = (self.hard_cap_bytes + 2 * self.sndbuf) / (self.rate * 0.75 * 80)
        return max(self.duration / 3, min(self.duration / 2, 1.5 * slowest_cut + 4.0))

    def gateway_toml(self) -> str:
        return (
            "[limits]\n"
            f"handshake_timeout_s = {self.handshake_timeout_s}\n"
            "[slow_reader]\n"
            f"behind_bytes = {self.behind_bytes}\n"
            f"behind_age_s = {self.behind_age_s}\n"
            f"resume_bytes = {self.resume_bytes}\n"
            f"warning_interval_s = {self.warning_interval_s}\n"
            f"hard_cap_bytes = {self.hard_cap_bytes}\n"
            + (f"[transport]\nsndbuf = {self.sndbuf}\n" if self.sndbuf else "")
        )


# --- process probes -----------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# --- subscription plans -------------------------------------------------------------------


@dataclass
class Plan:
    kind: str  # reference | healthy | skip_stall | warn_stall
    cls: str  # report class
    schemas: tuple[str, ...]
    #: () for ALL_SYMBOLS
    symbols: tuple[str, ...] = ()
    stype: str = "raw_symbol"
    #: instrument ids the subscription resolves to; None for ALL_SYMBOLS
    iids: tuple[int, ...] | None = None
    unknown: tuple[str, ...] = ()
    behavior: str | None = "warn"
    zstd: bool = False
    ts_out: bool = False
    rcvbuf: int | None = None
    lifetime: float = 0.0
    leave: str = "drain"  # drain | close | reset
    pre: float = 0.0
    stall: float = 0.0
    post: float = 0.0
    chunked: bool = False
    pipelined: bool = False
    start_line: str = "start_session"
    keep: bool = False
    #: read every ``poll_s`` (pause_reading in between); stalled readers read continuously
    #: when not stalled, since their small SO_RCVBUF holds only a few KB per read
    poll: bool = True
    #: warn stall: resume only after the gateway's cut grace period has run out
    late: bool = False

    @property
    def all_symbols(self) -> bool:
        return not self.symbols

    @property
    def contiguous(self) -> bool:
        return self.all_symbols and set(self.schemas) == {"trades", "mbp-1"}

    def lines(self) -> bytes:
        out = []
        for sub_id, schema in enumerate(self.schemas, start=1):
            symbols = ["ALL_SYMBOLS"] if self.all_symbols else [*self.symbols, *self.unknown]
            chunks = [symbols]
            if self.chunked and len(symbols) > 1:
                half = len(symbols) // 2
                chunks = [symbols[:half], symbols[half:]]
            for n, chunk in enumerate(chunks):
                out.append(
                    control.encode_subscription(
                        schema,
                        chunk,
                        stype_in=self.stype,
                        sub_id=sub_id,
                        is_last=n == len(chunks) - 1,
                    )
                )
        out.append(self.start_line.encode() + b"\n")
        return b"".join(out)

    def record_bytes(self, rate: float) -> float:
        """Bytes per second the subscription receives at ``rate`` (ALL_SYMBOLS only)."""
        per = {"trades": 0.25 * 48, "mbp-1": 0.75 * 80}
        return rate * sum(per[s] for s in self.schemas)


def symbol_sets(instruments: int) -> dict[str, tuple[str, tuple[str, ...], tuple[int, ...]]]:
    """A few fixed filtered subscriptions: (stype_in, symbols as sent, instrument ids)."""
    table = instrument_table(instruments)
    syms = [s for s, _ in table]
    ids = [i for _, i in table]
    n = len(table)

    def pick(idx: list[int]) -> list[int]:
        return sorted({i for i in idx if 0 <= i < n})

    top = pick([0, 1, 2])
    mid = pick(list(range(10, 20)))
    tail = pick(list(range(n // 2, n // 2 + 30)))
    by_id = pick([3, 7, 15, 31, 63])
    edge = pick([0, n - 1])
    return {
        "top3": ("raw_symbol", tuple(syms[i] for i in top), tuple(ids[i] for i in top)),
        # lower case: the gateway upper-cases raw symbols
        "mid10": ("raw_symbol", tuple(syms[i].lower() for i in mid), tuple(ids[i] for i in mid)),
        "tail30": ("raw_symbol", tuple(syms[i] for i in tail), tuple(ids[i] for i in tail)),
        "ids5": ("instrument_id", tuple(str(ids[i]) for i in by_id), tuple(ids[i] for i in by_id)),
        "edge+unknown": ("raw_symbol", tuple(syms[i] for i in edge), tuple(ids[i] for i in edge)),
    }


def reference_plan() -> Plan:
    return Plan(kind="reference", cls="reference", schemas=("trades", "mbp-1"), keep=True)


def healthy_plan(rng: random.Random, cfg: SoakConfig, remaining: float) -> Plan | None:
    if remaining < 2.5:
        return None
    life = min(rng.uniform(cfg.min_life, cfg.max_life), remaining - 1.5)
    x = rng.random()
    plan: Plan
    if x < 0.25:
        plan = Plan("healthy", "all trades+mbp-1", ("trades", "mbp-1"))
    elif x < 0.40:
        plan = Plan("healthy", "all mbp-1", ("mbp-1",))
    elif x < 0.50:
        plan = Plan("healthy", "all trades", ("trades",))
    else:
        sets = symbol_sets(cfg.instruments)
        name = rng.choice(sorted(sets))
        stype, symbols, iids = sets[name]
        schemas = rng.choice([("trades",), ("mbp-1",), ("trades", "mbp-1")])
        plan = Plan(
            "healthy",
            "filtered",
            schemas,
            symbols=symbols,
            stype=stype,
            iids=iids,
            unknown=(UNKNOWN_SYMBOL,) if name == "edge+unknown" else (),
            chunked=rng.random() < 0.5,
        )
    plan.lifetime = life
    plan.zstd = rng.random() < 0.1
    plan.ts_out = rng.random() < 0.1
    plan.leave = rng.choices(["drain", "close", "reset"], weights=[6, 2, 2])[0]
    plan.pipelined = rng.random() < 0.2
    plan.start_line = rng.choice(["start_session", "start_session=0"])
    return plan


def skip_stall_plan(rng: random.Random, cfg: SoakConfig, remaining: float) -> Plan | None:
    pre = rng.uniform(0.5, 1.5)
    stall = rng.uniform(cfg.skip_stall_min, cfg.skip_stall_max)
    post = rng.uniform(1.5, 3.0)
    if remaining < pre + stall + post + 2.0:
        return healthy_plan(rng, cfg, remaining)
    # mbp-1 only: no behaviour (the default is skip for mbp-1), skip, or the old alias drop
    behavior = rng.choice([None, None, "skip", "drop"])
    return Plan(
        "skip_stall",
        "stalled skip",
        ("mbp-1",),
        behavior=behavior,
        rcvbuf=cfg.stall_rcvbuf,
        pre=pre,
        stall=stall,
        post=post,
        leave="drain",
        poll=False,
    )


def warn_cut_seconds(plan: Plan, cfg: SoakConfig) -> float:
    """Seconds a stalled ALL_SYMBOLS session needs to go over the hard cap."""
    return (cfg.hard_cap_bytes + 2 * cfg.sndbuf) / plan.record_bytes(cfg.rate)


def warn_stall_plan(rng: random.Random, cfg: SoakConfig, remaining: float) -> Plan | None:
    # All of these are effectively ``warn``: explicit warn on mbp-1, the default with trades
    # in the mix, and skip asked for a mix that includes trades (trades never skip).
    schemas, behavior = rng.choice(
        [(("mbp-1",), "warn"), (("trades", "mbp-1"), None), (("trades", "mbp-1"), "skip")]
    )
    plan = Plan(
        "warn_stall",
        "stalled warn",
        schemas,
        behavior=behavior,
        rcvbuf=cfg.stall_rcvbuf,
        pre=rng.uniform(0.5, 1.5),
        post=rng.uniform(1.0, 2.0),
        leave="drain",
        poll=False,
    )
    cut_s = warn_cut_seconds(plan, cfg)
    # wait for the cut up to 2.5x the time it needs, within what is left of the run
    plan.stall = min(2.5 * cut_s + 3.0, remaining - plan.pre - 2.0)
    if plan.stall < 1.5 * cut_s + 1.0:
        return healthy_plan(rng, cfg, remaining)
    return plan


def late_warn_stall_plan(rng: random.Random, cfg: SoakConfig, remaining: float) -> Plan | None:
    plan = warn_stall_plan(rng, cfg, remaining - CUT_GRACE_S - 2.0)
    if plan is None or plan.kind != "warn_stall":
        return healthy_plan(rng, cfg, remaining)
    plan.late = True
    plan.cls = "stalled warn late"
    return plan


PLANNERS: dict[str, Callable[[random.Random, SoakConfig, float], Plan | None]] = {
    "healthy": healthy_plan,
    "skip_stall": skip_stall_plan,
    "warn_stall": warn_stall_plan,
    "warn_stall_late": late_warn_stall_plan,
}


# --- reading: runs of same-size records, checked with numpy --------------------------------


class StreamError(Exception):
    pass


class Tracker:
    """Everything one session learnt from its stream, and what was wrong with it."""

    def __init__(self, plan: Plan) -> None:
        self.rtypes = np.array(sorted(SCHEMA_RTYPE[s] for s in plan.schemas), dtype=np.uint8)
        self.iids = None if plan.iids is None else np.array(sorted(plan.iids), dtype=np.uint32)
        self.contiguous = plan.contiguous
        self.keep = plan.keep
        self.first = -1
        self.last = -1
        self.data_records = 0
        #: rtype -> [count, sum, sum of squares] of sequence numbers (mod 2**64)
        self.fp: dict[int, list[int]] = {int(r): [0, 0, 0] for r in self.rtypes}
        self.kept: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        self.violations: list[str] = []
        self.n_violations = 0
        self.system: Counter[int] = Counter()
        self.errors: list[tuple[int, str]] = []
        self.unresolved: list[str] = []
        self.mappings = 0
        self.skip_pending = 0
        self.skip_notices = 0
        self.skipped_reported = 0
        #: (last sequence before, first sequence after, N announced); -1 / -1 when unknown
        self.gaps: list[tuple[int, int, int]] = []
        self.cut_error: str | None = None
        self.warnings_at: list[float] = []

    def violation(self, text: str) -> None:
        self.n_violations += 1
        if len(self.violations) < 10:
            self.violations.append(text)

    def on_data(self, rows: np.ndarray) -> None:
        rt = rows[:, 1]
        iid = np.ascontiguousarray(rows[:, 4:8]).view("<u4").ravel()
        seq = np.ascontiguousarray(rows[:, SEQ_OFFSET : SEQ_OFFSET + 4]).view("<u4").ravel()
        seq = seq.astype(np.int64)
        n = len(seq)
        if self.cut_error is not None:
            self.violation(f"{n} data records after the disconnect ErrorMsg")
        bad = ~np.isin(rt, self.rtypes)
        if bad.any():
            self.violation(f"rtype {int(rt[bad][0]):#x} not subscribed")
        if self.iids is not None:
            bad = ~np.isin(iid, self.iids)
            if bad.any():
                self.violation(f"instrument {int(iid[bad][0])} not subscribed")
        head = int(seq[0])
        if self.last >= 0:
            if self.skip_pending:
                self.gaps.append((self.last, head, self.skip_pending))
                self.skip_pending = 0
                ok = head > self.last
            else:
                ok = head == self.last + 1 if self.contiguous else head > self.last
            if not ok:
                self.violation(f"sequence {self.last} -> {head}")
        else:
            self.first = head
            if self.skip_pending:
                self.gaps.append((-1, head, self.skip_pending))
                self.skip_pending = 0
        if n > 1:
            d = np.diff(seq)
            wrong = d != 1 if self.contiguous else d <= 0
            if wrong.any():
                i = int(np.argmax(wrong))
                self.violation(f"sequence {int(seq[i])} -> {int(seq[i + 1])}")
        self.last = int(seq[-1])
        self.data_records += n
        r0 = int(rt[0])
        if bool((rt == r0).all()):
            self._add(r0, seq)
        else:
            for r in np.unique(rt).tolist():
                self._add(int(r), seq[rt == r])
        if self.keep:
            ts = np.ascontiguousarray(rows[:, TS_RECV_OFFSET : TS_RECV_OFFSET + 8]).view("<u8")
            self.kept.append((seq, rt.copy(), iid.copy(), ts.ravel()))

    def _add(self, rtype: int, seq: np.ndarray) -> None:
        fp = self.fp.setdefault(rtype, [0, 0, 0])
        u = seq.astype(np.uint64)
        fp[0] += len(seq)
        fp[1] = (fp[1] + int(u.sum(dtype=np.uint64))) & MASK64
        fp[2] = (fp[2] + int((u * u).sum(dtype=np.uint64))) & MASK64

    def on_gateway(self, rec: bytes) -> None:
        rtype = rec[1]
        if rtype == RTYPE_SYSTEM:
            code = rec[319]
            self.system[code] += 1
            if code == SYS_WARNING:
                self.warnings_at.append(time.monotonic())
        elif rtype == RTYPE_ERROR:
            code = rec[318]
            text = rec[16:318].split(b"\0", 1)[0].decode("utf-8", "replace")
            if code == ERR_SKIPPED:
                m = SKIP_TEXT.fullmatch(text)
                if m is None or int(m.group(1)) <= 0:
                    self.violation(f"bad skip notice {text!r}")
                    return
                self.skip_pending += int(m.group(1))
                self.skip_notices += 1
                self.skipped_reported += int(m.group(1))
            elif code == ERR_UNRESOLVED:
                self.unresolved.append(text)
            else:
                self.errors.append((code, text))
                if code == ERR_INTERNAL:
                    self.cut_error = text
        elif rtype == RTYPE_MAPPING:
            self.mappings += 1

    def finish(self) -> None:
        if self.skip_pending:
            # A notice with no data after it: its gap has no known end.
            self.gaps.append((self.last, -1, self.skip_pending))
            self.skip_pending = 0

    def arrays(self) -> Ref:
        if not self.kept:
            return Ref(np.zeros(0, np.int64), np.zeros(0, np.uint8), np.zeros(0, np.uint32))
        seq, rt, iid, ts = zip(*self.kept, strict=True)
        return Ref(np.concatenate(seq), np.concatenate(rt), np.concatenate(iid), np.concatenate(ts))


@dataclass
class Ref:
    """The reference stream: every trades and mbp-1 record of the run, in order."""

    seq: np.ndarray
    rt: np.ndarray
    iid: np.ndarray
    ts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))

    def __post_init__(self) -> None:
        # ts_recv is only nearly monotonic (tick spans overlap by a little): monotone
        # envelopes give conservative "published before" / "published after" cut points
        self.ts_before = np.maximum.accumulate(self.ts) if len(self.ts) else self.ts
        self.ts_after = np.minimum.accumulate(self.ts[::-1])[::-1] if len(self.ts) else self.ts


def scan(buf: bytes, off: int, tracker: Tracker) -> int:
    """Feed the whole records of ``buf[off:]`` to ``tracker``; returns the offset after them.

    Records come in runs of one size (a chunk of trades, a chunk of mbp-1, a gateway
    record): a run is found with one vectorised comparison of the length bytes.
    """
    arr = np.frombuffer(buf, dtype=np.uint8)
    total = len(arr)
    while off < total:
        size = int(arr[off]) * 4
        if size < 16:
            raise StreamError(f"record length {size} < 16 at offset {off}")
        count = (total - off) // size
        if count == 0:
            break
        rows = arr[off : off + count * size].reshape(count, size)
        if count > 1:
            other = np.flatnonzero(rows[:, 0] != arr[off])
            if other.size:
                count = int(other[0])
                rows = rows[:count]
        ours = np.isin(rows[:, 1], GATEWAY_RTYPES)
        if not ours.any():
            tracker.on_data(rows)  # the common case: a run of market data
        else:  # gateway records (few), one by one and in order
            for i in range(count):
                if ours[i]:
                    tracker.on_gateway(rows[i].tobytes())
                else:
                    tracker.on_data(rows[i : i + 1])
        off += count * size
    return off


# --- one session ---------------------------------------------------------------------------


@dataclass
class Env:
    """What sessions of one process share."""

    port: int
    key: str
    dataset: str = DATASET
    poll_s: float = 0.05
    #: session ids the gateway logged as cut, and waiters for them
    cut_ids: set[int] = field(default_factory=set)
    cut_waiters: dict[int, asyncio.Event] = field(default_factory=dict)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    def cut_event(self, session_id: int) -> asyncio.Event:
        ev = self.cut_waiters.setdefault(session_id, asyncio.Event())
        if session_id in self.cut_ids:
            ev.set()
        return ev

    def saw_cut(self, session_id: int) -> None:
        self.cut_ids.add(session_id)
        ev = self.cut_waiters.get(session_id)
        if ev is not None:
            ev.set()


def auth_line(
    challenge: str,
    key: str,
    dataset: str,
    *,
    ts_out: bool = False,
    compression: str | None = None,
    slow_reader_behavior: str | None = None,
) -> bytes:
    """The soak's authentication request (no ``compression`` key unless given)."""
    return control.encode_auth(
        control.cram_response(challenge, key),
        dataset,
        ts_out=ts_out,
        compression=compression,
        slow_reader_behavior=slow_reader_behavior,
        client=SOAK_CLIENT,
    )


class SoakSession(asyncio.Protocol):
    """One subscriber: handshake, then records checked run by run; sans threads."""

    def __init__(self, plan: Plan, env: Env) -> None:
        self.plan = plan
        self.env = env
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.tracker = Tracker(plan)
        self.phase = 0  # 0 greeting, 1 challenge, 2 auth reply, 3 Metadata, 4 records
        self.text = b""
        self.rest = b""
        self.session_id = 0
        self.decomp = FrameDecompressor() if plan.zstd else None
        self.started: asyncio.Future[bool] = self.loop.create_future()
        self.lost: asyncio.Future[None] = self.loop.create_future()
        self.eof = False
        self.lost_exc = ""
        self.stalled = False
        self._resume: asyncio.TimerHandle | None = None
        self.bytes_in = 0
        self.failure: str | None = None
        self.t_join = self.t_start = self.t_leave = self.t_end = 0.0
        self.stall_from = self.stall_to = 0.0
        self.records_at_stall = 0
        self.left = ""
        self.lost_early = False
        self.cut_seen = False
        self.start_wall = self.leave_wall = 0  # time.time_ns() at Metadata / at leaving

    # --- protocol callbacks ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        try:
            if self.phase < 3:
                self._text(data)
            else:
                self._binary(data)
        except StreamError as exc:
            self._fail(str(exc))
            return
        except Exception as exc:  # noqa: BLE001 - a decoder error is the gateway's fault too
            self._fail(f"{type(exc).__name__}: {exc}")
            return
        tr = self.transport
        if self.phase < 3 or not self.plan.poll or self.env.poll_s <= 0:
            return
        if tr is not None and not tr.is_closing():
            tr.pause_reading()
            if self._resume is None and not self.stalled:
                self._resume = self.loop.call_later(self.env.poll_s, self._poll)

    def eof_received(self) -> bool | None:
        self.eof = True
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            self.lost_exc = type(exc).__name__
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        self.t_end = time.monotonic()
        if not self.started.done():
            self.started.set_result(False)
        if not self.lost.done():
            self.lost.set_result(None)

    # --- reading ---

    def _poll(self) -> None:
        self._resume = None
        tr = self.transport
        if tr is not None and not self.stalled and not tr.is_closing():
            tr.resume_reading()

    def stall(self) -> None:
        self.stalled = True
        self.stall_from = time.monotonic()
        self.records_at_stall = self.tracker.data_records
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        tr = self.transport
        if tr is not None and not tr.is_closing():
            tr.pause_reading()

    def unstall(self) -> None:
        if self.stalled:
            self.stall_to = time.monotonic()
        self.stalled = False
        tr = self.transport
        if tr is not None and not tr.is_closing() and self._resume is None:
            tr.resume_reading()

    def _fail(self, text: str) -> None:
        if self.failure is None:
            self.failure = text
        if not self.started.done():
            self.started.set_result(False)
        if self.transport is not None:
            self.transport.abort()

    def _text(self, data: bytes) -> None:
        self.text += data
        plan, env = self.plan, self.env
        while self.phase < 3:
            nl = self.text.find(b"\n")
            if nl < 0:
                if len(self.text) > 4096:
                    raise StreamError("handshake line longer than 4096 bytes")
                return
            line = self.text[:nl].decode("ascii", "replace")
            self.text = self.text[nl + 1 :]
            if self.phase == 0:
                if not line.startswith("lsg_version="):
                    raise StreamError(f"bad greeting {line!r}")
                self.phase = 1
            elif self.phase == 1:
                if not line.startswith("cram="):
                    raise StreamError(f"no challenge: {line!r}")
                out = auth_line(
                    line[5:],
                    env.key,
                    env.dataset,
                    ts_out=plan.ts_out,
                    compression="zstd" if plan.zstd else "none",
                    slow_reader_behavior=plan.behavior,
                )
                if plan.pipelined:
                    out += plan.lines()
                assert self.transport is not None
                self.transport.write(out)
                self.phase = 2
            else:
                fields = dict(t.partition("=")[::2] for t in line.split("|"))
                if fields.get("success") != "1":
                    raise StreamError(f"authentication refused: {line!r}")
                self.session_id = int(fields["session_id"])
                if not plan.pipelined:
                    assert self.transport is not None
                    self.transport.write(plan.lines())
                self.phase = 3
                rest, self.text = self.text, b""
                if rest:
                    if not plan.pipelined:
                        raise StreamError("bytes after the auth reply before start_session")
                    self._binary(rest)

    def _binary(self, data: bytes) -> None:
        if self.decomp is not None:
            data = self.decomp.decompress(data)
        buf = self.rest + data if self.rest else data
        off = 0
        if self.phase == 3:
            if len(buf) < 8:
                self.rest = buf
                return
            if buf[:3] != b"DBN" or buf[3] != 3:
                raise StreamError(f"stream does not start with a DBN v3 header: {buf[:8]!r}")
            total = 8 + int.from_bytes(buf[4:8], "little")
            if len(buf) < total:
                self.rest = buf
                return
            dataset = buf[8:24].split(b"\0", 1)[0].decode()
            if dataset != self.env.dataset or buf[52] != int(self.plan.ts_out):
                raise StreamError(f"bad Metadata: dataset {dataset!r} ts_out {buf[52]}")
            off = total
            self.phase = 4
            self.t_start = time.monotonic()
            self.start_wall = time.time_ns()
            if not self.started.done():
                self.started.set_result(True)
        used = scan(buf, off, self.tracker)
        self.rest = buf[used:]

    # --- the scenario ---

    async def _wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True if the connection was lost meanwhile."""
        if seconds > 0 and not self.lost.done():
            await asyncio.wait([self.lost], timeout=seconds)
        return self.lost.done()

    async def run(self) -> None:
        plan, env = self.plan, self.env
        self.t_join = time.monotonic()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if plan.rcvbuf:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, plan.rcvbuf)
            sock.setblocking(False)
            await asyncio.wait_for(self.loop.sock_connect(sock, (HOST, env.port)), 10)
            await self.loop.create_connection(lambda: self, sock=sock)
        except (OSError, TimeoutError) as exc:
            sock.close()
            self.failure = f"connect: {exc!r}"
            return
        try:
            ok = await asyncio.wait_for(asyncio.shield(self.started), 15)
        except TimeoutError:
            ok = False
            self._fail("no Metadata within 15 s of connecting")
        if not ok:
            if self.failure is None:
                self.failure = f"closed during the handshake (phase {self.phase})"
            await self._wait(5)
            return
        await self._scenario()
        if self.lost.done():
            self.lost_early = not self.left
        else:
            await self.leave(plan.leave)
        self.tracker.finish()

    async def _scenario(self) -> None:
        plan, env = self.plan, self.env
        if plan.kind == "healthy":
            await self._wait(plan.lifetime)
        elif plan.kind == "reference":
            stop: asyncio.Future[Any] = asyncio.ensure_future(env.stop.wait())
            await asyncio.wait([stop, self.lost], return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
        elif plan.kind == "skip_stall":
            if await self._wait(plan.pre):
                return
            self.stall()
            if await self._wait(plan.stall):
                return
            self.unstall()
            await self._wait(plan.post)
        elif plan.kind == "warn_stall":
            if await self._wait(plan.pre):
                return
            self.stall()
            cut: asyncio.Future[Any] = asyncio.ensure_future(env.cut_event(self.session_id).wait())
            await asyncio.wait(
                [cut, self.lost], timeout=plan.stall, return_when=asyncio.FIRST_COMPLETED
            )
            cut.cancel()
            self.cut_seen = self.session_id in env.cut_ids
            if self.cut_seen and plan.late:
                await self._wait(CUT_GRACE_S + 2.0)  # the gateway gives up on us meanwhile
            self.unstall()
            if self.cut_seen:
                self.left = "cut"
                await self._wait(20)  # read what is buffered, then EOF
            else:
                await self._wait(plan.post)

    async def leave(self, mode: str) -> None:
        tr = self.transport
        assert tr is not None
        self.left = mode
        self.t_leave = time.monotonic()
        self.leave_wall = time.time_ns()
        if mode == "drain":
            self.unstall()
            if tr.can_write_eof():
                tr.write_eof()
            if not await self._wait(20):
                self.failure = self.failure or "no EOF within 20 s of half-closing"
                tr.abort()
        elif mode == "reset":
            sock = tr.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            tr.abort()
        else:
            tr.close()
        await self._wait(5)

    def summary(self) -> dict[str, Any]:
        t = self.tracker
        return {
            "plan": dataclasses.asdict(self.plan),
            "session_id": self.session_id,
            "failure": self.failure,
            "t_join": self.t_join,
            "t_start": self.t_start,
            "t_end": self.t_end,
            "start_wall": self.start_wall,
            "leave_wall": self.leave_wall,
            "stall_from": self.stall_from,
            "stall_to": self.stall_to,
            "records_at_stall": self.records_at_stall,
            "bytes_in": self.bytes_in,
            "eof": self.eof,
            "lost_exc": self.lost_exc,
            "left": self.left,
            "lost_early": self.lost_early,
            "cut_seen": self.cut_seen,
            "first": t.first,
            "last": t.last,
            "records": t.data_records,
            "fp": t.fp,
            "violations": t.violations,
            "n_violations": t.n_violations,
            "system": dict(t.system),
            "errors": t.errors,
            "unresolved": t.unresolved,
            "mappings": t.mappings,
            "skip_notices": t.skip_notices,
            "skipped_reported": t.skipped_reported,
            "gaps": t.gaps,
            "warnings_during_stall": sum(
                1 for w in t.warnings_at if self.stall_from and w >= self.stall_from
            ),
        }


# --- hostile clients -----------------------------------------------------------------------

HOSTILE_ACTIONS = (
    "garbage_line",
    "garbage_open",
    "truncated",
    "oversize",
    "bad_auth",
    "auth_garbage",
    "pipelined_garbage",
    "post_start_garbage",
    "stream_reset",
    "half_close",
    "reset_early",
    "drip",
    "stall_close",
    "bad_dataset",
    "many_subs",
    "idle",
)


class Hostile(AsyncRawClient):
    """A raw client that misbehaves on purpose (``tests.support.wire.AsyncRawClient``
    plus random garbage)."""

    def __init__(
        self, port: int, key: str, dataset: str, rng: random.Random, max_line: int = 128 * 1024
    ) -> None:
        super().__init__(port, key, dataset, host=HOST, client_name=SOAK_CLIENT)
        self.rng = rng
        self.max_line = max_line

    def garbage(self, size: int, newline: bool) -> bytes:
        data = self.rng.randbytes(size)
        if not newline:
            return data.replace(b"\n", b" ")
        return data + b"\n"


async def _hostile_action(h: Hostile, action: str) -> tuple[str, bool]:
    """Run one hostile action on an open connection; (outcome, as expected?)."""
    rng = h.rng
    if action == "garbage_line":
        if await h.greeting() is None:
            return "no greeting", False
        await h.send(h.garbage(rng.randint(0, 2000), newline=True))
        rest = await h.to_end()
        ok = rest.startswith(b"success=0|error=") or (h.ended == "reset" and not rest)
        return f"{rest[:40]!r} {h.ended}", ok and h.ended != "timeout"
    if action == "garbage_open":
        await h.send(h.garbage(rng.randint(1, 1000), newline=False))
        if rng.random() < 0.5:
            h.close()
            return "closed", True
        h.half_close()
        await h.to_end()
        return f"half-closed {h.ended}", h.ended in ("eof", "reset")
    if action == "truncated":
        challenge = await h.greeting()
        if challenge is None:
            return "no greeting", False
        line = auth_line(challenge, h.key, h.dataset)
        await h.send(line[: rng.randint(1, len(line) - 1)])
        how = rng.choice(["close", "reset", "half"])
        if how == "close":
            h.close()
        elif how == "reset":
            h.reset()
        else:
            h.half_close()
            await h.to_end()
            return f"truncated+half {h.ended}", h.ended in ("eof", "reset")
        return f"truncated+{how}", True
    if action == "oversize":
        if await h.greeting() is None:
            return "no greeting", False
        size = h.max_line + rng.randint(1, 64 * 1024)
        sent = await h.send(b"A" * size + (b"\n" if rng.random() < 0.5 else b""))
        rest = await h.to_end()
        ok = rest.startswith(b"success=0|error=control line longer than") or (
            h.ended == "reset" and not rest
        )
        return f"{rest[:40]!r} sent={sent} {h.ended}", ok and h.ended != "timeout"
    if action == "bad_auth":
        challenge = await h.greeting()
        if challenge is None:
            return "no greeting", False
        bad_key = "db-" + "".join(rng.choice("ABCDEFGH") for _ in range(29))
        await h.send(auth_line(challenge, bad_key, h.dataset))
        rest = await h.to_end()
        return f"{rest[:40]!r} {h.ended}", rest.startswith(b"success=0|error=") and (
            h.ended in ("eof", "reset")
        )
    if action in ("auth_garbage", "pipelined_garbage"):
        challenge = await h.greeting()
        if challenge is None:
            return "no greeting", False
        junk = h.garbage(rng.randint(0, 500), newline=True)
        if action == "pipelined_garbage":
            await h.send(auth_line(challenge, h.key, h.dataset) + junk)
            reply = await h.line()
        else:
            await h.send(auth_line(challenge, h.key, h.dataset))
            reply = await h.line()
            await h.send(junk)
        if not reply or not reply.startswith("success=1"):
            return f"auth reply {reply!r}", False
        stream = await h.to_end()
        errors = error_records(stream)
        ok = bool(errors) and errors[-1][0] == ERR_INVALID and h.ended != "timeout"  # type: ignore[index]
        return f"errors={errors} {h.ended}", ok
    if action == "post_start_garbage":
        if not await h.streaming(rng.choice(["trades", "mbp-1"])):
            return "did not stream", False
        await h.send(h.garbage(rng.randint(0, 200), newline=True))
        stream = await h.to_end()
        errors = error_records(stream)
        ok = bool(errors) and errors[-1][0] == ERR_INVALID and h.ended != "timeout"  # type: ignore[index]
        return f"errors={errors and errors[-1]} {h.ended}", ok
    if action == "stream_reset":
        if not await h.streaming():
            return "did not stream", False
        for _ in range(rng.randint(0, 3)):
            await h.recv(1.0)
        h.reset()
        return "reset mid-stream", True
    if action == "half_close":
        stage = rng.choice(["pre", "auth", "stream"])
        if stage == "pre":
            ok = await h.greeting() is not None
        elif stage == "auth":
            ok = await h.authed()
        else:
            ok = await h.streaming()
        h.half_close()
        await h.to_end()
        return f"half-close {stage} {h.ended}", ok and h.ended in ("eof", "reset")
    if action == "reset_early":
        if rng.random() < 0.5:
            await h.line()
        h.reset()
        return "reset", True
    if action == "drip":
        challenge = await h.greeting()
        if challenge is None:
            return "no greeting", False
        data = auth_line(challenge, h.key, h.dataset)
        data += control.encode_subscription(
            "trades", control.ALL_SYMBOLS, snapshot=None, is_last=None
        )
        data += control.START_SESSION
        i = 0
        while i < len(data):
            n = rng.randint(1, 9)
            await h.send(data[i : i + n])
            i += n
            await asyncio.sleep(0.002)
        reply = await h.line()
        head = h.buf or await h.recv()  # the Metadata may share a read with the reply
        h.close()
        ok = bool(reply and reply.startswith("success=1")) and bool(head) and head[:3] == b"DBN"  # type: ignore[index]
        return "dripped", ok
    if action == "stall_close":
        h.close()  # reopen with a tiny receive buffer
        await h.open(rcvbuf=4096)
        if not await h.streaming():
            return "did not stream", False
        await asyncio.sleep(rng.uniform(0.2, 1.0))
        h.close()
        return "stalled then closed", True
    if action == "bad_dataset":
        challenge = await h.greeting()
        if challenge is None:
            return "no greeting", False
        await h.send(auth_line(challenge, h.key, "NOPE." + h.garbage(4, False).hex()[:6]))
        rest = await h.to_end()
        return f"{rest[:60]!r} {h.ended}", rest.startswith(b"success=0|error=") and (
            h.ended in ("eof", "reset")
        )
    if action == "many_subs":
        if not await h.authed():
            return "auth failed", False
        lines = b"".join(
            control.encode_subscription(
                rng.choice(["trades", "mbp-1", "ohlcv-1s"]),
                [h.garbage(3, False).hex().upper(), "AAPL"],
                snapshot=None,
                sub_id=i,
                is_last=None,
            )
            for i in range(rng.randint(1, 40))
        )
        await h.send(lines + control.START_SESSION)
        head = await h.recv()
        h.close()
        return "subscribed", bool(head) and head[:3] == b"DBN"  # type: ignore[index]
    # idle: connect, say nothing, go
    await asyncio.sleep(rng.uniform(0, 0.3))
    h.close()
    return "idle", True


async def hostile_once(
    port: int,
    rng: random.Random,
    *,
    key: str,
    dataset: str,
    action: str | None = None,
    max_line: int = 128 * 1024,
) -> tuple[str, str, bool]:
    """One hostile connection: (action, outcome, gateway behaved as promised)."""
    action = action or rng.choice(HOSTILE_ACTIONS)
    h = Hostile(port, key, dataset, rng, max_line=max_line)
    try:
        await h.open()
        outcome, ok = await asyncio.wait_for(_hostile_action(h, action), 30)
    except TimeoutError:
        outcome, ok = "action timed out", False
    except OSError as exc:
        outcome, ok = f"{type(exc).__name__}: {exc}", False
    finally:
        h.close()
    return action, outcome, ok


# --- worker processes -------------------------------------------------------------------------


async def _watch_log(path: str, env: Env, until: float) -> None:
    """Follow the gateway log for "session cut id=N" (stalled warn sessions wait for it)."""
    pattern = CUT_LINE
    pos = 0
    tail = ""
    while time.monotonic() < until:
        try:
            with open(path, errors="replace") as f:
                f.seek(pos)
                text = f.read()
                pos = f.tell()
        except OSError:
            text = ""
        text = tail + text
        lines = text.split("\n")
        tail = lines.pop()
        for line in lines:
            m = pattern.search(line)
            if m:
                env.saw_cut(int(m.group(1)))
        await asyncio.sleep(0.2)


async def _slot(
    slot: int, role: str, cfg: SoakConfig, env: Env, end_at: float, out: list[SoakSession]
) -> None:
    rng = random.Random(f"{cfg.seed}:slot:{slot}")
    ramp = min(3.0, cfg.duration / 10) if role == "healthy" else 0.3
    await asyncio.sleep(rng.uniform(0, ramp))
    while True:
        plan = PLANNERS[role](rng, cfg, end_at - time.monotonic())
        if plan is None:
            return
        session = SoakSession(plan, env)
        out.append(session)
        await session.run()
        await asyncio.sleep(rng.uniform(0.0, 1.0))


async def _worker(spec: dict[str, Any]) -> dict[str, Any]:
    cfg = SoakConfig(**spec["cfg"])
    env = Env(port=spec["port"], key=spec["key"], poll_s=cfg.poll_ms / 1000)
    end_at = spec["end_at"]
    sessions: list[SoakSession] = []
    watcher = asyncio.ensure_future(_watch_log(spec["log_path"], env, end_at + 60))
    tasks = [
        asyncio.ensure_future(_slot(slot, role, cfg, env, end_at, sessions))
        for slot, role in spec["slots"]
    ]
    _, pending = await asyncio.wait(tasks, timeout=max(1.0, end_at + 45 - time.monotonic()))
    stuck = len(pending)
    for t in pending:
        t.cancel()
    for s in sessions:
        if s.transport is not None and not s.lost.done():
            s.transport.abort()
    watcher.cancel()
    await asyncio.sleep(0.1)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "index": spec["index"],
        "sessions": [s.summary() for s in sessions],
        "stuck_slots": stuck,
        "cpu_s": usage.ru_utime + usage.ru_stime,
    }


def worker_entry(spec: dict[str, Any], conn: Any) -> None:
    try:
        import uvloop

        result = uvloop.run(_worker(spec))
    except BaseException as exc:  # noqa: BLE001 - reported to the controller
        import traceback

        result = {"index": spec["index"], "crash": traceback.format_exc(), "exc": repr(exc)}
    conn.send(result)
    conn.close()


# --- the controller --------------------------------------------------------------------------


@dataclass
class SoakReport:
    lines: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    #: lines already printed while the soak ran
    printed: int = 0
    #: the tag of each failure ("" for most; "late-cut" for the late-resume promise)
    tags: list[str] = field(default_factory=list)

    def say(self, text: str = "") -> None:
        self.lines.append(text)

    def fail(self, text: str, tag: str = "") -> None:
        self.failures.append(text)
        self.tags.append(tag)

    def broken(self, *, exclude: tuple[str, ...] = (), only: str | None = None) -> list[str]:
        return [
            f
            for f, t in zip(self.failures, self.tags, strict=True)
            if t not in exclude and (only is None or t == only)
        ]

    @property
    def ok(self) -> bool:
        return not self.failures

    def text(self) -> str:
        return "\n".join(self.lines)


@dataclass
class _Run:
    cfg: SoakConfig
    pid: int
    port: int
    metrics_port: int
    log_path: str
    say: Callable[[str], None]
    fd_base: int = 0
    rss_base: int = 0
    rss_warm: int = 0
    fd_warm: int = 0
    rss_end: int = 0
    fd_end: int = 0
    samples: list[tuple[float, int, int, int, int]] = field(default_factory=list)
    hostile: list[tuple[str, str, bool]] = field(default_factory=list)
    workers: list[dict[str, Any]] = field(default_factory=list)
    reference: SoakSession | None = None
    ref_arrays: Ref | None = None
    metrics: dict[Any, float] = field(default_factory=dict)
    feed_stalls: list[str] = field(default_factory=list)
    t0: float = 0.0


async def _to_thread(fn: Callable[..., Any], *args: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


def _metrics(port: int) -> dict[Any, float]:
    from tests.integration.helpers import metric_samples

    return metric_samples(port)


def _metric(samples: dict[Any, float], name: str, **labels: str) -> float:
    from tests.integration.helpers import metric

    return metric(samples, name, **labels)


async def _hostile_loop(run: _Run, i: int, end_at: float) -> None:
    from tests.integration.helpers import KEY

    rng = random.Random(f"{run.cfg.seed}:hostile:{i}")
    while time.monotonic() < end_at - 2:
        run.hostile.append(await hostile_once(run.port, rng, key=KEY, dataset=DATASET))
        await asyncio.sleep(rng.uniform(0.05, 0.3))


async def _sampler(run: _Run, end_at: float) -> None:
    cfg = run.cfg
    warm_at = run.t0 + cfg.warmup_s
    next_print = run.t0
    last_records = -1
    last_change = time.monotonic()
    live = 0.0
    while time.monotonic() < end_at:
        now = time.monotonic()
        rss, fds = rss_kib(run.pid), fd_count(run.pid)
        ref = run.reference
        records = ref.tracker.data_records if ref is not None else 0
        if records != last_records:
            last_records, last_change = records, now
        elif now - last_change > 3.0:
            run.feed_stalls.append(f"reference got nothing for {now - last_change:.1f} s")
            last_change = now
        if not run.rss_warm and now >= warm_at:
            run.rss_warm, run.fd_warm = rss, fds
        if now >= next_print:
            try:
                m = await _to_thread(_metrics, run.metrics_port)
                live = _metric(m, "gateway_sessions", state="streaming")
            except OSError:
                pass
            next_print = now + 5.0
            if cfg.progress:
                run.say(
                    f"  t={now - run.t0:5.1f}s  rss={rss / 1024:6.1f} MiB  fds={fds:4d}  "
                    f"streaming={live:4.0f}  reference_records={records}"
                )
        run.samples.append((now - run.t0, rss, fds, records, int(live)))
        await asyncio.sleep(1.0)


def _slot_roles(cfg: SoakConfig) -> list[tuple[int, str]]:
    stalled = min(cfg.stalled, cfg.sessions)
    skip = (stalled + 1) // 2
    warn = stalled - skip
    late = 0
    if warn >= 2 and cfg.late_resume > 0:  # keep at least one ordinary warn-stall slot
        late = min(warn - 1, max(1, round(warn * cfg.late_resume)))
    roles = ["skip_stall"] * skip + ["warn_stall_late"] * late + ["warn_stall"] * (warn - late)
    roles += ["healthy"] * (cfg.sessions - stalled)
    return list(enumerate(roles))  # dealt round-robin to the workers


async def _control(run: _Run) -> None:
    from tests.integration.helpers import KEY

    cfg = run.cfg
    loop = asyncio.get_running_loop()
    run.t0 = time.monotonic()
    run.fd_base, run.rss_base = fd_count(run.pid), rss_kib(run.pid)
    env = Env(port=run.port, key=KEY, poll_s=cfg.poll_ms / 1000)
    ref = run.reference = SoakSession(reference_plan(), env)
    ref_task = loop.create_task(ref.run())
    try:
        await asyncio.wait_for(asyncio.shield(ref.started), 15)
    except TimeoutError:
        pass
    if not ref.started.done() or not ref.started.result():
        raise RuntimeError(f"the reference session did not start: {ref.failure}")
    end_at = time.monotonic() + cfg.duration
    ctx = multiprocessing.get_context("spawn")
    roles = _slot_roles(cfg)
    procs = []
    for w in range(cfg.workers):
        spec = {
            "index": w,
            "port": run.port,
            "key": KEY,
            "log_path": run.log_path,
            "end_at": end_at,
            "slots": roles[w :: cfg.workers],
            "cfg": dataclasses.asdict(cfg),
        }
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=worker_entry, args=(spec, child), daemon=True)
        proc.start()
        child.close()
        procs.append((proc, parent))
    hostile = [loop.create_task(_hostile_loop(run, i, end_at)) for i in range(cfg.hostile)]
    sampler = loop.create_task(_sampler(run, end_at + 60))

    def collect(parent: Any, deadline: float) -> dict[str, Any] | None:
        if parent.poll(max(0.0, deadline - time.monotonic())):
            try:
                return parent.recv()  # type: ignore[no-any-return]
            except EOFError:
                return None
        return None

    deadline = end_at + 75
    results = await asyncio.gather(*(_to_thread(collect, p, deadline) for _, p in procs))
    for i, ((proc, parent), res) in enumerate(zip(procs, results, strict=True)):
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
        parent.close()
        run.workers.append(res or {"index": i, "crash": f"no result (exit code {proc.exitcode})"})
    await asyncio.gather(*hostile, return_exceptions=True)
    sampler.cancel()
    env.stop.set()
    try:
        await asyncio.wait_for(ref_task, 30)
    except TimeoutError:
        ref_task.cancel()
        ref.failure = ref.failure or "reference did not finish"
    run.ref_arrays = ref.tracker.arrays()
    # every connection gone: the fd count must come back to what it was before any client
    settle = time.monotonic() + 20
    while time.monotonic() < settle and fd_count(run.pid) > run.fd_base:
        await asyncio.sleep(0.25)
    await asyncio.sleep(1.0)
    run.fd_end, run.rss_end = fd_count(run.pid), rss_kib(run.pid)
    if not run.rss_warm:
        run.rss_warm = run.rss_end
    run.metrics = await _to_thread(_metrics, run.metrics_port)


# --- verification ------------------------------------------------------------------------------

# the gateway's own per-session log lines ("id=" or "session_id=")
_END = re.compile(
    r"session end (?:session_)?id=(\d+) .*?records=(\d+) bytes=(\d+) skipped=(\d+) "
    r".*?reason=(.*)$"
)
CUT_LINE = re.compile(r"session cut (?:session_)?id=(\d+)")


def _log_ends(log: str) -> dict[int, tuple[int, int, str]]:
    out = {}
    for line in log.splitlines():
        m = _END.search(line)
        if m:
            out[int(m.group(1))] = (int(m.group(2)), int(m.group(4)), m.group(5))
    return out


def _fingerprint(seq: np.ndarray) -> list[int]:
    u = seq.astype(np.uint64)
    return [len(seq), int(u.sum(dtype=np.uint64)), int((u * u).sum(dtype=np.uint64))]


def _check_session(
    s: dict[str, Any],
    ref: Ref,
    ends: dict[int, tuple[int, int, str]],
    cfg: SoakConfig,
) -> list[str]:
    """Promises broken by one session (empty: all kept)."""
    plan = s["plan"]
    kind = plan["kind"]
    bad: list[str] = []
    if s["failure"]:
        bad.append(f"failure: {s['failure']}")
    if s["n_violations"]:
        bad.append(f"{s['n_violations']} stream violations: {s['violations'][:3]}")
    if not s["session_id"]:
        return bad
    end = ends.get(s["session_id"])
    if end is None:
        bad.append("the gateway logged no end for this session")
        sent, skipped, reason = -1, -1, ""
    else:
        sent, skipped, reason = end
    read_to_eof = s["eof"] and not s["lost_exc"]
    if sent >= 0 and not plan["late"]:
        if read_to_eof and s["records"] != sent:
            bad.append(f"read to EOF {s['records']} data records, gateway sent {sent}")
        elif s["records"] > sent:
            bad.append(f"received {s['records']} data records, gateway sent only {sent}")
    errors = [tuple(e) for e in s["errors"]]
    expected_unresolved = len(plan["unknown"]) * len(plan["schemas"])
    if len(s["unresolved"]) != expected_unresolved:
        bad.append(f"{len(s['unresolved'])} unresolved-symbol errors, {expected_unresolved} due")
    if s["system"].get(1, 0) != len(plan["schemas"]):
        bad.append(f"{s['system'].get(1, 0)} subscription acks for {len(plan['schemas'])}")
    cap_text = f"slow reader: more than {cfg.hard_cap_bytes} bytes buffered; disconnecting"
    if s["lost_early"] and (ERR_INTERNAL, cap_text) not in errors:
        bad.append(f"lost before leaving ({s['lost_exc'] or 'EOF'}), gateway reason {reason!r}")
    if kind in ("healthy", "reference"):
        if errors:
            bad.append(f"ErrorMsgs {errors[:3]}")
        if s["skip_notices"]:
            bad.append(f"{s['skip_notices']} skip notices to a warn session")
        if skipped > 0:
            bad.append(f"gateway skipped {skipped} records of a warn session")
        if s["left"] == "drain" and not s["eof"]:
            bad.append("no EOF after half-close")
        if plan["lifetime"] >= 3 and s["records"] == 0 and kind == "healthy":
            bad.append("no data records at all")
    elif kind == "skip_stall":
        stalled_fully = bool(s["stall_to"])
        if stalled_fully and not s["skip_notices"] and not s["cut_seen"]:
            if not (errors and errors[-1][0] == ERR_INTERNAL):
                bad.append(
                    f"stalled {s['stall_to'] - s['stall_from']:.1f} s, resumed, "
                    "but no 'Skipped N records' notice and no cut"
                )
        if s["system"].get(SYS_WARNING, 0):
            bad.append("slow-reader warnings to a skip session")
        if errors and not (errors[-1] == (ERR_INTERNAL, cap_text) and len(errors) == 1):
            bad.append(f"unexpected ErrorMsgs {errors[:3]}")
        if read_to_eof and skipped >= 0 and not errors and skipped != s["skipped_reported"]:
            bad.append(f"gateway skipped {skipped}, notices told {s['skipped_reported']}")
        if any(a < 0 or b < 0 for a, b, _ in s["gaps"]):
            bad.append(f"skip notice without data on both sides: {s['gaps']}")
    elif kind == "warn_stall" and plan["late"]:
        # The gateway gave up on draining it: whatever it still gets, the end must not look
        # like a normal end of stream (a clean EOF with no disconnect ErrorMsg).
        if not (s["cut_seen"] or s["left"] == "cut"):
            if s["stall_to"]:
                bad.append("stalled past the hard cap but never cut")
        elif errors != [(ERR_INTERNAL, cap_text)] and read_to_eof:
            bad.append(
                f"cut, did not drain within the {CUT_GRACE_S:g} s grace, then saw a clean EOF "
                f"without the disconnect ErrorMsg: {sent - s['records']} records and the notice "
                "lost silently"
            )
        return bad
    elif kind == "warn_stall":
        if s["warnings_during_stall"] < 1:
            bad.append("no SLOW_READER_WARNING while stalled")
        if s["skip_notices"] or (skipped > 0):
            bad.append(f"skipped records of a warn session ({skipped})")
        if s["cut_seen"] or s["left"] == "cut":
            if errors != [(ERR_INTERNAL, cap_text)]:
                bad.append(f"cut, but the ErrorMsgs were {errors[:3]}")
            if not reason.startswith("slow_reader_cap"):
                bad.append(f"cut, but the gateway's end reason is {reason!r}")
            if not s["eof"]:
                bad.append("cut, but the stream did not end cleanly after the ErrorMsg")
        elif s["stall_to"]:
            cut_s = warn_cut_seconds(Plan(**plan), cfg)
            stalled = s["stall_to"] - s["stall_from"]
            if stalled >= 1.5 * cut_s + 1.0:
                bad.append(f"stalled {stalled:.1f} s (over the cap after ~{cut_s:.1f} s), not cut")
    # completeness against the reference stream
    if kind != "reference":
        bad += _against_reference(s, ref)
    return bad


def _subset(plan: dict[str, Any], rt: np.ndarray, iid: np.ndarray) -> np.ndarray:
    """Which reference records a session's subscription covers."""
    rtypes = np.array([SCHEMA_RTYPE[x] for x in plan["schemas"]], dtype=np.uint8)
    want = np.isin(rt, rtypes)
    if plan["iids"] is not None:
        want &= np.isin(iid, np.array(plan["iids"], dtype=np.uint32))
    return want


def _against_reference(s: dict[str, Any], ref: Ref) -> list[str]:
    """The session's records against the reference stream (see the module docstring)."""
    plan = s["plan"]
    if not len(ref.seq):
        return ["no reference stream"]
    base = int(ref.seq[0])
    bad: list[str] = []
    if s["records"]:
        first, last = s["first"], s["last"]
        if first < base or last > int(ref.seq[-1]):
            return [f"range {first}..{last} outside the reference {base}..{int(ref.seq[-1])}"]
        sl = slice(first - base, last - base + 1)
        seq, rt = ref.seq[sl], ref.rt[sl]
        want = _subset(plan, rt, ref.iid[sl])
        for a, b, n in s["gaps"]:
            if a < 0 or b < 0:
                continue
            in_gap = want & (seq > a) & (seq < b)
            count = int(np.count_nonzero(in_gap))
            if count != n:
                bad.append(f"skip notice said {n} between {a} and {b}, the reference has {count}")
            want &= ~in_gap
        for r in sorted({SCHEMA_RTYPE[x] for x in plan["schemas"]}):
            exp = _fingerprint(seq[want & (rt == r)])
            got = s["fp"].get(r, s["fp"].get(str(r), [0, 0, 0]))
            if [int(x) for x in got] != exp:
                bad.append(
                    f"rtype {r:#x} between sequence {first} and {last}: received {got[0]} "
                    f"records, the reference has {exp[0]}"
                    + ("" if got[0] != exp[0] else " (same count, different records)")
                )
    if plan["kind"] == "healthy" and len(ref.ts) == len(ref.seq):
        bad += _edges(s, ref, base)
    return bad


def _edges(s: dict[str, Any], ref: Ref, base: int) -> list[str]:
    """Nothing missing before the first or after the last record received: every record of
    the subscription published EDGE_NS after the session started and EDGE_NS before it left
    is there (the reference's ts_recv is the feed's wall clock, as are the session's times)."""
    if not s["start_wall"] or s["left"] not in ("drain", "close", "reset"):
        return []
    plan = s["plan"]
    lo = int(np.searchsorted(ref.ts_after, s["start_wall"] + EDGE_NS, side="left"))
    hi = int(np.searchsorted(ref.ts_before, s["leave_wall"] - EDGE_NS, side="right"))
    if lo >= hi:
        return []
    out = []
    if s["records"]:
        windows = [
            (lo, min(hi, s["first"] - base), "before its first record"),
            (max(lo, s["last"] - base + 1), hi, "after its last record"),
        ]
    else:
        windows = [(lo, hi, "at all")]
    for a, b, where in windows:
        if a < b:
            n = int(np.count_nonzero(_subset(plan, ref.rt[a:b], ref.iid[a:b])))
            if n:
                out.append(
                    f"{n} records of its subscription, published while it was connected, "
                    f"missing {where}"
                )
    return out


def _mib(kib: int) -> str:
    return f"{kib / 1024:.1f} MiB"


def _report(run: _Run, rep: SoakReport, log: str, exit_code: int | None) -> None:
    cfg = run.cfg
    ends = _log_ends(log)
    ref = run.reference
    assert ref is not None
    sessions: list[dict[str, Any]] = []
    for w in run.workers:
        if "crash" in w:
            rep.fail(f"worker {w['index']} crashed: {w['crash']}")
            continue
        if w.get("stuck_slots"):
            rep.fail(f"worker {w['index']}: {w['stuck_slots']} slots did not finish in time")
        sessions += w["sessions"]
    ref_summary = ref.summary()
    ref_arrays = run.ref_arrays
    assert ref_arrays is not None
    # the reference itself: contiguous from start to end, never told anything bad
    ref_bad = _check_session(ref_summary, ref_arrays, ends, cfg)
    for b in ref_bad:
        rep.fail(f"reference session {ref.session_id}: {b}")
    rep.stats["reference_records"] = ref.tracker.data_records
    rep.say()
    rep.say(
        f"reference session: {ref.tracker.data_records} records, sequence "
        f"{ref.tracker.first}..{ref.tracker.last} "
        f"({'contiguous' if not ref.tracker.n_violations else 'NOT contiguous'})"
    )
    # per session
    by_class: dict[str, Counter[str]] = defaultdict(Counter)
    reasons: dict[str, Counter[str]] = defaultdict(Counter)
    broken: list[tuple[str, str]] = []  # (text, tag)
    for s in sessions:
        cls = s["plan"]["cls"]
        c = by_class[cls]
        c["sessions"] += 1
        c["received"] += s["records"]
        c["MiB in"] += s["bytes_in"]
        end = ends.get(s["session_id"])
        if end is not None:
            c["sent"] += end[0]
            c["skipped"] += end[1]
            reasons[cls][end[2].split(":", 1)[0]] += 1
        c["notices"] += s["skip_notices"]
        c["warnings"] += s["system"].get(SYS_WARNING, 0)
        c["cut"] += int(s["left"] == "cut")
        c["zstd"] += int(s["plan"]["zstd"])
        c["ts_out"] += int(s["plan"]["ts_out"])
        problems = _check_session(s, ref_arrays, ends, cfg)
        if problems:
            c["BROKEN"] += 1
            p = s["plan"]
            broken.append(
                (
                    f"session {s['session_id']} [{p['cls']} {','.join(p['schemas'])} "
                    f"behavior={p['behavior']} zstd={p['zstd']} ts_out={p['ts_out']} "
                    f"leave={p['leave']}]: " + "; ".join(problems),
                    "late-cut" if p["late"] else "",
                )
            )
    total = Counter[str]()
    rep.say()
    head = (
        f"{'class':<18}{'sessions':>9}{'sent(gw)':>12}{'received':>12}{'skipped':>10}"
        f"{'notices':>8}{'warnings':>9}{'cut':>5}{'zstd':>5}{'ts_out':>7}{'MiB in':>9}{'BROKEN':>7}"
    )
    rep.say(head)
    rep.say("-" * len(head))
    order = ["all trades+mbp-1", "all mbp-1", "all trades", "filtered", "stalled skip"]
    order += ["stalled warn", "stalled warn late"]
    for cls in order + sorted(set(by_class) - set(order)):
        row = by_class.get(cls)
        if not row:
            continue
        total.update(row)
        rep.say(
            f"{cls:<18}{row['sessions']:>9}{row['sent']:>12}{row['received']:>12}"
            f"{row['skipped']:>10}{row['notices']:>8}{row['warnings']:>9}{row['cut']:>5}"
            f"{row['zstd']:>5}{row['ts_out']:>7}{row['MiB in'] / 2**20:>9.0f}{row['BROKEN']:>7}"
        )
    rep.say("-" * len(head))
    rep.say(
        f"{'total':<18}{total['sessions']:>9}{total['sent']:>12}{total['received']:>12}"
        f"{total['skipped']:>10}{total['notices']:>8}{total['warnings']:>9}{total['cut']:>5}"
        f"{total['zstd']:>5}{total['ts_out']:>7}{total['MiB in'] / 2**20:>9.0f}"
        f"{total['BROKEN']:>7}"
    )
    rep.stats["classes"] = {k: dict(v) for k, v in by_class.items()}
    rep.say("(sent/skipped: the gateway's own per-session log; received: data records read)")
    rep.say()
    rep.say("session end reasons (gateway log), per class:")
    for cls in order + sorted(set(reasons) - set(order)):
        if cls in reasons:
            rep.say(f"  {cls:<18} " + ", ".join(f"{k}={v}" for k, v in reasons[cls].most_common()))
    # skip episodes: one expected per stall; a new gap that opens within 0.1 s of feed time
    # after the previous resume means the reader was skipped again while catching up
    skip_sessions = [s for s in sessions if s["plan"]["kind"] == "skip_stall"]
    stalls = sum(1 for s in skip_sessions if s["stall_to"])
    episodes = sum(len(s["gaps"]) for s in skip_sessions)
    window = int(cfg.rate * 0.1)
    reskips = sum(
        1
        for s in skip_sessions
        for (_, b0, _), (a1, _, _) in zip(s["gaps"], s["gaps"][1:], strict=False)
        if 0 <= a1 - b0 <= window
    )
    rep.stats["skip_episodes"] = (stalls, episodes, reskips)
    rep.say(
        f"skip sessions: {stalls} stalls, {episodes} skip episodes (notices), {reskips} of "
        f"them re-skips within 0.1 s (feed time) of the previous resume"
    )
    for text, tag in broken[:40]:
        rep.fail(text, tag)
    if len(broken) > 40:
        rep.fail(f"... and {len(broken) - 40} more broken sessions")
    if total["sessions"] < cfg.sessions:
        rep.fail(f"only {total['sessions']} sessions ran for {cfg.sessions} slots")
    stalled_classes = {"stalled skip": "notices", "stalled warn": "cut"}
    roles = Counter(role for _, role in _slot_roles(cfg))
    for cls, what in stalled_classes.items():
        want = cfg.stalled and (cls == "stalled skip" or cfg.stalled > 1)
        if want and by_class.get(cls, Counter())[what] == 0:
            rep.fail(f"no {cls} session ever got {what}: the stall scenario did not happen")
    if roles["warn_stall_late"] and not by_class.get("stalled warn late", Counter())["cut"]:
        rep.fail(
            "no late-resuming warn session was ever cut: that scenario did not happen", "late-cut"
        )
    # hostile clients
    rep.say()
    acts: dict[str, Counter[bool]] = defaultdict(Counter)
    for action, outcome, ok in run.hostile:
        acts[action][ok] += 1
        if not ok:
            rep.fail(f"hostile {action}: {outcome}")
    rep.say(
        f"hostile connections: {len(run.hostile)} — "
        + ", ".join(
            f"{a}={c[True]}" + (f"(+{c[False]} BAD)" if c[False] else "")
            for a, c in sorted(acts.items())
        )
    )
    rep.stats["hostile"] = len(run.hostile)
    # metrics
    m = run.metrics
    rep.say()
    rep.say("gateway metrics at the end:")
    for name, label in (
        ("gateway_disconnects_total", "reason"),
        ("gateway_slow_reader_events_total", None),
        ("gateway_connections_total", None),
        ("gateway_auth_failures_total", "reason"),
        ("gateway_limit_hits_total", "limit"),
    ):
        parts = []
        for (n, lab), v in sorted(m.items()):
            if n == name and v:
                d = dict(lab)
                key = d.get(label, "") if label else ",".join(f"{k}={x}" for k, x in lab)
                parts.append(f"{key}={v:.0f}")
        rep.say(f"  {name}: " + (", ".join(parts) or "none"))
    skipped_metric = _metric(m, "gateway_records_skipped_total")
    rep.say(f"  gateway_records_skipped_total: {skipped_metric:.0f}")
    rep.say(
        f"  gateway_feed_records_in_total: {_metric(m, 'gateway_feed_records_in_total'):.0f}, "
        f"gateway_records_out_total: {_metric(m, 'gateway_records_out_total'):.0f}, "
        f"gateway_heartbeats_total: {_metric(m, 'gateway_heartbeats_total'):.0f}"
    )
    # every session gone: nothing left registered in the gateway
    left = _metric(m, "gateway_sessions")
    groups = _metric(m, "gateway_fanout_groups")
    rep.say(f"  after the run: gateway_sessions={left:.0f}, gateway_fanout_groups={groups:.0f}")
    if left or groups:
        rep.fail(f"sessions still registered after the run: sessions={left}, groups={groups}")
    logged_skipped = sum(e[1] for e in ends.values())
    if int(skipped_metric) != logged_skipped:
        rep.fail(
            f"gateway_records_skipped_total={skipped_metric:.0f} but the sessions' logged "
            f"skipped counts add up to {logged_skipped}"
        )
    cuts_logged = len(CUT_LINE.findall(log))
    cuts_metric = _metric(m, "gateway_slow_reader_events_total", event="disconnect")
    if cuts_logged != int(cuts_metric):
        rep.fail(f"{cuts_logged} 'session cut' log lines but {cuts_metric:.0f} disconnect events")
    # memory and file descriptors
    rep.say()
    rep.say("gateway RSS / fds over time (t, RSS, fds, streaming sessions):")
    step = max(1, len(run.samples) // 14)
    pts = run.samples[::step]
    rep.say(
        "  "
        + "  ".join(f"{t:.0f}s:{rss / 1024:.0f}MiB/{fds}fd/{live}s" for t, rss, fds, _, live in pts)
    )
    peak = max((x[1] for x in run.samples), default=run.rss_end)
    growth = (run.rss_end - run.rss_warm) / run.rss_warm if run.rss_warm else 0.0
    rep.say(
        f"RSS: start {_mib(run.rss_base)}, after warm-up ({cfg.warmup_s:.0f} s) "
        f"{_mib(run.rss_warm)}, peak {_mib(peak)}, end {_mib(run.rss_end)} "
        f"({growth:+.1%} vs warm-up; limit +{cfg.rss_tolerance:.0%})"
    )
    rep.say(f"fds: baseline {run.fd_base}, after warm-up {run.fd_warm}, end {run.fd_end}")
    rep.stats.update(
        rss_warm=run.rss_warm, rss_end=run.rss_end, fd_base=run.fd_base, fd_end=run.fd_end
    )
    if growth > cfg.rss_tolerance:
        rep.fail(
            f"RSS grew {growth:+.1%} from warm-up ({_mib(run.rss_warm)}) to the end "
            f"({_mib(run.rss_end)})"
        )
    if run.fd_end != run.fd_base:
        rep.fail(f"fd leak: {run.fd_end} open at the end, {run.fd_base} before any client")
    for text in run.feed_stalls:
        rep.fail(f"feed stall: {text}")
    cpu = ", ".join(f"w{w['index']}={w.get('cpu_s', 0):.0f}s" for w in run.workers)
    rep.say(f"reader CPU: {cpu}")
    # the gateway process itself
    for pattern in ("Traceback", "Exception in callback", "exception was never retrieved"):
        if pattern in log:
            i = log.index(pattern)
            rep.fail(f"gateway log contains {pattern!r}: {log[max(0, i - 300) : i + 1500]}")
    if exit_code != 0:
        rep.fail(f"gateway exited with {exit_code} on SIGTERM")


def run(cfg: SoakConfig) -> SoakReport:
    """Run one soak; the report says what broke (``report.ok``)."""
    from tests.integration.helpers import start_gateway

    rep = SoakReport()

    def say(text: str) -> None:
        rep.say(text)
        if cfg.progress:
            print(text, flush=True)
            rep.printed = len(rep.lines)

    from tests.conftest import TEST_LOOP

    feed = f"synthetic:?rate={cfg.rate:g}&instruments={cfg.instruments}"
    loop = cfg.loop or TEST_LOOP
    gw = start_gateway(
        "--metrics-port",
        "0",
        "--loop",
        loop,
        feeds={DATASET: feed},
        config=cfg.gateway_toml(),
        max_sessions=10_000,
    )
    say(
        f"soak: {cfg.duration:g} s, {cfg.sessions} session slots ({cfg.stalled} stalled: "
        f"{(cfg.stalled + 1) // 2} skip, {cfg.stalled // 2} warn), {cfg.hostile} hostile, "
        f"{cfg.workers} reader processes, seed {cfg.seed}"
    )
    say(f"gateway event loop: {loop} (GATEWAY_TEST_LOOP or --loop)")
    say(
        f"gateway pid {gw.proc.pid} port {gw.port}: feed {DATASET}={feed}; slow_reader "
        f"behind {cfg.behind_bytes} B / {cfg.behind_age_s:g} s, resume {cfg.resume_bytes} B, "
        f"hard cap {cfg.hard_cap_bytes} B, warnings every {cfg.warning_interval_s:g} s"
    )
    state = _Run(cfg, gw.proc.pid, gw.port, gw.metrics_port, str(gw.log_path), say)
    crashed: BaseException | None = None
    try:
        try:
            import uvloop

            uvloop.run(_control(state))
        except Exception as exc:  # noqa: BLE001 - reported, then the gateway is stopped
            crashed = exc
    finally:
        alive = gw.proc.poll() is None
        exit_code = gw.stop()
    if not alive:
        rep.fail(f"the gateway died during the soak (exit code {exit_code})")
    if crashed is not None:
        rep.fail(f"harness error: {crashed!r}")
        rep.say(gw.log()[-3000:])
        return rep
    _report(state, rep, gw.log(), exit_code if alive else None)
    return rep


def main(argv: list[str] | None = None) -> int:
    d = SoakConfig()
    p = argparse.ArgumentParser(
        prog="python -m tests.soak.soak", description=(__doc__ or "").split("\n")[0]
    )
    p.add_argument("--duration", type=float, default=d.duration, help="seconds of load")
    p.add_argument("--sessions", type=int, default=d.sessions, help="concurrent session slots")
    p.add_argument("--stalled", type=int, default=d.stalled, help="stalled-reader slots")
    p.add_argument("--hostile", type=int, default=d.hostile, help="hostile client loops")
    p.add_argument("--workers", type=int, default=d.workers, help="reader processes")
    p.add_argument("--rate", type=float, default=d.rate, help="feed records per second")
    p.add_argument("--instruments", type=int, default=d.instruments)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--warmup", type=float, default=None, help="seconds (default duration/3)")
    p.add_argument("--poll-ms", type=float, default=d.poll_ms, help="reader poll period")
    p.add_argument("--behind-bytes", type=int, default=d.behind_bytes)
    p.add_argument("--hard-cap-bytes", type=int, default=d.hard_cap_bytes)
    p.add_argument("--resume-bytes", type=int, default=d.resume_bytes)
    p.add_argument("--sndbuf", type=int, default=d.sndbuf, help="gateway SO_SNDBUF (0: auto)")
    p.add_argument("--rss-tolerance", type=float, default=d.rss_tolerance)
    p.add_argument(
        "--late-resume",
        type=float,
        default=d.late_resume,
        help="fraction of warn-stall slots that resume after the cut grace period",
    )
    p.add_argument("--loop", choices=("uvloop", "asyncio"), default="", help="gateway loop")
    a = p.parse_args(argv)
    cfg = SoakConfig(
        duration=a.duration,
        sessions=a.sessions,
        stalled=a.stalled,
        hostile=a.hostile,
        workers=a.workers,
        rate=a.rate,
        instruments=a.instruments,
        seed=a.seed,
        warmup=a.warmup,
        poll_ms=a.poll_ms,
        behind_bytes=a.behind_bytes,
        hard_cap_bytes=a.hard_cap_bytes,
        resume_bytes=min(d.resume_bytes, a.behind_bytes),
        rss_tolerance=a.rss_tolerance,
        sndbuf=a.sndbuf,
        late_resume=a.late_resume,
        loop=a.loop,
    )
    started = time.monotonic()
    rep = run(cfg)
    for line in rep.lines[rep.printed :]:
        print(line)
    print()
    if rep.failures:
        print(f"FAILED: {len(rep.failures)} broken promise(s):")
        for f, tag in zip(rep.failures, rep.tags, strict=True):
            print(f"  - {f}" + (f"  [{tag}]" if tag else ""))
    else:
        print("PASSED: every promise kept")
    print(f"(soak wall time {time.monotonic() - started:.0f} s)")
    return 0 if rep.ok else 1


if __name__ == "__main__":
    sys.exit(main())
