"""Helpers for the sans-I/O unit tests: real DBN records in, reference answers out.

Every expected value here is computed independently of the gateway code: records are
built with ``databento_dbn`` objects (``bytes(rec)``) or taken from the real sample files,
and split / decoded with ``databento_dbn`` or a plain Python walk over the length byte.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, cast

import databento_dbn as d
import numpy as np
import zstandard

from gateway.config import LimitsConfig
from gateway.session import Session
from tests.conftest import DBN_SAMPLES, dbn_sample_files

DATA = DBN_SAMPLES
SAMPLE_FILES = dbn_sample_files()
LIVE_SAMPLE = DATA / "LIVE" / "test_data.live.dbn.zst"
NOW_NS = 1_700_000_000_123_456_789


# --- sample files ---------------------------------------------------------------------


@functools.cache
def sample_bytes(path: Path) -> bytes:
    """The decompressed DBN stream of one sample file."""
    with path.open("rb") as fh:
        return zstandard.ZstdDecompressor().stream_reader(fh).read()


@functools.cache
def sample_decoded(path: Path) -> tuple[Any, tuple[bytes, ...]]:
    """(Metadata, raw bytes of every record) as databento_dbn decodes the file."""
    dec = d.DBNDecoder()
    dec.write(sample_bytes(path))
    items = dec.decode()
    return items[0], tuple(bytes(r) for r in items[1:])


def sample_path(dataset: str, schema: str) -> Path:
    path = DATA / dataset / f"test_data.{schema}.dbn.zst"
    assert path.is_file(), f"missing DBN sample {path}"
    return path


def sample_records(dataset: str, schema: str) -> tuple[bytes, ...]:
    return sample_decoded(sample_path(dataset, schema))[1]


def mixed_records() -> list[bytes]:
    """Real records of many lengths: status 40, trades 48, mbo 56, mbp-1 80, mbp-10 368,
    definition 520, and the live capture's SymbolMappingMsg 176."""
    out: list[bytes] = []
    for schema in ("status", "trades", "mbo", "mbp-1", "mbp-10", "definition", "ohlcv-1s"):
        out += sample_records("GLBX.MDP3", schema)
    out += sample_decoded(LIVE_SAMPLE)[1]
    return out


# --- record builders ------------------------------------------------------------------


def trade(
    instrument_id: int,
    ts: int = NOW_NS,
    *,
    price: int = 100_000_000_000,
    size: int = 1,
    sequence: int = 0,
    publisher_id: int = 1,
) -> bytes:
    return bytes(
        d.TradeMsg(
            publisher_id=publisher_id,
            instrument_id=instrument_id,
            ts_event=ts,
            price=price,
            size=size,
            action=d.Action.TRADE,  # type: ignore[arg-type]  # stubs type enum members as str
            side=d.Side.BID,  # type: ignore[arg-type]  # stubs type enum members as str
            depth=0,
            ts_recv=ts + 10,
            sequence=sequence,
        )
    )


def mbo(instrument_id: int, ts: int = NOW_NS, *, order_id: int = 1) -> bytes:
    return bytes(
        d.MBOMsg(
            publisher_id=1,
            instrument_id=instrument_id,
            ts_event=ts,
            order_id=order_id,
            price=99_000_000_000,
            size=5,
            action=d.Action.ADD,  # type: ignore[arg-type]  # stubs type enum members as str
            side=d.Side.ASK,  # type: ignore[arg-type]  # stubs type enum members as str
            ts_recv=ts + 5,
        )
    )


def ohlcv(instrument_id: int, ts: int = NOW_NS, *, rtype: int = 0x20) -> bytes:
    return bytes(
        d.OHLCVMsg(
            rtype=rtype,
            publisher_id=1,
            instrument_id=instrument_id,
            ts_event=ts,
            open=1,
            high=3,
            low=1,
            close=2,
            volume=10,
        )
    )


def status(instrument_id: int, ts: int = NOW_NS) -> bytes:
    return bytes(
        d.StatusMsg(publisher_id=1, instrument_id=instrument_id, ts_event=ts, ts_recv=ts + 1)
    )


