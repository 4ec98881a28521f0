"""Reading a session's stream without a Python object per record: ``scan`` cuts a
read into runs of same-size records for numpy, ``Tracker`` checks rtypes, instruments and
sequence numbers online and keeps what the end-of-run checks compare (``Ref``)."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from tests.soak.config import (
    ERR_INTERNAL,
    ERR_SKIPPED,
    ERR_UNRESOLVED,
    GATEWAY_RTYPES,
    MASK64,
    RTYPE_ERROR,
    RTYPE_MAPPING,
    RTYPE_SYSTEM,
    SCHEMA_RTYPE,
    SEQ_OFFSET,
    SKIP_TEXT,
    SYS_WARNING,
    TS_RECV_OFFSET,
)
from tests.soak.plans import Plan

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
