"""Bounded subscription work (issue 11): symbology work grows with what is new and who
asked for it, and runs in slices of a fixed size with other sessions' data in between."""

from __future__ import annotations

from collections.abc import Callable

import databento_dbn as d
import pytest

from gateway import dbn
from gateway.control import ALL_SYMBOLS
from gateway.fanout import FanOut
from gateway.feeds.base import Feed
from gateway.session import Subscription
from gateway.subscriptions import resolution_errors

from .conftest import NOW_NS, decode, split_records, trade

CLOCK = 1_750_000_000_000_000_000
SLICE = 1000


class Member:
    def __init__(self) -> None:
        self.ts_out = False
        self.zstd = False
        self.log: list[tuple[str, bytes]] = []

    def deliver(self, data, records: int) -> None:
        self.log.append(("data", bytes(data)))

    def send_gateway_records(self, records: list[bytes]) -> None:
        self.log.extend(("gateway", r) for r in records)

    def mappings(self) -> list[tuple[str, int]]:
        out = []
        for kind, blob in self.log:
            if kind == "gateway" and blob[1] == dbn.RTYPE_SYMBOL_MAPPING:
                _, raw = dbn.symbols_from_mapping(blob)
                out.append((raw, dbn.header_at(blob)[3]))
        return out

    def data_records(self) -> list[bytes]:
        return [r for kind, blob in self.log if kind == "data" for r in split_records(blob)]


class Loop:
    """A stand-in for call_soon: slices run only when the test says so."""

    def __init__(self) -> None:
        self.ready: list[Callable[[], None]] = []

    def __call__(self, callback: Callable[[], None]) -> None:
        self.ready.append(callback)

    def run_one(self) -> bool:
        if not self.ready:
            return False
        self.ready.pop(0)()
        return True


def new_feed(loop: Loop) -> Feed:
    return Feed(
        "GLBX.MDP3",
        fanout=FanOut(clock_ns=lambda: CLOCK),
        clock_ns=lambda: CLOCK,
        slice_size=SLICE,
        schedule=loop,
    )


def sub(symbols, schema="trades", stype="raw_symbol", sub_id=1) -> Subscription:
    return Subscription(schema, stype, tuple(symbols), sub_id)


def publish(feed: Feed, recs: list[bytes]) -> None:
    index, _ = dbn.index_records(b"".join(recs))
    feed.publish(index)


def run_slices_with_traffic(feed: Feed, loop: Loop, bystander: Member, limit: int) -> int:
    """Run every queued slice, publishing one chunk between slices. The bystander (an
    ALL_SYMBOLS trades session) gets each chunk before the next slice runs, except while
    the feed itself is paused learning a burst of mappings: then its chunks are held and
    come, in order, right after the burst (the event loop is free all along)."""
    slices = 0
    start = len(bystander.data_records())
    while loop.run_one():
        slices += 1
        assert slices <= limit
        before = len(bystander.data_records())
        held = feed.paused
        publish(feed, [trade(7, NOW_NS + slices, sequence=slices)])
        if not held:
            assert len(bystander.data_records()) == before + 1
    got = bystander.data_records()[start:]
    assert [dbn.header_at(r)[4] for r in got] == [NOW_NS + k for k in range(1, slices + 1)]
    return slices


def bystander_of(feed: Feed) -> Member:
    member = Member()
    feed.join(member)
    feed.subscribe(member, sub([ALL_SYMBOLS], schema="trades", stype="instrument_id"))
    return member


