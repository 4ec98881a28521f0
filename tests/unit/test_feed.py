"""Feed (gateway/feeds/base.py): subscription answers, symbology learnt from the data,
gateway-only rtypes never forwarded, tbbo vs mbp-1 (``gateway/subscriptions.py``,
``gateway/symbology.py``)."""

from __future__ import annotations

import asyncio

import databento_dbn as d
import pytest

from gateway import dbn
from gateway.control import ALL_SYMBOLS
from gateway.fanout import FanOut
from gateway.feeds.base import Feed
from gateway.session import Subscription

from .conftest import (
    NOW_NS,
    decode,
    definition,
    mbo,
    sample_decoded,
    sample_path,
    sample_records,
    split_records,
    symbol_mapping,
    trade,
)

CLOCK = 1_750_000_000_000_000_000
GATEWAY_RTYPES = {0x15, 0x16, 0x17}


class Member:
    """A FeedMember that logs everything it is sent, in order."""

    def __init__(self, ts_out: bool = False, zstd: bool = False) -> None:
        self.ts_out = ts_out
        self.zstd = zstd
        self.log: list[tuple[str, bytes]] = []

    def deliver(self, data, records: int) -> None:
        self.log.append(("data", bytes(data)))
        assert len(split_records(bytes(data))) == records

    def send_gateway_records(self, records: list[bytes]) -> None:
        for rec in records:
            self.log.append(("gateway", rec))

    @property
    def data(self) -> bytes:
        return b"".join(b for kind, b in self.log if kind == "data")

    @property
    def gateway(self) -> list:
        return [decode(b)[0] for kind, b in self.log if kind == "gateway"]


def new_feed() -> Feed:
    feed = Feed("GLBX.MDP3", fanout=FanOut(clock_ns=lambda: CLOCK), clock_ns=lambda: CLOCK)
    feed.learn_many([("ESZ4", 1001), ("NQZ4", 1002), ("RTYZ4", 1003)])
    return feed


def sub(symbols, schema="trades", stype="raw_symbol", sub_id=1) -> Subscription:
    return Subscription(schema, stype, tuple(symbols), sub_id)


def join(feed: Feed, subscription: Subscription, member: Member | None = None):
    member = member or Member()
    feed.join(member)
    answer = [decode(r)[0] for r in feed.subscribe(member, subscription)]
    return member, answer


def publish(feed: Feed, recs: list[bytes]) -> None:
    index, used = dbn.index_records(b"".join(recs))
    assert used == sum(map(len, recs))
    feed.publish(index)


def trades_for(*ids: int) -> list[bytes]:
    return [trade(iid, NOW_NS + n, sequence=n) for n, iid in enumerate(ids)]


# --- subscription answers ------------------------------------------------------------------


def test_subscribe_answers_ack_mappings_and_errors():
    feed = new_feed()
    _, answer = join(feed, sub(["ESZ4", "BAD1", "NQZ4", "BAD2", "BAD3"], sub_id=4))
    ack, *rest = answer
    assert isinstance(ack, d.SystemMsg)
    assert ack.code == d.SystemCode.SUBSCRIPTION_ACK
    assert "trades" in ack.msg
    assert ack.ts_event == CLOCK
    mappings = [r for r in rest if isinstance(r, d.SymbolMappingMsg)]
    errors = [r for r in rest if isinstance(r, d.ErrorMsg)]
    assert len(mappings) + len(errors) == len(rest)
    assert sorted((m.instrument_id, m.stype_in_symbol, m.stype_out_symbol) for m in mappings) == [
        (1001, "ESZ4", "ESZ4"),
        (1002, "NQZ4", "NQZ4"),
    ]
    for m in mappings:
        assert m.stype_in == d.SType.RAW_SYMBOL
        assert m.stype_out == d.SType.RAW_SYMBOL
        assert m.ts_event == CLOCK
    # unresolved symbols are coalesced (issue 11): one ErrorMsg names all three
    assert [e.code for e in errors] == [d.ErrorCode.SYMBOL_RESOLUTION_FAILED]
    assert errors[0].err == "Failed to resolve symbols: BAD1, BAD2, BAD3"
    assert [bool(e.is_last) for e in errors] == [True]
    # the order Databento's gateway uses: ack, mappings, then errors
    assert rest.index(errors[0]) > max(rest.index(m) for m in mappings)


