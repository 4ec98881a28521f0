"""DBN v3 constants: versions, lengths, rtypes, schemas, and the gateway's
SystemMsg/ErrorMsg codes."""

from __future__ import annotations

from typing import Final

DBN_VERSION: Final = 3
HEADER_LEN: Final = 16
PRELUDE_LEN: Final = 8
UNDEF_TIMESTAMP: Final = 2**64 - 1
SYMBOL_CSTR_LEN: Final = 71

RTYPE_STATUS: Final = 0x12
RTYPE_DEF: Final = 0x13
RTYPE_ERROR: Final = 0x15
RTYPE_SYMBOL_MAPPING: Final = 0x16
RTYPE_SYSTEM: Final = 0x17
#: Records only a gateway may generate: never forwarded from a feed to sessions.
GATEWAY_RTYPES: Final = frozenset({RTYPE_ERROR, RTYPE_SYMBOL_MAPPING, RTYPE_SYSTEM})

STYPE_INSTRUMENT_ID: Final = 0
STYPE_RAW_SYMBOL: Final = 1

#: Schema name -> (Schema enum number, rtype carried in a DBN v3 stream).
#: tbbo shares rtype 0x01 with mbp-1 in v3 (0xC5 exists only from v4 on).
SCHEMAS: Final[dict[str, tuple[int, int]]] = {
    "mbo": (0, 0xA0),
    "mbp-1": (1, 0x01),
    "mbp-10": (2, 0x0A),
    "tbbo": (3, 0x01),
    "trades": (4, 0x00),
    "ohlcv-1s": (5, 0x20),
    "ohlcv-1m": (6, 0x21),
    "ohlcv-1h": (7, 0x22),
    "ohlcv-1d": (8, 0x23),
    "definition": (9, RTYPE_DEF),
    "statistics": (10, 0x18),
    "status": (11, RTYPE_STATUS),
    "imbalance": (12, 0x14),
    "ohlcv-eod": (13, 0x24),
    "cmbp-1": (14, 0xB1),
    "cbbo-1s": (15, 0xC0),
    "cbbo-1m": (16, 0xC1),
    "tcbbo": (17, 0xC2),
    "bbo-1s": (18, 0xC3),
    "bbo-1m": (19, 0xC4),
}
SCHEMA_RTYPE: Final = {name: rtype for name, (_, rtype) in SCHEMAS.items()}
#: Every rtype a v3 client decodes (a feed record with another rtype is refused).
KNOWN_RTYPES: Final = frozenset(SCHEMA_RTYPE.values()) | GATEWAY_RTYPES | {0x11}


class SystemCode:
    HEARTBEAT: Final = 0
    SUBSCRIPTION_ACK: Final = 1
    SLOW_READER_WARNING: Final = 2
    REPLAY_COMPLETED: Final = 3
    END_OF_INTERVAL: Final = 4
    UNSET: Final = 255


class ErrorCode:
    AUTH_FAILED: Final = 1
    API_KEY_DEACTIVATED: Final = 2
    CONNECTION_LIMIT_EXCEEDED: Final = 3
    SYMBOL_RESOLUTION_FAILED: Final = 4
    INVALID_SUBSCRIPTION: Final = 5
    INTERNAL_ERROR: Final = 6
    SKIPPED_RECORDS_AFTER_SLOW_READING: Final = 7
    REPLAY_DATA_AGED_OUT: Final = 8
