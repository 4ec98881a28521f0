"""Control lines of the Live Raw API: ``key=value|key=value\\n`` <-> typed messages.

The one wire codec for the text phase, both directions. The gateway parses what clients
send (``parse_fields``, ``parse_auth``, ``parse_subscription``) and writes its own lines
(``greeting_line`` ...); the project's client, the bench, the soak and the test helpers
write theirs with ``encode_auth``, ``encode_subscription(s)``, ``START_SESSION`` and
``cram_response``, so the CRAM answer and the key order live in one place.

Lines are parsed by key, never by position (each official client orders keys its own
way); values are split on the first ``=`` only; unknown keys are ignored. Values are
typed with msgspec (``heartbeat_interval_s`` arrives as ``"10"`` and becomes ``10``).
Encoders write keys in the order the project's client always has (auth: ``auth dataset
encoding ts_out compression heartbeat_interval_s slow_reader_behavior lsg_checkpoints
client``; subscription: ``schema stype_in symbols start lsg_resume_after lsg_epoch snapshot
id is_last``) and leave out a key whose value is None.

Replay fields: ``start`` (``parse_start``: UNIX nanoseconds or ISO 8601) as Databento
defines it; ``lsg_resume_after=<seq>`` (a journal position, this gateway's own: replay every
chunk after it) with ``lsg_epoch=<hex>`` (which journal: see gateway/checkpoint.py) and the
auth field ``lsg_checkpoints=1`` (send checkpoint records) are only
sent by the project's client.
"""

from __future__ import annotations

import calendar
import datetime
import hashlib
import re
from collections.abc import Mapping, Sequence
from typing import Final, Literal, TypeVar

import msgspec

from gateway.dbn import SCHEMAS
from gateway.errors import NotSupportedError, ProtocolError

__all__ = [
    "ALL_SYMBOLS",
    "START_SESSION",
    "SYMBOL_CHUNK",
    "AuthRequest",
    "SubscriptionRequest",
    "auth_failure",
    "auth_success",
    "challenge_line",
    "cram_response",
    "encode_auth",
    "encode_fields",
    "encode_subscription",
    "encode_subscriptions",
    "greeting_line",
    "parse_auth",
    "parse_fields",
    "parse_start",
    "parse_subscription",
]

ALL_SYMBOLS: Final = "ALL_SYMBOLS"
HEARTBEAT_MIN_S: Final = 5
HEARTBEAT_MAX_S: Final = 1800
#: symbols per subscription line when a client splits a long list (the official clients' 500)
SYMBOL_CHUNK: Final = 500
#: the line that ends the control phase (the gateway also accepts ``start_session=0``/``=1``)
START_SESSION: Final = b"start_session\n"

_T = TypeVar("_T")


class AuthRequest(msgspec.Struct, frozen=True, kw_only=True):
    auth: str
    dataset: str
    encoding: str = "dbn"
    ts_out: bool = False
    compression: Literal["none", "zstd"] = "none"
    heartbeat_interval_s: int | None = None
    slow_reader_behavior: str | None = None
    #: send checkpoint records (``lsg-checkpoint seq=N`` SystemMsgs; the project's client)
    lsg_checkpoints: bool = False
    client: str = ""


class SubscriptionRequest(msgspec.Struct, frozen=True, kw_only=True):
    schema: str
    stype_in: str = "raw_symbol"
    symbols: str = ""
    #: as sent (``parse_start`` reads it; ``start_ns`` is the parsed value)
    start: str | None = None
    #: replay every journaled chunk after this position (u64; the project's client)
    lsg_resume_after: int | None = None
    #: the journal the position belongs to (the ``epoch=`` of its checkpoint): a journal
    #: replaced or restarted empty has another, and refuses the resume
    lsg_epoch: str | None = None
    snapshot: bool = False
    id: int | None = None
    is_last: bool = True

    @property
    def symbol_list(self) -> list[str]:
        return [s.strip() for s in self.symbols.split(",") if s.strip()]

    @property
    def start_ns(self) -> int | None:
        """``start`` in UNIX nanoseconds (None: not sent, or sent empty). Raises
        ProtocolError for a malformed value (``parse_subscription`` checked it)."""
        if self.start is None or self.start == "":
            return None
        return parse_start(self.start)


