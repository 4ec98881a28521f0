"""gateway/smart_symbols.py (parent/continuous symbols, the resolver) and its wiring in the
subscription index, through a real Feed: definitions and statistics built here as real DBN v3
records (databento_dbn), chunks in, gateway records and data out."""

from __future__ import annotations

import time
from typing import Any

import databento_dbn as d
import pytest
from databento.common.validation import validate_smart_symbol

from gateway import dbn
from gateway.fanout import FanOut
from gateway.feeds.base import Feed
from gateway.session import Subscription
from gateway.smart_symbols import (
    DEF_DTYPE,
    STAT_DTYPE,
    STYPE_CONTINUOUS,
    STYPE_PARENT,
    SmartResolver,
    SmartSymbolError,
    encode_mappings,
    normalize,
    parse_smart,
)

from .conftest import decode, split_records, trade

NOW = 1_750_000_000_000_000_000
DAY = 86_400 * 10**9
UNDEF = 2**64 - 1
F = d.InstrumentClass.FUTURE
S = d.InstrumentClass.FUTURE_SPREAD
C = d.InstrumentClass.CALL
P = d.InstrumentClass.PUT
T = d.InstrumentClass.OPTION_SPREAD
M = d.InstrumentClass.MIXED_SPREAD
OI = d.StatType.OPEN_INTEREST
VOL = d.StatType.CLEARED_VOLUME


def definition(
    iid: int,
    raw: str,
    cls: Any = F,  # the stubs type enum members as str
    expires_in_days: float | None = 30,
    *,
    asset: str = "ES",
    underlying: str = "",
    security_type: str = "FUT",
    ts: int = NOW - DAY,
    action: Any = d.SecurityUpdateAction.ADD,
) -> bytes:
    expiration = UNDEF if expires_in_days is None else int(NOW + expires_in_days * DAY)
    rec = d.InstrumentDefMsg(
        publisher_id=1,
        instrument_id=iid,
        ts_event=ts,
        ts_recv=ts,
        min_price_increment=250_000_000,
        display_factor=1_000_000_000,
        raw_symbol=raw,
        asset=asset,
        group=asset,
        underlying=underlying,
        instrument_class=cls if cls is not None else F,  # type: ignore[arg-type]
        security_type=security_type,
        expiration=expiration,
        exchange="XCME",
        security_update_action=action,
    )
    raw_bytes = bytearray(bytes(rec))
    assert len(raw_bytes) == 520
    if cls is None:  # no class given (databento_dbn cannot write one): the byte at 487
        raw_bytes[487] = 0
    return bytes(raw_bytes)


