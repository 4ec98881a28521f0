"""The derived-schema reference (gateway/books/derive_reference.py): record layouts checked
with databento_dbn's own classes, the rules one by one, the real samples, and cross-schema
properties on hypothesis-generated MBO streams (R, F_TOB, unknown-order modifies, partial
cancels, trades, several books, events spanning records).

The real samples under tests/data/dbn/ hold a handful of records per schema and do not share
a starting book (each schema's file starts at another point of the session): they check the
shapes of our records (rtype, size, field layout), they cannot be an end-to-end oracle.

When gateway/books/native.py imports, NativeBooks.apply's trades, mbp-1 and mbp-10 bytes
must equal this reference's, on the hypothesis streams and on the real MBO samples.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import databento_dbn as d
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings, strategies as st

from gateway.books.derive_reference import (
    SCHEMAS,
    UNDEF_TIMESTAMP,
    Deriver,
    derive,
    iter_records,
)
from gateway.books.reference import F_LAST, F_TOB, UNDEF_PRICE, Books, parse_mbo

ACTIONS = {
    "A": d.Action.ADD,
    "C": d.Action.CANCEL,
    "M": d.Action.MODIFY,
    "R": d.Action.CLEAR,
    "T": d.Action.TRADE,
    "F": d.Action.FILL,
    "N": d.Action.NONE,
}
SIDES = {"B": d.Side.BID, "A": d.Side.ASK, "N": d.Side.NONE}
DATA = Path(__file__).parents[1] / "data" / "dbn"
S = 1_000_000_000
T0 = 1_699_920_000 * S  # a UTC midnight (2023-11-14T00:00:00Z): a whole second, minute, hour, day


def mbo(
    action: str,
    order_id: int = 0,
    price: int = 0,
    size: int = 0,
    side: str = "B",
    flags: int = F_LAST,
    ts: int = T0,
    instrument_id: int = 7,
    publisher_id: int = 1,
    sequence: int = 0,
) -> bytes:
    """One MBO record, built by databento_dbn (ts_event = ts_recv - 100, ts_in_delta 42)."""
    return bytes(
        d.MBOMsg(
            publisher_id=publisher_id,
            instrument_id=instrument_id,
            ts_event=ts - 100,
            order_id=order_id,
            price=price,
            size=size,
            action=ACTIONS[action],  # type: ignore[arg-type]  # stubs: enum members as str
            side=SIDES[side],  # type: ignore[arg-type]
            ts_recv=ts,
            flags=flags,
            channel_id=0,
            ts_in_delta=42,
            sequence=sequence,
        )
    )


def decode(records: Iterable[bytes]) -> list[Any]:
    """databento_dbn's view of our bytes (records only, no metadata)."""
    decoder = d.DBNDecoder(has_metadata=False, input_version=3)
    decoder.write(b"".join(records))
    return list(decoder.decode())


def levels_of(rec: Any, n: int) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]:
    """A decoded mbp record's levels as the reference book shows them (empty levels dropped)."""
    bids = [(lv.bid_px, lv.bid_sz, lv.bid_ct) for lv in rec.levels[:n] if lv.bid_px != UNDEF_PRICE]
    asks = [(lv.ask_px, lv.ask_sz, lv.ask_ct) for lv in rec.levels[:n] if lv.ask_px != UNDEF_PRICE]
    return bids, asks


def feed_all(*records: bytes) -> list[dict[str, list[bytes]]]:
    deriver = Deriver()
    return [deriver.feed(r) for r in records]


# --- layouts: our bytes == databento_dbn's bytes for the same fields -------------------------


def test_trade_and_mbp_bytes_equal_databento_dbn_records() -> None:
    out = feed_all(
        mbo("A", 1, 100, 5, sequence=3),
        mbo("A", 2, 103, 4, side="A", sequence=4),
        mbo("T", 0, 103, 2, side="B", ts=T0 + 7, sequence=5),
    )[-1]
    fields = dict(
        publisher_id=1,
        instrument_id=7,
        ts_event=T0 + 7 - 100,
        price=103,
        size=2,
        action=d.Action.TRADE,
        side=d.Side.BID,
        depth=0,
        ts_recv=T0 + 7,
        flags=F_LAST,
        ts_in_delta=42,
        sequence=5,
    )
    assert out["trades"] == [bytes(d.TradeMsg(**fields))]  # type: ignore[arg-type]
    top = d.BidAskPair(bid_px=100, ask_px=103, bid_sz=5, ask_sz=4, bid_ct=1, ask_ct=1)
    assert out["mbp-1"] == [bytes(d.MBP1Msg(**fields, levels=top))]  # type: ignore[arg-type]
    assert out["tbbo"] == out["mbp-1"]
    ten = [top] + [d.BidAskPair() for _ in range(9)]
    assert out["mbp-10"] == [bytes(d.MBP10Msg(**fields, levels=ten))]  # type: ignore[arg-type]
    assert [len(out[s][0]) for s in ("trades", "mbp-1", "mbp-10")] == [48, 80, 368]


