"""The asyncio adapter of one subscriber socket: ``ClientConnection``.

It moves bytes between the socket and the sans-I/O ``Session``, which makes every protocol
decision: what to answer, when the Metadata header goes out, which subscriptions wait for
start_session, when a deadline or heartbeat is due, how the session ends. The adapter
asks the authenticator and the feed, arms one timer at ``Session.next_deadline()`` with
``loop.call_at``, and counts (``accounting.SessionAccount``). What it sends once streaming,
and at what pace, is its ``output.SessionOutput`` side; admission is ``admission.py``, the
lingering close ``linger.py``.

A session whose subscriptions before start_session ask for a replay (``start=``,
``lsg_resume_after=``) starts in replay mode (``replay.begin``): a ``replay.run.ReplayRun``
owns the socket until it hands the session over to live, and every write of the session
goes through its pump meanwhile; subscriptions made during it are held until then.
Sessions that asked for checkpoints (``lsg_checkpoints=1``) get one on the tick whenever
the feed's journal moved.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, cast

from gateway import dbn
from gateway.accounting import SessionAccount
from gateway.auth import KeyEntry, new_challenge
from gateway.checkpoint import encode_checkpoint
from gateway.control import AuthRequest
from gateway.dbn import ErrorCode
from gateway.errors import AuthError
from gateway.linger import LingeringClose, abort_if_undrained, reset
from gateway.output import SessionOutput
from gateway.replay.begin import begin_replay
from gateway.replay.plan import wants_replay
from gateway.session import (
    AuthRequested,
    Event,
    Failed,
    HeartbeatDue,
    Session,
    StartRequested,
    Subscription,
    SubscriptionReady,
)
from gateway.slowreader import Verdict, effective_behavior

if TYPE_CHECKING:
    from gateway.replay.run import ReplayRun
    from gateway.server import ServerState

__all__ = ["HANDOVER_TEXT", "SHUTDOWN_TEXT", "ClientConnection"]

log = logging.getLogger("gateway.session")

#: the final ErrorMsg of a gateway that stops, with and without a successor on its port
HANDOVER_TEXT = "Gateway restarting; reconnect"
SHUTDOWN_TEXT = "Gateway shutting down"


class ClientConnection(SessionOutput, asyncio.Protocol):
    """One subscriber socket. ``state.clock`` must share the loop's clock (monotonic)."""

    def __init__(self, state: ServerState) -> None:
        super().__init__(state)
        self.key: KeyEntry | None = None
        self.peer = "?"
        self.session_id = 0
        self.account = SessionAccount(state.metrics)
        #: ``lsg_checkpoints=1`` and a journal: checkpoint records (gateway/checkpoint.py)
        self.checkpoints = False
        self._checkpoint_seq = -1
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        #: book snapshots taken while this session's subscription records are being
        #: collected (written right after them; a str: the snapshot was refused, why);
        #: None: not collecting
        self._held_snapshots: list[tuple[bytes, int] | str] | None = None

    # --- asyncio callbacks -------------------------------------------------------------------

    def connection_made(self, base: asyncio.BaseTransport) -> None:
        transport = self.transport = cast(asyncio.Transport, base)
        state = self.state
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        now = state.clock()
        refused = state.admit(self, peer[0] if isinstance(peer, tuple) else "", now)
        if refused is not None:
            transport.write(refused)
            self.closing = True
            transport.close()
            return
        transport.set_write_buffer_limits(
            high=state.slow.write_high_water, low=state.slow.write_low_water
        )
        if state.tune_socket is not None:
            state.tune_socket(transport.get_extra_info("socket"))
        self.session = Session(
            challenge=new_challenge(),
            version=state.version,
            limits=state.limits,
            now=now,
            default_heartbeat_s=state.default_heartbeat_s,
        )
        self._handle([])

    def data_received(self, data: bytes) -> None:
        if self.session is not None and not self.closing:
            self._handle(self.session.receive_data(data, self.state.clock()))

    def eof_received(self) -> bool | None:
        self.account.ending("client_closed", "client closed")
        self._tell_skipped()
        return None  # close our side too (after what is buffered)

    def connection_lost(self, exc: Exception | None) -> None:
        state = self.state
        self._cancel_timer()
        if self not in state.connections:
            return
        state.connections.discard(self)
        state.admission.unauthenticated.discard(self)
        if exc is not None and not self.closing:
            self.account.ending("connection_error", f"connection error: {type(exc).__name__}")
        if self.replay is not None:
            self.replay.release()
        if self.feed is not None:
            self.feed.leave(self)
            self._set_paused(False)
            self.account.export_bytes(self)
        if self.key is not None:
            state.authenticator.release(self.key)
        self.account.ended(self)
        if self.session is not None:
            self.session.receive_eof()

    def pause_writing(self) -> None:
        self._set_paused(True)

    def resume_writing(self) -> None:
        self._set_paused(False)

    # --- session events ----------------------------------------------------------------------

    def _handle(self, events: list[Event]) -> None:
        session = self.session
        assert session is not None
        for event in events:
            if isinstance(event, SubscriptionReady):
                if event.queued:
                    pass
                elif self.replay is not None:
                    self.replay.hold(event.subscription)  # applied live at the hand-over
                else:
                    self._subscribe((event.subscription,))
            elif isinstance(event, StartRequested):
                self._start(event.subscriptions)
            elif isinstance(event, HeartbeatDue):
                self.state.metrics.heartbeats.inc()
                self.send_gateway_records([dbn.encode_heartbeat(time.time_ns())])
            elif isinstance(event, AuthRequested):  # the last event until answered
                self._authenticate(event.request)
                self._flush_text()  # success=1 before anything that follows it
                self._handle(session.resume(self.state.clock()))
            else:
                self._end(event)
        if not self.closing:
            self._flush_text()
            self._arm_timer()

    def _authenticate(self, req: AuthRequest) -> None:
        session = self.session
        assert session is not None
        state = self.state
        key_id = ""
        try:
            key = state.authenticator.check(session.challenge, req.auth)
            key_id = key.key_id
            state.authenticator.acquire(key, req.dataset, set(state.feeds))
        except AuthError as exc:
            self.account.auth_refused(self, exc.reason, key_id, req.dataset)
            self._end(session.reject(str(exc), kind=exc.reason, limit=exc.limit))
            return
        self.key = key
        self.feed = state.feeds[req.dataset]
        self.ts_out = req.ts_out
        self.zstd = req.compression == "zstd"
        self.checkpoints = req.lsg_checkpoints and self.feed.journal is not None
        self.session_id = state.next_session_id()
        self.slow.lossless = self.feed.backpressure
        state.admission.unauthenticated.discard(self)
        session.accept(self.session_id, state.clock())
        self.account.started(self, req)

    def _start(self, queued: tuple[Subscription, ...]) -> None:
        assert self.feed is not None and self.session is not None
        if wants_replay(queued):
            if any(sub.snapshot for sub in queued):
                text = "snapshot=1 cannot be combined with a replay (start=) in one session"
                self._terminate(text, ErrorCode.INVALID_SUBSCRIPTION, "invalid_subscription", text)
                return
            begin_replay(self, queued)
            return
        head = self._metadata()
        self.feed.join(self)
        self.account.phase(self, "streaming")
        self._subscribe(queued, head)
        self.session.stream_started(self.state.clock())
        if self.checkpoints:
            # where this live stream starts: a resume from here replays exactly what it
            # will be sent (unless subscription work is still queued: then the tick's)
            self._checkpoint()

    def _subscribe(self, subs: tuple[Subscription, ...], head: bytes = b"") -> None:
        assert self.feed is not None and self.session is not None
        if any(sub.snapshot for sub in subs) and not self.feed.snapshots_available():
            why = self.feed.books_off_reason()
            text = f"snapshot=1 is not supported yet for dataset {self.feed.dataset}: {why}"
            if head:
                self._write_control(head, [])
            self._terminate(text, ErrorCode.INVALID_SUBSCRIPTION, "not_supported", text)
            return
        records: list[bytes] = []
        # A snapshot is taken when an instrument joins this session's MBO selection (in
        # feed.subscribe, between two chunks) and written after the records that answer
        # the subscription (ack, mappings), before the next chunk: no gap, no duplicate.
        self._held_snapshots = []
        try:
            for sub in subs:
                records += self.feed.subscribe(self, sub)
        finally:
            held, self._held_snapshots = self._held_snapshots, None
        self._update_behavior()
        if head:
            self._write_control(head, records)
        else:
            self.send_gateway_records(records)
        for item in held:
            if isinstance(item, str):
                self._refuse_snapshot(item)
                return
            self.write_snapshot(*item)

    @property
    def snapshot_wanted(self) -> bool:
        """A subscription of this session asked for ``snapshot=1``."""
        session = self.session
        return session is not None and any(sub.snapshot for sub in session.subscriptions)

    def snapshot_ready(self, data: bytes, count: int) -> None:
        """The feed took a snapshot of the books of instruments that just joined this
        session's MBO selection."""
        if self._held_snapshots is not None:
            self._held_snapshots.append((data, count))
        else:
            self.write_snapshot(data, count)

    def snapshot_refused(self, why: str) -> None:
        """No snapshot can be sent (too large, books dropped): the session ends, told why,
        rather than carry on with a book it cannot build."""
        if self._held_snapshots is not None:
            self._held_snapshots.append(why)
        else:
            self._refuse_snapshot(why)

    def _refuse_snapshot(self, why: str) -> None:
        text = f"snapshot=1 refused: {why}"
        self._terminate(text, ErrorCode.INVALID_SUBSCRIPTION, "snapshot_refused", text)

    def _update_behavior(self) -> None:
        assert self.session is not None
        auth = self.session.auth
        schemas = [s.schema for s in self.session.subscriptions]
        self.slow.behavior = effective_behavior(
            auth.slow_reader_behavior if auth else None, schemas
        )

    # --- replay (gateway/replay) ---------------------------------------------------------------

    def replay_joined(self, run: ReplayRun, records: list[bytes], last_seq: int) -> None:
        """The replay caught up at ``last_seq`` (its pump closed): its last records, then
        live from the next chunk on (the subscriptions held during it applied now)."""
        assert self.feed is not None
        self._checkpoint_seq = last_seq
        self._write_control(b"", records)
        extra = self.feed.subscriptions.handover(self, run.subs, run.plan.announced)
        self.send_gateway_records(extra)
        if self.paused:
            self.feed.member_blocked(self, True)
        if run.held:
            self._subscribe(tuple(run.held))

    def end_replay(self, text: str, label: str) -> None:
        """A replay that cannot go on: a fatal ErrorMsg, then the usual close."""
        self._terminate(text, ErrorCode.INTERNAL_ERROR, label, text, label)

    def _checkpoint(self) -> None:
        """A live session that asked for checkpoints gets one each tick the journal moved
        (every record of chunks up to it was delivered to it synchronously)."""
        feed = self.feed
        journal = feed.journal if feed is not None else None
        if journal is None or not journal.enabled or self.slow.skipped:
            return
        if feed is not None and self in feed.subscriptions.work:
            # Subscription work still queued (acks, mappings, an ALL_SYMBOLS catch-up): its
            # selection is not what a replay from here would select yet.
            return
        seq = journal.last_seq
        if seq != self._checkpoint_seq and seq:
            self._checkpoint_seq = seq
            self.send_gateway_records([encode_checkpoint(time.time_ns(), seq, journal.epoch)])

    def _metadata(self) -> bytes:
        assert self.feed is not None
        return dbn.encode_metadata(self.feed.dataset, time.time_ns(), self.ts_out)

    def _end(self, event: Failed, label: str = "", text: str = "") -> None:
        """Tell the client why its session ends, as the session decided, then close."""
        if event.limit is not None:
            self.state.metrics.limit_hits.labels(event.limit).inc()
        if event.after_auth:
            head = self._metadata() if event.metadata_first else b""
            err = dbn.encode_error(time.time_ns(), event.reason, event.code)
            self._write_control(head, [err])
        else:
            self._flush_text()
        self.account.ending(label or event.kind, text or f"{event.kind}: {event.reason}")
        if self.key is None and not label:
            self.account.refused(self, event.kind, event.reason)
        self._linger(event.fin_now)

    # --- ends the gateway decides --------------------------------------------------------------

    def cut(self, label: str, message: str) -> None:
        """Disconnect a session too far behind (or stalling a lossless feed): it leaves the
        feed at once, its final ErrorMsg is queued behind what it has not read, and it is
        reset if it has not drained ``cut_grace_s`` later."""
        if self.closing or self.session is None:
            return
        policy = "lossless" if self.slow.lossless else self.slow.behavior
        self.state.metrics.slow_reader_events.labels(policy, "disconnect").inc()
        if self.feed is not None:
            self.feed.leave(self)
        log.warning(
            "session cut session_id=%d peer=%s reason=%s", self.session_id, self.peer, label
        )
        self._terminate(message, ErrorCode.INTERNAL_ERROR, label, f"{label}: {message}", label)
        if self.transport is not None:
            grace = self.state.slow.cut_grace_s
            asyncio.get_running_loop().call_later(grace, self._reset_if_undrained, grace)

    def _reset_if_undrained(self, grace: float) -> None:
        run = self.replay
        if run is not None and run.holding and self.transport is not None:
            run.release()
            reset(self.transport)
            log.warning(
                "session reset session_id=%d peer=%s reason=cut_not_drained grace_s=%g",
                *(self.session_id, self.peer, grace),
            )
        elif self.transport is not None and abort_if_undrained(self.transport):
            log.warning(
                "session reset session_id=%d peer=%s reason=cut_not_drained grace_s=%g",
                *(self.session_id, self.peer, grace),
            )

    def shutdown(self, handover: bool = False) -> None:
        """Gateway stopping: ``Gateway restarting; reconnect`` if a successor listens on the
        port, else ``Gateway shutting down`` (ErrorMsg code 6; ``success=0`` before auth)."""
        text, why = (HANDOVER_TEXT, "restarting") if handover else (SHUTDOWN_TEXT, "shutting down")
        self._terminate(text, ErrorCode.INTERNAL_ERROR, "shutting_down", f"gateway {why}")

    def revoke(self, text: str, reason: str) -> None:
        """A reload took this session's key (or its dataset) away: an ErrorMsg (code 2,
        ``API_KEY_DEACTIVATED``); ``reason`` is for the log and the disconnect metric."""
        if self.key is not None and not self.closing:
            log.info(
                "session revoked session_id=%d peer=%s key_id=%s reason=%s",
                *(self.session_id, self.peer, self.key.key_id, reason),
            )
            self._terminate(text, ErrorCode.API_KEY_DEACTIVATED, "revoked", reason)

    def _terminate(self, text: str, code: int, kind: str, why: str, label: str = "") -> None:
        """End the session from the gateway's side, told as ``Session.end`` decides."""
        if self.closing or self.session is None:
            return
        self._tell_skipped()
        event = self.session.end(text, kind=kind, code=code)
        if event is not None:
            self._end(event, label or why.replace(" ", "_"), why)

    def close(self) -> None:
        """A lingering close (``linger.py``) without a word to the client."""
        self._linger(fin_now=False)

    def _linger(self, fin_now: bool) -> None:
        if self.closing:
            return
        self.closing = True
        self._cancel_timer()
        if self.feed is not None:
            self.feed.leave(self)  # nothing more is delivered; a lossless feed is not held
        if self.replay is not None:
            # after what the replay has queued (one step at most) and the final ErrorMsg
            self.replay.then_close(lambda: self._close_lingering(fin_now))
            return
        self._close_lingering(fin_now)

    def _close_lingering(self, fin_now: bool) -> None:
        transport = self.transport
        if transport is None:
            return
        if transport.is_closing() or not transport.can_write_eof():
            transport.close()
            return
        transport.set_protocol(LingeringClose(self, transport, fin_now))

    # --- writing ------------------------------------------------------------------------------

    def _flush_text(self) -> None:
        if self.session is None or self.transport is None:
            return
        out = self.session.data_to_send()
        if out:
            self.transport.write(out)

    # --- timers -------------------------------------------------------------------------------

    def _arm_timer(self) -> None:
        """One timer, at the session's next deadline (re-armed only when it moves)."""
        due = self.session.next_deadline() if self.session is not None else None
        if due == self._timer_at:
            return
        self._cancel_timer()
        if due is not None:
            self._timer_at = due
            self._timer = asyncio.get_running_loop().call_at(due, self._on_timer)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._timer_at = None

    def _on_timer(self) -> None:
        due = self._timer_at or 0.0
        self._timer = self._timer_at = None
        if self.session is not None and not self.closing:
            # The loop's clock said the deadline passed; ours may lag it by a tick.
            now = max(self.state.clock(), due)
            self._handle(self.session.handle_timer(now, self.last_write))

    def tick(self, now: float) -> None:
        """Called by the gateway every ``app.TICK_S`` (0.5 s): exports the byte count, and
        the slow-reader checks that fall between chunks (a skip that ended, a stall)."""
        self.account.export_bytes(self)
        transport = self.transport
        if self.closing or transport is None or not self.metadata_sent:
            return
        run = self.replay
        if run is not None:
            stall = self.state.slow.stall_timeout_s
            if run.stalled(now, stall):
                self.cut("replay_stall", f"replay stalled for more than {stall:g} s; disconnecting")
            return
        if self.checkpoints:
            self._checkpoint()
        buffered = transport.get_write_buffer_size()
        self.account.observe_buffer(self, buffered)
        if self.slow.on_tick(buffered, self.paused, now) is Verdict.CUT:
            stall = self.state.slow.stall_timeout_s
            self.cut(
                "lossless_stall",
                f"stalled a lossless feed for more than {stall:g} s; disconnecting",
            )
        elif self.slow.notices:
            self._send_notices()
