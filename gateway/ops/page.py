"""The status page: HTML rendered from the status document (the ``/status.json`` data).

The page skeleton and its CSS are a template file, ``templates/status.html``, read once
with ``importlib.resources``; its ``{{name}}`` placeholders are filled by :func:`fill`,
which escapes every value unless it is :class:`Markup` (markup this module built, with
every figure and name in it escaped by :func:`_e`). No script, nothing fetched from
elsewhere: one self-contained document that refreshes itself.
"""

from __future__ import annotations

import functools
import html
import re
import time
from collections.abc import Iterable
from importlib import resources
from typing import Any

from gateway.ops.fmt import clock, duration, fmt_pct, ms, rate, span, utc
from gateway.ops.history import WINDOWS
from gateway.ops.status import RATE_WINDOWS, STALE_S

__all__ = ["Markup", "fill", "render_html"]

WINDOW_NAMES = {
    "1h": "Last hour",
    "24h": "Last 24 hours",
    "7d": "Last 7 days",
    "30d": "Last 30 days",
}


class Markup(str):
    """HTML that :func:`fill` inserts as it is (built here, its values escaped)."""


_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


@functools.cache
def _template(name: str) -> str:
    return resources.files("gateway.ops").joinpath("templates", name).read_text("utf-8")


def fill(template: str, **values: object) -> str:
    """``template`` with each ``{{name}}`` replaced by ``values[name]``: escaped, unless
    it is :class:`Markup`. A placeholder without a value is an error."""

    def one(m: re.Match[str]) -> str:
        value = values[m.group(1)]
        return value if isinstance(value, Markup) else _e(value)

    return _PLACEHOLDER.sub(one, template)


_STATE_CLASS = {"operational": "ok", "degraded": "warn", "down": "bad"}
_STATE_TEXT = {"operational": "Operational", "degraded": "Degraded", "down": "Down"}


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _td(value: str, label: str, num: bool = False, cls: str = "") -> str:
    classes = " ".join(c for c in ("num" if num else "", cls) if c)
    attr = f' class="{classes}"' if classes else ""
    return f'<td data-label="{_e(label)}"{attr}>{value}</td>'


def _table(headers: Iterable[tuple[str, bool]], rows: Iterable[str], stack: bool = True) -> str:
    head = "".join(f"<th{' class=num' if num else ''}>{_e(h)}</th>" for h, num in headers)
    cls = ' class="stack"' if stack else ""
    return f"<table{cls}><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _uptime_section(probe: dict[str, Any]) -> str:
    tiles = []
    uptime = probe.get("uptime") or {}
    covers = probe.get("window_covers_s") or {}
    for label, seconds in WINDOWS:
        w = uptime.get(label) or {"ratio": None, "strobes": 0, "failures": 0}
        ratio = w["ratio"]
        cls = (
            "" if ratio is None else "ok" if ratio >= 0.999 else "warn" if ratio >= 0.99 else "bad"
        )
        note = (
            "no strobe in this window"
            if not w["strobes"]
            else f"{w['failures']} of {w['strobes']} strobes failed"
        )
        tiles.append(
            f'<div class="tile"><div class="label">{_e(WINDOW_NAMES[label])}'
            f"{_covers_note(seconds, w['strobes'], covers.get(label))}</div>"
            f'<div class="value"><span class="{cls}" data-window="{label}">'
            f"{_e(fmt_pct(ratio))}</span></div>"
            f'<div class="note">{_e(note)}</div></div>'
        )
    interval = f"{probe['interval_s']:g}"
    since = f", since {utc(probe['first_strobe_at'])}" if probe["first_strobe_at"] else ""
    return (
        '<section id="uptime"><h2>Uptime</h2>'
        f'<div class="grid">{"".join(tiles)}</div>'
        '<p class="muted">Measured like a customer: connect, authenticate, subscribe to '
        f"{_e(probe['schema'])} {_e(probe['symbol'])} on {_e(probe['dataset'])} and wait for "
        f"the first record, every {_e(interval)} s "
        f"({_e(probe['strobes_total'])} strobes on record{_e(since)}).</p></section>"
    )


def _covers_note(window_s: float, strobes: int, covers_s: float | None) -> str:
    """The note "(data covers 35 s)" when the target's data is shorter than the window."""
    if not strobes or covers_s is None or covers_s >= window_s * 0.999:
        return ""
    span = f"{covers_s:.0f} s" if 10 <= covers_s < 120 else duration(covers_s)
    return f' <span class="covers">(data covers {_e(span)})</span>'


