"""The ``workers`` scenario's summary: medians per (part, worker count), ratios against one
worker, the CPU-per-record target, its RESULTS.md section, ``workers.json``,
``WORKERS.md`` and the scaling PNG.

Parts (``bench.scenarios.SCALING_PARTS``):

* ``fanout-cpu``: plain fan-out (every session subscribed to everything); the figure is
  the gateway's CPU seconds per million delivered records, over its whole process tree
  (supervisor + workers, ``/proc/<pid>/stat`` utime+stime): the cost of the extra hop.
* ``filtered``: 1,000 instruments, 10 per session (Zipf), N=1000 sessions.
* ``zstd-distinct``: zstd sessions each on its own subscription (nothing shared), N=1000.

For each: delivered records/s, median over the repeats, and its ratio to the median at
one worker.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import IO, Any, Final

__all__ = [
    "CPU_TARGET",
    "scaling_rows",
    "workers_table",
    "workers_targets",
    "write_workers_outputs",
    "write_workers_plot",
]

#: fan-out CPU per delivered record with 2 workers at most this multiple of 1 worker's
CPU_TARGET: Final = 1.15
PART_TITLES: Final = {
    "fanout-cpu": "plain fan-out (CPU per record)",
    "filtered": "filtered (10 of 1,000 instruments per session)",
    "zstd-distinct": "zstd, a distinct subscription per session",
}
PART_COLORS: Final = {"fanout-cpu": "#7f7f7f", "filtered": "#1f77b4", "zstd-distinct": "#d62728"}


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def scaling_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (part, worker count) of the ``workers`` scenario, in part then count
    order: every run's figures, their medians and the ratios to one worker's medians."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in results:
        if r.get("scenario") != "workers":
            continue
        params = r.get("params") or {}
        groups.setdefault((str(params.get("part")), int(params.get("workers", 1))), []).append(r)
    rows: list[dict[str, Any]] = []
    order = list(PART_TITLES)
    for part, workers in sorted(
        groups, key=lambda k: (order.index(k[0]) if k[0] in order else 99, k[0], k[1])
    ):
        runs = groups[(part, workers)]
        ok = [r for r in runs if r.get("status") == "ok"]
        rps = [float(r["throughput_rps"]) for r in ok]
        cpu = [float(r["server_cpu_s_per_m"]) for r in ok if r.get("server_cpu_s_per_m")]
        rows.append(
            {
                "part": part,
                "sessions": runs[0].get("n"),
                "workers": workers,
                "runs": len(runs),
                "ok_runs": len(ok),
                "errors": [str(r.get("reason", ""))[:200] for r in runs if r not in ok],
                "loss_free": bool(ok) and all(r.get("loss_free") for r in ok),
                "throughput_rps": rps,
                "median_rps": _median(rps),
                "cpu_s_per_m": cpu,
                "median_cpu_s_per_m": _median(cpu),
                #: the supervisor's part of the gateway's CPU (N > 1: ingest, ring writes)
                "median_supervisor_share": _median(
                    [
                        split["supervisor"] / total
                        for r in ok
                        if (split := r.get("server_cpu_by_process_s"))
                        and (total := sum(split.values())) > 0
                    ]
                ),
                "machine_busy": _median([float(r.get("machine_busy", 0)) for r in ok]),
            }
        )
    base = {r["part"]: r for r in rows if r["workers"] == 1}
    for row in rows:
        one = base.get(row["part"])
        row["rps_ratio"] = (
            round(row["median_rps"] / one["median_rps"], 3)
            if one and one["median_rps"] and row["median_rps"] is not None
            else None
        )
        row["cpu_ratio"] = (
            round(row["median_cpu_s_per_m"] / one["median_cpu_s_per_m"], 3)
            if one and one["median_cpu_s_per_m"] and row["median_cpu_s_per_m"] is not None
            else None
        )
    return rows


def workers_targets(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The CPU-per-record target (2 workers within 15 % of 1), when the scenario ran."""
    rows = scaling_rows(results)
    if not rows:
        return []
    name = "workers: fan-out CPU per delivered record, 2 workers within 15% of 1"
    one = next((r for r in rows if r["part"] == "fanout-cpu" and r["workers"] == 1), None)
    two = next((r for r in rows if r["part"] == "fanout-cpu" and r["workers"] == 2), None)
    target: dict[str, Any] = {
        "target": name,
        "measured": "-",
        "threshold": f"<= {CPU_TARGET:.2f}x",
        "ratio": None,
        "status": "n/a",
        "detail": "",
    }
    if one is None or two is None:
        target["detail"] = "fanout-cpu at 1 and 2 workers not both run"
    elif two["cpu_ratio"] is None:
        target["detail"] = "; ".join((one["errors"] + two["errors"])[:2]) or "no CPU figure"
    else:
        ratio = float(two["cpu_ratio"])
        target.update(
            measured=f"{two['median_cpu_s_per_m']:.4f} vs {one['median_cpu_s_per_m']:.4f} "
            f"CPU s per M records (medians of {two['ok_runs']} and {one['ok_runs']})",
            ratio=round(ratio, 3),
            status="met" if ratio <= CPU_TARGET else "missed",
        )
    return [target]