def symbol_mapping(instrument_id: int, symbol: str, ts: int = NOW_NS) -> bytes:
    return bytes(
        d.SymbolMappingMsg(
            publisher_id=1,
            instrument_id=instrument_id,
            ts_event=ts,
            stype_in=d.SType.RAW_SYMBOL,  # type: ignore[arg-type]  # stubs type enum members as str
            stype_in_symbol=symbol,
            stype_out=d.SType.RAW_SYMBOL,  # type: ignore[arg-type]  # stubs type enum members as str
            stype_out_symbol=symbol,
            start_ts=ts,
            end_ts=ts + 1,
        )
    )


def definition(instrument_id: int, raw_symbol: str) -> bytes:
    """A real v3 InstrumentDefMsg with its instrument_id and raw_symbol replaced."""
    dec = d.DBNDecoder()
    dec.write(sample_bytes(sample_path("GLBX.MDP3", "definition")))
    rec = cast("d.InstrumentDefMsg", dec.decode()[1])
    old = rec.raw_symbol.encode()
    rec.instrument_id = instrument_id
    raw = bytearray(bytes(rec))
    at = raw.index(old + b"\0")  # the raw_symbol field, found by content
    raw[at : at + 71] = raw_symbol.encode().ljust(71, b"\0")
    check = decode(bytes(raw))[0]
    assert (check.instrument_id, check.raw_symbol) == (instrument_id, raw_symbol)
    return bytes(raw)


# --- reference decoding ---------------------------------------------------------------


def decode(data: bytes | memoryview, *, ts_out: bool = False) -> list[Any]:
    """databento_dbn's view of bare v3 records (no Metadata)."""
    dec = d.DBNDecoder(has_metadata=False, ts_out=ts_out, input_version=3)
    dec.write(bytes(data))
    return list(dec.decode())


def split_records(data: bytes | memoryview) -> list[bytes]:
    """Slow reference: walk the length bytes of whole records."""
    data = bytes(data)
    out = []
    off = 0
    while off < len(data):
        size = data[off] * 4
        assert size >= 16 and off + size <= len(data)
        out.append(data[off : off + size])
        off += size
    return out


def header(rec: bytes) -> tuple[int, int, int, int, int]:
    """(length bytes, rtype, publisher_id, instrument_id, ts_event)."""
    length, rtype, pub, iid, ts = struct.unpack_from("<BBHIQ", rec)
    return length * 4, rtype, pub, iid, ts


def reference_select(records: Sequence[bytes], mask: Iterable[bool]) -> bytes:
    return b"".join(r for r, keep in zip(records, mask, strict=True) if keep)


def random_pieces(data: bytes, rng: np.random.Generator, max_piece: int) -> list[bytes]:
    out = []
    pos = 0
    while pos < len(data):
        n = int(rng.integers(1, max_piece + 1))
        out.append(data[pos : pos + n])
        pos += n
    return out


# --- sessions -------------------------------------------------------------------------

CHALLENGE = "AbCdEfGhIjKlMnOpQrStUvWxYz012345"
PY_AUTH = (
    b"auth=" + b"a" * 64 + b"-00000|dataset=GLBX.MDP3|encoding=dbn|ts_out=0|"
    b"compression=none|client=Databento/0.88.0 Python/3.11.7 Linux/6.18.44\n"
)


def new_session(
    limits: LimitsConfig | None = None,
    now: float = 0.0,
    challenge: str = CHALLENGE,
    version: str = "0.1.0",
) -> Session:
    return Session(challenge=challenge, version=version, limits=limits or LimitsConfig(), now=now)


def authed_session(
    limits: LimitsConfig | None = None, now: float = 0.0, auth_line: bytes = PY_AUTH
) -> Session:
    """A session past ``success=1`` with its output drained."""
    s = new_session(limits, now)
    events = s.receive_data(auth_line, now)
    assert len(events) == 1, events
    s.accept(7)
    s.data_to_send()
    return s
