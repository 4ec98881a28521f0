"""The journal's on-disk format: file names, index header and rows, symbology rows, and
the filter timestamp of a record.

Per segment directory ``<dataset>/<first seq:010d>/``:

* ``rt-<rtype:02x>.dbn``: the records of one rtype, raw DBN v3, no header, in seq order;
* ``order.bin``: for chunks with more than one rtype, one byte (the rtype) per record;
* ``index.bin``: a 64-byte header, then one 64-byte row per (chunk, rtype part).

Per dataset, ``symbology.bin``: a 16-byte header, then variable-length mapping rows.
Every row carries a crc32 of itself; every index row also the crc32 of its part's bytes.
All integers little-endian.
"""

from __future__ import annotations

import struct
import zlib
from typing import Final

import numpy as np
import numpy.typing as npt

from gateway.dbn import ChunkIndex

__all__ = [
    "BBO_RTYPES",
    "FORMAT_VERSION",
    "INDEX_HEADER",
    "INDEX_HEADER_LEN",
    "ROW",
    "ROW_DTYPE",
    "ROW_LEN",
    "SYM_HEADER",
    "SYM_ROW",
    "TS_RECV_OFFSET",
    "filter_ts",
    "pack_index_header",
    "pack_row",
    "pack_sym_row",
    "parse_index_header",
]

FORMAT_VERSION: Final = 1
INDEX_MAGIC: Final = b"LSGJ"
SYM_MAGIC: Final = b"LSGS"

#: bbo/cbbo rtypes (cbbo-1s, cbbo-1m, bbo-1s, bbo-1m): their filter ts is ts_recv
BBO_RTYPES: Final = frozenset({0xC0, 0xC1, 0xC3, 0xC4})
_BBO_ARRAY: Final = np.array(sorted(BBO_RTYPES), dtype=np.uint8)
#: byte offset of ts_recv in BboMsg/CbboMsg (checked against databento_dbn in the tests)
TS_RECV_OFFSET: Final = 32

# index.bin header: magic, version, row length, segment id (= its first seq), dataset
# (utf-8, NUL padded), crc32 of the bytes before it.
_HEADER_BODY: Final = struct.Struct("<4sHHQ44s")
INDEX_HEADER_LEN: Final = 64
INDEX_HEADER: Final = _HEADER_BODY

# One index row: seq, rtype, nparts, (pad), count, offset, length, crc of the part's bytes,
# min_ts, max_ts, order_off (-1: single rtype), (reserved), crc32 of bytes 0..59.
ROW: Final = struct.Struct("<QBBxxIQIIQQqxxxx")
ROW_LEN: Final = 64
_ROW_CRC: Final = struct.Struct("<I")
ROW_DTYPE: Final = np.dtype(
    {
        "names": [
            "seq",
            "rtype",
            "nparts",
            "pad0",
            "count",
            "offset",
            "length",
            "crc",
            "min_ts",
            "max_ts",
            "order_off",
            "pad1",
            "row_crc",
        ],
        # no gaps (padding is named), so copies keep every byte the row crc covers
        "formats": [
            "<u8",
            "u1",
            "u1",
            "<u2",
            "<u4",
            "<u8",
            "<u4",
            "<u4",
            "<u8",
            "<u8",
            "<i8",
            "<u4",
            "<u4",
        ],
        "offsets": [0, 8, 9, 10, 12, 16, 24, 28, 32, 40, 48, 56, 60],
        "itemsize": ROW_LEN,
    }
)
assert ROW.size + _ROW_CRC.size == ROW_LEN

# symbology.bin: header magic, version, reserved; rows: length of the row (u16), symbol
# length (u16), iid (u32), at_seq (u64), ts (u64), symbol bytes, crc32 of all before it.
SYM_HEADER: Final = struct.Struct("<4sHHQ")
SYM_ROW: Final = struct.Struct("<HHIQQ")


def pack_index_header(segment_id: int, dataset: str) -> bytes:
    name = dataset.encode()[:44]
    body = _HEADER_BODY.pack(INDEX_MAGIC, FORMAT_VERSION, ROW_LEN, segment_id, name)
    return body + bytes(INDEX_HEADER_LEN - len(body) - 4) + _ROW_CRC.pack(zlib.crc32(body))


