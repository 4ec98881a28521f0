"""The synthetic feed's MBO mode (gateway/feeds/synthetic_mbo.py): its records, applied to
the reference book (gateway/books/reference.py), always describe a valid book; the flow
mixes every kind of MBO event; it is deterministic per seed and keeps up with the feed's
rate limit. The other schemas' output is unchanged (a digest taken before the mode came)."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pytest

from gateway.books.reference import F_LAST, UNDEF_PRICE, Books, Mbo, parse_mbo
from gateway.dbn.index import ChunkIndex
from gateway.feeds.base import Feed
from gateway.feeds.synthetic import (
    MAX_RATE,
    SyntheticGenerator,
    SyntheticOptions,
    SyntheticSource,
    parse_schemas,
)
from gateway.feeds.synthetic_mbo import MAX_BATCH, MBO_DTYPE
from tests.support.waiting import apoll_until

T0 = 1_764_000_000_000_000_000
TICK_NS = 10_000_000


def mbo_options(instruments: int = 5, seed: int = 7, rate: float = 2000.0) -> SyntheticOptions:
    return SyntheticOptions(rate=rate, instruments=instruments, seed=seed, schemas=("mbo",))


def generate(gen: SyntheticGenerator, sizes: list[int], t0: int = T0) -> bytes:
    out = []
    for i, n in enumerate(sizes):
        out += gen.make(n, t0 + (i + 1) * TICK_NS, TICK_NS)
    return b"".join(out)


def split(data: bytes) -> list[Mbo]:
    assert len(data) % 56 == 0
    return [parse_mbo(data[i : i + 56]) for i in range(0, len(data), 56)]


@dataclass
class Checker:
    """Applies records to the reference books, asserting the rules of a valid MBO stream
    at every record; counts what it saw."""

    books: Books = field(default_factory=Books)
    seen: set[int] = field(default_factory=set)
    sequence: int = -1
    ts_recv: int = 0
    event: list[Mbo] = field(default_factory=list)
    kinds: Counter[str] = field(default_factory=Counter)

    def feed(self, records: list[Mbo]) -> None:
        for m in records:
            if self.sequence >= 0:
                assert m.sequence == (self.sequence + 1) % 2**32, "sequence is per record"
            self.sequence = m.sequence
            assert m.ts_recv >= self.ts_recv, "records in ts_recv order"
            self.ts_recv = m.ts_recv
            assert m.ts_event < m.ts_recv and m.publisher_id == 1 and m.channel_id == 0
            if self.event:
                assert m.instrument_id == self.event[0].instrument_id, "an event is one book"
            self.event.append(m)
            if m.flags & F_LAST:
                assert m.flags == F_LAST
                self._event(self.event)
                self.event = []
            else:
                assert m.flags == 0
        assert not self.event or self.event[0].action == "T"

    def _event(self, ev: list[Mbo]) -> None:
        first = ev[0]
        if first.instrument_id not in self.seen:
            assert first.action == "R", "an instrument's first record is an R"
            self.seen.add(first.instrument_id)
        if first.action == "T":
            self._trade(ev)
        else:
            assert len(ev) == 1, f"only trades span records: {[r.action for r in ev]}"
            self._single(first)
        for m in ev:
            self.books.apply(m)
            self._uncrossed(m)

    def _single(self, m: Mbo) -> None:
        book = self.books.book(m.instrument_id, m.publisher_id)
        order = book.by_id.get(m.order_id)
        if m.action == "R":
            assert (m.side, m.price, m.size, m.order_id) == ("N", UNDEF_PRICE, 0, 0)
            self.kinds["R"] += 1
            return
        assert m.side in ("A", "B") and 0 < m.price < UNDEF_PRICE and m.size > 0
        if m.action == "A":
            assert order is None, "an add's order_id is new"
            self.kinds["add"] += 1
        elif m.action == "C":
            assert order is not None, "a cancel names a resting order"
            assert (m.side, m.price) == (order.side, order.price)
            assert m.size <= order.size
            self.kinds["cancel" if m.size == order.size else "partial cancel"] += 1
        elif m.action == "M":
            assert order is not None, "a modify names a resting order"
            assert m.side == order.side
            if m.price != order.price:
                self.kinds["modify price (priority lost)"] += 1
            elif m.size > order.size:
                self.kinds["modify up (priority lost)"] += 1
            else:
                assert m.size < order.size, "a modify changes something"
                self.kinds["modify down (priority kept)"] += 1
        else:
            raise AssertionError(f"unexpected action {m.action!r}")

    def _trade(self, ev: list[Mbo]) -> None:
        t, rest = ev[0], ev[1:]
        n = len(rest) // 2
        assert n >= 1 and len(rest) == 2 * n
        fills, cancels = rest[:n], rest[n:]
        assert t.order_id == 0 and t.side in ("A", "B") and t.size > 0
        assert [f.action for f in fills] == ["F"] * n and [c.action for c in cancels] == ["C"] * n
        assert sum(f.size for f in fills) == t.size
        hit = "A" if t.side == "B" else "B"
        book = self.books.book(t.instrument_id, t.publisher_id)
        best = book.levels(hit, 1)
        assert best and best[0][0] == t.price, "a trade is at the best price of the side hit"
        queue = list((book.asks if hit == "A" else book.bids)[t.price].values())
        assert len(queue) >= n
        for i, (f, c) in enumerate(zip(fills, cancels, strict=True)):
            assert f.order_id == queue[i].order_id, "fills take the oldest orders first"
            assert (f.side, f.price) == (hit, t.price) and f.size > 0
            if i < n - 1:
                assert f.size == queue[i].size, "only the last fill may be partial"
            else:
                assert f.size <= queue[i].size
                if f.size < queue[i].size:
                    self.kinds["partial fill"] += 1
            assert (c.order_id, c.side, c.price, c.size) == (f.order_id, hit, t.price, f.size)
        self.kinds["trade"] += 1
        self.kinds["fills"] += n
        if n > 1:
            self.kinds["trade of several fills"] += 1

    def _uncrossed(self, m: Mbo) -> None:
        bid, ask = self.books.book(m.instrument_id, m.publisher_id).bbo()
        if bid is not None and ask is not None:
            assert bid[0] < ask[0], f"crossed book after {m}"


def assert_state_matches(gen: SyntheticGenerator, books: Books) -> None:
    """The generator's own view of the resting orders (in priority order) is the book."""
    mbo = gen.mbo
    assert mbo is not None
    ref = {
        (iid, o.side, o.price): [x.order_id for x in lvl.values()]
        for (iid, _), book in books.books.items()
        for o in book.by_id.values()
        for lvl in [(book.bids if o.side == "B" else book.asks)[o.price]]
    }
    ours: dict[tuple[int, str, int], list[int]] = {}
    sizes = {}
    for inst, side, px, sz, oid in zip(
        mbo.o_inst.tolist(),
        mbo.o_side.tolist(),
        mbo.o_px.tolist(),
        mbo.o_sz.tolist(),
        mbo.o_id.tolist(),
        strict=True,
    ):
        key = (int(gen.ids[inst]), "BA"[side], px * mbo.tick)
        ours.setdefault(key, []).append(oid)
        sizes[oid] = sz
    assert ours == ref
    for book in books.books.values():
        for o in book.by_id.values():
            assert sizes[o.order_id] == o.size