def _strip(recent: list[dict[str, Any]], interval_s: float) -> str:
    """One square per recent strobe, oldest first, each labelled with its time and result;
    the times of the first and last square written under the row."""
    if not recent:
        return ""
    squares = []
    for r in reversed(recent):
        outcome = f"ok, {ms(r.get('total_s'))}" if r["ok"] else f"failed at {r['step']}"
        label = f"{clock(r['ts'], date=True)} UTC: {outcome}"
        squares.append(
            f'<span class="{"s-ok" if r["ok"] else "s-bad"}" role="img" '
            f'data-ts="{r["ts"]:.3f}" title="{_e(label)}" aria-label="{_e(label)}"></span>'
        )
    oldest, newest = recent[-1]["ts"], recent[0]["ts"]
    date = time.gmtime(oldest)[:3] != time.gmtime(newest)[:3]
    return (
        '<div class="strobes"><div class="strip" role="group" '
        f'aria-label="recent strobes, oldest first">{"".join(squares)}</div>'
        f'<div class="strip-axis"><span>{_e(clock(oldest, date))}</span>'
        f"<span>{_e(clock(newest, date))} UTC</span></div></div>"
        f'<p class="legend">The last {len(recent)} strobes (one every {interval_s:g} s), '
        "oldest first; hover a square for its time and result.</p>"
    )


def _probe_section(probe: dict[str, Any], now: float) -> str:
    last = probe.get("last") or (probe.get("recent") or [None])[0]
    if last is None:
        status = '<p class="muted">No strobe yet.</p>'
    else:
        ago = duration(now - last["ts"])
        if last["ok"]:
            status = (
                f'<p><span class="badge ok">ok</span> last strobe {ago} ago, total '
                f"{_e(ms(last['total_s']))}, feed freshness "
                f"{_e(duration(last['freshness_s']))}</p>"
            )
        else:
            status = (
                f'<p><span class="badge bad">failed at {_e(last["step"])}</span> '
                f"last strobe {ago} ago: <span class=detail>{_e(last['error'])}</span></p>"
            )
    latency = probe.get("latency_s") or {}
    samples = probe.get("latency_samples") or {}
    covers = probe.get("window_covers_s") or {}
    uptime = probe.get("uptime") or {}
    windows = dict(WINDOWS)
    tables = []
    for window in ("1h", "24h"):
        steps = latency.get(window) or {}
        counts = samples.get(window) or {}
        rows = []
        for step, name in (
            ("connect", "connect"),
            ("auth", "auth"),
            ("first_record", "first record"),
            ("total", "total"),
        ):
            p = steps.get(step) or {}
            rows.append(
                f"<tr><td>{_e(name)}</td>"
                + "".join(f'<td class="num">{_e(ms(p.get(k)))}</td>' for k in ("p50", "p90", "p99"))
                + f'<td class="num" data-samples="{step}">{_e(counts.get(step, 0))}</td>'
                + "</tr>"
            )
        strobes = (uptime.get(window) or {}).get("strobes") or 0
        note = _covers_note(windows[window], strobes, covers.get(window))
        tables.append(
            f'<div data-latency="{window}"><h3>{_e(WINDOW_NAMES[window])}{note}</h3>'
            + _table(
                [("step", False), ("p50", True), ("p90", True), ("p99", True), ("n", True)],
                rows,
                stack=False,
            )
            + "</div>"
        )
    strip = _strip(probe.get("recent") or [], float(probe["interval_s"]))
    other = probe.get("other_targets") or {}
    other_text = (
        f" The history file also holds {_e(other['strobes'])} strobe(s) of "
        f"{_e(other['targets'])} other target(s), counted in no figure here."
        if other.get("strobes")
        else ""
    )
    failures = probe.get("failures_by_step_24h") or {}
    fail_text = (
        ", ".join(f"{_e(step)}: {n}" for step, n in failures.items()) if failures else "none"
    )
    return (
        f'<section id="probe"><h2>Probe <span class="muted">{_e(probe["target"])}</span></h2>'
        f'{status}<div class="cols">{"".join(tables)}</div>'
        '<p class="muted">Percentiles over the successful strobes in the window; n: how '
        f"many.</p>{strip}"
        f'<p class="muted">Failures in the last 24 hours by step: {fail_text}.{other_text}</p>'
        "</section>"
    )


def _sessions_section(sessions: dict[str, Any]) -> str:
    rows = [
        "<tr>"
        + _td(_e(ds), "dataset")
        + _td(_e(c["streaming"]), "streaming", num=True)
        + _td(_e(c["authenticated"]), "authenticated", num=True)
        + "</tr>"
        for ds, c in sorted(sessions["by_dataset"].items())
    ]
    table = (
        _table([("dataset", False), ("streaming", True), ("authenticated", True)], rows)
        if rows
        else ""
    )
    return (
        '<section id="sessions"><h2>Sessions</h2><div class="grid">'
        f'<div class="tile"><div class="label">Sessions</div>'
        f'<div class="value">{_e(sessions["total"])}</div></div>'
        f'<div class="tile"><div class="label">Open connections</div>'
        f'<div class="value">{_e(sessions["connections_open"])}</div>'
        f'<div class="note">{_e(sessions["unauthenticated"])} not yet authenticated</div>'
        f"</div>{_replays_tile(sessions)}</div>{table}</section>"
    )