def stat(
    iid: int,
    stat_type: Any,
    quantity: int,
    day: int = -1,
    *,
    ts_ref: int | None = None,
    ts_recv: int = NOW - DAY // 2,
    action: Any = d.StatUpdateAction.NEW,
) -> bytes:
    """A statistic for the UTC day ``day`` days from NOW's (``ts_ref`` at its start)."""
    ref = (NOW // DAY + day) * DAY if ts_ref is None else ts_ref
    rec = d.StatMsg(
        publisher_id=1,
        instrument_id=iid,
        ts_event=ts_recv,
        ts_recv=ts_recv,
        ts_ref=ref,
        price=2**63 - 1,
        quantity=quantity,
        sequence=0,
        ts_in_delta=0,
        stat_type=stat_type,
        channel_id=0,
        update_action=action,
    )
    return bytes(rec)


def chunk(*records: bytes) -> dbn.ChunkIndex:
    index, used = dbn.index_records(b"".join(records))
    assert used == sum(map(len, records))
    return index


def resolver(*records: bytes) -> SmartResolver:
    r = SmartResolver()
    r.learn(chunk(*records))
    return r


def resolve(r: SmartResolver, symbol: str, now: int = NOW) -> list[str]:
    stype = "parent" if symbol.count(".") == 1 else "continuous"
    return [raw for _, raw in r.resolve(parse_smart(symbol, stype), now)]


# --- record layouts -----------------------------------------------------------------------


def test_the_dtypes_read_what_databento_dbn_writes() -> None:
    rec = definition(7, "ESZ6-ESH7", S, 12, asset="ES", underlying="ESZ6", security_type="MLEG")
    row = __import__("numpy").frombuffer(rec, DEF_DTYPE)[0]
    ref = decode(rec)[0]
    assert DEF_DTYPE.itemsize == len(rec) == 520
    assert int(row["instrument_id"]) == ref.instrument_id == 7
    assert int(row["rtype"]) == 0x13
    assert int(row["expiration"]) == ref.expiration and int(row["ts_recv"]) == ref.ts_recv
    for name in ("raw_symbol", "group", "asset", "security_type", "underlying"):
        assert row[name].decode() == getattr(ref, name), name
    assert row["instrument_class"].decode() == str(ref.instrument_class.value) == "S"
    assert row["security_update_action"].decode() == "A"
    srec = stat(9, OI, 123_456, ts_ref=NOW - 5, ts_recv=NOW - 3)
    srow = __import__("numpy").frombuffer(srec, STAT_DTYPE)[0]
    sref = decode(srec)[0]
    assert STAT_DTYPE.itemsize == len(srec) == 80
    assert (int(srow["instrument_id"]), int(srow["quantity"])) == (9, sref.quantity) == (9, 123_456)
    assert int(srow["ts_ref"]) == sref.ts_ref and int(srow["ts_recv"]) == sref.ts_recv
    assert int(srow["stat_type"]) == 9 and int(srow["update_action"]) == 1


def test_mappings_are_the_same_bytes_as_the_gateway_encoder() -> None:
    found = [(11, "ESZ6"), (12, "ESZ6-ESH7"), (2**32 - 1, "X" * 80)]
    got = encode_mappings(NOW, STYPE_PARENT, "ES.FUT", found)
    want = [dbn.encode_symbol_mapping(NOW, i, STYPE_PARENT, "ES.FUT", raw, NOW) for i, raw in found]
    assert got == want
    assert encode_mappings(NOW, STYPE_CONTINUOUS, "ES.c.0", []) == []
    m = decode(got[0])[0]
    assert (m.stype_in, m.stype_in_symbol, m.stype_out_symbol) == (
        d.SType.PARENT,
        "ES.FUT",
        "ESZ6",
    )


# --- case rules and validation ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "stype", "want"),
    [
        ("es.fut", "parent", "ES.FUT"),
        (" ES.opt ", "parent", "ES.OPT"),
        ("ES.C.0", "continuous", "ES.c.0"),
        ("es.N.12", "continuous", "ES.n.12"),
        ("6e.v.1", "continuous", "6E.v.1"),
    ],
)
def test_symbols_are_normalised_as_the_official_client_does(
    given: str, stype: str, want: str
) -> None:
    assert normalize(given) == want
    assert validate_smart_symbol(given).strip() == want  # the client's own rule agrees
    parsed = parse_smart(given, stype)
    assert parsed.text == want
    assert parsed.stype == (STYPE_PARENT if stype == "parent" else STYPE_CONTINUOUS)


@pytest.mark.parametrize(
    ("symbol", "stype"),
    [
        ("ES", "parent"),
        ("ES.FOO", "parent"),
        ("ES.c.0", "parent"),
        (".FUT", "parent"),
        ("ES.FUT", "continuous"),
        ("ES.x.0", "continuous"),
        ("ES.c.-1", "continuous"),
        ("ES.c.a", "continuous"),
        ("ES..0", "continuous"),
        ("ES.c.1234567", "continuous"),
        ("A.B.C.D", "continuous"),
        ("E S.c.0", "continuous"),
        ("ES.c.0", "smart"),
    ],
)
def test_malformed_symbols_are_refused(symbol: str, stype: str) -> None:
    with pytest.raises(SmartSymbolError):
        parse_smart(symbol, stype)


# --- parents ----------------------------------------------------------------------------------


