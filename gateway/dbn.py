"""DBN v3 on the wire: record headers, chunk indexes, Metadata and gateway records.

Hot-path rule: market records are never turned into Python objects. A chunk of whole
records is indexed with numpy (one vectorised pass when every record has the same
length, which is what real feeds send in bursts; a header walk otherwise) and variants
are cut from it with numpy gathers. ``databento_dbn`` is used only for the Metadata
header and the gateway's own per-session records (SystemMsg, ErrorMsg, SymbolMappingMsg).

Record header (16 bytes, little-endian): u8 length in 4-byte words (ts_out included),
u8 rtype, u16 publisher_id, u32 instrument_id, u64 ts_event.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final, cast

import databento_dbn as dbn
import numpy as np
import numpy.typing as npt

from gateway.errors import DbnError

__all__ = [
    "DBN_VERSION",
    "GATEWAY_RTYPES",
    "HEADER_LEN",
    "RTYPE_DEF",
    "RTYPE_ERROR",
    "RTYPE_SYMBOL_MAPPING",
    "RTYPE_SYSTEM",
    "SCHEMAS",
    "SCHEMA_RTYPE",
    "STYPE_INSTRUMENT_ID",
    "STYPE_RAW_SYMBOL",
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
    "index_records",
    "stamp_ts_out",
]

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
SCHEMA_BY_NUMBER: Final = {num: name for name, (num, _) in SCHEMAS.items()}
#: Every rtype a v3 client decodes (a feed record with another rtype is refused).
KNOWN_RTYPES: Final = frozenset(SCHEMA_RTYPE.values()) | GATEWAY_RTYPES | {0x11}

#: The smallest valid size in bytes of each rtype's record, per DBN version. A record
#: shorter than its rtype's struct makes every official client panic on it ("Malformed
#: ... record"), so a feed record is checked against this before anyone sees it; longer
#: records are allowed (later versions append fields; ts_out adds 8 bytes). v1 and v2
#: differ from v3 in InstrumentDefMsg, StatMsg and the gateway records. 0x11 is the
#: deprecated OHLCV rtype, read as an OHLCVMsg.
_V3_SIZES: Final = {
    0x00: 48,  # trades
    0x01: 80,  # mbp-1 / tbbo
    0x0A: 368,  # mbp-10
    0x11: 56,
    RTYPE_STATUS: 40,
    RTYPE_DEF: 520,
    0x14: 112,  # imbalance
    RTYPE_ERROR: 320,
    RTYPE_SYMBOL_MAPPING: 176,
    RTYPE_SYSTEM: 320,
    0x18: 80,  # statistics
    0x20: 56,
    0x21: 56,
    0x22: 56,
    0x23: 56,
    0x24: 56,  # ohlcv-*
    0xA0: 56,  # mbo
    0xB1: 80,  # cmbp-1
    0xC0: 80,
    0xC1: 80,
    0xC2: 80,
    0xC3: 80,
    0xC4: 80,  # cbbo, tcbbo, bbo
}
_OLD_SIZES: Final = {
    1: {RTYPE_DEF: 360, 0x18: 64, RTYPE_ERROR: 80, RTYPE_SYMBOL_MAPPING: 80, RTYPE_SYSTEM: 80},
    2: {RTYPE_DEF: 400, 0x18: 64},
}


def _size_table(version: int) -> npt.NDArray[np.int64]:
    """rtype -> minimum record size in bytes (0: an rtype this version does not have)."""
    table = np.zeros(256, dtype=np.int64)
    for rtype, size in {**_V3_SIZES, **_OLD_SIZES.get(version, {})}.items():
        table[rtype] = size
    return table


MIN_RECORD_SIZE: Final = {version: _size_table(version) for version in (1, 2, 3)}


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


# databento_dbn's stubs type its enum members as plain values; name them once here.
_STYPE_INSTRUMENT_ID: Any = dbn.SType.INSTRUMENT_ID
_STYPE_RAW_SYMBOL: Any = dbn.SType.RAW_SYMBOL
_UPGRADE_TO_V3: Any = dbn.VersionUpgradePolicy.UPGRADE_TO_V3


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


# --- chunk index ---------------------------------------------------------------------

_U8: Final = np.dtype(np.uint8)
_HEADER_DTYPE: Final = np.dtype(
    [
        ("length", "u1"),
        ("rtype", "u1"),
        ("publisher_id", "<u2"),
        ("instrument_id", "<u4"),
        ("ts_event", "<u8"),
    ]
)
_HEADER = struct.Struct("<BBHIQ")


@dataclass(eq=False)
class ChunkIndex:
    """Where each record of a chunk of whole records starts, and its header fields.

    ``rows`` is set when every record has the same length (``record_len``): then the
    chunk is viewed as a 2-D uint8 array and every variant is a numpy gather.
    """

    data: memoryview
    count: int
    record_len: int
    rtypes: npt.NDArray[np.uint8]
    instrument_ids: npt.NDArray[np.uint32]
    ts_events: npt.NDArray[np.uint64]
    offsets: npt.NDArray[np.int64]
    lengths: npt.NDArray[np.int64]
    rows: npt.NDArray[np.uint8] | None = None
    _rtype_set: frozenset[int] | None = field(default=None, repr=False)
    _by_instrument: (
        tuple[
            npt.NDArray[np.int64],
            npt.NDArray[np.uint32],
            npt.NDArray[np.int64],
            npt.NDArray[np.int64],
        ]
        | None
    ) = field(default=None, repr=False)
    _ranges: dict[int, tuple[int, int]] | None = field(default=None, repr=False)

    @property
    def nbytes(self) -> int:
        return len(self.data)

    @property
    def rtype_set(self) -> frozenset[int]:
        if self._rtype_set is None:
            if self.count and bool((self.rtypes == self.rtypes[0]).all()):
                self._rtype_set = frozenset((int(self.rtypes[0]),))
            else:
                self._rtype_set = frozenset(int(r) for r in np.unique(self.rtypes))
        return self._rtype_set

    def _instrument_table(
        self,
    ) -> tuple[
        npt.NDArray[np.int64], npt.NDArray[np.uint32], npt.NDArray[np.int64], npt.NDArray[np.int64]
    ]:
        if self._by_instrument is None:
            order = np.argsort(self.instrument_ids, kind="stable")
            ids = self.instrument_ids[order]
            first = np.empty(len(ids), dtype=np.bool_)
            first[:1] = True
            np.not_equal(ids[1:], ids[:-1], out=first[1:])
            starts = np.flatnonzero(first)
            counts = np.diff(starts, append=len(ids))
            self._by_instrument = (order, ids[starts], starts, counts)
        return self._by_instrument

    def instrument_ranges(self) -> dict[int, tuple[int, int]]:
        """instrument_id -> (start, count) of its records in ``instrument_order()`` (built
        once per chunk and shared by every filtered group: a group's lookup is then a few
        dict gets)."""
        if self._ranges is None:
            _, uniq, starts, counts = self._instrument_table()
            self._ranges = dict(
                zip(uniq.tolist(), zip(starts.tolist(), counts.tolist(), strict=True), strict=True)
            )
        return self._ranges

    def instrument_order(self) -> npt.NDArray[np.int64]:
        """Positions of the records sorted by instrument_id (stable)."""
        return self._instrument_table()[0]

    def positions_of(self, ids: npt.NDArray[np.uint32]) -> npt.NDArray[np.int64]:
        """Ascending positions of the records whose instrument_id is in ``ids`` (sorted).

        The chunk is sorted by instrument once (lazily, shared by every group); each
        lookup then costs O(len(ids) log n + matches), not O(n) like a full ``isin``.
        """
        order, uniq, starts, counts = self._instrument_table()
        k = np.searchsorted(uniq, ids)
        inside = k < len(uniq)
        k = k[inside]
        k = k[uniq[k] == ids[inside]]
        if k.size == 0:
            return np.zeros(0, dtype=np.int64)
        if k.size == 1:
            first = int(starts[k[0]])
            return order[first : first + int(counts[k[0]])]
        lens = counts[k]
        ends = np.cumsum(lens)
        ranges = np.repeat(starts[k] - ends + lens, lens) + np.arange(int(ends[-1]))
        return np.sort(order[ranges])

    def select(self, picked: npt.NDArray[np.bool_] | npt.NDArray[np.int64]) -> bytes | memoryview:
        """The bytes of the selected records (a boolean mask or ascending positions), in
        order: one gather into a new buffer, handed out as a flat view (no second copy)."""
        if self.rows is not None:
            return self.rows[picked].reshape(-1).data
        # Variable lengths: copy runs of consecutive selected records, not records.
        if picked.dtype == np.bool_:
            picked = np.flatnonzero(picked)
        if picked.size == 0:
            return b""
        breaks = np.flatnonzero(np.diff(picked) != 1)
        run_starts = np.concatenate(([picked[0]], picked[breaks + 1]))
        run_ends = np.concatenate((picked[breaks], [picked[-1]]))
        starts = self.offsets[run_starts]
        ends = self.offsets[run_ends] + self.lengths[run_ends]
        data = self.data
        return b"".join(data[int(s) : int(e)] for s, e in zip(starts, ends, strict=True))


def index_records(buf: bytes | memoryview) -> tuple[ChunkIndex, int]:
    """Index every whole record at the start of ``buf``.

    Returns the index and the number of bytes it covers; a trailing partial record is
    left for the caller to complete. Raises DbnError on a header shorter than 16 bytes.
    """
    view = memoryview(buf).cast("B") if not isinstance(buf, memoryview) else buf
    total = len(view)
    if total == 0:
        return _empty_index(view), 0
    first_len = view[0] * 4
    if first_len < HEADER_LEN:
        raise DbnError(f"record length {first_len} bytes is shorter than its 16-byte header")
    count = total // first_len
    if count:
        arr = np.frombuffer(view, dtype=_U8, count=count * first_len).reshape(count, first_len)
        if bool((arr[:, 0] == view[0]).all()):
            rest = total - count * first_len
            if rest and rest >= 1 and view[count * first_len] * 4 != first_len:
                # A record of another size follows: take the slow path for the whole buffer.
                return _walk(view)
            headers = arr[:, :HEADER_LEN].copy().view(_HEADER_DTYPE).reshape(count)
            offsets = np.arange(count, dtype=np.int64) * first_len
            return (
                ChunkIndex(
                    data=view[: count * first_len],
                    count=count,
                    record_len=first_len,
                    rtypes=headers["rtype"],
                    instrument_ids=headers["instrument_id"],
                    ts_events=headers["ts_event"],
                    offsets=offsets,
                    lengths=np.full(count, first_len, dtype=np.int64),
                    rows=arr,
                ),
                count * first_len,
            )
    return _walk(view)


def _empty_index(view: memoryview) -> ChunkIndex:
    return ChunkIndex(
        data=view[:0],
        count=0,
        record_len=0,
        rtypes=np.zeros(0, np.uint8),
        instrument_ids=np.zeros(0, np.uint32),
        ts_events=np.zeros(0, np.uint64),
        offsets=np.zeros(0, np.int64),
        lengths=np.zeros(0, np.int64),
    )


def _walk(view: memoryview) -> tuple[ChunkIndex, int]:
    offsets: list[int] = []
    total = len(view)
    off = 0
    while off < total:
        length = view[off] * 4
        if length < HEADER_LEN:
            if offsets:
                break  # index the good records before it; the caller sees the rest
            raise DbnError(
                f"record at byte {off} has length {length} bytes, shorter than its header"
            )
        if off + length > total:
            break
        offsets.append(off)
        off += length
    if not offsets:
        return _empty_index(view), 0
    offs = np.asarray(offsets, dtype=np.int64)
    raw = np.frombuffer(view, dtype=_U8, count=off)
    idx = offs[:, None] + np.arange(HEADER_LEN, dtype=np.int64)
    headers = raw[idx].copy().view(_HEADER_DTYPE).reshape(len(offsets))
    lengths = headers["length"].astype(np.int64) * 4
    record_len = int(lengths[0]) if bool((lengths == lengths[0]).all()) else 0
    rows = raw.reshape(len(offsets), record_len) if record_len else None
    return (
        ChunkIndex(
            data=view[:off],
            count=len(offsets),
            record_len=record_len,
            rtypes=headers["rtype"],
            instrument_ids=headers["instrument_id"],
            ts_events=headers["ts_event"],
            offsets=offs,
            lengths=lengths,
            rows=rows,
        ),
        off,
    )


def stamp_ts_out(
    index: ChunkIndex,
    mask: npt.NDArray[np.bool_] | npt.NDArray[np.int64] | None,
    ts_out: int,
) -> bytes:
    """Copy the selected records with an 8-byte send timestamp appended to each and the
    header length raised by 2 words (DBN ``WithTsOut``). One stamp for the whole chunk."""
    stamp = np.frombuffer(struct.pack("<Q", ts_out), dtype=_U8)
    if index.rows is not None:
        rows = index.rows if mask is None else index.rows[mask]
        out = np.empty((rows.shape[0], rows.shape[1] + 8), dtype=_U8)
        out[:, : rows.shape[1]] = rows
        out[:, 0] += 2
        out[:, rows.shape[1] :] = stamp
        return out.tobytes()
    if mask is None:
        picked: Iterable[int] = range(index.count)
    elif mask.dtype == np.bool_:
        picked = np.flatnonzero(mask).tolist()
    else:
        picked = mask.tolist()
    parts = bytearray()
    tail = stamp.tobytes()
    data = index.data
    for i in picked:
        off = int(index.offsets[i])
        length = int(index.lengths[i])
        start = len(parts)
        parts += data[off : off + length]
        parts[start] += 2
        parts += tail
    return bytes(parts)


def stamp_records(records: Iterable[bytes], ts_out: int) -> bytes:
    """ts_out for the gateway's own records (small, per session)."""
    tail = struct.pack("<Q", ts_out)
    out = bytearray()
    for rec in records:
        start = len(out)
        out += rec
        out[start] += 2
        out += tail
    return bytes(out)