def parse_index_header(raw: bytes) -> tuple[int, int, str] | None:
    """(version, segment id, dataset) of an index header, or None when it is not one
    (short, wrong magic or crc)."""
    if len(raw) < INDEX_HEADER_LEN:
        return None
    body = raw[: _HEADER_BODY.size]
    magic, version, row_len, segment_id, name = _HEADER_BODY.unpack(body)
    (crc,) = _ROW_CRC.unpack_from(raw, INDEX_HEADER_LEN - 4)
    if magic != INDEX_MAGIC or crc != zlib.crc32(body):
        return None
    if version == FORMAT_VERSION and row_len != ROW_LEN:
        return None
    return version, segment_id, name.rstrip(b"\0").decode(errors="replace")


def pack_row(
    seq: int,
    rtype: int,
    nparts: int,
    count: int,
    offset: int,
    length: int,
    crc: int,
    min_ts: int,
    max_ts: int,
    order_off: int,
) -> bytes:
    body = ROW.pack(seq, rtype, nparts, count, offset, length, crc, min_ts, max_ts, order_off)
    return body + _ROW_CRC.pack(zlib.crc32(body))


def row_crcs(rows: npt.NDArray[np.void]) -> npt.NDArray[np.bool_]:
    """Per row of a ROW_DTYPE array: is its row crc good."""
    raw = rows.view(np.uint8).reshape(len(rows), ROW_LEN)
    good = np.empty(len(rows), dtype=np.bool_)
    stored = rows["row_crc"]
    for i in range(len(rows)):
        good[i] = zlib.crc32(raw[i, : ROW.size].tobytes()) == int(stored[i])
    return good


def pack_sym_row(at_seq: int, ts: int, iid: int, symbol: str) -> bytes:
    name = symbol.encode()[:0xFFFF]
    body = SYM_ROW.pack(SYM_ROW.size + len(name) + 4, len(name), iid, at_seq, ts) + name
    return body + _ROW_CRC.pack(zlib.crc32(body))


def sym_header() -> bytes:
    return SYM_HEADER.pack(SYM_MAGIC, FORMAT_VERSION, 0, 0)


def parse_sym_rows(raw: bytes) -> tuple[list[tuple[int, int, int, str]], int, int | None]:
    """(rows as (at_seq, ts, iid, symbol), bytes of whole good rows incl. the header,
    format version or None when the header is not one)."""
    if len(raw) < SYM_HEADER.size:
        return [], 0, None
    magic, version, _, _ = SYM_HEADER.unpack_from(raw, 0)
    if magic != SYM_MAGIC:
        return [], 0, None
    rows: list[tuple[int, int, int, str]] = []
    off = SYM_HEADER.size
    total = len(raw)
    while off + SYM_ROW.size + 4 <= total:
        row_len, name_len, iid, at_seq, ts = SYM_ROW.unpack_from(raw, off)
        if row_len != SYM_ROW.size + name_len + 4 or off + row_len > total:
            break
        body = raw[off : off + row_len - 4]
        (crc,) = _ROW_CRC.unpack_from(raw, off + row_len - 4)
        if crc != zlib.crc32(body):
            break
        rows.append((at_seq, ts, iid, body[SYM_ROW.size :].decode(errors="replace")))
        off += row_len
    return rows, off, version


def filter_ts(index: ChunkIndex) -> npt.NDArray[np.uint64]:
    """The filter timestamp of every record of a chunk: ts_event, except ts_recv for the
    bbo/cbbo rtypes. Returns ``index.ts_events`` itself when the chunk has no bbo record."""
    if not (index.rtype_set & BBO_RTYPES):
        return index.ts_events
    out = index.ts_events.copy()
    bbo = np.flatnonzero(np.isin(index.rtypes, _BBO_ARRAY))
    raw = np.frombuffer(index.data, dtype=np.uint8)
    at = index.offsets[bbo][:, None] + np.arange(TS_RECV_OFFSET, TS_RECV_OFFSET + 8)
    out[bbo] = raw[at].copy().view("<u8").reshape(len(bbo))
    return out
