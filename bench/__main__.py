"""``python -m bench``: run the scenarios, write ``bench/results/<timestamp>/``.

    python -m bench                       every scenario, every peer (installs missing peers)
    python -m bench --quick               seconds: tiny N and durations (a correctness run)
    python -m bench --scenarios fanout,latency --systems gateway,nats
    python -m bench --profile filtered    one scenario, the gateway under py-spy
    python -m bench --workers 1,2,4,8     every scenario with the gateway at 1, 2, 4 and 8
                                          worker processes, plus the `workers` scenario
    python -m bench --scenarios workers --workers 1,2
                                          only the workers scaling (CPU per record, curve)

Exit status 1 when any gateway case lost records or failed (peers never fail the run).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from bench.books_fanout import (
    append_books_section,
    books_summary,
    books_targets,
    write_books_outputs,
)
from bench.peers import ensure_peers, versions
from bench.procs import machine_info, raise_nofile
from bench.relay_report import (
    append_relay_section,
    relay_summary,
    relay_targets,
    write_relay_outputs,
)
from bench.report import (
    by_workers,
    evaluate_targets,
    loss_summary,
    plot_caption,
    write_json,
    write_markdown,
    write_plots,
)
from bench.scenarios import (
    DEFAULT_SCENARIOS,
    QUICK_OPT_IN,
    SCENARIO_SYSTEMS,
    SCENARIOS,
    SYSTEMS,
    Harness,
    build_cases,
    make_plan,
    parse_worker_counts,
    peer_table,
    run_case,
)
from bench.workers_report import write_workers_outputs

RESULTS = Path(__file__).resolve().parent / "results"


class Progress:
    """A one-line progress bar on a terminal, one line per step otherwise."""

    def __init__(self, total: int, stream: TextIO = sys.stderr) -> None:
        self.total = max(total, 1)
        self.done = 0
        self.stream = stream
        self.tty = stream.isatty()
        self.started = time.monotonic()

    def bar(self, label: str) -> str:
        width = 30
        filled = int(width * self.done / self.total)
        elapsed = time.monotonic() - self.started
        eta = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        return (
            f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
            f"{elapsed:5.0f}s eta {eta:4.0f}s  {label}"
        )

    def start(self, label: str) -> None:
        if self.tty:
            self.stream.write("\r\033[K" + self.bar(label)[:150])
        else:
            self.stream.write(self.bar(label) + "\n")
        self.stream.flush()

    def finish(self, label: str, summary: str) -> None:
        self.done += 1
        if self.tty:
            self.stream.write("\r\033[K")
        self.stream.write(f"  {label}: {summary}\n")
        if self.tty:
            self.stream.write(self.bar("")[:150])
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\r\033[K" + self.bar("done") + "\n")
            self.stream.flush()


def summary_line(r: dict[str, Any]) -> str:
    status = r.get("status")
    if status != "ok":
        return f"{status}: {r.get('reason', '')}"[:160]
    parts = []
    sc = r["scenario"]
    if sc in ("fanout", "filtered", "zstd"):
        parts.append(f"{r['throughput_rps'] / 1e6:.2f} M rec/s")
        if sc == "filtered":
            parts.append(f"ingest {r['ingest_rps'] / 1e6:.3f} M/s")
        if sc == "zstd":
            parts.append(
                f"{r.get('server_cpu_s_per_m', 0):.3f} CPU s/M, ratio {r['compression_ratio']:.2f}"
            )
    elif sc == "latency":
        lat = (r.get("latency") or {}).get("probe") or {}
        parts.append(
            f"p50 {lat.get('p50', '-')} p99 {lat.get('p99', '-')} "
            f"p99.9 {lat.get('p99.9', '-')} max {lat.get('max', '-')} us"
        )
        if r.get("overloaded"):
            parts.append(f"OVERLOADED ({r.get('achieved_rate', 0):,}/s)")
    elif sc == "idle":
        parts.append(
            f"{r['rss_per_session_kib']:.1f} KiB/session, idle CPU "
            f"{100 * r['idle_cpu_fraction']:.1f}%, burst {r['burst_s']:.3f} s"
        )
    elif sc == "connect":
        parts.append(f"all streaming in {r.get('all_streaming_s', 0):.3f} s")
    elif sc == "replay":
        parts.append(replay_summary(r))
    elif sc == "relay":
        parts.append(relay_summary(r))
    elif sc == "books":
        parts.append(books_summary(r))
    elif sc == "workers":
        parts.append(f"{r['throughput_rps'] / 1e6:.3f} M rec/s")
        if r.get("server_cpu_s_per_m") is not None:
            parts.append(f"{r['server_cpu_s_per_m']:.3f} gateway CPU s/M")
    loss = (
        "loss-free"
        if r.get("loss_free")
        else (
            f"LOSS lost={r['lost']} gaps={r['gaps']} extra={r['extra']} "
            f"foreign={r['unexpected']} failed={r['failed_sessions']}"
        )
    )
    parts.append(loss)
    parts.append(f"{r.get('elapsed_s', 0):.1f}s")
    return ", ".join(parts)


def replay_summary(r: dict[str, Any]) -> str:
    part = r.get("params", {}).get("part")
    if part == "sendfile":
        return (
            f"{r['replay_median_bps'] / 1e6:,.0f} MB/s vs raw {r['raw_median_bps'] / 1e6:,.0f} "
            f"MB/s ({100 * r['ratio']:.0f}%)"
        )
    if part == "filtered":
        return f"{r['scanned_median_per_s'] / 1e6:.2f} M records scanned/s"
    if part == "beside-live":
        return (
            f"live p99 {r['live_p99_us_alone']} -> {r['live_p99_us_beside']} us "
            f"(x{r['live_p99_ratio']}, step {r['chosen_step_bytes'] // 1024} KiB, "
            f"cap {r.get('chosen_cap_bytes_per_s', 0) / 1e6:,.0f} MB/s), replays "
            f"{r['replay_bytes_per_s'] / 1e6:,.0f} MB/s"
        )
    if part == "fanout-journal":
        return (
            f"journal on {r['median_rps_on'] / 1e6:.2f} vs off {r['median_rps_off'] / 1e6:.2f} "
            f"M rec/s ({100 * r['ratio']:.0f}%)"
        )
    return ""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="tiny N and durations (seconds)")
    p.add_argument(
        "--scenarios",
        default=None,
        help=f"comma-separated subset of {','.join(SCENARIOS)} (default: all but workers; "
        "with --workers, all)",
    )
    p.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help=f"comma-separated subset of {','.join(SYSTEMS)}",
    )
    p.add_argument(
        "--profile",
        metavar="SCENARIO",
        choices=SCENARIOS,
        help="run only SCENARIO with py-spy attached to the gateway; the flame "
        "graphs are saved next to the results",
    )
    p.add_argument("--out", type=Path, help="results folder (default bench/results/<time>)")
    p.add_argument(
        "--no-install", action="store_true", help="never apt-get missing peers (skip them instead)"
    )
    p.add_argument("--duration", type=float, help="seconds of publishing per throughput case")
    p.add_argument("--note", default="", help="a line to print in RESULTS.md")
    p.add_argument(
        "--workers",
        default=None,
        metavar="N[,N...]",
        help="run every gateway case with the gateway at each of these worker counts "
        "(`gateway serve --workers N`; 1 = the single process); peers run once. The "
        "workers scenario measures at these counts (1 always included)",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=None,
        help="repeats of each workers-scenario case (medians; default 3, 1 with --quick)",
    )
    p.add_argument(
        "--profile-rate", type=int, default=200, help="py-spy samples per second (--profile)"
    )
    p.add_argument(
        "--profile-format",
        choices=("flamegraph", "raw", "speedscope"),
        default="flamegraph",
        help="py-spy output (--profile): raw = collapsed stacks, for python -m bench.pyspy_top",
    )
    args = p.parse_args(argv)
    try:
        args.worker_counts = parse_worker_counts(args.workers) if args.workers else (1,)
    except ValueError as exc:
        p.error(str(exc))
    if args.repeat is not None and args.repeat < 1:
        p.error("--repeat must be >= 1")
    if args.scenarios is None:
        args.scenarios = ",".join(SCENARIOS if args.workers else DEFAULT_SCENARIOS)
        if args.quick:
            args.scenarios = ",".join(s for s in args.scenarios.split(",") if s not in QUICK_OPT_IN)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_nofile()
    started = time.monotonic()
    run_id = time.strftime("%Y%m%d-%H%M%S")
    outdir: Path = args.out or RESULTS / (run_id + ("-quick" if args.quick else ""))
    outdir.mkdir(parents=True, exist_ok=True)
    scenarios = [args.profile] if args.profile else [s for s in args.scenarios.split(",") if s]
    systems = [s for s in args.systems.split(",") if s]
    bad = [s for s in scenarios if s not in SCENARIOS] + [s for s in systems if s not in SYSTEMS]
    if bad:
        print(f"unknown scenario or system: {', '.join(bad)}", file=sys.stderr)
        return 2
    if args.profile and not pyspy_path():
        print("--profile needs py-spy: .venv/bin/pip install py-spy", file=sys.stderr)
        return 2
    plan = make_plan(args.quick)
    if args.duration:
        import dataclasses

        plan = dataclasses.replace(plan, duration_s=args.duration)
    used = sorted({s for sc in scenarios for s in SCENARIO_SYSTEMS[sc] if s in systems})
    peers = ensure_peers(
        [s for s in used if s in ("nats", "redis", "zmq")],
        install=not (args.quick or args.no_install),
        log=sys.stderr,
    )
    for p in peers.values():
        if not p.available:
            print(f"peer {p.name} skipped: {p.reason}", file=sys.stderr)
    harness = Harness(outdir, plan, peers, profile=bool(args.profile))
    harness.profile_rate = args.profile_rate
    harness.profile_format = args.profile_format
    cases = build_cases(harness, scenarios, systems, args.worker_counts, args.repeat)
    meta: dict[str, Any] = {
        "run_id": run_id,
        "quick": args.quick,
        "machine": machine_info(),
        "versions": {**versions(), **peer_versions(peers)},
        "plan": dataclasses_asdict(plan),
        "scenarios": scenarios,
        "systems": systems,
        "profile": args.profile,
        "note": args.note,
        "argv": sys.argv[1:],
        "gateway_workers": list(args.worker_counts),
    }
    doc: dict[str, Any] = {"meta": meta, "peers": peer_table(peers), "results": []}
    progress = Progress(len(cases))
    print(f"bench: {len(cases)} cases -> {outdir}", file=sys.stderr)
    try:
        for case in cases:
            progress.start(case.label)
            result = run_case(case, peers)
            doc["results"].append(result)
            progress.finish(case.label, summary_line(result))
            write_json(outdir / "results.json", doc)
    finally:
        harness.close()
    progress.close()
    meta["elapsed_s"] = round(time.monotonic() - started, 1)
    doc["targets"] = evaluate_targets(doc["results"])
    doc["targets"] += relay_targets(doc["results"])
    doc["targets"] += books_targets(doc["results"])
    doc["loss"] = loss_summary(doc["results"])
    try:
        doc["plots"] = write_plots(outdir, doc["results"], plot_caption(meta))
    except Exception as exc:  # plots are a nicety; never lose the numbers over them
        doc["plots"] = []
        print(f"plots failed: {exc}", file=sys.stderr)
    doc["workers"] = write_workers_outputs(outdir, doc, plot_caption(meta), log=sys.stderr)
    if doc["workers"].get("plot"):
        doc["plots"].append(doc["workers"]["plot"])
    doc["relay"] = write_relay_outputs(outdir, doc, plot_caption(meta), log=sys.stderr)
    if doc["relay"].get("plot"):
        doc["plots"].append(doc["relay"]["plot"])
    doc["books"] = write_books_outputs(outdir, doc, plot_caption(meta), log=sys.stderr)
    if doc["books"].get("plot"):
        doc["plots"].append(doc["books"]["plot"])
    if args.quick:
        for t in doc["targets"]:
            if t["status"] == "n/a" and "not run" in t["detail"]:
                t["detail"] = "not measured by --quick (make bench measures it)"
    write_json(outdir / "results.json", doc)
    write_markdown(outdir / "RESULTS.md", doc)
    append_relay_section(outdir / "RESULTS.md", doc["results"])
    append_books_section(outdir / "RESULTS.md", doc["results"])
    print(summary_table(doc["results"]))
    for t in doc["targets"]:
        print(
            f"target {t['status']:>6}: {t['target']}: {t['measured']}"
            + (f" ({t['detail']})" if t["detail"] else "")
        )
    print(f"results: {outdir / 'RESULTS.md'}")
    gateway_bad = [
        r
        for r in doc["results"]
        if r["system"] == "gateway"
        and (r.get("status") == "error" or (r.get("status") == "ok" and not r.get("loss_free")))
    ]
    if gateway_bad:
        print(f"gateway: {len(gateway_bad)} case(s) lost records or failed", file=sys.stderr)
        return 1
    return 0


def summary_table(results: list[dict[str, Any]]) -> str:
    """Every case on one line, as a terminal table (the full tables are in RESULTS.md)."""
    rows = [("scenario", "system", "N", "result", "complete")]
    for r in by_workers(results):
        complete = "yes" if r.get("loss_free") else ("-" if r.get("status") != "ok" else "NO")
        rows.append(
            (
                str(r.get("scenario", "")),
                str(r.get("system", "")),
                str(r.get("n", "")),
                summary_line(r)[:90],
                complete,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def pyspy_path() -> str:
    import shutil

    local = Path(sys.executable).parent / "py-spy"
    return shutil.which("py-spy") or (str(local) if local.exists() else "")


def peer_versions(peers: dict[str, Any]) -> dict[str, str]:
    """``nats-server 2.9.10`` -> {"nats-server": "2.9.10"}; pyzmq and libzmq apart."""
    out: dict[str, str] = {}
    for p in peers.values():
        if not p.available or not p.version:
            continue
        for part in p.version.split(" / "):
            name, _, number = part.partition(" ")
            out[name] = number or name
    return out


def dataclasses_asdict(obj: Any) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(obj)


if __name__ == "__main__":
    sys.exit(main())
