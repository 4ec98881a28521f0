"""One feed's order books: built from its MBO records chunk by chunk, read by snapshots,
and the source of the schemas derived from MBO.

The Feed calls :meth:`FeedBooks.on_chunk` with every chunk it has fanned out. One native
call per chunk applies its MBO records to the books (gateway/books/native.py) and, for the
derived schemas someone subscribes to, builds their records as it goes; each derived
schema's records then go through the same fan-out as one chunk of their own, so sessions
that asked for the same thing share one buffer as for any chunk. Nothing is built for a
schema nobody subscribes to.

* **Publisher first.** A schema the feed's own source sends (its rtype seen in the feed)
  is never derived again for that feed: the publisher's records win.
* **tbbo** shares rtype 0x01 with mbp-1: derived tbbo chunks are indexed under
  :data:`TBBO_KEY` (no real rtype) so the fan-out tells the two apart.
* **Intervals** (bbo-1s/1m, ohlcv-*) are built in numpy from the chunk's mbp-1 records
  (every BBO change and every trade) and emitted once the feed has shown a record at or
  past the interval's end (no timer).
* **Snapshots** are read between two chunks: what a session is sent next is exactly the
  chunk after the snapshot point.
* **A bound**: past ``max_orders`` resting orders the feed's books are dropped (the engine
  closed, memory freed); snapshots and derived schemas then answer that books are off.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Protocol

import numpy as np
import numpy.typing as npt

from gateway import dbn
from gateway.dbn import ChunkIndex

if TYPE_CHECKING:
    from gateway.fanout import FanOut

__all__ = [
    "DERIVED_RTYPES",
    "DERIVED_SCHEMAS",
    "INTERVAL_SCHEMAS",
    "RTYPE_MBO",
    "TBBO_KEY",
    "MBO_LEN",
    "BooksUnavailable",
    "FeedBooks",
    "SnapshotTooLarge",
    "SnapshotUnverified",
]

log = logging.getLogger("gateway.books")

RTYPE_MBO: Final = 0xA0
#: the fan-out key of derived tbbo records (their bytes say 0x01, like mbp-1's): a value no
#: DBN record type uses
TBBO_KEY: Final = 0xE1
#: derived schema -> the rtype its records are selected by in the fan-out
DERIVED_RTYPES: Final[dict[str, int]] = {
    "trades": 0x00,
    "mbp-1": 0x01,
    "mbp-10": 0x0A,
    "tbbo": TBBO_KEY,
    "bbo-1s": 0xC3,
    "bbo-1m": 0xC4,
    "ohlcv-1s": 0x20,
    "ohlcv-1m": 0x21,
    "ohlcv-1h": 0x22,
    "ohlcv-1d": 0x23,
}
DERIVED_SCHEMAS: Final = frozenset(DERIVED_RTYPES)
INTERVAL_SCHEMAS: Final = frozenset(
    ("bbo-1s", "bbo-1m", "ohlcv-1s", "ohlcv-1m", "ohlcv-1h", "ohlcv-1d")
)
#: a publisher's record of one of these rtypes means it sends that schema itself
_SENT_BY_RTYPE: Final[dict[int, str]] = {
    rt: schema for schema, rt in DERIVED_RTYPES.items() if schema != "tbbo"
}
_TS_RECV_AT: Final = 40  # ts_recv in an MBO record
_ACTION_AT: Final = 38
_CLEAR: Final = ord("R")
MBO_LEN: Final = 56


class BooksUnavailable(Exception):
    """The feed has no books: off in the config, dropped past ``max_orders``, or the
    native engine could not load."""


class SnapshotTooLarge(Exception):
    def __init__(self, records: int, limit: int) -> None:
        super().__init__(
            f"the snapshot would hold {records} records, more than books.max_snapshot_records="
            f"{limit}: subscribe with snapshot=1 to fewer instruments"
        )


class SnapshotUnverified(Exception):
    def __init__(self, books: int) -> None:
        super().__init__(
            f"{books} of the books asked for were not seen from a clear record (R) since the "
            "gateway started, so they may lack orders that rested before; the feed's next "
            "clear of those books makes them whole (books.snapshot_requires_clear = false "
            "serves books as held)"
        )


class Intervals(Protocol):
    def feed(self, mbp1: bytes | memoryview, count: int, max_ts_recv: int) -> tuple[bytes, int]: ...


class Engine(Protocol):
    def apply(self, data: bytes | memoryview, want: int = 0) -> object: ...

    def snapshot(
        self, instrument_ids: Collection[int] | None, ts_recv: int
    ) -> tuple[bytes, int]: ...

    def stats(self) -> object: ...

    def close(self) -> None: ...


@dataclass
class BooksCounters:
    """What /metrics and /status.json show of one feed's books."""

    books: int = 0
    orders: int = 0
    levels: int = 0
    memory_bytes: int = 0
    records_applied: int = 0
    unknown_cancels: int = 0
    apply_seconds: float = 0.0
    chunks: int = 0
    #: derived records built, per schema
    derived: dict[str, int] = field(default_factory=dict)
    snapshots: int = 0
    snapshot_records: int = 0
    snapshot_seconds: float = 0.0
    #: why the books are off ("" while they are on)
    off_reason: str = ""
    #: schemas the publisher sends itself (never derived)
    published: set[str] = field(default_factory=set)


