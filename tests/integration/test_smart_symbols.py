"""Parent and continuous symbology end to end: a real gateway process with an ingest feed, a
publisher sending definitions, statistics and trades (real DBN v3 records), and the official
`databento` client subscribing `ES.FUT` (stype_in=parent) and `ES.c.0` / `ES.n.0`
(continuous): mappings, then the resolved instruments' records; a later listing is mapped and
flows to the parent session; the continuous sessions keep their instrument."""

from __future__ import annotations

import socket
import time
from typing import Any

import databento_dbn as d

from gateway.dbn import encode_publisher_metadata
from tests.integration.helpers import OfficialSession, data_records, gateway

DATASET = "SYMB.TEST"
DAY = 86_400 * 10**9
F = d.InstrumentClass.FUTURE


def definition(
    iid: int, raw: str, cls: Any, days: int, now: int, asset: str = "ES"
) -> bytes:  # cls: an InstrumentClass member (the stubs type them as str)
    return bytes(
        d.InstrumentDefMsg(
            publisher_id=1,
            instrument_id=iid,
            ts_event=now,
            ts_recv=now,
            min_price_increment=250_000_000,
            display_factor=1_000_000_000,
            raw_symbol=raw,
            asset=asset,
            group=asset,
            instrument_class=cls,
            security_type="FUT" if cls in (F, d.InstrumentClass.FUTURE_SPREAD) else "OOF",
            expiration=now + days * DAY,
            exchange="XCME",
            security_update_action=d.SecurityUpdateAction.ADD,  # type: ignore[arg-type]
        )
    )


def open_interest(iid: int, quantity: int, now: int) -> bytes:
    return bytes(
        d.StatMsg(
            publisher_id=1,
            instrument_id=iid,
            ts_event=now,
            ts_recv=now,
            ts_ref=now - DAY,
            price=2**63 - 1,
            quantity=quantity,
            sequence=0,
            ts_in_delta=0,
            stat_type=d.StatType.OPEN_INTEREST,  # type: ignore[arg-type]
            channel_id=0,
            update_action=d.StatUpdateAction.NEW,  # type: ignore[arg-type]
        )
    )


def trade(iid: int, now: int, seq: int) -> bytes:
    return bytes(
        d.TradeMsg(
            publisher_id=1,
            instrument_id=iid,
            ts_event=now,
            ts_recv=now,
            price=6_000_000_000_000,
            size=1,
            action=d.Action.TRADE,  # type: ignore[arg-type]  # stubs: enum members as str
            side=d.Side.ASK,  # type: ignore[arg-type]
            flags=0,
            depth=0,
            ts_in_delta=0,
            sequence=seq,
        )
    )


def mappings(records: list[object]) -> list[tuple[str, str, int]]:
    return [
        (r.stype_in_symbol, r.stype_out_symbol, r.instrument_id)
        for r in records
        if isinstance(r, d.SymbolMappingMsg)
    ]


def trades(records: list[object]) -> list[int]:
    return [r.instrument_id for r in data_records(records) if isinstance(r, d.TradeMsg)]


def test_parent_and_continuous_subscriptions_with_the_official_client() -> None:
    now = time.time_ns()
    book = [
        definition(101, "ESZ6", F, 20, now),
        definition(102, "ESH7", F, 110, now),
        definition(103, "ESZ6-ESH7", d.InstrumentClass.FUTURE_SPREAD, 20, now),
        definition(104, "ESZ6 C6000", d.InstrumentClass.CALL, 20, now),
        definition(105, "NQZ6", F, 20, now, asset="NQ"),
        open_interest(101, 1_000, now),
        open_interest(102, 2_000_000, now),
    ]
    with gateway(feeds={DATASET: "ingest://127.0.0.1:0"}) as gw:
        publisher = socket.create_connection(("127.0.0.1", gw.ingest_ports[DATASET]), timeout=10)
        sessions: list[OfficialSession] = []
        try:
            probe = OfficialSession(gw.port, DATASET, [{"schema": "definition"}])
            sessions.append(probe)
            probe.start()
            publisher.sendall(encode_publisher_metadata(DATASET, now, {}) + b"".join(book))
            # the gateway has taken the definitions in once a session received them
            assert probe.wait_for(lambda r: len(data_records(r)) >= 5)

            s = OfficialSession(
                gw.port,
                DATASET,
                [
                    {"schema": "trades", "stype_in": "parent", "symbols": "es.fut"},
                    {"schema": "trades", "stype_in": "continuous", "symbols": ["ES.c.0"]},
                ],
            )
            oi = OfficialSession(
                gw.port,
                DATASET,
                [{"schema": "trades", "stype_in": "continuous", "symbols": "ES.N.0"}],
            )
            sessions += [s, oi]
            s.start()
            oi.start()
            want = {
                ("ES.FUT", "ESZ6", 101),
                ("ES.FUT", "ESZ6-ESH7", 103),
                ("ES.FUT", "ESH7", 102),
                ("ES.c.0", "ESZ6", 101),
            }
            assert s.wait_for(lambda r: set(mappings(r)) == want), mappings(s.records)
            assert oi.wait_for(lambda r: mappings(r) == [("ES.n.0", "ESH7", 102)])

            publisher.sendall(b"".join(trade(i, time.time_ns(), i) for i in range(101, 106)))
            assert s.wait_for(lambda r: len(trades(r)) >= 3)
            assert oi.wait_for(lambda r: len(trades(r)) >= 1)

            # ESX6 lists (nearer than ESZ6) and trades right after its definition
            later = time.time_ns()
            publisher.sendall(
                definition(106, "ESX6", F, 10, later)
                + trade(106, later, 7)
                + trade(101, later, 8)
                + trade(102, later, 9)
            )
            assert s.wait_for(lambda r: trades(r)[-3:] == [106, 101, 102]), trades(s.records)
            assert oi.wait_for(lambda r: trades(r)[-1:] == [102])
            late = OfficialSession(
                gw.port,
                DATASET,
                [{"schema": "trades", "stype_in": "continuous", "symbols": "ES.c.0"}],
            )
            sessions.append(late)
            late.start()
            assert late.wait_for(lambda r: mappings(r) == [("ES.c.0", "ESX6", 106)])

            errors = [sessions.pop(0).stop() for _ in list(sessions)]
        finally:
            publisher.close()
            for sess in sessions:  # only when the test failed before stopping them
                sess.stop(timeout=2)
    assert errors == [None] * 4
    # the parent session: ESX6 mapped once, before its trade; ES.c.0 never remapped
    got = mappings(s.records)
    assert got.count(("ES.FUT", "ESX6", 106)) == 1
    assert [m for m in got if m[0] == "ES.c.0"] == [("ES.c.0", "ESZ6", 101)]
    assert trades(s.records) == [101, 102, 103, 106, 101, 102]
    kinds = [
        ("map", r.stype_out_symbol)
        if isinstance(r, d.SymbolMappingMsg)
        else ("trade", r.instrument_id)
        for r in s.records
        if isinstance(r, (d.SymbolMappingMsg, d.TradeMsg))
    ]
    assert kinds.index(("map", "ESX6")) < kinds.index(("trade", 106))
    assert s.client.symbology_map[106] == "ESX6"
    # the open-interest session: ESH7 only (the highest open interest at the last close)
    assert mappings(oi.records) == [("ES.n.0", "ESH7", 102)]
    assert trades(oi.records) == [102, 102]
