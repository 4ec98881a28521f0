"""One client connection's protocol state machine (sans-I/O).

Theory of operation
-------------------
The session takes bytes (``receive_data(data, now)``), timer expiries
(``handle_timer(now, last_write)``) and the adapter's answers (``accept``/``reject``,
``stream_started``, ``end``) and returns events; text to write comes out of
``data_to_send()`` and the one deadline to arm out of ``next_deadline()``. It never
touches a socket, a timer or a metric. Its adapter (``connection.ClientConnection``) only
moves bytes, keeps flow control and counts.

    AWAIT_AUTH ──AuthRequested→ adapter decides ──accept──▶ AUTHENTICATED ──start──▶ STREAMING
        │ bad line / timeout / reject / end                     │ bad line / end      │
        └────────────────────────────▶ CLOSED ◀─────────────────┴─────────────────────┘

Rule 1: before authentication succeeds the only way to report an error is a
``success=0|error=...`` line (clients parse nothing else yet). After it, errors must be
ErrorMsg records, which need a Metadata header first: ``Failed.after_auth`` tells the
adapter which form to use and ``Failed.metadata_first`` whether it must write the
Metadata header before the ErrorMsg. Every error is fatal and ends in a clean close;
``Failed.fin_now`` says whether the write side may be shut at once (a session still
subscribing keeps it open until start_session: the official clients raise the error only
once started). ``Failed.kind`` is the machine-readable reason, ``Failed.limit`` the limit
hit (if one was).

Rule 2: after ``success=1`` the session writes nothing itself: the binary stream starts
only when the adapter answers ``StartRequested`` with the Metadata header (the Python
client hands any byte that shares a read with the auth line to its text parser).

Rule 3: subscription chunks that share an ``id`` are buffered until ``is_last=1`` and
surface as one ``SubscriptionReady``; they may arrive before or after start_session.
Before it they are ``queued`` (the adapter does nothing with them yet) and come back in
``StartRequested.subscriptions``, to be acted on right after the Metadata header.

Rule 4: deadlines. Before start_session the deadline is the handshake timeout, then the
start timeout (armed by ``accept(session_id, now)``); once the adapter reports the
Metadata header written (``stream_started``) it is the next heartbeat: ``HeartbeatDue``
when nothing was written for the heartbeat interval (``last_write``, the adapter's clock
of its last write, is passed in at expiry so that writes cost the session nothing).

The limits are the ``[limits]`` section of the config (``LimitsConfig``) as it is.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from gateway import control
from gateway.config import LimitsConfig
from gateway.control import ALL_SYMBOLS, AuthRequest, SubscriptionRequest
from gateway.dbn import ErrorCode
from gateway.errors import LimitExceeded, NotSupportedError, ProtocolError

__all__ = [
    "DEFAULT_HEARTBEAT_S",
    "AuthRequested",
    "Event",
    "Failed",
    "HeartbeatDue",
    "Session",
    "StartRequested",
    "State",
    "Subscription",
    "SubscriptionReady",
]

#: heartbeat interval of a session whose auth line names none (``default_heartbeat_s``)
DEFAULT_HEARTBEAT_S = 30.0


class State(enum.IntEnum):
    AWAIT_AUTH = 0
    AUTHENTICATED = 1
    STREAMING = 2
    CLOSED = 3


@dataclass(frozen=True)
class Subscription:
    schema: str
    stype_in: str
    symbols: tuple[str, ...]
    sub_id: int | None
    #: ``start`` in UNIX ns (None: not sent; 0: everything retained), for a replay
    start_ns: int | None = None
    #: ``lsg_resume_after``: replay every journaled chunk after this position
    resume_after: int | None = None
    #: ``lsg_epoch``: the journal that position belongs to (None: not said)
    resume_epoch: str | None = None
    #: ``snapshot=1`` (mbo only, live only): the books of its instruments first
    snapshot: bool = False
    #: ALL_SYMBOLS is among ``symbols`` (computed once: feeds ask per symbol learnt)
    all_symbols: bool = field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "all_symbols", ALL_SYMBOLS in self.symbols)


@dataclass(frozen=True)
class AuthRequested:
    request: AuthRequest


@dataclass(frozen=True)
class SubscriptionReady:
    subscription: Subscription
    #: before start_session: held by the session, returned in ``StartRequested``
    queued: bool = False


@dataclass(frozen=True)
class StartRequested:
    """Write the Metadata header, then subscribe ``subscriptions`` (those made before)."""

    subscriptions: tuple[Subscription, ...] = ()


@dataclass(frozen=True)
class HeartbeatDue:
    """Nothing was written for the heartbeat interval: write a heartbeat record."""


@dataclass(frozen=True)
class Failed:
    """The session is over; ``reason`` is the text the client is told."""

    reason: str
    after_auth: bool
    code: int = ErrorCode.INVALID_SUBSCRIPTION
    #: machine-readable reason (a metrics label): protocol, not_supported, bad_key, ...
    kind: str = "protocol"
    #: write the Metadata header before the ErrorMsg (after_auth, not yet streaming)
    metadata_first: bool = False
    #: the limit that was hit (``gateway_limit_hits_total`` label), if one was
    limit: str | None = None
    #: shut the write side at once (else: a lingering close that waits for the client)
    fin_now: bool = False


Event = AuthRequested | SubscriptionReady | StartRequested | HeartbeatDue | Failed


@dataclass
class _Pending:
    schema: str
    stype_in: str
    symbols: list[str] = field(default_factory=list)
    start_ns: int | None = None
    resume_after: int | None = None
    resume_epoch: str | None = None
    snapshot: bool = False


class Session:
    def __init__(
        self,
        *,
        challenge: str,
        version: str,
        limits: LimitsConfig,
        now: float,
        default_heartbeat_s: float = DEFAULT_HEARTBEAT_S,
    ) -> None:
        self.state = State.AWAIT_AUTH
        self.challenge = challenge
        self.limits = limits
        self.auth: AuthRequest | None = None
        self.subscriptions: list[Subscription] = []
        #: the Metadata header is (being) written: set with StartRequested, or with a
        #: Failed that has ``metadata_first``
        self.stream_open = False
        self._default_heartbeat_s = default_heartbeat_s
        self._heartbeat_at: float | None = None
        self._queued: list[Subscription] = []
        self._pending: dict[int | None, _Pending] = {}
        self._symbol_count = 0
        self._buffer = bytearray()
        self._out = bytearray(control.greeting_line(version) + control.challenge_line(challenge))
        self._deadline: float | None = now + limits.handshake_timeout_s
        self._tokens = float(limits.control_burst)
        self._tokens_at = now
        self._waiting_auth = False

    # --- inputs -----------------------------------------------------------------

    def receive_data(self, data: bytes, now: float) -> list[Event]:
        if self.state is State.CLOSED:
            return []
        self._buffer += data
        events: list[Event] = []
        while self._parsing():
            nl = self._buffer.find(b"\n")
            if nl < 0:
                if len(self._buffer) > self.limits.max_line_bytes:
                    events.append(self._line_too_long())
                break
            if nl > self.limits.max_line_bytes:
                events.append(self._line_too_long())
                break
            line = bytes(self._buffer[:nl])
            del self._buffer[: nl + 1]
            events.extend(self._handle_line(line, now))
        return events

    def _parsing(self) -> bool:
        return self.state is not State.CLOSED and not self._waiting_auth

    def _line_too_long(self) -> Failed:
        limit = self.limits.max_line_bytes
        return self._fail(
            f"control line longer than {limit} bytes", kind="line_too_long", limit="line_too_long"
        )

    def receive_eof(self) -> None:
        self.state = State.CLOSED

    def handle_timer(self, now: float, last_write: float | None = None) -> list[Event]:
        """The deadline of ``next_deadline()`` may have passed; ``last_write``: the clock
        of the adapter's last write (heartbeats count from it)."""
        if self.state is State.STREAMING:
            due = self._heartbeat_at
            if due is None or now < due:
                return []
            interval = self.heartbeat_s
            if last_write is not None and now - last_write < interval:
                self._heartbeat_at = last_write + interval  # written since: not idle yet
                return []
            self._heartbeat_at = now + interval
            return [HeartbeatDue()]
        if self._deadline is None or now < self._deadline:
            return []
        if self.state is State.AWAIT_AUTH:
            return [
                self._fail(
                    "authentication timed out", kind="handshake_timeout", limit="handshake_timeout"
                )
            ]
        if self.state is State.AUTHENTICATED:
            return [
                self._fail(
                    f"start_session not received within {self.limits.start_timeout_s:g} s "
                    "of authentication",
                    kind="start_timeout",
                    limit="start_timeout",
                )
            ]
        return []

    def next_deadline(self) -> float | None:
        """When ``handle_timer`` is next due (None: no timer needed)."""
        if self.state in (State.AWAIT_AUTH, State.AUTHENTICATED):
            return self._deadline
        if self.state is State.STREAMING:
            return self._heartbeat_at
        return None

    # --- answers from the adapter ------------------------------------------------

    def accept(self, session_id: int, now: float | None = None) -> None:
        assert self.state is State.AWAIT_AUTH and self._waiting_auth
        self._waiting_auth = False
        self.state = State.AUTHENTICATED
        self._deadline = None if now is None else now + self.limits.start_timeout_s
        self._out += control.auth_success(session_id)

    def reject(self, reason: str, kind: str = "auth", limit: str | None = None) -> Failed:
        """The auth request is refused: a ``success=0|error=<reason>`` line, then closed."""
        self._waiting_auth = False
        return self._fail(reason, kind=kind, after_auth=False, limit=limit)

    def stream_started(self, now: float) -> None:
        """The adapter wrote the Metadata header at ``now``: heartbeats are due from it."""
        if self.state is State.STREAMING:
            self._heartbeat_at = now + self.heartbeat_s

    def end(self, reason: str, *, kind: str, code: int) -> Failed | None:
        """The gateway ends the session (shutdown, a revoked key, a slow reader): told as
        ``success=0|error=<reason>`` before authentication, else as an ErrorMsg with
        ``code``. None if it is already over."""
        if self.state is State.CLOSED:
            return None
        if self.state is State.AWAIT_AUTH:
            self._waiting_auth = False
            return self._fail(reason, kind=kind, after_auth=False, fin_now=True)
        return self._fail(reason, kind=kind, code=code, fin_now=self.stream_open)

    def resume(self, now: float) -> list[Event]:
        """Parse lines that arrived while the auth decision was pending."""
        if self._waiting_auth or not self._buffer:
            return []
        return self.receive_data(b"", now)

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    @property
    def heartbeat_interval_s(self) -> int | None:
        """The interval the auth line asked for, if any."""
        return self.auth.heartbeat_interval_s if self.auth else None

    @property
    def heartbeat_s(self) -> float:
        """The heartbeat interval in effect."""
        return float(self.heartbeat_interval_s or self._default_heartbeat_s)

    # --- internals ----------------------------------------------------------------

    def _fail(
        self,
        reason: str,
        *,
        kind: str = "protocol",
        after_auth: bool | None = None,
        code: int = ErrorCode.INVALID_SUBSCRIPTION,
        limit: str | None = None,
        fin_now: bool = False,
    ) -> Failed:
        if after_auth is None:
            after_auth = self.state in (State.AUTHENTICATED, State.STREAMING)
        metadata_first = False
        if not after_auth:
            self._out += control.auth_failure(reason)
        elif not self.stream_open:
            metadata_first = self.stream_open = True  # an ErrorMsg needs the header first
        self.state = State.CLOSED
        self._buffer.clear()
        self._queued.clear()
        self._heartbeat_at = None
        return Failed(
            reason=reason,
            after_auth=after_auth,
            code=code,
            kind=kind,
            metadata_first=metadata_first,
            limit=limit,
            fin_now=fin_now,
        )

    def _rate_ok(self, now: float) -> bool:
        lim = self.limits
        self._tokens = min(
            float(lim.control_burst),
            self._tokens + (now - self._tokens_at) * lim.control_rate_per_s,
        )
        self._tokens_at = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

    def _handle_line(self, line: bytes, now: float) -> list[Event]:
        if not self._rate_ok(now):
            return [
                self._fail(
                    f"more than {self.limits.control_rate_per_s:g} control messages per second",
                    kind="control_rate",
                    limit="control_rate",
                )
            ]
        try:
            fields = control.parse_fields(line)
            if self.state is State.AWAIT_AUTH:
                self.auth = control.parse_auth(fields)
                self._waiting_auth = True
                return [AuthRequested(self.auth)]
            if "start_session" in fields:
                if self.state is State.STREAMING:
                    raise ProtocolError("start_session was already received")
                if self._pending:
                    raise ProtocolError(
                        "start_session before the last chunk (is_last=1) of a subscription"
                    )
                self.state = State.STREAMING
                self.stream_open = True
                self._deadline = None
                queued = tuple(self._queued)
                self._queued.clear()
                return [StartRequested(queued)]
            if "schema" not in fields:
                raise ProtocolError("expected a subscription (schema=...) or start_session")
            request = control.parse_subscription(fields)
            ready = self._add_chunk(request)
            if ready is None:
                return []
            if self.state is State.STREAMING:
                return [SubscriptionReady(ready)]
            self._queued.append(ready)
            return [SubscriptionReady(ready, queued=True)]
        except LimitExceeded as exc:
            return [self._fail(str(exc), kind=exc.reason, limit=exc.limit)]
        except (ProtocolError, NotSupportedError) as exc:
            return [self._fail(str(exc), kind=exc.reason)]

    def _add_chunk(self, req: SubscriptionRequest) -> Subscription | None:
        symbols = req.symbol_list
        if not symbols:
            raise ProtocolError("subscription has no symbols")
        stype = req.stype_in
        norm = [ALL_SYMBOLS if s.upper() == ALL_SYMBOLS else s for s in symbols]
        if stype == "raw_symbol":
            norm = [s if s == ALL_SYMBOLS else s.upper() for s in norm]
        self._symbol_count += len(norm)
        if self._symbol_count > self.limits.max_symbols:
            raise LimitExceeded(
                f"too many symbols: a session may subscribe to at most {self.limits.max_symbols}",
                "max_symbols",
            )
        pending = self._pending.get(req.id)
        if pending is None:
            if len(self.subscriptions) + len(self._pending) >= self.limits.max_subscriptions:
                raise LimitExceeded(
                    f"too many subscriptions: a session may make at most "
                    f"{self.limits.max_subscriptions}",
                    "max_subscriptions",
                )
            pending = self._pending[req.id] = _Pending(req.schema, stype)
            pending.start_ns, pending.resume_after = req.start_ns, req.lsg_resume_after
            pending.resume_epoch = req.lsg_epoch
            pending.snapshot = req.snapshot
        elif (pending.schema, pending.stype_in) != (req.schema, stype):
            raise ProtocolError(
                f"subscription {req.id}: every chunk must have the same schema and stype_in"
            )
        pending.symbols.extend(norm)
        if not req.is_last:
            return None
        del self._pending[req.id]
        unique = tuple(dict.fromkeys(pending.symbols))
        sub = Subscription(
            pending.schema,
            pending.stype_in,
            unique,
            req.id,
            start_ns=pending.start_ns,
            resume_after=pending.resume_after,
            resume_epoch=pending.resume_epoch,
            snapshot=pending.snapshot,
        )
        self.subscriptions.append(sub)
        return sub