def test_subscribe_all_resolved_has_no_error():
    feed = new_feed()
    _, answer = join(feed, sub(["RTYZ4"]))
    assert [type(r) for r in answer] == [d.SystemMsg, d.SymbolMappingMsg]


def test_subscribe_single_unresolved_is_last():
    feed = new_feed()
    _, answer = join(feed, sub(["NOPE"]))
    assert [type(r) for r in answer] == [d.SystemMsg, d.ErrorMsg]
    assert answer[1].is_last
    assert answer[1].code == d.ErrorCode.SYMBOL_RESOLUTION_FAILED


def test_subscribe_instrument_id():
    feed = new_feed()
    member, answer = join(feed, sub(["1002"], stype="instrument_id"))
    (mapping,) = [r for r in answer if isinstance(r, d.SymbolMappingMsg)]
    assert mapping.instrument_id == 1002
    assert mapping.stype_in == d.SType.INSTRUMENT_ID
    assert mapping.stype_in_symbol == "1002"
    assert mapping.stype_out_symbol == "NQZ4"
    recs = trades_for(1001, 1002, 1003, 1002)
    publish(feed, recs)
    assert member.data == recs[1] + recs[3]


def test_subscribe_all_symbols_announces_every_known_symbol():
    feed = new_feed()
    member, answer = join(feed, sub([ALL_SYMBOLS]))
    mappings = {
        (r.stype_in_symbol, r.instrument_id) for r in answer if isinstance(r, d.SymbolMappingMsg)
    }
    assert mappings == {("ESZ4", 1001), ("NQZ4", 1002), ("RTYZ4", 1003)}
    assert not any(isinstance(r, d.ErrorMsg) for r in answer)
    recs = trades_for(1001, 5555, 1003)
    publish(feed, recs)
    assert member.data == b"".join(recs)


def test_repeated_symbol_is_announced_once():
    feed = new_feed()
    member, first = join(feed, sub(["ESZ4"], schema="trades", sub_id=1))
    second = [decode(r)[0] for r in feed.subscribe(member, sub(["ESZ4"], schema="mbo", sub_id=2))]
    assert sum(isinstance(r, d.SymbolMappingMsg) for r in first) == 1
    assert [type(r) for r in second] == [d.SystemMsg]


# --- data ----------------------------------------------------------------------------------


def test_only_subscribed_instruments_and_schemas_are_delivered():
    feed = new_feed()
    member, _ = join(feed, sub(["ESZ4", "RTYZ4"]))
    recs = trades_for(1001, 1002, 1003, 1001) + [mbo(1001)]
    publish(feed, recs)
    assert member.data == recs[0] + recs[2] + recs[3]


def test_two_subscriptions_merge():
    feed = new_feed()
    member, _ = join(feed, sub(["ESZ4"], schema="trades", sub_id=1))
    feed.subscribe(member, sub(["NQZ4"], schema="mbo", sub_id=2))
    recs = [trade(1001), mbo(1001), trade(1002), mbo(1002)]
    publish(feed, recs)
    assert member.data == recs[0] + recs[3]


def test_leave_stops_delivery():
    feed = new_feed()
    member, _ = join(feed, sub(["ESZ4"]))
    feed.leave(member)
    publish(feed, trades_for(1001))
    assert member.data == b""
    assert feed.members == []


def test_ts_out_member_gets_stamped_records():
    feed = new_feed()
    member, _ = join(feed, sub(["ESZ4"]), Member(ts_out=True))
    recs = trades_for(1001, 1002)
    publish(feed, recs)
    (rec,) = decode(member.data, ts_out=True)
    assert rec.ts_out == CLOCK
    assert rec.instrument_id == 1001


# --- symbology learnt later ----------------------------------------------------------------


