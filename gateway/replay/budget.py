"""The gateway's replay bandwidth: ``[journal] replay_bytes_per_s`` shared by every replay.

``replay_step_bytes`` keeps each loop turn short; this caps what all replays together hand
the kernel per second. ``sendfile`` copies run in the gateway's own thread, so on a small
machine ten replays at full speed take the core live sessions need: the cap is the knob
that trades replay speed for live latency. A token bucket: a replay asks ``wait_s()``
before a step (0: go) and ``spend``s what the step produced; a step may overdraw, and the
next one waits until the bucket is back above zero.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["ReplayBudget"]


class ReplayBudget:
    def __init__(
        self,
        bytes_per_s: float,
        *,
        burst_s: float = 0.05,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if bytes_per_s <= 0:
            raise ValueError("a replay budget needs a positive rate")
        self.rate = float(bytes_per_s)
        self.burst = self.rate * burst_s
        self._clock = clock
        self._tokens = self.burst
        self._at = clock()
        #: steps that had to wait (observability, tests)
        self.waits = 0

    def wait_s(self) -> float:
        """Seconds until a replay may take its next step (0: now)."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens > 0:
            return 0.0
        self.waits += 1
        return -self._tokens / self.rate + 1e-3

    def spend(self, n: int) -> None:
        self._tokens -= n
