"""The probe's SQLite uptime history: windows, percentiles, retention, restarts, and one
file shared by several targets."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from gateway.ops.history import RETENTION_S, History, StrobeRecord, percentile

NOW = 1_800_000_000.0
TARGET = "h:1/D"


def _rec(
    age_s: float,
    ok: bool = True,
    step: str = "ok",
    total: float = 0.01,
    target: str = TARGET,
) -> StrobeRecord:
    return StrobeRecord(
        ts=NOW - age_s,
        ok=ok,
        step=step if not ok else "ok",
        error="" if ok else "boom",
        target=target,
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
    w = {label: h.window(TARGET, sec, NOW) for label, sec in (("1h", 3600), ("24h", 86400))}
    assert (w["1h"].strobes, w["1h"].failures) == (3, 1)
    assert w["1h"].ratio == pytest.approx(2 / 3)
    assert (w["24h"].strobes, w["24h"].failures) == (5, 2)
    s = h.summary(TARGET, now=NOW)
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
    assert h.window(TARGET, 3600, NOW).ratio is None
    s = h.summary(TARGET, now=NOW)
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
    s = h.summary(TARGET, now=NOW)
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
    assert h.window(TARGET, 3600, NOW).failures == 1
    h.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT step FROM strobes ORDER BY ts").fetchall() == [
            ("start",),
            ("ok",),
        ]


def test_two_targets_in_one_file_never_mix(tmp_path: Path) -> None:
    """The report: a gateway 35 s old whose own strobes all passed was shown as degraded
    with "connect: 3" because the file also held another target's failures."""
    path = tmp_path / "h.sqlite"
    h = History(path)
    other = "old-host:13000/OTHER.DS"
    for age, ok, step in [(900, False, "connect"), (600, False, "connect"), (300, True, "")]:
        h.record(_rec(age, ok, step, total=5.0, target=other))
    h.record(_rec(40, False, "connect", target=other))
    for age in range(35, 0, -5):  # seven good strobes of our own, every 5 s
        h.record(_rec(age, total=0.02))
    h.close()
    h = History(path)  # and after a restart
    s = h.summary(TARGET, now=NOW)
    assert s.target == TARGET and s.total == 7 and s.first_ts == NOW - 35
    assert {k: (v.strobes, v.failures) for k, v in s.uptime.items()} == dict.fromkeys(
        ("1h", "24h", "7d", "30d"), (7, 0)
    )
    assert all(v.ratio == 1.0 for v in s.uptime.values())
    assert s.failures_by_step == {}
    assert [r.target for r in s.recent] == [TARGET] * 7
    assert s.latency["24h"]["total"]["p99"] == pytest.approx(0.02)  # not the other's 5 s
    assert (s.other_targets, s.other_strobes) == (1, 4)
    assert s.as_dict()["other_targets"] == {"targets": 1, "strobes": 4}
    # the other target's figures are its own, too
    o = h.summary(other, now=NOW)
    assert (o.total, o.uptime["1h"].strobes, o.uptime["1h"].failures) == (4, 4, 3)
    assert o.failures_by_step == {"connect": 3}
    assert [r.target for r in o.recent] == [other] * 4
    assert h.count() == 11 and h.count(TARGET) == 7
    assert h.targets() == {TARGET: 7, other: 4}
    # a target never strobed has no figure at all
    n = h.summary("new:1/D", now=NOW)
    assert n.total == 0 and n.first_ts is None and n.uptime["1h"].ratio is None
    h.close()


def test_a_window_longer_than_the_data_says_what_it_covers(tmp_path: Path) -> None:
    h = History(tmp_path / "h.sqlite")
    h.record(_rec(5 * 86_400, target="other:1/D"))  # older data of another target: no help
    for age in (35, 20, 5):
        h.record(_rec(age))
    s = h.summary(TARGET, now=NOW)
    assert {k: v.covers_s for k, v in s.uptime.items()} == dict.fromkeys(
        ("1h", "24h", "7d", "30d"), 35.0
    )
    assert s.as_dict()["window_covers_s"]["24h"] == 35.0
    h.record(_rec(2 * 3600))  # two hours of data: the hour is covered, the day is not
    s = h.summary(TARGET, now=NOW)
    assert s.uptime["1h"].covers_s == 3600.0 and s.uptime["24h"].covers_s == 7200.0
    assert h.window(TARGET, 3600, NOW).covers_s == 3600.0
    assert h.window("none:1/D", 3600, NOW).covers_s == 0.0
    h.close()


def test_percentiles_come_with_their_sample_counts() -> None:
    h = History(":memory:")
    for age in range(10, 110, 10):  # ten in the hour, all fine
        h.record(_rec(age))
    h.record(_rec(5, ok=False, step="auth"))  # a failure: no latency, not a sample
    h.record(_rec(7200))  # in the day, not the hour
    s = h.summary(TARGET, now=NOW)
    assert s.samples["1h"] == dict.fromkeys(("connect", "auth", "first_record", "total"), 10)
    assert s.samples["24h"]["total"] == 11
    assert s.as_dict()["latency_samples"]["1h"]["total"] == 10
    assert h.summary(TARGET, now=NOW + 10 * 86_400).samples["1h"]["total"] == 0
    h.close()
