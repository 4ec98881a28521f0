"""The ``relay`` scenario's summary: medians per part over the repeats, the edge's
throughput against the two-hop raw limit, the latency the edge adds to direct service,
the targets, the RESULTS.md section, ``relay.json``, ``RELAY.md`` and ``relay.png``.

Targets (issue 16):

* throughput, N=100: edge ≥ 80 % of ``raw-2hop`` (ratio of the medians);
* latency, N=100 at 50k records/s, the probe (the session served last): the median p50 of
  ``edge-latency`` at most 100 µs over the median p50 of ``direct-latency``, p99 at most
  1 ms over.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import IO, Any, Final

from bench.replay_report import _target

__all__ = [
    "THROUGHPUT_TARGET",
    "append_relay_section",
    "relay_rows",
    "relay_summary",
    "relay_table",
    "relay_targets",
    "write_relay_outputs",
]

THROUGHPUT_TARGET: Final = 0.80
#: the targets hold at this many sessions (a --quick run's N=3 is a correctness run)
TARGET_N: Final = 100
P50_TARGET_US: Final = 100.0
P99_TARGET_US: Final = 1000.0
PART_TITLES: Final = {
    "raw-2hop": "raw sender → bare relay → N receivers (two-hop limit)",
    "edge": "publisher → primary → edge (lsg://) → N sessions",
    "direct-latency": "publisher → gateway → N sessions (direct)",
    "edge-latency": "publisher → primary → edge → N sessions",
}
PART_COLORS: Final = {
    "raw-2hop": "#7f7f7f",
    "edge": "#1f77b4",
    "direct-latency": "#2ca02c",
    "edge-latency": "#1f77b4",
}


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _probe(r: dict[str, Any]) -> dict[str, Any] | None:
    lat = r.get("latency") or {}
    return lat.get("probe") or lat.get("all")


def relay_rows(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """part -> every run's figures and their medians."""
    rows: dict[str, dict[str, Any]] = {}
    for r in results:
        if r.get("scenario") != "relay":
            continue
        part = str((r.get("params") or {}).get("part"))
        row = rows.setdefault(
            part,
            {
                "part": part,
                "system": r.get("system"),
                "n": r.get("n"),
                "runs": 0,
                "ok_runs": 0,
                "errors": [],
                "loss_free": True,
                "throughput_rps": [],
                "p50_us": [],
                "p99_us": [],
                "p999_us": [],
                "server_cpu_s_per_m": [],
                "machine_busy": [],
                "overloaded": 0,
            },
        )
        row["runs"] += 1
        if r.get("status") != "ok":
            row["errors"].append(f"{r.get('status')}: {str(r.get('reason', ''))[:200]}")
            row["loss_free"] = False
            continue
        row["ok_runs"] += 1
        row["loss_free"] = row["loss_free"] and bool(r.get("loss_free"))
        row["machine_busy"].append(float(r.get("machine_busy", 0)))
        if part.endswith("latency"):
            lat = _probe(r)
            if lat:
                row["p50_us"].append(float(lat["p50"]))
                row["p99_us"].append(float(lat["p99"]))
                row["p999_us"].append(float(lat["p99.9"]))
            row["overloaded"] += bool(r.get("overloaded"))
        else:
            row["throughput_rps"].append(float(r.get("throughput_rps", 0)))
            if r.get("server_cpu_s_per_m") is not None:
                row["server_cpu_s_per_m"].append(float(r["server_cpu_s_per_m"]))
    for row in rows.values():
        for key in ("throughput_rps", "p50_us", "p99_us", "p999_us", "server_cpu_s_per_m"):
            row[f"median_{key}"] = _median(row[key])
        row["median_machine_busy"] = _median(row["machine_busy"])
    return rows


