"""How the status page and its reasons write numbers: durations, rates, times."""

from __future__ import annotations

import time

__all__ = ["clock", "duration", "fmt_pct", "ms", "rate", "span", "utc"]


def fmt_pct(ratio: float | None) -> str:
    return "no data" if ratio is None else f"{ratio * 100:.2f}%"


def ms(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    millis = seconds * 1000
    if millis < 10:
        return f"{millis:.2f} ms"
    return f"{millis:.1f} ms" if millis < 1000 else f"{seconds:.2f} s"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def span(seconds: float | None) -> str:
    """A length of history in its two largest units, floored: "23h 59m", "2d 3h",
    "4m 10s", "42s"."""
    if seconds is None:
        return "–"
    whole = int(max(0.0, seconds))
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def rate(value: float | None, unit: str = "") -> str:
    if value is None:
        return "–"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= div:
            return f"{value / div:.2f} {suffix}{unit}"
    return f"{value:.0f} {unit}".rstrip()


def utc(ts: float | None) -> str:
    if ts is None:
        return "–"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


def clock(ts: float, date: bool = False) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S" if date else "%H:%M:%S", time.gmtime(ts))