def _replays_tile(sessions: dict[str, Any]) -> str:
    """Sessions replaying from the journal now (absent from a document without it)."""
    active = sessions.get("replays_active")
    if active is None:
        return ""
    replayed = sessions.get("replay_bytes") or {}
    note = f"{rate(replayed.get('sendfile'), 'B')} sent with sendfile, " + (
        f"{rate(replayed.get('copy'), 'B')} copied"
    )
    return (
        '<div class="tile"><div class="label">Replays active</div>'
        f'<div class="value" data-replays="{_e(active)}">{_e(active)}</div>'
        f'<div class="note">{_e(note)}</div></div>'
    )


def relay_text(relay: dict[str, Any] | None) -> str:
    """A relay feed's upstream in words, after its detail ("" for other feeds)."""
    if not relay:
        return ""
    n = relay["upstreams"]
    where = f"upstream {relay['upstream']} of {n}" if relay["upstream"] else "no upstream"
    gaps = sum(relay["gaps"].values())
    resumes = relay["reconnects"].get("resume", 0)
    return f" · relay: {where}, {resumes} exact resume(s), {gaps} gap(s) reported"


def replay_text(journal: dict[str, Any] | None) -> str:
    """How far back a dataset can be replayed, in words (never the journal's error: a
    path or an errno is for the log)."""
    state = (journal or {}).get("state", "off")
    if state == "off":
        return "journal off"
    if state == "disabled":
        return "journal disabled: write error (see log)"
    oldest = journal.get("oldest_ts") if journal else None
    if oldest is None:
        return "journal on, nothing recorded yet"
    held = journal.get("span_s") if journal else None
    return f"replay back to {utc(oldest)} ({span(held)})"


#: candidate steps between two time-axis ticks, seconds
_TICK_STEPS = (5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600)