# --- DBN stream decoding (files and ingest publishers) -------------------------------


def first_invalid(index: ChunkIndex, version: int = DBN_VERSION) -> tuple[int, str] | None:
    """The position of the first record of ``index`` whose rtype is unknown to DBN
    ``version`` or whose length is shorter than its rtype's struct, with the reason; None
    when every record is valid. Vectorised: a uniform chunk costs one table lookup per
    distinct rtype (the rtype set is cached on the index and reused by the fan-out)."""
    if index.count == 0:
        return None
    table = MIN_RECORD_SIZE[version]
    if index.record_len and _uniform_ok(index.rtype_set, index.record_len, version):
        return None
    need = table[index.rtypes]
    bad = np.flatnonzero((need == 0) | (index.lengths < need))
    if bad.size == 0:
        return None
    i = int(bad[0])
    rtype = int(index.rtypes[i])
    if need[i] == 0:
        return i, f"unknown rtype 0x{rtype:02X}"
    return i, (
        f"rtype 0x{rtype:02X} record of {int(index.lengths[i])} bytes, shorter than "
        f"the {int(need[i])} bytes DBN v{version} requires"
    )


@functools.lru_cache(maxsize=1024)
def _uniform_ok(rtypes: frozenset[int], record_len: int, version: int) -> bool:
    """Every record of these rtypes may be ``record_len`` bytes long (cached: real feeds
    repeat a handful of (rtype set, length) pairs)."""
    table = MIN_RECORD_SIZE[version]
    return all(0 < table[r] <= record_len for r in rtypes)