def test_bbo_and_ohlcv_bytes_equal_databento_dbn_records() -> None:
    out = derive(
        [
            mbo("A", 1, 100, 5, sequence=3),
            mbo("A", 2, 103, 4, side="A", flags=F_LAST | 0x02, sequence=4),
            mbo("T", 0, 103, 2, side="A", ts=T0 + 7, flags=0, sequence=5),
        ]
    )
    top = d.BidAskPair(bid_px=100, ask_px=103, bid_sz=5, ask_sz=4, bid_ct=1, ask_ct=1)
    # the adds at exactly T0 fall in (T0 - 1 s, T0]; the trade in (T0, T0 + 1 s]
    assert len(out["bbo-1s"]) == 2 and out["bbo-1s"][1:] == [
        bytes(
            d.BBOMsg(
                rtype=0xC3,
                publisher_id=1,
                instrument_id=7,
                ts_event=T0 + 7 - 100,  # the last trade's
                price=103,
                size=2,
                side=d.Side.ASK,  # type: ignore[arg-type]  # stubs: enum members as str
                ts_recv=T0 + S,  # the end of (T0, T0 + 1 s]
                flags=0,  # of the interval's last mbp-1 record (the trade)
                sequence=5,
                levels=top,  # type: ignore[arg-type]  # the stub says a list; the class takes one pair
            )
        )
    ]
    first = decode(out["bbo-1s"])[0]
    assert (first.flags, first.sequence) == (F_LAST | 0x02, 4)
    assert (first.ts_recv, first.ts_event, first.price, first.size, first.side) == (
        T0,
        UNDEF_TIMESTAMP,
        UNDEF_PRICE,
        0,
        "N",
    )
    for schema, rtype, length in (
        ("ohlcv-1s", 0x20, S),
        ("ohlcv-1m", 0x21, 60 * S),
        ("ohlcv-1h", 0x22, 3600 * S),
        ("ohlcv-1d", 0x23, 86400 * S),
    ):
        bar = d.OHLCVMsg(
            rtype=rtype,
            publisher_id=1,
            instrument_id=7,
            ts_event=(T0 + 7) // length * length,
            open=103,
            high=103,
            low=103,
            close=103,
            volume=2,
        )
        assert out[schema] == [bytes(bar)], schema


def test_iter_records_walks_by_length_and_refuses_truncation() -> None:
    a, b = mbo("A", 1, 100, 5), mbo("C", 1, 100, 5)
    assert list(iter_records(a + b)) == [a, b]
    with pytest.raises(ValueError):
        list(iter_records(a + b[:20]))
    with pytest.raises(ValueError):
        Deriver(["mbp-2"])


# --- the rules, one by one ---------------------------------------------------------------------


def one(out: dict[str, list[bytes]], schema: str) -> Any:
    assert len(out[schema]) == 1, (schema, out[schema])
    return decode(out[schema])[0]


def book_of_five() -> list[bytes]:
    """Bids 100..96 (order ids 1..5, size 10 each, one order a level), asks 101..105 (11..15)."""
    return [mbo("A", 1 + i, 100 - i, 10) for i in range(5)] + [
        mbo("A", 11 + i, 101 + i, 10, side="A") for i in range(5)
    ]


def test_an_add_at_the_top_makes_mbp1_and_mbp10_depth_0() -> None:
    out = feed_all(*book_of_five(), mbo("A", 9, 100, 3))[-1]
    rec = one(out, "mbp-1")
    assert (rec.action, rec.side, rec.depth, rec.price, rec.size) == ("A", "B", 0, 100, 3)
    assert levels_of(rec, 1) == ([(100, 13, 2)], [(101, 10, 1)])
    assert one(out, "mbp-10").depth == 0 and out["trades"] == out["tbbo"] == []


def test_an_add_below_the_top_is_mbp10_only_with_its_level() -> None:
    out = feed_all(*book_of_five(), mbo("A", 9, 98, 3), mbo("A", 10, 104, 1, side="A"))
    assert out[-2]["mbp-1"] == [] and one(out[-2], "mbp-10").depth == 2
    assert out[-1]["mbp-1"] == [] and one(out[-1], "mbp-10").depth == 3
    # a new level between two: ranked by the levels better than it
    new = feed_all(*book_of_five(), mbo("A", 9, 9750, 1, side="N"), mbo("A", 9, 99, 1))[-1]
    assert one(new, "mbp-10").depth == 1


