"""The probe's uptime history: one row per strobe in an embedded SQLite file.

Uptime over a window is the share of strobes in that window that succeeded (each strobe
weighs the same; a window with no strobe has no figure rather than 100 %). The file
survives restarts, so the 7 d and 30 d figures mean what they say; rows older than
``RETENTION_S`` are pruned as new ones arrive.

One file may hold the strobes of several targets (a probe pointed at another host or
dataset, a gateway moved to another port): every figure is computed over the strobes of
one target (``host:port/dataset``), never mixed. A window longer than the target's data
says how much of it the data covers.

Every method is synchronous and thread-safe: the probe calls them from a worker thread
(``asyncio.to_thread``) so the event loop never waits for the disk.
"""

from __future__ import annotations

import math
import os
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "RETENTION_S",
    "WINDOWS",
    "History",
    "HistorySummary",
    "StrobeRecord",
    "WindowStats",
    "default_history_path",
    "percentile",
]

#: (label, seconds): the windows the status page and the metrics report
WINDOWS: tuple[tuple[str, float], ...] = (
    ("1h", 3600.0),
    ("24h", 86400.0),
    ("7d", 7 * 86400.0),
    ("30d", 30 * 86400.0),
)
RETENTION_S = 31 * 86400.0
#: latencies kept in the percentile figures (seconds columns of the table)
LATENCY_STEPS = ("connect", "auth", "first_record", "total")
PERCENTILES = (50, 90, 99)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS strobes (
    ts REAL NOT NULL,
    ok INTEGER NOT NULL,
    step TEXT NOT NULL,
    error TEXT NOT NULL DEFAULT '',
    target TEXT NOT NULL DEFAULT '',
    connect_s REAL,
    auth_s REAL,
    first_record_s REAL,
    total_s REAL,
    freshness_s REAL
);
CREATE INDEX IF NOT EXISTS strobes_ts ON strobes (ts);
CREATE INDEX IF NOT EXISTS strobes_target_ts ON strobes (target, ts);
"""


def default_history_path() -> Path:
    """``$XDG_STATE_HOME/gateway/probe.sqlite`` (``~/.local/state/...`` by default)."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state"
    )
    return Path(base) / "gateway" / "probe.sqlite"


@dataclass(frozen=True)
class StrobeRecord:
    """One strobe as stored: ``step`` is ``ok`` or the name of the step that failed."""

    ts: float
    ok: bool
    step: str
    error: str = ""
    target: str = ""
    connect_s: float | None = None
    auth_s: float | None = None
    first_record_s: float | None = None
    total_s: float | None = None
    freshness_s: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class WindowStats:
    strobes: int
    failures: int
    #: how much of the window the target's data covers (its first strobe to now), seconds
    covers_s: float = 0.0

    @property
    def ratio(self) -> float | None:
        """Share of successful strobes, None when the window holds none."""
        return None if self.strobes == 0 else (self.strobes - self.failures) / self.strobes


@dataclass
class HistorySummary:
    """What the status page and the metrics need for one target, computed in one go."""

    computed_at: float = 0.0
    target: str = ""
    total: int = 0
    first_ts: float | None = None
    uptime: dict[str, WindowStats] = field(default_factory=dict)
    #: window label -> step -> percentile label ("p50") -> seconds
    latency: dict[str, dict[str, dict[str, float | None]]] = field(default_factory=dict)
    #: window label -> step -> how many latencies the percentiles are taken over
    samples: dict[str, dict[str, int]] = field(default_factory=dict)
    recent: list[StrobeRecord] = field(default_factory=list)
    failures_by_step: dict[str, int] = field(default_factory=dict)
    #: other targets in the same file and their strobes (counted in no figure here)
    other_targets: int = 0
    other_strobes: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "computed_at": self.computed_at,
            "strobes_total": self.total,
            "first_strobe_at": self.first_ts,
            "uptime": {
                label: {"ratio": s.ratio, "strobes": s.strobes, "failures": s.failures}
                for label, s in self.uptime.items()
            },
            "window_covers_s": {label: s.covers_s for label, s in self.uptime.items()},
            "latency_s": self.latency,
            "latency_samples": self.samples,
            "failures_by_step_24h": self.failures_by_step,
            "recent": [r.as_dict() for r in self.recent],
            "other_targets": {"targets": self.other_targets, "strobes": self.other_strobes},
        }


