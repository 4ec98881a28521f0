"""The synthetic feed's MBO mode in a real gateway (``synthetic:?schemas=mbo``), with the
official client: two sessions that join by ``snapshot=1`` at different times hold the same
books at a later sequence, those books are valid (never crossed after an event, no cancel
or modify of an unknown order), and the ``trades`` the gateway derives from the feed are
exactly its ``T`` records."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.books.reference import F_LAST, F_SNAPSHOT, Books, Order
from tests.integration.helpers import OfficialSession, data_records, gateway

pytest.importorskip(
    "gateway.books.native", reason="the native book engine is built by make install"
)

DATASET = "SYN.MBO"
FEED = "synthetic:?schemas=mbo&rate=20000&instruments=4&seed=3"
MBO = 0xA0
TRADE = 0x00


def _mbo(records: list[Any]) -> list[Any]:
    return [r for r in data_records(records) if int(r.rtype) == MBO]


def _live(records: list[Any]) -> list[Any]:
    return [r for r in _mbo(records) if not int(r.flags) & F_SNAPSHOT]


def _action(rec: Any) -> str:
    return str(getattr(rec.action, "value", rec.action))


def _books_at(records: list[Any], last_seq: int) -> tuple[Books, int]:
    """The books from a session's snapshot and its live records up to ``last_seq``, checked
    after every event; and how many events were checked."""
    books = Books()
    events = 0
    for rec in _mbo(records):
        live = not int(rec.flags) & F_SNAPSHOT
        if live and int(rec.sequence) > last_seq:
            break
        if live and _action(rec) in ("C", "M"):
            book = books.books.get((int(rec.instrument_id), int(rec.publisher_id)))
            assert book is not None and int(rec.order_id) in book.by_id, f"unknown order {rec}"
        books.apply_records([bytes(rec)])
        if live and int(rec.flags) & F_LAST:
            events += 1
            book = books.book(int(rec.instrument_id), int(rec.publisher_id))
            bid, ask = book.bbo()
            assert bid is None or ask is None or bid[0] < ask[0], f"crossed after {rec}"
    return books, events


def _orders(books: Books) -> dict[tuple[int, int], list[Order]]:
    return {key: list(book.orders()) for key, book in books.books.items() if book.by_id}


def test_snapshot_sessions_agree_and_the_books_are_valid() -> None:
    snap = dict(schema="mbo", symbols="ALL_SYMBOLS", snapshot=True)
    with gateway("--metrics-port", "0", feeds={DATASET: FEED}) as gw:
        first = OfficialSession(gw.port, DATASET, [snap])
        first.start()
        assert first.wait_for(lambda rs: len(_live(rs)) >= 2_000, 30.0), "first session's data"
        second = OfficialSession(gw.port, DATASET, [snap])
        trades = OfficialSession(gw.port, DATASET, [dict(schema="trades", symbols="ALL_SYMBOLS")])
        second.start()
        trades.start()
        assert second.wait_for(lambda rs: len(_live(rs)) >= 2_000, 30.0), "second's data"
        upto = int(_live(second.records)[-1].sequence)
        assert first.wait_for(lambda rs: int(_live(rs)[-1].sequence) >= upto, 30.0)
        assert trades.wait_for(
            lambda rs: any(int(r.sequence) >= upto for r in data_records(rs)), 30.0
        )
        for s in (first, second, trades):
            s.stop()
    a, a_events = _books_at(first.records, upto)
    b, b_events = _books_at(second.records, upto)
    assert a_events > b_events > 500
    assert len(a.books) == 4 and sum(len(x.by_id) for x in a.books.values()) > 20
    assert _orders(a) == _orders(b), "sessions that joined at different times hold one book"
    # The derived trades: one TradeMsg per T record, same price, size, side and sequence.
    got = [r for r in data_records(trades.records) if int(r.rtype) == TRADE]
    assert got
    lo = int(got[0].sequence)
    expected = [
        (int(r.sequence), int(r.price), int(r.size), str(r.side))
        for r in _live(first.records)
        if _action(r) == "T" and lo <= int(r.sequence) <= upto
    ]
    derived = [
        (int(r.sequence), int(r.price), int(r.size), str(r.side))
        for r in got
        if int(r.sequence) <= upto
    ]
    assert derived == expected and len(expected) > 10
