"""The status page's numbers and rendering, without a gateway."""

from __future__ import annotations

import html
import re
from typing import Any

import pytest

from gateway.status import Sample, ThroughputSampler, assess, render_html


def _sampler(points: list[tuple[float, int, int, int, float]]) -> ThroughputSampler:
    s = ThroughputSampler()
    for p in points:
        s.add(Sample(*p))
    return s


def test_rates_over_windows_use_the_samples_inside_them() -> None:
    s = _sampler([(float(t), 100 * t, 8000 * t, 300 * t, 5000.0 * t) for t in range(0, 301)])
    one = s.rates(60)
    assert one is not None
    assert one["seconds"] == 60
    assert one["records_in_per_s"] == pytest.approx(100)
    assert one["bytes_in_per_s"] == pytest.approx(8000)
    assert one["records_out_per_s"] == pytest.approx(300)
    assert one["bytes_out_per_s"] == pytest.approx(5000)
    # a window longer than what is kept: the rate over what is kept
    assert s.rates(900)["seconds"] == 300  # type: ignore[index]
    assert _sampler([(0.0, 0, 0, 0, 0.0)]).rates(60) is None


def test_rates_see_a_change_in_the_last_minute() -> None:
    pts = [(float(t), 10 * t, 0, 0, 0.0) for t in range(0, 241)]
    last = pts[-1]
    pts += [(240.0 + t, last[1] + 1000 * t, 0, 0, 0.0) for t in range(1, 61)]
    s = _sampler(pts)
    assert s.rates(60)["records_in_per_s"] == pytest.approx(1000)  # type: ignore[index]
    assert s.rates(300)["records_in_per_s"] == pytest.approx((240 * 10 + 60 * 1000) / 300)  # type: ignore[index]
    series = s.series(points=30)
    assert 25 <= len(series) <= 32
    assert series[0][1] == pytest.approx(10) and series[-1][1] == pytest.approx(1000)


def _data(**over: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "generated_at": 1_800_000_000.0,
        "version": "0.1.0",
        "gateway": {
            "ready": True,
            "accepting": True,
            "uptime_s": 12.0,
            "port": 13000,
            "loop": "uvloop",
        },
        "sessions": {
            "total": 1,
            "by_dataset": {"D": {"streaming": 1, "authenticated": 0}},
            "connections_open": 1,
            "unauthenticated": 0,
        },
        "throughput": {"windows": {"1m": None, "5m": None, "15m": None}, "series": []},
        "feeds": [
            {
                "dataset": "D",
                "connected": True,
                "detail": "running",
                "paused": False,
                "paused_total_s": 0.0,
                "pauses": 0,
                "lossless": False,
                "lag_s": 0.01,
                "last_record_age_s": 0.01,
                "records_in": 10,
                "bytes_in": 800,
                "sessions": 1,
                "readiness": "up",
            }
        ],
        "probe": None,
    }
    data.update(over)
    return data


def test_assess_states_and_reasons() -> None:
    assert assess(_data()) == ("operational", [])
    d = _data()
    d["feeds"][0]["paused"] = True
    assert assess(d) == ("degraded", ["feed D paused for a slow session"])
    d = _data()
    d["feeds"][0]["last_record_age_s"] = 3600.0
    assert assess(d) == ("degraded", ["feed D: no record for 60 min"])
    d = _data()
    d["gateway"]["ready"] = False
    d["feeds"][0]["connected"] = False
    assert assess(d) == ("down", ["gateway not ready", "feed D down"])
    probe = {"last": {"ok": False, "step": "auth"}, "uptime": {"1h": {"failures": 2}}}
    state, reasons = assess(_data(probe=probe))
    assert state == "down"
    assert reasons == ["probe failing at step auth", "2 failed strobe(s) in the last hour"]


def test_page_escapes_everything_it_did_not_write() -> None:
    d = _data()
    d["feeds"][0]["detail"] = "<script>alert(1)</script>"
    d["feeds"][0]["dataset"] = 'X"><img src=x onerror=alert(1)>'
    d["state"], d["reasons"] = assess(d)
    page = render_html(d)
    assert "<script" not in page and "<img" not in page
    assert html.escape("<script>alert(1)</script>") in page
    assert page.startswith("<!doctype html>")
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in page
    # no script and nothing fetched from elsewhere: one self-contained document
    assert not re.search(r"<script|src=\"http|href=\"http|@import", page)


def test_probe_only_page() -> None:
    probe = {
        "target": "gw:13000/D",
        "dataset": "D",
        "schema": "trades",
        "symbol": "ALL_SYMBOLS",
        "interval_s": 10.0,
        "strobes_total": 3,
        "first_strobe_at": 1_799_999_000.0,
        "last": {
            "ts": 1_799_999_990.0,
            "ok": False,
            "step": "first_record",
            "error": "timed out after 10 s",
            "total_s": 10.0,
            "freshness_s": None,
        },
        "uptime": {
            "1h": {"ratio": 2 / 3, "strobes": 3, "failures": 1},
            "24h": {"ratio": 2 / 3, "strobes": 3, "failures": 1},
            "7d": {"ratio": 2 / 3, "strobes": 3, "failures": 1},
            "30d": {"ratio": None, "strobes": 0, "failures": 0},
        },
        "latency_s": {},
        "failures_by_step_24h": {"first_record": 1},
        "recent": [],
    }
    d = _data(gateway=None, sessions=None, throughput=None, feeds=None, probe=probe)
    d["state"], d["reasons"] = assess(d)
    assert d["state"] == "down"
    page = render_html(d)
    assert "Gateway probe status" in page
    assert page.count("66.67%") == 3 and "no data" in page
    assert "failed at first_record" in page and "timed out after 10 s" in page
    assert 'id="feeds"' not in page and 'id="sessions"' not in page
