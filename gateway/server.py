"""asyncio adapters: one ``ClientConnection`` per subscriber socket.

The adapter feeds bytes to the sans-I/O ``Session``, writes what it returns, applies the
slow-reader verdicts, frames per-session records (ts_out stamp, own zstd frame) and
reports to metrics. Protocol decisions live in ``session.py``; fan-out in ``fanout.py``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import logging
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import zstandard

from gateway import dbn
from gateway.auth import Authenticator, KeyEntry, new_challenge
from gateway.dbn import ErrorCode, SystemCode
from gateway.errors import AuthError
from gateway.fanout import Payload
from gateway.metrics import Metrics
from gateway.session import (
    AuthRequested,
    Event,
    Failed,
    Limits,
    Session,
    SlowReader,
    SlowReaderLimits,
    StartRequested,
    State,
    Subscription,
    SubscriptionReady,
    Verdict,
    effective_behavior,
)

if TYPE_CHECKING:
    from gateway.feeds.base import Feed

__all__ = ["ClientConnection", "ConnectionLimits", "ServerState"]

log = logging.getLogger("gateway.session")


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int = 20_000
    max_unauthenticated: int = 2_000
    #: new connections per second per source IP (0: no limit); Databento documents 5/s
    per_ip_rate: float = 20.0
    per_ip_burst: int = 200
    exempt_loopback: bool = True
    default_heartbeat_s: int = 30
    write_high_water: int = 1024 * 1024
    write_low_water: int = 256 * 1024
    #: a lossless feed's session over the hard cap for this long is cut
    stall_timeout_s: float = 10.0
    #: a cut session has this long to read what it was sent before it is reset
    cut_grace_s: float = 5.0


@dataclass
class ServerState:
    version: str
    authenticator: Authenticator
    feeds: dict[str, Feed]
    metrics: Metrics
    limits: Limits = field(default_factory=Limits)
    slow: SlowReaderLimits = field(default_factory=SlowReaderLimits)
    conn_limits: ConnectionLimits = field(default_factory=ConnectionLimits)
    clock: Callable[[], float] = time.monotonic
    #: applied to every accepted socket (transport options: buffers, busy-poll, ...)
    tune_socket: Callable[[Any], object] | None = None
    #: benchmark baseline: one streaming zstd compressor per session instead of shared frames
    zstd_per_session: bool = False
    zstd_level: int = 1
    connections: set[ClientConnection] = field(default_factory=set)
    unauthenticated: int = 0
    accepting: bool = True
    _ids: itertools.count[int] = field(
        default_factory=lambda: itertools.count(int(time.time()) * 1000)
    )
    _ip_tokens: dict[str, tuple[float, float]] = field(default_factory=dict)
    _rejections_logged: dict[str, tuple[float, int]] = field(default_factory=dict)

    def log_rejection(self, peer: str, reason: str) -> None:
        """A refused connection, logged at most once a second per reason (with a count)."""
        now = time.monotonic()
        last, suppressed = self._rejections_logged.get(reason, (0.0, 0))
        if now - last < 1.0:
            self._rejections_logged[reason] = (last, suppressed + 1)
            return
        self._rejections_logged[reason] = (now, 0)
        log.warning("connection refused peer=%s reason=%s suppressed=%d", peer, reason, suppressed)

    def next_session_id(self) -> int:
        return next(self._ids)

    def admit_ip(self, ip: str, now: float) -> bool:
        lim = self.conn_limits
        if lim.per_ip_rate <= 0:
            return True
        if lim.exempt_loopback:
            try:
                if ipaddress.ip_address(ip).is_loopback:
                    return True
            except ValueError:
                pass
        tokens, at = self._ip_tokens.get(ip, (float(lim.per_ip_burst), now))
        tokens = min(float(lim.per_ip_burst), tokens + (now - at) * lim.per_ip_rate)
        if tokens < 1.0:
            self._ip_tokens[ip] = (tokens, now)
            return False
        self._ip_tokens[ip] = (tokens - 1.0, now)
        if len(self._ip_tokens) > 100_000:
            self._ip_tokens.clear()
        return True


class ClientConnection(asyncio.Protocol):
    """One subscriber socket."""

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
        self.metadata_sent = False
        self.closing = False
        self.end_reason = "client closed"
        self.slow = SlowReader(state.slow)
        self.records_sent = 0
        self.bytes_sent = 0
        self._bytes_exported = 0
        self._bytes_at_last_tick = 0
        self.last_write = 0.0
        self.heartbeat_s = float(state.conn_limits.default_heartbeat_s)
        self.over_cap_since: float | None = None
        self.paused = False
        self._queued: list[Subscription] = []
        self._counted_unauth = False
        self._stream: Any = None  # per-session zstd stream (zstd_mode=per_session only)
        self._gauge_labels: tuple[str, str, str, str] | None = None

    # --- asyncio callbacks -------------------------------------------------------------------

    def connection_made(self, base: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, base)
        self.transport = transport
        state = self.state
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        ip = peer[0] if isinstance(peer, tuple) else ""
        now = state.clock()
        reason = None
        if not state.accepting:
            reason = ("shutting_down", "gateway is shutting down")
        elif len(state.connections) >= state.conn_limits.max_connections:
            reason = ("max_connections", "too many connections to this gateway")
        elif state.unauthenticated >= state.conn_limits.max_unauthenticated:
            reason = ("max_unauthenticated", "too many unauthenticated connections")
        elif not state.admit_ip(ip, now):
            reason = ("ip_rate", f"too many new connections per second from {ip}; wait 1 s")
        if reason is not None:
            state.metrics.connections.labels("rejected", reason[0]).inc()
            state.log_rejection(self.peer, reason[0])
            if reason[0] != "shutting_down":
                state.metrics.limit_hits.labels(reason[0]).inc()
            transport.write(b"success=0|error=" + reason[1].encode() + b"\n")
            self.closing = True
            transport.close()
            return
        state.connections.add(self)
        state.unauthenticated += 1
        self._counted_unauth = True
        state.metrics.connections.labels("accepted", "none").inc()
        lim = state.conn_limits
        transport.set_write_buffer_limits(high=lim.write_high_water, low=lim.write_low_water)
        if state.tune_socket is not None:
            state.tune_socket(transport.get_extra_info("socket"))
        self.session = Session(
            challenge=new_challenge(), version=state.version, limits=state.limits, now=now
        )
        self._flush_text()

    def data_received(self, data: bytes) -> None:
        if self.session is None or self.closing:
            return
        events = self.session.receive_data(data, self.state.clock())
        self._handle(events)

    def eof_received(self) -> bool | None:
        self.end_reason = "client closed"
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        state = self.state
        if self not in state.connections:
            return
        state.connections.discard(self)
        if self._counted_unauth:
            state.unauthenticated -= 1
            self._counted_unauth = False
        if exc is not None and not self.closing:
            self.end_reason = f"connection error: {type(exc).__name__}"
        if self.feed is not None:
            self.feed.leave(self)
            self._set_paused(False)
            self.export_bytes()
        if self.key is not None:
            state.authenticator.release(self.key)
            self._log_end()
            state.metrics.disconnects.labels(self._reason_label()).inc()
        self._set_gauge(None)
        if self.session is not None:
            self.session.receive_eof()

    def pause_writing(self) -> None:
        self._set_paused(True)

    def resume_writing(self) -> None:
        self._set_paused(False)

    # --- events from the session ---------------------------------------------------------------

    def _handle(self, events: list[Event]) -> None:
        session = self.session
        assert session is not None
        for event in events:
            if isinstance(event, AuthRequested):
                self._authenticate(event)
                self._flush_text()
                if session.state is State.AUTHENTICATED:
                    self._handle(session.resume(self.state.clock()))
                return
            if isinstance(event, SubscriptionReady):
                if self.metadata_sent:
                    self._subscribe([event.subscription])
                else:
                    self._queued.append(event.subscription)
            elif isinstance(event, StartRequested):
                self._start()
            elif isinstance(event, Failed):
                self._fail(event)
                return
        self._flush_text()

    def _authenticate(self, event: AuthRequested) -> None:
        session = self.session
        assert session is not None
        state = self.state
        req = event.request
        key_id = ""
        try:
            key = state.authenticator.check(session.challenge, req.auth)
            key_id = key.key_id
            state.authenticator.acquire(key, req.dataset, set(state.feeds))
        except AuthError as exc:
            text = str(exc)
            reason = exc.reason
            state.metrics.auth_failures.labels(reason).inc()
            if reason == "session_limit":
                state.metrics.limit_hits.labels("sessions_per_key").inc()
            # The client gets a generic reason; the log names the key and the dataset.
            log.info(
                "auth refused peer=%s reason=%s key_id=%s dataset=%r",
                self.peer,
                reason,
                key_id,
                req.dataset[:40],
            )
            self._fail(session.reject(text, kind=reason))
            return
        self.key = key
        self.feed = state.feeds[req.dataset]
        self.ts_out = req.ts_out
        self.zstd = req.compression == "zstd"
        if self.zstd and state.zstd_per_session:
            self._stream = zstandard.ZstdCompressor(level=state.zstd_level).compressobj()
        self.heartbeat_s = float(req.heartbeat_interval_s or state.conn_limits.default_heartbeat_s)
        self.session_id = state.next_session_id()
        self.started_at = time.time()
        self.slow.lossless = self.feed.backpressure
        state.unauthenticated -= 1
        self._counted_unauth = False
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

    def _start(self) -> None:
        assert self.feed is not None and self.session is not None
        pieces = [self._metadata()]
        self.metadata_sent = True
        self.feed.join(self)
        self._set_gauge("streaming")
        records: list[bytes] = []
        for sub in self._queued:
            records += self.feed.subscribe(self, sub)
        self._queued.clear()
        self._update_behavior()
        self._write_control(pieces[0], records)

    def _subscribe(self, subs: list[Subscription]) -> None:
        assert self.feed is not None
        records: list[bytes] = []
        for sub in subs:
            records += self.feed.subscribe(self, sub)
        self._update_behavior()
        self.send_gateway_records(records)

    def _update_behavior(self) -> None:
        assert self.session is not None
        auth = self.session.auth
        schemas = [s.schema for s in self.session.subscriptions]
        self.slow.behavior = effective_behavior(
            auth.slow_reader_behavior if auth else None, schemas
        )

    def _metadata(self) -> bytes:
        assert self.feed is not None
        start_ns = time.time_ns()
        return dbn.encode_metadata(self.feed.dataset, start_ns, self.ts_out)

    def _fail(self, event: Failed) -> None:
        state = self.state
        if event.kind in (
            "line_too_long",
            "max_symbols",
            "max_subscriptions",
            "control_rate",
            "handshake_timeout",
            "start_timeout",
        ):
            state.metrics.limit_hits.labels(event.kind).inc()
        if event.after_auth:
            head = b"" if self.metadata_sent else self._metadata()
            self.metadata_sent = True
            err = dbn.encode_error(time.time_ns(), event.reason, event.code)
            self._write_control(head, [err])
        else:
            self._flush_text()
        self.end_reason = f"{event.kind}: {event.reason}"
        if self.key is None:
            log.info(
                "session refused peer=%s reason=%s detail=%r",
                self.peer,
                event.kind,
                event.reason[:120],
            )
        self.close()

    # --- writing ----------------------------------------------------------------------

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
        if self._stream is not None:
            data = self._compress_stream(data)
        elif self.zstd:
            assert self.feed is not None
            data = self.feed.fanout.compress(data)
        self.transport.write(data)
        self.bytes_sent += len(data)
        self.last_write = self.state.clock()

    def send_gateway_records(self, records: list[bytes]) -> None:
        if not records or not self.metadata_sent or self.closing:
            return
        transport = self.transport
        if transport is not None:
            # The session's own records count against its cap like market data does.
            size = sum(map(len, records))
            if transport.get_write_buffer_size() + size > self.state.slow.hard_cap_bytes:
                self.cut(
                    "slow_reader_cap",
                    f"slow reader: more than {self.state.slow.hard_cap_bytes}"
                    " bytes buffered; disconnecting",
                )
                return
        self._write_control(b"", records)

    def deliver(self, data: Payload, records: int) -> None:
        transport = self.transport
        if self.closing or transport is None:
            return
        now = self.state.clock()
        slow = self.slow
        buffered = transport.get_write_buffer_size()
        if not buffered and not slow.skipped and self._stream is None:
            # Fast path: nothing queued, so not behind under any policy.
            slow.mark_drained()
            transport.write(data)
            self.records_sent += records
            self.bytes_sent += len(data)
            self.last_write = now
            return
        verdict = slow.on_chunk(buffered, len(data), records, now)
        if slow.notices:
            self._send_notices()
        if verdict is Verdict.SEND:
            if self._stream is not None:
                data = self._compress_stream(data)
            transport.write(data)
            self.records_sent += records
            self.bytes_sent += len(data)
            self.last_write = now
        elif verdict is Verdict.SKIP:
            self.state.metrics.records_skipped.inc(records)
        else:
            self.cut(
                "slow_reader_cap",
                f"slow reader: more than {self.state.slow.hard_cap_bytes}"
                " bytes buffered; disconnecting",
            )

    def _compress_stream(self, data: Payload) -> bytes:
        """The naive baseline: this session's own stream, one flushed block per write."""
        assert self.feed is not None
        fanout = self.feed.fanout
        started = time.perf_counter()
        out: bytes = self._stream.compress(data) + self._stream.flush(
            zstandard.COMPRESSOBJ_FLUSH_BLOCK
        )
        fanout.compress_seconds += time.perf_counter() - started
        fanout.bytes_compressed_in += len(data)
        fanout.bytes_compressed_out += len(out)
        return out

    def _send_notices(self) -> None:
        now = time.time_ns()
        metrics = self.state.metrics
        records = []
        for kind, count in self.slow.notices:
            if kind == "warning":
                metrics.slow_reader_events.labels("warn", "warning").inc()
                records.append(
                    dbn.encode_system(
                        now,
                        "Warning: slow reading, falling behind real time",
                        SystemCode.SLOW_READER_WARNING,
                    )
                )
            else:
                metrics.slow_reader_events.labels("skip", "skipped").inc()
                records.append(
                    dbn.encode_error(
                        now,
                        f"Skipped {count} records after slow reading",
                        ErrorCode.SKIPPED_RECORDS_AFTER_SLOW_READING,
                    )
                )
        self.slow.notices.clear()
        self.send_gateway_records(records)

    def cut(self, label: str, message: str) -> None:
        """Disconnect a session that is too far behind (or stalls a lossless feed).

        It leaves the feed at once (so it holds nothing up), gets a final ErrorMsg queued
        behind what it has not read yet, and is closed; if it still has not drained after
        ``cut_grace_s`` the connection is reset and its buffer freed.
        """
        if self.closing:
            return
        policy = "lossless" if self.slow.lossless else self.slow.behavior
        self.state.metrics.slow_reader_events.labels(policy, "disconnect").inc()
        if self.feed is not None:
            self.feed.leave(self)
        if self.metadata_sent:
            self._write_control(
                b"", [dbn.encode_error(time.time_ns(), message, ErrorCode.INTERNAL_ERROR)]
            )
        self.end_reason = f"{label}: {message}"
        log.warning(
            "session cut session_id=%d peer=%s reason=%s", self.session_id, self.peer, label
        )
        self._linger(fin_now=True)
        transport = self.transport
        if transport is not None:
            asyncio.get_running_loop().call_later(
                self.state.conn_limits.cut_grace_s, _abort_if_undrained, transport
            )

    def shutdown(self, handover: bool = False) -> None:
        """Gateway stopping: end the session so that a client's reconnect policy fires.

        A session that has its Metadata header gets an ErrorMsg (code 6, ``INTERNAL_ERROR``)
        -- ``Gateway restarting; reconnect`` when a successor listens on the same port
        (``handover``), ``Gateway shutting down`` otherwise -- after what is queued for it; a
        session still subscribing gets the Metadata header first; a client that has not
        authenticated gets the same text as ``success=0|error=``. Then a lingering close.
        """
        if self.closing:
            return
        text = HANDOVER_TEXT if handover else SHUTDOWN_TEXT
        self.end_reason = "gateway restarting" if handover else "gateway shutting down"
        streaming = self.metadata_sent
        if self.key is None:
            if self.session is not None:
                self.session.reject(text, kind="shutting_down")
                self._flush_text()
        else:
            head = b"" if self.metadata_sent else self._metadata()
            self.metadata_sent = True
            self._write_control(
                head, [dbn.encode_error(time.time_ns(), text, ErrorCode.INTERNAL_ERROR)]
            )
        # A session still subscribing keeps its write side open until it has sent
        # start_session (the official clients raise the reason only once started).
        self._linger(fin_now=streaming or self.key is None)

    def revoke(self, text: str, reason: str) -> None:
        """A reload took this session's key (or its dataset) away: an ErrorMsg (code 2,
        ``API_KEY_DEACTIVATED``) after what is queued for it -- a session still subscribing
        gets the Metadata header first -- then a lingering close. ``reason`` is for the
        log and the disconnect metric."""
        if self.closing or self.key is None:
            return
        self.end_reason = reason
        streaming = self.metadata_sent
        head = b"" if self.metadata_sent else self._metadata()
        self.metadata_sent = True
        self._write_control(
            head, [dbn.encode_error(time.time_ns(), text, ErrorCode.API_KEY_DEACTIVATED)]
        )
        log.info(
            "session revoked session_id=%d peer=%s key_id=%s reason=%s",
            self.session_id,
            self.peer,
            self.key.key_id,
            reason,
        )
        self._linger(fin_now=streaming)

    def close(self) -> None:
        """A lingering close, after a fatal error (ErrorMsg or ``success=0|error=``).

        The client may still be writing (subscriptions sent before it read the error): the
        connection keeps reading and discarding, so that the kernel never answers those bytes
        with a reset, which would destroy the error the client has not read yet. The write
        side is shut down once what is queued is sent and the client has sent start_session,
        its own EOF, or nothing for ``LINGER_QUIET_S`` (at the latest after
        ``LINGER_FIN_MAX_S``); the connection is closed at the client's EOF, after
        ``LINGER_DRAIN_S`` more or after ``LINGER_MAX_BYTES`` discarded. It keeps counting
        against ``max_connections`` until it is gone; the session's slot and metrics are
        released once, in ``connection_lost``.
        """
        self._linger(fin_now=False)

    def _linger(self, fin_now: bool) -> None:
        if self.closing:
            return
        self.closing = True
        if self.feed is not None:
            self.feed.leave(self)  # nothing more is delivered; a lossless feed is not held
        transport = self.transport
        if transport is None:
            return
        if transport.is_closing() or not transport.can_write_eof():
            transport.close()
            return
        transport.set_protocol(_Linger(self, transport, fin_now))

    # --- timers ------------------------------------------------------------------------

    def export_bytes(self) -> None:
        """Add the bytes written since the last call to gateway_bytes_out_total."""
        if self.feed is None or self.bytes_sent == self._bytes_exported:
            return
        self.state.metrics.bytes_out.labels(self.feed.dataset, "zstd" if self.zstd else "none").inc(
            self.bytes_sent - self._bytes_exported
        )
        self._bytes_exported = self.bytes_sent

    def tick(self, now: float) -> None:
        """Called about once a second: handshake deadline, heartbeat, lossless stalls."""
        self.export_bytes()
        session = self.session
        if session is None or self.closing:
            return
        if session.state in (State.AWAIT_AUTH, State.AUTHENTICATED):
            events = session.handle_timer(now)
            if events:
                self._handle(events)
            return
        transport = self.transport
        if transport is None or not self.metadata_sent:
            return
        buffered = transport.get_write_buffer_size()
        if buffered or self.bytes_sent != self._bytes_at_last_tick:
            # Active sessions only: an idle session costs the tick almost nothing.
            self.state.metrics.session_buffered.observe(buffered)
            self._bytes_at_last_tick = self.bytes_sent
        if self.slow.lossless:
            # A lossless feed waits while this session is over its high-water mark; one
            # that stays there past the stall timeout is cut so it cannot stall the feed.
            if self.paused:
                if self.over_cap_since is None:
                    self.over_cap_since = now
                elif now - self.over_cap_since > self.state.conn_limits.stall_timeout_s:
                    self.cut(
                        "lossless_stall",
                        "stalled a lossless feed for more than "
                        f"{self.state.conn_limits.stall_timeout_s:g} s; disconnecting",
                    )
                    return
            else:
                self.over_cap_since = None
        elif self.slow.skipped and buffered <= self.state.slow.resume_bytes:
            self.slow.resume(now)
            self._send_notices()
        if now - self.last_write >= self.heartbeat_s:
            self.state.metrics.heartbeats.inc()
            self.send_gateway_records([dbn.encode_heartbeat(time.time_ns())])

    # --- bookkeeping ----------------------------------------------------------------------

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
            labels = (
                self.feed.dataset,
                "zstd" if self.zstd else "none",
                "1" if self.ts_out else "0",
                phase,
            )
            gauge.labels(*labels).inc()
            self._gauge_labels = labels

    def _reason_label(self) -> str:
        return self.end_reason.split(":", 1)[0].replace(" ", "_")[:40]

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