_FIXED_METADATA_V3: Final = 16 + 2 + 8 + 8 + 8 + 1 + 1 + 1 + 2 + 53  # to schema_def_len


def metadata_mappings(header: bytes | memoryview) -> list[tuple[str, int]] | None:
    """(raw symbol, instrument_id) of each mapping's last interval, read straight from a
    DBN v3 Metadata header (prelude included): tens of ns a mapping, where decoding them
    into Python objects through databento_dbn costs microseconds (a 40,000-symbol header
    held the event loop for 0.4 s). None when the header is not one this reads (the
    caller then uses the decoded Metadata)."""
    buf = memoryview(header)
    try:
        if bytes(buf[:3]) != b"DBN" or buf[3] != DBN_VERSION:
            return None
        body = buf[PRELUDE_LEN:]
        (cstr,) = struct.unpack_from("<H", body, 16 + 2 + 24 + 3)
        (schema_def,) = struct.unpack_from("<I", body, _FIXED_METADATA_V3)
        off = _FIXED_METADATA_V3 + 4 + schema_def
        for _ in range(3):  # symbols, partial, not_found
            (count,) = struct.unpack_from("<I", body, off)
            off += 4 + count * cstr
        (count,) = struct.unpack_from("<I", body, off)
        off += 4
        fast = _one_interval_mappings(body, off, count, cstr)
        if fast is not None:
            return fast
        out: list[tuple[str, int]] = []
        unpack_u32 = struct.Struct("<I").unpack_from
        for _ in range(count):
            raw = bytes(body[off : off + cstr])
            off += cstr
            (intervals,) = unpack_u32(body, off)
            off += 4
            target = b""
            for _ in range(intervals):
                target = bytes(body[off + 8 : off + 8 + cstr])
                off += 8 + cstr
            if off > len(body):
                return None
            symbol = raw.split(b"\0", 1)[0].decode("ascii", "replace").strip()
            iid = target.split(b"\0", 1)[0]
            if intervals and iid.isdigit():
                out.append((symbol, int(iid)))
        return out
    except (struct.error, IndexError):
        return None