@pytest.mark.slow_e2e  # 10x the sizes, sans-I/O: no event loop involved
def test_unknown_symbols_then_a_metadata_burst_is_sliced():
    """200,000 named symbols (10x the 20,000 of the issue), all unknown, then a burst
    that maps every one: no slice does more than SLICE units, data flows in between,
    and every mapping arrives, each before its instrument's first record."""
    n = 200_000
    loop = Loop()
    feed = new_feed(loop)
    bystander = bystander_of(feed)
    member = Member()
    feed.join(member)
    symbols = [f"S{i}" for i in range(n)]
    first = feed.subscribe(member, sub(symbols))
    assert decode(first[0])[0].code == d.SystemCode.SUBSCRIPTION_ACK
    member.send_gateway_records(first)
    # resolving is one unit per symbol, the coalesced errors one per record (~30 symbols)
    limit = n // SLICE + n // 20 // SLICE + 10
    slices = run_slices_with_traffic(feed, loop, bystander, limit=limit)
    assert slices >= n // SLICE - 1
    errors = [decode(b)[0] for k, b in member.log if k == "gateway" and b[1] == dbn.RTYPE_ERROR]
    named = [s for e in errors for s in e.err.split(": ", 1)[1].split(", ")]
    assert named == symbols  # every unknown symbol reported once, in order, coalesced
    assert len(errors) < n // 20 and [e.is_last for e in errors][-1]
    # The burst: learnt in one call (as from a publisher's Metadata).
    member.log.clear()
    feed.learn_many([(s, 10_000 + i) for i, s in enumerate(symbols)])
    assert feed.max_slice_units <= SLICE
    assert feed.paused  # learnt slice by slice, the source paused meanwhile
    # learning is n units, the member's mappings n, the ALL_SYMBOLS bystander's n
    run_slices_with_traffic(feed, loop, bystander, limit=3 * n // SLICE + 10)
    assert not feed.paused
    assert feed.max_slice_units <= SLICE
    assert member.mappings() == [(s, 10_000 + i) for i, s in enumerate(symbols)]
    publish(feed, [trade(10_000 + n - 1), trade(3)])
    assert [dbn.header_at(r)[3] for r in member.data_records()] == [10_000 + n - 1]


def test_records_of_an_instrument_never_precede_its_mapping():
    loop = Loop()
    feed = new_feed(loop)
    bystander = bystander_of(feed)
    member = Member()
    feed.join(member)
    symbols = [f"S{i}" for i in range(5 * SLICE)]
    member.send_gateway_records(feed.subscribe(member, sub(symbols)))
    run_slices_with_traffic(feed, loop, bystander, limit=100)
    member.log.clear()
    feed.learn_many([(s, 100 + i) for i, s in enumerate(symbols)])
    last = 100 + len(symbols) - 1
    while True:
        publish(feed, [trade(last), trade(100)])
        if not loop.run_one():
            break
    seen_mapping = False
    for kind, blob in member.log:
        if kind == "gateway" and blob[1] == dbn.RTYPE_SYMBOL_MAPPING:
            seen_mapping = seen_mapping or dbn.header_at(blob)[3] == last
        elif kind == "data":
            ids = [dbn.header_at(r)[3] for r in split_records(blob)]
            assert last not in ids or seen_mapping


@pytest.mark.slow_e2e  # 10x the sizes, sans-I/O: no event loop involved
def test_many_sessions_many_symbols_and_a_definition_burst():
    """1,000 sessions x 500 symbols, then 50,000 new definitions (10x the issue's case):
    the work is the mappings owed, in slices, not sessions x symbols x definitions."""
    loop = Loop()
    feed = new_feed(loop)
    bystander = bystander_of(feed)
    members = []
    for m in range(1000):
        member = Member()
        feed.join(member)
        feed.subscribe(member, sub([f"X{(m * 50 + k) % 50_000}" for k in range(500)], sub_id=m))
        members.append(member)
    run_slices_with_traffic(feed, loop, bystander, limit=10_000)
    for member in members:
        member.log.clear()
    before = feed.slices
    feed.learn_many([(f"X{i}", 500_000 + i) for i in range(50_000)])
    run_slices_with_traffic(feed, loop, bystander, limit=10_000)
    assert feed.max_slice_units <= SLICE
    # 1,000 x 500 mappings owed: at most one slice per SLICE of them (plus a few)
    # (learning the 50,000 is 50 slices; the ALL_SYMBOLS bystander is owed them too)
    assert feed.slices - before <= (1000 * 500 + 2 * 50_000) // SLICE + 3
    for m, member in enumerate(members):
        named = [(m * 50 + k) % 50_000 for k in range(500)]
        wanted = {(f"X{i}", 500_000 + i) for i in named}
        assert set(member.mappings()) == wanted


def test_repeated_all_symbols_costs_what_is_new():
    """4,000 ALL_SYMBOLS subscriptions (10x the issue's 400) on a 100,000-instrument
    feed: the directory is walked once, every later one costs O(1)."""
    n = 100_000
    loop = Loop()
    feed = new_feed(loop)
    feed.learn_many([(f"I{i}", i) for i in range(n)])
    member = Member()
    feed.join(member)
    for k in range(4000):
        member.send_gateway_records(
            feed.subscribe(member, sub([ALL_SYMBOLS], schema="trades", sub_id=k))
        )
        loop.run_one()
    while loop.run_one():
        pass
    assert feed.max_slice_units <= SLICE
    # learning the directory (n), announcing it once (n), the 4,000 acks: no rewalks
    assert feed.slices <= 2 * n // SLICE + 4000 // SLICE + 10
    assert len(member.mappings()) == n
    acks = [b for k, b in member.log if k == "gateway" and b[1] == dbn.RTYPE_SYSTEM]
    assert len(acks) == 4000


def test_all_symbols_records_start_after_its_mappings():
    loop = Loop()
    feed = new_feed(loop)
    feed.learn_many([(f"I{i}", i) for i in range(3 * SLICE)])
    while loop.run_one():
        pass
    member = Member()
    feed.join(member)
    member.send_gateway_records(feed.subscribe(member, sub([ALL_SYMBOLS], sub_id=1)))
    publish(feed, [trade(1)])
    assert member.data_records() == []
    while loop.run_one():
        pass
    publish(feed, [trade(1)])
    assert len(member.data_records()) == 1
    assert len(member.mappings()) == 3 * SLICE


def test_blocked_member_waits_and_others_go_on():
    loop = Loop()
    feed = new_feed(loop)
    feed.learn_many([(f"I{i}", i) for i in range(3 * SLICE)])
    while loop.run_one():
        pass
    slow, fast = Member(), Member()
    for m in (slow, fast):
        feed.join(m)
    slow.send_gateway_records(feed.subscribe(slow, sub([ALL_SYMBOLS], sub_id=1)))
    feed.member_blocked(slow, True)
    fast.send_gateway_records(feed.subscribe(fast, sub([ALL_SYMBOLS], sub_id=2)))
    while loop.run_one():
        pass
    assert len(fast.mappings()) == 3 * SLICE
    assert len(slow.mappings()) <= SLICE
    feed.member_blocked(slow, False)
    while loop.run_one():
        pass
    assert len(slow.mappings()) == 3 * SLICE


def test_leave_drops_queued_work_and_index_entries():
    loop = Loop()
    feed = new_feed(loop)
    member = Member()
    feed.join(member)
    feed.subscribe(member, sub([f"S{i}" for i in range(3 * SLICE)]))
    feed.leave(member)
    while loop.run_one():
        pass
    assert feed.subscriptions.want_raw == {}
    feed.learn_many([("S1", 1)])
    assert feed.subscriptions.work == {}


def test_resolution_errors_are_coalesced_and_bounded():
    assert [decode(r)[0].err for r in resolution_errors(1, ["NOPE"])] == [
        "Failed to resolve symbol: NOPE"
    ]
    long = ["Z" * 200, "Y" * 10, "X" * 400]
    texts = [decode(r)[0].err for r in resolution_errors(1, long)]
    assert texts == [
        "Failed to resolve symbols: " + "Z" * 200 + ", " + "Y" * 10,
        "Failed to resolve symbol: " + "X" * 271 + "...",
    ]
    many = [f"SYM{i:05d}" for i in range(100_000)]
    recs = resolution_errors(1, many)
    decoded = [decode(r)[0] for r in recs]
    assert all(len(e.err) <= 301 for e in decoded)
    assert [s for e in decoded for s in e.err.split(": ", 1)[1].split(", ")] == many
    assert sum(map(len, recs)) < 32 * 1024 * 1024 // 20
    assert [bool(e.is_last) for e in decoded] == [False] * (len(decoded) - 1) + [True]


def test_schema_the_feed_never_carries_gets_a_non_fatal_error():
    feed = Feed("GLBX.MDP3", clock_ns=lambda: CLOCK)
    feed.on_metadata(
        d.Metadata(
            dataset="GLBX.MDP3",
            start=0,
            stype_in=None,
            stype_out=d.SType.INSTRUMENT_ID,
            schema=d.Schema.TBBO,
        )
    )
    member = Member()
    feed.join(member)
    (answer,) = [decode(r)[0] for r in feed.subscribe(member, sub([ALL_SYMBOLS], "mbp-1"))]
    assert isinstance(answer, d.ErrorMsg)
    assert answer.code == d.ErrorCode.INVALID_SUBSCRIPTION
    assert answer.err == (
        "Subscription request 1: mbp-1 data is not available from dataset GLBX.MDP3"
    )
    (ok,) = [decode(r)[0] for r in feed.subscribe(member, sub([ALL_SYMBOLS], "tbbo", sub_id=2))]
    assert ok.code == d.SystemCode.SUBSCRIPTION_ACK


class CuttingMember(Member):
    """A session the adapter cuts (leaves the feed) while the feed is writing to it."""

    def __init__(self, feed: Feed) -> None:
        super().__init__()
        self.feed = feed

    def send_gateway_records(self, records: list[bytes]) -> None:
        super().send_gateway_records(records)
        self.feed.leave(self)


def test_member_cut_while_written_to_is_not_put_back():
    loop = Loop()
    feed = new_feed(loop)
    feed.learn_many([(f"I{i}", i) for i in range(3 * SLICE)])
    while loop.run_one():
        pass
    member = CuttingMember(feed)
    feed.join(member)
    member.send_gateway_records(feed.subscribe(member, sub([ALL_SYMBOLS], sub_id=1)))
    while loop.run_one():
        pass
    feed.learn_many([("NEW", 99_999)])
    while loop.run_one():
        pass
    assert feed.fanout.spec_of(member) is None
    assert member not in feed.members and feed.subscriptions.work == {}