def test_fut_is_outrights_and_futures_spreads_opt_is_options_and_combos() -> None:
    r = resolver(
        definition(1, "ESZ6", F, 20),
        definition(2, "ESH7", F, 110),
        definition(3, "ESZ6-ESH7", S, 20),
        definition(4, "ESZ6 C6000", C, 20, security_type="OOF"),
        definition(5, "ESZ6 P5000", P, 20, security_type="OOF"),
        definition(6, "UD:1V: VT 1", T, 20, security_type="MLEG"),
        definition(7, "UD:1V: CV 2", M, 20, security_type="MLEG"),
        definition(8, "NQZ6", F, 20, asset="NQ"),
        definition(9, "ESU6", F, -1),  # expired
        definition(10, "ESM7", F, 200),
    )
    # by expiration, then instrument_id
    assert resolve(r, "ES.FUT") == ["ESZ6", "ESZ6-ESH7", "ESH7", "ESM7"]
    assert resolve(r, "ES.OPT") == ["ESZ6 C6000", "ESZ6 P5000", "UD:1V: VT 1", "UD:1V: CV 2"]
    assert resolve(r, "NQ.FUT") == ["NQZ6"] and resolve(r, "NQ.OPT") == []
    assert resolve(r, "CL.FUT") == []
    # before ESU6 expired it was a member
    assert resolve(r, "ES.FUT", NOW - 2 * DAY)[0] == "ESU6"


def test_the_root_is_the_asset_else_the_underlying_and_the_class_else_the_security_type() -> None:
    r = resolver(
        definition(1, "AAPL  261218C00200000", C, 30, asset="", underlying="AAPL"),
        definition(2, "E1AZ6 C6000", C, 3, asset="E1A", underlying="ESZ6"),
        definition(3, "GEZ6", None, 30, asset="GE", security_type="FUT"),
        definition(4, "GEZ6 C95", None, 30, asset="GE", security_type="OOF"),
        definition(5, "GE-IDX", None, None, asset="GE", security_type="IDX"),
    )
    assert resolve(r, "AAPL.OPT") == ["AAPL  261218C00200000"]
    assert resolve(r, "E1A.OPT") == ["E1AZ6 C6000"] and resolve(r, "ES.OPT") == []
    assert resolve(r, "GE.FUT") == ["GEZ6"] and resolve(r, "GE.OPT") == ["GEZ6 C95"]
    assert resolve(r, "GE.c.0") == ["GEZ6"]  # a class read from the security type counts


def test_a_deletion_unlists_and_the_newest_definition_wins_within_a_chunk() -> None:
    r = SmartResolver()
    update = r.learn(chunk(definition(1, "ESZ6"), definition(2, "ESH7", F, 100)))
    assert update.roots == {"ES"} and len(update.listed) == 2
    update = r.learn(
        chunk(
            definition(1, "ESZ6", action=d.SecurityUpdateAction.DELETE, ts=NOW),
            definition(2, "ESH7", F, 100, asset="NQ", ts=NOW),  # moved product...
            definition(2, "ESH7", F, 100, asset="ES", ts=NOW + 1),  # ...and back: last wins
        )
    )
    assert resolve(r, "ES.FUT") == ["ESH7"]
    assert len(update.listed) == 0  # ESH7 was already an ES future
    assert len(r) == 1
    # an older definition than the one held changes nothing
    r.learn(chunk(definition(1, "ESZ6", ts=NOW - 2 * DAY)))
    assert resolve(r, "ES.FUT") == ["ESH7"]
    # relisted by a newer one: listed again
    update = r.learn(chunk(definition(1, "ESZ6", ts=NOW + 2)))
    assert resolve(r, "ES.FUT") == ["ESZ6", "ESH7"] and len(update.listed) == 1


# --- continuous -------------------------------------------------------------------------------


def test_c_ranks_unexpired_outright_futures_by_expiration() -> None:
    r = resolver(
        definition(1, "ESU6", F, -0.5),  # expired
        definition(2, "ESZ6", F, 20),
        definition(3, "ESH7", F, 110),
        definition(4, "ESZ6-ESH7", S, 10),  # a spread is never ranked
        definition(5, "ESPERP", F, None),  # no expiration: not in the calendar
        definition(6, "ESH7B", F, 110),  # same expiration as ESH7: by instrument_id
    )
    assert resolve(r, "ES.c.0") == ["ESZ6"]
    assert resolve(r, "ES.c.1") == ["ESH7"]
    assert resolve(r, "ES.c.2") == ["ESH7B"]
    assert resolve(r, "ES.c.3") == []
    assert resolve(r, "ES.c.0", NOW - DAY) == ["ESU6"]  # before it expired
    assert resolve(r, "ES.c.0", NOW + 20 * DAY) == ["ESH7"]  # expiration is exclusive


