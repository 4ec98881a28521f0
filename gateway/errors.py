"""One error hierarchy for the gateway.

    GatewayError
    ├── ConfigError          bad configuration or CLI value; names the field
    ├── NotSupportedError    a documented feature that is not built yet
    ├── ProtocolError        a client broke the Live protocol (sans-I/O core raises it)
    │   └── LimitExceeded    a configured bound was hit (line length, symbols, ...)
    ├── AuthError            authentication or entitlement refused
    ├── DbnError             malformed DBN bytes (feeds, files, ingest publishers)
    └── FeedError            a feed could not start or broke

Core modules raise these locally; the sans-I/O session turns a client's error into a
``Failed`` event once, at the boundary, and its adapter writes it as a ``success=0|error=...``
line or an ErrorMsg record before a clean close. The message is what the client is told;
``reason`` is the machine-readable name of the error (a metrics and log label), so that no
caller ever matches message text.
"""

from __future__ import annotations

__all__ = [
    "AuthError",
    "ConfigError",
    "DbnError",
    "FeedError",
    "GatewayError",
    "LimitExceeded",
    "NotSupportedError",
    "ProtocolError",
]


class GatewayError(Exception):
    """Base class of every error the gateway raises on purpose; ``reason`` names it."""

    reason: str = "error"

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class ConfigError(GatewayError):
    """A configuration value is invalid; the message names the field."""

    reason = "config"


class NotSupportedError(GatewayError):
    """A protocol feature that this gateway does not implement yet."""

    reason = "not_supported"


class ProtocolError(GatewayError):
    """A client sent something the protocol does not allow."""

    reason = "protocol"


class LimitExceeded(ProtocolError):
    """A client went over a configured limit; ``limit`` (and ``reason``) names it, as the
    ``gateway_limit_hits_total`` label does."""

    def __init__(self, message: str, limit: str = "limit") -> None:
        super().__init__(message, limit)
        self.limit = limit


class AuthError(GatewayError):
    """Authentication failed or the key is not entitled to what it asked; ``reason``
    names why (bad_key, unknown_dataset, not_entitled, session_limit: a metrics label);
    ``limit`` names the limit hit, if one was (session_limit: ``sessions_per_key``).
    The message is what the client is told: it names no other dataset or key."""

    reason = "bad_key"

    def __init__(self, message: str, reason: str = "bad_key", limit: str | None = None) -> None:
        super().__init__(message, reason)
        self.limit = limit


class DbnError(GatewayError):
    """Bytes that are not valid DBN."""

    reason = "dbn"


class FeedError(GatewayError):
    """A feed failed to start or to run."""

    reason = "feed"
