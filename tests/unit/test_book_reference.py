"""The reference order book (gateway/books/reference.py), rule by rule, on the real MBO
sample, and on hypothesis-generated event streams (invariants and queue priority).

Records are built with databento_dbn's own MBOMsg, not with the module's struct."""

from __future__ import annotations

from pathlib import Path

import databento_dbn as d
import pytest
import zstandard
from hypothesis import given, settings, strategies as st

from gateway.books.reference import (
    F_LAST,
    F_TOB,
    TOB_KEY,
    UNDEF_PRICE,
    Book,
    Books,
    parse_mbo,
)

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
SAMPLE = Path(__file__).parents[1] / "data" / "dbn" / "GLBX.MDP3" / "test_data.mbo.dbn.zst"


def mbo(
    action: str,
    order_id: int = 0,
    price: int = 0,
    size: int = 0,
    side: str = "B",
    flags: int = F_LAST,
    instrument_id: int = 7,
    publisher_id: int = 1,
    ts: int = 1,
    sequence: int = 0,
) -> bytes:
    return bytes(
        d.MBOMsg(
            publisher_id=publisher_id,
            instrument_id=instrument_id,
            ts_event=ts,
            order_id=order_id,
            price=price,
            size=size,
            action=ACTIONS[action],  # type: ignore[arg-type]  # stubs: enum members as str
            side=SIDES[side],  # type: ignore[arg-type]
            ts_recv=ts,
            flags=flags,
            channel_id=0,
            ts_in_delta=0,
            sequence=sequence,
        )
    )


def play(*records: bytes) -> Book:
    books = Books()
    books.apply_records(records)
    return books.book(7, 1)


def queue(book: Book, side: str, price: int) -> list[tuple[int, int]]:
    levels = book.bids if side == "B" else book.asks
    return [(o.order_id, o.size) for o in levels.get(price, {}).values()]


def test_adds_queue_and_levels() -> None:
    book = play(mbo("A", 1, 100, 5), mbo("A", 2, 100, 3), mbo("A", 3, 101, 1, side="A"))
    assert queue(book, "B", 100) == [(1, 5), (2, 3)]
    assert book.bbo() == ((100, 8, 2), (101, 1, 1))


def test_partial_cancel_keeps_priority_full_cancel_removes() -> None:
    book = play(mbo("A", 1, 100, 5), mbo("A", 2, 100, 3), mbo("C", 1, 100, 2))
    assert queue(book, "B", 100) == [(1, 3), (2, 3)]
    book = play(mbo("A", 1, 100, 5), mbo("A", 2, 100, 3), mbo("C", 1, 100, 5))
    assert queue(book, "B", 100) == [(2, 3)]


def test_unknown_cancel_changes_nothing_and_is_counted() -> None:
    book = play(mbo("A", 1, 100, 5), mbo("C", 9, 100, 5))
    assert queue(book, "B", 100) == [(1, 5)] and book.unknown_cancels == 1


def test_modify_decrease_keeps_priority_increase_and_price_change_lose_it() -> None:
    base = (mbo("A", 1, 100, 5), mbo("A", 2, 100, 3))
    assert queue(play(*base, mbo("M", 1, 100, 4)), "B", 100) == [(1, 4), (2, 3)]
    assert queue(play(*base, mbo("M", 1, 100, 6)), "B", 100) == [(2, 3), (1, 6)]
    moved = play(*base, mbo("A", 3, 99, 1), mbo("M", 1, 99, 5))
    assert queue(moved, "B", 100) == [(2, 3)] and queue(moved, "B", 99) == [(3, 1), (1, 5)]


def test_modify_of_an_unknown_order_is_an_add() -> None:
    assert queue(play(mbo("M", 4, 100, 2)), "B", 100) == [(4, 2)]


def test_clear_and_the_actions_that_do_not_change_the_book() -> None:
    book = play(mbo("A", 1, 100, 5), mbo("T", 0, 100, 1), mbo("F", 1, 100, 1), mbo("N"))
    assert queue(book, "B", 100) == [(1, 5)]
    assert play(mbo("A", 1, 100, 5), mbo("A", 2, 101, 5, side="A"), mbo("R")).bbo() == (
        None,
        None,
    )


