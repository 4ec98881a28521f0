"""The probe's SQLite uptime history: windows, percentiles, retention, restarts."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from gateway.history import RETENTION_S, History, StrobeRecord, percentile

NOW = 1_800_000_000.0


def _rec(age_s: float, ok: bool = True, step: str = "ok", total: float = 0.01) -> StrobeRecord:
    return StrobeRecord(
        ts=NOW - age_s,
        ok=ok,
        step=step if not ok else "ok",
        error="" if ok else "boom",
        target="h:1/D",
        connect_s=total / 4 if ok else None,
        auth_s=total / 4 if ok else None,
        first_record_s=total / 2 if ok else None,
        total_s=total,
        freshness_s=0.01 if ok else None,
    )


def test_windows_count_strobes_and_failures(tmp_path: Path) -> None:
    h = History(tmp_path / "h.sqlite")
    for age, ok, step in [
        (10, True, ""),
        (100, False, "auth"),
        (3599, True, ""),
        (3601, False, "connect"),  # just outside the hour
        (86_000, True, ""),
        (86_401, True, ""),
        (6 * 86_400, False, "first_record"),
        (29 * 86_400, True, ""),
        (31 * 86_400 - 10, True, ""),  # older than 30 days: in no window
    ]:
        h.record(_rec(age, ok, step))
    w = {label: h.window(sec, NOW) for label, sec in (("1h", 3600), ("24h", 86400))}
    assert (w["1h"].strobes, w["1h"].failures) == (3, 1)
    assert w["1h"].ratio == pytest.approx(2 / 3)
    assert (w["24h"].strobes, w["24h"].failures) == (5, 2)
    s = h.summary(now=NOW)
    assert {k: (v.strobes, v.failures) for k, v in s.uptime.items()} == {
        "1h": (3, 1),
        "24h": (5, 2),
        "7d": (7, 3),
        "30d": (8, 3),
    }
    assert s.total == 9
    assert s.failures_by_step == {"auth": 1, "connect": 1}
    assert [r.ts for r in s.recent] == sorted((r.ts for r in s.recent), reverse=True)
    assert s.recent[0] == _rec(10)
    h.close()


def test_an_empty_window_has_no_figure(tmp_path: Path) -> None:
    h = History(tmp_path / "h.sqlite")
    assert h.window(3600, NOW).ratio is None
    s = h.summary(now=NOW)
    assert s.total == 0 and s.first_ts is None
    assert s.latency["1h"]["total"] == {"p50": None, "p90": None, "p99": None}
    assert s.as_dict()["uptime"]["30d"] == {"ratio": None, "strobes": 0, "failures": 0}


def test_percentiles_are_nearest_rank_over_successful_strobes(tmp_path: Path) -> None:
    h = History(":memory:")
    rng = np.random.default_rng(1)
    totals = rng.gamma(2.0, 0.01, size=200)
    for i, t in enumerate(totals):
        h.record(_rec(age_s=i * 10 + 1, total=float(t)))
    h.record(_rec(age_s=5, ok=False, step="auth", total=99.0))  # failures carry no latency
    s = h.summary(now=NOW)
    for p in (50, 90, 99):
        expected = np.percentile(totals, p, method="inverted_cdf")
        assert s.latency["1h"]["total"][f"p{p}"] == pytest.approx(
            np.percentile(totals[:360], p, method="inverted_cdf")
        )
        assert s.latency["24h"]["total"][f"p{p}"] == pytest.approx(expected)
        assert s.latency["24h"]["first_record"][f"p{p}"] == pytest.approx(expected / 2)
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0


def test_history_survives_reopening_and_prunes_old_rows(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "h.sqlite"  # the folder is created
    h = History(path)
    h.record(_rec(RETENTION_S + 3600))  # older than the retention
    h.record(_rec(60, ok=False, step="start"))
    h.close()
    h = History(path)
    h.record(_rec(30))  # the next insert prunes what is past the retention
    assert h.count() == 2
    assert h.window(3600, NOW).failures == 1
    h.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT step FROM strobes ORDER BY ts").fetchall() == [
            ("start",),
            ("ok",),
        ]
