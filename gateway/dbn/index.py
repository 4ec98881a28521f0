"""The hot path: ``ChunkIndex``/``index_records`` (numpy header index of a chunk of
whole records), ``stamp_ts_out`` (the ts_out variant of a chunk) and ``header_at``."""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

import numpy as np
import numpy.typing as npt

from gateway.dbn.records import HEADER_LEN
from gateway.errors import DbnError

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


def header_at(buf: bytes | memoryview, offset: int = 0) -> tuple[int, int, int, int, int]:
    """(length in bytes, rtype, publisher_id, instrument_id, ts_event) of one record."""
    length, rtype, publisher_id, instrument_id, ts_event = _HEADER.unpack_from(buf, offset)
    return length * 4, rtype, publisher_id, instrument_id, ts_event