def test_symbol_learnt_later_via_learn_many():
    feed = new_feed()
    member, _ = join(feed, sub(["NEWCO"]))
    publish(feed, trades_for(2000))
    assert member.data == b""
    member.log.clear()
    feed.learn_many([("NEWCO", 2000)])
    (mapping,) = member.gateway
    assert isinstance(mapping, d.SymbolMappingMsg)
    assert (mapping.instrument_id, mapping.stype_in_symbol, mapping.stype_out_symbol) == (
        2000,
        "NEWCO",
        "NEWCO",
    )
    recs = trades_for(2000, 1001, 2000)
    publish(feed, recs)
    assert member.data == recs[0] + recs[2]


def test_learn_many_same_mapping_again_sends_nothing():
    feed = new_feed()
    member, _ = join(feed, sub(["ESZ4"]))
    member.log.clear()
    feed.learn_many([("ESZ4", 1001)])
    assert member.log == []


def test_symbol_remapped_to_new_instrument():
    feed = new_feed()
    member, _ = join(feed, sub(["ESZ4"]))
    member.log.clear()
    feed.learn_many([("ESZ4", 4242)])
    (mapping,) = member.gateway
    assert mapping.instrument_id == 4242
    recs = trades_for(1001, 4242)
    publish(feed, recs)
    assert member.data == recs[1]


def test_symbol_learnt_from_symbol_mapping_record_in_the_data():
    feed = new_feed()
    member, _ = join(feed, sub(["LATE1"]))
    member.log.clear()
    late = trade(3000, NOW_NS + 5)
    publish(feed, [trade(1001), symbol_mapping(3000, "LATE1"), late])
    kinds = [kind for kind, _ in member.log]
    assert kinds == ["gateway", "data"]  # mapping first, then the data that follows it
    (mapping,) = member.gateway
    assert isinstance(mapping, d.SymbolMappingMsg)
    assert (mapping.instrument_id, mapping.stype_out_symbol) == (3000, "LATE1")
    assert member.data == late
    assert feed.directory.by_symbol["LATE1"] == 3000


def test_symbol_learnt_from_definition_record_in_the_data():
    feed = new_feed()
    member, _ = join(feed, sub(["NEWDEF"]))
    watcher, _ = join(feed, sub([ALL_SYMBOLS], schema="definition", sub_id=2))
    member.log.clear()
    watcher.log.clear()
    defn = definition(3100, "NEWDEF")
    late = trade(3100, NOW_NS + 9)
    publish(feed, [defn, late])
    (mapping,) = member.gateway
    assert (mapping.instrument_id, mapping.stype_in_symbol) == (3100, "NEWDEF")
    assert member.data == late
    assert watcher.data == defn  # definitions are market data, not gateway records
    assert feed.directory.by_id[3100] == "NEWDEF"


def test_on_metadata_learns_file_mappings():
    meta, records = sample_decoded(sample_path("GLBX.MDP3", "definition"))
    (symbol,) = meta.mappings
    iid = int(meta.mappings[symbol][-1]["symbol"])
    feed = Feed("GLBX.MDP3", clock_ns=lambda: CLOCK)
    feed.on_metadata(meta)
    member, answer = join(feed, sub([symbol], schema="definition"))
    (mapping,) = [r for r in answer if isinstance(r, d.SymbolMappingMsg)]
    assert mapping.instrument_id == iid
    publish(feed, list(records))
    assert member.data == b"".join(records)


# --- gateway rtypes ------------------------------------------------------------------------


def test_gateway_rtypes_in_feed_data_are_never_delivered():
    feed = new_feed()
    everything, _ = join(feed, sub([ALL_SYMBOLS]))
    some, _ = join(feed, sub(["ESZ4"]))
    recs = [
        trade(1001),
        dbn.encode_system(NOW_NS, "Heartbeat", 0),
        trade(1002),
        dbn.encode_error(NOW_NS, "upstream error", 6),
        symbol_mapping(1001, "ESZ4"),
        trade(1001, NOW_NS + 1),
        dbn.encode_system(NOW_NS, "Subscription request 1 for trades data succeeded", 1),
    ]
    publish(feed, recs)
    for member in (everything, some):
        assert all(r[1] not in GATEWAY_RTYPES for r in split_records(member.data))
    assert everything.data == recs[0] + recs[2] + recs[5]
    assert some.data == recs[0] + recs[5]


