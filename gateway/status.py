"""The operator HTTP port: /metrics, /healthz, /readyz, /status, /status.json.

A few hundred lines of stdlib asyncio, no framework. ``/status`` is a small server-rendered
HTML page (inline CSS, no script, refreshes itself) built from the same dictionary that
``/status.json`` returns, so the page and scripts always agree on the numbers.

The same server runs inside the gateway (``StatusServer(gateway)``: gateway, feeds,
sessions, throughput, and the strobe when ``--strobe`` is on) and inside a stand-alone
``gateway probe`` (``StatusServer(None, registry=..., prober=...)``: the probe only).
"""

from __future__ import annotations

import asyncio
import html
import json
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from gateway import __version__
from gateway.history import WINDOWS

if TYPE_CHECKING:
    from gateway.app import Gateway
    from gateway.probe import Prober

__all__ = ["Sample", "StatusServer", "ThroughputSampler", "assess", "render_html"]

_MAX_REQUEST = 8192
#: throughput is sampled this often and kept this long
SAMPLE_S = 1.0
KEEP_S = 15 * 60.0
RATE_WINDOWS: tuple[tuple[str, float], ...] = (("1m", 60.0), ("5m", 300.0), ("15m", 900.0))
#: a feed whose last record is older than this is called stale on the page
STALE_S = 60.0
WINDOW_NAMES = {
    "1h": "Last hour",
    "24h": "Last 24 hours",
    "7d": "Last 7 days",
    "30d": "Last 30 days",
}


@dataclass(frozen=True)
class Sample:
    t: float
    records_in: int
    bytes_in: int
    records_out: int
    bytes_out: float


class ThroughputSampler:
    """Cumulative counters sampled every second; rates over the last minutes."""

    def __init__(self, keep_s: float = KEEP_S, period_s: float = SAMPLE_S) -> None:
        self.samples: deque[Sample] = deque(maxlen=int(keep_s / period_s) + 2)

    def add(self, sample: Sample) -> None:
        self.samples.append(sample)

    def rates(self, window_s: float) -> dict[str, float] | None:
        """Per-second rates over the last ``window_s`` (or what is kept of it)."""
        if len(self.samples) < 2:
            return None
        last = self.samples[-1]
        first = last
        for s in reversed(self.samples):
            if last.t - s.t > window_s + 1e-6:
                break
            first = s
        dt = last.t - first.t
        if dt <= 0:
            return None
        return {
            "seconds": round(dt, 3),
            "records_in_per_s": (last.records_in - first.records_in) / dt,
            "bytes_in_per_s": (last.bytes_in - first.bytes_in) / dt,
            "records_out_per_s": (last.records_out - first.records_out) / dt,
            "bytes_out_per_s": (last.bytes_out - first.bytes_out) / dt,
        }

    def series(self, points: int = 90) -> list[list[float]]:
        """[t, records in/s, records out/s]: about ``points`` steps over what is kept."""
        out: list[list[float]] = []
        if len(self.samples) < 2:
            return out
        step_s = max(SAMPLE_S, (self.samples[-1].t - self.samples[0].t) / points)
        prev: Sample | None = None
        for s in self.samples:
            if prev is None:
                prev = s
                continue
            if s.t - prev.t >= step_s * 0.95 or s is self.samples[-1]:
                dt = s.t - prev.t
                if dt > 0:
                    out.append(
                        [
                            round(s.t, 3),
                            (s.records_in - prev.records_in) / dt,
                            (s.records_out - prev.records_out) / dt,
                        ]
                    )
                prev = s
        return out


