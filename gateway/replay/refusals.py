"""Whether a session's replay can be served: ``check`` (pure: journal facts and the clock
in, a ``Refusal`` or None out), and the helpers the planner and the adapter share."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from gateway.dbn import ErrorCode
from gateway.interest import SubscriptionLike

if TYPE_CHECKING:
    from gateway.journal import DatasetJournal

__all__ = [
    "MAX_REPLAY_NAMED",
    "FUTURE_SLACK_NS",
    "Refusal",
    "ReplayError",
    "ReplayRequest",
    "check",
    "iso_ns",
    "wants_replay",
]

#: a start this far past the wall clock is refused as in the future
FUTURE_SLACK_NS = 1_000_000_000
#: named symbols (not ALL_SYMBOLS) a replaying session may have: the hand-over to live
#: registers them in one step (about 4.5 us each), which must not stall other sessions
MAX_REPLAY_NAMED = 10_000


class ReplayRequest(SubscriptionLike, Protocol):
    """A subscription that may ask for a replay (``session.Subscription`` is one)."""

    @property
    def start_ns(self) -> int | None: ...

    @property
    def resume_after(self) -> int | None: ...

    @property
    def resume_epoch(self) -> str | None: ...


def wants_replay(subs: Sequence[ReplayRequest]) -> bool:
    return any(s.start_ns is not None or s.resume_after is not None for s in subs)


class ReplayError(Exception):
    """The journal does not hold what its index says (a file cut short, bad records)."""


@dataclass(frozen=True)
class Refusal:
    """Why a replay is refused: ``reason`` labels ``gateway_replays_refused_total``."""

    reason: str
    code: int
    text: str


def iso_ns(ns: int) -> str:
    """UNIX ns as ISO 8601 UTC with nanoseconds (``2026-12-01T10:00:00.123456789Z``)."""
    secs, frac = divmod(ns, 1_000_000_000)
    when = dt.datetime.fromtimestamp(secs, dt.UTC)
    return f"{when:%Y-%m-%dT%H:%M:%S}.{frac:09d}Z"


def check(journal: DatasetJournal, subs: Sequence[ReplayRequest], now_ns: int) -> Refusal | None:
    """Whether the journal can serve these subscriptions' replays (None: it can)."""
    named = sum(len(sub.symbols) - (1 if sub.all_symbols else 0) for sub in subs)
    if named > MAX_REPLAY_NAMED:
        return Refusal(
            "too_many_symbols",
            ErrorCode.INVALID_SUBSCRIPTION,
            f"Replay with more than {MAX_REPLAY_NAMED} named symbols in one session is not "
            "supported yet: use ALL_SYMBOLS, or split the symbols across sessions",
        )
    for sub in subs:
        start = sub.start_ns
        if start is not None:
            if start > now_ns + FUTURE_SLACK_NS:
                return Refusal(
                    "future",
                    ErrorCode.INVALID_SUBSCRIPTION,
                    f"Invalid start {iso_ns(start)} ({start}): it is in the future",
                )
            oldest = journal.oldest_ts()
            if start != 0 and oldest is not None and start < oldest:
                return Refusal(
                    "aged_out",
                    ErrorCode.REPLAY_DATA_AGED_OUT,
                    f"Replay data aged out: start {start} is older than the oldest data "
                    f"available, {iso_ns(oldest)} ({oldest})",
                )
        elif sub.resume_after is not None:
            after = sub.resume_after
            first = journal.first_seq()
            end = journal.end_seq()
            if sub.resume_epoch is not None and sub.resume_epoch != journal.epoch:
                return Refusal(
                    "bad_resume",
                    ErrorCode.INVALID_SUBSCRIPTION,
                    f"Invalid lsg_resume_after {after}: a position of another journal "
                    "(this one was replaced or started again empty)",
                )
            if after > end:
                return Refusal(
                    "bad_resume",
                    ErrorCode.INVALID_SUBSCRIPTION,
                    f"Invalid lsg_resume_after {after}: the journal ends at {end}",
                )
            if first and after < first - 1:
                oldest = journal.oldest_ts()
                when = f", {iso_ns(oldest)} ({oldest})" if oldest is not None else ""
                return Refusal(
                    "aged_out",
                    ErrorCode.REPLAY_DATA_AGED_OUT,
                    f"Replay data aged out: position {after} is older than the oldest data "
                    f"available (position {first}{when})",
                )
    return None
