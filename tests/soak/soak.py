"""Soak harness: a real gateway under a steady synthetic feed, hundreds of sessions joining
and leaving at random, stalled readers and hostile clients; every promise is checked at the
end and a broken one makes the exit status non-zero.

    .venv/bin/python -m tests.soak.soak --duration 60 --sessions 200

Layout
------
Modules, by job: ``config`` (settings, record constants, RSS/fd probes), ``plans`` (what a
slot subscribes to), ``tracking`` (reading runs of records with numpy, online checks),
``session`` (one reader session), ``hostile`` (hostile clients), ``workers`` (reader
processes), ``controller`` (sampling, the run), ``verify`` (end-of-run checks and the
report); this module runs it and is the command line.

* The controller (this process) starts the gateway as a real process
  (``tests.integration.helpers.start_gateway``, synthetic feed ``SOAK``), runs the
  *reference* session (ALL_SYMBOLS trades + mbp-1 for the whole run), the hostile clients,
  and samples the gateway's RSS, fd count and ``/metrics``.
* ``--workers`` reader processes run the session *slots* with asyncio. A slot joins with a
  random plan, reads, leaves (half-close and drain to EOF, close, or reset) and rejoins until
  the end. ``--stalled`` of the slots are stalled readers (small SO_RCVBUF; they stop reading):
  half of them ``skip`` (mbp-1 only: they must be told "Skipped N records" when they resume),
  half ``warn`` (they get SLOW_READER_WARNING SystemMsgs and are cut at the hard cap; a
  ``--late-resume`` share of those resumes only after the gateway's cut grace period, and must
  then not see a clean end of stream that hides what was lost).
  Healthy sessions ask for ``slow_reader_behavior=warn`` so CPU noise never costs them
  records: they must receive everything.
* Readers never make a Python object per record: a read is cut into runs of same-size
  records with numpy and checked run by run, and sockets are polled every ``--poll-ms``
  (``pause_reading`` in between) so that 200 sessions fit a shared 2-core machine.

What is checked
---------------
Online, per session: the stream starts with a valid Metadata header; every data record has an
rtype and instrument of the subscription; the embedded ``sequence`` (u32 at byte 44 of trades
and mbp-1 records) strictly increases, and is contiguous (diff == 1) for ALL_SYMBOLS
trades + mbp-1 sessions. At the end, against the reference stream: the records of the
session's subscription between its first and last sequence, minus the gaps announced by skip
notices, are all there (count, sum and sum of squares of the sequence numbers per rtype);
each notice's N equals the records in its gap; a session read to EOF got exactly the number
of records the gateway logged as sent. Globally: no traceback in the gateway log, RSS at the
end within ``--rss-tolerance`` of RSS after warm-up, the fd count back to its baseline, the
gateway exits 0 on SIGTERM.
"""

from __future__ import annotations

import argparse
import sys
import time

from tests.soak.config import DATASET, SoakConfig, fd_count, rss_kib
from tests.soak.controller import SoakReport, _control, _Run
from tests.soak.hostile import HOSTILE_ACTIONS, hostile_once
from tests.soak.plans import Plan, reference_plan
from tests.soak.session import Env, SoakSession
from tests.soak.verify import _report

__all__ = [
    "HOSTILE_ACTIONS",
    "Env",
    "Plan",
    "SoakConfig",
    "SoakReport",
    "SoakSession",
    "fd_count",
    "hostile_once",
    "main",
    "reference_plan",
    "rss_kib",
    "run",
]