#: ``2026-12-01``, ``2026-12-01T10:00``, ``…T10:00:00.123456789``, ``…Z``, ``…+01:00``
_ISO = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})"
    r"(?:[T ](\d{2}):(\d{2})(?::(\d{2})(?:[.,](\d{1,9}))?)?)?"
    r"(Z|z|[+-]\d{2}(?::?\d{2})?)?",
    re.ASCII,
)
_START_FORMS = "UNIX nanoseconds, or an ISO 8601 date or date-time such as 2026-12-01T10:00:00.5Z"


def parse_start(text: str) -> int:
    """A subscription's ``start`` in UNIX nanoseconds (exactly: no float on the way).

    Accepted: a decimal integer of nanoseconds (``0``: everything retained); an ISO 8601
    date (``2026-12-01``: midnight UTC) or date-time with ``T`` (or a space), minutes or
    seconds, an optional fraction of up to 9 digits, and an optional ``Z`` or ``±hh:mm``
    (``±hhmm``, ``±hh``) offset; a date-time without an offset is UTC. Anything else, or a
    time before 1970 or past 2^64-1 ns, raises ProtocolError ``bad value for start (…)``.
    """
    raw = text.strip()
    if raw.isdigit() and raw.isascii():
        ns = int(raw)
        if ns >= 2**64:
            raise ProtocolError(f"bad value for start ({raw:.40} is past 2^64-1 nanoseconds)")
        return ns
    m = _ISO.fullmatch(raw)
    if m is None:
        raise ProtocolError(f"bad value for start ({raw!r:.44}: expected {_START_FORMS})")
    year, month, day, hour, minute, second, frac, zone = m.groups()
    parts = (int(year), int(month), int(day), int(hour or 0), int(minute or 0), int(second or 0))
    try:
        datetime.datetime(*parts)  # checks the calendar: month 13, Feb 30, hour 24 ...
    except ValueError as exc:
        raise ProtocolError(f"bad value for start ({raw!r:.44}: {exc})") from None
    seconds = calendar.timegm(parts)
    if zone and zone not in "Zz":
        sign = -1 if zone[0] == "-" else 1
        digits = zone[1:].replace(":", "")
        off_h, off_m = int(digits[:2]), int(digits[2:] or 0)
        if off_h > 23 or off_m > 59:
            raise ProtocolError(f"bad value for start ({raw!r:.44}: offset out of range)")
        seconds -= sign * (off_h * 3600 + off_m * 60)
    ns = seconds * 1_000_000_000 + int((frac or "").ljust(9, "0"))
    if not 0 <= ns < 2**64:
        raise ProtocolError(f"bad value for start ({raw!r:.44}: before 1970 or past 2554)")
    return ns


def parse_fields(line: bytes) -> dict[str, str]:
    """Split one control line (without its ``\\n``) into fields. Raises ProtocolError."""
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError("control line is not ASCII text") from None
    if text.endswith("\r"):
        text = text[:-1]
    if not text or not text.isprintable():
        raise ProtocolError("malformed control line")
    fields: dict[str, str] = {}
    for token in text.split("|"):
        key, sep, value = token.partition("=")
        key = key.strip()
        if not key:
            raise ProtocolError(f"malformed control line: empty key in {token!r:.60}")
        if not sep and key != "start_session":
            raise ProtocolError(f"malformed control line: {key!r:.40} has no '='")
        fields[key] = value
    return fields


def _convert(fields: dict[str, str], kind: type[_T], what: str) -> _T:
    try:
        return msgspec.convert(fields, kind, strict=False)
    except msgspec.ValidationError as exc:
        raise ProtocolError(f"invalid {what}: {_field_message(exc)}") from None


def _field_message(exc: msgspec.ValidationError) -> str:
    text = str(exc)
    msg, sep, where = text.rpartition(" - at `$.")
    if sep:
        field = where.rstrip("`")
        if msg.startswith("Object missing required field"):
            return f"missing field {field}"
        return f"bad value for {field} ({msg})"
    if text.startswith("Object missing required field"):
        return "missing field " + text.split("`")[1]
    return text