def test_n_and_v_rank_by_the_previous_close_highest_first() -> None:
    r = resolver(
        definition(1, "ESZ6", F, 20),
        definition(2, "ESH7", F, 110),
        definition(3, "ESM7", F, 200),
        definition(4, "ESU7", F, 290),
        stat(1, OI, 2_000_000),
        stat(2, OI, 900_000),
        stat(3, OI, 900_000),  # tie with ESH7: nearer expiration first
        stat(4, OI, 5_000_000, day=-3),  # stale: not the previous close
        stat(1, VOL, 10_000),
        stat(2, VOL, 1_500_000),
    )
    assert [resolve(r, f"ES.n.{i}") for i in range(4)] == [["ESZ6"], ["ESH7"], ["ESM7"], []]
    assert [resolve(r, f"ES.v.{i}") for i in range(3)] == [["ESH7"], ["ESZ6"], []]
    # a figure for a newer day moves the previous close: only today's figures rank
    r.learn(chunk(stat(3, OI, 10, day=0, ts_recv=NOW)))
    assert resolve(r, "ES.n.0") == ["ESM7"] and resolve(r, "ES.n.1") == []


def test_statistics_updates_deletions_and_unknowns() -> None:
    r = SmartResolver()
    # statistics may come before the definitions
    r.learn(chunk(stat(1, OI, 100), stat(2, OI, 200), stat(1, OI, 300, ts_recv=NOW - 1)))
    assert resolve(r, "ES.n.0") == []
    r.learn(chunk(definition(1, "ESZ6"), definition(2, "ESH7", F, 100), definition(3, "ESM7")))
    assert resolve(r, "ES.n.0") == ["ESZ6"]  # the later figure of the chunk (300) won
    # an older figure does not replace a newer one
    r.learn(chunk(stat(1, OI, 1, ts_recv=NOW - DAY)))
    assert resolve(r, "ES.n.0") == ["ESZ6"]
    # a deleted figure is unknown: not ranked
    r.learn(chunk(stat(1, OI, 0, ts_recv=NOW, action=d.StatUpdateAction.DELETE)))
    assert resolve(r, "ES.n.0") == ["ESH7"] and resolve(r, "ES.n.1") == []
    # an undefined quantity is unknown too; no statistics at all: nothing resolves
    r.learn(chunk(stat(2, OI, 2**63 - 1, ts_recv=NOW)))
    assert resolve(r, "ES.n.0") == [] and resolve(r, "ES.v.0") == []
    # ts_ref UNDEF: the day of ts_event
    r.learn(chunk(stat(3, VOL, 5, ts_ref=UNDEF, ts_recv=NOW - DAY)))
    assert resolve(r, "ES.v.0") == ["ESM7"]


def test_learning_thousands_of_definitions_is_one_numpy_pass() -> None:
    n = 20_000
    records = [definition(i, f"OPT{i}", C, 30 + i % 90, asset="OX") for i in range(1, n + 1)]
    records += [definition(n + i, f"FUT{i}", F, i, asset="FX") for i in range(1, 41)]
    records += [stat(n + i, OI, i * 10) for i in range(1, 41)]
    index = chunk(*records)
    r = SmartResolver()
    t0 = time.perf_counter()
    update = r.learn(index)
    learn_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    options = r.resolve(parse_smart("OX.OPT", "parent"), NOW)
    lead = r.resolve(parse_smart("FX.n.0", "continuous"), NOW)
    resolve_s = time.perf_counter() - t0
    assert len(options) == n and lead == [(n + 40, "FUT40")]
    assert len(update.listed) == n + 40 and update.roots == {"OX", "FX"}
    # generous bounds for a shared 2-core machine; typical: ~30 ms and ~10 ms
    assert learn_s < 0.5 and resolve_s < 0.3, (learn_s, resolve_s)
    # learning the same chunk again lists nothing new
    assert len(r.learn(index).listed) == 0


# --- wiring: a Feed, its subscription index, sessions ------------------------------------------


