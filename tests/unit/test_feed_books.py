"""FeedBooks (gateway/books/feed_books.py) with a real FanOut and recording members: only
the derived schemas someone subscribes to are built; a schema the publisher sends is never
derived; tbbo travels under its own fan-out key; past max_orders the books are dropped;
an interval schema whose first subscriber came mid-interval never emits that interval."""

from __future__ import annotations

import pytest

from gateway import dbn
from gateway.books.feed_books import (
    TBBO_KEY,
    BooksUnavailable,
    FeedBooks,
    SnapshotUnverified,
)
from gateway.fanout import FanOut, OutputSpec, Payload, make_selection
from tests.support.mbo_stream import MboStream

pytest.importorskip(
    "gateway.books.native", reason="the native book engine is built by make install"
)

SECOND = 1_000_000_000


class Member:
    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def deliver(self, data: Payload, records: int) -> None:
        self.chunks.append(bytes(data))

    def rtypes(self) -> set[int]:
        out: set[int] = set()
        for chunk in self.chunks:
            index, _ = dbn.index_records(chunk)
            out |= index.rtype_set
        return out


def _member(fanout: FanOut, *rtypes: int) -> Member:
    m = Member()
    fanout.place(m, OutputSpec(make_selection(dict.fromkeys(rtypes))))  # type: ignore[arg-type]
    return m


def _chunks(n_events: int, ts0: int = 10 * SECOND, step: int = 1_000_000) -> list[bytes]:
    stream = MboStream()
    out = []
    ts = ts0
    for _ in range(n_events // 20):
        batch: list[bytes] = []
        for _ in range(20):
            batch += stream.next_event(ts)
            ts += step
        out.append(b"".join(batch))
    return out


def _run(books: FeedBooks, chunks: list[bytes]) -> None:
    for chunk in chunks:
        index, _ = dbn.index_records(chunk)
        books.fanout.publish(index)
        books.on_chunk(index)


def test_only_subscribed_schemas_are_built() -> None:
    fanout = FanOut()
    books = FeedBooks("X", fanout)
    trades = _member(fanout, 0x00)
    _run(books, _chunks(400))
    assert trades.rtypes() == {0x00}
    assert set(books.counters.derived) == {"trades"}
    assert books.counters.orders > 0 and books.counters.records_applied > 0


def test_nothing_is_derived_without_subscribers() -> None:
    fanout = FanOut()
    books = FeedBooks("X", fanout)
    mbo = _member(fanout, 0xA0)
    _run(books, _chunks(200))
    assert books.counters.derived == {}
    assert mbo.rtypes() == {0xA0}


def test_tbbo_has_its_own_key_and_is_the_trades_of_mbp1() -> None:
    fanout = FanOut()
    books = FeedBooks("X", fanout)
    tbbo = _member(fanout, TBBO_KEY)
    mbp1 = _member(fanout, 0x01)
    _run(books, _chunks(400))
    t = b"".join(tbbo.chunks)
    m = b"".join(mbp1.chunks)
    assert t and m
    trades_in_mbp1 = [m[i : i + 80] for i in range(0, len(m), 80) if m[i + 28] == ord("T")]
    assert [t[i : i + 80] for i in range(0, len(t), 80)] == trades_in_mbp1
    assert len(m) > len(t)  # mbp-1 has the book changes too


def test_a_schema_the_publisher_sends_is_never_derived() -> None:
    fanout = FanOut()
    books = FeedBooks("X", fanout)
    mbp1 = _member(fanout, 0x01)
    chunks = _chunks(200)
    _run(books, chunks[:2])
    derived_before = books.counters.derived.get("mbp-1", 0)
    assert derived_before > 0
    # the publisher's own mbp-1 record arrives in the feed
    own = bytearray(80)
    own[0], own[1] = 20, 0x01
    index, _ = dbn.index_records(bytes(own) + chunks[2])
    books.on_chunk(index)
    assert not books.derives("mbp-1") and not books.derives("tbbo")
    assert "mbp-1" in books.counters.published
    n = len(mbp1.chunks)
    _run(books, chunks[3:])
    assert books.counters.derived["mbp-1"] == derived_before
    assert len(mbp1.chunks) == n


def test_past_max_orders_the_books_are_dropped() -> None:
    fanout = FanOut()
    books = FeedBooks("X", fanout, max_orders=100)
    _member(fanout, 0x00)
    _run(books, _chunks(6000))
    assert not books.on
    assert "max_orders=100" in books.counters.off_reason
    assert books.counters.orders == 0
    with pytest.raises(BooksUnavailable, match="max_orders"):
        books.snapshot(None, 1)
    books.on_chunk(dbn.index_records(_chunks(20)[0])[0])  # still harmless


def test_an_interval_started_mid_way_is_not_emitted() -> None:
    fanout = FanOut()
    books = FeedBooks("X", fanout)
    chunks = _chunks(4000, ts0=100 * SECOND + SECOND // 2, step=SECOND // 1000)  # 4 s
    _run(books, chunks[:10])  # 0.2 s into second 100, nobody subscribed to ohlcv-1s
    bars = _member(fanout, 0x20)
    _run(books, chunks[10:])
    data = b"".join(bars.chunks)
    starts = [int.from_bytes(data[i + 8 : i + 16], "little") for i in range(0, len(data), 56)]
    assert starts, "later seconds closed"
    assert min(starts) >= 101 * SECOND, "second 100 began before the subscriber: not emitted"


def test_snapshot_of_some_instruments() -> None:
    fanout = FanOut()
    books = FeedBooks("X", fanout)
    _run(books, _chunks(400))
    data, count = books.snapshot([101], 5)
    assert count == len(data) // 56 > 1
    iids = {int.from_bytes(data[i + 4 : i + 8], "little") for i in range(0, len(data), 56)}
    assert iids == {101}
    assert books.counters.snapshots == 1 and books.counters.snapshot_records == count


def _without_clears(chunks: list[bytes]) -> list[bytes]:
    out = []
    for chunk in chunks:
        recs = [chunk[i : i + 56] for i in range(0, len(chunk), 56)]
        out.append(b"".join(r for r in recs if r[38] != ord("R")))
    return out


def test_books_joined_mid_way_are_not_snapshotted_until_cleared() -> None:
    """A gateway that joined a feed mid-stream (a restart, a publisher that started late)
    holds books that may lack orders: no snapshot of them until the feed clears them."""
    chunks = _without_clears(_chunks(400))
    books = FeedBooks("X", FanOut())
    _run(books, chunks)
    with pytest.raises(SnapshotUnverified, match="3 of the books asked for"):
        books.snapshot(None, 1)
    with pytest.raises(SnapshotUnverified, match="1 of the books"):
        books.snapshot([102], 1)
    lenient = FeedBooks("X", FanOut(), require_clear=False)
    _run(lenient, chunks)
    assert lenient.snapshot([102], 1)[1] > 1
    # the feed clears instrument 102's book (the venue's recovery): from then on it is whole
    clear = bytearray(56)
    clear[0], clear[1], clear[2] = 14, 0xA0, 1
    clear[4:8] = (102).to_bytes(4, "little")
    clear[24:32] = ((1 << 63) - 1).to_bytes(8, "little")
    clear[36], clear[38], clear[39] = 0x80, ord("R"), ord("N")
    _run(books, [bytes(clear)])
    data, count = books.snapshot([102], 1)
    assert count == 1 and data[38] == ord("R")  # cleared: an empty book, and whole
    with pytest.raises(SnapshotUnverified, match="2 of the books"):
        books.snapshot(None, 1)