# --- validity -----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2])
def test_the_stream_is_a_valid_book_for_the_reference(seed: int) -> None:
    gen = SyntheticGenerator(mbo_options(instruments=6, seed=seed))
    sizes = np.random.default_rng(seed).integers(0, 300, size=150).tolist()
    checker = Checker()
    checker.feed(split(generate(gen, sizes)))
    assert len(checker.seen) == 6
    assert checker.books.orders_held > 0
    assert_state_matches(gen, checker.books)
    # The mix: every kind of event, adds and cancels dominant, trades a few percent.
    k = checker.kinds
    events = sum(k[x] for x in k if x not in ("fills", "partial fill", "trade of several fills"))
    for kind in (
        "add",
        "cancel",
        "partial cancel",
        "modify down (priority kept)",
        "modify price (priority lost)",
        "modify up (priority lost)",
        "trade",
        "trade of several fills",
        "partial fill",
    ):
        assert k[kind] > 0, f"no {kind} in {k}"
    assert 0.3 < k["add"] / events < 0.7
    assert 0.03 < k["trade"] / events < 0.2
    assert k["R"] == 6


def test_large_batches_with_deep_books_stay_valid() -> None:
    """A catch-up after a stall (a make() over MAX_BATCH records, split in batches) on
    many instruments: books grow deep, trades sweep several orders, all still valid."""
    gen = SyntheticGenerator(mbo_options(instruments=30, seed=5))
    data = generate(gen, [MAX_BATCH * 2 + 5, 3_000, 12_000])
    checker = Checker()
    checker.feed(split(data))
    assert_state_matches(gen, checker.books)
    assert checker.kinds["trade of several fills"] > 10


def test_one_book_from_empty_in_tiny_batches() -> None:
    """One instrument, a record or two a call: the book starts empty (the first cancels,
    modifies and trades find nothing and become adds), fills and stays valid."""
    gen = SyntheticGenerator(mbo_options(instruments=1, seed=3))
    checker = Checker()
    checker.feed(split(generate(gen, [1] * 300 + [2] * 300)))
    assert checker.kinds["trade"] > 0
    assert_state_matches(gen, checker.books)


# --- determinism, rate ------------------------------------------------------------------


