"""The controller side of a run: ``SoakReport``, the run state (``_Run``), the
sampler (RSS, fds, /metrics), the hostile loops and ``_control`` (workers, reference
session, the end)."""

from __future__ import annotations

import asyncio
import dataclasses
import multiprocessing
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tests.soak.config import DATASET, SoakConfig, fd_count, rss_kib
from tests.soak.hostile import hostile_once
from tests.soak.plans import reference_plan
from tests.soak.session import Env, SoakSession
from tests.soak.tracking import Ref
from tests.soak.workers import worker_entry
from tests.support.prometheus import metric

# --- the controller --------------------------------------------------------------------------


@dataclass
class SoakReport:
    lines: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    #: lines already printed while the soak ran
    printed: int = 0
    #: the tag of each failure ("" for most; "late-cut" for the late-resume promise)
    tags: list[str] = field(default_factory=list)

    def say(self, text: str = "") -> None:
        self.lines.append(text)

    def fail(self, text: str, tag: str = "") -> None:
        self.failures.append(text)
        self.tags.append(tag)

    def broken(self, *, exclude: tuple[str, ...] = (), only: str | None = None) -> list[str]:
        return [
            f
            for f, t in zip(self.failures, self.tags, strict=True)
            if t not in exclude and (only is None or t == only)
        ]

    @property
    def ok(self) -> bool:
        return not self.failures

    def text(self) -> str:
        return "\n".join(self.lines)


@dataclass
class _Run:
    cfg: SoakConfig
    pid: int
    port: int
    metrics_port: int
    log_path: str
    say: Callable[[str], None]
    fd_base: int = 0
    rss_base: int = 0
    rss_warm: int = 0
    fd_warm: int = 0
    rss_end: int = 0
    fd_end: int = 0
    samples: list[tuple[float, int, int, int, int]] = field(default_factory=list)
    hostile: list[tuple[str, str, bool]] = field(default_factory=list)
    workers: list[dict[str, Any]] = field(default_factory=list)
    reference: SoakSession | None = None
    ref_arrays: Ref | None = None
    metrics: dict[Any, float] = field(default_factory=dict)
    feed_stalls: list[str] = field(default_factory=list)
    t0: float = 0.0


