"""bbo-1s, bbo-1m and ohlcv-1s/1m/1h/1d records, built per chunk in numpy from the chunk's
derived mbp-1 records (which hold every BBO change and every trade), state carried across
chunks, per (instrument_id, publisher_id).

The rules (Databento's schema docs; the choices where they are silent are written down in
``derive_reference``'s docstring, the pure-Python oracle this module is tested against):

* ohlcv: trades only (the mbp-1 records with action ``T``), bucketed by the trade's
  ``ts_recv`` into ``[start, start + len)``; ``ts_event`` = start; open/high/low/close from
  the trades' prices, volume = the sum of their sizes; no record without a trade; 1d = the
  UTC day.
* bbo: an interval ``(end - len, end]`` with at least one mbp-1 record (a BBO change or a
  trade) gives one record: ``ts_recv`` = end, the levels, ``flags`` and ``sequence`` of the
  interval's last mbp-1 record, and price/size/side/``ts_event`` of the instrument's last
  trade so far (carried forward across intervals; ``UNDEF_PRICE``/0/``N``/
  ``UNDEF_TIMESTAMP`` before any).
* An interval closes (its record is returned) once the feed has shown a ``ts_recv`` at or
  past its end (bbo: past it): ``feed`` takes the largest ts_recv of the whole feed chunk,
  so a quiet instrument's interval closes too. There is no timer; ``close_until(ts)`` closes
  as a record at ``ts`` would (tests, or a timer if one is wanted). Records closing together
  are ordered by (interval, instrument_id, publisher_id). A record whose ts_recv falls in an
  interval already closed counts in the earliest interval still open.

Per chunk the work is a few numpy passes over the records (a stable sort by instrument and
interval, then per-group reductions); Python only loops over the (instrument, interval)
groups to merge them with the carried state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

__all__ = ["BBO_DTYPE", "INTERVALS", "MBP1_DTYPE", "OHLCV_DTYPE", "IntervalBuilder"]

UNDEF_PRICE: Final = (1 << 63) - 1
UNDEF_TIMESTAMP: Final = (1 << 64) - 1
_S: Final = 1_000_000_000
_T: Final = ord("T")
_N: Final = ord("N")

#: schema -> (rtype, interval length in ns, bbo: intervals end-inclusive)
INTERVALS: Final[dict[str, tuple[int, int, bool]]] = {
    "bbo-1s": (0xC3, _S, True),
    "bbo-1m": (0xC4, 60 * _S, True),
    "ohlcv-1s": (0x20, _S, False),
    "ohlcv-1m": (0x21, 60 * _S, False),
    "ohlcv-1h": (0x22, 3600 * _S, False),
    "ohlcv-1d": (0x23, 86400 * _S, False),
}

_LEVEL_FIELDS: Final = {
    "bid_px": ("<i8", 48),
    "ask_px": ("<i8", 56),
    "bid_sz": ("<u4", 64),
    "ask_sz": ("<u4", 68),
    "bid_ct": ("<u4", 72),
    "ask_ct": ("<u4", 76),
}
_LEVEL_NAMES: Final = tuple(_LEVEL_FIELDS)


def _dtype(fields: dict[str, tuple[str, int]], itemsize: int) -> np.dtype[np.void]:
    return np.dtype(
        {
            "names": list(fields),
            "formats": [f for f, _ in fields.values()],
            "offsets": [o for _, o in fields.values()],
            "itemsize": itemsize,
        }
    )


_HEADER: Final = {
    "length": ("u1", 0),
    "rtype": ("u1", 1),
    "publisher_id": ("<u2", 2),
    "instrument_id": ("<u4", 4),
    "ts_event": ("<u8", 8),
}
#: DBN v3 Mbp1Msg (80 bytes)
MBP1_DTYPE: Final = _dtype(
    {
        **_HEADER,
        "price": ("<i8", 16),
        "size": ("<u4", 24),
        "action": ("u1", 28),
        "side": ("u1", 29),
        "flags": ("u1", 30),
        "depth": ("u1", 31),
        "ts_recv": ("<u8", 32),
        "ts_in_delta": ("<i4", 40),
        "sequence": ("<u4", 44),
        **_LEVEL_FIELDS,
    },
    80,
)
#: DBN v3 BboMsg (80 bytes; the reserved bytes stay zero)
BBO_DTYPE: Final = _dtype(
    {
        **_HEADER,
        "price": ("<i8", 16),
        "size": ("<u4", 24),
        "side": ("u1", 29),
        "flags": ("u1", 30),
        "ts_recv": ("<u8", 32),
        "sequence": ("<u4", 44),
        **_LEVEL_FIELDS,
    },
    80,
)
#: DBN v3 OhlcvMsg (56 bytes)
OHLCV_DTYPE: Final = _dtype(
    {
        **_HEADER,
        "open": ("<i8", 16),
        "high": ("<i8", 24),
        "low": ("<i8", 32),
        "close": ("<i8", 40),
        "volume": ("<u8", 48),
    },
    56,
)

Key = tuple[int, int]  # instrument_id, publisher_id
Trade = tuple[int, int, int, int]  # price, size, side (byte), ts_event
NO_TRADE: Final[Trade] = (UNDEF_PRICE, 0, _N, UNDEF_TIMESTAMP)
U64 = npt.NDArray[np.uint64]


@dataclass
class _Bar:
    key: int
    open: int
    high: int
    low: int
    close: int
    volume: int


@dataclass
class _Quote:
    key: int
    levels: tuple[int, ...]  # bid_px, ask_px, bid_sz, ask_sz, bid_ct, ask_ct
    flags: int
    sequence: int
    trade: Trade  # the last trade as of the interval's last record


class IntervalBuilder:
    """One interval schema's records from the mbp-1 records of a feed, chunk by chunk."""

    def __init__(self, schema: str) -> None:
        if schema not in INTERVALS:
            raise ValueError(f"not an interval schema: {schema!r} (one of {sorted(INTERVALS)})")
        self.schema = schema
        self.rtype, self.length, self._end_inclusive = INTERVALS[schema]
        self.is_bbo = self._end_inclusive
        #: the largest ts_recv seen on the feed: intervals before its one are closed
        self.watermark = 0
        self._bars: dict[Key, _Bar] = {}
        self._quotes: dict[Key, _Quote] = {}
        self._last_trade: dict[Key, Trade] = {}

    @property
    def open_intervals(self) -> int:
        return len(self._quotes) + len(self._bars)

    def key(self, ts: int) -> int:
        """The interval index of a ts_recv (bbo: index of its end; ohlcv: of its start)."""
        q, r = divmod(ts, self.length)
        return q + (1 if self._end_inclusive and r else 0)

    def _keys(self, ts: U64) -> U64:
        length = np.uint64(self.length)
        keys: U64 = ts // length
        if self._end_inclusive:
            keys = keys + (ts % length != 0).astype(np.uint64)
        return keys

    def feed(self, mbp1: bytes | memoryview, count: int, max_ts_recv: int) -> tuple[bytes, int]:
        """Take one chunk's mbp-1 records (``count`` of them, 80 bytes each) and the largest
        ts_recv of the whole feed chunk; return the records of the intervals this closed."""
        if count < 0 or len(mbp1) < count * MBP1_DTYPE.itemsize:
            raise ValueError(f"{len(mbp1)} bytes cannot hold {count} mbp-1 records")
        recs = np.frombuffer(mbp1, dtype=MBP1_DTYPE, count=count)
        if count and not (np.all(recs["rtype"] == 0x01) and np.all(recs["length"] == 20)):
            raise ValueError("feed() takes mbp-1 records (rtype 0x01, 80 bytes) only")
        floor = self.key(self.watermark)
        top = max(self.watermark, max_ts_recv, int(recs["ts_recv"].max()) if count else 0)
        if count:
            keys = np.maximum(self._keys(recs["ts_recv"]), np.uint64(floor))
            closed = self._bbo_groups(recs, keys) if self.is_bbo else self._bar_groups(recs, keys)
        else:
            closed = []
        self.watermark = top
        return self._emit(closed, self.key(top))

    def close_until(self, ts: int) -> tuple[bytes, int]:
        """Close the intervals a record with ``ts_recv == ts`` would close."""
        self.watermark = max(self.watermark, ts)
        return self._emit([], self.key(self.watermark))

    # --- per chunk --------------------------------------------------------------------------

    @staticmethod
    def _groups(
        recs: npt.NDArray[np.void], keys: U64
    ) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp], npt.NDArray[np.intp]]:
        """A stable order by (instrument, publisher, interval), and each group's start and
        end (exclusive) positions in it."""
        iid = recs["instrument_id"]
        pub = recs["publisher_id"]
        order = np.lexsort((np.arange(len(recs)), keys, pub, iid))
        k, i, p = keys[order], iid[order], pub[order]
        change = np.ones(len(order), dtype=bool)
        change[1:] = (k[1:] != k[:-1]) | (i[1:] != i[:-1]) | (p[1:] != p[:-1])
        starts = np.flatnonzero(change)
        ends = np.append(starts[1:], len(order))
        return order, starts, ends

    def _bar_groups(self, recs: npt.NDArray[np.void], keys: U64) -> list[tuple[int, Key, _Bar]]:
        trades = recs["action"] == _T
        if not trades.any():
            return []
        recs, keys = recs[trades], keys[trades]
        order, starts, ends = self._groups(recs, keys)
        price = recs["price"][order]
        opens = price[starts].tolist()
        closes = price[ends - 1].tolist()
        highs = np.maximum.reduceat(price, starts).tolist()
        lows = np.minimum.reduceat(price, starts).tolist()
        volumes = np.add.reduceat(recs["size"][order].astype(np.uint64), starts).tolist()
        first = order[starts]
        gkeys = keys[first].tolist()
        iids = recs["instrument_id"][first].tolist()
        pubs = recs["publisher_id"][first].tolist()
        closed: list[tuple[int, Key, _Bar]] = []
        for g, k in enumerate(gkeys):
            inst = (iids[g], pubs[g])
            bar = self._bars.get(inst)
            if bar is not None and bar.key == k:
                bar.high = max(bar.high, highs[g])
                bar.low = min(bar.low, lows[g])
                bar.close = closes[g]
                bar.volume += volumes[g]
                continue
            if bar is not None:  # an earlier interval of this instrument: it is over
                closed.append((bar.key, inst, bar))
            self._bars[inst] = _Bar(k, opens[g], highs[g], lows[g], closes[g], volumes[g])
        return closed

    def _bbo_groups(self, recs: npt.NDArray[np.void], keys: U64) -> list[tuple[int, Key, _Quote]]:
        order, starts, ends = self._groups(recs, keys)
        is_trade = recs["action"][order] == _T
        # position (in sorted order) of the last trade at or before each position
        last_t = np.maximum.accumulate(np.where(is_trade, np.arange(len(order)), -1))
        end_rows = recs[order[ends - 1]]  # one row per group: only those are copied
        end_trade = last_t[ends - 1]
        has_trade = (end_trade >= starts).tolist()
        trade_rows = recs[order[np.maximum(end_trade, 0)]]
        t_price = trade_rows["price"].tolist()
        t_size = trade_rows["size"].tolist()
        t_side = trade_rows["side"].tolist()
        t_ts = trade_rows["ts_event"].tolist()
        levels = list(zip(*(end_rows[n].tolist() for n in _LEVEL_NAMES), strict=True))
        flags = end_rows["flags"].tolist()
        seqs = end_rows["sequence"].tolist()
        gkeys = keys[order[starts]].tolist()
        iids = end_rows["instrument_id"].tolist()
        pubs = end_rows["publisher_id"].tolist()
        closed: list[tuple[int, Key, _Quote]] = []
        for g, k in enumerate(gkeys):
            inst = (iids[g], pubs[g])
            if has_trade[g]:
                trade = (t_price[g], t_size[g], t_side[g], t_ts[g])
                self._last_trade[inst] = trade
            else:
                trade = self._last_trade.get(inst, NO_TRADE)
            quote = self._quotes.get(inst)
            if quote is not None and quote.key != k:
                closed.append((quote.key, inst, quote))
            self._quotes[inst] = _Quote(k, levels[g], flags[g], seqs[g], trade)
        return closed

    # --- closing ----------------------------------------------------------------------------

    def _emit(
        self, closed: list[tuple[int, Key, _Bar]] | list[tuple[int, Key, _Quote]], limit: int
    ) -> tuple[bytes, int]:
        """The records of ``closed`` plus every carried interval before ``limit``."""
        pending: list[tuple[int, Key, _Bar | _Quote]] = list(closed)
        state: dict[Key, _Bar] | dict[Key, _Quote] = self._quotes if self.is_bbo else self._bars
        for inst in [i for i, s in state.items() if s.key < limit]:
            pending.append((state[inst].key, inst, state.pop(inst)))
        if not pending:
            return b"", 0
        pending.sort(key=lambda c: (c[0], c[1]))
        n = len(pending)
        dtype = BBO_DTYPE if self.is_bbo else OHLCV_DTYPE
        out = np.zeros(n, dtype=dtype)
        out["length"] = dtype.itemsize // 4
        out["rtype"] = self.rtype
        out["instrument_id"] = [c[1][0] for c in pending]
        out["publisher_id"] = [c[1][1] for c in pending]
        starts = [c[0] * self.length for c in pending]
        if self.is_bbo:
            quotes = [c[2] for c in pending if isinstance(c[2], _Quote)]
            out["ts_recv"] = starts  # the bbo key is the interval's end
            out["ts_event"] = [q.trade[3] for q in quotes]
            out["price"] = [q.trade[0] for q in quotes]
            out["size"] = [q.trade[1] for q in quotes]
            out["side"] = [q.trade[2] for q in quotes]
            out["flags"] = [q.flags for q in quotes]
            out["sequence"] = [q.sequence for q in quotes]
            for j, name in enumerate(_LEVEL_NAMES):
                out[name] = [q.levels[j] for q in quotes]
        else:
            bars = [c[2] for c in pending if isinstance(c[2], _Bar)]
            out["ts_event"] = starts
            out["open"] = [b.open for b in bars]
            out["high"] = [b.high for b in bars]
            out["low"] = [b.low for b in bars]
            out["close"] = [b.close for b in bars]
            out["volume"] = [b.volume for b in bars]
        return out.tobytes(), n