def test_changes_below_the_top_ten_make_nothing() -> None:
    deep = [mbo("A", 1 + i, 100 - i, 10) for i in range(12)]
    out = feed_all(*deep, mbo("C", 12, 89, 10), mbo("A", 30, 80, 1), mbo("M", 11, 90, 3))
    assert all(o[s] == [] for o in out[-3:] for s in ("mbp-1", "mbp-10"))
    # ... but the 11th level moving up into the ten does
    rec = one(feed_all(*deep, mbo("C", 3, 98, 10))[-1], "mbp-10")
    assert rec.depth == 2 and levels_of(rec, 10)[0][-1] == (90, 10, 1)


def test_a_partial_cancel_carries_the_removed_quantity_and_keeps_the_level() -> None:
    rec = one(feed_all(*book_of_five(), mbo("C", 1, 100, 4))[-1], "mbp-1")
    assert (rec.action, rec.size, rec.depth) == ("C", 4, 0)
    assert levels_of(rec, 1)[0] == [(100, 6, 1)]
    gone = one(feed_all(*book_of_five(), mbo("C", 1, 100, 10))[-1], "mbp-1")
    assert levels_of(gone, 1)[0] == [(99, 10, 1)] and gone.depth == 0


def test_a_cancel_of_an_unknown_order_an_f_and_an_n_make_nothing() -> None:
    out = feed_all(*book_of_five(), mbo("C", 77, 100, 1), mbo("F", 1, 100, 2), mbo("N"))
    assert all(recs == [] for o in out[-3:] for recs in o.values())


def test_a_modify_is_ranked_at_the_better_of_its_old_and_new_places() -> None:
    base = book_of_five()
    up = one(feed_all(*base, mbo("M", 4, 100, 10))[-1], "mbp-10")  # 97 -> 100
    assert up.depth == 0 and levels_of(up, 10)[0][0] == (100, 20, 2)
    down = one(feed_all(*base, mbo("M", 2, 96, 10))[-1], "mbp-10")  # 99 -> 96
    assert down.depth == 1 and levels_of(down, 10)[0][:2] == [(100, 10, 1), (98, 10, 1)]
    less = feed_all(*base, mbo("M", 3, 98, 4))[-1]  # a decrease in place, third level
    assert less["mbp-1"] == [] and one(less, "mbp-10").depth == 2
    unknown = one(feed_all(*base, mbo("M", 50, 95, 1))[-1], "mbp-10")  # = an add at 95
    assert (unknown.action, unknown.depth) == ("M", 5)


def test_a_modify_across_sides_changes_both_sides_side_n() -> None:
    out = feed_all(*book_of_five(), mbo("M", 1, 101, 10, side="A"))[-1]
    for schema in ("mbp-1", "mbp-10"):
        rec = one(out, schema)
        assert (rec.side, rec.depth) == ("N", 0)
    assert levels_of(one(out, "mbp-1"), 1) == ([(99, 10, 1)], [(101, 20, 2)])


def test_a_clear_is_side_n_depth_0_and_an_empty_clear_makes_nothing() -> None:
    out = feed_all(*book_of_five(), mbo("R", side="N"), mbo("R", side="N"))
    rec = one(out[-2], "mbp-10")
    assert (rec.action, rec.side, rec.depth, levels_of(rec, 10)) == ("R", "N", 0, ([], []))
    assert all(recs == [] for recs in out[-1].values())


def test_a_trade_is_in_every_trade_schema_with_the_book_unchanged() -> None:
    out = feed_all(*book_of_five(), mbo("T", 0, 101, 3, side="B", flags=0x02))[-1]
    trade = one(out, "trades")
    assert (trade.action, trade.side, trade.price, trade.size, trade.depth) == ("T", "B", 101, 3, 0)
    assert trade.flags == 0x02 and trade.ts_in_delta == 42
    for schema, n in (("mbp-1", 1), ("mbp-10", 10), ("tbbo", 1)):
        rec = one(out, schema)
        assert (rec.action, rec.side, rec.depth) == ("T", "B", 0)
        assert levels_of(rec, n) == (
            [(100 - i, 10, 1) for i in range(min(n, 5))],
            [(101 + i, 10, 1) for i in range(min(n, 5))],
        )