def test_chunk_of_only_gateway_records_delivers_nothing():
    feed = new_feed()
    member, _ = join(feed, sub([ALL_SYMBOLS]))
    member.log.clear()
    publish(feed, [dbn.encode_system(NOW_NS, "Heartbeat", 0), dbn.encode_error(NOW_NS, "x", 4)])
    assert member.log == []


def test_live_sample_never_forwards_symbol_mappings():
    _, records = sample_decoded(sample_path("LIVE", "live"))
    feed = Feed("GLBX.MDP3", clock_ns=lambda: CLOCK)
    member, _ = join(feed, sub([ALL_SYMBOLS], schema="mbo"))
    watcher, _ = join(feed, sub([ALL_SYMBOLS], schema="definition", sub_id=2))
    publish(feed, list(records))
    delivered = split_records(member.data) + split_records(watcher.data)
    assert delivered
    assert all(r[1] not in GATEWAY_RTYPES for r in delivered)
    assert split_records(member.data) == [r for r in records if r[1] == 0xA0]
    assert feed.directory.by_symbol.get("ESZ4") == 183748


# --- tbbo ----------------------------------------------------------------------------------


def mbp1_records() -> list[bytes]:
    return list(sample_records("GLBX.MDP3", "mbp-1"))


def test_tbbo_not_served_without_tbbo_metadata():
    recs = mbp1_records()
    feed = Feed("GLBX.MDP3", clock_ns=lambda: CLOCK)
    tbbo, _ = join(feed, sub([ALL_SYMBOLS], schema="tbbo"))
    mbp1, _ = join(feed, sub([ALL_SYMBOLS], schema="mbp-1", sub_id=2))
    publish(feed, recs)
    assert tbbo.data == b""
    assert mbp1.data == b"".join(recs)


def tbbo_metadata():
    meta, _ = sample_decoded(sample_path("GLBX.MDP3", "tbbo"))
    assert str(meta.schema) in ("tbbo", "Schema.TBBO") or meta.schema == d.Schema.TBBO
    return meta


def test_tbbo_served_after_tbbo_metadata():
    meta = tbbo_metadata()
    _, recs = sample_decoded(sample_path("GLBX.MDP3", "tbbo"))
    feed = Feed("GLBX.MDP3", clock_ns=lambda: CLOCK)
    feed.on_metadata(meta)
    tbbo, _ = join(feed, sub([ALL_SYMBOLS], schema="tbbo"))
    mbp1, _ = join(feed, sub([ALL_SYMBOLS], schema="mbp-1", sub_id=2))
    publish(feed, list(recs))
    assert tbbo.data == b"".join(recs)
    assert mbp1.data == b""


@pytest.mark.parametrize("with_mappings", [False, True])
def test_tbbo_subscribers_from_before_the_metadata_are_served(with_mappings):
    # An ingest publisher may connect after sessions subscribed: once its Metadata says
    # tbbo, rtype 0x01 is tbbo for everyone, including existing subscribers.
    _, recs = sample_decoded(sample_path("GLBX.MDP3", "tbbo"))
    feed = Feed("GLBX.MDP3", clock_ns=lambda: CLOCK)
    tbbo, _ = join(feed, sub([ALL_SYMBOLS], schema="tbbo"))
    mbp1, _ = join(feed, sub([ALL_SYMBOLS], schema="mbp-1", sub_id=2))
    if with_mappings:
        meta = tbbo_metadata()
    else:
        meta = d.Metadata(
            dataset="GLBX.MDP3",
            start=0,
            stype_in=None,
            stype_out=d.SType.INSTRUMENT_ID,
            schema=d.Schema.TBBO,
        )
    feed.on_metadata(meta)
    publish(feed, list(recs))
    assert tbbo.data == b"".join(recs)
    assert mbp1.data == b""


@pytest.mark.parametrize("schema", ["mbp-1", "trades", "mbo", None])
def test_non_tbbo_metadata_keeps_mbp1(schema):
    meta = d.Metadata(
        dataset="GLBX.MDP3",
        start=0,
        stype_in=None,
        stype_out=d.SType.INSTRUMENT_ID,
        schema=None if schema is None else d.Schema.from_str(schema),
    )
    recs = mbp1_records()
    feed = Feed("GLBX.MDP3", clock_ns=lambda: CLOCK)
    feed.on_metadata(meta)
    tbbo, _ = join(feed, sub([ALL_SYMBOLS], schema="tbbo"))
    mbp1, _ = join(feed, sub([ALL_SYMBOLS], schema="mbp-1", sub_id=2))
    publish(feed, recs)
    assert tbbo.data == b""
    assert mbp1.data == b"".join(recs)


