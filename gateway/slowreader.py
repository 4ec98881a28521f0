"""Slow-reader policy (README: Guarantees and limits), sans-I/O: buffered bytes and the clock in,
verdicts and notices out.

A session whose socket buffer grows is *behind*. ``warn`` sessions keep receiving
everything and get a SLOW_READER_WARNING SystemMsg at most once per
``warning_interval_s``; ``skip`` sessions (only when every subscribed schema may skip)
drop whole chunks until their buffer is below ``resume_bytes`` and are then told how many
records they missed. No policy holds more than ``hard_cap_bytes`` for one session: over
it, the session is cut. Sessions of a lossless feed never skip: the feed waits for them,
and one that stalls it for longer than ``stall_timeout_s`` is cut.

The limits are the ``[slow_reader]`` section of the config (``SlowReaderConfig``) as it is.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from gateway import dbn
from gateway.config import SlowReaderConfig
from gateway.dbn import ErrorCode, SystemCode

__all__ = ["SKIP_SCHEMAS", "SlowReader", "Verdict", "effective_behavior"]

#: Schemas whose sessions may skip when behind (all others always behave as ``warn``).
SKIP_SCHEMAS = frozenset({"mbp-1", "mbp-10", "bbo-1s", "bbo-1m", "cmbp-1", "cbbo-1s", "cbbo-1m"})


def effective_behavior(requested: str | None, schemas: list[str]) -> str:
    """``warn`` or ``skip`` for a session (README: Guarantees and limits; ``drop`` is skip)."""
    all_skippable = bool(schemas) and all(s in SKIP_SCHEMAS for s in schemas)
    if requested in ("skip", "drop"):
        return "skip" if all_skippable else "warn"
    if requested == "warn":
        return "warn"
    return "skip" if all_skippable else "warn"


class Verdict(enum.IntEnum):
    SEND = 0
    SKIP = 1
    CUT = 2


@dataclass
class SlowReader:
    """Per-session slow-reader decisions: bytes and clock in, a verdict out.

    ``notices`` collects what the session must be told, as (kind, count) pairs:
    ("warning", 0) for a SLOW_READER_WARNING SystemMsg, ("skipped", n) for an ErrorMsg
    SKIPPED_RECORDS_AFTER_SLOW_READING. The adapter writes them before the chunk.
    """

    limits: SlowReaderConfig
    behavior: str = "warn"
    lossless: bool = False
    skipped: int = 0
    skipped_total: int = 0
    warnings: int = 0
    _nonempty_since: float | None = None
    _last_warning: float = float("-inf")
    _blocked_since: float | None = None
    notices: list[tuple[str, int]] = field(default_factory=list)

    def notice_records(self, now_ns: int) -> list[tuple[str, str, bytes]]:
        """The queued notices as gateway records, each with its ``(policy, event)``
        metric labels; the queue is emptied."""
        out = []
        for kind, count in self.notices:
            if kind == "warning":
                text = "Warning: slow reading, falling behind real time"
                record = dbn.encode_system(now_ns, text, SystemCode.SLOW_READER_WARNING)
                out.append(("warn", "warning", record))
            else:
                text = f"Skipped {count} records after slow reading"
                code = ErrorCode.SKIPPED_RECORDS_AFTER_SLOW_READING
                out.append(("skip", "skipped", dbn.encode_error(now_ns, text, code)))
        self.notices.clear()
        return out

    def resume(self, now: float) -> None:
        """Caught up after skipping: queue the notice and start the behind-clock afresh
        (otherwise the age test would fire at once on a reader that just caught up)."""
        self.notices.append(("skipped", self.skipped))
        self.skipped = 0
        self._nonempty_since = now

    def mark_drained(self) -> None:
        """The session's buffer is empty (the fan-out fast path)."""
        self._nonempty_since = None

    def behind(self, buffered: int, now: float) -> bool:
        if buffered <= 0:
            self._nonempty_since = None
            return False
        if self._nonempty_since is None:
            self._nonempty_since = now
        lim = self.limits
        return buffered > lim.behind_bytes or now - self._nonempty_since > lim.behind_age_s

    def on_chunk(self, buffered: int, size: int, records: int, now: float) -> Verdict:
        lim = self.limits
        if self.lossless:
            # Lossless feeds wait for their sessions instead; stalls are cut by ``on_tick``.
            return Verdict.SEND
        if buffered + size > lim.hard_cap_bytes:
            return Verdict.CUT
        behind = self.behind(buffered, now)
        if self.behavior == "skip":
            if self.skipped:
                if buffered <= lim.resume_bytes:
                    self.resume(now)
                    return Verdict.SEND
                self.skipped += records
                self.skipped_total += records
                return Verdict.SKIP
            if behind:
                self.skipped += records
                self.skipped_total += records
                return Verdict.SKIP
            return Verdict.SEND
        if behind and now - self._last_warning >= lim.warning_interval_s:
            self._last_warning = now
            self.warnings += 1
            self.notices.append(("warning", 0))
        return Verdict.SEND

    def on_tick(self, buffered: int, blocked: bool, now: float) -> Verdict:
        """The periodic check, between chunks: a skipping session that has caught up
        without a new chunk is told what it missed (a notice); a lossless session whose
        writes have been blocked for longer than ``stall_timeout_s`` is cut."""
        if self.lossless:
            if not blocked:
                self._blocked_since = None
            elif self._blocked_since is None:
                self._blocked_since = now
            elif now - self._blocked_since > self.limits.stall_timeout_s:
                return Verdict.CUT
        elif self.skipped and buffered <= self.limits.resume_bytes:
            self.resume(now)
        return Verdict.SEND
