"""start_session of a session that asked for a replay: refuse it, or start its ``ReplayRun``.

A session replays when a subscription it made before start_session has ``start=`` or
``lsg_resume_after=``. It gets its Metadata header as usual, then either a fatal ErrorMsg
(the usual lingering close follows) or, per subscription, the ack and the records that
answer it as of the replay's start, and the replay. Refusals, counted in
``gateway_replays_refused_total{reason}``:

* ``unavailable``: no journal for the dataset, or it stopped after a write error;
* ``limit``: ``max_replays`` replays already run (code 3, "retry later");
* ``future``: a start past the wall clock (INVALID_SUBSCRIPTION);
* ``aged_out``: a start (not 0) older than the oldest record kept, or a resume position
  before the oldest chunk kept (REPLAY_DATA_AGED_OUT, naming the oldest time available);
* ``bad_resume``: a resume position past the journal's end.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from gateway.dbn import ErrorCode
from gateway.replay.plan import Refusal, Replay, check
from gateway.replay.run import ReplayRun

if TYPE_CHECKING:
    from gateway.connection import ClientConnection
    from gateway.feeds.base import Feed
    from gateway.server import ServerState
    from gateway.session import Subscription

__all__ = ["begin_replay", "refusal_for"]

log = logging.getLogger("gateway.replay")


def refusal_for(state: ServerState, feed: Feed, subs: Sequence[Subscription]) -> Refusal | None:
    journal = feed.journal
    if journal is None:
        return Refusal(
            "unavailable",
            ErrorCode.INVALID_SUBSCRIPTION,
            f"Replay (start) is not available: this gateway keeps no journal of {feed.dataset}",
        )
    if not journal.enabled:
        return Refusal(
            "unavailable",
            ErrorCode.INTERNAL_ERROR,
            f"Replay is not available: the journal of {feed.dataset} stopped after a write error",
        )
    if state.replays_active >= state.max_replays:
        return Refusal(
            "limit",
            ErrorCode.CONNECTION_LIMIT_EXCEEDED,
            f"replay limit reached ({state.max_replays}); retry later",
        )
    return check(journal, subs, time.time_ns())


def begin_replay(conn: ClientConnection, subs: tuple[Subscription, ...]) -> None:
    """Answer start_session of a replaying session (see the module docstring)."""
    feed = conn.feed
    session = conn.session
    assert feed is not None and session is not None
    state = conn.state
    head = conn._metadata()
    refusal = refusal_for(state, feed, subs)
    if refusal is not None:
        conn._write_control(head, [])
        session.stream_started(state.clock())
        state.metrics.replays_refused.labels(refusal.reason).inc()
        log.info(
            "replay refused session_id=%d peer=%s reason=%s detail=%r",
            *(conn.session_id, conn.peer, refusal.reason, refusal.text),
        )
        label = f"replay_{refusal.reason}"
        conn._terminate(refusal.text, refusal.code, label, refusal.text, label)
        return
    journal = feed.journal
    assert journal is not None
    plan = Replay(
        journal,
        subs,
        schema_rtype=feed.schema_rtype,
        ts_out=conn.ts_out,
        compress=conn._compress if conn.zstd else None,  # its own frames (or stream)
    )
    # A small first slice (acks first): the rest comes a slice per step, one per loop turn.
    records = plan.begin([feed.subscriptions.answer(sub) for sub in subs], slice_size=1024)
    conn._write_control(head, records)
    conn.account.phase(conn, "streaming")
    conn._update_behavior()
    session.stream_started(state.clock())
    run = conn.replay = ReplayRun(conn, plan, journal, subs, checkpoints=conn.checkpoints)
    log.info(
        "replay start session_id=%d peer=%s subscriptions=%d from_seq=%d to_seq=%d",
        *(conn.session_id, conn.peer, len(subs), plan.cursor, plan.target),
    )
    run.start()
