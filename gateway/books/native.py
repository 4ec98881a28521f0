"""The native order books: a book per (instrument_id, publisher_id), built from DBN v3 MBO
records one chunk per C call, with the derived trades / mbp-1 / mbp-10 records built while
applying (design17.md). The rules are those of gateway/books/reference.py, the pure-Python
oracle this engine is tested against (tests/unit/test_books_native.py); among them, an
F_TOB add (top-of-book venues) is not indexed by its order_id and not counted in its level.

The C code (gateway/books/_native/books.c) is compiled by cffi at ``pip install -e .``
(``make install``). It reads records in place and never past the chunk: a record whose
length byte is under 16 bytes or runs past the end stops the walk (``Derived.error``); the
records before it are applied.

cffi releases the GIL during each call, and an engine holds no lock: use one engine from one
thread at a time. The buffers a call returns are copied into ``bytes``.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Final

try:
    from gateway.books._native._books import ffi, lib
except ImportError as exc:  # pragma: no cover - depends on the build
    raise ImportError(
        "gateway.books.native: the C order-book engine (gateway/books/_native) is not built; "
        "build it with `make install` (pip install -e .), which needs a C compiler and the "
        f"Python headers ({exc})"
    ) from exc

__all__ = [
    "WANT_MBP1",
    "WANT_MBP10",
    "WANT_TRADES",
    "BookStats",
    "Derived",
    "NativeBooks",
]

WANT_MBP1: Final = 1
WANT_MBP10: Final = 2
WANT_TRADES: Final = 4
_WANT_ALL: Final = WANT_MBP1 | WANT_MBP10 | WANT_TRADES

_ERR_SHORT: Final = 1
_ERR_OVERRUN: Final = 2
_ERR_NOMEM: Final = 3
_U32_MAX: Final = (1 << 32) - 1


@dataclass(frozen=True)
class Derived:
    """The derived records one chunk built (each field: whole records, back to back)."""

    mbp1: bytes
    mbp1_count: int
    mbp10: bytes
    mbp10_count: int
    trades: bytes
    trades_count: int
    #: None, or why the walk stopped before the end of the chunk (the records before
    #: ``consumed`` were applied; the rest of the chunk was not)
    error: str | None = None
    #: bytes of whole records walked
    consumed: int = 0


@dataclass(frozen=True)
class BookStats:
    books: int
    orders: int
    levels: int
    memory_bytes: int
    records_applied: int
    unknown_cancels: int


def _copy(ptr: Any, length: int) -> bytes:
    return bytes(ffi.buffer(ptr, length)) if length else b""


class NativeBooks:
    """Every (instrument_id, publisher_id) book of one feed, in C."""

    def __init__(self) -> None:
        handle = lib.nb_new()
        if handle == ffi.NULL:
            raise MemoryError("native books: out of memory")
        self._handle: Any = ffi.gc(handle, lib.nb_free)
        self._result: Any = ffi.new("nb_result *")

    def _engine(self) -> Any:
        if self._handle is None:
            raise ValueError("native books: closed")
        return self._handle

    def apply(self, data: bytes | memoryview, want: int = 0) -> Derived:
        """Apply every 56-byte MBO record (rtype 0xA0) of a chunk of whole DBN v3 records,
        skipping other records; build the derived records ``want`` asks for."""
        engine = self._engine()
        if want & ~_WANT_ALL:
            raise ValueError(f"native books: unknown want bits {want & ~_WANT_ALL:#x}")
        n = len(data) if isinstance(data, bytes) else data.nbytes
        buf = ffi.from_buffer("uint8_t[]", data) if n else ffi.NULL
        res = self._result
        rc = int(lib.nb_apply(engine, buf, n, want, res))
        consumed = int(res.consumed)
        if rc == _ERR_NOMEM:
            raise MemoryError(f"native books: out of memory at chunk offset {consumed}")
        error: str | None = None
        if rc == _ERR_SHORT:
            error = f"record at offset {consumed} is shorter than a record header"
        elif rc == _ERR_OVERRUN:
            error = f"record at offset {consumed} runs past the end of the chunk"
        return Derived(
            mbp1=_copy(res.mbp1, int(res.mbp1_len)),
            mbp1_count=int(res.mbp1_count),
            mbp10=_copy(res.mbp10, int(res.mbp10_len)),
            mbp10_count=int(res.mbp10_count),
            trades=_copy(res.trades, int(res.trades_len)),
            trades_count=int(res.trades_count),
            error=error,
            consumed=consumed,
        )

    def snapshot(self, instrument_ids: Collection[int] | None, ts_recv: int) -> tuple[bytes, int]:
        """(records, count) rebuilding every book of those instruments (None: every book),
        books in (instrument_id, publisher_id) order: an R record, then an A per resting
        order (bids, then asks: the side's top-of-book order first, flagged F_TOB as well,
        since on replay it replaces its side; then best level first, each level in queue
        priority), all flagged F_SNAPSHOT|F_BAD_TS_RECV with ``ts_recv``, F_LAST on each
        book's last one."""
        engine = self._engine()
        if instrument_ids is None:
            ids: list[int] = []
        else:
            ids = [int(i) for i in instrument_ids if 0 <= int(i) <= _U32_MAX]
            if not ids:
                return b"", 0
        arr = ffi.new("uint32_t[]", ids) if ids else ffi.NULL
        out = ffi.new("const uint8_t **")
        out_len = ffi.new("size_t *")
        count = ffi.new("uint64_t *")
        rc = int(
            lib.nb_snapshot(
                engine,
                arr,
                len(ids),
                1 if instrument_ids is None else 0,
                ts_recv,
                out,
                out_len,
                count,
            )
        )
        if rc != 0:
            raise MemoryError("native books: out of memory building a snapshot")
        return _copy(out[0], int(out_len[0])), int(count[0])

    def stats(self) -> BookStats:
        s = ffi.new("nb_stats *")
        lib.nb_get_stats(self._engine(), s)
        return BookStats(
            books=int(s.books),
            orders=int(s.orders),
            levels=int(s.levels),
            memory_bytes=int(s.memory_bytes),
            records_applied=int(s.records_applied),
            unknown_cancels=int(s.unknown_cancels),
        )

    def levels(
        self, instrument_id: int, publisher_id: int, side: str, depth: int
    ) -> list[tuple[int, int, int]]:
        """The best ``depth`` levels of a side ('B' or 'A'): (price, total size, count); the
        count leaves out a top-of-book (F_TOB) order, its size counts."""
        engine = self._engine()
        if side not in ("B", "A") or depth <= 0 or not _valid_key(instrument_id, publisher_id):
            return []
        depth = min(depth, self.stats().levels)  # no bigger buffer than the books need
        if depth == 0:
            return []
        out = ffi.new("nb_level_out[]", depth)
        n = int(lib.nb_levels(engine, instrument_id, publisher_id, side.encode(), depth, out))
        return [(int(out[i].price), int(out[i].size), int(out[i].count)) for i in range(n)]

    def orders(
        self, instrument_id: int, publisher_id: int
    ) -> list[tuple[int, str, int, int, int, int]]:
        """The resting orders in snapshot order (a side's top-of-book order first): (order_id,
        side, price, size, ts_event, sequence)."""
        engine = self._engine()
        if not _valid_key(instrument_id, publisher_id):
            return []
        n = int(lib.nb_order_count(engine, instrument_id, publisher_id))
        if n == 0:
            return []
        out = ffi.new("nb_order_out[]", n)
        n = int(lib.nb_orders(engine, instrument_id, publisher_id, out, n))
        return [
            (
                int(o.order_id),
                o.side.decode("ascii"),
                int(o.price),
                int(o.size),
                int(o.ts_event),
                int(o.sequence),
            )
            for o in (out[i] for i in range(n))
        ]

    def close(self) -> None:
        """Free the books (idempotent); any later call raises ValueError."""
        if self._handle is not None:
            ffi.release(self._handle)
            self._handle = None


def _valid_key(instrument_id: int, publisher_id: int) -> bool:
    return 0 <= instrument_id <= _U32_MAX and 0 <= publisher_id <= 0xFFFF