def parse_auth(fields: dict[str, str]) -> AuthRequest:
    """The authentication request in ``fields``; ProtocolError naming the bad field.

    ``encoding`` must be ``dbn`` (NotSupportedError otherwise), ``heartbeat_interval_s``
    within 5..1800 s, and ``slow_reader_behavior`` one of the three behaviours ``warn``,
    ``skip`` or ``drop`` (``drop`` means ``skip``; see ``slowreader.effective_behavior``).
    """
    if "auth" not in fields:
        raise ProtocolError("expected an authentication request: missing field auth")
    req = _convert(fields, AuthRequest, "authentication request")
    if req.encoding != "dbn":
        raise NotSupportedError(f"encoding={req.encoding} is not supported: use encoding=dbn")
    hb = req.heartbeat_interval_s
    if hb is not None and not HEARTBEAT_MIN_S <= hb <= HEARTBEAT_MAX_S:
        raise ProtocolError(
            f"heartbeat_interval_s={hb} is out of range "
            f"({HEARTBEAT_MIN_S} to {HEARTBEAT_MAX_S} seconds)"
        )
    srb = req.slow_reader_behavior
    if srb is not None and srb not in ("warn", "skip", "drop"):
        raise ProtocolError(f"slow_reader_behavior={srb} is invalid (warn, skip or drop)")
    return req


def parse_subscription(fields: dict[str, str]) -> SubscriptionRequest:
    req = _convert(fields, SubscriptionRequest, "subscription")
    if req.schema not in SCHEMAS:
        raise ProtocolError(f"unknown schema {req.schema!r:.40}")
    if req.stype_in not in ("raw_symbol", "instrument_id", "parent", "continuous"):
        if req.stype_in == "smart":
            raise NotSupportedError(
                f"stype_in={req.stype_in} is not supported yet: use parent or continuous"
            )
        raise ProtocolError(f"unknown stype_in {req.stype_in!r:.40}")
    if req.id is not None and not 0 <= req.id < 2**32:
        raise ProtocolError("subscription id must be a u32")
    try:
        start_ns = req.start_ns
    except ProtocolError as exc:
        raise ProtocolError(f"invalid subscription: {exc}") from None
    resume = req.lsg_resume_after
    if req.stype_in in ("parent", "continuous") and (start_ns is not None or resume is not None):
        raise NotSupportedError(
            f"stype_in={req.stype_in} with start or lsg_resume_after is not supported yet: "
            "a replay serves raw_symbol and instrument_id subscriptions"
        )
    if req.snapshot:
        # as Databento: a book snapshot of MBO, and only for a live start
        if req.schema != "mbo":
            raise ProtocolError(
                f"invalid subscription: snapshot=1 is only for mbo, not {req.schema}"
            )
        if start_ns is not None or resume is not None:
            raise ProtocolError("invalid subscription: snapshot=1 cannot be combined with start")
    if resume is not None and not 0 <= resume < 2**64:
        raise ProtocolError("invalid subscription: bad value for lsg_resume_after (not a u64)")
    if start_ns is not None and resume is not None:
        raise ProtocolError("invalid subscription: start and lsg_resume_after cannot both be given")
    epoch = req.lsg_epoch
    if epoch is not None:
        if resume is None:
            raise ProtocolError("invalid subscription: lsg_epoch comes with lsg_resume_after")
        if not 1 <= len(epoch) <= 32 or any(c not in "0123456789abcdef" for c in epoch):
            raise ProtocolError("invalid subscription: bad value for lsg_epoch (not hex)")
    if req.stype_in == "instrument_id":
        for sym in req.symbol_list:
            if sym != ALL_SYMBOLS and not (sym.isdigit() and int(sym) < 2**32):
                raise ProtocolError(f"instrument_id symbol {sym!r:.40} is not a u32")
    return req


def greeting_line(version: str) -> bytes:
    return f"lsg_version={version}\n".encode()


def challenge_line(challenge: str) -> bytes:
    return f"cram={challenge}\n".encode()


def auth_success(session_id: int) -> bytes:
    return f"success=1|session_id={session_id}\n".encode()


def auth_failure(reason: str) -> bytes:
    clean = reason.replace("|", "/").replace("\n", " ").replace("\r", " ")
    return f"success=0|error={clean}\n".encode("ascii", "replace")


def cram_response(challenge: str, key: str) -> str:
    """The client's answer to ``cram=<challenge>``: ``sha256_hex(challenge|key)-<key[-5:]>``.

    The one implementation: the gateway checks answers with it (``auth.Authenticator``)
    and the client, bench, soak and test helpers send it.
    """
    digest = hashlib.sha256(f"{challenge}|{key}".encode()).hexdigest()
    return f"{digest}-{key[-5:]}"


