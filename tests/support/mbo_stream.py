"""A deterministic stream of valid MBO events for tests that need a live order flow through
a real gateway (snapshots, derived schemas): a clear record (``R``) per instrument first,
then adds, partial and full cancels, modifies that keep or lose queue priority (bids below
and asks above a fixed mid: never crossed), and trades (``T`` then ``F`` fills against the
oldest resting orders at the best price, each followed by the cancel that takes the filled
size off the book), ``F_LAST`` on the last record of every event, ``sequence`` counting
every record.

Written independently of the synthetic feed's generator and of the native engine: a
plain Python model of the resting orders, small and obvious.
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass, field
from typing import Final

F_LAST: Final = 0x80
UNDEF_PRICE: Final = (1 << 63) - 1
_MBO: Final = struct.Struct("<BBHIQQqIBBccQiI")
TICK: Final = 10_000_000  # 0.01 in DBN fixed-point prices


@dataclass
class _Resting:
    order_id: int
    side: str
    price: int
    size: int


@dataclass
class MboStream:
    """``next_event()`` returns the records of one event, in order."""

    instruments: tuple[int, ...] = (101, 102, 103)
    publisher_id: int = 1
    seed: int = 7
    sequence: int = 0
    rng: random.Random = field(init=False)
    _orders: dict[int, dict[int, _Resting]] = field(init=False)
    _next_id: int = field(init=False, default=1)
    _mid: dict[int, int] = field(init=False)
    _started: set[int] = field(init=False, default_factory=set)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self._orders = {iid: {} for iid in self.instruments}
        self._mid = {iid: 100 * 1_000_000_000 + iid * TICK for iid in self.instruments}

    def record(
        self,
        iid: int,
        action: str,
        side: str,
        order_id: int,
        price: int,
        size: int,
        ts: int,
        flags: int = 0,
    ) -> bytes:
        self.sequence += 1
        return _MBO.pack(
            14, 0xA0, self.publisher_id, iid, ts, order_id, price, size, flags, 0,
            action.encode(), side.encode(), ts, 0, self.sequence,
        )  # fmt: skip

    def next_event(self, ts: int) -> list[bytes]:
        rng = self.rng
        iid = rng.choice(self.instruments)
        if iid not in self._started:  # as a venue's feed: a clear record starts each book
            self._started.add(iid)
            return [self.record(iid, "R", "N", 0, UNDEF_PRICE, 0, ts, F_LAST)]
        book = self._orders[iid]
        roll = rng.random()
        if len(book) < 6 or roll < 0.45:
            recs = [self._add(iid, ts)]
        elif roll < 0.65:
            recs = [self._cancel(iid, ts)]
        elif roll < 0.85:
            recs = [self._modify(iid, ts)]
        else:
            recs = self._trade(iid, ts)
        last = bytearray(recs[-1])
        last[36] |= F_LAST
        recs[-1] = bytes(last)
        return recs

    def _add(self, iid: int, ts: int) -> bytes:
        side = self.rng.choice("BA")
        mid = self._mid[iid]
        away = self.rng.randint(1, 6) * TICK
        price = mid - away if side == "B" else mid + away
        oid = self._next_id
        self._next_id += 1
        size = self.rng.randint(1, 20)
        self._orders[iid][oid] = _Resting(oid, side, price, size)
        return self.record(iid, "A", side, oid, price, size, ts)

    def _pick(self, iid: int) -> _Resting:
        return self._orders[iid][self.rng.choice(sorted(self._orders[iid]))]

    def _cancel(self, iid: int, ts: int) -> bytes:
        order = self._pick(iid)
        qty = order.size if self.rng.random() < 0.6 else self.rng.randint(1, order.size)
        order.size -= qty
        if order.size == 0:
            del self._orders[iid][order.order_id]
        return self.record(iid, "C", order.side, order.order_id, order.price, qty, ts)

    def _modify(self, iid: int, ts: int) -> bytes:
        order = self._pick(iid)
        kind = self.rng.random()
        if kind < 0.4 and order.size > 1:
            order.size = self.rng.randint(1, order.size - 1)  # keeps priority
        else:
            if kind < 0.7:
                order.size += self.rng.randint(1, 10)
            else:
                step = self.rng.choice((-1, 1)) * TICK
                mid = self._mid[iid]
                moved = order.price + step
                if (order.side == "B" and moved < mid) or (order.side == "A" and moved > mid):
                    order.price = moved
            book = self._orders[iid]  # loses its queue priority: to the back
            del book[order.order_id]
            book[order.order_id] = order
        return self.record(iid, "M", order.side, order.order_id, order.price, order.size, ts)

    def _trade(self, iid: int, ts: int) -> list[bytes]:
        """An aggressor takes the best resting price of one side: T, then per filled order
        an F and a C (the fill's effect on the book), oldest order first."""
        book = self._orders[iid]
        side = self.rng.choice("BA")  # the resting side that is hit
        resting = [o for o in book.values() if o.side == side]
        if not resting:
            return [self._add(iid, ts)]
        best = max(o.price for o in resting) if side == "B" else min(o.price for o in resting)
        queue = [o for o in resting if o.price == best]  # dict order = arrival = priority
        want = self.rng.randint(1, sum(o.size for o in queue))
        aggressor = "A" if side == "B" else "B"
        recs = [self.record(iid, "T", aggressor, 0, best, want, ts)]
        for order in queue:
            if want == 0:
                break
            qty = min(want, order.size)
            want -= qty
            recs.append(self.record(iid, "F", side, order.order_id, best, qty, ts))
            order.size -= qty
            if order.size == 0:
                del book[order.order_id]
            recs.append(self.record(iid, "C", side, order.order_id, best, qty, ts))
        return recs