async def _to_thread(fn: Callable[..., Any], *args: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


def _metrics(port: int) -> dict[Any, float]:
    from tests.integration.helpers import metric_samples

    return metric_samples(port)


def _metric(samples: dict[Any, float], name: str, **labels: str) -> float:
    return metric(samples, name, **labels)


async def _hostile_loop(run: _Run, i: int, end_at: float) -> None:
    from tests.integration.helpers import KEY

    rng = random.Random(f"{run.cfg.seed}:hostile:{i}")
    while time.monotonic() < end_at - 2:
        run.hostile.append(await hostile_once(run.port, rng, key=KEY, dataset=DATASET))
        await asyncio.sleep(rng.uniform(0.05, 0.3))


async def _sampler(run: _Run, end_at: float) -> None:
    cfg = run.cfg
    warm_at = run.t0 + cfg.warmup_s
    next_print = run.t0
    last_records = -1
    last_change = time.monotonic()
    live = 0.0
    while time.monotonic() < end_at:
        now = time.monotonic()
        rss, fds = rss_kib(run.pid), fd_count(run.pid)
        ref = run.reference
        records = ref.tracker.data_records if ref is not None else 0
        if records != last_records:
            last_records, last_change = records, now
        elif now - last_change > 3.0:
            run.feed_stalls.append(f"reference got nothing for {now - last_change:.1f} s")
            last_change = now
        if not run.rss_warm and now >= warm_at:
            run.rss_warm, run.fd_warm = rss, fds
        if now >= next_print:
            try:
                m = await _to_thread(_metrics, run.metrics_port)
                live = _metric(m, "gateway_sessions", state="streaming")
            except OSError:
                pass
            next_print = now + 5.0
            if cfg.progress:
                run.say(
                    f"  t={now - run.t0:5.1f}s  rss={rss / 1024:6.1f} MiB  fds={fds:4d}  "
                    f"streaming={live:4.0f}  reference_records={records}"
                )
        run.samples.append((now - run.t0, rss, fds, records, int(live)))
        await asyncio.sleep(1.0)


def _slot_roles(cfg: SoakConfig) -> list[tuple[int, str]]:
    stalled = min(cfg.stalled, cfg.sessions)
    skip = (stalled + 1) // 2
    warn = stalled - skip
    late = 0
    if warn >= 2 and cfg.late_resume > 0:  # keep at least one ordinary warn-stall slot
        late = min(warn - 1, max(1, round(warn * cfg.late_resume)))
    roles = ["skip_stall"] * skip + ["warn_stall_late"] * late + ["warn_stall"] * (warn - late)
    roles += ["healthy"] * (cfg.sessions - stalled)
    return list(enumerate(roles))  # dealt round-robin to the workers


async def _control(run: _Run) -> None:
    from tests.integration.helpers import KEY

    cfg = run.cfg
    loop = asyncio.get_running_loop()
    run.t0 = time.monotonic()
    run.fd_base, run.rss_base = fd_count(run.pid), rss_kib(run.pid)
    env = Env(port=run.port, key=KEY, poll_s=cfg.poll_ms / 1000)
    ref = run.reference = SoakSession(reference_plan(), env)
    ref_task = loop.create_task(ref.run())
    try:
        await asyncio.wait_for(asyncio.shield(ref.started), 15)
    except TimeoutError:
        pass
    if not ref.started.done() or not ref.started.result():
        raise RuntimeError(f"the reference session did not start: {ref.failure}")
    end_at = time.monotonic() + cfg.duration
    ctx = multiprocessing.get_context("spawn")
    roles = _slot_roles(cfg)
    procs = []
    for w in range(cfg.workers):
        spec = {
            "index": w,
            "port": run.port,
            "key": KEY,
            "log_path": run.log_path,
            "end_at": end_at,
            "slots": roles[w :: cfg.workers],
            "cfg": dataclasses.asdict(cfg),
        }
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=worker_entry, args=(spec, child), daemon=True)
        proc.start()
        child.close()
        procs.append((proc, parent))
    hostile = [loop.create_task(_hostile_loop(run, i, end_at)) for i in range(cfg.hostile)]
    sampler = loop.create_task(_sampler(run, end_at + 60))

    def collect(parent: Any, deadline: float) -> dict[str, Any] | None:
        if parent.poll(max(0.0, deadline - time.monotonic())):
            try:
                return parent.recv()  # type: ignore[no-any-return]
            except EOFError:
                return None
        return None

    deadline = end_at + 75
    results = await asyncio.gather(*(_to_thread(collect, p, deadline) for _, p in procs))
    for i, ((proc, parent), res) in enumerate(zip(procs, results, strict=True)):
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
        parent.close()
        run.workers.append(res or {"index": i, "crash": f"no result (exit code {proc.exitcode})"})
    await asyncio.gather(*hostile, return_exceptions=True)
    sampler.cancel()
    env.stop.set()
    try:
        await asyncio.wait_for(ref_task, 30)
    except TimeoutError:
        ref_task.cancel()
        ref.failure = ref.failure or "reference did not finish"
    run.ref_arrays = ref.tracker.arrays()
    # every connection gone: the fd count must come back to what it was before any client
    settle = time.monotonic() + 20
    while time.monotonic() < settle and fd_count(run.pid) > run.fd_base:
        await asyncio.sleep(0.25)
    await asyncio.sleep(1.0)
    run.fd_end, run.rss_end = fd_count(run.pid), rss_kib(run.pid)
    if not run.rss_warm:
        run.rss_warm = run.rss_end
    run.metrics = await _to_thread(_metrics, run.metrics_port)
