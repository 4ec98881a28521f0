"""DBN v3 on the wire: record headers, chunk indexes, Metadata and gateway records.

Hot-path rule: market records are never turned into Python objects. A chunk of whole
records is indexed with numpy (one vectorised pass when every record has the same
length, which is what real feeds send in bursts; a header walk otherwise) and variants
are cut from it with numpy gathers. ``databento_dbn`` is used only for the Metadata
header and the gateway's own per-session records (SystemMsg, ErrorMsg, SymbolMappingMsg).

Record header (16 bytes, little-endian): u8 length in 4-byte words (ts_out included),
u8 rtype, u16 publisher_id, u32 instrument_id, u64 ts_event.

Modules, by job (every name is importable from ``gateway.dbn``):

* ``records``: constants (versions, lengths, rtypes, schemas) and SystemMsg/ErrorMsg codes;
* ``index``: the hot path, ``ChunkIndex``/``index_records``, ts_out stamping, ``header_at``;
* ``validate``: minimum record sizes per version and ``first_invalid``;
* ``encode``: the records the gateway writes itself, and symbols read back from records;
* ``stream``: ``DbnStreamDecoder`` (files, ingest publishers) and ``metadata_mappings``.
"""

from __future__ import annotations

from gateway.dbn.encode import (
    encode_error,
    encode_heartbeat,
    encode_metadata,
    encode_publisher_metadata,
    encode_symbol_mapping,
    encode_system,
    symbol_from_definition,
    symbols_from_mapping,
)
from gateway.dbn.index import (
    ChunkIndex,
    header_at,
    index_records,
    stamp_records,
    stamp_ts_out,
)
from gateway.dbn.records import (
    DBN_VERSION,
    GATEWAY_RTYPES,
    HEADER_LEN,
    KNOWN_RTYPES,
    PRELUDE_LEN,
    RTYPE_DEF,
    RTYPE_ERROR,
    RTYPE_STATUS,
    RTYPE_SYMBOL_MAPPING,
    RTYPE_SYSTEM,
    SCHEMA_RTYPE,
    SCHEMAS,
    STYPE_INSTRUMENT_ID,
    STYPE_RAW_SYMBOL,
    SYMBOL_CSTR_LEN,
    UNDEF_TIMESTAMP,
    ErrorCode,
    SystemCode,
)
from gateway.dbn.stream import DbnStreamDecoder, metadata_mappings
from gateway.dbn.validate import MIN_RECORD_SIZE, first_invalid

__all__ = [
    "DBN_VERSION",
    "GATEWAY_RTYPES",
    "HEADER_LEN",
    "KNOWN_RTYPES",
    "MIN_RECORD_SIZE",
    "PRELUDE_LEN",
    "RTYPE_DEF",
    "RTYPE_ERROR",
    "RTYPE_STATUS",
    "RTYPE_SYMBOL_MAPPING",
    "RTYPE_SYSTEM",
    "SCHEMAS",
    "SCHEMA_RTYPE",
    "STYPE_INSTRUMENT_ID",
    "STYPE_RAW_SYMBOL",
    "SYMBOL_CSTR_LEN",
    "UNDEF_TIMESTAMP",
    "ChunkIndex",
    "DbnStreamDecoder",
    "ErrorCode",
    "SystemCode",
    "encode_error",
    "encode_heartbeat",
    "encode_metadata",
    "encode_publisher_metadata",
    "encode_symbol_mapping",
    "encode_system",
    "first_invalid",
    "header_at",
    "index_records",
    "metadata_mappings",
    "stamp_records",
    "stamp_ts_out",
    "symbol_from_definition",
    "symbols_from_mapping",
]
