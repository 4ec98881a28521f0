"""Reader processes: each runs its share of session slots on its own event loop and
sends their summaries back to the controller."""

from __future__ import annotations

import asyncio
import random
import resource
import time
from typing import Any

from tests.soak.config import CUT_LINE, SoakConfig
from tests.soak.plans import PLANNERS
from tests.soak.session import Env, SoakSession

# --- worker processes -------------------------------------------------------------------------


async def _watch_log(path: str, env: Env, until: float) -> None:
    """Follow the gateway log for "session cut id=N" (stalled warn sessions wait for it)."""
    pattern = CUT_LINE
    pos = 0
    tail = ""
    while time.monotonic() < until:
        try:
            with open(path, errors="replace") as f:
                f.seek(pos)
                text = f.read()
                pos = f.tell()
        except OSError:
            text = ""
        text = tail + text
        lines = text.split("\n")
        tail = lines.pop()
        for line in lines:
            m = pattern.search(line)
            if m:
                env.saw_cut(int(m.group(1)))
        await asyncio.sleep(0.2)


async def _slot(
    slot: int, role: str, cfg: SoakConfig, env: Env, end_at: float, out: list[SoakSession]
) -> None:
    rng = random.Random(f"{cfg.seed}:slot:{slot}")
    ramp = min(3.0, cfg.duration / 10) if role == "healthy" else 0.3
    await asyncio.sleep(rng.uniform(0, ramp))
    while True:
        plan = PLANNERS[role](rng, cfg, end_at - time.monotonic())
        if plan is None:
            return
        session = SoakSession(plan, env)
        out.append(session)
        await session.run()
        await asyncio.sleep(rng.uniform(0.0, 1.0))


async def _worker(spec: dict[str, Any]) -> dict[str, Any]:
    cfg = SoakConfig(**spec["cfg"])
    env = Env(port=spec["port"], key=spec["key"], poll_s=cfg.poll_ms / 1000)
    end_at = spec["end_at"]
    sessions: list[SoakSession] = []
    watcher = asyncio.ensure_future(_watch_log(spec["log_path"], env, end_at + 60))
    tasks = [
        asyncio.ensure_future(_slot(slot, role, cfg, env, end_at, sessions))
        for slot, role in spec["slots"]
    ]
    _, pending = await asyncio.wait(tasks, timeout=max(1.0, end_at + 45 - time.monotonic()))
    stuck = len(pending)
    for t in pending:
        t.cancel()
    for s in sessions:
        if s.transport is not None and not s.lost.done():
            s.transport.abort()
    watcher.cancel()
    await asyncio.sleep(0.1)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "index": spec["index"],
        "sessions": [s.summary() for s in sessions],
        "stuck_slots": stuck,
        "cpu_s": usage.ru_utime + usage.ru_stime,
    }


def worker_entry(spec: dict[str, Any], conn: Any) -> None:
    try:
        import uvloop

        result = uvloop.run(_worker(spec))
    except BaseException as exc:  # noqa: BLE001 - reported to the controller
        import traceback

        result = {"index": spec["index"], "crash": traceback.format_exc(), "exc": repr(exc)}
    conn.send(result)
    conn.close()