def relay_figures(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The ratio and the differences the targets read (None where a part is missing)."""
    rows = relay_rows(results)
    raw = rows.get("raw-2hop", {}).get("median_throughput_rps")
    edge = rows.get("edge", {}).get("median_throughput_rps")
    direct = rows.get("direct-latency", {})
    via = rows.get("edge-latency", {})
    out: dict[str, Any] = {
        "throughput_ratio": round(edge / raw, 3) if edge and raw else None,
        "p50_diff_us": None,
        "p99_diff_us": None,
    }
    for p in ("p50", "p99"):
        a, b = direct.get(f"median_{p}_us"), via.get(f"median_{p}_us")
        if a is not None and b is not None:
            out[f"{p}_diff_us"] = b - a
    # paired per repeat as well (the same moment of the machine)
    pairs = []
    for r_edge in results:
        params = r_edge.get("params") or {}
        if r_edge.get("scenario") != "relay" or params.get("part") != "edge":
            continue
        r_raw = next(
            (
                r
                for r in results
                if r.get("scenario") == "relay"
                and (r.get("params") or {}).get("part") == "raw-2hop"
                and (r.get("params") or {}).get("repeat") == params.get("repeat")
            ),
            None,
        )
        if r_raw and r_raw.get("throughput_rps") and r_edge.get("throughput_rps"):
            pairs.append(round(r_edge["throughput_rps"] / r_raw["throughput_rps"], 3))
    out["throughput_ratio_per_repeat"] = pairs
    diffs: dict[str, list[float]] = {"p50": [], "p99": []}
    by_repeat: dict[tuple[str, Any], dict[str, Any]] = {}
    for r in results:
        params = r.get("params") or {}
        if r.get("scenario") == "relay" and r.get("status") == "ok":
            by_repeat[(str(params.get("part")), params.get("repeat"))] = r
    for (part, rep), r_via in sorted(by_repeat.items(), key=lambda kv: str(kv[0])):
        r_direct = by_repeat.get(("direct-latency", rep))
        if part != "edge-latency" or r_direct is None:
            continue
        a, b = _probe(r_direct), _probe(r_via)
        if a and b:
            for p in diffs:
                diffs[p].append(float(b[p]) - float(a[p]))
    out["p50_diff_us_per_repeat"] = diffs["p50"]
    out["p99_diff_us_per_repeat"] = diffs["p99"]
    return out


def relay_targets(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The three targets, when the scenario ran (else none)."""
    rows = relay_rows(results)
    if not rows:
        return []
    fig = relay_figures(results)
    n = next(iter(rows.values())).get("n")

    def target(
        name: str, measured: str, threshold: str, ratio: float | None, ok: bool | None, why: str
    ) -> dict[str, Any]:
        # the targets are for N=TARGET_N: at another N (--quick) they are n/a
        return _target(name, measured, threshold, ratio, ok if n == TARGET_N else None, why)

    def why(*parts: str) -> str:
        if n != TARGET_N:
            return f"N={n}: the targets are for N={TARGET_N} (a correctness run)"
        for part in parts:
            row = rows.get(part)
            if row is None:
                return f"{part} not run"
            if not row["ok_runs"]:
                return f"{part}: " + "; ".join(row["errors"][:1])
            if not row["loss_free"]:
                return f"{part}: not loss-free"
        return ""

    out = []
    raw, edge = rows.get("raw-2hop"), rows.get("edge")
    ratio = fig["throughput_ratio"]
    name = f"relay N={n}: edge throughput >= 80% of the two-hop raw limit"
    if ratio is not None and raw and edge:
        out.append(
            target(
                name,
                f"{edge['median_throughput_rps'] / 1e6:.2f} vs "
                f"{raw['median_throughput_rps'] / 1e6:.2f} M rec/s "
                f"(medians of {edge['ok_runs']} and {raw['ok_runs']})",
                f">= {THROUGHPUT_TARGET:.2f}x",
                ratio,
                ratio >= THROUGHPUT_TARGET,
                why("raw-2hop", "edge"),
            )
        )
    else:
        out.append(target(name, "-", ">= 0.80x", None, None, why("raw-2hop", "edge")))
    direct, via = rows.get("direct-latency"), rows.get("edge-latency")
    for p, limit in (("p50", P50_TARGET_US), ("p99", P99_TARGET_US)):
        diff = fig[f"{p}_diff_us"]
        name = f"relay N={n} @ 50k rec/s: edge {p} at most {limit:,.0f} us over direct"
        if diff is not None and direct and via:
            out.append(
                target(
                    name,
                    f"{via[f'median_{p}_us']:,.0f} vs {direct[f'median_{p}_us']:,.0f} us "
                    f"({diff:+,.0f} us)",
                    f"<= +{limit:,.0f} us",
                    diff / limit,
                    diff <= limit,
                    why("direct-latency", "edge-latency"),
                )
            )
        else:
            out.append(
                target(
                    name,
                    "-",
                    f"<= +{limit:,.0f} us",
                    None,
                    None,
                    why("direct-latency", "edge-latency"),
                )
            )
    return out


def relay_summary(r: dict[str, Any]) -> str:
    """One case on one line (the progress output)."""
    part = (r.get("params") or {}).get("part", "")
    if str(part).endswith("latency"):
        lat = _probe(r) or {}
        text = (
            f"{part}: p50 {lat.get('p50', '-')} p99 {lat.get('p99', '-')} "
            f"p99.9 {lat.get('p99.9', '-')} us"
        )
        if r.get("overloaded"):
            text += f" OVERLOADED ({r.get('achieved_rate', 0):,}/s)"
        return text
    cpu = r.get("cpu_s_per_m") or {}
    return f"{part}: {r.get('throughput_rps', 0) / 1e6:.2f} M rec/s" + (
        " (CPU s/M " + ", ".join(f"{k} {v:.3f}" for k, v in cpu.items()) + ")" if cpu else ""
    )


def _f(value: float | None, scale: float = 1.0, fmt: str = ".2f") -> str:
    return "–" if value is None else f"{value / scale:{fmt}}"


def relay_table(results: list[dict[str, Any]]) -> list[str]:
    """The RESULTS.md section (empty when the scenario did not run)."""
    rows = relay_rows(results)
    if not rows:
        return []
    fig = relay_figures(results)
    lines = [
        "",
        "## relay: fan-out from an edge gateway fed by a primary (`lsg://`)",
        "",
        "Medians over the repeats (single runs in brackets). Throughput: the edge "
        "(publisher → primary → edge → N sessions) against the two-hop raw limit (raw "
        "sender → a bare epoll relay process → N receivers): on one machine the extra hop "
        "shares the cores, so that, not direct service, is the comparison. Latency: "
        "publisher write → the probe's recv (the session served last), direct vs via the "
        "edge, at the same rate.",
        "",
        "| part | N | M rec/s delivered | p50 / p99 / p99.9 µs (probe) | "
        "server CPU s per M records | machine busy | loss-free |",
        "|---|---|---|---|---|---|---|",
    ]
    for part in PART_TITLES:
        row = rows.get(part)
        if row is None:
            continue
        if not row["ok_runs"]:
            lines.append(
                f"| {PART_TITLES[part]} | {row['n']} | error: "
                f"{'; '.join(row['errors'][:1])[-160:]} | | | | |"
            )
            continue
        if part.endswith("latency"):
            tput = "–"
            lat = (
                f"**{_f(row['median_p50_us'], 1, ',.0f')}** / "
                f"**{_f(row['median_p99_us'], 1, ',.0f')}** / "
                f"{_f(row['median_p999_us'], 1, ',.0f')} ("
                + ", ".join(
                    f"{a:,.0f}/{b:,.0f}" for a, b in zip(row["p50_us"], row["p99_us"], strict=True)
                )
                + ")"
            )
            if row["overloaded"]:
                lat += f" ⚠ overloaded in {row['overloaded']}"
        else:
            tput = (
                f"**{_f(row['median_throughput_rps'], 1e6)}** ("
                + ", ".join(f"{v / 1e6:.2f}" for v in row["throughput_rps"])
                + ")"
            )
            lat = "–"
        cpu = _f(row["median_server_cpu_s_per_m"], 1, ".4f")
        busy = row["median_machine_busy"]
        lines.append(
            f"| {PART_TITLES[part]} | {row['n']} | {tput} | {lat} | {cpu} | "
            f"{'–' if busy is None else f'{100 * busy:.0f}%'} | "
            f"{'yes' if row['loss_free'] else 'NO'}"
            + (f" ({len(row['errors'])} failed)" if row["errors"] else "")
            + " |"
        )
    lines += [
        "",
        f"Edge ÷ two-hop raw limit: **{_f(fig['throughput_ratio'])}** (per repeat: "
        + ", ".join(f"{x:.2f}" for x in fig["throughput_ratio_per_repeat"])
        + f"). Added by the edge (median via the edge − median direct): p50 "
        f"**{_f(fig['p50_diff_us'], 1, '+,.0f')} µs**, p99 "
        f"**{_f(fig['p99_diff_us'], 1, '+,.0f')} µs** (per repeat: p50 "
        + ", ".join(f"{x:+,.0f}" for x in fig["p50_diff_us_per_repeat"])
        + "; p99 "
        + ", ".join(f"{x:+,.0f}" for x in fig["p99_diff_us_per_repeat"])
        + ").",
    ]
    return lines


def write_relay_plot(outdir: Path, results: list[dict[str, Any]], caption: str = "") -> str:
    """``relay.png``: throughput (edge vs the two-hop raw limit, every run and the median)
    and the latency tails (direct vs via the edge, every run); its name ("" if nothing)."""
    rows = relay_rows(results)
    if not rows:
        return ""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig_data = relay_figures(results)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    bars = [p for p in ("raw-2hop", "edge") if rows.get(p, {}).get("median_throughput_rps")]
    for x, part in enumerate(bars):
        row = rows[part]
        left.bar(x, row["median_throughput_rps"] / 1e6, color=PART_COLORS[part], alpha=0.8)
        left.scatter(
            [x + 0.3] * len(row["throughput_rps"]),
            [v / 1e6 for v in row["throughput_rps"]],
            color="black",
            s=12,
            zorder=3,
        )
        left.annotate(
            f"{row['median_throughput_rps'] / 1e6:.2f}",
            (x, row["median_throughput_rps"] / 1e6),
            textcoords="offset points",
            xytext=(0, 4),
            ha="center",
            fontsize=8,
            bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.85},
            zorder=4,
        )
    left.set_xticks(
        range(len(bars)),
        ["raw sender → bare relay" if p == "raw-2hop" else "primary → edge" for p in bars],
    )
    n = next(iter(rows.values())).get("n")
    ratio = fig_data["throughput_ratio"]
    left.set_title(
        f"throughput, N={n} (edge ÷ raw two-hop: {_f(ratio)}; target ≥ {THROUGHPUT_TARGET:.2f})",
        fontsize=9,
    )
    left.set_ylabel("million records/s delivered (bars: medians, dots: runs)")
    left.grid(True, axis="y", alpha=0.3)
    for part, label in (("direct-latency", "direct"), ("edge-latency", "via primary → edge")):
        first = True
        for r in results:
            if r.get("scenario") != "relay" or (r.get("params") or {}).get("part") != part:
                continue
            lat = _probe(r) if r.get("status") == "ok" else None
            if not lat or not lat.get("cdf"):
                continue
            pts = [(max(1, v), 1 - p / 100) for p, v in lat["cdf"] if p < 100]
            right.plot(
                [x for x, _ in pts],
                [y for _, y in pts],
                color=PART_COLORS[part],
                alpha=0.75,
                label=label if first else None,
            )
            first = False
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_ylim(1e-4, 1)
    right.set_yticks(
        [1, 0.5, 0.1, 0.01, 0.001, 0.0001], ["p0", "p50", "p90", "p99", "p99.9", "p99.99"]
    )
    rate = next(
        (
            (r.get("params") or {}).get("rate")
            for r in results
            if r.get("scenario") == "relay" and (r.get("params") or {}).get("rate")
        ),
        0,
    )
    right.set_title(
        f"latency, N={n} at {int(rate or 0) // 1000}k rec/s, the probe (served last)\n"
        f"via the edge vs direct: p50 {_f(fig_data['p50_diff_us'], 1, '+,.0f')} µs, "
        f"p99 {_f(fig_data['p99_diff_us'], 1, '+,.0f')} µs",
        fontsize=8,
    )
    right.set_xlabel("publisher write → subscriber recv, µs (one line per run)")
    right.set_ylabel("slower than x (log tail)")
    right.grid(True, which="both", alpha=0.3)
    right.legend(fontsize=7)
    if caption:
        fig.text(0.5, 0.005, caption, ha="center", va="bottom", fontsize=7, color="#555555")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    name = "relay.png"
    fig.savefig(outdir / name, dpi=110)
    plt.close(fig)
    return name