def _one_interval_mappings(
    body: memoryview, off: int, count: int, cstr: int
) -> list[tuple[str, int]] | None:
    """The common layout, every mapping with exactly one interval, as one numpy view."""
    size = cstr + 4 + 8 + cstr
    if count == 0 or len(body) - off != count * size:
        return None
    rows = np.frombuffer(body, dtype=np.uint8, count=count * size, offset=off)
    rows = rows.reshape(count, size)
    if not bool((rows[:, cstr : cstr + 4].view("<u4") == 1).all()):
        return None
    raws = rows[:, :cstr].copy().view(f"S{cstr}").reshape(count)
    targets = rows[:, cstr + 12 :].copy().view(f"S{cstr}").reshape(count)
    if not bool(np.char.isdigit(targets).all()):
        return None
    ids = targets.astype(np.uint64)
    if bool((ids > 0xFFFFFFFF).any()):
        return None
    names = [r.decode("ascii", "replace").strip() for r in raws.tolist()]
    return list(zip(names, ids.tolist(), strict=True))


def _is_panic(exc: BaseException) -> bool:
    """A Rust panic inside databento_dbn surfaces as pyo3's PanicException, which derives
    from BaseException (so ``except Exception`` misses it)."""
    return type(exc).__name__ == "PanicException"


