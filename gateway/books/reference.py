"""The reference order book: one MBO record at a time, in plain Python (slow, obvious).

Rules (Databento's documented MBO semantics; PROTOCOL.md §6.3b):

- A book per (instrument_id, publisher_id) (``Books``).
- ``A`` add: the order rests at the back of its price level's queue. An add whose
  ``order_id`` already rests replaces it (at the back: it lost its priority).
- ``C`` cancel: ``size`` is the quantity removed (partial cancels exist); at zero the order
  leaves the book. A cancel of an unknown order changes nothing (counted).
- ``M`` modify: ``size`` is the new total. A price change (or a side change) or a size
  increase loses queue priority (back of the new level); a decrease keeps it. A modify of an
  unknown order is an add.
- ``R`` clears the book. ``T`` (trade), ``F`` (fill) and ``N`` (none) do not change it: a
  fill's effect on the book arrives as a cancel.
- An add flagged ``F_TOB`` (top-of-book venues: IEX TOPS, NYSE National BBO, where each
  quote is normalised into a pair of such adds, one per side, both usually order_id 0)
  replaces its whole side with one level; an ``F_TOB`` add at ``UNDEF_PRICE`` (or of size 0)
  empties the side. A top-of-book order is not an order of the venue: it is not indexed by
  its order_id, so it leaves alone an order resting with the same id (the other side's
  ``F_TOB`` add, a regular order), and a later cancel or modify naming that id does not find
  it (a cancel counts as unknown; a modify is an add). It leaves the book only when its side
  is replaced again (or by ``R``). A level's order count leaves it out (a level holding only
  it counts 0 orders; its size counts). An add of size 0 rests nothing.
- An event may span records: the book is consistent after a record flagged ``F_LAST``.

Levels keep their orders in queue priority (insertion order of a dict; a top-of-book order
under the key ``TOB_KEY``, first in its level, since it rested on an emptied side).
``orders()`` yields the resting orders as a snapshot lists them: per side (bids, then asks)
the side's top-of-book order first (a snapshot repeats it as an add flagged ``F_TOB``, which
replaces the side on replay, so nothing of the side may come before it), then the other
orders best level first, each level in queue priority.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Final

__all__ = [
    "F_LAST",
    "F_SNAPSHOT",
    "F_TOB",
    "MBO_LEN",
    "UNDEF_PRICE",
    "Book",
    "Books",
    "Mbo",
    "Order",
    "TOB_KEY",
    "parse_mbo",
]

RTYPE_MBO: Final = 0xA0
MBO_LEN: Final = 56
UNDEF_PRICE: Final = (1 << 63) - 1
F_LAST: Final = 1 << 7
F_TOB: Final = 1 << 6
F_SNAPSHOT: Final = 1 << 5
F_BAD_TS_RECV: Final = 1 << 3
#: the key of a level's top-of-book order (order ids are unsigned: no order has it)
TOB_KEY: Final = -1
# header (length, rtype, publisher_id, instrument_id, ts_event), order_id, price, size,
# flags, channel_id, action, side, ts_recv, ts_in_delta, sequence
_MBO: Final = struct.Struct("<BBHIQQqIBBccQiI")


@dataclass(frozen=True)
class Mbo:
    """The fields of one MBO record the book needs (and a snapshot repeats)."""

    publisher_id: int
    instrument_id: int
    ts_event: int
    order_id: int
    price: int
    size: int
    flags: int
    channel_id: int
    action: str
    side: str
    ts_recv: int
    ts_in_delta: int
    sequence: int


def parse_mbo(record: bytes | memoryview) -> Mbo:
    """One DBN v3 MboMsg (56 bytes); ValueError for anything else."""
    if len(record) < MBO_LEN or record[1] != RTYPE_MBO or record[0] * 4 != MBO_LEN:
        raise ValueError("not a 56-byte MBO record")
    (_, _, pub, iid, ts, oid, px, size, flags, chan, act, side, recv, delta, seq) = (
        _MBO.unpack_from(record)
    )
    return Mbo(
        pub,
        iid,
        ts,
        oid,
        px,
        size,
        flags,
        chan,
        act.decode("ascii", "replace"),
        side.decode("ascii", "replace"),
        recv,
        delta,
        seq,
    )


@dataclass
class Order:
    order_id: int
    side: str
    price: int
    size: int
    #: the order's own ts_event and venue sequence (a snapshot repeats them)
    ts_event: int
    sequence: int
    #: rested by an ``F_TOB`` add: not indexed by order_id, not counted in its level
    tob: bool = False


@dataclass
class Book:
    """One instrument's book at one publisher."""

    bids: dict[int, dict[int, Order]] = field(default_factory=dict)
    asks: dict[int, dict[int, Order]] = field(default_factory=dict)
    #: the regular resting orders by order_id (top-of-book orders are not in it)
    by_id: dict[int, Order] = field(default_factory=dict)
    #: the top-of-book order of each side ('B', 'A') that has one
    tob: dict[str, Order] = field(default_factory=dict)
    #: cancels and modifies that named no resting order (cancels: ignored)
    unknown_cancels: int = 0
    #: records since the last F_LAST: the book is mid-event while this is non-zero
    pending: int = 0

    def _side(self, side: str) -> dict[int, dict[int, Order]] | None:
        return self.bids if side == "B" else self.asks if side == "A" else None

    def _rest(self, order: Order) -> None:
        levels = self._side(order.side)
        if levels is None:
            return
        levels.setdefault(order.price, {})[order.order_id] = order
        self.by_id[order.order_id] = order

    def _remove(self, order: Order) -> None:
        levels = self._side(order.side)
        assert levels is not None
        level = levels[order.price]
        del level[order.order_id]
        if not level:
            del levels[order.price]
        del self.by_id[order.order_id]

    def clear(self) -> None:
        self.bids.clear()
        self.asks.clear()
        self.by_id.clear()
        self.tob.clear()

    def _clear_side(self, side: str, levels: dict[int, dict[int, Order]]) -> None:
        for level in levels.values():
            for key, order in level.items():
                if key != TOB_KEY:
                    del self.by_id[order.order_id]
        levels.clear()
        self.tob.pop(side, None)

    def apply(self, m: Mbo) -> None:
        """Apply one MBO record."""
        self.pending = 0 if m.flags & F_LAST else self.pending + 1
        action = m.action
        if action == "R":
            self.clear()
        elif action == "A":
            self._add(m)
        elif action == "C":
            order = self.by_id.get(m.order_id)
            if order is None:
                self.unknown_cancels += 1
                return
            if m.size >= order.size:
                self._remove(order)
            else:
                order.size -= m.size  # keeps its place
        elif action == "M":
            order = self.by_id.get(m.order_id)
            if order is None:
                self._add(m)
                return
            if m.size == 0:
                self._remove(order)
            elif m.price != order.price or m.side != order.side or m.size > order.size:
                self._remove(order)
                self._rest(Order(m.order_id, m.side, m.price, m.size, m.ts_event, m.sequence))
            else:
                order.size = m.size  # a decrease keeps queue priority
        # T, F, N: no change

    def _add(self, m: Mbo) -> None:
        if m.flags & F_TOB:
            levels = self._side(m.side)
            if levels is None:
                return
            self._clear_side(m.side, levels)
            if m.price == UNDEF_PRICE or m.size <= 0:
                return  # the side is empty
            order = Order(m.order_id, m.side, m.price, m.size, m.ts_event, m.sequence, tob=True)
            levels[m.price] = {TOB_KEY: order}
            self.tob[m.side] = order
            return
        old = self.by_id.get(m.order_id)  # an id that rests already (either side) moves
        if old is not None:
            self._remove(old)
        if m.size > 0:
            self._rest(Order(m.order_id, m.side, m.price, m.size, m.ts_event, m.sequence))

    # --- reading it ---------------------------------------------------------------------

    def levels(self, side: str, depth: int) -> list[tuple[int, int, int]]:
        """The best ``depth`` levels of a side: (price, total size, order count); the count
        leaves out a top-of-book order (its size counts)."""
        levels = self._side(side)
        if levels is None:
            return []
        prices = sorted(levels, reverse=side == "B")[:depth]
        return [
            (
                p,
                sum(o.size for o in levels[p].values()),
                len(levels[p]) - (TOB_KEY in levels[p]),
            )
            for p in prices
        ]

    def bbo(self) -> tuple[tuple[int, int, int] | None, tuple[int, int, int] | None]:
        bid = self.levels("B", 1)
        ask = self.levels("A", 1)
        return (bid[0] if bid else None, ask[0] if ask else None)

    def orders(self) -> Iterator[Order]:
        """Resting orders as a snapshot lists them: per side (bids, then asks), the side's
        top-of-book order first, then the other orders best level first, each level in
        queue priority."""
        for side, levels in (("B", self.bids), ("A", self.asks)):
            top = self.tob.get(side)
            if top is not None:
                yield top
            for price in sorted(levels, reverse=side == "B"):
                for key, order in levels[price].items():
                    if key != TOB_KEY:
                        yield order


class Books:
    """Every (instrument_id, publisher_id) book of a feed."""

    def __init__(self) -> None:
        self.books: dict[tuple[int, int], Book] = {}

    def book(self, instrument_id: int, publisher_id: int) -> Book:
        key = (instrument_id, publisher_id)
        book = self.books.get(key)
        if book is None:
            book = self.books[key] = Book()
        return book

    def apply(self, m: Mbo) -> None:
        self.book(m.instrument_id, m.publisher_id).apply(m)

    def apply_records(self, records: Iterable[bytes | memoryview]) -> None:
        for rec in records:
            if len(rec) >= 2 and rec[1] == RTYPE_MBO:
                self.apply(parse_mbo(rec))

    @property
    def orders_held(self) -> int:
        """Resting orders, top-of-book orders included (what a snapshot repeats)."""
        return sum(len(b.by_id) + len(b.tob) for b in self.books.values())
