"""The status page's numbers and rendering, without a gateway."""

from __future__ import annotations

import html
import re
from typing import Any

import pytest

from gateway.ops.page import render_html
from gateway.ops.status import Sample, ThroughputSampler, assess


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


NOW = 1_800_000_000.0  # 2027-01-15 08:00:00 UTC


def _text(page: str) -> str:
    """What a reader sees: tags dropped, entities decoded, spaces collapsed."""
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", page)).split()).replace(" )", ")")


def _young_probe() -> dict[str, Any]:
    """A gateway 35 s old, strobing every 5 s; all seven strobes passed."""
    recent = [
        {
            "ts": NOW - 5 * k - 1,
            "ok": k != 3,
            "step": "ok" if k != 3 else "auth",
            "error": "",
            "total_s": 0.012 if k != 3 else 1.0,
            "freshness_s": 0.01,
        }
        for k in range(7)
    ]
    steps = ("connect", "auth", "first_record", "total")
    return {
        "target": "127.0.0.1:13000/D",
        "dataset": "D",
        "schema": "trades",
        "symbol": "ALL_SYMBOLS",
        "interval_s": 5.0,
        "strobes_total": 7,
        "first_strobe_at": NOW - 35,
        "last": recent[0],
        "uptime": dict.fromkeys(
            ("1h", "24h", "7d", "30d"), {"ratio": 6 / 7, "strobes": 7, "failures": 1}
        ),
        "window_covers_s": dict.fromkeys(("1h", "24h", "7d", "30d"), 35.0),
        "latency_s": {
            w: {s: {"p50": 0.01, "p90": 0.011, "p99": 0.012} for s in steps} for w in ("1h", "24h")
        },
        "latency_samples": {w: dict.fromkeys(steps, 6) for w in ("1h", "24h")},
        "failures_by_step_24h": {"auth": 1},
        "recent": recent,
        "other_targets": {"targets": 1, "strobes": 40},
    }


def _page(probe: dict[str, Any], **over: Any) -> str:
    d = _data(generated_at=NOW, probe=probe, **over)
    d["state"], d["reasons"] = assess(d)
    return render_html(d)


def test_windows_longer_than_the_data_say_how_much_they_cover() -> None:
    probe = _young_probe()
    text = _text(_page(probe))
    for name in ("Last hour", "Last 24 hours", "Last 7 days", "Last 30 days"):
        assert f"{name} (data covers 35 s)" in text, text
    # the latency tables say it too
    assert text.count("(data covers 35 s)") == 6
    # a window the data fills says nothing; an empty one has no figure to qualify
    probe["window_covers_s"]["1h"] = 3600.0
    probe["uptime"]["30d"] = {"ratio": None, "strobes": 0, "failures": 0}
    text = _text(_page(probe))
    assert "Last hour (data covers" not in text and "Last 30 days (data covers" not in text
    assert "Last 24 hours (data covers 35 s)" in text
    # the uptime figure itself stays a bare percentage
    assert re.findall(r'data-window="1h">([^<]*)<', _page(probe)) == ["85.71%"]


def test_latency_percentiles_show_their_sample_counts() -> None:
    probe = _young_probe()
    probe["latency_samples"]["24h"] = dict.fromkeys(("connect", "auth", "first_record", "total"), 2)
    page = _page(probe)
    for window, n in (("1h", "6"), ("24h", "2")):
        part = page.split(f'data-latency="{window}"', 1)[1].split("</table>", 1)[0]
        assert "<th class=num>n</th>" in part
        assert re.findall(r'data-samples="(\w+)">(\d+)<', part) == [
            ("connect", n),
            ("auth", n),
            ("first_record", n),
            ("total", n),
        ]
    assert "n: how many" in _text(page)


def test_strobe_squares_carry_their_times() -> None:
    page = _page(_young_probe())
    squares = re.findall(r'<span class="(s-ok|s-bad)"[^>]*title="([^"]*)"', page)
    # oldest first, each with its time and its result
    assert [html.unescape(t) for _, t in squares] == [
        f"2027-01-15 07:59:{59 - 5 * k:02d} UTC: " + ("failed at auth" if k == 3 else "ok, 12.0 ms")
        for k in range(6, -1, -1)
    ]
    assert [c for c, _ in squares].count("s-bad") == 1
    assert len(re.findall(r'<span class="s-(?:ok|bad)"[^>]*aria-label="2027-01-15', page)) == 7
    # visible labels under the row: its first and last time
    assert "07:59:29 07:59:59 UTC" in _text(page)
    assert "The last 7 strobes (one every 5 s), oldest first" in _text(page)
    # strobes of another target in the same file are mentioned, not counted
    assert "also holds 40 strobe(s) of 1 other target(s), counted in no figure" in _text(page)