#: the final ErrorMsg of a gateway that stops, with and without a successor on its port
HANDOVER_TEXT = "Gateway restarting; reconnect"
SHUTDOWN_TEXT = "Gateway shutting down"
#: lingering close (ClientConnection.close): shut the write side down once the client has
#: been quiet this long (or has sent start_session, or its EOF) ...
LINGER_QUIET_S = 0.3
#: ... and at the latest this long after the close
LINGER_FIN_MAX_S = 1.0
#: after that, read and discard until the client's EOF for at most this long ...
LINGER_DRAIN_S = 2.0
#: ... and at most this many bytes (more: closed at once, the kernel may reset it)
LINGER_MAX_BYTES = 4 * 1024 * 1024
_START = b"start_session"


class _Linger(asyncio.Protocol):
    """The protocol of a connection in its lingering close (see ``ClientConnection.close``):
    discards what the client sends, shuts the write side down when due, closes at the
    client's EOF or a bound, and hands ``connection_lost`` back to the connection."""

    def __init__(self, conn: ClientConnection, transport: asyncio.Transport, fin_now: bool):
        self.conn = conn
        self.transport = transport
        self.discarded = 0
        self.fin_sent = False
        self._loop = asyncio.get_running_loop()
        self._since = self._last_rx = self._loop.time()
        self._tail = b""
        self._timer: asyncio.TimerHandle | None = None
        if fin_now:
            self._fin()
        else:
            self._timer = self._loop.call_later(LINGER_QUIET_S, self._quiet_check)

    def _quiet_check(self) -> None:
        now = self._loop.time()
        due = min(self._last_rx + LINGER_QUIET_S, self._since + LINGER_FIN_MAX_S)
        if now >= due - 0.001:
            self._fin()
        else:
            self._timer = self._loop.call_later(due - now, self._quiet_check)

    def _fin(self) -> None:
        if self.fin_sent:
            return
        self.fin_sent = True
        if self._timer is not None:
            self._timer.cancel()
        transport = self.transport
        if transport.is_closing():
            return
        transport.write_eof()  # after what is still buffered: both loops flush first
        self._timer = self._loop.call_later(LINGER_DRAIN_S, transport.close)

    def data_received(self, data: bytes) -> None:
        self.discarded += len(data)
        if self.discarded > LINGER_MAX_BYTES:
            self.transport.close()
            return
        if not self.fin_sent:
            self._last_rx = self._loop.time()
            seen = self._tail + data
            if _START in seen:
                self._fin()
            self._tail = seen[-(len(_START) - 1) :]

    def eof_received(self) -> bool | None:
        return None  # the client is done: close (after flushing what is left)

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.conn.connection_lost(exc)


def refuse_queued(state: ServerState, sock: socket.socket, text: str) -> None:
    """A connection taken from the accept queue as the listener closes: answered with
    ``success=0|error=<text>`` (counted and logged as a refusal), then closed."""
    peer = "?"
    try:
        peer = peer_of_socket(sock)
        sock.setblocking(False)
        sock.send(b"success=0|error=" + text.encode() + b"\n")
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    finally:
        sock.close()
    state.metrics.connections.labels("rejected", "shutting_down").inc()
    state.log_rejection(peer, "shutting_down")


def peer_of_socket(sock: socket.socket) -> str:
    peer = sock.getpeername()
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)


def _abort_if_undrained(transport: asyncio.Transport) -> None:
    """A cut session still holding unsent bytes after its grace is reset; one that has
    drained is left to its lingering close (it may still be reading its last bytes)."""
    if transport.get_write_buffer_size():
        reset(transport)


def reset(transport: asyncio.Transport) -> None:
    """Abort with a TCP reset (SO_LINGER 0): a client that did not get everything must
    not see a clean end of stream."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    transport.abort()


def peer_of(transport: Any) -> str:
    peer = transport.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