def write_relay_outputs(
    outdir: Path, doc: dict[str, Any], caption: str, log: IO[str] | None = None
) -> dict[str, Any]:
    """``relay.json``, ``RELAY.md`` and ``relay.png`` when the scenario ran (else {})."""
    results = doc["results"]
    rows = relay_rows(results)
    if not rows:
        return {}
    meta = doc["meta"]
    out: dict[str, Any] = {
        "machine": meta.get("machine"),
        "versions": meta.get("versions"),
        "run_id": meta.get("run_id"),
        "rows": rows,
        "figures": relay_figures(results),
        "targets": relay_targets(results),
        "json": "relay.json",
        "markdown": "RELAY.md",
        "plot": "",
    }
    try:
        out["plot"] = write_relay_plot(outdir, results, caption)
    except Exception as exc:  # a plot is a nicety; never lose the numbers over it
        if log is not None:
            print(f"relay plot failed: {exc}", file=log)
    (outdir / "relay.json").write_text(json.dumps(out, indent=1, default=str))
    m = meta.get("machine") or {}
    lines = [
        f"# Relay (edge fed by a primary), {meta.get('run_id', '?')}",
        "",
        f"Machine: {m.get('cpu_model', '?')}, {m.get('cores', '?')} CPUs "
        f"({m.get('usable_cpus', '?')} usable), {m.get('memory_gib', '?')} GiB, kernel "
        f"{m.get('kernel', '?')}; {m.get('date', '')}",
        *relay_table(results),
        "",
    ]
    for t in out["targets"]:
        lines.append(
            f"Target: {t['target']}: {t['measured']} -> {t['status']}"
            + (f" ({t['detail']})" if t["detail"] else "")
        )
    if out["plot"]:
        lines += ["", f"![relay]({out['plot']})", ""]
    (outdir / "RELAY.md").write_text("\n".join(lines))
    return out


