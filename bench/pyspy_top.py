"""The top costs in py-spy's collapsed stacks (``py-spy record --format raw``).

    python -m bench.pyspy_top PROFILE.txt [--top 25] [--under FUNCTION]

Prints the functions that take the most samples by themselves (self: the innermost
frame, by line) and with what they call (inclusive: once per stack, by function), as a
share of all samples. ``--under`` keeps only stacks through a function whose name
contains the text (e.g. ``data_received``).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Profile", "load", "main", "parse_lines"]

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]+)(?::(?P<line>\d+))?\)$")


def _short(frame: str, with_line: bool) -> str:
    """``f (/x/y/gateway/session.py:120)`` -> ``f (gateway/session.py:120)``."""
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = m.group("file")
    parts = path.split("/")
    for anchor in ("gateway", "bench", "site-packages", "lib"):
        if anchor in parts:
            idx = len(parts) - 1 - parts[::-1].index(anchor)
            path = "/".join(parts[idx + (anchor in ("site-packages", "lib")) :])
            break
    line = m.group("line")
    where = f"{path}:{line}" if with_line and line else path
    return f"{m.group('func')} ({where})"


@dataclass
class Profile:
    samples: int = 0
    self_counts: Counter[str] = field(default_factory=Counter)
    inclusive: Counter[str] = field(default_factory=Counter)

    def add(self, frames: list[str], count: int) -> None:
        if not frames:
            return
        self.samples += count
        self.self_counts[_short(frames[-1], True)] += count
        for name in {_short(f, False) for f in frames}:
            self.inclusive[name] += count

    def table(self, top: int = 25) -> str:
        if not self.samples:
            return "no samples"
        lines = [f"{self.samples:,} samples", "", "self (innermost frame, by line):"]
        for name, n in self.self_counts.most_common(top):
            lines.append(f"  {100 * n / self.samples:5.1f}%  {n:7,}  {name}")
        trunk = [k for k, v in self.inclusive.items() if v >= 0.98 * self.samples]
        lines += [
            "",
            "inclusive (with callees, by function; leaving out the "
            f"{len(trunk)} frames under which >= 98% of the samples are):",
        ]
        shown = [(k, v) for k, v in self.inclusive.most_common() if k not in trunk]
        for name, n in shown[:top]:
            lines.append(f"  {100 * n / self.samples:5.1f}%  {n:7,}  {name}")
        return "\n".join(lines)

    def as_dict(self, top: int = 25) -> dict[str, object]:
        return {
            "samples": self.samples,
            "self": [[k, v] for k, v in self.self_counts.most_common(top)],
            "inclusive": [[k, v] for k, v in self.inclusive.most_common(top)],
        }


def parse_lines(lines: list[str], under: str = "", skip_process: bool = True) -> Profile:
    """A Profile of collapsed-stack lines (``frame;frame;frame COUNT``)."""
    prof = Profile()
    for raw in lines:
        raw = raw.rstrip("\n")
        if not raw.strip():
            continue
        stack, _, count = raw.rpartition(" ")
        if not count.isdigit():
            continue
        frames = [f for f in stack.split(";") if f]
        if skip_process:  # py-spy's pseudo frames: process (with --subprocesses), thread
            frames = [f for f in frames if not f.startswith(("process ", "thread ("))]
        if under and not any(under in f for f in frames):
            continue
        prof.add(frames, int(count))
    return prof


def load(paths: list[Path], under: str = "") -> Profile:
    lines: list[str] = []
    for p in paths:
        lines += p.read_text(errors="replace").splitlines()
    return parse_lines(lines, under)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.pyspy_top", description=__doc__)
    p.add_argument("profiles", nargs="+", type=Path)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--under", default="", help="only stacks through this function")
    args = p.parse_args(argv)
    print(load(args.profiles, args.under).table(args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