def _fmt(value: float | None, scale: float = 1.0, digits: int = 3) -> str:
    return "–" if value is None else f"{value / scale:.{digits}f}"


def workers_table(results: list[dict[str, Any]]) -> list[str]:
    """The RESULTS.md section (empty when the scenario did not run)."""
    rows = scaling_rows(results)
    if not rows:
        return []
    lines = [
        "",
        "## workers: the gateway at N worker processes (`--workers N`)",
        "",
        "Medians over the repeats (single runs in brackets). Gateway CPU is the whole "
        "process tree: the supervisor and its workers (utime+stime from /proc). "
        "× 1 worker: the median against the median at one worker. Supervisor: its share "
        "of the gateway's CPU (ingest and the ring writes; N > 1 only).",
        "",
        "| part | sessions | workers | M rec/s delivered | × 1 worker | "
        "gateway CPU s per M records | × 1 worker | supervisor | machine busy | loss-free |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if not r["ok_runs"]:
            why = "; ".join(r["errors"][:1])[-140:]
            lines.append(
                f"| {r['part']} | {r['sessions']} | {r['workers']} | error: …{why} | | | | | | |"
            )
            continue
        runs = ", ".join(f"{v / 1e6:.3f}" for v in r["throughput_rps"])
        cpu_runs = ", ".join(f"{v:.4f}" for v in r["cpu_s_per_m"])
        busy = r["machine_busy"]
        share = r["median_supervisor_share"]
        lines.append(
            f"| {r['part']} | {r['sessions']:,} | {r['workers']} | "
            f"**{_fmt(r['median_rps'], 1e6)}** ({runs}) | {_fmt(r['rps_ratio'], 1, 2)} | "
            f"{_fmt(r['median_cpu_s_per_m'], 1, 4)} ({cpu_runs}) | {_fmt(r['cpu_ratio'], 1, 2)} | "
            f"{'–' if share is None else f'{100 * share:.0f}%'} | "
            f"{'–' if busy is None else f'{100 * busy:.0f}%'} | "
            f"{'yes' if r['loss_free'] else 'NO'}"
            + (f" ({len(r['errors'])} failed)" if r["errors"] else "")
            + " |"
        )
    return lines


def write_workers_plot(outdir: Path, rows: list[dict[str, Any]], caption: str = "") -> str:
    """``workers_scaling.png``: records/s against workers (with the linear ideal from one
    worker) and the fan-out CPU per record; returns its file name ("" when nothing to plot)."""
    plotted = [r for r in rows if r["median_rps"] is not None]
    if not plotted:
        return ""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = sorted({r["workers"] for r in plotted})
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for i, part in enumerate(PART_TITLES):
        pts = sorted(
            (r["workers"], r["rps_ratio"], r["median_rps"] / 1e6)
            for r in plotted
            if r["part"] == part and r["rps_ratio"] is not None
        )
        if not pts:
            continue
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        left.plot(xs, ys, marker="o", color=PART_COLORS[part], label=PART_TITLES[part])
        for x, y, mrps in pts:
            left.annotate(
                f"{mrps:.2f} M/s",
                (x, y),
                textcoords="offset points",
                xytext=(5, -9 - 8 * i),
                fontsize=6,
                color=PART_COLORS[part],
            )
    left.plot(counts, counts, linestyle=":", color="#555555", label="linear")
    left.set_xticks(counts, [str(c) for c in counts])
    left.set_xlabel("gateway worker processes")
    left.set_ylabel("records/s delivered ÷ 1 worker's (medians)")
    left.set_title("scaling (points: M records/s delivered)", fontsize=10)
    left.grid(True, alpha=0.3)
    left.legend(fontsize=7)
    cpu = sorted(
        (r["workers"], r["median_cpu_s_per_m"])
        for r in rows
        if r["part"] == "fanout-cpu" and r["median_cpu_s_per_m"] is not None
    )
    if cpu:
        right.bar([str(c[0]) for c in cpu], [c[1] for c in cpu], color="#1f77b4")
        right.set_ylim(0, max(c[1] for c in cpu + [(1, cpu[0][1] * CPU_TARGET)]) * 1.12)
        if cpu[0][0] == 1:
            right.axhline(
                cpu[0][1] * CPU_TARGET,
                color="#d62728",
                linestyle="--",
                label=f"1 worker × {CPU_TARGET:.2f}",
            )
            right.legend(fontsize=7)
    right.set_xlabel("gateway worker processes")
    right.set_ylabel("gateway CPU s per million delivered records")
    right.set_title("plain fan-out: CPU per record, supervisor + workers", fontsize=10)
    right.grid(True, axis="y", alpha=0.3)
    if caption:
        fig.text(0.5, 0.005, caption, ha="center", va="bottom", fontsize=7, color="#555555")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    name = "workers_scaling.png"
    fig.savefig(outdir / name, dpi=110)
    plt.close(fig)
    return name


def write_workers_outputs(
    outdir: Path, doc: dict[str, Any], caption: str, log: IO[str] | None = None
) -> dict[str, Any]:
    """``workers.json`` (machine, rows, target), ``WORKERS.md`` (the table) and the PNG,
    when the ``workers`` scenario ran; what was written (empty dict otherwise)."""
    rows = scaling_rows(doc["results"])
    if not rows:
        return {}
    meta = doc["meta"]
    out: dict[str, Any] = {
        "machine": meta.get("machine"),
        "versions": meta.get("versions"),
        "run_id": meta.get("run_id"),
        "rows": rows,
        "targets": workers_targets(doc["results"]),
        "json": "workers.json",
        "markdown": "WORKERS.md",
        "plot": "",
    }
    try:
        out["plot"] = write_workers_plot(outdir, rows, caption)
    except Exception as exc:  # a plot is a nicety; never lose the numbers over it
        if log is not None:
            print(f"workers plot failed: {exc}", file=log)
    (outdir / "workers.json").write_text(json.dumps(out, indent=1, default=str))
    m = meta.get("machine") or {}
    lines = [
        f"# Gateway workers, {meta.get('run_id', '?')}",
        "",
        f"Machine: {m.get('cpu_model', '?')}, {m.get('cores', '?')} CPUs "
        f"({m.get('usable_cpus', '?')} usable by this process, "
        f"{m.get('physical_cores') or '?'} physical cores in /proc/cpuinfo), "
        f"{m.get('memory_gib', '?')} GiB, kernel {m.get('kernel', '?')}; {m.get('date', '')}",
        *workers_table(doc["results"]),
        "",
    ]
    for t in out["targets"]:
        lines.append(
            f"Target: {t['target']}: {t['measured']} -> {t['status']}"
            + (f" (ratio {t['ratio']:.3f})" if t["ratio"] is not None else "")
            + (f" ({t['detail']})" if t["detail"] else "")
        )
    if out["plot"]:
        lines += ["", f"![workers scaling]({out['plot']})", ""]
    (outdir / "WORKERS.md").write_text("\n".join(lines))
    return out
