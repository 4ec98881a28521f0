"""The reference producer of every schema derived from MBO: one record at a time, in plain
Python (slow, obvious). It is the oracle the native engine (``native.py``) and the numpy
interval builders (``intervals.py``) are tested against; nothing in the data path uses it.

Written from Databento's documented rules (schema pages for mbp-1, mbp-10, tbbo, trades,
bbo and ohlcv; PROTOCOL.md §6.3b; design17.md) on top of ``reference.Books``. Record layouts
are DBN v3 and checked against ``databento_dbn`` in the tests.

What the docs say, and what we do
---------------------------------
* **trades** (TradeMsg, rtype 0x00, 48 B): "every trade event". One per MBO ``T`` record,
  every field copied from it (``depth`` 0). ``F`` fills and ``N`` records make none.
* **mbp-1 / mbp-10** (rtype 0x01 / 0x0A): "every order book event that updates the top price
  level" (the top ten levels) "... this includes every trade". One record per MBO record that
  changed any (price, total size, order count) of the top 1 (top 10) levels of either side
  of its book, and one per ``T``. Header and price, size, action, side, flags, ts_recv,
  ts_in_delta and sequence come from the MBO record; the levels are the book *after* the
  record (an empty level: ``UNDEF_PRICE``, size 0, count 0). A level's order count leaves
  out a top-of-book order (an ``F_TOB`` add: IEX TOPS, NYSE National BBO), which stands for
  the venue's quote, not an order (Databento's limit-order-book example singles out the
  order count for these venues: a top-of-book update is no individual order); its size
  counts. A level holding only it has count 0.
  The docs do not say whether a record is made mid-event (before ``F_LAST``): we make one per
  MBO record, flags copied, so a reader sees ``F_LAST`` where the event ends.
  A record that changes nothing (an ``R`` on an empty book, a cancel of an unknown order, an
  add of size 0, anything below the top N) makes no record.
* **depth** — docs: "the book level where the update event occurred". Ours: the number of
  price levels on the record's side strictly better than the price it touched (0-based rank,
  best first). That number is the same before and after the record, since a record touching
  one price cannot change which prices are better than it. A modify (or an add of an id that
  already rests) touches its old and its new price: the better-ranked of the two (old ranked
  in the book before, new in the book after). ``T``, ``R`` and an ``F_TOB`` add: 0.
* **side** — docs: "Some venues ... publish two-sided BBO changes in a single update. In cases
  like this where the side is indeterminate, we'll also use the side code N." Ours: ``N`` for
  an ``R``, and where the record changed the top N levels of both sides (a modify that moved
  an order across sides); otherwise the MBO record's side. An ``F_TOB`` pair is two MBO
  records, so two derived records, each with its side.
* **tbbo** (rtype 0x01 in DBN v3, Mbp1Msg): "every trade event alongside the BBO immediately
  before the effect of each trade". A ``T`` changes no book (its effect arrives as fills and
  cancels), so tbbo is exactly the mbp-1 records whose action is ``T``.
* **bbo-1s / bbo-1m** (BboMsg, rtype 0xC3 / 0xC4, 80 B): docs: "the last best bid, best offer,
  and sale"; "if no trade or BBO update occurs within the interval, no record is printed";
  the missing half is forward-filled from the previous interval; ``ts_recv`` = "the end
  timestamp of the interval, clamped to the second/minute boundary"; ``ts_event``, price,
  size, side = the last trade (``UNDEF_TIMESTAMP``, ``UNDEF_PRICE``, 0, ``N`` when there
  was none); ``sequence`` = "the sequence number assigned at the venue of the last update".
  Built from the mbp-1 records (every BBO change and every trade, each carrying the BBO after
  it), so the levels are those of the interval's last mbp-1 record. Silent in the docs, our
  choices: ``flags`` and ``sequence`` of the interval's last mbp-1 record (Databento's
  samples show ``F_LAST`` and the snapshot flags there, as a copy would). The interval a
  record falls in is ``(end - len, end]`` (``end`` = ts_recv rounded *up* to the boundary):
  in the GLBX.MDP3 sample, snapshot records at exactly 00:00:00 give a bbo-1s record with
  ts_recv 00:00:00, not 00:00:01. (Design17's "closed once a record at or past its end" is
  therefore "past its end" for bbo; a ts_recv exactly on a boundary is one nanosecond in
  a billion otherwise.)
* **ohlcv-1s/1m/1h/1d** (OhlcvMsg, rtype 0x20..0x23, 56 B): docs: "aggregated from trades";
  ``ts_event`` = "the inclusive start time of the bar aggregation period based on the
  ``ts_recv`` from trade messages"; no record without a trade. Intervals are ``[start,
  start + len)`` by the trade's ts_recv; open = first trade's price, close = last, high/low =
  max/min, volume = sum of sizes (u64). Every ``T`` counts (we cannot know which venue trade
  conditions Databento leaves out; a ``T`` at ``UNDEF_PRICE`` would count as such a price).
  1d is the UTC day (``[00:00, 24:00)`` UTC): PROTOCOL says 1d follows the venue's
  electronic session, which a feed of MBO records does not tell us; both samples' 1d bars
  start at 00:00 UTC.
* **When an interval closes** (there is no timer: documented): once an MBO record with a
  ``ts_recv`` at or past its end (bbo: past its end) has been seen, in any book. Records of
  intervals that close together come ordered by (interval, instrument_id, publisher_id).
  A record whose ts_recv falls in an interval that already closed counts in the earliest
  interval still open (feeds are ts_recv-ordered, so this only guards against bad input).
  ``flush`` (the end of a test stream) closes every interval still open.

The samples under tests/data/dbn/ hold a handful of records per schema and do not share a
starting book: they show record shapes, they cannot check this module end to end.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Final

from gateway.books.reference import F_TOB, RTYPE_MBO, UNDEF_PRICE, Book, Books, Mbo, parse_mbo

__all__ = [
    "INTERVAL_SCHEMAS",
    "SCHEMAS",
    "UNDEF_TIMESTAMP",
    "Deriver",
    "Interval",
    "derive",
    "iter_records",
]

UNDEF_TIMESTAMP: Final = (1 << 64) - 1
SECOND: Final = 1_000_000_000

RTYPE_TRADES: Final = 0x00
RTYPE_MBP1: Final = 0x01
RTYPE_MBP10: Final = 0x0A

# header, price, size, action, side, flags, depth, ts_recv, ts_in_delta, sequence: 48 bytes
_MBP_HEAD: Final = struct.Struct("<BBHIQqIccBBQiI")
# bid_px, ask_px, bid_sz, ask_sz, bid_ct, ask_ct: 32 bytes
_LEVEL: Final = struct.Struct("<qqIIII")
# header, price, size, reserved, side, flags, reserved, ts_recv, reserved(4), sequence: 48
_BBO_HEAD: Final = struct.Struct("<BBHIQqIBcBBQ4xI")
# header, open, high, low, close, volume: 56 bytes
_OHLCV: Final = struct.Struct("<BBHIQqqqqQ")
EMPTY_LEVEL: Final = (UNDEF_PRICE, 0, 0)

Level = tuple[int, int, int]  # price, total size, order count


@dataclass(frozen=True)
class Interval:
    """One interval schema: its rtype, its length and how a ts_recv maps to an interval."""

    schema: str
    rtype: int
    length: int
    #: bbo: intervals are (end - length, end]; ohlcv: [start, start + length)
    end_inclusive: bool

    def key(self, ts: int) -> int:
        """The interval index a ts_recv falls in (bbo: index of its end; ohlcv: of its start)."""
        if self.end_inclusive:
            return -(-ts // self.length)
        return ts // self.length


INTERVAL_SCHEMAS: Final[dict[str, Interval]] = {
    i.schema: i
    for i in (
        Interval("bbo-1s", 0xC3, SECOND, True),
        Interval("bbo-1m", 0xC4, 60 * SECOND, True),
        Interval("ohlcv-1s", 0x20, SECOND, False),
        Interval("ohlcv-1m", 0x21, 60 * SECOND, False),
        Interval("ohlcv-1h", 0x22, 3600 * SECOND, False),
        Interval("ohlcv-1d", 0x23, 86400 * SECOND, False),
    )
}
SCHEMAS: Final = ("trades", "mbp-1", "mbp-10", "tbbo", *INTERVAL_SCHEMAS)


def iter_records(data: bytes | memoryview) -> Iterator[bytes]:
    """Whole DBN records of a buffer, walked by their length byte."""
    view = memoryview(data)
    pos = 0
    while pos < len(view):
        size = view[pos] * 4
        if size < 16 or pos + size > len(view):
            raise ValueError(f"truncated or bad record at offset {pos}")
        yield bytes(view[pos : pos + size])
        pos += size


def trade_record(m: Mbo) -> bytes:
    return _head(12, RTYPE_TRADES, m, 0, m.side)


def mbp_record(
    m: Mbo, rtype: int, depth: int, side: str, bids: Sequence[Level], asks: Sequence[Level], n: int
) -> bytes:
    words = (48 + 32 * n) // 4
    out = [_head(words, rtype, m, depth, side)]
    for i in range(n):
        bid = bids[i] if i < len(bids) else EMPTY_LEVEL
        ask = asks[i] if i < len(asks) else EMPTY_LEVEL
        out.append(_LEVEL.pack(bid[0], ask[0], bid[1], ask[1], bid[2], ask[2]))
    return b"".join(out)


def _head(words: int, rtype: int, m: Mbo, depth: int, side: str) -> bytes:
    return _MBP_HEAD.pack(
        words,
        rtype,
        m.publisher_id,
        m.instrument_id,
        m.ts_event,
        m.price,
        m.size,
        m.action.encode("ascii"),
        side.encode("ascii"),
        m.flags,
        min(depth, 255),
        m.ts_recv,
        m.ts_in_delta,
        m.sequence,
    )


def _better(side: str, a: int, b: int) -> bool:
    return a > b if side == "B" else a < b


def _rank(book: Book, side: str, price: int) -> int:
    """How many price levels of a side are strictly better than ``price``."""
    if side not in ("B", "A"):
        return 0
    levels = book.bids if side == "B" else book.asks
    return sum(1 for p in levels if _better(side, p, price))


@dataclass
class _Ohlcv:
    key: int
    open: int
    high: int
    low: int
    close: int
    volume: int


@dataclass
class _Bbo:
    key: int
    level: tuple[int, int, int, int, int, int]  # bid_px, ask_px, bid_sz, ask_sz, bid_ct, ask_ct
    flags: int
    sequence: int


@dataclass
class _LastTrade:
    price: int = UNDEF_PRICE
    size: int = 0
    side: str = "N"
    ts_event: int = UNDEF_TIMESTAMP


class Deriver:
    """Books plus every derived schema, fed one record at a time.

    ``feed`` returns the derived records that one record produced (interval schemas: the
    intervals it closed); ``close_until(ts)`` closes intervals as a record at ``ts`` would;
    ``flush()`` closes every interval still open.
    """

    def __init__(self, schemas: Iterable[str] = SCHEMAS) -> None:
        self.schemas = tuple(schemas)
        unknown = set(self.schemas) - set(SCHEMAS)
        if unknown:
            raise ValueError(f"unknown schemas: {sorted(unknown)}")
        self.books = Books()
        self.intervals = [INTERVAL_SCHEMAS[s] for s in self.schemas if s in INTERVAL_SCHEMAS]
        #: largest ts_recv of any MBO record fed so far (closes intervals)
        self.watermark = 0
        self._ohlcv: dict[str, dict[tuple[int, int], _Ohlcv]] = {
            i.schema: {} for i in self.intervals
        }
        self._bbo: dict[str, dict[tuple[int, int], _Bbo]] = {i.schema: {} for i in self.intervals}
        self._last_trade: dict[tuple[int, int], _LastTrade] = {}

    def _empty(self) -> dict[str, list[bytes]]:
        return {s: [] for s in self.schemas}

    def feed(self, record: bytes | memoryview) -> dict[str, list[bytes]]:
        out = self._empty()
        if len(record) < 2 or record[1] != RTYPE_MBO:
            return out
        m = parse_mbo(record)
        self._close(max(self.watermark, m.ts_recv), out)
        floor = self.watermark  # intervals before this one are closed: clamp into the open one
        self.watermark = max(self.watermark, m.ts_recv)
        key = (m.instrument_id, m.publisher_id)
        book = self.books.book(*key)
        bids0, asks0 = book.levels("B", 10), book.levels("A", 10)
        # depth: the resting order's old place is ranked before the record applies, the
        # record's own place after it (see the module docstring)
        old = book.by_id.get(m.order_id) if m.action in "ACM" else None
        old_rank = _rank(book, old.side, old.price) if old is not None else None
        book.apply(m)
        bids1, asks1 = book.levels("B", 10), book.levels("A", 10)
        if m.action == "C" or (m.action in "AM" and not m.flags & F_TOB):
            ranks = [] if old_rank is None else [old_rank]
            if m.action != "C":
                ranks.append(_rank(book, m.side, m.price))
            depth = min(ranks, default=0)
        else:  # R, T, an F_TOB add (and F, N, which change nothing)
            depth = 0
        if m.action == "T" and "trades" in out:
            out["trades"].append(trade_record(m))
        mbp1: bytes | None = None
        for n, schema, rtype in ((1, "mbp-1", RTYPE_MBP1), (10, "mbp-10", RTYPE_MBP10)):
            bid_changed = bids0[:n] != bids1[:n]
            ask_changed = asks0[:n] != asks1[:n]
            if m.action != "T" and not (bid_changed or ask_changed):
                continue
            side = "N" if m.action == "R" or (bid_changed and ask_changed) else m.side
            rec = mbp_record(m, rtype, depth, side, bids1, asks1, n)
            if n == 1:
                mbp1 = rec
            if schema in out:
                out[schema].append(rec)
        if mbp1 is not None:
            if m.action == "T" and "tbbo" in out:
                out["tbbo"].append(mbp1)
            self._aggregate(m, key, mbp1, floor)
        return out

    # --- intervals ------------------------------------------------------------------------

    def _aggregate(self, m: Mbo, key: tuple[int, int], mbp1: bytes, floor: int) -> None:
        trade = m.action == "T"
        if trade:
            last = self._last_trade.setdefault(key, _LastTrade())
            last.price, last.size, last.side, last.ts_event = m.price, m.size, m.side, m.ts_event
        level: tuple[int, int, int, int, int, int] = _LEVEL.unpack_from(mbp1, 48)
        for iv in self.intervals:
            k = max(iv.key(m.ts_recv), iv.key(floor))
            if iv.schema.startswith("bbo"):
                self._bbo[iv.schema][key] = _Bbo(k, level, m.flags, m.sequence)
            elif trade:
                bar = self._ohlcv[iv.schema].get(key)
                if bar is None:
                    self._ohlcv[iv.schema][key] = _Ohlcv(
                        k, m.price, m.price, m.price, m.price, m.size
                    )
                else:
                    assert bar.key == k
                    bar.high = max(bar.high, m.price)
                    bar.low = min(bar.low, m.price)
                    bar.close = m.price
                    bar.volume += m.size

    def close_until(self, ts: int) -> dict[str, list[bytes]]:
        """Close the intervals a record with ``ts_recv == ts`` would close."""
        out = self._empty()
        self._close(ts, out)
        self.watermark = max(self.watermark, ts)
        return out

    def flush(self) -> dict[str, list[bytes]]:
        """Close every interval still open (the end of a stream)."""
        out = self._empty()
        self._close(None, out)
        return out

    def _close(self, ts: int | None, out: dict[str, list[bytes]]) -> None:
        for iv in self.intervals:
            limit = None if ts is None else iv.key(ts)
            if iv.schema.startswith("bbo"):
                bbos = self._bbo[iv.schema]
                done = sorted((b.key, k) for k, b in bbos.items() if limit is None or b.key < limit)
                for _, k in done:
                    out[iv.schema].append(self._bbo_record(iv, k, bbos.pop(k)))
            else:
                bars = self._ohlcv[iv.schema]
                done = sorted((b.key, k) for k, b in bars.items() if limit is None or b.key < limit)
                for _, k in done:
                    bar = bars.pop(k)
                    out[iv.schema].append(
                        _OHLCV.pack(
                            14,
                            iv.rtype,
                            k[1],
                            k[0],
                            bar.key * iv.length,
                            bar.open,
                            bar.high,
                            bar.low,
                            bar.close,
                            bar.volume,
                        )
                    )

    def _bbo_record(self, iv: Interval, key: tuple[int, int], b: _Bbo) -> bytes:
        last = self._last_trade.get(key, _LastTrade())
        head = _BBO_HEAD.pack(
            20,
            iv.rtype,
            key[1],
            key[0],
            last.ts_event,
            last.price,
            last.size,
            0,
            last.side.encode("ascii"),
            b.flags,
            0,
            b.key * iv.length,
            b.sequence,
        )
        return head + _LEVEL.pack(*b.level)


def derive(
    records: Iterable[bytes | memoryview], schemas: Iterable[str] = SCHEMAS, *, flush: bool = True
) -> dict[str, list[bytes]]:
    """Every derived record of a stream of DBN records (non-MBO records are skipped), per
    schema, in the order the feed would publish them. ``flush``: close the intervals still
    open at the end (else only those a later record closed)."""
    deriver = Deriver(schemas)
    out = deriver._empty()
    for rec in records:
        for schema, recs in deriver.feed(rec).items():
            out[schema].extend(recs)
    if flush:
        for schema, recs in deriver.flush().items():
            out[schema].extend(recs)
    return out
