"""The asyncio adapter of one subscriber socket: ``ClientConnection``.

It moves bytes between the socket and the sans-I/O ``Session`` (which makes every protocol
decision: what to answer, when the Metadata header goes out, which subscriptions wait for
start_session, when a deadline or heartbeat is due, how the session ends), arms one timer
at ``Session.next_deadline()``, keeps flow control (pause/resume, the slow-reader verdicts
of ``slowreader.SlowReader``), frames per-session records (ts_out stamp, own zstd frame)
and counts (metrics, logs). Fan-out is ``fanout.py``; admission ``admission.py``; the
lingering close ``linger.py``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, cast

from gateway import dbn
from gateway.auth import KeyEntry, new_challenge
from gateway.control import AuthRequest
from gateway.dbn import ErrorCode, SystemCode
from gateway.errors import AuthError
from gateway.fanout import Payload
from gateway.linger import LingeringClose, abort_if_undrained
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
from gateway.slowreader import SlowReader, Verdict, effective_behavior

if TYPE_CHECKING:
    from gateway.feeds.base import Feed
    from gateway.server import ServerState

__all__ = ["HANDOVER_TEXT", "SHUTDOWN_TEXT", "ClientConnection"]

log = logging.getLogger("gateway.session")

#: the final ErrorMsg of a gateway that stops, with and without a successor on its port
HANDOVER_TEXT = "Gateway restarting; reconnect"
SHUTDOWN_TEXT = "Gateway shutting down"


class ClientConnection(asyncio.Protocol):
    """One subscriber socket. ``state.clock`` must share the loop's clock (monotonic)."""

    ts_out = False
    zstd = False

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.transport: asyncio.Transport | None = None
        self.session: Session | None = None
        self.feed: Feed | None = None
        self.key: KeyEntry | None = None
        self.peer = "?"
        self.session_id = 0
        self.started_at = 0.0
        #: the socket is being closed (lingering close, or refused): nothing more to do
        self.closing = False
        self.end_reason = "client closed"
        self.end_label = "client_closed"
        self.slow = SlowReader(state.slow)
        self.records_sent = 0
        self.bytes_sent = 0
        self._bytes_exported = 0
        self._bytes_at_last_tick = 0
        self.last_write = 0.0
        self.paused = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._gauge_labels: tuple[str, str, str, str] | None = None

    @property
    def metadata_sent(self) -> bool:
        return self.session is not None and self.session.stream_open

    # --- asyncio callbacks -------------------------------------------------------------------

    def connection_made(self, base: asyncio.BaseTransport) -> None:
        transport = self.transport = cast(asyncio.Transport, base)
        state = self.state
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        now = state.clock()
        refusal = state.admission.refusal(
            peer[0] if isinstance(peer, tuple) else "",
            now,
            accepting=state.accepting,
            open_connections=len(state.connections),
            limits=state.limits,
        )
        if refusal is not None:
            transport.write(state.admission.refuse(state.metrics, self.peer, refusal))
            self.closing = True
            transport.close()
            return
        state.connections.add(self)
        state.admission.unauthenticated.add(self)
        state.metrics.connections.labels("accepted", "none").inc()
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
        self._ending("client_closed", "client closed")
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        state = self.state
        self._cancel_timer()
        if self not in state.connections:
            return
        state.connections.discard(self)
        state.admission.unauthenticated.discard(self)
        if exc is not None and not self.closing:
            self._ending("connection_error", f"connection error: {type(exc).__name__}")
        if self.feed is not None:
            self.feed.leave(self)
            self._set_paused(False)
            self.export_bytes()
        if self.key is not None:
            state.authenticator.release(self.key)
            self._log_end()
            state.metrics.disconnects.labels(self.end_label).inc()
        self._set_gauge(None)
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
                if not event.queued:
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
            state.metrics.auth_failures.labels(exc.reason).inc()
            # The client gets a generic reason; the log names the key and the dataset.
            log.info(
                "auth refused peer=%s reason=%s key_id=%s dataset=%r",
                self.peer,
                exc.reason,
                key_id,
                req.dataset[:40],
            )
            self._end(session.reject(str(exc), kind=exc.reason, limit=exc.limit))
            return
        self.key = key
        self.feed = state.feeds[req.dataset]
        self.ts_out = req.ts_out
        self.zstd = req.compression == "zstd"
        self.session_id = state.next_session_id()
        self.started_at = time.time()
        self.slow.lossless = self.feed.backpressure
        state.admission.unauthenticated.discard(self)
        session.accept(self.session_id, state.clock())
        self._set_gauge("authenticated")
        log.info(
            "session start session_id=%d peer=%s dataset=%s key_id=%s compression=%s "
            "ts_out=%d client=%r",
            self.session_id,
            self.peer,
            req.dataset,
            key.key_id,
            req.compression,
            int(req.ts_out),
            req.client[:80],
        )

    def _start(self, queued: tuple[Subscription, ...]) -> None:
        assert self.feed is not None and self.session is not None
        head = self._metadata()
        self.feed.join(self)
        self._set_gauge("streaming")
        self._subscribe(queued, head)
        self.session.stream_started(self.state.clock())

    def _subscribe(self, subs: tuple[Subscription, ...], head: bytes = b"") -> None:
        assert self.feed is not None and self.session is not None
        records: list[bytes] = []
        for sub in subs:
            records += self.feed.subscribe(self, sub)
        auth = self.session.auth
        schemas = [s.schema for s in self.session.subscriptions]
        self.slow.behavior = effective_behavior(
            auth.slow_reader_behavior if auth else None, schemas
        )
        if head:
            self._write_control(head, records)
        else:
            self.send_gateway_records(records)

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
        self._ending(label or event.kind, text or f"{event.kind}: {event.reason}")
        if self.key is None and not label:
            log.info(
                "session refused peer=%s reason=%s detail=%r",
                self.peer,
                event.kind,
                event.reason[:120],
            )
        self._linger(event.fin_now)

    # --- ends the gateway decides --------------------------------------------------------------

    def cut(self, label: str, message: str) -> None:
        """Disconnect a session that is too far behind (or stalls a lossless feed).

        It leaves the feed at once (so it holds nothing up), gets a final ErrorMsg queued
        behind what it has not read yet, and is closed; if it still has not drained after
        ``cut_grace_s`` the connection is reset and its buffer freed.
        """
        if self.closing or self.session is None:
            return
        policy = "lossless" if self.slow.lossless else self.slow.behavior
        self.state.metrics.slow_reader_events.labels(policy, "disconnect").inc()
        if self.feed is not None:
            self.feed.leave(self)
        log.warning(
            "session cut session_id=%d peer=%s reason=%s", self.session_id, self.peer, label
        )
        event = self.session.end(message, kind=label, code=ErrorCode.INTERNAL_ERROR)
        if event is not None:
            self._end(event, label, f"{label}: {message}")
        transport = self.transport
        if transport is not None:
            asyncio.get_running_loop().call_later(
                self.state.slow.cut_grace_s, abort_if_undrained, transport
            )

    def shutdown(self, handover: bool = False) -> None:
        """Gateway stopping: end the session so that a client's reconnect policy fires.

        ``Gateway restarting; reconnect`` when a successor listens on the same port
        (``handover``), ``Gateway shutting down`` otherwise: an ErrorMsg (code 6,
        ``INTERNAL_ERROR``) after what is queued, or ``success=0|error=`` before
        authentication (``Session.end`` decides which, and the Metadata header first).
        """
        if self.closing or self.session is None:
            return
        text = HANDOVER_TEXT if handover else SHUTDOWN_TEXT
        event = self.session.end(text, kind="shutting_down", code=ErrorCode.INTERNAL_ERROR)
        if event is not None:
            why = "gateway restarting" if handover else "gateway shutting down"
            self._end(event, why.replace(" ", "_"), why)

    def revoke(self, text: str, reason: str) -> None:
        """A reload took this session's key (or its dataset) away: an ErrorMsg (code 2,
        ``API_KEY_DEACTIVATED``) after what is queued for it, then a lingering close.
        ``reason`` is for the log and the disconnect metric."""
        if self.closing or self.key is None or self.session is None:
            return
        log.info(
            "session revoked session_id=%d peer=%s key_id=%s reason=%s",
            self.session_id,
            self.peer,
            self.key.key_id,
            reason,
        )
        event = self.session.end(text, kind="revoked", code=ErrorCode.API_KEY_DEACTIVATED)
        if event is not None:
            self._end(event, reason.replace(" ", "_"), reason)

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

    def _write_control(self, head: bytes, records: list[bytes]) -> None:
        """Metadata (if any) plus gateway records, as one piece (one zstd frame)."""
        if self.transport is None or self.transport.is_closing():
            return
        body = dbn.stamp_records(records, time.time_ns()) if self.ts_out else b"".join(records)
        data = head + body
        if not data:
            return
        if self.zstd:
            data = self._compress(data)
        self.transport.write(data)
        self.bytes_sent += len(data)
        self.last_write = self.state.clock()

    def _compress(self, data: bytes) -> bytes:
        """This session's own bytes as one independent zstd frame."""
        assert self.feed is not None
        return self.feed.fanout.compress(data)

    def send_gateway_records(self, records: list[bytes]) -> None:
        if not records or self.closing or not self.metadata_sent:
            return
        transport = self.transport
        if transport is not None:
            # The session's own records count against its cap like market data does.
            size = sum(map(len, records))
            if transport.get_write_buffer_size() + size > self.state.slow.hard_cap_bytes:
                self._cut_over_cap()
                return
        self._write_control(b"", records)

    def deliver(self, data: Payload, records: int) -> None:
        transport = self.transport
        if self.closing or transport is None:
            return
        now = self.state.clock()
        slow = self.slow
        buffered = transport.get_write_buffer_size()
        if not buffered and not slow.skipped:
            # Fast path: nothing queued, so not behind under any policy.
            slow.mark_drained()
            transport.write(data)
            self.records_sent += records
            self.bytes_sent += len(data)
            self.last_write = now
            return
        self._deliver_behind(data, records, buffered, now)

    def _deliver_behind(self, data: Payload, records: int, buffered: int, now: float) -> None:
        slow = self.slow
        verdict = slow.on_chunk(buffered, len(data), records, now)
        if slow.notices:
            self._send_notices()
        if verdict is Verdict.SEND:
            self._write_chunk(data, records, now)
        elif verdict is Verdict.SKIP:
            self.state.metrics.records_skipped.inc(records)
        else:
            self._cut_over_cap()

    def _write_chunk(self, data: Payload, records: int, now: float) -> None:
        assert self.transport is not None
        self.transport.write(data)
        self.records_sent += records
        self.bytes_sent += len(data)
        self.last_write = now

    def _cut_over_cap(self) -> None:
        cap = self.state.slow.hard_cap_bytes
        self.cut("slow_reader_cap", f"slow reader: more than {cap} bytes buffered; disconnecting")

    def _send_notices(self) -> None:
        now = time.time_ns()
        metrics = self.state.metrics
        records = []
        for kind, count in self.slow.notices:
            if kind == "warning":
                metrics.slow_reader_events.labels("warn", "warning").inc()
                text = "Warning: slow reading, falling behind real time"
                records.append(dbn.encode_system(now, text, SystemCode.SLOW_READER_WARNING))
            else:
                metrics.slow_reader_events.labels("skip", "skipped").inc()
                text = f"Skipped {count} records after slow reading"
                code = ErrorCode.SKIPPED_RECORDS_AFTER_SLOW_READING
                records.append(dbn.encode_error(now, text, code))
        self.slow.notices.clear()
        self.send_gateway_records(records)

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

    def export_bytes(self) -> None:
        """Add the bytes written since the last call to gateway_bytes_out_total."""
        if self.feed is None or self.bytes_sent == self._bytes_exported:
            return
        self.state.metrics.bytes_out.labels(self.feed.dataset, "zstd" if self.zstd else "none").inc(
            self.bytes_sent - self._bytes_exported
        )
        self._bytes_exported = self.bytes_sent

    def tick(self, now: float) -> None:
        """Called by the gateway every ``app.TICK_S`` (0.5 s): exports the byte count, and
        the slow-reader checks that fall between chunks (a skip that ended, a stall)."""
        self.export_bytes()
        transport = self.transport
        if self.closing or transport is None or not self.metadata_sent:
            return
        buffered = transport.get_write_buffer_size()
        if buffered or self.bytes_sent != self._bytes_at_last_tick:
            # Active sessions only: an idle session costs the tick almost nothing.
            self.state.metrics.session_buffered.observe(buffered)
            self._bytes_at_last_tick = self.bytes_sent
        if self.slow.on_tick(buffered, self.paused, now) is Verdict.CUT:
            stall = self.state.slow.stall_timeout_s
            self.cut(
                "lossless_stall",
                f"stalled a lossless feed for more than {stall:g} s; disconnecting",
            )
        elif self.slow.notices:
            self._send_notices()

    # --- bookkeeping --------------------------------------------------------------------------

    def _ending(self, label: str, text: str) -> None:
        """Why the connection ends: ``label`` for the disconnect metric, ``text`` for the log."""
        self.end_label, self.end_reason = label[:40], text

    def _set_paused(self, paused: bool) -> None:
        if paused == self.paused:
            return
        self.paused = paused
        if self.feed is not None:
            self.feed.member_blocked(self, paused)

    def _set_gauge(self, phase: str | None) -> None:
        gauge = self.state.metrics.sessions
        if self._gauge_labels is not None:
            gauge.labels(*self._gauge_labels).dec()
            self._gauge_labels = None
        if phase is not None and self.feed is not None:
            compression = "zstd" if self.zstd else "none"
            labels = (self.feed.dataset, compression, "1" if self.ts_out else "0", phase)
            gauge.labels(*labels).inc()
            self._gauge_labels = labels

    def _log_end(self) -> None:
        assert self.key is not None
        session = self.session
        log.info(
            "session end session_id=%d peer=%s dataset=%s key_id=%s compression=%s ts_out=%d "
            "subscriptions=%d records=%d bytes=%d skipped=%d duration_s=%.3f reason=%s",
            self.session_id,
            self.peer,
            self.feed.dataset if self.feed else "",
            self.key.key_id,
            "zstd" if self.zstd else "none",
            int(self.ts_out),
            len(session.subscriptions) if session else 0,
            self.records_sent,
            self.bytes_sent,
            self.slow.skipped_total,
            time.time() - self.started_at,
            self.end_reason,
        )
