"""The synthetic feed's MBO mode (``synthetic:?schemas=mbo``): order flow around its price walk.

Each instrument's first record is an ``R`` (its book starts empty); then adds at and
behind the best levels, full and partial cancels, modifies (a size decrease keeps queue
priority; a price move or a size increase loses it) and aggressive trades: a ``T`` (side =
the aggressor, order_id 0) followed by an ``F`` per resting order it fills, oldest first at
the best level of the other side, then a ``C`` per fill removing the filled quantity.
``F_LAST`` marks the last record of every event; ``sequence`` counts records per feed.

Everything is generated in batches with numpy, vectorised over the batch's events. The
book a batch starts from is known (the generator keeps every resting order in arrays);
within a batch the rules below keep every event valid whatever the order of the events,
so no per-event Python loop is needed:

* an order receives at most one cancel or modify per batch, and only an order that rested
  when the batch began and that no trade of the batch fills;
* the trades against one side of a book fill, in time order, a prefix (in queue priority)
  of that side's best level as it was when the batch began, never more than the level;
* a fence per book keeps every bid strictly below every ask at every record: bids are
  added or moved at or below ``Fb``, asks at or above ``Fb + 1 tick``, where ``Fb`` is the
  walk's price clamped to [best bid, best ask - 1 tick]; on a side some trade of the batch
  hits, nothing is added or moved at a better price than its best level when the batch
  began (the trades' level stays the best).

The walk moves each instrument's reference price (a Gaussian step for the time since it
last moved: volatility per second, whatever the rate); the bid side is topped up at or
below it and the ask side a tick above, so the side it left behind is cleared by trades,
which lean toward it (buyers when it is above the book's mid, sellers below): the book
follows it. The cost: about 0.4 CPU seconds per million records on the 2-core VM (the
trades/mbp-1 generator: about 0.15); a ``make`` of a few records costs about 0.5 ms.
A book's size regulates itself: the fuller it is, the fewer adds and the more cancels.
The same seed and the same sequence of ``make`` calls give the same records.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt

__all__ = ["MAX_BATCH", "MBO_DTYPE", "MboGenerator", "UNDEF_PRICE"]

_HEADER = [
    ("length", "u1"),
    ("rtype", "u1"),
    ("publisher_id", "<u2"),
    ("instrument_id", "<u4"),
    ("ts_event", "<u8"),
]
MBO_DTYPE: Final = np.dtype(
    _HEADER
    + [
        ("order_id", "<u8"),
        ("price", "<i8"),
        ("size", "<u4"),
        ("flags", "u1"),
        ("channel_id", "u1"),
        ("action", "S1"),
        ("side", "S1"),
        ("ts_recv", "<u8"),
        ("ts_in_delta", "<i4"),
        ("sequence", "<u4"),
    ]
)
assert MBO_DTYPE.itemsize == 56

UNDEF_PRICE: Final = (1 << 63) - 1
RTYPE_MBO: Final = 0xA0
F_LAST: Final = 0x80
#: most records generated in one batch: a larger ``make`` is split into batches (its
#: arrays stay a few MB, and a catch-up after a stall does not flood one book)
MAX_BATCH: Final = 16_384
#: resting orders per book the flow regulates itself toward (more at high rates: a batch
#: cancels at most the orders that rested when it began)
TARGET_ORDERS: Final = 40
P_TRADE: Final = 0.1
#: the walk's volatility, ticks per square root of a second (a $400 stock at 1.5% a day
#: moves about 4 cents per root second): time-based, so a busier feed is not a wilder one
SIGMA_TICKS: Final = 3.0
#: the lowest walk price, in ticks
MIN_TICKS: Final = 100
#: prices stay below this many ticks (the walk stops at MAX_TICKS): a price fits a sort key
PX_SPAN: Final = 1 << 24
MAX_TICKS: Final = PX_SPAN // 2
_BIG: Final = 1 << 62

# event kinds
ADD, CANCEL, PCANCEL, MDOWN, MPRICE, MUP, TRADE, CLEAR = range(8)
_ACTION: Final = np.array([b"A", b"C", b"C", b"M", b"M", b"M", b"T", b"R"], dtype="S1")
_SIDE: Final = np.array([b"B", b"A", b"N"], dtype="S1")  # bid 0, ask 1, none 2
#: the split of the events that are neither adds nor trades: full cancels, partial cancels,
#: modifies down (priority kept), modifies of the price and modifies up (priority lost)
_OTHER_CDF: Final = tuple(np.cumsum([0.55, 0.15, 0.12, 0.12, 0.06])[:-1].tolist())
#: primes beyond any count of orders (strides that visit distinct orders)
_PRIMES: Final = (2147483647, 2147483629, 2147483587, 2147483579, 2147483563, 2147483549)

I64 = npt.NDArray[np.int64]


def _depth(rng: np.random.Generator, n: int) -> I64:
    """Ticks behind the top a new or moved order rests: 0..9, 0 the likeliest."""
    u = rng.random(n)
    return (u * u * 10).astype(np.int64)


class MboGenerator:
    """``make(n, now_ns, span_ns)`` -> chunks of MBO records, about ``n`` of them (a trade
    is several records: the surplus is owed and taken off the next calls)."""

    def __init__(
        self,
        seed: int,
        ids: npt.NDArray[np.uint32],
        mid: I64,
        weights: npt.NDArray[np.float64],
        tick: int,
        publisher_id: int,
    ) -> None:
        self.rng = np.random.default_rng([seed, 0xA0])
        self.ids = ids
        self.tick = tick
        self.publisher_id = publisher_id
        n = len(ids)
        self.walk = np.maximum(mid // tick, MIN_TICKS).astype(np.float64)  # ticks
        self.walk_ns = np.full(n, -1, np.int64)  # when each instrument's walk last moved
        self.weights = weights / weights.sum()
        self.cdf = np.cumsum(self.weights)
        self.seen = np.zeros(n, dtype=np.bool_)
        # resting orders (only live ones: compacted after every batch)
        self.o_inst: I64 = np.zeros(0, np.int64)
        self.o_side: I64 = np.zeros(0, np.int64)
        self.o_px: I64 = np.zeros(0, np.int64)  # ticks
        self.o_sz: I64 = np.zeros(0, np.int64)
        self.o_id: I64 = np.zeros(0, np.int64)
        self.next_id = 10_000_001
        self.sequence = 0
        #: records produced beyond what was asked (taken off the next batches)
        self.owed = 0
        self.records_per_event = 1.0

    @property
    def orders(self) -> int:
        return len(self.o_id)

    def make(self, n: int, now_ns: int, span_ns: int) -> list[bytes]:
        if n <= 0:
            return []
        pieces = -(-n // MAX_BATCH)
        start = now_ns - span_ns
        out: list[bytes] = []
        done = 0
        for i in range(pieces):
            k = (n - done) // (pieces - i)
            t0 = start + span_ns * i // pieces
            t1 = start + span_ns * (i + 1) // pieces
            done += k
            chunk = self._batch(k, t1, t1 - t0)
            if chunk:
                out.append(chunk)
        return out

    def _batch(self, n: int, now_ns: int, span_ns: int) -> bytes:
        """About ``n`` records: a trade is several, so the events are counted from the
        records per event seen so far, and the difference is carried to the next batch."""
        want = n - self.owed
        if want <= 0:
            self.owed = -want
            return b""
        events = max(1, round(want / self.records_per_event))
        rec = self._events(events, now_ns, span_ns)
        self.owed = len(rec) - want
        self.records_per_event = 0.5 * self.records_per_event + 0.5 * len(rec) / events
        return rec.tobytes()

    # --- one batch ----------------------------------------------------------------------

    def _events(self, E: int, now_ns: int, span_ns: int) -> npt.NDArray[np.void]:
        """``E`` events (and an R per instrument new to the feed) as MBO records.

        The events are handled in *slot* order: grouped by instrument, each instrument's
        in time order (so per-instrument running counts are cumulative sums); the records
        come out in time order.
        """
        rng = self.rng
        N = len(self.ids)
        if N <= 2048:
            counts = rng.multinomial(E, self.weights)
        else:
            picked = np.searchsorted(self.cdf, rng.random(E), side="right")
            counts = np.bincount(np.minimum(picked, N - 1), minlength=N)
        act = np.flatnonzero(counts)  # the batch's instruments
        A = len(act)
        G = 2 * A  # (instrument, side) groups: bids 2a, asks 2a + 1
        gcnt = counts[act]
        ga = np.repeat(np.arange(A), gcnt)  # each slot's instrument (index into act)
        gfirst = np.cumsum(gcnt) - gcnt  # each instrument's first slot
        key = np.sort((ga.astype(np.int64) << 32) | rng.integers(0, 1 << 32, size=E))
        when = key & 0xFFFFFFFF  # the slots' times, ascending per instrument
        slot_at = np.sort((when << 20) | np.arange(E)) & 0xFFFFF  # time order -> slot
        ts = now_ns - span_ns + (when * max(span_ns, 1)) // (1 << 32)
        fresh = act[~self.seen[act]]
        self.seen[fresh] = True

        # The books of the batch's instruments as they rest now, sorted per group best
        # price first, each level in queue priority (the state arrays are in priority order).
        amap = np.full(N, -1, np.int64)
        amap[act] = np.arange(A)
        oa_all = amap[self.o_inst]
        sel = np.flatnonzero(oa_all >= 0)
        og = oa_all[sel] * 2 + self.o_side[sel]
        opx = self.o_px[sel]
        rank_px = np.where(self.o_side[sel] == 0, PX_SPAN - 1 - opx, opx)
        if G < (1 << 18) and len(sel) < (1 << 21):
            order = np.sort((og << 45) | (rank_px << 21) | np.arange(len(sel))) & ((1 << 21) - 1)
        else:  # pragma: no cover - a universe far beyond the URI's bounds
            order = np.lexsort((np.arange(len(sel)), rank_px, og))
        s = sel[order]  # state index of each sorted order
        g = og[order]
        sa = g >> 1
        spx = opx[order]
        ssz = self.o_sz[s]
        cnt = np.bincount(g, minlength=G)
        has = cnt > 0
        gstart = np.cumsum(cnt) - cnt
        best = np.zeros(G, np.int64)
        best[has] = spx[gstart[has]]
        bl = np.flatnonzero(spx == best[g])  # the best levels, each a prefix of its group
        bl_g = g[bl]
        bl_sz = ssz[bl]
        C = np.cumsum(bl_sz)  # end of each best-level order in one running coordinate
        level = np.bincount(bl_g, weights=bl_sz, minlength=G).astype(np.int64)
        g0 = np.cumsum(level) - level  # where each group's best level starts in it
        head = np.zeros(G, np.int64)
        if len(bl):
            blcnt = np.bincount(bl_g, minlength=G)
            head[has] = bl_sz[(np.cumsum(blcnt) - blcnt)[has]]
        has_b, has_a = has[0::2], has[1::2]
        bid, ask = best[0::2], best[1::2]
        # The walk: a Gaussian step per instrument for the time since it last moved.
        since = self.walk_ns[act]
        dt = np.where(since < 0, 0, now_ns - since).clip(0) / 1e9
        moved_walk = self.walk[act] + rng.standard_normal(A) * SIGMA_TICKS * np.sqrt(dt)
        self.walk[act] = np.clip(moved_walk, MIN_TICKS, MAX_TICKS)
        self.walk_ns[act] = now_ns
        walk = np.rint(self.walk[act]).astype(np.int64)
        resting = cnt[0::2] + cnt[1::2]

        # Kinds: the fuller the book, the fewer adds.
        p_add = np.clip(0.75 - 0.35 * resting / TARGET_ORDERS, 0.25, 0.75)[ga]
        u = rng.random(E)
        v = (u - p_add) / (1.0 - P_TRADE - p_add)
        other = 1 + sum((v >= c for c in _OTHER_CDF), np.zeros(E, np.int64))
        kind = np.where(u < p_add, ADD, np.where(u >= 1.0 - P_TRADE, TRADE, other))

        # Trades: buyers lean in when the walk is above the book's mid. Per group hit, the
        # trades take, in time order, consecutive quantities of its best level.
        mid2 = np.where(has_b & has_a, bid + ask, 2 * walk + 1)  # twice the mid, in ticks
        p_buy = np.clip(0.5 + 0.125 * (2 * walk + 1 - mid2), 0.15, 0.85)
        trs = np.flatnonzero(kind == TRADE)
        buy = rng.random(len(trs)) < p_buy[ga[trs]]
        hg = ga[trs] * 2 + buy  # the group each trade hits: asks when buying
        limit = np.minimum(level[hg], 3 * head[hg])
        want = 1 + (rng.random(len(trs)) * limit).astype(np.int64)
        by_group = np.argsort(hg, kind="stable")  # time order within each group
        hg2 = hg[by_group]
        q2 = want[by_group]
        run = np.cumsum(q2)
        first = np.ones(len(hg2), dtype=np.bool_)
        first[1:] = hg2[1:] != hg2[:-1]
        end2 = run - (np.maximum.accumulate(np.where(first, run - q2, 0)) if len(run) else run)
        t_end = np.empty(len(trs), np.int64)
        t_end[by_group] = end2
        t_start = t_end - want
        ok = t_start < level[hg]
        t_end = np.minimum(t_end, level[hg])
        consumed = np.zeros(G, np.int64)
        np.maximum.at(consumed, hg[ok], t_end[ok])
        kind[trs[~ok]] = ADD
        tr = trs[ok]  # trade slots
        tg = hg[ok]
        t_buy = buy[ok]
        t_lo = t_start[ok] + g0[tg]
        t_qty = t_end[ok] - t_start[ok]
        k0 = np.searchsorted(C, t_lo, side="right")
        k1 = np.searchsorted(C, t_lo + t_qty - 1, side="right")
        t_m = k1 - k0 + 1
        f_first = np.cumsum(t_m) - t_m
        fk = np.repeat(k0 - f_first, t_m) + np.arange(int(t_m.sum()))
        f_lo = np.repeat(t_lo, t_m)
        f_hi = f_lo + np.repeat(t_qty, t_m)
        f_qty = np.minimum(f_hi, C[fk]) - np.maximum(f_lo, C[fk] - bl_sz[fk])
        f_state = s[bl[fk]]
        f_oid = self.o_id[f_state]
        traded = consumed > 0
        filled = (C - bl_sz) < (g0 + consumed)[bl_g]

        # Cancels and modifies: distinct orders that rested when the batch began and that
        # no trade of the batch fills: an instrument's k-th takes its eligible orders at
        # (offset + k * P) mod count (P prime beyond any count: distinct for every k).
        is_cm = (kind >= CANCEL) & (kind <= MUP)
        eligible = np.ones(len(s), dtype=np.bool_)
        eligible[bl[filled]] = False
        ep = np.flatnonzero(eligible)
        ecnt = np.bincount(sa[ep], minlength=A)
        estart = np.cumsum(ecnt) - ecnt
        run = np.cumsum(is_cm)
        rank = run - 1 - np.repeat((run - is_cm)[gfirst], gcnt)
        c_ok = is_cm & (rank < ecnt[ga])
        kind[is_cm & ~c_ok] = ADD
        cm = np.flatnonzero(c_ok)
        cm_a = ga[cm]
        offset = rng.integers(0, 1 << 30, size=A)
        stride = _PRIMES[int(rng.integers(len(_PRIMES)))]
        cpos = ep[estart[cm_a] + (offset[cm_a] + rank[cm] * stride) % ecnt[cm_a]]
        c_state = s[cpos]
        c_side = g[cpos] & 1
        c_px = spx[cpos]
        c_sz = ssz[cpos]
        ck = kind[cm]
        ck[(c_sz < 2) & ((ck == PCANCEL) | (ck == MDOWN))] = CANCEL
        kind[cm] = ck

        # Fences: bids at or below fb, asks at or above fb + 1; not beyond a traded level.
        fb = np.minimum(
            np.maximum(walk, np.where(has_b, bid, -_BIG)), np.where(has_a, ask - 1, _BIG)
        )
        # Within them the side the walk left behind is not topped up at its stale best
        # level (the walk's price is the bid, a tick above it the ask), so trades clear it.
        top_bid = np.minimum(fb, walk)
        top_bid = np.where(traded[0::2], np.minimum(top_bid, bid), top_bid)
        top_ask = np.maximum(fb + 1, walk + 1)
        top_ask = np.where(traded[1::2], np.maximum(top_ask, ask), top_ask)

        # Per-slot fields (prices in ticks until the records are written).
        e_side = np.full(E, 2, np.int64)
        e_px = np.zeros(E, np.int64)
        e_sz = np.zeros(E, np.int64)
        e_oid = np.zeros(E, np.int64)
        e_side[tr] = 1 - t_buy  # the aggressor: B when buying
        e_px[tr] = best[tg]
        e_sz[tr] = t_qty

        e_side[cm] = c_side
        e_oid[cm] = self.o_id[c_state]
        cut = 1 + (rng.random(len(cm)) * (c_sz - 1)).astype(np.int64)  # 1 .. size-1
        deeper = _depth(rng, len(cm))
        moved = np.where(c_side == 0, top_bid[cm_a] - deeper, top_ask[cm_a] + deeper)
        moved = np.where(moved == c_px, c_px + 2 * c_side - 1, moved)
        new_px = np.where(ck == MPRICE, moved, c_px)
        new_sz = np.where(ck == PCANCEL, cut, c_sz)
        new_sz = np.where(ck == MDOWN, cut, np.where(ck == MUP, c_sz + cut + 1, new_sz))
        e_px[cm] = new_px
        e_sz[cm] = new_sz
        left = np.where(ck == CANCEL, 0, np.where(ck == PCANCEL, c_sz - cut, new_sz))
        self.o_sz[c_state] = left
        np.subtract.at(self.o_sz, f_state, f_qty)
        lose = (ck == MPRICE) | (ck == MUP)
        self.o_sz[c_state[lose]] = 0  # they rest again at the back (below)

        is_add = kind == ADD
        adds = np.flatnonzero(is_add)
        aa = ga[adds]
        thin = (cnt[1::2] - cnt[0::2])[aa] / (resting[aa] + 2)
        a_side = (rng.random(len(adds)) >= np.clip(0.5 + 0.4 * thin, 0.15, 0.85)).astype(np.int64)
        deeper = _depth(rng, len(adds))
        e_side[adds] = a_side
        e_px[adds] = np.where(a_side == 0, top_bid[aa] - deeper, top_ask[aa] + deeper)
        e_sz[adds] = rng.integers(1, 300, size=len(adds))
        in_time = is_add[slot_at]
        ids = self.next_id + np.cumsum(in_time) - 1
        e_oid[slot_at[in_time]] = ids[in_time]
        self.next_id += len(adds)

        # The orders that rest anew (adds, moved orders) go to the back, in time order.
        movers = np.zeros(E, dtype=np.bool_)
        movers[adds] = True
        movers[cm[lose]] = True
        back = slot_at[movers[slot_at]]
        keep = self.o_sz > 0
        self.o_inst = np.concatenate((self.o_inst[keep], act[ga[back]]))
        self.o_side = np.concatenate((self.o_side[keep], e_side[back]))
        self.o_px = np.concatenate((self.o_px[keep], e_px[back]))
        self.o_sz = np.concatenate((self.o_sz[keep], e_sz[back]))
        self.o_id = np.concatenate((self.o_id[keep], e_oid[back]))

        # The records: an R per instrument new to the feed, then the events in time order,
        # a trade's F and C records after its T.
        nr = len(fresh)
        events = nr + E
        t_slot = slot_at
        m_slot = np.zeros(E, np.int64)
        m_slot[tr] = t_m
        f0_slot = np.zeros(E, np.int64)
        f0_slot[tr] = f_first
        one = np.zeros(events, dtype=MBO_DTYPE)  # one record per event
        one["length"] = MBO_DTYPE.itemsize // 4
        one["rtype"] = RTYPE_MBO
        one["publisher_id"] = self.publisher_id
        one["instrument_id"] = self.ids[np.concatenate((fresh, act[ga[t_slot]]))]
        ev_ts = np.concatenate((np.full(nr, ts[t_slot[0]]), ts[t_slot]))
        one["ts_recv"] = ev_ts
        one["ts_event"] = ev_ts - rng.integers(1_000, 50_000, size=events)
        one["ts_in_delta"] = rng.integers(5_000, 30_000, size=events)
        one["action"] = _ACTION[np.concatenate((np.full(nr, CLEAR), kind[t_slot]))]
        one["side"] = _SIDE[np.concatenate((np.full(nr, 2), e_side[t_slot]))]
        one["price"] = np.concatenate((np.full(nr, UNDEF_PRICE), e_px[t_slot] * self.tick))
        one["size"][nr:] = e_sz[t_slot]
        one["order_id"][nr:] = e_oid[t_slot]
        m_of = np.concatenate((np.zeros(nr, np.int64), m_slot[t_slot]))
        one["flags"] = np.where(m_of == 0, F_LAST, 0)
        if not len(tr):
            rec = one
        else:
            rc = 1 + 2 * m_of
            rec = np.repeat(one, rc)
            te = np.flatnonzero(m_of)  # the trades, in time order
            two = 2 * m_of[te]
            local = np.arange(int(two.sum())) - np.repeat(np.cumsum(two) - two, two)
            at = np.repeat((np.cumsum(rc) - rc)[te] + 1, two) + local
            m = np.repeat(m_of[te], two)
            is_fill = local < m
            fi = np.repeat(np.concatenate((np.zeros(nr, np.int64), f0_slot[t_slot]))[te], two)
            fi += np.where(is_fill, local, local - m)
            rec["action"][at] = np.where(is_fill, b"F", b"C")
            rec["side"][at] = np.repeat(_SIDE[t_buy.astype(np.int64)], t_m)[fi]
            rec["price"][at] = np.repeat(best[tg] * self.tick, t_m)[fi]
            rec["size"][at] = f_qty[fi]
            rec["order_id"][at] = f_oid[fi]
            rec["flags"][at[~is_fill & (local == 2 * m - 1)]] = F_LAST
        total = len(rec)
        seq = np.arange(self.sequence, self.sequence + total, dtype=np.uint64) % 2**32
        rec["sequence"] = seq.astype(np.uint32)
        self.sequence += total
        return rec
