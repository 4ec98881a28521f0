"""The numpy interval builders (gateway/books/intervals.py) against the pure-Python reference
(gateway/books/derive_reference.py): the same bytes whatever the chunk boundaries, on
hypothesis MBO streams; closing by the feed's largest ts_recv; bad input; record layouts
read back by databento_dbn."""

from __future__ import annotations

import random
import time

import databento_dbn as d
import numpy as np
import pytest
from hypothesis import given, strategies as st

from gateway.books.derive_reference import Deriver, derive
from gateway.books.intervals import INTERVALS, MBP1_DTYPE, IntervalBuilder
from gateway.books.reference import parse_mbo
from tests.unit.test_books_derive import PROPS, T0, S, decode, mbo, mbo_streams, seeded_flow

SCHEMAS = list(INTERVALS)


def mbp1_of(records: list[bytes]) -> list[bytes]:
    deriver = Deriver(["mbp-1"])
    return [r for raw in records for r in deriver.feed(raw)["mbp-1"]]


@PROPS
@given(
    mbo_streams(max_size=120),
    st.lists(st.integers(0, 120), max_size=8),  # chunk boundaries
    st.lists(st.sampled_from([0, 0, 0, 1, S, 90 * S]), min_size=10, max_size=10),  # bumps
)
def test_chunked_builders_equal_the_reference_at_every_chunk_end(
    stream: list[bytes], cuts: list[int], bumps: list[int]
) -> None:
    # a bump: the chunk also held a non-MBO record (say a statistics record) with a later
    # ts_recv than its last MBO record; it closes intervals like any record
    bounds = sorted({0, len(stream), *(c for c in cuts if c < len(stream))})
    reference = Deriver(SCHEMAS)
    mbp1 = Deriver(["mbp-1"])
    builders = {s: IntervalBuilder(s) for s in SCHEMAS}
    want: dict[str, list[bytes]] = {s: [] for s in SCHEMAS}
    got: dict[str, bytes] = {s: b"" for s in SCHEMAS}
    counts = dict.fromkeys(SCHEMAS, 0)
    for n, (lo, hi) in enumerate(zip(bounds, bounds[1:], strict=False)):
        chunk = stream[lo:hi]
        top = max(parse_mbo(r).ts_recv for r in chunk) + bumps[n % len(bumps)]
        for raw in chunk:
            for s, recs in reference.feed(raw).items():
                want[s].extend(recs)
        for s, recs in reference.close_until(top).items():
            want[s].extend(recs)
        recs = [r for raw in chunk for r in mbp1.feed(raw)["mbp-1"]]
        for s, builder in builders.items():
            data, count = builder.feed(b"".join(recs), len(recs), top)
            got[s] += data
            counts[s] += count
            assert got[s] == b"".join(want[s]), (s, n)
            assert counts[s] == len(want[s])
    end = reference.watermark + 3 * 86400 * S
    for s, recs in reference.flush().items():
        want[s].extend(recs)
    for s, builder in builders.items():
        got[s] += builder.close_until(end)[0]
        assert got[s] == b"".join(want[s]), s
        assert builder.open_intervals == 0


def test_a_quiet_instrument_closes_by_the_feeds_largest_ts_recv() -> None:
    recs = mbp1_of([mbo("A", 1, 100, 5, ts=T0 + 5), mbo("T", 0, 100, 2, ts=T0 + 6)])
    for schema in SCHEMAS:
        builder = IntervalBuilder(schema)
        assert builder.feed(b"".join(recs), len(recs), T0 + 6) == (b"", 0)
        # a chunk with no mbp-1 record at all, only later records of other kinds
        _, length, end_inclusive = INTERVALS[schema]
        end = T0 + length
        assert builder.feed(b"", 0, end if end_inclusive else end - 1) == (b"", 0)
        data, count = builder.feed(b"", 0, end + 1 if end_inclusive else end)
        (rec,) = decode([data])
        assert count == 1 and rec.instrument_id == 7
        if end_inclusive:
            assert (rec.ts_recv, rec.price, rec.size, rec.sequence) == (end, 100, 2, 0)
        else:
            assert (rec.ts_event, rec.open, rec.volume) == (T0, 100, 2)