def run(cfg: SoakConfig) -> SoakReport:
    """Run one soak; the report says what broke (``report.ok``)."""
    from tests.integration.helpers import start_gateway

    rep = SoakReport()

    def say(text: str) -> None:
        rep.say(text)
        if cfg.progress:
            print(text, flush=True)
            rep.printed = len(rep.lines)

    from tests.conftest import TEST_LOOP

    feed = f"synthetic:?rate={cfg.rate:g}&instruments={cfg.instruments}"
    loop = cfg.loop or TEST_LOOP
    gw = start_gateway(
        "--metrics-port",
        "0",
        "--loop",
        loop,
        feeds={DATASET: feed},
        config=cfg.gateway_toml(),
        max_sessions=10_000,
    )
    say(
        f"soak: {cfg.duration:g} s, {cfg.sessions} session slots ({cfg.stalled} stalled: "
        f"{(cfg.stalled + 1) // 2} skip, {cfg.stalled // 2} warn), {cfg.hostile} hostile, "
        f"{cfg.workers} reader processes, seed {cfg.seed}"
    )
    say(f"gateway event loop: {loop} (GATEWAY_TEST_LOOP or --loop)")
    say(
        f"gateway pid {gw.proc.pid} port {gw.port}: feed {DATASET}={feed}; slow_reader "
        f"behind {cfg.behind_bytes} B / {cfg.behind_age_s:g} s, resume {cfg.resume_bytes} B, "
        f"hard cap {cfg.hard_cap_bytes} B, warnings every {cfg.warning_interval_s:g} s"
    )
    state = _Run(cfg, gw.proc.pid, gw.port, gw.metrics_port, str(gw.log_path), say)
    crashed: BaseException | None = None
    try:
        try:
            import uvloop

            uvloop.run(_control(state))
        except Exception as exc:  # noqa: BLE001 - reported, then the gateway is stopped
            crashed = exc
    finally:
        alive = gw.proc.poll() is None
        exit_code = gw.stop()
    if not alive:
        rep.fail(f"the gateway died during the soak (exit code {exit_code})")
    if crashed is not None:
        rep.fail(f"harness error: {crashed!r}")
        rep.say(gw.log()[-3000:])
        return rep
    _report(state, rep, gw.log(), exit_code if alive else None)
    return rep


def main(argv: list[str] | None = None) -> int:
    d = SoakConfig()
    p = argparse.ArgumentParser(
        prog="python -m tests.soak.soak", description=(__doc__ or "").split("\n")[0]
    )
    p.add_argument("--duration", type=float, default=d.duration, help="seconds of load")
    p.add_argument("--sessions", type=int, default=d.sessions, help="concurrent session slots")
    p.add_argument("--stalled", type=int, default=d.stalled, help="stalled-reader slots")
    p.add_argument("--hostile", type=int, default=d.hostile, help="hostile client loops")
    p.add_argument("--workers", type=int, default=d.workers, help="reader processes")
    p.add_argument("--rate", type=float, default=d.rate, help="feed records per second")
    p.add_argument("--instruments", type=int, default=d.instruments)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--warmup", type=float, default=None, help="seconds (default duration/3)")
    p.add_argument("--poll-ms", type=float, default=d.poll_ms, help="reader poll period")
    p.add_argument("--behind-bytes", type=int, default=d.behind_bytes)
    p.add_argument("--hard-cap-bytes", type=int, default=d.hard_cap_bytes)
    p.add_argument("--resume-bytes", type=int, default=d.resume_bytes)
    p.add_argument("--sndbuf", type=int, default=d.sndbuf, help="gateway SO_SNDBUF (0: auto)")
    p.add_argument("--rss-tolerance", type=float, default=d.rss_tolerance)
    p.add_argument(
        "--late-resume",
        type=float,
        default=d.late_resume,
        help="fraction of warn-stall slots that resume after the cut grace period",
    )
    p.add_argument("--loop", choices=("uvloop", "asyncio"), default="", help="gateway loop")
    a = p.parse_args(argv)
    cfg = SoakConfig(
        duration=a.duration,
        sessions=a.sessions,
        stalled=a.stalled,
        hostile=a.hostile,
        workers=a.workers,
        rate=a.rate,
        instruments=a.instruments,
        seed=a.seed,
        warmup=a.warmup,
        poll_ms=a.poll_ms,
        behind_bytes=a.behind_bytes,
        hard_cap_bytes=a.hard_cap_bytes,
        resume_bytes=min(d.resume_bytes, a.behind_bytes),
        rss_tolerance=a.rss_tolerance,
        sndbuf=a.sndbuf,
        late_resume=a.late_resume,
        loop=a.loop,
    )
    started = time.monotonic()
    rep = run(cfg)
    for line in rep.lines[rep.printed :]:
        print(line)
    print()
    if rep.failures:
        print(f"FAILED: {len(rep.failures)} broken promise(s):")
        for f, tag in zip(rep.failures, rep.tags, strict=True):
            print(f"  - {f}" + (f"  [{tag}]" if tag else ""))
    else:
        print("PASSED: every promise kept")
    print(f"(soak wall time {time.monotonic() - started:.0f} s)")
    return 0 if rep.ok else 1


if __name__ == "__main__":
    sys.exit(main())