def test_a_top_of_book_pair_is_two_records_each_with_its_side() -> None:
    # a top-of-book level counts no order (its size counts)
    out = feed_all(
        mbo("A", 1, 100, 5, flags=F_TOB),
        mbo("A", 2, 102, 7, side="A", flags=F_TOB | F_LAST),
        mbo("A", 3, UNDEF_PRICE, 0, flags=F_TOB | F_LAST),
    )
    first, second, emptied = (one(o, "mbp-1") for o in out)
    assert (first.side, first.depth, first.flags) == ("B", 0, F_TOB)
    assert levels_of(first, 1) == ([(100, 5, 0)], [])
    assert (second.side, second.depth) == ("A", 0)
    assert levels_of(second, 1) == ([(100, 5, 0)], [(102, 7, 0)])
    assert levels_of(emptied, 1) == ([], [(102, 7, 0)]) and emptied.depth == 0


def test_a_top_of_book_pair_sharing_id_0_and_regular_orders_beside_it() -> None:
    out = feed_all(
        mbo("A", 0, 100, 5, flags=F_TOB),
        mbo("A", 0, 102, 7, side="A", flags=F_TOB | F_LAST),  # leaves the bid (also id 0)
        mbo("A", 0, 100, 2),  # a regular order with id 0 joins the top-of-book bid level
        mbo("C", 0, 102, 7, side="A"),  # finds the regular bid 0, not the ask
        mbo("A", 4, 101, 1),  # a better regular bid
    )
    recs = [one(o, "mbp-10") for o in out]
    assert levels_of(recs[1], 1) == ([(100, 5, 0)], [(102, 7, 0)])
    assert levels_of(recs[2], 1) == ([(100, 7, 1)], [(102, 7, 0)]) and recs[2].depth == 0
    assert levels_of(recs[3], 1) == ([(100, 5, 0)], [(102, 7, 0)])
    assert levels_of(recs[4], 2) == ([(101, 1, 1), (100, 5, 0)], [(102, 7, 0)])


def test_records_mid_event_are_made_with_their_own_flags() -> None:
    out = feed_all(mbo("A", 1, 100, 5, flags=0), mbo("A", 2, 101, 5, side="A", flags=F_LAST))
    assert [one(o, "mbp-1").flags for o in out] == [0, F_LAST]


def test_books_are_per_instrument_and_publisher() -> None:
    out = feed_all(
        mbo("A", 1, 100, 5),
        mbo("A", 1, 90, 1, publisher_id=2),
        mbo("A", 1, 50, 2, instrument_id=8),
        mbo("C", 1, 90, 1, publisher_id=2),
    )
    recs = [one(o, "mbp-1") for o in out]
    assert [(r.instrument_id, r.publisher_id) for r in recs] == [(7, 1), (7, 2), (8, 1), (7, 2)]
    assert [levels_of(r, 1)[0] for r in recs] == [[(100, 5, 1)], [(90, 1, 1)], [(50, 2, 1)], []]


# --- intervals ----------------------------------------------------------------------------


def test_bbo_carries_the_last_trade_forward_and_skips_quiet_intervals() -> None:
    out = derive(
        [
            mbo("A", 1, 100, 5, ts=T0 + 1),
            mbo("A", 2, 101, 5, side="A", ts=T0 + 2),
            mbo("T", 0, 101, 1, side="B", ts=T0 + 3),  # (T0, T0+1s]: a trade
            mbo("C", 2, 101, 1, side="A", ts=T0 + S + 5),  # (T0+1s, T0+2s]: BBO change only
            mbo("A", 3, 90, 1, ts=T0 + 2 * S + 5),  # (T0+2s, T0+3s]: not the BBO: no record
            mbo("A", 4, 99, 1, ts=T0 + 5 * S),  # (T0+4s, T0+5s]: not the BBO either
            mbo("C", 1, 100, 5, ts=T0 + 5 * S + 1),  # (T0+5s, T0+6s]: BBO change
        ],
        ["bbo-1s", "bbo-1m"],
    )
    recs = decode(out["bbo-1s"])
    assert [r.ts_recv - T0 for r in recs] == [S, 2 * S, 6 * S]
    assert [(r.price, r.size, r.side, r.ts_event) for r in recs] == [
        (101, 1, "B", T0 + 3 - 100)
    ] * 3
    assert [levels_of(r, 1) for r in recs] == [
        ([(100, 5, 1)], [(101, 5, 1)]),
        ([(100, 5, 1)], [(101, 4, 1)]),
        ([(99, 1, 1)], [(101, 4, 1)]),
    ]
    (minute,) = decode(out["bbo-1m"])
    assert minute.ts_recv == T0 + 60 * S and levels_of(minute, 1) == levels_of(recs[-1], 1)