# --- the journal hooks (write-ahead, mappings learnt) --------------------------------------


class FakeJournal:
    """Records what the feed hands a DatasetJournal, in one log shared with a member."""

    def __init__(self, log: list) -> None:
        self.log = log
        self.last_seq = 0

    def append(self, index: dbn.ChunkIndex) -> int:
        self.last_seq += 1
        self.log.append(("append", bytes(index.data)))
        return self.last_seq

    def learn(self, changed, ts=None) -> None:
        self.log.append(("learn", list(changed), ts))


class SharedLogMember(Member):
    def __init__(self, log: list) -> None:
        super().__init__()
        self.shared = log

    def deliver(self, data, records: int) -> None:
        super().deliver(data, records)
        self.shared.append(("deliver", bytes(data)))


def journaled_feed() -> tuple[Feed, list]:
    feed = new_feed()
    log: list = []
    feed.journal = FakeJournal(log)  # type: ignore[assignment]  # a stand-in DatasetJournal
    return feed, log


def test_journal_append_comes_before_fan_out_delivery():
    feed, log = journaled_feed()
    member = SharedLogMember(log)
    join(feed, sub([ALL_SYMBOLS]), member)
    log.clear()
    first = [trade(1001, NOW_NS + 1), trade(1002, NOW_NS + 2)]
    second = [trade(1003, NOW_NS + 3)]
    publish(feed, first)
    publish(feed, second)
    assert log == [
        ("append", b"".join(first)),
        ("deliver", b"".join(first)),
        ("append", b"".join(second)),
        ("deliver", b"".join(second)),
    ]


def test_journal_gets_every_chunk_even_with_no_member():
    feed, log = journaled_feed()
    recs = [trade(1001, NOW_NS)]
    publish(feed, recs)
    assert log == [("append", b"".join(recs))]


def test_journal_gets_the_chunk_without_gateway_records_after_its_mappings():
    feed, log = journaled_feed()
    member = SharedLogMember(log)
    join(feed, sub([ALL_SYMBOLS]), member)
    log.clear()
    data = [trade(1001, NOW_NS + 5), trade(2000, NOW_NS + 6)]
    publish(feed, [symbol_mapping(2000, "NEWCO", NOW_NS + 4), data[0], data[1]])
    kinds = [entry[0] for entry in log]
    # learnt (at_seq = the chunk about to be appended), then appended, then delivered
    assert kinds == ["learn", "append", "deliver"]
    assert log[0][1] == [("NEWCO", 2000)]
    assert log[1] == ("append", b"".join(data))
    assert log[2] == ("deliver", b"".join(data))


def test_journal_learns_only_changed_mappings_with_the_feed_time():
    feed, log = journaled_feed()
    publish(feed, [trade(1001, NOW_NS + 7)])
    log.clear()
    feed.learn_many([("ESZ4", 1001), ("NEWCO", 2000), ("NQZ4", 4242)])
    assert log == [("learn", [("NEWCO", 2000), ("NQZ4", 4242)], NOW_NS + 7)]
    log.clear()
    feed.learn_many([("ESZ4", 1001)])  # nothing new: nothing journaled
    assert log == []


def test_journal_learn_before_any_record_has_no_time():
    feed = Feed("GLBX.MDP3", fanout=FanOut(clock_ns=lambda: CLOCK), clock_ns=lambda: CLOCK)
    log: list = []
    feed.journal = FakeJournal(log)  # type: ignore[assignment]  # a stand-in DatasetJournal
    feed.learn_many([("ESZ4", 1001)])
    assert log == [("learn", [("ESZ4", 1001)], None)]


def test_no_journal_by_default():
    assert new_feed().journal is None


# --- the --workers hooks (gateway/workers: RingSink, RingFeeder) ---------------------------