class StatusServer:
    def __init__(
        self,
        gateway: Gateway | None,
        *,
        registry: CollectorRegistry | None = None,
        prober: Prober | None = None,
    ) -> None:
        self.gateway = gateway
        if registry is None:
            if gateway is None:
                raise ValueError("StatusServer needs a gateway or a registry")
            registry = gateway.metrics.registry
        self.registry = registry
        self._prober = prober
        self.sampler = ThroughputSampler()
        self._server: asyncio.Server | None = None
        self._sampling: asyncio.Task[None] | None = None

    @property
    def prober(self) -> Prober | None:
        if self._prober is not None:
            return self._prober
        return getattr(self.gateway, "strobe", None)

    async def start(self, host: str, port: int, reuse_port: bool = False) -> int:
        self._server = await asyncio.start_server(
            self._handle, host, port, reuse_port=reuse_port or None
        )
        if self.gateway is not None:
            self._sampling = asyncio.get_running_loop().create_task(self._sample_forever())
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._sampling is not None:
            self._sampling.cancel()
            try:
                await self._sampling
            except asyncio.CancelledError:
                pass
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    # --- HTTP ------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
        except (
            TimeoutError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ConnectionError,
        ):
            writer.close()
            return
        line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = line.split()
        method, path = (parts[0], parts[1]) if len(parts) >= 2 else ("", "")
        path = path.split("?", 1)[0]
        try:
            status, ctype, body = self.route(method, path)
        except Exception:  # pragma: no cover - a bug in a page must not kill the server
            import logging

            logging.getLogger("gateway.status").exception("status page failed: %s", path)
            status, ctype, body = "500 Internal Server Error", "text/plain", b"internal error\n"
        writer.write(
            f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            "Cache-Control: no-store\r\nConnection: close\r\n\r\n".encode()
            + (b"" if method == "HEAD" else body)
        )
        try:
            await writer.drain()
        except ConnectionError:
            pass
        writer.close()

    def route(self, method: str, path: str) -> tuple[str, str, bytes]:
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", "text/plain", b"method not allowed\n"
        gw = self.gateway
        if path == "/metrics":
            return "200 OK", CONTENT_TYPE_LATEST, generate_latest(self.registry)
        if path == "/healthz":
            return "200 OK", "text/plain", b"ok\n"
        if path == "/readyz":
            if gw is None:
                return "200 OK", "application/json", b'{"ready": true}'
            ok, detail = gw.ready()
            body = json.dumps({"ready": ok, "feeds": detail}).encode()
            return ("200 OK" if ok else "503 Service Unavailable"), "application/json", body
        if path == "/status.json":
            body = json.dumps(self.snapshot(), indent=1).encode()
            return "200 OK", "application/json", body
        if path in ("/status", "/status/", "/"):
            return "200 OK", "text/html; charset=utf-8", render_html(self.snapshot()).encode()
        return "404 Not Found", "text/plain", b"not found\n"

    # --- numbers -----------------------------------------------------------------------

    async def _sample_forever(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(SAMPLE_S)

    def sample(self) -> None:
        gw = self.gateway
        if gw is None:
            return
        rin = bin_ = rout = 0
        for feed in gw.feeds.values():
            rin += feed.stats.records_in
            bin_ += feed.stats.bytes_in
            rout += feed.fanout.records_out
        bout = sum(
            s.value
            for family in gw.metrics.bytes_out.collect()
            for s in family.samples
            if s.name.endswith("_total")
        )
        self.sampler.add(Sample(time.monotonic(), rin, bin_, rout, bout))

    def snapshot(self) -> dict[str, Any]:
        """Everything /status shows, as plain data (also /status.json)."""
        now = time.time()
        data: dict[str, Any] = {
            "generated_at": round(now, 3),
            "version": __version__,
            "gateway": None,
            "sessions": None,
            "throughput": None,
            "feeds": None,
            "probe": None,
        }
        gw = self.gateway
        if gw is not None:
            data.update(_gateway_part(gw, now))
            # samples are taken on the monotonic clock; scripts and the page want wall time
            offset = now - time.monotonic()
            data["throughput"] = {
                "windows": {label: self.sampler.rates(sec) for label, sec in RATE_WINDOWS},
                "series": [[round(t + offset, 3), a, b] for t, a, b in self.sampler.series()],
            }
        prober = self.prober
        if prober is not None:
            data["probe"] = prober.status()
        data["state"], data["reasons"] = assess(data)
        return data


def _gateway_part(gw: Gateway, now: float) -> dict[str, Any]:
    ready, detail = gw.ready()
    by_dataset: dict[str, dict[str, int]] = {}
    sessions = unauth = 0
    for conn in list(gw.state.connections):
        if conn.feed is None or conn.key is None:
            unauth += 1
            continue
        phase = "streaming" if conn.metadata_sent else "authenticated"
        counts = by_dataset.setdefault(conn.feed.dataset, {"streaming": 0, "authenticated": 0})
        counts[phase] += 1
        sessions += 1
    now_ns = int(now * 1e9)
    mono = time.monotonic()
    feeds = []
    for ds, feed in gw.feeds.items():
        st = feed.stats
        paused_total = feed.paused_total_s + (
            mono - feed.paused_since if feed.paused_since is not None else 0.0
        )
        feeds.append(
            {
                "dataset": ds,
                "connected": feed.connected,
                "detail": feed.state_detail,
                "paused": feed.paused,
                "paused_total_s": round(paused_total, 3),
                "pauses": feed.pauses,
                "lossless": feed.backpressure,
                "lag_s": (now_ns - st.last_ts_event) / 1e9 if st.last_ts_event else None,
                "last_record_age_s": now - st.last_record_at if st.last_record_at else None,
                "records_in": st.records_in,
                "bytes_in": st.bytes_in,
                "sessions": feed.fanout.member_count,
                "readiness": detail.get(ds, ""),
            }
        )
    return {
        "gateway": {
            "version": __version__,
            "started_at": gw.started_at,
            "uptime_s": round(now - gw.started_at, 3),
            "ready": ready,
            "accepting": gw.state.accepting,
            "port": gw.port,
            "loop": gw.loop_name,
        },
        "sessions": {
            "total": sessions,
            "by_dataset": by_dataset,
            "connections_open": len(gw.state.connections),
            "unauthenticated": unauth,
        },
        "feeds": feeds,
    }


def assess(data: dict[str, Any]) -> tuple[str, list[str]]:
    """operational / degraded / down, and why."""
    down: list[str] = []
    degraded: list[str] = []
    gw = data.get("gateway")
    if gw is not None and not gw["ready"]:
        down.append("gateway not ready" + ("" if gw["accepting"] else " (shutting down)"))
    for feed in data.get("feeds") or []:
        name = feed["dataset"]
        if not feed["connected"]:
            (degraded if gw and gw["ready"] else down).append(f"feed {name} down")
        elif feed["paused"]:
            degraded.append(f"feed {name} paused for a slow session")
        age = feed["last_record_age_s"]
        if feed["connected"] and age is not None and age > STALE_S:
            degraded.append(f"feed {name}: no record for {_duration(age)}")
    probe = data.get("probe")
    if probe is not None:
        last = probe.get("last") or (probe.get("recent") or [None])[0]
        if last is not None and not last["ok"]:
            down.append(f"probe failing at step {last['step']}")
        hour = (probe.get("uptime") or {}).get("1h") or {}
        if hour.get("failures"):
            degraded.append(f"{hour['failures']} failed strobe(s) in the last hour")
    if down:
        return "down", down + degraded
    if degraded:
        return "degraded", degraded
    return "operational", []


# --- HTML ------------------------------------------------------------------------------

_CSS = """
:root{--bg:#f6f7f9;--card:#fff;--fg:#1c2430;--muted:#5d6b7e;--line:#e3e7ec;
--ok:#17803d;--okbg:#e3f5e9;--warn:#9a5b00;--warnbg:#fdf1dc;--bad:#b42318;--badbg:#fde7e5;
--accent:#2357c6}
@media (prefers-color-scheme:dark){:root{--bg:#0f1419;--card:#171d25;--fg:#e6ebf1;
--muted:#98a5b5;--line:#2a3440;--ok:#4cc776;--okbg:#15301f;--warn:#f0b24a;--warnbg:#33270f;
--bad:#ff7b6e;--badbg:#3a1a17;--accent:#7aa7ff}}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);
font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif}
main{max-width:1080px;margin:0 auto;padding:16px}
header{display:flex;flex-wrap:wrap;align-items:center;gap:8px 16px;margin:8px 0 16px}
h1{font-size:1.45rem;margin:0}
h2{font-size:1.05rem;margin:0 0 10px}
.sub,.muted{color:var(--muted)}
.sub{width:100%;margin:0;font-size:.88rem}
.badge{display:inline-block;padding:3px 10px;border-radius:999px;font-weight:600;
font-size:.85rem;white-space:nowrap}
.ok{color:var(--ok);background:var(--okbg)}
.warn{color:var(--warn);background:var(--warnbg)}
.bad{color:var(--bad);background:var(--badbg)}
section{background:var(--card);border:1px solid var(--line);border-radius:12px;
padding:14px 16px;margin:0 0 14px}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(150px,1fr));gap:10px}
.cols{display:grid;grid-template-columns:repeat(auto-fit,minmax(280px,1fr));gap:6px 24px}
h3{font-size:.9rem;margin:6px 0 2px;color:var(--muted);font-weight:600}
.tile{border:1px solid var(--line);border-radius:10px;padding:10px 12px}
.tile .label{font-size:.82rem;color:var(--muted)}
.tile .value{font-size:1.6rem;font-weight:650;font-variant-numeric:tabular-nums;
overflow-wrap:anywhere}
.tile .note{font-size:.8rem;color:var(--muted)}
table{width:100%;border-collapse:collapse;font-variant-numeric:tabular-nums}
th,td{text-align:left;padding:6px 8px;border-bottom:1px solid var(--line);vertical-align:top}
th{font-size:.8rem;color:var(--muted);font-weight:600}
td.num,th.num{text-align:right}
ul.reasons{margin:6px 0 0;padding-left:20px}
.strip{display:flex;flex-wrap:wrap;gap:3px;margin:4px 0 0}
.strip span{width:12px;height:22px;border-radius:3px}
.strip .s-ok{background:var(--ok)}.strip .s-bad{background:var(--bad)}
.spark{width:100%;height:70px;display:block;margin-top:10px}
.spark .in{stroke:var(--accent)}.spark .out{stroke:var(--ok)}
.spark .tick{stroke:var(--line);stroke-width:1;vector-effect:non-scaling-stroke}
.axis{position:relative;height:18px;overflow:hidden;font-size:.75rem;color:var(--muted);
font-variant-numeric:tabular-nums;border-top:1px solid var(--line)}
.axis .tl{position:absolute;top:1px;transform:translateX(-50%);white-space:nowrap}
.axis .tl.start{transform:none}.axis .tl.end{transform:translateX(-100%)}
.strobes{display:inline-block;max-width:100%;margin-top:4px}
.strip-axis{display:flex;justify-content:space-between;gap:8px;font-size:.75rem;
color:var(--muted);font-variant-numeric:tabular-nums;margin-top:2px}
.covers{font-weight:400;font-size:.78rem;color:var(--muted)}
.legend{font-size:.8rem;color:var(--muted)}
.legend i{display:inline-block;width:10px;height:3px;margin:0 4px 3px 8px}
footer{font-size:.82rem;color:var(--muted);padding:4px 2px 24px}
a{color:var(--accent)}
.detail{overflow-wrap:anywhere}
@media (max-width:640px){
main{padding:10px}
.tile .value{font-size:1.35rem}
table.stack thead{display:none}
table.stack tr{display:block;border-bottom:1px solid var(--line);padding:6px 0}
table.stack td{display:flex;justify-content:space-between;gap:12px;border:0;padding:3px 2px;
text-align:right}
table.stack td::before{content:attr(data-label);color:var(--muted);text-align:left;
font-size:.85rem}
table.stack td.num{text-align:right}
.cols th,.cols td{padding:5px 4px}.cols td.num{white-space:nowrap}
.axis .tl.mid{display:none}
}
"""

_STATE_CLASS = {"operational": "ok", "degraded": "warn", "down": "bad"}
_STATE_TEXT = {"operational": "Operational", "degraded": "Degraded", "down": "Down"}


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def fmt_pct(ratio: float | None) -> str:
    return "no data" if ratio is None else f"{ratio * 100:.2f}%"


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    ms = seconds * 1000
    return f"{ms:.2f} ms" if ms < 10 else f"{ms:.1f} ms" if ms < 1000 else f"{seconds:.2f} s"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _rate(value: float | None, unit: str = "") -> str:
    if value is None:
        return "–"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= div:
            return f"{value / div:.2f} {suffix}{unit}"
    return f"{value:.0f} {unit}".rstrip()


def _utc(ts: float | None) -> str:
    if ts is None:
        return "–"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


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
    since = f", since {_utc(probe['first_strobe_at'])}" if probe["first_strobe_at"] else ""
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
    span = f"{covers_s:.0f} s" if 10 <= covers_s < 120 else _duration(covers_s)
    return f' <span class="covers">(data covers {_e(span)})</span>'


def _clock(ts: float, date: bool = False) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S" if date else "%H:%M:%S", time.gmtime(ts))


def _strip(recent: list[dict[str, Any]], interval_s: float) -> str:
    """One square per recent strobe, oldest first, each labelled with its time and result;
    the times of the first and last square written under the row."""
    if not recent:
        return ""
    squares = []
    for r in reversed(recent):
        outcome = f"ok, {_ms(r.get('total_s'))}" if r["ok"] else f"failed at {r['step']}"
        label = f"{_clock(r['ts'], date=True)} UTC: {outcome}"
        squares.append(
            f'<span class="{"s-ok" if r["ok"] else "s-bad"}" role="img" '
            f'data-ts="{r["ts"]:.3f}" title="{_e(label)}" aria-label="{_e(label)}"></span>'
        )
    oldest, newest = recent[-1]["ts"], recent[0]["ts"]
    date = time.gmtime(oldest)[:3] != time.gmtime(newest)[:3]
    return (
        '<div class="strobes"><div class="strip" role="group" '
        f'aria-label="recent strobes, oldest first">{"".join(squares)}</div>'
        f'<div class="strip-axis"><span>{_e(_clock(oldest, date))}</span>'
        f"<span>{_e(_clock(newest, date))} UTC</span></div></div>"
        f'<p class="legend">The last {len(recent)} strobes (one every {interval_s:g} s), '
        "oldest first; hover a square for its time and result.</p>"
    )


def _probe_section(probe: dict[str, Any], now: float) -> str:
    last = probe.get("last") or (probe.get("recent") or [None])[0]
    if last is None:
        status = '<p class="muted">No strobe yet.</p>'
    else:
        ago = _duration(now - last["ts"])
        if last["ok"]:
            status = (
                f'<p><span class="badge ok">ok</span> last strobe {ago} ago, total '
                f"{_e(_ms(last['total_s']))}, feed freshness "
                f"{_e(_duration(last['freshness_s']))}</p>"
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
                + "".join(
                    f'<td class="num">{_e(_ms(p.get(k)))}</td>' for k in ("p50", "p90", "p99")
                )
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
        f"</div></div>{table}</section>"
    )


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
        f" · {_e(_clock(t0))} to {_e(_clock(t1))} UTC ({_duration(t1 - t0)}), "
        f"peak {_rate(top, 'rec/s')}</div>"
    )