class Member:
    """A FeedMember that logs what it is sent, in order."""

    def __init__(self) -> None:
        self.ts_out = False
        self.zstd = False
        self.log: list[tuple[str, bytes]] = []

    def deliver(self, data: object, records: int) -> None:
        self.log.append(("data", bytes(data)))  # type: ignore[call-overload]

    def send_gateway_records(self, records: list[bytes]) -> None:
        self.log.extend(("gateway", rec) for rec in records)

    def events(self) -> list[tuple[str, object]]:
        """('map', (stype_in, smart, raw, iid)) / ('error', text) / ('data', iid) in order."""
        out: list[tuple[str, object]] = []
        for kind, blob in self.log:
            for rec in split_records(blob):
                m = decode(rec)[0]
                if isinstance(m, d.SymbolMappingMsg):
                    out.append(
                        (
                            "map",
                            (
                                int(m.stype_in),
                                m.stype_in_symbol,
                                m.stype_out_symbol,
                                m.instrument_id,
                            ),
                        )
                    )
                elif isinstance(m, d.ErrorMsg):
                    out.append(("error", m.err))
                elif kind == "data":
                    out.append(("data", m.instrument_id))
        return out


def new_feed() -> Feed:
    return Feed("GLBX.MDP3", fanout=FanOut(clock_ns=lambda: NOW), clock_ns=lambda: NOW)


def publish(feed: Feed, *records: bytes) -> None:
    feed.publish(chunk(*records))


def subscribe(feed: Feed, stype: str, *symbols: str, member: Member | None = None) -> Member:
    member = member or Member()
    feed.join(member)
    member.send_gateway_records(feed.subscribe(member, Subscription("trades", stype, symbols, 1)))
    return member


def book(feed: Feed) -> None:
    publish(
        feed,
        definition(1, "ESZ6", F, 20),
        definition(2, "ESH7", F, 110),
        definition(3, "ESZ6-ESH7", S, 20),
        definition(4, "ESZ6 C6000", C, 20, security_type="OOF"),
        definition(5, "NQZ6", F, 20, asset="NQ"),
        stat(1, OI, 100),
        stat(2, OI, 900),
    )


def test_the_feed_hands_its_reference_chunks_to_the_index() -> None:
    feed = new_feed()
    assert feed.reference_listeners == [feed.subscriptions.on_reference]
    book(feed)
    assert feed.subscriptions.smart.definitions_seen == 5
    assert feed.subscriptions.smart.statistics_seen == 2


def test_a_parent_subscription_maps_each_instrument_and_gets_their_records() -> None:
    feed = new_feed()
    book(feed)
    member = subscribe(feed, "parent", "es.fut")  # as a raw-protocol client may send it
    publish(feed, trade(1), trade(5), trade(3), trade(4), trade(2))
    assert [e for e in member.events() if e[0] != "data"] == [
        ("map", (STYPE_PARENT, "ES.FUT", "ESZ6", 1)),
        ("map", (STYPE_PARENT, "ES.FUT", "ESZ6-ESH7", 3)),
        ("map", (STYPE_PARENT, "ES.FUT", "ESH7", 2)),
    ]
    assert [e[1] for e in member.events() if e[0] == "data"] == [1, 3, 2]


def test_a_new_listing_is_mapped_and_flows_from_the_chunk_that_lists_it() -> None:
    feed = new_feed()
    book(feed)
    fut = subscribe(feed, "parent", "ES.FUT")
    opt = subscribe(feed, "parent", "ES.OPT")
    cont = subscribe(feed, "continuous", "ES.c.0")
    before = len(fut.events()), len(opt.events()), len(cont.events())
    # ESX6 lists (nearer than ESZ6) and trades in the very same chunk
    publish(feed, trade(1), definition(6, "ESX6", F, 10, ts=NOW), trade(6), trade(7))
    # the mapping goes out before the chunk, and the chunk's trade of ESX6 reaches it
    assert fut.events()[before[0] :] == [
        ("map", (STYPE_PARENT, "ES.FUT", "ESX6", 6)),
        ("data", 1),
        ("data", 6),
    ]
    assert opt.events()[before[1] :] == []  # a future is not an option
    # the continuous session keeps ESZ6: not remapped intraday
    assert cont.events()[before[2] :] == [("data", 1)]
    # a new session resolves afresh
    late = subscribe(feed, "continuous", "ES.c.0")
    assert late.events() == [("map", (STYPE_CONTINUOUS, "ES.c.0", "ESX6", 6))]
    # the same chunk again (a held chunk published after its burst) maps nothing twice
    feed.subscriptions.on_reference(chunk(definition(6, "ESX6", F, 10, ts=NOW)))
    assert sum(1 for e in fut.events() if e[0] == "map") == 4