FieldValue = str | int | bool | None


def encode_fields(fields: Mapping[str, FieldValue]) -> bytes:
    """One control line (with its ``\\n``) from ``fields`` in their order.

    A None value leaves its key out; a bool is written ``0``/``1``. Raises ValueError,
    naming the field, for a key or value that would not read back as that one field (a
    ``|`` or line break anywhere, an ``=`` or nothing in a key).
    """
    return ("|".join(_field_parts(fields)) + "\n").encode()


def _field_parts(fields: Mapping[str, FieldValue]) -> list[str]:
    parts = []
    for key, value in fields.items():
        if value is None:
            continue
        if not key or any(c in key for c in "|=\n\r"):
            raise ValueError(f"control field name {key!r:.40} is not a plain key")
        text = str(int(value)) if isinstance(value, bool) else str(value)
        if any(c in text for c in "|\n\r"):
            raise ValueError(f"control field {key} has a '|' or a line break in {text!r:.60}")
        parts.append(f"{key}={text}")
    return parts


def encode_auth(
    auth: str,
    dataset: str,
    *,
    encoding: str = "dbn",
    ts_out: bool | None = False,
    compression: str | None = "none",
    heartbeat_interval_s: int | None = None,
    slow_reader_behavior: str | None = None,
    extra: Mapping[str, FieldValue] | None = None,
    client: str | None = None,
    lsg_checkpoints: bool | None = None,
) -> bytes:
    """The authentication request; ``auth`` is ``cram_response(challenge, key)``.

    ``extra`` fields (tests that send what no client would) go as given just before
    ``client``, even a key already written (the gateway keeps the last one).
    """
    parts = _field_parts(
        {
            "auth": auth,
            "dataset": dataset,
            "encoding": encoding,
            "ts_out": ts_out,
            "compression": compression,
            "heartbeat_interval_s": heartbeat_interval_s,
            "slow_reader_behavior": slow_reader_behavior,
            "lsg_checkpoints": lsg_checkpoints,
        }
    )
    parts += _field_parts(extra or {})
    parts += _field_parts({"client": client})
    return ("|".join(parts) + "\n").encode()


def encode_subscription(
    schema: str,
    symbols: Sequence[str] | str,
    *,
    stype_in: str | None = "raw_symbol",
    snapshot: bool | None = False,
    sub_id: int | None = None,
    is_last: bool | None = True,
    start: int | str | None = None,
    resume_after: int | None = None,
    epoch: str | None = None,
) -> bytes:
    """One subscription line; ``symbols`` a list (joined with ``,``) or one string.
    ``start`` (UNIX ns or ISO 8601 text), ``resume_after`` (``lsg_resume_after``) and
    ``epoch`` (``lsg_epoch``) are left out when None."""
    text = symbols if isinstance(symbols, str) else ",".join(symbols)
    return encode_fields(
        {
            "schema": schema,
            "stype_in": stype_in,
            "symbols": text,
            "start": start,
            "lsg_resume_after": resume_after,
            "lsg_epoch": epoch,
            "snapshot": snapshot,
            "id": sub_id,
            "is_last": is_last,
        }
    )


def encode_subscriptions(
    schema: str,
    symbols: Sequence[str] | str,
    *,
    stype_in: str = "raw_symbol",
    sub_id: int,
    chunk: int = SYMBOL_CHUNK,
    start: int | str | None = None,
    resume_after: int | None = None,
    epoch: str | None = None,
) -> bytes:
    """A subscription as lines of at most ``chunk`` symbols, ``is_last=1`` on the final
    one (one line with no symbols for an empty list), as the project's client sends it;
    ``start``/``resume_after`` go on every line."""
    items = [symbols] if isinstance(symbols, str) else list(symbols)
    parts = [items[i : i + chunk] for i in range(0, len(items), chunk)] or [[]]
    return b"".join(
        encode_subscription(
            schema,
            part,
            stype_in=stype_in,
            sub_id=sub_id,
            is_last=n == len(parts) - 1,
            start=start,
            resume_after=resume_after,
            epoch=epoch,
        )
        for n, part in enumerate(parts)
    )