def percentile(values: Sequence[float], pct: float) -> float | None:
    """Nearest-rank percentile of ``values`` (None when empty)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


class History:
    """An append-only table of strobe results. ``path=":memory:"`` keeps nothing."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        with self._lock:
            if self.path != ":memory:":
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        self._last_prune = 0.0

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def record(self, rec: StrobeRecord) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO strobes (ts, ok, step, error, target, connect_s, auth_s, "
                "first_record_s, total_s, freshness_s) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    rec.ts,
                    int(rec.ok),
                    rec.step,
                    rec.error[:500],
                    rec.target,
                    rec.connect_s,
                    rec.auth_s,
                    rec.first_record_s,
                    rec.total_s,
                    rec.freshness_s,
                ),
            )
            if rec.ts - self._last_prune > 3600:
                self._db.execute("DELETE FROM strobes WHERE ts < ?", (rec.ts - RETENTION_S,))
                self._last_prune = rec.ts

    def count(self, target: str | None = None) -> int:
        """Rows in the file (``target=None``) or of one target."""
        with self._lock:
            if target is None:
                row = self._db.execute("SELECT COUNT(*) FROM strobes").fetchone()
            else:
                row = self._db.execute(
                    "SELECT COUNT(*) FROM strobes WHERE target = ?", (target,)
                ).fetchone()
        return int(row[0])

    def targets(self) -> dict[str, int]:
        """Every target the file holds strobes of, with its row count."""
        with self._lock:
            rows = self._db.execute(
                "SELECT target, COUNT(*) FROM strobes GROUP BY target ORDER BY target"
            ).fetchall()
        return {str(t): int(n) for t, n in rows}

    def first(self, target: str) -> float | None:
        """Time of the target's oldest strobe on record."""
        with self._lock:
            row = self._db.execute(
                "SELECT MIN(ts) FROM strobes WHERE target = ?", (target,)
            ).fetchone()
        return None if row[0] is None else float(row[0])

    def window(self, target: str, seconds: float, now: float | None = None) -> WindowStats:
        """Strobes and failures of ``target`` in the ``seconds`` before ``now``."""
        now = time.time() if now is None else now
        with self._lock:
            count, failures, first = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(1 - ok), 0), "
                "(SELECT MIN(ts) FROM strobes WHERE target = ?1) "
                "FROM strobes WHERE target = ?1 AND ts > ?2 AND ts <= ?3",
                (target, now - seconds, now),
            ).fetchone()
        covers = 0.0 if first is None else max(0.0, min(seconds, now - float(first)))
        return WindowStats(strobes=int(count), failures=int(failures), covers_s=covers)

    def recent(self, target: str, limit: int = 20) -> list[StrobeRecord]:
        """The target's last ``limit`` strobes, newest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT ts, ok, step, error, target, connect_s, auth_s, first_record_s, "
                "total_s, freshness_s FROM strobes WHERE target = ? ORDER BY ts DESC LIMIT ?",
                (target, limit),
            ).fetchall()
        return [
            StrobeRecord(
                ts=r[0],
                ok=bool(r[1]),
                step=r[2],
                error=r[3],
                target=r[4],
                connect_s=r[5],
                auth_s=r[6],
                first_record_s=r[7],
                total_s=r[8],
                freshness_s=r[9],
            )
            for r in rows
        ]

    def latencies(
        self, target: str, seconds: float, now: float | None = None
    ) -> dict[str, list[float]]:
        """Per step, the latencies of the target's successful strobes in the window."""
        now = time.time() if now is None else now
        with self._lock:
            rows = self._db.execute(
                "SELECT connect_s, auth_s, first_record_s, total_s FROM strobes "
                "WHERE target = ? AND ok = 1 AND ts > ? AND ts <= ?",
                (target, now - seconds, now),
            ).fetchall()
        out: dict[str, list[float]] = {step: [] for step in LATENCY_STEPS}
        for row in rows:
            for step, value in zip(LATENCY_STEPS, row, strict=True):
                if value is not None:
                    out[step].append(float(value))
        return out

    def failures_by_step(
        self, target: str, seconds: float, now: float | None = None
    ) -> dict[str, int]:
        now = time.time() if now is None else now
        with self._lock:
            rows = self._db.execute(
                "SELECT step, COUNT(*) FROM strobes "
                "WHERE target = ? AND ok = 0 AND ts > ? AND ts <= ? "
                "GROUP BY step ORDER BY step",
                (target, now - seconds, now),
            ).fetchall()
        return {str(step): int(n) for step, n in rows}

    def summary(
        self,
        target: str,
        now: float | None = None,
        latency_windows: Sequence[str] = ("1h", "24h"),
        recent: int = 20,
    ) -> HistorySummary:
        """Every figure of one target; strobes of other targets count nowhere."""
        now = time.time() if now is None else now
        windows = dict(WINDOWS)
        targets = self.targets()
        latency: dict[str, dict[str, dict[str, float | None]]] = {}
        samples: dict[str, dict[str, int]] = {}
        for label in latency_windows:
            values = self.latencies(target, windows[label], now)
            latency[label] = {
                step: {f"p{p}": percentile(vals, p) for p in PERCENTILES}
                for step, vals in values.items()
            }
            samples[label] = {step: len(vals) for step, vals in values.items()}
        return HistorySummary(
            computed_at=now,
            target=target,
            total=targets.get(target, 0),
            first_ts=self.first(target),
            uptime={label: self.window(target, sec, now) for label, sec in WINDOWS},
            latency=latency,
            samples=samples,
            recent=self.recent(target, recent),
            failures_by_step=self.failures_by_step(target, windows["24h"], now),
            other_targets=sum(1 for t in targets if t != target),
            other_strobes=sum(n for t, n in targets.items() if t != target),
        )
