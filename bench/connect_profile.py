"""Profile the ``connect`` scenario's path: accept, CRAM, auth, subscribe, start.

    python -m bench.connect_profile [--sessions 1000] [--rounds 5] [--workers 1]
                                    [--rate 1000] [--out DIR] [--tree PATH]

One gateway (``--workers N``: a supervisor and N workers; default the single process),
one feed up, the bench's two subscriber worker processes; then ``--rounds`` storms of
``--sessions`` connect + auth + subscribe at once (what the ``connect`` scenario does
once), each timed from the first connect to the last session streaming. py-spy records
the gateway (with ``--subprocesses`` for N > 1) and each subscriber process the whole
time, as collapsed stacks (``--format raw``, no idle samples), so the costs of both
sides of the handshake are on one page: ``connect-profile.md`` (and ``.json``) in the
output folder, next to the raw profiles (``python -m bench.pyspy_top`` reads them).

Sessions of earlier rounds stay connected (idle, no heartbeats), so later rounds run
beside them, as a busy gateway would. ``--tree`` runs the gateway of another checkout
(a ``git worktree`` of an older commit) with this environment's Python: before/after
profiles on one machine in one sitting.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.peers import GatewayServer
from bench.procs import raise_nofile
from bench.pyspy_top import Profile, load
from bench.scenarios import CTX, Harness, _shut_down, make_plan, pyspy_command
from bench.subscribers import ConnSpec, WorkerConfig

RESULTS = Path(__file__).resolve().parent / "results"


def _pyspy() -> str:
    import shutil

    local = Path(sys.executable).parent / "py-spy"
    return shutil.which("py-spy") or (str(local) if local.exists() else "")


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def run(args: argparse.Namespace) -> dict[str, Any]:
    pyspy = _pyspy()
    if not pyspy:
        raise SystemExit("needs py-spy: .venv/bin/pip install py-spy")
    outdir: Path = args.out or RESULTS / (time.strftime("%Y%m%d-%H%M%S") + "-connect-profile")
    outdir.mkdir(parents=True, exist_ok=True)
    raise_nofile()
    h = Harness(outdir, make_plan(False), {})
    n, rounds = args.sessions, args.rounds
    server = GatewayServer(h.workdir, workers=args.workers, tree=args.tree).start()
    progress = CTX.RawArray("q", max(n * rounds, 1))
    pub = None
    workers = []
    spies: list[subprocess.Popen[bytes]] = []
    log = open(h.workdir / "py-spy.log", "ab")  # noqa: SIM115 - closed in finally
    gw_prof = outdir / "pyspy-gateway.txt"
    sub_profs: list[Path] = []
    timings: list[dict[str, Any]] = []
    try:
        pub, _port, _pid = h._burst_publisher(server, "gateway", n, progress)
        workers = h.start_workers(WorkerConfig(), progress)
        spies.append(
            subprocess.Popen(
                pyspy_command(
                    pyspy,
                    server.pid,
                    gw_prof,
                    rate=args.rate,
                    fmt="raw",
                    subprocesses=args.workers > 1,
                ),
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        )
        for i, w in enumerate(workers):
            out = outdir / f"pyspy-subscriber-{i}.txt"
            sub_profs.append(out)
            cmd = pyspy_command(
                pyspy, w.proc.pid, out, rate=args.rate, fmt="raw", subprocesses=False
            )
            spies.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log))
        time.sleep(1.0)  # py-spy attached
        for r in range(rounds):
            specs = [ConnSpec(r * n + i, "gateway", server.port) for i in range(n)]
            cpu0 = server.cpu_seconds()
            t0 = time.perf_counter()
            ready = h.connect(workers, specs, n, timeout=120)
            wall = time.perf_counter() - t0
            cpu1 = server.cpu_seconds()
            spans = list(ready.ready.values())
            per = np.array([b - a for a, b in spans], dtype=np.float64) / 1e6
            timings.append(
                {
                    "round": r,
                    "ready": len(spans),
                    "failed": len(ready.failed),
                    "all_streaming_s": round(
                        (max(b for _, b in spans) - min(a for a, _ in spans)) / 1e9, 4
                    )
                    if spans
                    else None,
                    "harness_wall_s": round(wall, 4),
                    "gateway_cpu_s": round(cpu1 - cpu0, 3),
                    "per_session_ms_p50": round(float(np.percentile(per, 50)), 2)
                    if len(per)
                    else None,
                    "per_session_ms_p99": round(float(np.percentile(per, 99)), 2)
                    if len(per)
                    else None,
                }
            )
            print(f"round {r}: {timings[-1]}", file=sys.stderr)
            time.sleep(0.3)
    finally:
        _stop(spies)
        log.close()
        _shut_down(workers, pub, server)
    gw = load([gw_prof]) if gw_prof.exists() else Profile()
    subs = load([p for p in sub_profs if p.exists()])
    doc = {
        "sessions": n,
        "rounds": rounds,
        "gateway_workers": args.workers,
        "tree": str(args.tree or ""),
        "rate": args.rate,
        "timings": timings,
        "gateway": gw.as_dict(args.top),
        "subscribers": subs.as_dict(args.top),
    }
    (outdir / "connect-profile.json").write_text(json.dumps(doc, indent=1))
    med = [t["all_streaming_s"] for t in timings if t["all_streaming_s"] is not None]
    text = "\n".join(
        [
            f"# connect profile: {rounds} x {n} connect + auth + subscribe, gateway workers "
            f"{args.workers}, py-spy {args.rate} Hz"
            + (f", gateway of {args.tree}" if args.tree else ""),
            "",
            "| round | ready | failed | all streaming s | gateway CPU s "
            "| per session p50 / p99 ms |",
            "|---|---|---|---|---|---|",
            *[
                f"| {t['round']} | {t['ready']} | {t['failed']} | {t['all_streaming_s']} | "
                f"{t['gateway_cpu_s']} | {t['per_session_ms_p50']} / {t['per_session_ms_p99']} |"
                for t in timings
            ],
            "",
            f"median all-streaming: {float(np.median(med)):.4f} s" if med else "",
            "",
            "## gateway",
            "",
            "```",
            gw.table(args.top),
            "```",
            "",
            "## subscribers (the bench's client side, both processes)",
            "",
            "```",
            subs.table(args.top),
            "```",
            "",
        ]
    )
    (outdir / "connect-profile.md").write_text(text)
    print(text)
    print(f"written: {outdir / 'connect-profile.md'}", file=sys.stderr)
    return doc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.connect_profile",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--sessions", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--workers", type=int, default=1, help="gateway worker processes")
    p.add_argument("--rate", type=int, default=1000, help="py-spy samples per second")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out", type=Path)
    p.add_argument("--tree", type=Path, help="the checkout whose gateway runs (default this one)")
    args = p.parse_args(argv)
    if args.sessions < 1 or args.rounds < 1 or args.workers < 1:
        p.error("--sessions, --rounds and --workers must be >= 1")
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
