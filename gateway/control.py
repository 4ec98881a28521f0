"""Control lines of the Live Raw API: ``key=value|key=value\\n`` <-> typed messages.

Lines are parsed by key, never by position (each official client orders keys its own
way); values are split on the first ``=`` only; unknown keys are ignored. Values are
typed with msgspec (``heartbeat_interval_s`` arrives as ``"10"`` and becomes ``10``).
"""

from __future__ import annotations

import hashlib
from typing import Final, Literal, TypeVar

import msgspec

from gateway.dbn import SCHEMAS
from gateway.errors import NotSupportedError, ProtocolError

__all__ = [
    "ALL_SYMBOLS",
    "AuthRequest",
    "SubscriptionRequest",
    "auth_failure",
    "auth_success",
    "challenge_line",
    "cram_response",
    "greeting_line",
    "parse_auth",
    "parse_fields",
    "parse_subscription",
]

ALL_SYMBOLS: Final = "ALL_SYMBOLS"
HEARTBEAT_MIN_S: Final = 5
HEARTBEAT_MAX_S: Final = 1800

SlowReaderBehavior = Literal["warn", "skip"]
_T = TypeVar("_T")


class AuthRequest(msgspec.Struct, frozen=True, kw_only=True):
    auth: str
    dataset: str
    encoding: str = "dbn"
    ts_out: bool = False
    compression: Literal["none", "zstd"] = "none"
    heartbeat_interval_s: int | None = None
    slow_reader_behavior: str | None = None
    client: str = ""


class SubscriptionRequest(msgspec.Struct, frozen=True, kw_only=True):
    schema: str
    stype_in: str = "raw_symbol"
    symbols: str = ""
    start: str | None = None
    snapshot: bool = False
    id: int | None = None
    is_last: bool = True

    @property
    def symbol_list(self) -> list[str]:
        return [s.strip() for s in self.symbols.split(",") if s.strip()]


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
        raise ProtocolError(f"slow_reader_behavior={srb} is invalid (warn or skip)")
    return req


def parse_subscription(fields: dict[str, str]) -> SubscriptionRequest:
    req = _convert(fields, SubscriptionRequest, "subscription")
    if req.schema not in SCHEMAS:
        raise ProtocolError(f"unknown schema {req.schema!r:.40}")
    if req.stype_in not in ("raw_symbol", "instrument_id"):
        if req.stype_in in ("parent", "continuous", "smart"):
            raise NotSupportedError(
                f"stype_in={req.stype_in} is not supported yet: use raw_symbol or instrument_id"
            )
        raise ProtocolError(f"unknown stype_in {req.stype_in!r:.40}")
    if req.id is not None and not 0 <= req.id < 2**32:
        raise ProtocolError("subscription id must be a u32")
    if req.start is not None and req.start != "":
        raise NotSupportedError(
            "intraday replay (start=) is not supported yet: subscribe without start"
        )
    if req.snapshot:
        raise NotSupportedError("snapshot=1 is not supported yet: subscribe with snapshot=0")
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
