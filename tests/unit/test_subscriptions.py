"""gateway/subscriptions.py and gateway/interest.py: the subscription index on its own — a
directory, a fan-out and members that record what they are sent; the index's owner (the
Feed) is stood in for by a list of drain requests. Objects in, gateway records out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import databento_dbn as d

from gateway import dbn
from gateway.control import ALL_SYMBOLS
from gateway.fanout import FanOut
from gateway.interest import Interest
from gateway.subscriptions import SubscriptionIndex
from gateway.symbology import SymbolDirectory

CLOCK = 1_750_000_000_000_000_000
TRADES = 0x00
MBP1 = 0x01


@dataclass(frozen=True)
class Sub:
    """A subscription as the session hands it over (``SubscriptionLike``)."""

    schema: str
    stype_in: str
    symbols: tuple[str, ...]
    sub_id: int | None = 1

    @property
    def all_symbols(self) -> bool:
        return ALL_SYMBOLS in self.symbols


@dataclass(eq=False)
class Member:
    ts_out: bool = False
    zstd: bool = False
    sent: list[bytes] = field(default_factory=list)

    def deliver(self, data: object, records: int) -> None:
        raise AssertionError("the index never delivers data")

    def send_gateway_records(self, records: list[bytes]) -> None:
        self.sent.extend(records)


class Harness:
    def __init__(self, slice_size: int = 100, serves: bool = True) -> None:
        self.directory = SymbolDirectory()
        self.fanout = FanOut(clock_ns=lambda: CLOCK)
        self.schema_rtype = dict(dbn.SCHEMA_RTYPE)
        self.drains = 0
        self.index = SubscriptionIndex(
            "GLBX.MDP3",
            self.directory,
            self.fanout,
            schema_rtype=self.schema_rtype,
            serves=lambda schema: serves,
            clock_ns=lambda: CLOCK,
            slice_size=slice_size,
            request_drain=self._request,
        )

    def _request(self) -> None:
        self.drains += 1

    def learn(self, pairs: list[tuple[str, int]]) -> None:
        self.index.announce(self.directory.learn_many(pairs))

    def drain(self, budget: int) -> list[int]:
        """Run slices until no work is left; the units each used."""
        used = []
        while self.index.has_work():
            used.append(self.index.run(budget))
            assert len(used) < 1000
        return used

    def selection(self, member: Member) -> dict[int, frozenset[int] | None]:
        spec = self.fanout.spec_of(member)
        return {} if spec is None else dict(spec.selection)


def decoded(records: list[bytes]) -> list[Any]:
    dec = d.DBNDecoder(has_metadata=False, input_version=3)
    dec.write(b"".join(records))
    return list(dec.decode())


def mappings(records: list[bytes]) -> list[tuple[str, int]]:
    return [
        (r.stype_out_symbol, r.instrument_id)
        for r in decoded(records)
        if isinstance(r, d.SymbolMappingMsg)
    ]


def test_a_subscription_is_answered_ack_mappings_then_coalesced_errors() -> None:
    h = Harness()
    h.learn([("ESZ4", 1), ("NQZ4", 2)])
    member = Member()
    h.index.join(member)
    answer = h.index.subscribe(member, Sub("trades", "raw_symbol", ("ESZ4", "NOPE", "NQZ4", "X")))
    ack, esz4, nqz4, errors = decoded(answer)
    assert isinstance(ack, d.SystemMsg) and ack.code == d.SystemCode.SUBSCRIPTION_ACK
    assert ack.msg == "Subscription request 1 for trades data succeeded"
    assert (esz4.stype_in_symbol, esz4.instrument_id) == ("ESZ4", 1)
    assert (nqz4.stype_in_symbol, nqz4.instrument_id) == ("NQZ4", 2)
    assert isinstance(errors, d.ErrorMsg) and errors.err == "Failed to resolve symbols: NOPE, X"
    assert errors.code == d.ErrorCode.SYMBOL_RESOLUTION_FAILED and errors.is_last
    assert h.selection(member) == {TRADES: frozenset({1, 2})}
    assert h.drains == 0 and not h.index.has_work() and member.sent == []


def test_a_schema_the_feed_never_carries_gets_an_error_naming_the_dataset() -> None:
    h = Harness(serves=False)
    member = Member()
    (answer,) = decoded(h.index.subscribe(member, Sub("mbp-1", "raw_symbol", (ALL_SYMBOLS,), 4)))
    assert isinstance(answer, d.ErrorMsg) and answer.code == d.ErrorCode.INVALID_SUBSCRIPTION
    assert (
        answer.err == "Subscription request 4: mbp-1 data is not available from dataset GLBX.MDP3"
    )


def test_a_symbol_learnt_later_is_announced_and_then_selected() -> None:
    h = Harness()
    member, bystander = Member(), Member()
    h.index.subscribe(member, Sub("trades", "raw_symbol", ("LATE",)))
    h.index.subscribe(bystander, Sub("trades", "instrument_id", ("77",)))
    assert h.selection(member) == {}
    assert h.selection(bystander) == {TRADES: frozenset({77})}  # an id selects itself at once
    h.learn([("OTHER", 5), ("LATE", 77)])
    assert h.drain(100) == [2]  # one unit per member told
    assert mappings(member.sent) == [("LATE", 77)]
    assert mappings(bystander.sent) == [("LATE", 77)]
    assert h.selection(member) == {TRADES: frozenset({77})}
    assert h.selection(bystander) == {TRADES: frozenset({77})}
    h.learn([("LATE", 78)])  # remapped: the raw-symbol member follows, the id member not
    h.drain(100)
    assert mappings(member.sent) == [("LATE", 77), ("LATE", 78)]
    assert h.selection(member) == {TRADES: frozenset({78})}
    assert h.selection(bystander) == {TRADES: frozenset({77})}


def test_work_beyond_a_slice_is_handed_to_the_owner_and_done_in_order() -> None:
    h = Harness(slice_size=10)
    h.learn([(f"S{i}", i) for i in range(25)])
    member = Member()
    symbols = tuple(f"S{i}" for i in range(25))
    first = h.index.subscribe(member, Sub("trades", "raw_symbol", symbols))
    assert len(first) == 10  # the ack and 9 mappings: one slice
    assert h.drains == 1 and h.index.has_work()
    assert h.drain(10) == [10, 6]  # one unit per symbol resolved
    assert mappings(first + member.sent) == [(s, i) for i, s in enumerate(symbols)]
    # while work is queued, a new subscription answers nothing at once: it queues behind
    h.learn([("Z", 99)])
    member.sent.clear()
    again = h.index.subscribe(member, Sub("mbp-1", "raw_symbol", symbols, 2))
    assert len(again) == 1 and h.index.has_work()  # the ack: its mappings were sent before
    assert h.index.subscribe(member, Sub("trades", "raw_symbol", ("Z",), 3)) == []
    assert h.drains == 3
    h.drain(10)
    *_, ack, z = decoded(member.sent)
    assert ack.msg == "Subscription request 3 for trades data succeeded"
    assert (z.stype_in_symbol, z.instrument_id) == ("Z", 99)


def test_all_symbols_catches_up_on_the_log_once_and_starts_its_records_after() -> None:
    h = Harness(slice_size=10)
    h.learn([(f"I{i}", i) for i in range(15)] + [("I3", 300)])  # I3 remapped
    member = Member()
    first = h.index.subscribe(member, Sub("mbp-1", "raw_symbol", (ALL_SYMBOLS,)))
    assert h.selection(member) == {}  # no records before the mappings are out
    h.drain(10)
    got = mappings(first + member.sent)
    assert len(got) == 15 and ("I3", 300) in got and ("I3", 3) not in got
    assert h.selection(member) == {MBP1: None}
    sent = len(member.sent)
    h.learn([("NEW", 500), ("I0", 0)])  # only what is new is announced
    h.drain(10)
    assert mappings(member.sent[sent:]) == [("NEW", 500)]


def test_a_blocked_member_waits_and_the_owner_is_asked_again_when_it_is_not() -> None:
    h = Harness(slice_size=5)
    h.learn([(f"I{i}", i) for i in range(20)])
    slow, fast = Member(), Member()
    h.index.subscribe(slow, Sub("trades", "raw_symbol", (ALL_SYMBOLS,)))
    h.index.set_blocked(slow, True)
    h.index.subscribe(fast, Sub("trades", "raw_symbol", (ALL_SYMBOLS,), 2))
    h.drain(5)
    assert len(mappings(fast.sent)) + 4 == 20 and len(slow.sent) == 0
    drains = h.drains
    h.index.set_blocked(slow, False)
    assert h.drains == drains + 1 and h.index.has_work()
    h.drain(5)
    assert len(mappings(slow.sent)) + 4 == 20


def test_leave_forgets_the_member_everywhere() -> None:
    h = Harness(slice_size=5)
    member = Member()
    h.index.subscribe(member, Sub("trades", "raw_symbol", tuple(f"S{i}" for i in range(20))))
    h.index.subscribe(member, Sub("trades", "instrument_id", ("7",), 2))
    h.index.subscribe(member, Sub("trades", "raw_symbol", (ALL_SYMBOLS,), 3))
    h.drain(5)
    h.learn([("S1", 1)])
    assert member in h.index and h.fanout.spec_of(member) is not None
    h.index.leave(member)
    assert member not in h.index and not h.index and h.index.members == []
    assert h.index.want_raw == {} and h.index.want_iid == {} and h.index.work == {}
    assert h.fanout.spec_of(member) is None
    h.learn([("S2", 2)])
    assert not h.index.has_work()


def test_a_changed_schema_table_regroups_every_member() -> None:
    h = Harness()
    member = Member()
    h.index.subscribe(member, Sub("tbbo", "raw_symbol", (ALL_SYMBOLS,)))
    h.schema_rtype["tbbo"], h.schema_rtype["mbp-1"] = -1, -1
    h.index.regroup_all()
    assert h.selection(member) == {}
    h.schema_rtype["tbbo"] = MBP1
    h.index.regroup_all()
    assert h.selection(member) == {MBP1: None}


def test_an_interest_selects_by_schema_and_marks_itself_dirty_on_change() -> None:
    interest = Interest()
    interest.all_schemas.add("trades")
    interest.named[(dbn.STYPE_RAW_SYMBOL, "A")] = 5
    interest.name(dbn.STYPE_RAW_SYMBOL, "A", "mbp-1")  # resolved already: selected at once
    assert interest.dirty and interest.counts == {"mbp-1": {5: 1}}
    interest.dirty = False
    interest.count("mbp-1", 5, 1)  # a second name for the same instrument
    assert not interest.dirty
    interest.count("ohlcv-1s", 9, 1)
    table = {"trades": TRADES, "mbp-1": MBP1, "ohlcv-1s": -1}
    assert interest.selection(table) == {TRADES: None, MBP1: {5}}
    interest.count("mbp-1", 5, -1)
    interest.count("mbp-1", 5, -1)
    assert interest.dirty and interest.selection(table) == {TRADES: None}


def test_handover_registers_a_replayed_session_as_acked_and_mapped_and_places_it_now() -> None:
    h = Harness(slice_size=2)
    h.learn([("AAA", 1), ("BBB", 2), ("CCC", 3)])
    member = Member()
    subs = [Sub("trades", "raw_symbol", (ALL_SYMBOLS,)), Sub("mbp-1", "raw_symbol", ("BBB", "CCC"))]
    # The replay announced everything but CCC's mapping for mbp-1 (named: it has its own key).
    announced = {(dbn.STYPE_RAW_SYMBOL, "AAA"): 1, (dbn.STYPE_RAW_SYMBOL, "BBB"): 2}
    extra = h.index.handover(member, subs, announced)
    # ALL_SYMBOLS of raw_symbol covers the named raw symbols: nothing more to send, no ack,
    # no queued work, and the member is in the fan-out at once with its full selection.
    assert extra == [] and member.sent == [] and not h.index.has_work()
    spec = h.fanout.spec_of(member)
    assert spec is not None
    assert dict(spec.selection) == {TRADES: None, MBP1: frozenset({2, 3})}
    # Later mappings reach it as they would a live ALL_SYMBOLS session.
    h.learn([("DDD", 4)])
    h.drain(10)
    assert mappings(member.sent) == [("DDD", 4)]
    # Named by instrument id and not announced by the replay: the mapping comes back to send.
    other = Member()
    extra = h.index.handover(other, [Sub("trades", "instrument_id", ("3",))], {})
    assert mappings(extra) == [("CCC", 3)]
    assert dict(h.fanout.spec_of(other).selection) == {TRADES: frozenset({3})}  # type: ignore[union-attr]