def test_a_top_of_book_add_replaces_its_side_and_undef_empties_it() -> None:
    book = play(
        mbo("A", 1, 100, 5),
        mbo("A", 2, 99, 5),
        mbo("A", 3, 105, 1, side="A"),
        mbo("A", 0, 101, 7, flags=F_TOB | F_LAST),
    )
    # a top-of-book level counts no order (it is no venue order), its size counts
    assert book.levels("B", 10) == [(101, 7, 0)] and book.levels("A", 10) == [(105, 1, 1)]
    assert set(book.by_id) == {3}  # 1 and 2 went with their side
    book.apply(parse_mbo(mbo("A", 0, UNDEF_PRICE, 0, flags=F_TOB | F_LAST)))
    assert book.levels("B", 10) == [] and book.tob == {}


def test_a_top_of_book_pair_sharing_id_0_keeps_both_sides() -> None:
    # IEX TOPS / NYSE National: each quote is a pair of F_TOB adds, both order_id 0
    book = play(
        mbo("A", 0, 100, 5, flags=F_TOB),
        mbo("A", 0, 101, 7, side="A", flags=F_TOB | F_LAST),
    )
    assert book.bbo() == ((100, 5, 0), (101, 7, 0))
    assert book.by_id == {} and [(o.side, o.tob) for o in book.orders()] == [
        ("B", True),
        ("A", True),
    ]
    # the next quote replaces each side; an UNDEF side has no depth
    book.apply(parse_mbo(mbo("A", 0, 99, 2, flags=F_TOB)))
    book.apply(parse_mbo(mbo("A", 0, UNDEF_PRICE, 0, side="A", flags=F_TOB | F_LAST)))
    assert book.bbo() == ((99, 2, 0), None)


def test_a_top_of_book_add_leaves_an_order_with_its_id_on_the_other_side() -> None:
    book = play(mbo("A", 0, 100, 5), mbo("A", 0, 101, 7, side="A", flags=F_TOB | F_LAST))
    assert book.bbo() == ((100, 5, 1), (101, 7, 0)) and set(book.by_id) == {0}


def test_cancel_and_modify_naming_a_top_of_book_id_do_not_touch_it() -> None:
    book = play(mbo("A", 0, 100, 5, flags=F_TOB | F_LAST), mbo("C", 0, 100, 5))
    assert book.bbo() == ((100, 5, 0), None) and book.unknown_cancels == 1
    # a modify of an unknown id is an add: a regular order beside the top-of-book one
    book.apply(parse_mbo(mbo("M", 0, 100, 3)))
    assert book.levels("B", 10) == [(100, 8, 1)]
    assert queue(book, "B", 100) == [(0, 5), (0, 3)]
    # and that regular order is the one a cancel now finds
    book.apply(parse_mbo(mbo("C", 0, 100, 3)))
    assert book.levels("B", 10) == [(100, 5, 0)] and book.unknown_cancels == 1


def test_regular_orders_after_a_top_of_book_add_count_and_queue_behind_it() -> None:
    book = play(
        mbo("A", 0, 100, 5, flags=F_TOB | F_LAST),
        mbo("A", 1, 100, 2),
        mbo("A", 2, 101, 1),
        mbo("A", 3, 99, 4),
    )
    assert book.levels("B", 10) == [(101, 1, 1), (100, 7, 1), (99, 4, 1)]
    assert queue(book, "B", 100) == [(0, 5), (1, 2)]
    # snapshot order: the side's top-of-book order first (its F_TOB add replaces the side
    # on replay), then the other orders best first
    assert [(o.order_id, o.price) for o in book.orders()] == [(0, 100), (2, 101), (1, 100), (3, 99)]
    # the next top-of-book add takes the regular orders of the side with it
    book.apply(parse_mbo(mbo("A", 0, 98, 1, flags=F_TOB | F_LAST)))
    assert book.levels("B", 10) == [(98, 1, 0)] and book.by_id == {}


def test_an_event_spans_records_until_f_last() -> None:
    book = play(mbo("A", 1, 100, 5, flags=0), mbo("A", 2, 100, 5, flags=0))
    assert book.pending == 2
    book.apply(parse_mbo(mbo("C", 1, 100, 5)))
    assert book.pending == 0


def test_books_are_per_instrument_and_publisher() -> None:
    books = Books()
    books.apply_records(
        [
            mbo("A", 1, 100, 5),
            mbo("A", 1, 100, 6, publisher_id=2),
            mbo("A", 1, 50, 1, instrument_id=8),
        ]
    )
    assert set(books.books) == {(7, 1), (7, 2), (8, 1)} and books.orders_held == 3