def append_relay_section(path: Path, results: list[dict[str, Any]]) -> None:
    """Add the relay section to RESULTS.md, before its closing ``Plots:`` line."""
    section = relay_table(results)
    if not section or not path.exists():
        return
    text = path.read_text()
    marker = "\nPlots: "
    at = text.rfind(marker)
    block = "\n".join(section) + "\n"
    if at < 0:
        text = text.rstrip("\n") + "\n" + block
    else:
        text = text[:at] + block + text[at:]
    path.write_text(text)


def combine(runs: list[Path]) -> dict[str, Any]:
    """The relay cases of several runs' ``results.json`` as one document (repeats renamed
    ``run:repeat``, so that per-repeat pairs stay within a run); the first run's meta."""
    results: list[dict[str, Any]] = []
    meta: dict[str, Any] = {}
    for k, run in enumerate(runs):
        doc = json.loads((run / "results.json").read_text())
        meta = meta or dict(doc.get("meta") or {})
        for r in doc.get("results", []):
            if r.get("scenario") != "relay":
                continue
            params = dict(r.get("params") or {})
            params["repeat"] = f"{k}:{params.get('repeat')}"
            results.append({**r, "params": params})
    ids = []
    for run in runs:
        run_meta = json.loads((run / "results.json").read_text()).get("meta") or {}
        ids.append(str(run_meta.get("run_id", run.name)))
    meta["run_id"] = " + ".join(ids)
    return {"meta": meta, "results": results}


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.relay_report RUN_DIR... --out DIR``: the relay figures of several
    runs together (medians over every repeat of every run)."""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m bench.relay_report", description=main.__doc__)
    p.add_argument("runs", nargs="+", type=Path, help="bench/results/<run> folders")
    p.add_argument("--out", type=Path, required=True, help="where RELAY.md etc. go")
    args = p.parse_args(argv)
    missing = [str(r) for r in args.runs if not (r / "results.json").exists()]
    if missing:
        print(f"no results.json in: {', '.join(missing)}", file=sys.stderr)
        return 2
    doc = combine(args.runs)
    if not relay_rows(doc["results"]):
        print("no relay cases in these runs", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    from bench.report import plot_caption

    caption = plot_caption(doc["meta"]).replace(" (quick)", "")
    out = write_relay_outputs(args.out, doc, caption, log=sys.stderr)
    print((args.out / "RELAY.md").read_text())
    return 0 if out else 1


if __name__ == "__main__":
    raise SystemExit(main())