def _throughput_section(tp: dict[str, Any]) -> str:
    rows = []
    for label, _ in RATE_WINDOWS:
        r = tp["windows"].get(label) or {}
        rows.append(
            "<tr>"
            + _td(_e(f"last {label[:-1]} min"), "window")
            + _td(_e(_rate(r.get("records_in_per_s"), "rec/s")), "records in", num=True)
            + _td(_e(_rate(r.get("bytes_in_per_s"), "B/s")), "bytes in", num=True)
            + _td(_e(_rate(r.get("records_out_per_s"), "rec/s")), "records out", num=True)
            + _td(_e(_rate(r.get("bytes_out_per_s"), "B/s")), "bytes out", num=True)
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
        paused = f"{_duration(f['paused_total_s'])} in {f['pauses']} pause(s)"
        rows.append(
            "<tr>"
            + _td(_e(f["dataset"]), "dataset")
            + _td(state, "state")
            + _td(_e(_duration(f["lag_s"])), "lag", num=True)
            + _td(_e(_duration(f["last_record_age_s"])), "last record", num=True)
            + _td(_e(f"{f['records_in']:,}"), "records in", num=True)
            + _td(_e(paused if f["lossless"] or f["pauses"] else "–"), "paused", num=True)
            + _td(_e(f["detail"]), "detail", cls="detail")
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
                ("detail", False),
            ],
            rows,
        )
        + '<p class="muted">Lag: now minus the ts_event of the last record. '
        "Last record: time since the feed delivered one.</p></section>"
    )


