"""One error hierarchy for the gateway.

    GatewayError
    ├── ConfigError          bad configuration or CLI value; names the field
    ├── NotSupportedError    a documented feature that is not built yet
    ├── ProtocolError        a client broke the Live protocol (sans-I/O core raises it)
    │   └── LimitExceeded    a configured bound was hit (line length, symbols, ...)
    ├── AuthError            authentication or entitlement refused
    ├── DbnError             malformed DBN bytes (feeds, files, ingest publishers)
    └── FeedError            a feed could not start or broke

Core modules raise these locally; the asyncio adapters convert them once, at the
boundary, into a ``success=0|error=...`` line or an ErrorMsg record and a clean close.
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
    """Base class of every error the gateway raises on purpose."""


class ConfigError(GatewayError):
    """A configuration value is invalid; the message names the field."""


class NotSupportedError(GatewayError):
    """A protocol feature that this gateway does not implement yet."""


class ProtocolError(GatewayError):
    """A client sent something the protocol does not allow."""


class LimitExceeded(ProtocolError):
    """A client went over a configured limit; ``limit`` names it (metrics label)."""

    def __init__(self, message: str, limit: str = "limit") -> None:
        super().__init__(message)
        self.limit = limit


class AuthError(GatewayError):
    """Authentication failed or the key is not entitled to what it asked; ``reason``
    names why (bad_key, unknown_dataset, not_entitled, session_limit: a metrics label).
    The message is what the client is told: it names no other dataset or key."""

    def __init__(self, message: str, reason: str = "bad_key") -> None:
        super().__init__(message)
        self.reason = reason


class DbnError(GatewayError):
    """Bytes that are not valid DBN."""


class FeedError(GatewayError):
    """A feed failed to start or to run."""