def test_ohlcv_aggregates_trades_by_ts_recv_interval_start() -> None:
    trades = [(T0 + 5, 100, 2), (T0 + 9, 104, 1), (T0 + S - 1, 98, 3), (T0 + S, 101, 1)]
    out = derive(
        [mbo("A", 1, 50, 1, ts=T0)]
        + [mbo("T", 0, px, sz, ts=ts) for ts, px, sz in trades]
        + [mbo("A", 2, 51, 1, ts=T0 + 3 * S)],  # a book change alone makes no bar
    )
    bars = [(b.ts_event, b.open, b.high, b.low, b.close, b.volume) for b in decode(out["ohlcv-1s"])]
    assert bars == [(T0, 100, 104, 98, 98, 6), (T0 + S, 101, 101, 101, 101, 1)]
    (day,) = decode(out["ohlcv-1d"])
    assert (day.ts_event, day.open, day.close, day.volume) == (
        T0 // (86400 * S) * 86400 * S,
        100,
        101,
        7,
    )


def test_intervals_close_only_once_the_feed_passes_their_end() -> None:
    deriver = Deriver(["ohlcv-1s", "bbo-1s"])
    assert deriver.feed(mbo("T", 0, 100, 1, ts=T0 + 5)) == {"ohlcv-1s": [], "bbo-1s": []}
    # another book's record closes them (a quiet instrument's interval still closes)
    at_end = deriver.feed(mbo("A", 1, 1, 1, ts=T0 + S, instrument_id=9))
    assert len(at_end["ohlcv-1s"]) == 1 and at_end["bbo-1s"] == []  # bbo: (T0, T0 + 1 s]
    past = deriver.feed(mbo("A", 2, 1, 1, ts=T0 + S + 1, instrument_id=9))
    assert [r.instrument_id for r in decode(past["bbo-1s"])] == [7, 9]
    assert len(deriver.close_until(T0 + 2 * S + 1)["bbo-1s"]) == 1  # instrument 9's second
    assert deriver.flush() == {"ohlcv-1s": [], "bbo-1s": []}


# --- the real samples: shapes only ----------------------------------------------------------


def read_sample(venue: str, schema: str) -> list[Any]:
    path = DATA / venue / f"test_data.{schema}.dbn.zst"
    decoder = d.DBNDecoder(upgrade_policy=d.VersionUpgradePolicy.UPGRADE_TO_V3)  # type: ignore[arg-type]
    decoder.write(zstandard.ZstdDecompressor().decompressobj().decompress(path.read_bytes()))
    return [r for r in decoder.decode() if not isinstance(r, d.Metadata)]


MBO_VENUES = sorted(p.parent.name for p in DATA.glob("*/test_data.mbo.dbn.zst"))


@pytest.mark.parametrize("venue", MBO_VENUES)
def test_records_derived_from_a_real_mbo_sample_have_the_samples_shapes(venue: str) -> None:
    # Each schema's sample starts elsewhere in the session: shapes, not values, can be compared.
    mbos = [bytes(r) for r in read_sample(venue, "mbo")]
    out = derive(mbos)
    t_records = [parse_mbo(r) for r in mbos if parse_mbo(r).action == "T"]
    assert len(out["trades"]) == len(t_records)
    for schema in SCHEMAS:
        path = DATA / venue / f"test_data.{schema}.dbn.zst"
        if not out[schema] or not path.exists():
            continue
        ours, theirs = decode(out[schema]), read_sample(venue, schema)
        assert {(type(r), r.rtype, len(bytes(r))) for r in ours} == {
            (type(r), r.rtype, len(bytes(r))) for r in theirs
        }, schema
    for ours, t in zip(decode(out["trades"]), t_records, strict=True):
        assert (ours.ts_recv, ours.price, ours.size, ours.side, ours.sequence) == (
            t.ts_recv,
            t.price,
            t.size,
            t.side,
            t.sequence,
        )


# --- cross-schema properties on generated streams -----------------------------------------------

