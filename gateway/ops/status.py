"""The status document: what ``/status.json`` returns and the status page shows.

:func:`document` assembles it from a :class:`~gateway.ops.snapshot.GatewaySnapshot` (none
in a stand-alone probe), the throughput sampled from successive snapshots, and the probe's
figures; :func:`assess` names the overall state (operational, degraded, down) and why. The
document is plain data (JSON types only), so the page and scripts read the same numbers.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import msgspec

from gateway import __version__
from gateway.ops.fmt import duration
from gateway.ops.snapshot import GatewaySnapshot, Totals, feed_status

__all__ = [
    "KEEP_S",
    "RATE_WINDOWS",
    "SAMPLE_S",
    "STALE_S",
    "Sample",
    "ThroughputSampler",
    "assess",
    "document",
]

#: throughput is sampled this often and kept this long
SAMPLE_S = 1.0
KEEP_S = 15 * 60.0
RATE_WINDOWS: tuple[tuple[str, float], ...] = (("1m", 60.0), ("5m", 300.0), ("15m", 900.0))
#: a feed whose last record is older than this is called stale on the page
STALE_S = 60.0


@dataclass(frozen=True)
class Sample:
    t: float
    records_in: int
    bytes_in: int
    records_out: int
    bytes_out: float

    @classmethod
    def of(cls, totals: Totals, t: float) -> Sample:
        """``totals`` at monotonic time ``t``."""
        return cls(t, totals.records_in, totals.bytes_in, totals.records_out, totals.bytes_out)


class ThroughputSampler:
    """Cumulative counters sampled every second; rates over the last minutes."""

    def __init__(self, keep_s: float = KEEP_S, period_s: float = SAMPLE_S) -> None:
        self.samples: deque[Sample] = deque(maxlen=int(keep_s / period_s) + 2)

    def add(self, sample: Sample) -> None:
        self.samples.append(sample)

    def rates(self, window_s: float) -> dict[str, float] | None:
        """Per-second rates over the last ``window_s`` (or what is kept of it)."""
        if len(self.samples) < 2:
            return None
        last = self.samples[-1]
        first = last
        for s in reversed(self.samples):
            if last.t - s.t > window_s + 1e-6:
                break
            first = s
        dt = last.t - first.t
        if dt <= 0:
            return None
        return {
            "seconds": round(dt, 3),
            "records_in_per_s": (last.records_in - first.records_in) / dt,
            "bytes_in_per_s": (last.bytes_in - first.bytes_in) / dt,
            "records_out_per_s": (last.records_out - first.records_out) / dt,
            "bytes_out_per_s": (last.bytes_out - first.bytes_out) / dt,
        }

    def series(self, points: int = 90) -> list[list[float]]:
        """[t, records in/s, records out/s]: about ``points`` steps over what is kept."""
        out: list[list[float]] = []
        if len(self.samples) < 2:
            return out
        step_s = max(SAMPLE_S, (self.samples[-1].t - self.samples[0].t) / points)
        prev: Sample | None = None
        for s in self.samples:
            if prev is None:
                prev = s
                continue
            if s.t - prev.t >= step_s * 0.95 or s is self.samples[-1]:
                dt = s.t - prev.t
                if dt > 0:
                    out.append(
                        [
                            round(s.t, 3),
                            (s.records_in - prev.records_in) / dt,
                            (s.records_out - prev.records_out) / dt,
                        ]
                    )
                prev = s
        return out

    def throughput(self, now: float) -> dict[str, Any]:
        """The document's ``throughput``: rates per window and the series in wall time."""
        # samples are taken on the monotonic clock; scripts and the page want wall time
        offset = now - time.monotonic()
        return {
            "windows": {label: self.rates(sec) for label, sec in RATE_WINDOWS},
            "series": [[round(t + offset, 3), a, b] for t, a, b in self.series()],
        }


def document(
    snap: GatewaySnapshot | None,
    throughput: dict[str, Any] | None,
    probe: dict[str, Any] | None,
    now: float,
) -> dict[str, Any]:
    """Everything /status shows, as plain data (also /status.json)."""
    data: dict[str, Any] = {
        "generated_at": round(now, 3),
        "version": __version__,
        "gateway": None,
        "sessions": None,
        "throughput": None,
        "feeds": None,
        "probe": None,
    }
    if snap is not None:
        data["gateway"] = msgspec.to_builtins(snap.gateway)
        data["sessions"] = msgspec.to_builtins(snap.sessions)
        data["sessions"]["replays_active"] = snap.replays.active
        data["sessions"]["replay_bytes"] = dict(snap.replays.bytes)
        data["throughput"] = throughput
        data["feeds"] = [feed_status(f) for f in snap.feeds]
    data["probe"] = probe
    data["state"], data["reasons"] = assess(data)
    return data


def assess(data: dict[str, Any]) -> tuple[str, list[str]]:
    """operational / degraded / down, and why."""
    down: list[str] = []
    degraded: list[str] = []
    gw = data.get("gateway")
    if gw is not None and not gw["ready"]:
        down.append("gateway not ready" + ("" if gw["accepting"] else " (shutting down)"))
    workers = (gw or {}).get("workers") or {}
    if workers.get("down"):
        degraded.append(
            f"worker(s) down: {', '.join(workers['down'])} ({workers['up']} of {workers['of']} up)"
        )
    for feed in data.get("feeds") or []:
        name = feed["dataset"]
        if not feed["connected"]:
            (degraded if gw and gw["ready"] else down).append(f"feed {name} down")
        elif feed["paused"]:
            degraded.append(f"feed {name} paused for a slow session")
        age = feed["last_record_age_s"]
        if feed["connected"] and age is not None and age > STALE_S:
            degraded.append(f"feed {name}: no record for {duration(age)}")
        if (feed.get("journal") or {}).get("state") == "disabled":
            degraded.append(f"feed {name}: journal disabled by a write error (see log)")
    probe = data.get("probe")
    if probe is not None:
        last = probe.get("last") or (probe.get("recent") or [None])[0]
        if last is not None and not last["ok"]:
            down.append(f"probe failing at step {last['step']}")
        hour = (probe.get("uptime") or {}).get("1h") or {}
        if hour.get("failures"):
            degraded.append(f"{hour['failures']} failed strobe(s) in the last hour")
    if down:
        return "down", down + degraded
    if degraded:
        return "degraded", degraded
    return "operational", []