class DbnStreamDecoder:
    """Sans-I/O splitter of a DBN byte stream: prelude, Metadata, then whole-record chunks.

    ``feed(data)`` returns the Metadata once (``metadata``) and chunks of whole, valid v3
    records. Every record is checked against its rtype's size (``first_invalid``) before
    it is returned: the valid records before a bad one are returned, ``error`` is set, and
    the stream is over (every later ``feed`` raises it). When a call has no valid record
    to return, it raises ``DbnError`` at once. DBN v1/v2 streams are checked against their
    own version's sizes, then upgraded to v3 through databento_dbn (slow path, per record;
    fine for files, documented for ingest); a panic inside it is a ``DbnError`` too.
    """

    def __init__(self) -> None:
        self.metadata: dbn.Metadata | None = None
        self.mappings: list[tuple[str, int]] | None = None
        self.version = 0
        self._buffer = bytearray()
        self._upgrader: dbn.DBNDecoder | None = None
        self.records_in = 0
        self.bytes_in = 0
        #: set when bad bytes follow good records: the good ones were returned first
        self.error: DbnError | None = None

    def feed(self, data: bytes | memoryview) -> list[ChunkIndex]:
        if self.error is not None:
            raise self.error
        if self.metadata is None:
            self._buffer += data
            if not self._parse_metadata():
                return []
            data = bytes(self._buffer)
            self._buffer.clear()
        elif self._buffer:
            # Complete the partial record: one copy of the read, not two.
            data = bytes(self._buffer) + data
            self._buffer.clear()
        if not data:
            return []
        try:
            index, used = index_records(data)
        except DbnError as exc:
            raise self._fail(f"record at stream byte {self.bytes_in}: {exc}") from None
        problem: str | None = None
        if used < len(data):
            rest = memoryview(data)[used:]
            if rest[0] * 4 < HEADER_LEN:
                problem = (
                    f"record at stream byte {self.bytes_in + used} has length "
                    f"{rest[0] * 4} bytes, shorter than its header"
                )
            else:
                self._buffer += rest
        bad = first_invalid(index, self.version)
        if bad is not None:
            pos, reason = bad
            problem = f"record at stream byte {self.bytes_in + int(index.offsets[pos])}: {reason}"
            self._buffer.clear()
            index, used = index_records(index.data[: int(index.offsets[pos])])
        if problem is not None and index.count == 0:
            raise self._fail(problem)
        if self._upgrader is not None:
            chunks = self._upgrade(index)
        else:
            chunks = [index] if index.count else []
            self.records_in += index.count
        self.bytes_in += used
        if problem is not None:
            self.error = DbnError(problem)
        return chunks

    def _fail(self, problem: str) -> DbnError:
        self.error = DbnError(problem)
        self._buffer.clear()
        return self.error

    @property
    def pending(self) -> int:
        return len(self._buffer)

    def _parse_metadata(self) -> bool:
        buf = self._buffer
        if len(buf) < PRELUDE_LEN:
            if not b"DBN".startswith(bytes(buf[:3])):
                raise self._fail("stream does not start with the DBN magic bytes")
            return False
        if bytes(buf[:3]) != b"DBN":
            raise self._fail("stream does not start with the DBN magic bytes")
        version = buf[3]
        if not 1 <= version <= DBN_VERSION:
            raise self._fail(f"unsupported DBN version {version} (this gateway reads 1 to 3)")
        (length,) = struct.unpack_from("<I", buf, 4)
        if length > 64 * 1024 * 1024:
            raise self._fail(f"Metadata length {length} is implausibly large")
        if len(buf) < PRELUDE_LEN + length:
            return False
        header = bytes(buf[: PRELUDE_LEN + length])
        #: the symbol mappings of a v3 header, read without decoding (see metadata_mappings)
        self.mappings = metadata_mappings(header) if version == DBN_VERSION else None
        try:
            if version == DBN_VERSION:
                self.metadata = dbn.Metadata.decode(header)
            else:
                self._upgrader = dbn.DBNDecoder(upgrade_policy=_UPGRADE_TO_V3)
                self._upgrader.write(header)
                decoded = self._upgrader.decode()
                self.metadata = cast(dbn.Metadata, decoded[0])
        except (ValueError, RuntimeError, dbn.DBNError) as exc:
            raise self._fail(f"invalid DBN Metadata: {_one_line(exc)}") from None
        except BaseException as exc:
            if not _is_panic(exc):
                raise
            raise self._fail(f"invalid DBN Metadata: {_one_line(exc)}") from None
        if self.metadata is not None and self.metadata.ts_out:
            raise self._fail("feeds with ts_out records are not supported yet")
        self.version = version
        del buf[: PRELUDE_LEN + length]
        return True

    def _upgrade(self, index: ChunkIndex) -> list[ChunkIndex]:
        """v1/v2 records, already split and size-checked, upgraded to v3."""
        assert self._upgrader is not None
        if index.count == 0:
            return []
        try:
            self._upgrader.write(bytes(index.data))
            records = self._upgrader.decode()
            blob = b"".join(bytes(r) for r in records if not isinstance(r, dbn.Metadata))
        except (ValueError, RuntimeError, dbn.DBNError) as exc:
            raise self._fail(f"invalid DBN v{self.version} record: {_one_line(exc)}") from None
        except BaseException as exc:
            if not _is_panic(exc):
                raise
            raise self._fail(f"invalid DBN v{self.version} record: {_one_line(exc)}") from None
        if not blob:
            return []
        upgraded, _ = index_records(blob)
        bad = first_invalid(upgraded)
        if bad is not None:
            raise self._fail(f"DBN v{self.version} upgrade produced an invalid record: {bad[1]}")
        self.records_in += upgraded.count
        return [upgraded]


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def header_at(buf: bytes | memoryview, offset: int = 0) -> tuple[int, int, int, int, int]:
    """(length in bytes, rtype, publisher_id, instrument_id, ts_event) of one record."""
    length, rtype, publisher_id, instrument_id, ts_event = _HEADER.unpack_from(buf, offset)
    return length * 4, rtype, publisher_id, instrument_id, ts_event