def _ticks(t0: float, t1: float, most: int = 6) -> list[float]:
    """Round wall-clock times inside [t0, t1], at most ``most`` of them."""
    span = t1 - t0
    step = next((s for s in _TICK_STEPS if span / s <= most), _TICK_STEPS[-1])
    first = -(-t0 // step) * step
    out: list[float] = []
    t = first
    while t <= t1 and len(out) < most + 1:
        out.append(t)
        t += step
    return out


def _spark(series: list[list[float]]) -> str:
    """Records in and out per second over wall-clock time, with a time axis in UTC."""
    if len(series) < 2:
        return ""
    width, height = 600.0, 70.0
    t0, t1 = series[0][0], series[-1][0]
    span = max(t1 - t0, 1e-9)
    top = max(max(p[1], p[2]) for p in series) or 1.0

    def x(t: float) -> float:
        return (t - t0) / span * width

    def line(i: int) -> str:
        return " ".join(
            f"{x(p[0]):.1f},{height - 2 - p[i] / top * (height - 6):.1f}" for p in series
        )

    # round times inside the chart, and both ends (a round time close to an end gives way)
    ticks = [t for t in _ticks(t0, t1, most=5) if 0.12 * span <= t - t0 <= 0.88 * span]
    ticks = [t0, *ticks, t1]
    grid = "".join(
        f'<line class="tick" x1="{x(t):.1f}" x2="{x(t):.1f}" y1="0" y2="{height:.0f}"/>'
        for t in ticks[1:-1]
    )
    labels = []
    for t in ticks:
        pct = (t - t0) / span * 100
        # the labels at the ends stay inside the chart's box
        align = " start" if t == t0 else " end" if t == t1 else " mid"
        labels.append(
            f'<span class="tl{align}" style="left:{pct:.2f}%">'
            f"{_e(time.strftime('%H:%M:%S', time.gmtime(t)))}</span>"
        )
    return (
        f'<svg class="spark" viewBox="0 0 {width:.0f} {height:.0f}" preserveAspectRatio="none"'
        ' role="img" aria-label="records per second in and out">'
        f"{grid}"
        f'<polyline class="in" fill="none" stroke-width="2" points="{line(1)}"/>'
        f'<polyline class="out" fill="none" stroke-width="2" points="{line(2)}"/></svg>'
        f'<div class="axis" aria-label="time (UTC)">{"".join(labels)}</div>'
        '<div class="legend"><i style="background:var(--accent)"></i>records in'
        '<i style="background:var(--ok)"></i>records out (all sessions)'
        f" · {_e(clock(t0))} to {_e(clock(t1))} UTC ({duration(t1 - t0)}), "
        f"peak {rate(top, 'rec/s')}</div>"
    )


def _throughput_section(tp: dict[str, Any]) -> str:
    rows = []
    for label, _ in RATE_WINDOWS:
        r = tp["windows"].get(label) or {}
        rows.append(
            "<tr>"
            + _td(_e(f"last {label[:-1]} min"), "window")
            + _td(_e(rate(r.get("records_in_per_s"), "rec/s")), "records in", num=True)
            + _td(_e(rate(r.get("bytes_in_per_s"), "B/s")), "bytes in", num=True)
            + _td(_e(rate(r.get("records_out_per_s"), "rec/s")), "records out", num=True)
            + _td(_e(rate(r.get("bytes_out_per_s"), "B/s")), "bytes out", num=True)
            + "</tr>"
        )
    return (
        '<section id="throughput"><h2>Throughput</h2>'
        + _table(
            [
                ("window", False),
                ("records in", True),
                ("bytes in", True),
                ("records out", True),
                ("bytes out", True),
            ],
            rows,
        )
        + _spark(tp["series"])
        + "</section>"
    )


def _feeds_section(feeds: list[dict[str, Any]]) -> str:
    rows = []
    for f in feeds:
        if not f["connected"]:
            state = '<span class="badge bad">down</span>'
        elif f["paused"]:
            state = '<span class="badge warn">paused</span>'
        elif f["last_record_age_s"] is not None and f["last_record_age_s"] > STALE_S:
            state = '<span class="badge warn">stale</span>'
        else:
            state = '<span class="badge ok">up</span>'
        paused = f"{duration(f['paused_total_s'])} in {f['pauses']} pause(s)"
        rows.append(
            "<tr>"
            + _td(_e(f["dataset"]), "dataset")
            + _td(state, "state")
            + _td(_e(duration(f["lag_s"])), "lag", num=True)
            + _td(_e(duration(f["last_record_age_s"])), "last record", num=True)
            + _td(_e(f"{f['records_in']:,}"), "records in", num=True)
            + _td(_e(paused if f["lossless"] or f["pauses"] else "–"), "paused", num=True)
            + _td(_e(replay_text(f.get("journal"))), "replay", cls=_replay_class(f))
            + _td(_e(f["detail"] + relay_text(f.get("relay"))), "detail", cls="detail")
            + "</tr>"
        )
    return (
        '<section id="feeds"><h2>Feeds</h2>'
        + _table(
            [
                ("dataset", False),
                ("state", False),
                ("lag", True),
                ("last record", True),
                ("records in", True),
                ("paused", True),
                ("replay", False),
                ("detail", False),
            ],
            rows,
        )
        + '<p class="muted">Lag: now minus the ts_event of the last record. '
        "Last record: time since the feed delivered one. Replay: the oldest record a "
        "<code>start=</code> subscription can get, and the history the journal holds "
        "(record time).</p></section>"
    )


def _replay_class(feed: dict[str, Any]) -> str:
    state = (feed.get("journal") or {}).get("state", "off")
    return "replay bad" if state == "disabled" else "replay"


def render_html(data: dict[str, Any]) -> str:
    """The page for a status document (what :func:`gateway.ops.status.document` returns)."""
    now = float(data["generated_at"])
    state = data["state"]
    gw = data.get("gateway")
    title = "Gateway status" if gw is not None else "Gateway probe status"
    reasons = "".join(f"<li>{_e(r)}</li>" for r in data["reasons"])
    sub = f"version {_e(data['version'])} · updated {_e(utc(now))}"
    if gw is not None:
        sub += (
            f" · up {_e(duration(gw['uptime_s']))} · port {_e(gw['port'])}"
            f" · loop {_e(gw['loop'] or '?')}"
        )
    sections: list[str] = []
    probe = data.get("probe")
    if probe is not None:
        sections.append(_uptime_section(probe))
        sections.append(_probe_section(probe, now))
    elif gw is not None:
        sections.append(
            '<section id="uptime"><h2>Uptime</h2><p class="muted">The probe is off: start the '
            "gateway with --strobe (or run gateway probe) to measure uptime.</p></section>"
        )
    if data.get("sessions") is not None:
        sections.append(_sessions_section(data["sessions"]))
    if data.get("throughput") is not None:
        sections.append(_throughput_section(data["throughput"]))
    if data.get("feeds") is not None:
        sections.append(_feeds_section(data["feeds"]))
    return fill(
        _template("status.html"),
        title=title,
        state_text=_STATE_TEXT[state],
        state_class=_STATE_CLASS[state],
        sub=Markup(sub),
        reasons=Markup(f'\n<ul class="reasons">{reasons}</ul>' if reasons else ""),
        sections=Markup("\n".join(sections)),
    ).rstrip("\n")
