"""Slow-reader policy (README: Guarantees and limits; ``gateway/slowreader.py``): effective
behaviour and per-chunk verdicts."""

from __future__ import annotations

import pytest

from gateway.config import SlowReaderConfig
from gateway.slowreader import SlowReader, Verdict, effective_behavior

SKIPPABLE = ["mbp-1", "mbp-10", "bbo-1s", "bbo-1m", "cmbp-1", "cbbo-1s", "cbbo-1m"]
NOT_SKIPPABLE = [
    "mbo",
    "tbbo",
    "trades",
    "ohlcv-1s",
    "ohlcv-1m",
    "ohlcv-1h",
    "ohlcv-1d",
    "ohlcv-eod",
    "definition",
    "statistics",
    "status",
    "imbalance",
    "tcbbo",
]

LIM = SlowReaderConfig(
    behind_bytes=10_000,
    behind_age_s=2.0,
    resume_bytes=1_000,
    warning_interval_s=1.0,
    hard_cap_bytes=100_000,
)


# --- effective_behavior ----------------------------------------------------------------


@pytest.mark.parametrize("schema", SKIPPABLE)
@pytest.mark.parametrize("requested", ["skip", "drop"])
def test_skip_and_drop_mean_skip_for_skippable_schemas(requested, schema):
    assert effective_behavior(requested, [schema]) == "skip"


@pytest.mark.parametrize("schema", NOT_SKIPPABLE)
@pytest.mark.parametrize("requested", ["skip", "drop", "warn", None])
def test_other_schemas_always_warn(requested, schema):
    assert effective_behavior(requested, [schema]) == "warn"


def test_skip_only_when_every_schema_is_skippable():
    assert effective_behavior("skip", SKIPPABLE) == "skip"
    assert effective_behavior("skip", ["mbp-1", "trades"]) == "warn"
    assert effective_behavior("drop", ["bbo-1s", "definition"]) == "warn"
    assert effective_behavior("skip", []) == "warn"


@pytest.mark.parametrize("schemas", [["mbp-1"], SKIPPABLE, ["mbp-10", "trades"], []])
def test_warn_is_always_warn(schemas):
    assert effective_behavior("warn", schemas) == "warn"


def test_default_follows_the_schemas():
    # Absent key: skip for the skippable schemas (from 2026-04-26), warn otherwise.
    assert effective_behavior(None, ["mbp-1", "bbo-1m"]) == "skip"
    assert effective_behavior(None, ["mbp-1", "mbo"]) == "warn"


# --- warn ------------------------------------------------------------------------------


def test_warn_not_behind_sends_without_notices():
    sr = SlowReader(LIM, behavior="warn")
    now = 0.0
    for _ in range(100):
        assert sr.on_chunk(0, 500, 10, now) is Verdict.SEND
        now += 0.1
    assert sr.notices == []
    assert sr.warnings == 0


def test_warn_emits_warnings_at_a_bounded_cadence():
    sr = SlowReader(LIM, behavior="warn")
    now = 0.0
    times = []
    for _ in range(1000):  # 10 s at 100 chunks/s, 20 KB behind the whole time
        before = len(sr.notices)
        assert sr.on_chunk(20_000, 500, 10, now) is Verdict.SEND
        if len(sr.notices) > before:
            times.append(now)
        now += 0.01
    assert sr.notices and set(sr.notices) == {("warning", 0)}
    assert 9 <= len(sr.notices) <= 11
    assert sr.warnings == len(sr.notices)
    assert all(b - a >= 1.0 - 1e-9 for a, b in zip(times, times[1:], strict=False))
    assert times[0] == 0.0  # the first warning goes out as soon as the session is behind


def test_warn_behind_by_age():
    sr = SlowReader(LIM, behavior="warn")
    assert sr.on_chunk(100, 100, 1, 0.0) is Verdict.SEND
    assert sr.notices == []
    assert sr.on_chunk(100, 100, 1, 1.5) is Verdict.SEND
    assert sr.notices == []
    assert sr.on_chunk(100, 100, 1, 2.5) is Verdict.SEND  # non-empty for > 2 s
    assert sr.notices == [("warning", 0)]


def test_warn_age_resets_when_buffer_empties():
    sr = SlowReader(LIM, behavior="warn")
    sr.on_chunk(100, 100, 1, 0.0)
    sr.on_chunk(0, 100, 1, 1.9)  # drained
    sr.on_chunk(100, 100, 1, 2.0)
    sr.on_chunk(100, 100, 1, 3.5)
    assert sr.notices == []


# --- skip ------------------------------------------------------------------------------


def test_skip_skips_while_behind_then_reports_once():
    sr = SlowReader(LIM, behavior="skip")
    assert sr.on_chunk(500, 100, 3, 0.0) is Verdict.SEND
    assert sr.on_chunk(20_000, 100, 5, 0.1) is Verdict.SKIP
    assert sr.on_chunk(15_000, 100, 7, 0.2) is Verdict.SKIP
    # below behind_bytes but still above resume_bytes: keep skipping
    assert sr.on_chunk(5_000, 100, 11, 0.3) is Verdict.SKIP
    assert sr.notices == []
    assert sr.on_chunk(800, 100, 13, 0.4) is Verdict.SEND
    assert sr.notices == [("skipped", 5 + 7 + 11)]
    assert sr.skipped_total == 23
    assert sr.on_chunk(0, 100, 2, 0.5) is Verdict.SEND
    assert sr.on_chunk(0, 100, 2, 0.6) is Verdict.SEND
    assert sr.notices == [("skipped", 23)]


def test_skip_counts_each_episode_separately():
    sr = SlowReader(LIM, behavior="skip")
    sr.on_chunk(20_000, 100, 4, 0.0)
    sr.on_chunk(0, 100, 1, 0.1)
    sr.on_chunk(50_000, 100, 6, 0.2)
    sr.on_chunk(50_000, 100, 6, 0.3)
    sr.on_chunk(10, 100, 1, 0.4)
    assert sr.notices == [("skipped", 4), ("skipped", 12)]
    assert sr.skipped_total == 16
    assert not any(kind == "warning" for kind, _ in sr.notices)


@pytest.mark.parametrize("behavior", ["warn", "skip"])
def test_hard_cap_cuts(behavior):
    sr = SlowReader(LIM, behavior=behavior)
    assert sr.on_chunk(99_000, 1_000, 10, 0.0) is not Verdict.CUT
    assert sr.on_chunk(99_500, 1_000, 10, 0.1) is Verdict.CUT
    assert sr.on_chunk(200_000, 1, 1, 0.2) is Verdict.CUT


@pytest.mark.parametrize("behavior", ["warn", "skip"])
def test_lossless_always_sends(behavior):
    sr = SlowReader(LIM, behavior=behavior, lossless=True)
    now = 0.0
    for buffered in (0, 20_000, 99_999, 10**9, 500):
        assert sr.on_chunk(buffered, 10_000, 50, now) is Verdict.SEND
        now += 5.0
    assert sr.skipped_total == 0
    assert not any(kind == "skipped" for kind, _ in sr.notices)
