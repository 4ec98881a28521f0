"""One client connection's protocol state machine (sans-I/O).

Theory of operation
-------------------
The session takes bytes (``receive_data(data, now)``) and the clock as arguments and
returns events; it never touches a socket, a timer or a metric. Its adapter
(``server.ClientConnection``) writes ``data_to_send()`` and acts on the events.

    AWAIT_AUTH ──AuthRequested→ adapter decides ──accept──▶ AUTHENTICATED ──start──▶ STREAMING
        │ bad line / timeout / reject                           │ bad line            │
        └────────────────────────────▶ CLOSED ◀─────────────────┴─────────────────────┘

Rule 1: before authentication succeeds the only way to report an error is a
``success=0|error=...`` line (clients parse nothing else yet). After it, errors must be
ErrorMsg records, which need a Metadata header first: ``Failed.after_auth`` tells the
adapter which form to use. Every error is fatal and ends in a clean close.

Rule 2: after ``success=1`` the session writes nothing itself: the binary stream starts
only when the adapter answers ``StartRequested`` with the Metadata header (the Python
client hands any byte that shares a read with the auth line to its text parser).

Rule 3: subscription chunks that share an ``id`` are buffered until ``is_last=1`` and
surface as one ``SubscriptionReady``; they may arrive before or after start_session.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from gateway import control
from gateway.control import ALL_SYMBOLS, AuthRequest, SubscriptionRequest
from gateway.dbn import ErrorCode
from gateway.errors import LimitExceeded, NotSupportedError, ProtocolError

__all__ = [
    "AuthRequested",
    "Event",
    "Failed",
    "Limits",
    "Session",
    "StartRequested",
    "State",
    "Subscription",
    "SubscriptionReady",
]


class State(enum.IntEnum):
    AWAIT_AUTH = 0
    AUTHENTICATED = 1
    STREAMING = 2
    CLOSED = 3


@dataclass(frozen=True)
class Limits:
    max_line_bytes: int = 128 * 1024
    handshake_timeout_s: float = 30.0
    #: an authenticated session must send start_session within this (it holds a slot)
    start_timeout_s: float = 120.0
    max_subscriptions: int = 1_000
    max_symbols: int = 100_000
    control_rate_per_s: float = 100.0
    control_burst: int = 2_000


@dataclass(frozen=True)
class Subscription:
    schema: str
    stype_in: str
    symbols: tuple[str, ...]
    sub_id: int | None
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


@dataclass(frozen=True)
class StartRequested:
    pass


@dataclass(frozen=True)
class Failed:
    reason: str
    after_auth: bool
    code: int = ErrorCode.INVALID_SUBSCRIPTION
    kind: str = "protocol"


Event = AuthRequested | SubscriptionReady | StartRequested | Failed


@dataclass
class _Pending:
    schema: str
    stype_in: str
    symbols: list[str] = field(default_factory=list)


class Session:
    def __init__(self, *, challenge: str, version: str, limits: Limits, now: float) -> None:
        self.state = State.AWAIT_AUTH
        self.challenge = challenge
        self.limits = limits
        self.auth: AuthRequest | None = None
        self.subscriptions: list[Subscription] = []
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
                    events.append(
                        self._fail(
                            f"control line longer than {self.limits.max_line_bytes} bytes",
                            kind="line_too_long",
                        )
                    )
                break
            if nl > self.limits.max_line_bytes:
                events.append(
                    self._fail(
                        f"control line longer than {self.limits.max_line_bytes} bytes",
                        kind="line_too_long",
                    )
                )
                break
            line = bytes(self._buffer[:nl])
            del self._buffer[: nl + 1]
            events.extend(self._handle_line(line, now))
        return events

    def _parsing(self) -> bool:
        return self.state is not State.CLOSED and not self._waiting_auth

    def receive_eof(self) -> None:
        self.state = State.CLOSED

    def handle_timer(self, now: float) -> list[Event]:
        if self._deadline is None or now < self._deadline:
            return []
        if self.state is State.AWAIT_AUTH:
            return [self._fail("authentication timed out", kind="handshake_timeout")]
        if self.state is State.AUTHENTICATED:
            return [
                self._fail(
                    f"start_session not received within {self.limits.start_timeout_s:g} s "
                    "of authentication",
                    kind="start_timeout",
                )
            ]
        return []

    def next_deadline(self) -> float | None:
        if self.state in (State.AWAIT_AUTH, State.AUTHENTICATED):
            return self._deadline
        return None

    # --- answers from the adapter ------------------------------------------------

    def accept(self, session_id: int, now: float | None = None) -> None:
        assert self.state is State.AWAIT_AUTH and self._waiting_auth
        self._waiting_auth = False
        self.state = State.AUTHENTICATED
        self._deadline = None if now is None else now + self.limits.start_timeout_s
        self._out += control.auth_success(session_id)

    def reject(self, reason: str, kind: str = "auth") -> Failed:
        self._waiting_auth = False
        return self._fail(reason, kind=kind, after_auth=False)

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
        return self.auth.heartbeat_interval_s if self.auth else None

    # --- internals ----------------------------------------------------------------

    def _fail(
        self,
        reason: str,
        *,
        kind: str = "protocol",
        after_auth: bool | None = None,
        code: int = ErrorCode.INVALID_SUBSCRIPTION,
    ) -> Failed:
        if after_auth is None:
            after_auth = self.state in (State.AUTHENTICATED, State.STREAMING)
        if not after_auth:
            self._out += control.auth_failure(reason)
        self.state = State.CLOSED
        self._buffer.clear()
        return Failed(reason=reason, after_auth=after_auth, code=code, kind=kind)

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
                self._deadline = None
                return [StartRequested()]
            if "schema" not in fields:
                raise ProtocolError("expected a subscription (schema=...) or start_session")
            request = control.parse_subscription(fields)
            ready = self._add_chunk(request)
            return [SubscriptionReady(ready)] if ready else []
        except NotSupportedError as exc:
            return [self._fail(str(exc), kind="not_supported")]
        except LimitExceeded as exc:
            return [self._fail(str(exc), kind=exc.limit)]
        except ProtocolError as exc:
            return [self._fail(str(exc), kind="protocol")]

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
        elif (pending.schema, pending.stype_in) != (req.schema, stype):
            raise ProtocolError(
                f"subscription {req.id}: every chunk must have the same schema and stype_in"
            )
        pending.symbols.extend(norm)
        if not req.is_last:
            return None
        del self._pending[req.id]
        unique = tuple(dict.fromkeys(pending.symbols))
        sub = Subscription(pending.schema, pending.stype_in, unique, req.id)
        self.subscriptions.append(sub)
        return sub


# --- slow readers ---------------------------------------------------------------------

#: Schemas whose sessions may skip when behind (all others always behave as ``warn``).
SKIP_SCHEMAS = frozenset({"mbp-1", "mbp-10", "bbo-1s", "bbo-1m", "cmbp-1", "cbbo-1s", "cbbo-1m"})


@dataclass(frozen=True)
class SlowReaderLimits:
    #: a session is behind when more than this many bytes wait in its buffer ...
    behind_bytes: int = 4 * 1024 * 1024
    #: ... or when its buffer has not emptied for this long
    behind_age_s: float = 2.0
    #: skip mode resumes (and reports the skip) once the buffer is below this
    resume_bytes: int = 512 * 1024
    warning_interval_s: float = 1.0
    #: no policy may hold more than this for one session: over it, the session is cut
    hard_cap_bytes: int = 32 * 1024 * 1024


def effective_behavior(requested: str | None, schemas: list[str]) -> str:
    """``warn`` or ``skip`` for a session, per PROTOCOL.md §6.1 (``drop`` means skip)."""
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

    limits: SlowReaderLimits
    behavior: str = "warn"
    lossless: bool = False
    skipped: int = 0
    skipped_total: int = 0
    warnings: int = 0
    _nonempty_since: float | None = None
    _last_warning: float = float("-inf")
    notices: list[tuple[str, int]] = field(default_factory=list)

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
            # Lossless feeds wait for their sessions instead; stalls are cut by timer.
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