class FeedBooks:
    def __init__(
        self,
        dataset: str,
        fanout: FanOut,
        *,
        derive: bool = True,
        max_orders: int = 20_000_000,
        max_snapshot_records: int = 250_000,
        require_clear: bool = True,
        engine: Engine | None = None,
    ) -> None:
        self.dataset = dataset
        self.fanout = fanout
        self.derive = derive
        self.max_orders = max_orders
        self.max_snapshot_records = max_snapshot_records
        self.counters = BooksCounters()
        if engine is None:
            from gateway.books.native import NativeBooks

            engine = NativeBooks()
        self._engine: Engine | None = engine
        self._intervals: dict[str, Intervals] = {}
        #: require_clear: a snapshot is only of books seen from a clear (R) record
        self.require_clear = require_clear
        #: (instrument_id, publisher_id) of the books seen from a clear record
        self._cleared: set[tuple[int, int]] = set()
        #: interval schemas whose builder started mid-interval: that interval's index
        #: (its start // length), never emitted (it missed the records before the start)
        self._partial_until: dict[str, int] = {}
        #: the feed's last MBO chunk (where an interval schema's first builder starts)
        self._last_mbo: ChunkIndex | None = None
        self._saw_mbo = False

    # --- state ----------------------------------------------------------------------------

    @property
    def on(self) -> bool:
        return self._engine is not None

    def derives(self, schema: str) -> bool:
        """True when this feed would derive ``schema`` for a subscriber."""
        return (
            self.derive
            and self._engine is not None
            and schema in DERIVED_SCHEMAS
            and schema not in self.counters.published
        )

    def close(self, reason: str = "closed") -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.close()
            self.counters.off_reason = reason
            self.counters.books = self.counters.orders = self.counters.levels = 0
            self.counters.memory_bytes = 0

    # --- the data path ---------------------------------------------------------------------

    def on_chunk(self, index: ChunkIndex) -> None:
        """Apply one published chunk; publish the derived records subscribers want."""
        engine = self._engine
        if engine is None:
            return
        present = index.rtype_set
        if self.derive and present & _SENT_BY_RTYPE.keys():
            self._publisher_sends(present)
        if RTYPE_MBO not in present:
            if self._intervals and self._saw_mbo:
                self._close_intervals(_max_ts_recv(index))
            return
        self._saw_mbo = True
        wanted = self._wanted() if self.derive else frozenset()
        want = _want_bits(wanted, bool(self._intervals))
        started = time.perf_counter()
        try:
            derived = engine.apply(index.data, want)
        except MemoryError as exc:
            log.error("feed %s: order books off: %s", self.dataset, exc)
            self.close("out of memory")
            return
        error = getattr(derived, "error", None)
        if error:  # the feed validated its chunks: a bug, said loudly, books kept
            log.error("feed %s: order books skipped part of a chunk: %s", self.dataset, error)
        self._note_clears(index)
        c = self.counters
        c.apply_seconds += time.perf_counter() - started
        c.chunks += 1
        self._read_stats(engine)
        if c.orders > self.max_orders:
            log.error(
                "feed %s: books hold %d resting orders, over books.max_orders=%d: books off "
                "for this feed (snapshots and derived schemas refused)",
                self.dataset,
                c.orders,
                self.max_orders,
            )
            self.close(f"over books.max_orders={self.max_orders}")
            return
        if wanted or self._intervals:
            self._publish_derived(derived, wanted, _max_ts_recv(index))
        self._last_mbo = index

    def rebuild(self, pieces: Iterable[bytes]) -> int:
        """Apply MBO records (whole 56-byte records, in feed order: the journal's) without
        deriving or publishing anything: the books as the feed left them before a restart.
        The records applied."""
        engine = self._engine
        if engine is None:
            return 0
        applied = 0
        for piece in pieces:
            try:
                engine.apply(piece, 0)
            except MemoryError as exc:
                log.error("feed %s: order books off: %s", self.dataset, exc)
                self.close("out of memory")
                return applied
            self._cleared.update(_clear_keys(np.frombuffer(piece, np.uint8).reshape(-1, MBO_LEN)))
            applied += len(piece) // MBO_LEN
        self._read_stats(engine)
        if self.counters.orders > self.max_orders:
            self.close(f"over books.max_orders={self.max_orders}")
        return applied

    def _note_clears(self, index: ChunkIndex) -> None:
        """Books seen from a clear record (``R``: the venue's book starts, or is recovered)
        since the gateway started: only those are known to hold every resting order."""
        if index.rows is not None and index.record_len == MBO_LEN:
            rows = index.rows
        else:  # a mixed chunk: gather the rows of its clear records only
            buf = np.frombuffer(index.data, np.uint8)
            pos = index.offsets[index.rtypes == RTYPE_MBO]
            pos = pos[buf[pos + _ACTION_AT] == _CLEAR]
            if not pos.size:
                return
            rows = buf[pos[:, None] + np.arange(MBO_LEN)]
        self._cleared.update(_clear_keys(rows))

    def _publisher_sends(self, present: frozenset[int]) -> None:
        for rtype in present & _SENT_BY_RTYPE.keys():
            schema = _SENT_BY_RTYPE[rtype]
            if schema in self.counters.published:
                continue
            self.counters.published.add(schema)
            if rtype == 0x01:
                self.counters.published.add("tbbo")
            log.info(
                "feed %s: the publisher sends %s itself: not derived from MBO for this feed",
                self.dataset,
                schema,
            )

    def _wanted(self) -> frozenset[str]:
        keys = self.fanout.rtype_keys()
        return frozenset(
            s for s, rt in DERIVED_RTYPES.items() if rt in keys and s not in self.counters.published
        )

    def _publish_derived(self, derived: object, wanted: frozenset[str], upto: int) -> None:
        mbp1: bytes = getattr(derived, "mbp1", b"")
        parts: list[tuple[str, bytes]] = []
        if "trades" in wanted:
            parts.append(("trades", getattr(derived, "trades", b"")))
        if "mbp-1" in wanted:
            parts.append(("mbp-1", mbp1))
        if "mbp-10" in wanted:
            parts.append(("mbp-10", getattr(derived, "mbp10", b"")))
        if "tbbo" in wanted and mbp1:
            parts.append(("tbbo", _trades_of_mbp1(mbp1)))
        if self._intervals or wanted & INTERVAL_SCHEMAS:
            for schema in sorted(wanted & INTERVAL_SCHEMAS - self._intervals.keys()):
                self._start_intervals(schema)
            for schema, builder in self._intervals.items():
                data, _ = builder.feed(mbp1, len(mbp1) // 80, upto)
                if schema in wanted:
                    parts.append((schema, self._whole_intervals(schema, data)))
        for schema, data in parts:
            if data:
                self._fan(schema, data)

    def _close_intervals(self, upto: int) -> None:
        wanted = self._wanted()
        for schema, builder in self._intervals.items():
            data, _ = builder.feed(b"", 0, upto)
            if data and schema in wanted:
                self._fan(schema, self._whole_intervals(schema, data))

    def _start_intervals(self, schema: str) -> None:
        """An interval schema's first subscriber: its builder starts now and is fed every
        chunk from then on (subscribers come and go; its state must not have holes). The
        interval in progress has missed what came before: it is never emitted."""
        from gateway.books.intervals import IntervalBuilder

        builder = self._intervals[schema] = IntervalBuilder(schema)
        # the interval in progress, keyed as the builder keys intervals (bbo: by its end)
        last = self._last_mbo
        self._partial_until[schema] = builder.key(_max_ts_recv(last)) if last is not None else -1

    def _whole_intervals(self, schema: str, data: bytes) -> bytes:
        """``data`` without the records of the interval its builder started in."""
        upto = self._partial_until.get(schema, -1)
        if upto < 0 or not data:
            return data
        from gateway.books.intervals import INTERVALS

        rtype, length, is_bbo = INTERVALS[schema]
        size, at = (80, 32) if is_bbo else (56, 8)  # bbo: ts_recv = its end; ohlcv: ts_event
        rows = np.frombuffer(data, np.uint8).reshape(-1, size)
        ts = rows[:, at : at + 8].copy().view("<u8").ravel()
        keep = ts // length > upto  # bbo: its key is its end; ohlcv: its start
        if keep.all():
            del self._partial_until[schema]  # past the partial interval for good
            return data
        kept: bytes = rows[keep].tobytes()
        return kept

    def _fan(self, schema: str, data: bytes) -> None:
        sub, _ = dbn.index_records(data)
        if sub.count == 0:
            return
        if schema == "tbbo":
            sub = dataclasses.replace(
                sub, rtypes=np.full(sub.count, TBBO_KEY, np.uint8), _rtype_set=None
            )
        c = self.counters
        c.derived[schema] = c.derived.get(schema, 0) + sub.count
        self.fanout.publish(sub)

    def _read_stats(self, engine: Engine) -> None:
        st = engine.stats()
        c = self.counters
        c.books = int(getattr(st, "books", 0))
        c.orders = int(getattr(st, "orders", 0))
        c.levels = int(getattr(st, "levels", 0))
        c.memory_bytes = int(getattr(st, "memory_bytes", 0))
        c.records_applied = int(getattr(st, "records_applied", 0))
        c.unknown_cancels = int(getattr(st, "unknown_cancels", 0))

    # --- snapshots -----------------------------------------------------------------------

    def whole_books(self) -> int:
        """Books seen from a clear record since the start (a snapshot may be taken of them)."""
        return len(self._cleared)

    def _not_cleared(self, data: bytes) -> int:
        """How many books of a snapshot were never seen from a clear record."""
        # each book's snapshot starts with its R
        keys = _clear_keys(np.frombuffer(data, np.uint8).reshape(-1, MBO_LEN))
        return sum(1 for key in keys if key not in self._cleared)

    def snapshot(self, instrument_ids: Collection[int] | None, now_ns: int) -> tuple[bytes, int]:
        """The snapshot records of those instruments' books (None: every book) as they
        stand between two chunks; BooksUnavailable when the feed has no books."""
        engine = self._engine
        if engine is None:
            raise BooksUnavailable(self.counters.off_reason or "books are off")
        c = self.counters
        limit = self.max_snapshot_records
        if instrument_ids is None and c.orders + c.books > limit:
            raise SnapshotTooLarge(c.orders + c.books, limit)
        started = time.perf_counter()
        data, count = engine.snapshot(instrument_ids, now_ns)
        if count > limit:
            raise SnapshotTooLarge(count, limit)
        if self.require_clear and data:
            unseen = self._not_cleared(data)
            if unseen:
                raise SnapshotUnverified(unseen)
        c.snapshots += 1
        c.snapshot_records += count
        c.snapshot_seconds += time.perf_counter() - started
        return data, count


def _want_bits(wanted: frozenset[str], intervals: bool) -> int:
    from gateway.books.native import WANT_MBP1, WANT_MBP10, WANT_TRADES

    want = 0
    if "trades" in wanted:
        want |= WANT_TRADES
    if "mbp-10" in wanted:
        want |= WANT_MBP10
    if wanted & ({"mbp-1", "tbbo"} | INTERVAL_SCHEMAS) or intervals:
        want |= WANT_MBP1
    return want


def _trades_of_mbp1(mbp1: bytes) -> bytes:
    """The mbp-1 records whose action is T: tbbo (the BBO after a trade is the one before)."""
    rows = np.frombuffer(mbp1, np.uint8).reshape(-1, 80)
    picked: bytes = rows[rows[:, 28] == ord("T")].tobytes()
    return picked


def _clear_keys(rows: npt.NDArray[np.uint8]) -> list[tuple[int, int]]:
    """(instrument_id, publisher_id) of the clear (R) MBO records among 56-byte rows."""
    heads = rows[(rows[:, 1] == RTYPE_MBO) & (rows[:, _ACTION_AT] == _CLEAR)]
    iids = heads[:, 4:8].copy().view("<u4").ravel().tolist()
    pubs = heads[:, 2:4].copy().view("<u2").ravel().tolist()
    return list(zip(iids, pubs, strict=True))


def _max_ts_recv(index: ChunkIndex) -> int:
    """The latest ts_recv of a chunk's MBO records, else its latest ts_event."""
    if index.rows is not None and index.record_len == 56 and RTYPE_MBO in index.rtype_set:
        recv = index.rows[:, _TS_RECV_AT : _TS_RECV_AT + 8].copy().view("<u8")
        return int(recv.max())
    return int(index.ts_events.max()) if index.count else 0
