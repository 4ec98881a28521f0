"""The embedded demo feed: deterministic, realistic-looking trades, MBP-1 and OHLCV-1s,
or (``schemas=mbo``, alone) MBO order flow whose books are valid (gateway/feeds/synthetic_mbo.py).

Records are generated with numpy structured arrays (one array per schema per tick), so
the feed costs a few vectorised operations per tick however high the rate. The same
seed gives the same instruments, prices and sizes; timestamps are wall-clock.
Every trade and MBP-1 record carries a per-feed ``sequence`` number, which tests use to
check order.

``rate`` is at most ``MAX_RATE`` (1,000,000 records/s): far above what one gateway core
fans out, and small enough that a tick's arrays stay a few MB. After a stall the feed
catches up at most one second of records. If the generator task ever dies the feed is
marked down and its sessions are told.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from gateway.aio import cancel_and_wait
from gateway.dbn import index_records
from gateway.feeds.base import Feed
from gateway.feeds.synthetic_mbo import MboGenerator

__all__ = [
    "ALL_SCHEMAS",
    "MAX_RATE",
    "MBP1_DTYPE",
    "OHLCV_DTYPE",
    "TRADE_DTYPE",
    "parse_schemas",
    "SyntheticOptions",
    "SyntheticSource",
]

log = logging.getLogger("gateway.feed")

#: records per second, the most ``synthetic:?rate=`` accepts
MAX_RATE: Final = 1_000_000

_HEADER = [
    ("length", "u1"),
    ("rtype", "u1"),
    ("publisher_id", "<u2"),
    ("instrument_id", "<u4"),
    ("ts_event", "<u8"),
]
_TRADE_BODY = [
    ("price", "<i8"),
    ("size", "<u4"),
    ("action", "S1"),
    ("side", "S1"),
    ("flags", "u1"),
    ("depth", "u1"),
    ("ts_recv", "<u8"),
    ("ts_in_delta", "<i4"),
    ("sequence", "<u4"),
]
TRADE_DTYPE: Final = np.dtype(_HEADER + _TRADE_BODY)
MBP1_DTYPE: Final = np.dtype(
    _HEADER
    + _TRADE_BODY
    + [
        ("bid_px_00", "<i8"),
        ("ask_px_00", "<i8"),
        ("bid_sz_00", "<u4"),
        ("ask_sz_00", "<u4"),
        ("bid_ct_00", "<u4"),
        ("ask_ct_00", "<u4"),
    ]
)
OHLCV_DTYPE: Final = np.dtype(
    _HEADER
    + [("open", "<i8"), ("high", "<i8"), ("low", "<i8"), ("close", "<i8"), ("volume", "<u8")]
)
assert TRADE_DTYPE.itemsize == 48 and MBP1_DTYPE.itemsize == 80 and OHLCV_DTYPE.itemsize == 56

_ROOTS: Final = (
    "AAPL MSFT NVDA AMZN GOOGL META TSLA JPM V XOM UNH JNJ WMT PG MA HD CVX MRK "
    "ABBV KO PEP COST AVGO ADBE CSCO CRM TMO ACN MCD NFLX"
).split()
_TICK: Final = 10_000_000  # $0.01 in DBN fixed-point (1e-9)
_FLAG_LAST: Final = 0x80
_PUBLISHER: Final = 1
SCHEMAS: Final = ("trades", "mbp-1", "ohlcv-1s")
#: what ``schemas=`` accepts: any of SCHEMAS, or ``mbo`` alone (order flow whose books are
#: valid; trades, mbp-1 and the rest are then the gateway's to derive from it)
ALL_SCHEMAS: Final = (*SCHEMAS, "mbo")


def parse_schemas(text: str) -> tuple[str, ...]:
    """``schemas=`` of a synthetic feed URI: ValueError saying what is accepted."""
    schemas = tuple(s for s in text.split(",") if s)
    bad = [s for s in schemas if s not in ALL_SCHEMAS]
    if bad or not schemas:
        raise ValueError(
            f"synthetic schemas are trades, mbp-1, ohlcv-1s, or mbo alone (got {text!r})"
        )
    if "mbo" in schemas and len(set(schemas)) > 1:
        raise ValueError(f"synthetic schemas: mbo goes alone (got {text!r})")
    return tuple(dict.fromkeys(schemas))


@dataclass(frozen=True)
class SyntheticOptions:
    #: trades and mbp-1 records per second (a quarter of them trades when both are on);
    #: ohlcv-1s bars come on top, one per traded instrument a second
    rate: float = 2000.0
    instruments: int = 50
    seed: int = 7
    tick_s: float = 0.01
    schemas: tuple[str, ...] = SCHEMAS

    def __post_init__(self) -> None:
        parse_schemas(",".join(self.schemas))


def instrument_table(count: int) -> list[tuple[str, int]]:
    """(raw_symbol, instrument_id) for the synthetic universe."""
    out = []
    for i in range(count):
        root = _ROOTS[i % len(_ROOTS)]
        symbol = root if i < len(_ROOTS) else f"{root}.{i // len(_ROOTS)}"
        out.append((symbol, 1000 + i))
    return out


class SyntheticGenerator:
    """Pure generator: ``make(n, now_ns, span_ns)`` returns chunks of whole records."""

    def __init__(self, options: SyntheticOptions) -> None:
        self.options = options
        self.rng = np.random.default_rng(options.seed)
        self.instruments = instrument_table(options.instruments)
        n = len(self.instruments)
        self.ids = np.array([iid for _, iid in self.instruments], dtype=np.uint32)
        self.mid = (self.rng.uniform(20, 500, n) * 100).astype(np.int64) * _TICK
        # Zipf-like popularity: a few names trade much more than the rest.
        weights = 1.0 / np.arange(1, n + 1) ** 1.1
        self.weights = weights / weights.sum()
        self.sequence = 0
        self.bar_open = self.mid.copy()
        self.bar_high = self.mid.copy()
        self.bar_low = self.mid.copy()
        self.bar_volume = np.zeros(n, dtype=np.uint64)
        self.bar_second = 0
        #: the MBO mode's generator (``schemas=mbo``): then ``make`` is its
        self.mbo: MboGenerator | None = None
        if "mbo" in options.schemas:
            self.mbo = MboGenerator(
                options.seed, self.ids, self.mid, self.weights, _TICK, _PUBLISHER
            )

    def _seq(self, n: int) -> npt.NDArray[np.uint32]:
        seq = (np.arange(self.sequence, self.sequence + n, dtype=np.uint64) % 2**32).astype(
            np.uint32
        )
        self.sequence += n
        return seq

    def make(self, n: int, now_ns: int, span_ns: int) -> list[bytes]:
        if self.mbo is not None:
            return self.mbo.make(n, now_ns, span_ns)
        chunks: list[bytes] = []
        opts = self.options
        second = now_ns // 1_000_000_000
        if "ohlcv-1s" in opts.schemas and self.bar_second and second > self.bar_second:
            chunks.append(self._bars((self.bar_second + 1) * 1_000_000_000))
        if self.bar_second != second:
            self.bar_second = second
        if n <= 0:
            return chunks
        pick = self.rng.choice(len(self.ids), size=n, p=self.weights)
        steps = self.rng.integers(-2, 3, size=n) * _TICK
        np.add.at(self.mid, pick, steps)
        np.maximum(self.mid, _TICK * 100, out=self.mid)
        ts = (
            now_ns
            - span_ns
            + np.sort(self.rng.integers(0, max(span_ns, 1), size=n)).astype(np.int64)
        )
        mid = self.mid[pick]
        sizes = self.rng.integers(1, 500, size=n).astype(np.uint32)
        want_trades = "trades" in opts.schemas
        want_mbp = "mbp-1" in opts.schemas
        n_trades = n // 4 if want_trades and want_mbp else (n if want_trades else 0)
        if n_trades:
            rec = np.zeros(n_trades, dtype=TRADE_DTYPE)
            sel = slice(0, n_trades)
            self._fill(rec, 0x00, pick[sel], ts[sel], mid[sel], sizes[sel], b"T")
            np.maximum.at(self.bar_high, pick[sel], mid[sel])
            np.minimum.at(self.bar_low, pick[sel], mid[sel])
            np.add.at(self.bar_volume, pick[sel], sizes[sel].astype(np.uint64))
            chunks.append(rec.tobytes())
        if want_mbp and n - n_trades > 0:
            m = n - n_trades
            rec = np.zeros(m, dtype=MBP1_DTYPE)
            sel = slice(n_trades, n)
            self._fill(rec, 0x01, pick[sel], ts[sel], mid[sel], sizes[sel], b"A")
            rec["bid_px_00"] = mid[sel] - _TICK
            rec["ask_px_00"] = mid[sel] + _TICK
            rec["bid_sz_00"] = self.rng.integers(1, 2000, size=m)
            rec["ask_sz_00"] = self.rng.integers(1, 2000, size=m)
            rec["bid_ct_00"] = self.rng.integers(1, 40, size=m)
            rec["ask_ct_00"] = self.rng.integers(1, 40, size=m)
            chunks.append(rec.tobytes())
        return chunks

    def _fill(
        self,
        rec: npt.NDArray[np.void],
        rtype: int,
        pick: npt.NDArray[np.intp],
        ts: npt.NDArray[np.int64],
        price: npt.NDArray[np.int64],
        sizes: npt.NDArray[np.uint32],
        action: bytes,
    ) -> None:
        n = len(rec)
        rec["length"] = rec.dtype.itemsize // 4
        rec["rtype"] = rtype
        rec["publisher_id"] = _PUBLISHER
        rec["instrument_id"] = self.ids[pick]
        rec["ts_recv"] = ts
        rec["ts_event"] = ts - self.rng.integers(1_000, 50_000, size=n)
        rec["ts_in_delta"] = self.rng.integers(5_000, 30_000, size=n)
        rec["price"] = price
        rec["size"] = sizes
        rec["action"] = action
        rec["side"] = np.where(self.rng.random(n) < 0.5, b"A", b"B")
        rec["flags"] = _FLAG_LAST
        rec["sequence"] = self._seq(n)

    def _bars(self, ts_event: int) -> bytes:
        n = len(self.ids)
        rec = np.zeros(n, dtype=OHLCV_DTYPE)
        rec["length"] = OHLCV_DTYPE.itemsize // 4
        rec["rtype"] = 0x20
        rec["publisher_id"] = _PUBLISHER
        rec["instrument_id"] = self.ids
        rec["ts_event"] = ts_event - 1_000_000_000
        rec["open"] = self.bar_open
        rec["high"] = self.bar_high
        rec["low"] = self.bar_low
        rec["close"] = self.mid
        rec["volume"] = self.bar_volume
        traded = self.bar_volume > 0
        out = rec[traded].tobytes()
        self.bar_open = self.mid.copy()
        self.bar_high = self.mid.copy()
        self.bar_low = self.mid.copy()
        self.bar_volume[:] = 0
        return out


class SyntheticSource:
    kind = "synthetic"

    def __init__(self, feed: Feed, options: SyntheticOptions) -> None:
        self.feed = feed
        self.options = options
        self.generator = SyntheticGenerator(options)
        self._task: asyncio.Task[None] | None = None
        feed.schemas = frozenset(options.schemas)  # other schemas are never served

    async def start(self) -> None:
        self.feed.learn_many(self.generator.instruments)
        self.feed.set_state(True, "synthetic feed running", notify=False)
        self._task = asyncio.get_running_loop().create_task(self._run())
        self._task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        log.error("feed %s: synthetic generator stopped: %r", self.feed.dataset, exc, exc_info=exc)
        self.feed.set_state(False, "synthetic feed stopped (internal error)")

    async def stop(self) -> None:
        if self._task is not None and self._task.done():
            return  # ended on its own (its exception was logged by _task_done)
        await cancel_and_wait(self._task)

    async def _run(self) -> None:
        opts = self.options
        loop = asyncio.get_running_loop()
        owed = 0.0
        last = loop.time()
        while True:
            await asyncio.sleep(opts.tick_s)
            now = loop.time()
            # After a stall (a blocked loop, a suspended process) catch up one second at most.
            owed = min(owed + (now - last) * opts.rate, max(opts.rate, 1.0))
            span = int((now - last) * 1e9)
            last = now
            n = int(owed)
            owed -= n
            for chunk in self.generator.make(n, time.time_ns(), span):
                if chunk:
                    index, _ = index_records(chunk)
                    self.feed.publish(index)