def test_sparkline_has_a_time_axis() -> None:
    series = [[NOW - 300 + 10 * k, 100.0 + k, 50.0] for k in range(31)]
    tp = {"windows": {"1m": None, "5m": None, "15m": None}, "series": series}
    page = _page(_young_probe(), throughput=tp)
    axis = page.split('<div class="axis"', 1)[1].split("</div>", 1)[0]
    labels = re.findall(r">(\d\d:\d\d:\d\d)<", axis)
    assert labels == ["07:55:00", "07:56:00", "07:57:00", "07:58:00", "07:59:00", "08:00:00"]
    assert re.findall(r"left:([\d.]+)%", axis) == [
        "0.00",
        "20.00",
        "40.00",
        "60.00",
        "80.00",
        "100.00",
    ]
    svg = page.split('<svg class="spark"', 1)[1].split("</svg>", 1)[0]
    assert svg.count('class="tick"') == 4  # grid lines inside the chart, not at its ends
    assert "07:55:00 to 08:00:00 UTC (5 min)" in _text(page)
    # a short series: ticks every 5 s, never more than seven labels
    short = [[NOW - 20 + k, 1.0, 1.0] for k in range(21)]
    tp = {"windows": {"1m": None, "5m": None, "15m": None}, "series": short}
    axis = _page(_young_probe(), throughput=tp).split('<div class="axis"', 1)[1]
    assert re.findall(r">(\d\d:\d\d:\d\d)<", axis.split("</div>", 1)[0]) == [
        "07:59:40",
        "07:59:45",
        "07:59:50",
        "07:59:55",
        "08:00:00",
    ]
    # a few seconds (a gateway just started): no round time inside, the ends are labelled
    brief = [[NOW - 3.4 + k, 1.0, 1.0] for k in range(4)]
    tp = {"windows": {"1m": None, "5m": None, "15m": None}, "series": brief}
    axis = _page(_young_probe(), throughput=tp).split('<div class="axis"', 1)[1]
    assert re.findall(r">(\d\d:\d\d:\d\d)<", axis.split("</div>", 1)[0]) == [
        "07:59:56",
        "07:59:59",
    ]


def _journal_data(journal: dict[str, Any] | None, **sessions: Any) -> dict[str, Any]:
    d = _data(generated_at=NOW)
    if journal is not None:
        d["feeds"][0]["journal"] = journal
    d["sessions"].update(sessions)
    d["state"], d["reasons"] = assess(d)
    return d


def _replay_cell(page: str) -> str:
    cell = re.search(r'<td data-label="replay"[^>]*>(.*?)</td>', page)
    assert cell is not None, page
    return html.unescape(cell.group(1))


def test_feeds_say_how_far_back_they_can_be_replayed() -> None:
    on = {
        "state": "on",
        "oldest_ts": NOW - 86_399.0,  # 2027-01-14 08:00:01 UTC
        "newest_ts": NOW - 0.5,
        "span_s": 86_398.5,
        "bytes": 1 << 30,
        "segments": 5,
        "retention_s": 86_400.0,
    }
    d = _journal_data(on, replays_active=3, replay_bytes={"sendfile": 2_500_000, "copy": 1000})
    assert d["state"] == "operational"
    page = render_html(d)
    assert _replay_cell(page) == "replay back to 2027-01-14 08:00:01 UTC (23h 59m)"
    assert re.search(r'data-replays="3">3<', page)
    assert "Replays active 3 2.50 MB sent with sendfile, 1.00 kB copied" in _text(page)
    # an empty journal, no journal (or a document from before journals), a disabled one
    empty = {**on, "oldest_ts": None, "newest_ts": None, "span_s": None}
    assert _replay_cell(render_html(_journal_data(empty))) == "journal on, nothing recorded yet"
    assert _replay_cell(render_html(_journal_data({"state": "off"}))) == "journal off"
    old = render_html(_journal_data(None))
    assert _replay_cell(old) == "journal off" and "data-replays" not in old
    disabled = _journal_data({**on, "state": "disabled"})
    assert disabled["state"] == "degraded"
    assert disabled["reasons"] == ["feed D: journal disabled by a write error (see log)"]
    page = render_html(disabled)
    assert _replay_cell(page) == "journal disabled: write error (see log)"
    assert 'data-label="replay" class="replay bad"' in page


def test_replay_figures_are_escaped() -> None:
    d = _journal_data(
        {"state": "on", "oldest_ts": NOW - 61, "newest_ts": NOW, "span_s": 61.0},
        replays_active="<b>1</b>",
    )
    d["feeds"][0]["dataset"] = "<i>X</i>"
    page = render_html(d)
    assert "<b>1" not in page and "<i>X" not in page
    assert _replay_cell(page) == "replay back to 2027-01-15 07:58:59 UTC (1m 1s)"


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.4, "0s"),
        (42.9, "42s"),
        (250, "4m 10s"),
        (86_399, "23h 59m"),
        (2 * 86400 + 3 * 3600, "2d 3h"),
    ],
)
def test_history_spans_read_in_two_units(seconds: float, text: str) -> None:
    from gateway.ops.fmt import span

    assert span(seconds) == text