def test_close_until_and_the_order_of_records_closing_together() -> None:
    stream = [
        mbo("T", 0, 100 + i, 1, ts=T0 + i * S // 3, instrument_id=9 - i % 3) for i in range(9)
    ]
    recs = mbp1_of(stream)
    builder = IntervalBuilder("ohlcv-1s")
    assert builder.feed(b"".join(recs), len(recs), T0 + 2 * S + 1)[1] == 6
    data, count = builder.close_until(T0 + 3 * S)
    assert count == 3
    assert [(b.ts_event - T0, b.instrument_id) for b in decode([data])] == [
        (2 * S, 7),
        (2 * S, 8),
        (2 * S, 9),
    ]
    assert builder.close_until(T0) == (b"", 0)  # time does not go back


def test_a_late_record_counts_in_the_earliest_open_interval() -> None:
    builder = IntervalBuilder("ohlcv-1s")
    assert builder.feed(b"", 0, T0 + 5 * S)[1] == 0
    recs = mbp1_of([mbo("T", 0, 100, 2, ts=T0 + 1)])  # before the watermark
    builder.feed(b"".join(recs), 1, T0 + 5 * S)
    (bar,) = decode([builder.close_until(T0 + 6 * S)[0]])
    assert bar.ts_event == T0 + 5 * S


def test_bad_input_gets_a_clear_error() -> None:
    with pytest.raises(ValueError, match="interval schema"):
        IntervalBuilder("ohlcv-1w")
    builder = IntervalBuilder("bbo-1s")
    with pytest.raises(ValueError, match="cannot hold"):
        builder.feed(b"\x00" * 100, 2, T0)
    trade = bytes(
        d.TradeMsg(
            publisher_id=1,
            instrument_id=7,
            ts_event=T0,
            price=1,
            size=1,
            action=d.Action.TRADE,  # type: ignore[arg-type]
            side=d.Side.BID,  # type: ignore[arg-type]
            depth=0,
            ts_recv=T0,
        )
    )
    with pytest.raises(ValueError, match="mbp-1 records"):
        builder.feed(trade + trade[:32], 1, T0)


def test_a_large_chunk_is_built_in_numpy() -> None:
    # 200k mbp-1 records over 500 instruments and 60 seconds in one chunk: a figure, and a
    # loose bound (a Python loop over records would take several seconds)
    n = 200_000
    rng = np.random.default_rng(7)
    recs = np.zeros(n, dtype=MBP1_DTYPE)
    recs["length"], recs["rtype"], recs["publisher_id"] = 20, 1, 1
    recs["instrument_id"] = rng.integers(1, 501, n)
    recs["ts_recv"] = T0 + np.sort(rng.integers(0, 60 * S, n)).astype(np.uint64)
    recs["action"] = np.where(rng.random(n) < 0.2, ord("T"), ord("A"))
    recs["price"] = rng.integers(100, 200, n)
    recs["size"] = rng.integers(1, 10, n)
    data = recs.tobytes()
    for schema in ("bbo-1s", "ohlcv-1s"):
        builder = IntervalBuilder(schema)
        start = time.perf_counter()
        _, count = builder.feed(data, n, T0 + 61 * S)
        took = time.perf_counter() - start
        print(f"{schema}: {n} mbp-1 records, {count} intervals closed, {took * 1e3:.0f} ms")
        assert count > 20_000 and took < 5.0


def test_a_long_seeded_flow_in_random_chunks_equals_the_reference() -> None:
    stream = seeded_flow(6000, seed=5)
    rng = random.Random(11)
    bounds = sorted({0, len(stream), *(rng.randrange(len(stream)) for _ in range(60))})
    reference = derive(stream, SCHEMAS)
    mbp1 = Deriver(["mbp-1"])
    builders = {s: IntervalBuilder(s) for s in SCHEMAS}
    got = dict.fromkeys(SCHEMAS, b"")
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        recs = [r for raw in stream[lo:hi] for r in mbp1.feed(raw)["mbp-1"]]
        top = max(parse_mbo(r).ts_recv for r in stream[lo:hi])
        for s, builder in builders.items():
            got[s] += builder.feed(b"".join(recs), len(recs), top)[0]
    for s, builder in builders.items():
        got[s] += builder.close_until(parse_mbo(stream[-1]).ts_recv + 2 * 86400 * S)[0]
        assert got[s] == b"".join(reference[s]) and reference[s], s
