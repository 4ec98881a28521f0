"""One session's replay in progress: ``ReplayRun``, the adapter's replay mode.

From start_session until the hand-over a ``ReplayPump`` owns the session's socket: the
planner's items (``plan.Replay``) go into it step by step (``refill``), and so does every
other write of the session (heartbeats, notices, the final ErrorMsg: the connection's
``_write_control`` routes them here while the run is active), all in order. The pump's
``on_written`` keeps the connection's counters (``bytes_sent``, ``last_write``) and the
server's ``replay_bytes`` by path up to date.

Hand-over: when the planner has emitted every part up to the journal's ``last_seq``, a
pump call is queued; it runs once everything before it is written and checks, in the same
synchronous step, that ``last_seq`` has not moved (else the replay goes on). Then the
mappings recorded after the last chunk, a REPLAY_COMPLETED SystemMsg per replayed schema
(and a checkpoint for sessions that want them) are written, the pump is closed, and the
connection joins the feed live (``SubscriptionIndex.handover``: placed in the fan-out at
once, with its full selection) — the next chunk the feed publishes has seq ``last_seq + 1``
and reaches the session live: no gap, no duplicate.

Ending: ``then_close`` stops the planner and runs the connection's close once what is
queued (bounded by a step) and the final ErrorMsg are written; ``release`` (idempotent)
closes the pump and the journal descriptors and gives the replay slot back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from gateway import dbn
from gateway.checkpoint import encode_checkpoint
from gateway.dbn import SystemCode
from gateway.replay.plan import Chunk, FileRange, Replay, ReplayError, Retire
from gateway.replay.pump import ReplayPump

if TYPE_CHECKING:
    from gateway.connection import ClientConnection
    from gateway.journal import DatasetJournal
    from gateway.session import Subscription

__all__ = ["CHECKPOINT_EVERY_S", "ReplayRun"]

log = logging.getLogger("gateway.replay")

#: a replaying session that asked for checkpoints gets one at most this often
CHECKPOINT_EVERY_S = 0.5
#: how often a replay ahead of its feed (a resume in a worker behind) looks again
BEHIND_WAIT_S = 0.001


class ReplayRun:
    def __init__(
        self,
        conn: ClientConnection,
        plan: Replay,
        journal: DatasetJournal,
        subs: Sequence[Subscription],
        *,
        checkpoints: bool,
    ) -> None:
        assert conn.transport is not None
        self.conn = conn
        self.plan = plan
        self.journal = journal
        self.subs = tuple(subs)
        #: the schemas told REPLAY_COMPLETED at the hand-over (those that asked for a replay)
        self.schemas = list(
            dict.fromkeys(
                s.schema for s in subs if s.start_ns is not None or s.resume_after is not None
            )
        )
        #: subscriptions received during the replay: applied live at the hand-over
        self.held: list[Subscription] = []
        self.checkpoints = checkpoints
        self.started = time.monotonic()
        state = conn.state
        self.state = state
        self.pump = ReplayPump(
            conn.transport,
            step_bytes=state.replay_step_bytes,
            on_written=self._written,
            on_error=self._error,
            refill=self._refill,
        )
        state.replays_active += 1
        #: the run holds its slot and the socket (until ``release``)
        self.active = True
        self._stopping = False
        self._handover_queued = False
        #: the timer that resumes a replay held back by the replay bandwidth
        self._wake: asyncio.TimerHandle | None = None
        #: the pump turn that wrote the last slice of the opening
        self._opening_turn = -1
        self._checkpoint_at = float("-inf")
        self._checkpoint_seq = -1
        self._progress: tuple[int, int] = (-1, -1)
        self._progress_at = state.clock()

    def start(self) -> None:
        self.pump.kick()

    # --- the pump's callbacks -------------------------------------------------------------

    def _written(self, n: int, path: str) -> None:
        conn = self.conn
        conn.bytes_sent += n
        conn.last_write = self.state.clock()
        replayed = self.state.replay_bytes
        replayed[path] = replayed.get(path, 0) + n

    def _refill(self) -> bool:
        if self._stopping or not self.active:
            return False
        if self.conn.paused:
            # The transport is over its high-water mark (copies go through it): wait for
            # it to drain (``resume``), so that memory stays bounded for a slow reader.
            return False
        plan = self.plan
        if plan.opening_pending:
            # Encoding mappings costs far more per byte than sending records: one slice
            # of the opening per loop turn, not a step's worth of bytes.
            if self._opening_turn == self.pump.turns:
                return True  # nothing now: the pump comes back on the next turn
            self._opening_turn = self.pump.turns
        budget = self.state.replay_budget
        if budget is not None:
            wait = budget.wait_s()
            if wait > 0:
                self._defer(wait)
                return False
        plan.extend(self.journal.last_seq)
        try:
            items = plan.step(self.state.replay_step_bytes)
        except (OSError, ReplayError) as exc:
            self._fail(exc)
            return False
        if budget is not None:
            budget.spend(
                sum(
                    i.length if isinstance(i, FileRange) else len(i.data)
                    for i in items
                    if not isinstance(i, Retire)
                )
            )
        pump = self.pump
        conn = self.conn
        for item in items:
            if isinstance(item, Chunk):
                pump.push_bytes(item.data)
                conn.records_sent += item.records
            elif isinstance(item, FileRange):
                pump.push_file(item.fd, item.offset, item.length)
                conn.records_sent += item.records
            else:
                pump.push_call(_releaser(plan, item.fds))
        self._maybe_checkpoint()
        if plan.caught_up:
            if not self._handover_queued:
                self._handover_queued = True
                pump.push_call(self._handover)
            return False
        return True

    def _maybe_checkpoint(self) -> None:
        """At a chunk boundary, at most every CHECKPOINT_EVERY_S, once every
        subscription has begun (a checkpoint must be exact for all of them)."""
        if not self.checkpoints:
            return
        seq = self.plan.cursor
        now = self.state.clock()
        if (
            seq >= self.plan.checkpoint_from
            and seq != self._checkpoint_seq
            and now - self._checkpoint_at >= CHECKPOINT_EVERY_S
        ):
            self._checkpoint_at = now
            self._checkpoint_seq = seq
            epoch = self.journal.epoch
            self.conn._write_control(b"", [encode_checkpoint(time.time_ns(), seq, epoch)])

    def _error(self, exc: BaseException) -> None:
        """The pump stopped on an error: a peer gone, or a journal file cut short."""
        if not self.active:
            return
        self.release()
        conn = self.conn
        if conn.closing:
            return
        if isinstance(exc, (ConnectionError, BrokenPipeError)):
            log.info("replay ended session_id=%d: %s", conn.session_id, exc)
            conn.close()
            return
        self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        conn = self.conn
        log.error("replay failed session_id=%d: %r", conn.session_id, exc)
        self.release()
        conn.end_replay("Replay failed: the journal could not be read", "replay_failed")

    # --- the hand-over --------------------------------------------------------------------

    def _handover(self) -> None:
        self._handover_queued = False
        conn = self.conn
        if not self.active or self._stopping or conn.closing:
            return
        journal = self.journal
        if not journal.enabled:
            # Chunks published from now on are not journaled: a hand-over would leave a gap.
            self.release()
            conn.end_replay(
                "Replay interrupted: the journal stopped after a write error; reconnect",
                "replay_unavailable",
            )
            return
        last = journal.last_seq
        plan = self.plan
        if plan.cursor > last:
            # A resume from past what this process's feed has published (``--workers``: a
            # worker behind the sibling that gave the client its checkpoint): hand over
            # once the feed is there, so that its next chunk is the one after the cursor.
            self._defer(BEHIND_WAIT_S)
            return
        if not plan.caught_up or plan.cursor < last:
            plan.extend(last)
            self.pump.kick()
            return
        now = time.time_ns()
        records = plan.finish(last)
        records += [
            dbn.encode_system(now, f"Finished {schema} replay", SystemCode.REPLAY_COMPLETED)
            for schema in self.schemas
        ]
        if self.checkpoints and self._checkpoint_seq != last:
            records.append(encode_checkpoint(now, last, self.journal.epoch))
        sent = self.pump.bytes_sendfile
        self.release()
        self.state.metrics.replay_catchup_seconds.observe(time.monotonic() - self.started)
        log.info(
            "replay handed over session_id=%d seq=%d records=%d ranged_bytes=%d "
            "sendfile_bytes=%d read_bytes=%d seconds=%.3f",
            *(conn.session_id, last, plan.records, plan.bytes_ranged, sent, plan.bytes_copied),
            time.monotonic() - self.started,
        )
        conn.replay_joined(self, records, last)

    # --- the connection's side ------------------------------------------------------------

    def hold(self, sub: Subscription) -> None:
        self.held.append(sub)

    def _defer(self, wait: float) -> None:
        """Over the gateway's replay bandwidth: produce again in ``wait`` seconds."""
        if self._wake is None:
            loop = asyncio.get_running_loop()
            self._wake = loop.call_later(wait, self._woken)

    def _woken(self) -> None:
        self._wake = None
        if self.active and not self._stopping:
            self.pump.kick()

    def resume(self) -> None:
        """The transport drained below its low-water mark: produce again."""
        if self.active and not self._stopping:
            self.pump.kick()

    def stalled(self, now: float, timeout: float) -> bool:
        """No byte written and no journal position passed for ``timeout``."""
        progress = (self.conn.bytes_sent, self.plan.cursor)
        if progress != self._progress:
            self._progress = progress
            self._progress_at = now
            return False
        return now - self._progress_at > timeout

    def then_close(self, close: Callable[[], None]) -> None:
        """Stop planning; run ``close`` once what is queued (the final ErrorMsg last) is
        written (at once if the pump already stopped)."""
        self._stopping = True
        if not self.active or self.pump.closed:
            self.release()
            close()
            return

        def done() -> None:
            self.release()
            close()

        self.pump.push_call(done)

    @property
    def holding(self) -> bool:
        """Bytes still queued in the pump (something not yet handed to the socket)."""
        return self.active and not self.pump.closed and self.pump.busy

    def release(self) -> None:
        """Close the pump and the journal descriptors; give the replay slot back."""
        if not self.active:
            return
        self.active = False
        if self._wake is not None:
            self._wake.cancel()
            self._wake = None
        self.pump.close()
        self.plan.close()
        self.state.replays_active -= 1
        if self.conn.replay is self:
            self.conn.replay = None


def _releaser(plan: Replay, fds: tuple[int, ...]) -> Callable[[], None]:
    return lambda: plan.release(fds)