def test_worker_hooks_are_off_by_default():
    feed = new_feed()
    assert feed.on_learned is None and feed.on_state is None and feed.on_schema is None
    assert feed.on_held is None
    assert not feed.sink_blocked and not feed.remote_blocked_slots
    assert feed.journal_seq == 0


def test_on_learned_gets_only_changed_mappings_after_the_journal():
    feed, log = journaled_feed()
    feed.on_learned = lambda changed: log.append(("hook", list(changed)))
    feed.learn_many([("ESZ4", 1001), ("NEWCO", 2000)])
    assert log == [("learn", [("NEWCO", 2000)], None), ("hook", [("NEWCO", 2000)])]
    log.clear()
    feed.learn_many([("ESZ4", 1001)])
    assert log == []


def test_on_state_only_on_a_change_with_the_notify_flag():
    feed = new_feed()
    seen: list = []
    feed.on_state = lambda connected, detail, notify: seen.append((connected, detail, notify))
    feed.set_state(True, "up", notify=False)
    feed.set_state(True, "up")
    feed.set_state(False, "publisher gone")
    assert seen == [(True, "up", False), (False, "publisher gone", True)]


def test_on_schema_comes_before_the_metadata_mappings():
    class Meta:
        schema = "tbbo"
        mappings: list = []

    feed = Feed("GLBX.MDP3")
    seen: list = []
    feed.on_schema = lambda name: seen.append(("schema", name))
    feed.on_learned = lambda changed: seen.append(("learned", list(changed)))
    feed.on_metadata(Meta(), mappings=[("ESZ4", 1001)])
    assert seen == [("schema", "tbbo"), ("learned", [("ESZ4", 1001)])]
    assert feed.schema_rtype["tbbo"] == 0x01


def test_journal_seq_of_the_chunk_being_published():
    feed, log = journaled_feed()
    seqs: list = []

    class SeqFanOut(FanOut):
        def publish(self, index: dbn.ChunkIndex) -> None:
            seqs.append(feed.journal_seq)

    feed.fanout = SeqFanOut()
    publish(feed, [trade(1001, NOW_NS)])
    publish(feed, [trade(1002, NOW_NS)])
    assert seqs == [1, 2]


def test_set_sink_blocked_pauses_and_resumes_the_source():
    feed = new_feed()
    flow: list = []
    feed.flow_listeners.append(flow.append)
    feed.set_sink_blocked(True)
    feed.set_sink_blocked(True)
    assert feed.paused and flow == [True]
    feed.set_sink_blocked(False)
    assert not feed.paused and flow == [True, False]
    assert feed.pauses == 0  # not a lossless pause


@pytest.mark.parametrize("lossless", [True, False])
def test_remote_blocked_pauses_a_lossless_feed_while_any_worker_says_so(lossless):
    feed = Feed("GLBX.MDP3", backpressure=lossless)
    flow: list = []
    feed.flow_listeners.append(flow.append)
    feed.remote_blocked(1, True)
    feed.remote_blocked(2, True)
    feed.remote_blocked(1, False)
    assert feed.paused is lossless
    feed.remote_blocked(2, False)  # e.g. the worker died: its slot cleared
    assert not feed.paused
    assert flow == ([True, False] if lossless else [])
    assert feed.pauses == (1 if lossless else 0)
    assert feed.paused_since is None


async def test_a_chunk_with_more_definitions_than_a_slice_is_published_once():
    # Before: the held chunk learnt its own definitions again when published, which
    # started the same burst again: held (and the source paused) for ever.
    feed = Feed("GLBX.MDP3", fanout=FanOut(clock_ns=lambda: CLOCK), slice_size=8)
    member, _ = join(feed, sub([ALL_SYMBOLS]))
    held: list = []
    feed.on_held = lambda index: held.append(None if index is None else index.count)
    chunk = [definition(2000 + i, f"S{i}") for i in range(20)] + [trade(2007, NOW_NS)]
    publish(feed, chunk)
    assert feed.paused and feed.holding
    for _ in range(100):
        if not feed.paused:
            break
        await asyncio.sleep(0)
    assert not feed.paused and not feed.holding
    assert member.data == trade(2007, NOW_NS)
    assert held == [21, None]
