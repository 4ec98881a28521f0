"""Whether a gateway's feeds are ready: every feed connected, or still within its grace
(``feed_grace_s``) of going down or of the start. A relay feed (``lsg://``) that has not
reached its upstream once since the start gets no grace: an edge with nothing to relay
yet is not ready for clients. The single-process gateway and the ``--workers`` supervisor
answer ``/readyz`` with it."""

from __future__ import annotations

import time
from collections.abc import Mapping

from gateway.feeds.base import Feed

__all__ = ["FeedReadiness"]


class FeedReadiness:
    def __init__(self, feeds: Mapping[str, Feed], grace_s: float) -> None:
        self.feeds = feeds
        self.grace_s = grace_s
        #: when each feed went down (monotonic), noted every tick
        self.down_since: dict[str, float] = {}

    def note(self) -> None:
        """Note when each feed went down (call every tick, and at the start)."""
        mono = time.monotonic()
        for ds, feed in self.feeds.items():
            if feed.connected:
                self.down_since.pop(ds, None)
            else:
                self.down_since.setdefault(ds, mono)

    def check(self) -> tuple[bool, dict[str, str]]:
        """Every feed up or within its grace; the detail says which, per dataset."""
        now = time.monotonic()
        detail: dict[str, str] = {}
        ok = True
        for ds, f in self.feeds.items():
            if f.connected:
                detail[ds] = "up: " + f.state_detail
                continue
            if f.relay is not None and f.ups == 0:
                ok = False
                detail[ds] = "down: " + f.state_detail
                continue
            left = self.grace_s - (now - self.down_since.get(ds, now))
            if left > 0:
                detail[ds] = f"down, {left:.1f} s of grace left: {f.state_detail}"
            else:
                ok = False
                detail[ds] = "down: " + f.state_detail
        return ok, detail
