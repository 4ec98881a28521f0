"""Prober.stop() ends the strobe loop even when a cancellation is swallowed on the way
(Python 3.11's asyncio.wait_for can lose one that lands as the awaited step completes):
before the fix, SIGTERM during a strobe left the gateway strobing for ever."""

from __future__ import annotations

import asyncio

from gateway.metrics import ProbeMetrics
from gateway.ops.probe import Prober, ProbeTarget


class History:
    closed = False

    def close(self) -> None:
        self.closed = True


class SwallowingProber(Prober):
    """Its strobe loses the first cancellation, as wait_for does in the race."""

    swallowed = 0
    strobes = 0

    async def run_once(self):  # type: ignore[override]
        self.strobes += 1
        try:
            await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            if self.swallowed == 0:
                self.swallowed += 1
                return None
            raise
        return None


async def test_stop_survives_a_swallowed_cancellation() -> None:
    history = History()
    target = ProbeTarget(host="127.0.0.1", port=9, key="db-" + "K" * 29, dataset="X")
    prober = SwallowingProber(
        target,
        interval_s=0.01,
        metrics=ProbeMetrics(),
        history=history,  # type: ignore[arg-type]
    )
    task = prober.start()
    while prober.strobes < 2:
        await asyncio.sleep(0.01)
    stopping = asyncio.ensure_future(prober.stop())
    done, _ = await asyncio.wait({stopping}, timeout=5)
    assert done, "stop() did not return: the strobe loop went on"
    await stopping
    assert task.done()
    assert prober.swallowed == 1
    assert history.closed