STEPS = [0, 0, 1, 999, S // 3, S - 1, S, 59 * S]


@st.composite
def mbo_streams(draw: st.DrawFn, max_size: int = 80) -> list[bytes]:
    """MBO streams over three books: a drawn starting book of up to 14 levels a side (so the
    top-ten cut matters) then adds, partial and full cancels, modifies (known and unknown
    ids, moves, across sides), R, T, F, N, F_TOB adds and events spanning records; ts_recv
    never decreases. Ids 1..40 for the events, 100.. for the starting book."""
    depth = draw(st.integers(0, 14))
    sizes = draw(st.lists(st.integers(1, 9), min_size=2 * depth, max_size=2 * depth))
    start = [
        ("A", 100 + i, (100 - i) if i < depth else (101 + i - depth), sz, "BA"[i >= depth], 19,
         (7, 1), 0)
        for i, sz in enumerate(sizes)
    ]  # fmt: skip
    events = start + draw(
        st.lists(
            st.tuples(
                st.sampled_from("AAAAAAAAACCCCCMMMMMTTTTTRFN"),
                st.integers(0, 40),  # order id (0: what top-of-book venues send)
                st.integers(86, 115),  # price: bids and asks overlap on purpose
                st.integers(0, 9),  # size
                st.sampled_from("BBAAN"),
                st.integers(0, 19),  # 0: F_TOB on an add; 1: mid-event (no F_LAST)
                st.sampled_from([(7, 1), (7, 1), (7, 1), (8, 1), (7, 2)]),
                st.sampled_from(STEPS),
            ),
            max_size=max_size,
        )
    )
    ts = T0 - draw(st.sampled_from([0, 1, S // 2]))
    out = []
    for seq, (action, oid, price, size, side, flag, (iid, pub), step) in enumerate(events):
        ts += step
        flags = F_LAST
        if flag == 0 and action == "A":
            flags |= F_TOB
            price = UNDEF_PRICE if size == 0 else price
        elif flag == 1:
            flags = 0
        if action in "RN":
            side = "N"
        out.append(mbo(action, oid, price, size, side, flags, ts, iid, pub, seq))
    return out


PROPS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPS
@given(mbo_streams())
def test_mbp_trades_and_tbbo_against_an_independent_book(stream: list[bytes]) -> None:
    deriver = Deriver()
    books = Books()
    for raw in stream:
        m = parse_mbo(raw)
        book = books.book(m.instrument_id, m.publisher_id)
        before = (book.levels("B", 10), book.levels("A", 10))
        out = deriver.feed(raw)
        books.apply(m)
        after = (book.levels("B", 10), book.levels("A", 10))
        # mbp-10: a record iff the top ten changed (or a trade), holding the top ten after it
        if m.action == "T" or before != after:
            rec = one(out, "mbp-10")
            assert levels_of(rec, 10) == after
            assert (rec.instrument_id, rec.publisher_id, rec.ts_recv, rec.sequence) == (
                m.instrument_id,
                m.publisher_id,
                m.ts_recv,
                m.sequence,
            )
            assert rec.side == (
                "N"
                if m.action == "R" or (before[0] != after[0] and before[1] != after[1])
                else m.side
            )
        else:
            assert out["mbp-10"] == []
        # mbp-1: the top-1 projection of the same event's mbp-10 record
        top_changed = (before[0][:1], before[1][:1]) != (after[0][:1], after[1][:1])
        if m.action == "T" or top_changed:
            one_rec, ten = one(out, "mbp-1"), one(out, "mbp-10")
            assert levels_of(one_rec, 1) == (after[0][:1], after[1][:1])
            head = (
                "instrument_id",
                "publisher_id",
                "ts_event",
                "price",
                "size",
                "action",
                "flags",
                "depth",
                "ts_recv",
                "ts_in_delta",
                "sequence",
            )
            assert [getattr(one_rec, f) for f in head] == [getattr(ten, f) for f in head]
            assert one_rec.side in (ten.side, m.side)  # N in mbp-10 may be one-sided at the top
        else:
            assert out["mbp-1"] == []
        # trades: the T records; tbbo: each with the BBO before it (a T changes nothing)
        if m.action == "T":
            trade = one(out, "trades")
            assert bytes(trade)[2:] == bytes(one(out, "mbp-1"))[2:48]
            assert (trade.price, trade.size, trade.side, trade.ts_event, trade.flags) == (
                m.price,
                m.size,
                m.side,
                m.ts_event,
                m.flags,
            )
            assert levels_of(one(out, "tbbo"), 1) == (before[0][:1], before[1][:1])
        else:
            assert out["trades"] == out["tbbo"] == []


@PROPS
@given(mbo_streams())
def test_ohlcv_and_bbo_against_aggregations_of_trades_and_mbp1(stream: list[bytes]) -> None:
    out = derive(stream)
    trades = decode(out["trades"])
    mbp1 = decode(out["mbp-1"])
    for schema, length in (("ohlcv-1s", S), ("ohlcv-1m", 60 * S), ("ohlcv-1h", 3600 * S)):
        bars: dict[tuple[int, int, int], list[int]] = {}
        for t in trades:
            key = (t.ts_recv // length * length, t.instrument_id, t.publisher_id)
            bar = bars.setdefault(key, [t.price, t.price, t.price, t.price, 0])
            bar[1], bar[2], bar[3], bar[4] = (
                max(bar[1], t.price),
                min(bar[2], t.price),
                t.price,
                bar[4] + t.size,
            )
        got = {
            (b.ts_event, b.instrument_id, b.publisher_id): [
                b.open,
                b.high,
                b.low,
                b.close,
                b.volume,
            ]
            for b in decode(out[schema])
        }
        assert got == bars and len(got) == len(out[schema]), schema
    for schema, length in (("bbo-1s", S), ("bbo-1m", 60 * S)):
        last: dict[tuple[int, int, int], Any] = {}
        last_trade: dict[tuple[int, int, int], Any] = {}
        for r in mbp1:
            end = -(-r.ts_recv // length) * length
            last[(end, r.instrument_id, r.publisher_id)] = r
            if r.action == "T":
                last_trade[(end, r.instrument_id, r.publisher_id)] = r
        got_bbo = decode(out[schema])
        assert [(b.ts_recv, b.instrument_id, b.publisher_id) for b in got_bbo] == sorted(last)
        carried: dict[tuple[int, int], Any] = {}
        for b in got_bbo:
            key = (b.ts_recv, b.instrument_id, b.publisher_id)
            src = last[key]
            trade = carried[key[1:]] = last_trade.get(key, carried.get(key[1:]))
            assert levels_of(b, 1) == levels_of(src, 1) and b.sequence == src.sequence
            want = (
                (UNDEF_PRICE, 0, "N", UNDEF_TIMESTAMP)
                if trade is None
                else (trade.price, trade.size, trade.side, trade.ts_event)
            )
            assert (b.price, b.size, b.side, b.ts_event) == want


def test_ohlcv_volume_per_instrument_matches_the_trades_total() -> None:
    stream = [
        mbo("T", 0, 100 + i % 3, i, ts=T0 + i * S // 4, instrument_id=7 + i % 2) for i in range(40)
    ]
    out = derive(stream, ["ohlcv-1s", "ohlcv-1m", "trades"])
    totals: dict[int, int] = defaultdict(int)
    for t in decode(out["trades"]):
        totals[t.instrument_id] += t.size
    for schema in ("ohlcv-1s", "ohlcv-1m"):
        sums: dict[int, int] = defaultdict(int)
        for b in decode(out[schema]):
            sums[b.instrument_id] += b.volume
        assert sums == totals


# --- the native engine against this reference (skipped where it is not built) -------------------

try:
    from gateway.books import native
except ImportError as exc:  # the C engine is built by `make install`
    native = None  # type: ignore[assignment]
    NATIVE_MISSING = str(exc)
else:
    NATIVE_MISSING = ""

needs_native = pytest.mark.skipif(
    native is None, reason=f"gateway.books.native does not import: {NATIVE_MISSING}"
)
NATIVE_SCHEMAS = ("trades", "mbp-1", "mbp-10")


def native_vs_reference(stream: list[bytes], bounds: list[int], want: int) -> None:
    """Apply the stream chunk by chunk (a chunk: whole records back to back) to a NativeBooks
    and record by record to the reference; each chunk's derived bytes must be equal."""
    assert native is not None
    engine = native.NativeBooks()
    deriver = Deriver(NATIVE_SCHEMAS)
    wanted = {
        "trades": bool(want & native.WANT_TRADES),
        "mbp-1": bool(want & native.WANT_MBP1),
        "mbp-10": bool(want & native.WANT_MBP10),
    }
    try:
        for lo, hi in zip(bounds, bounds[1:], strict=False):
            got = engine.apply(b"".join(stream[lo:hi]), want)
            assert got.error is None
            expect: dict[str, list[bytes]] = {s: [] for s in NATIVE_SCHEMAS}
            for raw in stream[lo:hi]:
                for schema, recs in deriver.feed(raw).items():
                    expect[schema].extend(recs)
            for schema, data, count in (
                ("trades", got.trades, got.trades_count),
                ("mbp-1", got.mbp1, got.mbp1_count),
                ("mbp-10", got.mbp10, got.mbp10_count),
            ):
                if not wanted[schema]:
                    assert (data, count) == (b"", 0), schema
                    continue
                if data != b"".join(expect[schema]):  # say which record, field by field
                    pairs = zip(decode([data]), decode(expect[schema]), strict=False)
                    first = next((p for p in pairs if bytes(p[0]) != bytes(p[1])), None)
                    raise AssertionError(f"{schema} differs (native, reference): {first}")
                assert count == len(expect[schema]), schema
        for iid, pub in deriver.books.books:
            book = deriver.books.book(iid, pub)
            for side in "BA":
                assert engine.levels(iid, pub, side, 10) == book.levels(side, 10)
    finally:
        engine.close()


@needs_native
@PROPS
@given(
    mbo_streams(max_size=120),
    st.lists(st.integers(0, 140), max_size=6),
    st.sampled_from([7, 7, 1, 2, 4, 3, 6]),
)
def test_native_derived_bytes_equal_the_reference_on_generated_streams(
    stream: list[bytes], cuts: list[int], want: int
) -> None:
    bounds = sorted({0, len(stream), *(c for c in cuts if c < len(stream))})
    native_vs_reference(stream, bounds, want)


@needs_native
@pytest.mark.parametrize("venue", MBO_VENUES)
def test_native_derived_bytes_equal_the_reference_on_the_real_mbo_samples(venue: str) -> None:
    stream = [bytes(r) for r in read_sample(venue, "mbo")]
    native_vs_reference(stream, [0, len(stream)], 7)
    native_vs_reference(stream, list(range(len(stream) + 1)), 7)


def seeded_flow(n: int, seed: int) -> list[bytes]:
    """A long order flow around a random walk over three books (adds near the touch, cancels,
    partial cancels, modifies, trades followed by fills and cancels, an occasional R)."""
    rng = random.Random(seed)
    mid = {7: 1000, 8: 500, 9: 2000}
    resting: dict[int, dict[int, tuple[str, int, int]]] = {k: {} for k in mid}
    out: list[bytes] = []
    ts, seq, next_id = T0, 0, 1

    def emit(action: str, iid: int, oid: int, px: int, sz: int, side: str, last: bool) -> None:
        nonlocal seq
        seq += 1
        out.append(mbo(action, oid, px, sz, side, F_LAST if last else 0, ts, iid, 1, seq))

    while len(out) < n:
        ts += rng.choice([1, 1000, 50_000_000, 400_000_000])
        iid = rng.choice(list(mid))
        mid[iid] += rng.choice([-1, 0, 0, 0, 1])
        book = resting[iid]
        roll = rng.random()
        if roll < 0.45 or not book:
            side = rng.choice("BA")
            px = mid[iid] - rng.randint(1, 15) if side == "B" else mid[iid] + rng.randint(1, 15)
            book[next_id] = (side, px, rng.randint(1, 20))
            emit("A", iid, next_id, px, book[next_id][2], side, True)
            next_id += 1
        elif roll < 0.70:
            oid = rng.choice(list(book))
            side, px, sz = book[oid]
            cut = sz if rng.random() < 0.7 else rng.randint(1, sz)
            book[oid] = (side, px, sz - cut)
            if sz == cut:
                del book[oid]
            emit("C", iid, oid, px, cut, side, True)
        elif roll < 0.85:
            oid = rng.choice(list(book))
            side, px, sz = book[oid]
            px += rng.choice([0, 0, -1, 1])
            sz = max(1, sz + rng.choice([-2, -1, 1, 3]))
            book[oid] = (side, px, sz)
            emit("M", iid, oid, px, sz, side, True)
        elif roll < 0.995:
            hit = rng.choice("BA")
            level = [o for o in book.items() if o[1][0] == hit]
            if not level:
                continue
            best = (max if hit == "B" else min)(p for _, (_, p, _) in level)
            oid, (_, px, sz) = next((o, v) for o, v in level if v[1] == best)
            qty = rng.randint(1, sz)
            emit("T", iid, 0, px, qty, "A" if hit == "B" else "B", False)
            emit("F", iid, oid, px, qty, hit, False)
            emit("C", iid, oid, px, qty, hit, True)
            book[oid] = (hit, px, sz - qty)
            if sz == qty:
                del book[oid]
        else:
            book.clear()
            emit("R", iid, 0, UNDEF_PRICE, 0, "N", True)
    return out


@needs_native
def test_native_derived_bytes_equal_the_reference_on_a_long_seeded_flow() -> None:
    stream = seeded_flow(6000, seed=17)
    rng = random.Random(3)
    bounds = sorted({0, len(stream), *(rng.randrange(len(stream)) for _ in range(40))})
    native_vs_reference(stream, bounds, 7)
