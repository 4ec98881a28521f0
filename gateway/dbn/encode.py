"""The records the gateway writes itself: the Metadata header, heartbeats,
SystemMsg, ErrorMsg and SymbolMappingMsg (through databento_dbn, per session, off the
market-data path), a publisher's Metadata, and symbols read back from records."""

from __future__ import annotations

import functools
import struct
from typing import Any

import databento_dbn as dbn

from gateway.dbn.records import SYMBOL_CSTR_LEN, UNDEF_TIMESTAMP, SystemCode

# databento_dbn's stubs type its enum members as plain values; name them once here.
_STYPE_INSTRUMENT_ID: Any = dbn.SType.INSTRUMENT_ID
_STYPE_RAW_SYMBOL: Any = dbn.SType.RAW_SYMBOL


# --- Metadata ------------------------------------------------------------------------


def encode_metadata(dataset: str, start_ns: int, ts_out: bool) -> bytes:
    """The live Metadata header: schema and stype_in unset, stype_out instrument_id,
    every list empty, so a reconnecting Python client finds it identical but for start.
    Encoded once per (dataset, ts_out) by databento_dbn; each session patches ``start``."""
    template = _metadata_template(dataset, ts_out)
    return template[:26] + struct.pack("<Q", start_ns) + template[34:]


@functools.lru_cache(maxsize=256)
def _metadata_template(dataset: str, ts_out: bool) -> bytes:
    meta = dbn.Metadata(
        dataset=dataset,
        start=0,
        stype_in=None,
        stype_out=_STYPE_INSTRUMENT_ID,
        schema=None,
        ts_out=ts_out,
    )
    return bytes(meta.encode())


def encode_heartbeat(ts_event: int) -> bytes:
    """A HEARTBEAT SystemMsg ("Heartbeat"), from a template encoded once."""
    template = _heartbeat_template()
    return template[:8] + struct.pack("<Q", ts_event) + template[16:]


@functools.lru_cache(maxsize=1)
def _heartbeat_template() -> bytes:
    return encode_system(0, "Heartbeat", SystemCode.HEARTBEAT)


def encode_publisher_metadata(
    dataset: str, start_ns: int, symbols: dict[str, int], schema: str | None = None
) -> bytes:
    """A Metadata header for an ingest publisher: raw symbol -> instrument_id mappings
    (valid for today) from which the gateway resolves raw-symbol subscriptions."""
    import datetime as dt
    from types import SimpleNamespace

    day = dt.datetime.fromtimestamp(start_ns / 1e9, tz=dt.UTC).date()
    mappings = [
        SimpleNamespace(
            raw_symbol=sym,
            intervals=[
                SimpleNamespace(
                    start_date=day, end_date=day + dt.timedelta(days=1), symbol=str(iid)
                )
            ],
        )
        for sym, iid in symbols.items()
    ]
    meta = dbn.Metadata(
        dataset=dataset,
        start=start_ns,
        stype_in=_STYPE_RAW_SYMBOL if symbols else None,
        stype_out=_STYPE_INSTRUMENT_ID,
        schema=dbn.Schema.from_str(schema) if schema else None,
        symbols=list(symbols),
        mappings=mappings,
    )
    return bytes(meta.encode())


# --- gateway records -----------------------------------------------------------------


def encode_system(ts_event: int, msg: str, code: int) -> bytes:
    rec = dbn.SystemMsg(ts_event=ts_event, msg=msg[:302], code=dbn.SystemCode.from_int(code))
    return bytes(rec)


def encode_error(ts_event: int, err: str, code: int, is_last: bool = True) -> bytes:
    rec = dbn.ErrorMsg(
        ts_event=ts_event, err=err[:301], code=dbn.ErrorCode.from_int(code), is_last=is_last
    )
    return bytes(rec)


def encode_symbol_mapping(
    ts_event: int,
    instrument_id: int,
    stype_in: int,
    stype_in_symbol: str,
    raw_symbol: str,
    start_ts: int,
) -> bytes:
    rec = dbn.SymbolMappingMsg(
        publisher_id=0,
        instrument_id=instrument_id,
        ts_event=ts_event,
        stype_in=dbn.SType.from_int(stype_in),
        stype_in_symbol=stype_in_symbol[:70],
        stype_out=_STYPE_RAW_SYMBOL,
        stype_out_symbol=raw_symbol[:70],
        start_ts=start_ts,
        end_ts=UNDEF_TIMESTAMP,
    )
    return bytes(rec)


def _cstr(buf: bytes | memoryview, start: int, size: int) -> str:
    raw = bytes(buf[start : start + size])
    return raw.split(b"\0", 1)[0].decode("ascii", "replace").strip()


def symbol_from_definition(record: bytes | memoryview) -> str:
    """raw_symbol of an InstrumentDefMsg (v3 layout: char[71] at offset 238)."""
    if len(record) < 238 + SYMBOL_CSTR_LEN:
        return ""
    return _cstr(record, 238, SYMBOL_CSTR_LEN)


def symbols_from_mapping(record: bytes | memoryview) -> tuple[str, str]:
    """(stype_in_symbol, stype_out_symbol) of a SymbolMappingMsg v2/v3."""
    return _cstr(record, 17, SYMBOL_CSTR_LEN), _cstr(record, 89, SYMBOL_CSTR_LEN)