def test_an_unresolvable_symbol_is_answered_like_an_unknown_raw_symbol_and_maps_later() -> None:
    feed = new_feed()
    book(feed)
    member = subscribe(feed, "continuous", "CL.c.0", "ES.v.0", "ES.q.0", "ES.n.1")
    raw = subscribe(feed, "raw_symbol", "CLZ6")
    assert member.events() == [
        ("map", (STYPE_CONTINUOUS, "ES.n.1", "ESZ6", 1)),
        ("error", "Failed to resolve symbols: CL.c.0, ES.v.0, ES.q.0"),
    ]
    assert raw.events() == [("error", "Failed to resolve symbol: CLZ6")]
    # CL lists, ES volume arrives: both map then, and their records flow
    publish(
        feed,
        definition(20, "CLZ6", F, 15, asset="CL"),
        stat(2, VOL, 50),
        trade(20),
        trade(2),
    )
    later = member.events()[2:]
    assert sorted(later[:2]) == [  # (the two roots are handled in no set order)
        ("map", (STYPE_CONTINUOUS, "CL.c.0", "CLZ6", 20)),
        ("map", (STYPE_CONTINUOUS, "ES.v.0", "ESH7", 2)),
    ]
    assert later[2:] == [("data", 20), ("data", 2)]
    # ...and the raw session too (the directory learnt CLZ6 from the definition)
    assert raw.events()[1:] == [("map", (1, "CLZ6", "CLZ6", 20)), ("data", 20)]
    # a later figure does not remap the session's ES.v.0
    publish(feed, stat(1, VOL, 10_000, ts_recv=NOW), trade(1))
    assert member.events()[6:] == [("data", 1)]


def test_a_parent_that_resolves_to_nothing_yet_maps_its_first_listing() -> None:
    feed = new_feed()
    member = subscribe(feed, "parent", "ES.OPT")
    assert member.events() == [("error", "Failed to resolve symbol: ES.OPT")]
    publish(feed, definition(4, "ESZ6 C6000", C, 20, security_type="OOF"), trade(4))
    assert member.events()[1:] == [("map", (STYPE_PARENT, "ES.OPT", "ESZ6 C6000", 4)), ("data", 4)]


def test_smart_symbols_in_two_schemas_and_sessions_leaving() -> None:
    feed = new_feed()
    book(feed)
    member = Member()
    feed.join(member)
    feed.subscribe(member, Subscription("trades", "parent", ("ES.FUT",), 1))
    feed.subscribe(member, Subscription("mbo", "continuous", ("ES.c.0", "ES.n.0"), 2))
    spec = feed.fanout.spec_of(member)
    assert spec is not None
    assert dict(spec.selection) == {0x00: frozenset({1, 2, 3}), 0xA0: frozenset({1, 2})}
    index = feed.subscriptions
    assert set(index.want_root) == {"ES"}
    feed.leave(member)
    assert index.want_root == {}
    publish(feed, definition(6, "ESX6", F, 10, ts=NOW))  # no one left to map it to


def test_a_replaying_session_handed_over_to_live_gets_its_smart_symbols_resolved() -> None:
    # a replay does not resolve parent/continuous symbols: the hand-over maps them (and
    # answers those that do not resolve), synchronously, before the next chunk
    feed = new_feed()
    book(feed)
    member = Member()
    feed.join(member)
    subs = [
        Subscription("trades", "parent", ("ES.FUT", "ES.OPT"), 1),
        Subscription("trades", "continuous", ("ZZ.c.0", "ES.c.1"), 2),
    ]
    member.send_gateway_records(feed.subscriptions.handover(member, subs, {}))
    publish(feed, trade(4), trade(5), trade(2))
    assert member.events() == [
        ("map", (STYPE_PARENT, "ES.FUT", "ESZ6", 1)),
        ("map", (STYPE_PARENT, "ES.FUT", "ESZ6-ESH7", 3)),
        ("map", (STYPE_PARENT, "ES.FUT", "ESH7", 2)),
        ("map", (STYPE_PARENT, "ES.OPT", "ESZ6 C6000", 4)),
        ("map", (STYPE_CONTINUOUS, "ES.c.1", "ESH7", 2)),
        ("error", "Failed to resolve symbol: ZZ.c.0"),
        ("data", 4),
        ("data", 2),
    ]