def render_html(data: dict[str, Any]) -> str:
    now = float(data["generated_at"])
    state = data["state"]
    gw = data.get("gateway")
    title = "Gateway status" if gw is not None else "Gateway probe status"
    reasons = "".join(f"<li>{_e(r)}</li>" for r in data["reasons"])
    sub = f"version {_e(data['version'])} · updated {_e(_utc(now))}"
    if gw is not None:
        sub += (
            f" · up {_e(_duration(gw['uptime_s']))} · port {_e(gw['port'])}"
            f" · loop {_e(gw['loop'] or '?')}"
        )
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<meta http-equiv="refresh" content="15">',
        '<link rel="icon" href="data:,">',
        f"<title>{_e(title)}: {_e(_STATE_TEXT[state])}</title>",
        f"<style>{_CSS}</style></head><body><main>",
        f'<header><h1>{_e(title)}</h1><span class="badge {_STATE_CLASS[state]}" id="state">'
        f"{_e(_STATE_TEXT[state])}</span>",
        f'<p class="sub">{sub}</p>',
        f'<ul class="reasons">{reasons}</ul>' if reasons else "",
        "</header>",
    ]
    probe = data.get("probe")
    if probe is not None:
        parts.append(_uptime_section(probe))
        parts.append(_probe_section(probe, now))
    elif gw is not None:
        parts.append(
            '<section id="uptime"><h2>Uptime</h2><p class="muted">The probe is off: start the '
            "gateway with --strobe (or run gateway probe) to measure uptime.</p></section>"
        )
    if data.get("sessions") is not None:
        parts.append(_sessions_section(data["sessions"]))
    if data.get("throughput") is not None:
        parts.append(_throughput_section(data["throughput"]))
    if data.get("feeds") is not None:
        parts.append(_feeds_section(data["feeds"]))
    parts.append(
        '<footer>Also: <a href="/status.json">/status.json</a> · <a href="/metrics">/metrics</a>'
        ' · <a href="/readyz">/readyz</a> · refreshes every 15 s</footer></main></body></html>'
    )
    return "\n".join(p for p in parts if p)