def test_same_seed_same_records_other_seed_other_records() -> None:
    sizes = [50, 0, 1, 700, 20_000, 3]
    a = generate(SyntheticGenerator(mbo_options(seed=9)), sizes)
    b = generate(SyntheticGenerator(mbo_options(seed=9)), sizes)
    c = generate(SyntheticGenerator(mbo_options(seed=10)), sizes)
    assert a == b
    assert a[: 56 * 50] != c[: 56 * 50]
    # Timestamps come from the clock given; nothing else does.
    d = generate(SyntheticGenerator(mbo_options(seed=9)), sizes, t0=T0 + 123_456_789)
    ra = np.frombuffer(a, MBO_DTYPE)
    rd = np.frombuffer(d, MBO_DTYPE)
    assert (rd["ts_recv"] - ra["ts_recv"] == 123_456_789).all()
    for name in ("order_id", "price", "size", "action", "side", "flags", "sequence"):
        assert (ra[name] == rd[name]).all()


def test_the_records_made_follow_the_records_asked() -> None:
    """A trade is several records, so a call makes about, not exactly, what it is asked
    for: the difference is carried into the next calls, and the totals agree."""
    gen = SyntheticGenerator(mbo_options(instruments=20, seed=4))
    asked = 0
    got = 0
    worst = 0
    for n in np.random.default_rng(4).integers(0, 2_000, size=300).tolist():
        asked += n
        got += sum(len(c) for c in gen.make(n, T0, TICK_NS)) // 56
        worst = max(worst, abs(got - asked))
    assert asked > 250_000
    assert worst < 1_000  # about half a call at most (while the books first fill)
    assert abs(got - asked) < 0.005 * asked  # what the last call owes


def test_the_generator_keeps_up_with_the_rate_limit() -> None:
    """MAX_RATE records/s in 100 ticks of a second need well under a CPU second."""
    gen = SyntheticGenerator(mbo_options(instruments=50, seed=8))
    gen.make(MAX_RATE // 100, T0, TICK_NS)  # warm: the books fill
    started = time.process_time()
    made = sum(
        len(c) for i in range(100) for c in gen.make(MAX_RATE // 100, T0 + i * TICK_NS, TICK_NS)
    )
    cpu = time.process_time() - started
    assert made // 56 >= MAX_RATE * 0.99
    assert cpu < 2.0, f"{cpu:.2f} CPU s for a second of records at the rate limit"


async def test_the_source_publishes_mbo_at_its_rate() -> None:
    feed = Feed("SYN.MBO")
    records: list[int] = []
    rtypes: set[int] = set()

    def publish(index: ChunkIndex) -> None:
        records.append(index.count)
        rtypes.update(index.rtype_set)

    feed.publish = publish  # type: ignore[method-assign]
    rate = 100_000
    source = SyntheticSource(feed, mbo_options(instruments=20, rate=rate))
    assert feed.schemas == frozenset({"mbo"})
    await source.start()
    started = time.monotonic()
    try:
        assert await apoll_until(lambda: sum(records) >= rate // 2, timeout=20)
        elapsed = time.monotonic() - started
        await asyncio.sleep(0)
    finally:
        await source.stop()
    assert rtypes == {0xA0}
    # Records of the time that passed, within a tick and a trade's surplus.
    assert sum(records) <= rate * (elapsed + 0.05) + 200


# --- options ------------------------------------------------------------------------------


def test_schemas_option() -> None:
    assert parse_schemas("mbo") == ("mbo",)
    assert parse_schemas("trades,mbp-1") == ("trades", "mbp-1")
    for bad in ("mbo,trades", "mbp-10", "", ","):
        with pytest.raises(ValueError, match="synthetic schemas"):
            parse_schemas(bad)
    with pytest.raises(ValueError, match="mbo goes alone"):
        SyntheticOptions(schemas=("mbo", "ohlcv-1s"))


def test_other_schemas_are_unchanged_by_the_mbo_mode() -> None:
    """The digest of the trades / mbp-1 / ohlcv-1s output, taken before the MBO mode."""
    h = hashlib.sha256()
    for opts in (
        SyntheticOptions(instruments=7, seed=11),
        SyntheticOptions(instruments=3, seed=2, schemas=("trades",)),
        SyntheticOptions(instruments=5, seed=4, schemas=("mbp-1", "ohlcv-1s")),
    ):
        gen = SyntheticGenerator(opts)
        assert gen.mbo is None
        for i, n in enumerate((0, 5, 40, 1, 333, 17, 0, 250)):
            for chunk in gen.make(n, T0 + i * 400_000_000, 400_000_000):
                h.update(chunk)
    assert h.hexdigest() == "7bda4d388eb709ffbf0f254f18145b6a7841febe9f571e799844c618e03c9c1d"
