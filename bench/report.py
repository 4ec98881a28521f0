"""results.json, the RESULTS.md tables (with the targets met/missed) and the PNG plots."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final

from bench.replay_report import replay_table, replay_targets
from bench.workers_report import workers_table, workers_targets

__all__ = [
    "by_workers",
    "evaluate_targets",
    "plot_caption",
    "write_json",
    "write_markdown",
    "write_plots",
]

#: a gateway case run with ``--workers N`` (N > 1) is shown as the system ``gateway-wN``
WORKERS_PREFIX: Final = "gateway-w"
SYSTEM_ORDER: Final = ("raw", "gateway", "nats", "redis", "zmq")


class _BySystem(dict[str, str]):
    """System -> name/colour, ``gateway-wN`` included (derived from the gateway's)."""

    def __init__(self, known: dict[str, str], workers: str) -> None:
        super().__init__(known)
        self.workers = workers

    def __missing__(self, key: str) -> str:
        if key.startswith(WORKERS_PREFIX) and key[len(WORKERS_PREFIX) :].isdigit():
            n = int(key[len(WORKERS_PREFIX) :])
            if self.workers.startswith("#"):  # a colour: darker blues for more workers
                shades = ("#17becf", "#3b5b92", "#9467bd", "#8c564b", "#e377c2")
                return shades[(n.bit_length() - 2) % len(shades)]
            return self.workers.format(n=n)
        raise KeyError(key)


SYSTEM_NAMES: Final = _BySystem(
    {
        "raw": "raw limit (Python epoll sender)",
        "gateway": "gateway",
        "nats": "NATS",
        "redis": "Redis pub/sub",
        "zmq": "ZeroMQ (XPUB, byte-counting subscribers)",
    },
    "gateway, {n} workers",
)
#: one colour per system in every plot
SYSTEM_COLORS: Final = _BySystem(
    {
        "raw": "#7f7f7f",
        "gateway": "#1f77b4",
        "nats": "#2ca02c",
        "redis": "#d62728",
        "zmq": "#ff7f0e",
    },
    "#",
)


def by_workers(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The results as the tables and plots show them: a gateway case run at N > 1 workers
    becomes system ``gateway-wN`` (its own row and line; targets read the single-process
    rows), its params without ``workers``. The ``workers`` scenario keeps its own rows."""
    out = []
    for r in results:
        params = r.get("params") or {}
        workers = params.get("workers")
        if r.get("system") == "gateway" and r.get("scenario") != "workers" and workers:
            rest = {k: v for k, v in params.items() if k != "workers"}
            system = "gateway" if workers == 1 else f"{WORKERS_PREFIX}{workers}"
            r = {**r, "system": system, "params": rest}
        out.append(r)
    return out


def _ok(case: dict[str, Any] | None) -> bool:
    return case is not None and case.get("status") == "ok"


def find(
    results: Iterable[dict[str, Any]],
    scenario: str,
    system: str,
    n: int | None = None,
    **params: Any,
) -> dict[str, Any] | None:
    for r in results:
        if r["scenario"] != scenario or r["system"] != system:
            continue
        if n is not None and r["n"] != n:
            continue
        if any(r.get("params", {}).get(k) != v for k, v in params.items()):
            continue
        return r
    return None


def _p99(case: dict[str, Any] | None) -> float | None:
    if not _ok(case):
        return None
    assert case is not None
    lat = (case.get("latency") or {}).get("probe") or (case.get("latency") or {}).get("all")
    return float(lat["p99"]) if lat else None


def _target(
    name: str, measured: str, threshold: str, ratio: float | None, ok: bool | None, why: str = ""
) -> dict[str, Any]:
    status = "n/a" if ok is None else ("met" if ok else "missed")
    return {
        "target": name,
        "measured": measured,
        "threshold": threshold,
        "ratio": None if ratio is None else round(ratio, 3),
        "status": status,
        "detail": why,
    }


def _why_missing(*cases: tuple[str, dict[str, Any] | None]) -> str:
    for label, c in cases:
        if c is None:
            return f"{label} not run"
        if c.get("status") != "ok":
            return f"{label} {c.get('status')}: {c.get('reason', '')}"[:160]
    return ""


def evaluate_targets(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    results = by_workers(results)
    out = []
    gw = find(results, "fanout", "gateway", 100)
    raw = find(results, "fanout", "raw", 100)
    nats = find(results, "fanout", "nats", 100)
    if _ok(gw) and _ok(raw):
        assert gw is not None and raw is not None
        r = gw["throughput_rps"] / max(raw["throughput_rps"], 1)
        out.append(
            _target(
                "fanout N=100: gateway >= 85% of the raw limit",
                f"{gw['throughput_rps'] / 1e6:.2f} vs {raw['throughput_rps'] / 1e6:.2f} M rec/s",
                ">= 0.85x",
                r,
                r >= 0.85,
            )
        )
    else:
        out.append(
            _target(
                "fanout N=100: gateway >= 85% of the raw limit",
                "-",
                ">= 0.85x",
                None,
                None,
                _why_missing(("gateway", gw), ("raw", raw)),
            )
        )
    if _ok(gw) and _ok(nats):
        assert gw is not None and nats is not None
        r = gw["throughput_rps"] / max(nats["throughput_rps"], 1)
        out.append(
            _target(
                "fanout N=100: gateway >= 10x NATS",
                f"{gw['throughput_rps'] / 1e6:.2f} vs {nats['throughput_rps'] / 1e6:.2f} M rec/s",
                ">= 10x",
                r,
                r >= 10,
            )
        )
    else:
        out.append(
            _target(
                "fanout N=100: gateway >= 10x NATS",
                "-",
                ">= 10x",
                None,
                None,
                _why_missing(("gateway", gw), ("NATS", nats)),
            )
        )
    for n in (100, 1000):
        gw = find(results, "filtered", "gateway", n)
        nats = find(results, "filtered", "nats", n)
        name = f"filtered N={n}: gateway >= 2x NATS (delivered records/s)"
        if _ok(gw) and _ok(nats):
            assert gw is not None and nats is not None
            r = gw["throughput_rps"] / max(nats["throughput_rps"], 1)
            out.append(
                _target(
                    name,
                    f"{gw['throughput_rps'] / 1e6:.3f} vs "
                    f"{nats['throughput_rps'] / 1e6:.3f} M rec/s",
                    ">= 2x",
                    r,
                    r >= 2,
                )
            )
        else:
            out.append(
                _target(
                    name, "-", ">= 2x", None, None, _why_missing(("gateway", gw), ("NATS", nats))
                )
            )
    gw = find(results, "latency", "gateway", 100, rate=50_000)
    nats = find(results, "latency", "nats", 100, rate=50_000)
    gp, np_ = _p99(gw), _p99(nats)
    name = "latency N=100 @ 50k rec/s: gateway p99 <= 1/2 NATS p99"
    if gp is not None and np_ is not None:
        r = gp / max(np_, 1.0)
        out.append(_target(name, f"{gp:,.0f} vs {np_:,.0f} us", "<= 0.5x", r, r <= 0.5))
    else:
        out.append(
            _target(name, "-", "<= 0.5x", None, None, _why_missing(("gateway", gw), ("NATS", nats)))
        )
    name = "latency N=100 @ 50k rec/s: gateway p99 < 1 ms"
    if gp is not None:
        out.append(_target(name, f"{gp:,.0f} us", "< 1,000 us", gp / 1000, gp < 1000))
    else:
        out.append(_target(name, "-", "< 1,000 us", None, None, _why_missing(("gateway", gw))))
    idle = find(results, "idle", "gateway")
    name = "idle: gateway RSS per idle session < 30 KiB"
    if _ok(idle) and idle is not None and idle.get("sessions", 0) >= 5000:
        v = float(idle["rss_per_session_kib"])
        out.append(
            _target(
                name, f"{v:.1f} KiB ({idle['sessions']:,} sessions)", "< 30 KiB", v / 30, v < 30
            )
        )
    else:
        why = _why_missing(("gateway idle", idle)) or "fewer than 5,000 sessions (quick mode)"
        out.append(
            _target(
                name,
                "-"
                if idle is None or not _ok(idle)
                else f"{idle['rss_per_session_kib']:.1f} KiB ({idle.get('sessions', 0)} sessions)",
                "< 30 KiB",
                None,
                None,
                why,
            )
        )
    out += replay_targets(results)
    out += workers_targets(results)
    return out


def loss_summary(results: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for r in results:
        if r.get("status") == "skipped":
            continue
        s = out.setdefault(
            r["system"],
            {
                "cases": 0,
                "errors": 0,
                "lost": 0,
                "extra": 0,
                "gaps": 0,
                "unexpected": 0,
                "failed_sessions": 0,
                "not_loss_free": 0,
            },
        )
        s["cases"] += 1
        if r.get("status") != "ok":
            s["errors"] += 1
            continue
        for k in ("lost", "extra", "gaps", "unexpected", "failed_sessions"):
            s[k] += int(r.get(k, 0))
        s["not_loss_free"] += not r.get("loss_free", False)
    return out


def write_json(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str))
    tmp.replace(path)


# --- markdown ---------------------------------------------------------------------------


def _m(case: dict[str, Any] | None, key: str, digits: int = 2) -> str:
    value = None if case is None else case.get(key)
    return "–" if value is None else f"{value / 1e6:.{digits}f}"


def _cell(case: dict[str, Any] | None, value: str) -> str:
    if case is None:
        return "–"
    if case.get("status") == "skipped":
        return "skipped"
    if case.get("status") != "ok":
        return "error"
    mark = "" if case.get("loss_free") else " ⚠loss"
    if case.get("paced_s", 0) > 0.25 * max(case.get("span_s", 0), 1e-9):
        mark += " †"
    return value + mark


def _systems(results: list[dict[str, Any]], scenario: str) -> list[str]:
    present = {r["system"] for r in results if r["scenario"] == scenario}
    order = [s for s in SYSTEM_ORDER if s in present]
    workers = sorted(
        (s for s in present if s.startswith(WORKERS_PREFIX)),
        key=lambda s: int(s[len(WORKERS_PREFIX) :]),
    )
    at = order.index("gateway") + 1 if "gateway" in order else min(len(order), 1)
    return order[:at] + workers + order[at:]


def _ns(results: list[dict[str, Any]], scenario: str) -> list[int]:
    return sorted({r["n"] for r in results if r["scenario"] == scenario})


def write_markdown(path: Path, doc: dict[str, Any]) -> None:
    meta = doc["meta"]
    results: list[dict[str, Any]] = by_workers(doc["results"])
    m = meta["machine"]
    v = meta["versions"]
    lines = [f"# Benchmark results, {meta['run_id']}", ""]
    lines += [
        f"- **Date:** {m['date']}",
        f"- **Machine:** {m['cpu_model']}, {m['cores']} cores"
        + (
            f" ({m['usable_cpus']} usable)"
            if m.get("usable_cpus", m["cores"]) != m["cores"]
            else ""
        )
        + f", {m['memory_gib']} GiB, kernel {m['kernel']} (host `{m['hostname']}`)",
        "- **Versions:** " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"- **Mode:** {'quick (tiny N and durations: a correctness run, not timings)' if meta['quick'] else 'full'}; "  # noqa: E501
        f"throughput runs {meta['plan']['duration_s']} s of publishing per case, latency runs "
        f"{meta['plan']['latency_duration_s']} s; wall time {meta.get('elapsed_s', 0):.0f} s",
        "- Server, publisher and subscriber processes share the machine's cores; compare "
        "systems only within one run (the same case moves by ±20% between runs).",
        "- The gateway is fed through a **lossless** feed (`ingest://…?backpressure=1`: it "
        "stops reading its publisher while a session is over its high-water mark) and its "
        "sessions ask for `slow_reader_behavior=warn`; every figure is for complete, in-order "
        "delivery (see the loss table).",
    ]
    if meta.get("note"):
        lines.append(f"- **Note:** {meta['note']}")
    lines += [
        "",
        "## Targets",
        "",
        "| target | measured | threshold | ratio | status |",
        "|---|---|---|---|---|",
    ]
    for t in doc["targets"]:
        status = {"met": "✅ met", "missed": "❌ missed"}.get(t["status"], "n/a")
        detail = f" ({t['detail']})" if t["detail"] else ""
        ratio = "–" if t["ratio"] is None else f"{t['ratio']:.2f}"
        lines.append(
            f"| {t['target']} | {t['measured']} | {t['threshold']} | {ratio} | {status}{detail} |"
        )
    lines += ["", "## Peers", "", "| peer | status | version / reason |", "|---|---|---|"]
    for p in doc["peers"]:
        lines.append(
            f"| {p['name']} | {'used' if p['available'] else '**skipped**'} | "
            f"{p['version'] if p['available'] else p['reason']} |"
        )
    lines += [
        "",
        "## Loss (every run checks every subscriber's count and sequence numbers)",
        "",
        "| system | cases | errors | records lost | extra | sequence breaks | "
        "foreign records | failed sessions | cases not loss-free |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for system, s in doc["loss"].items():
        lines.append(
            f"| {system} | {s['cases']} | {s['errors']} | {s['lost']:,} | "
            f"{s['extra']:,} | {s['gaps']:,} | {s['unexpected']:,} | "
            f"{s['failed_sessions']} | {s['not_loss_free']} |"
        )
    lines += _fanout_table(results) + _filtered_table(results) + _zstd_table(results)
    lines += _latency_table(results) + _idle_table(results) + _connect_table(results)
    lines += replay_table(results)
    lines += workers_table(results)
    errors = [r for r in results if r.get("status") == "error"]
    if errors:
        lines += ["", "## Errors", ""]
        for r in errors:
            lines.append(
                f"- {r['scenario']} {r['system']} N={r['n']} {r.get('params', '')}: "
                f"{r.get('reason', '')}"
            )
    noted = [r for r in results if r.get("status") == "ok" and r.get("notes")]
    if noted:
        lines += ["", "## Subscriber notes (first few per case)", ""]
        for r in noted[:20]:
            lines.append(
                f"- {r['scenario']} {r['system']} N={r['n']}: " + "; ".join(r["notes"][:3])
            )
    lines += ["", "Plots: " + ", ".join(f"`{p}`" for p in doc.get("plots", [])), ""]
    path.write_text("\n".join(lines))


def _fanout_table(results: list[dict[str, Any]]) -> list[str]:
    ns = _ns(results, "fanout")
    if not ns:
        return []
    lines = [
        "",
        "## fanout: one feed of 80-byte MBP-1 records to N subscribers of everything",
        "",
        "Million records/s delivered (all subscribers together); in brackets the "
        "server's CPU seconds per million delivered records (for the raw limit and ZeroMQ "
        "the server is the sending process). † the publisher waited on the in-flight "
        "budget for over a quarter of the run (the peer had more than the budget queued).",
        "",
        "| system | " + " | ".join(f"N={n}" for n in ns) + " |",
        "|---|" + "---|" * len(ns),
    ]
    for s in _systems(results, "fanout"):
        cells = []
        for n in ns:
            c = find(results, "fanout", s, n)
            cells.append(
                _cell(
                    c,
                    f"{_m(c, 'throughput_rps')} ({(c or {}).get('server_cpu_s_per_m', 0):.3f})",
                )
            )
        lines.append(f"| {SYSTEM_NAMES[s]} | " + " | ".join(cells) + " |")
    return lines


def _filtered_table(results: list[dict[str, Any]]) -> list[str]:
    ns = _ns(results, "filtered")
    if not ns:
        return []
    lines = [
        "",
        "## filtered: 1,000 instruments, each session subscribes to 10 (Zipf-skewed popularity)",
        "",
        "Million records/s delivered / ingest the server sustained (records published "
        "÷ time to the last delivery). Peers use one subject / channel / topic per "
        "instrument; the gateway gets raw-symbol subscriptions resolved from its feed's "
        "Metadata mappings. † as above.",
        "",
        "| system | " + " | ".join(f"N={n}" for n in ns) + " |",
        "|---|" + "---|" * len(ns),
    ]
    for s in _systems(results, "filtered"):
        cells = []
        for n in ns:
            c = find(results, "filtered", s, n)
            cells.append(
                _cell(
                    c,
                    f"{_m(c, 'throughput_rps', 3)} / {_m(c, 'ingest_rps', 3)}",
                )
            )
        lines.append(f"| {SYSTEM_NAMES[s]} | " + " | ".join(cells) + " |")
    return lines


def _zstd_table(results: list[dict[str, Any]]) -> list[str]:
    rows = [r for r in results if r["scenario"] == "zstd"]
    if not rows:
        return []
    lines = [
        "",
        "## zstd: compressed sessions vs uncompressed (gateway only)",
        "",
        "| mode | N | delivered M rec/s | gateway CPU s per M records | "
        "compression ratio | loss-free |",
        "|---|---|---|---|---|---|",
    ]
    for r in sorted(
        rows, key=lambda r: (r["params"]["mode"], r["n"], len(r["system"]), r["system"])
    ):
        mode = r["params"]["mode"]
        if r["system"] != "gateway":
            mode += f" ({SYSTEM_NAMES[r['system']].removeprefix('gateway, ')})"
        if r.get("status") != "ok":
            why = f": {r.get('reason', '')[:80]}" if r.get("status") == "skipped" else ""
            lines.append(f"| {mode} | {r['n']} | {r.get('status')}{why} | | | |")
            continue
        lines.append(
            f"| {mode} | {r['n']} | {_m(r, 'throughput_rps')} | "
            f"{r.get('server_cpu_s_per_m', 0):.3f} | {r['compression_ratio']:.2f} | "
            f"{'yes' if r['loss_free'] else 'NO'} |"
        )
    return lines


def _latency_table(results: list[dict[str, Any]]) -> list[str]:
    rows = [r for r in results if r["scenario"] == "latency"]
    if not rows:
        return []
    systems = _systems(results, "latency")
    keys = sorted({(r["n"], r["params"]["rate"]) for r in rows})
    lines = [
        "",
        "## latency: publisher write → subscriber recv (µs: p50 / p99 / p99.9 / max)",
        "",
        "Measured at the probe, the subscriber that connected last (served last); "
        "⚠ marks a system that could not sustain the rate (publisher fell behind).",
        "",
        "| case | " + " | ".join(SYSTEM_NAMES[s] for s in systems) + " |",
        "|---|" + "---|" * len(systems),
    ]
    for n, rate in keys:
        cells = []
        for s in systems:
            c = find(results, "latency", s, n, rate=rate)
            lat = ((c or {}).get("latency") or {}).get("probe")
            text = (
                "–"
                if not lat
                else (f"{lat['p50']:,} / {lat['p99']:,} / {lat['p99.9']:,} / {lat['max']:,}")
            )
            if c and c.get("overloaded"):
                text += f" ⚠ {c.get('achieved_rate', 0):,}/s"
            cells.append(_cell(c, text))
        lines.append(f"| N={n}, {rate // 1000}k rec/s | " + " | ".join(cells) + " |")
    return lines


def _idle_table(results: list[dict[str, Any]]) -> list[str]:
    rows = [r for r in results if r["scenario"] == "idle"]
    if not rows:
        return []
    lines = [
        "",
        "## idle: authenticated sessions, heartbeats, no data; then one burst",
        "",
        "| system | sessions | RSS per session KiB | server CPU while idle | "
        "heartbeats seen (sessions) | burst of 800 records to all: s | loss-free |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(
                f"| {SYSTEM_NAMES[r['system']]} | {r['n']} | {r.get('status')}: "
                f"{r.get('reason', '')[:80]} | | | | |"
            )
            continue
        hb = (
            f"{r['heartbeats']:,} ({r['sessions_with_heartbeat']:,}; every "
            f"{r['heartbeat_interval_s']} s)"
            if r.get("heartbeat_interval_s")
            else "n/a"
        )
        lines.append(
            f"| {SYSTEM_NAMES[r['system']]} | {r['sessions']:,} | "
            f"{r['rss_per_session_kib']:.1f} | {100 * r['idle_cpu_fraction']:.1f}% | "
            f"{hb} | {r['burst_s']:.3f} | {'yes' if r['loss_free'] else 'NO'} |"
        )
    return lines


def _connect_table(results: list[dict[str, Any]]) -> list[str]:
    rows = [r for r in results if r["scenario"] == "connect"]
    if not rows:
        return []
    lines = [
        "",
        "## connect: a storm of connect + auth + subscribe",
        "",
        "| system | sessions | time to all streaming s | per session p50 / p99 / max ms | "
        "server CPU s | failed | loss-free (burst after) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("status") != "ok" or "all_streaming_s" not in r:
            lines.append(
                f"| {SYSTEM_NAMES[r['system']]} | {r['n']} | {r.get('status')}: "
                f"{r.get('reason', '')[:80]} | | | | |"
            )
            continue
        p = r["per_session_ms"]
        lines.append(
            f"| {SYSTEM_NAMES[r['system']]} | {r['sessions']:,} | "
            f"{r['all_streaming_s']:.3f} | {p['p50']} / {p['p99']} / {p['max']} | "
            f"{r['server_cpu_s']:.2f} | {r['failed_sessions']} | "
            f"{'yes' if r['loss_free'] else 'NO'} |"
        )
    return lines


# --- plots ------------------------------------------------------------------------------


def plot_caption(meta: dict[str, Any]) -> str:
    """Which machine and which run a plot comes from (figures mean nothing without it)."""
    m = meta.get("machine") or {}
    mode = " (quick)" if meta.get("quick") else ""
    return (
        f"run {meta.get('run_id', '?')}{mode} on {m.get('cores', '?')}-core "
        f"{m.get('cpu_model', '?')}, {m.get('memory_gib', '?')} GiB, kernel {m.get('kernel', '?')}"
    )


def write_plots(outdir: Path, results: list[dict[str, Any]], caption: str = "") -> list[str]:
    results = by_workers(results)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made: list[str] = []
    for scenario in ("fanout", "filtered"):
        ns = _ns(results, scenario)
        if not ns:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for s in _systems(results, scenario):
            pts = [
                (r["n"], r["throughput_rps"] / 1e6)
                for r in results
                if r["scenario"] == scenario and r["system"] == s and _ok(r)
            ]
            if pts:
                pts.sort()
                ax.plot(
                    [p[0] for p in pts],
                    [p[1] for p in pts],
                    marker="o",
                    label=SYSTEM_NAMES[s],
                    color=SYSTEM_COLORS[s],
                )
        ax.set_xscale("log")
        ax.set_xticks(ns, [str(n) for n in ns])
        if scenario == "filtered":
            ax.set_yscale("log")
        ax.set_xlabel("subscribers (N)")
        ax.set_ylabel("million records/s delivered")
        ax.set_title(f"{scenario}: throughput vs subscribers")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        name = f"{scenario}_throughput.png"
        _caption(fig, caption)
        fig.tight_layout(rect=(0, 0.04, 1, 1))
        fig.savefig(outdir / name, dpi=110)
        plt.close(fig)
        made.append(name)
    rows = [r for r in results if r["scenario"] == "latency" and _ok(r) and r.get("latency")]
    keys = sorted({(r["n"], r["params"]["rate"]) for r in rows})
    if keys:
        cols = min(3, len(keys))
        nrows = (len(keys) + cols - 1) // cols
        fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.8 * nrows), squeeze=False)
        for ax, (n, rate) in zip(axes.flat, keys, strict=False):
            for s in _systems(results, "latency"):
                c = find(rows, "latency", s, n, rate=rate)
                lat = ((c or {}).get("latency") or {}).get("probe")
                if not lat:
                    continue
                # The tail on a log axis: the fraction of samples slower than x, so p99
                # and p99.9 are as far apart as p50 and p90.
                pts = [(max(1, v), 1 - p / 100) for p, v in lat["cdf"] if p < 100]
                if not pts:
                    continue
                ax.plot(
                    [x for x, _ in pts],
                    [y for _, y in pts],
                    label=SYSTEM_NAMES[s].split(" (")[0],
                    color=SYSTEM_COLORS[s],
                )
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_ylim(1e-4, 1)
            ax.set_yticks(
                [1, 0.5, 0.1, 0.01, 0.001, 0.0001], ["p0", "p50", "p90", "p99", "p99.9", "p99.99"]
            )
            ax.set_title(f"N={n}, {rate // 1000}k rec/s (last subscriber)", fontsize=9)
            ax.set_xlabel("latency µs")
            ax.set_ylabel("slower than x (log tail)")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(keys) :]:
            ax.axis("off")
        _caption(fig, caption)
        fig.tight_layout(rect=(0, 0.04, 1, 1))
        fig.savefig(outdir / "latency_cdf.png", dpi=110)
        plt.close(fig)
        made.append("latency_cdf.png")
    zrows = [r for r in results if r["scenario"] == "zstd" and _ok(r)]
    if zrows:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        modes = sorted({(r["params"]["mode"], r["system"]) for r in zrows})
        for mode, system in modes:
            pts = sorted(
                (r["n"], r.get("server_cpu_s_per_m", 0))
                for r in zrows
                if r["params"]["mode"] == mode and r["system"] == system
            )
            label = mode if system == "gateway" else f"{mode}, {SYSTEM_NAMES[system][9:]}"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set_xscale("log")
        ax.set_xlabel("sessions (N)")
        ax.set_ylabel("gateway CPU s per million delivered records")
        ax.set_title("zstd: gateway CPU cost")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        _caption(fig, caption)
        fig.tight_layout(rect=(0, 0.04, 1, 1))
        fig.savefig(outdir / "zstd_cpu.png", dpi=110)
        plt.close(fig)
        made.append("zstd_cpu.png")
    return made


def _caption(fig: Any, caption: str) -> None:
    if caption:
        fig.text(0.5, 0.005, caption, ha="center", va="bottom", fontsize=7, color="#555555")