def replay(book: Book) -> Book:
    """The book a client rebuilds from a snapshot of ``book``: R, then an add per order
    (F_TOB on top-of-book orders), under the same rules."""
    out = Book()
    out.apply(parse_mbo(mbo("R", flags=0)))
    for o in book.orders():
        out.apply(parse_mbo(mbo("A", o.order_id, o.price, o.size, o.side, F_TOB if o.tob else 0)))
    return out


def test_snapshot_order_is_bids_then_asks_best_first_in_queue_priority() -> None:
    book = play(
        mbo("A", 1, 99, 1),
        mbo("A", 2, 100, 1),
        mbo("A", 3, 100, 1),
        mbo("A", 4, 102, 1, side="A"),
        mbo("A", 5, 101, 1, side="A"),
    )
    assert [o.order_id for o in book.orders()] == [2, 3, 1, 5, 4]


def test_the_real_mbo_sample_applies_cleanly() -> None:
    # four-odd records of one venue: a shape check, not an oracle (no shared starting book)
    raw = zstandard.ZstdDecompressor().decompressobj().decompress(SAMPLE.read_bytes())
    decoder = d.DBNDecoder()
    decoder.write(raw)
    records = [bytes(r) for r in decoder.decode() if isinstance(r, d.MBOMsg)]
    assert records
    books = Books()
    books.apply_records(records)
    for book in books.books.values():
        for order in book.orders():
            assert order.size > 0 and order.side in "BA"
    first = parse_mbo(records[0])
    assert (first.action, first.side, first.sequence) == ("A", "B", 1180)


events = st.lists(
    st.tuples(
        st.sampled_from("AAAACCMMRTFN"),
        st.integers(0, 6),  # order id (0: what top-of-book venues send)
        st.integers(98, 102),  # price
        st.integers(0, 9),  # size
        st.sampled_from("BA"),
        st.booleans(),  # F_TOB on adds
    ),
    max_size=120,
)


@settings(max_examples=300, deadline=None)
@given(events)
def test_invariants_and_queue_priority_on_generated_streams(
    stream: list[tuple[str, int, int, int, str, bool]],
) -> None:
    book = Book()
    for action, oid, price, size, side, tob in stream:
        old = book.by_id.get(oid)
        was = (old.side, old.price, old.size, queue_ids(book, old.side, old.price)) if old else None
        flags = F_LAST | (F_TOB if tob and action == "A" else 0)
        book.apply(parse_mbo(mbo(action, oid, price, size, side, flags)))
        # the index and the levels hold the same regular orders, every order (top-of-book
        # ones too: at most one a side) with a positive size
        resting = list(book.orders())
        regular = [o for o in resting if not o.tob]
        assert {o.order_id for o in regular} == set(book.by_id)
        assert len(regular) == len(book.by_id)
        assert [o for o in resting if o.tob] == [book.tob[s] for s in "BA" if s in book.tob]
        assert all(o.size > 0 for o in resting)
        assert all(level for levels in (book.bids, book.asks) for level in levels.values())
        # a level's count leaves its top-of-book order out; its size does not
        for s, levels in (("B", book.bids), ("A", book.asks)):
            for p, n, c in book.levels(s, 100):
                assert n == sum(o.size for o in levels[p].values())
                assert c == sum(1 for o in levels[p].values() if not o.tob)
        # a snapshot replayed under the same rules rebuilds the same book
        again = replay(book)
        assert [vars(o) for o in again.orders()] == [vars(o) for o in resting]
        assert again.levels("B", 100) == book.levels("B", 100)
        assert again.levels("A", 100) == book.levels("A", 100)
        if action != "M" or was is None or size == 0:
            continue
        was_side, was_price, was_size, was_queue = was
        now = queue_ids(book, side, price)
        assert book.by_id[oid].size == size
        if (side, price) == (was_side, was_price) and size <= was_size:
            assert now.index(oid) == was_queue.index(oid)  # kept its place
        else:
            assert now[-1] == oid  # moved or grew: back of the queue


def queue_ids(book: Book, side: str, price: int) -> list[int]:
    levels = book.bids if side == "B" else book.asks
    return [k for k in levels.get(price, {}) if k != TOB_KEY]


@pytest.mark.parametrize("bad", [b"", bytes(56), mbo("A")[:40]])
def test_parse_refuses_what_is_not_an_mbo_record(bad: bytes) -> None:
    with pytest.raises(ValueError):
        parse_mbo(bad)
