"""The official databento client against the gateway running as a real process."""

from __future__ import annotations

import socket
import time
from collections import Counter
from pathlib import Path
from typing import cast

import databento_dbn as dbn
import numpy as np
import pytest
import zstandard

from gateway.dbn import encode_publisher_metadata
from gateway.feeds.synthetic import SyntheticGenerator, SyntheticOptions
from tests.conftest import dbn_sample_files
from tests.integration.helpers import (
    KEY,
    OTHER_KEY,
    OfficialSession,
    data_records,
    gateway,
    poll_until,
)

SAMPLES = dbn_sample_files()


def _file_records(path: Path) -> tuple[dbn.Metadata, list[bytes]]:
    raw = zstandard.ZstdDecompressor().decompress(path.read_bytes(), max_output_size=1 << 24)
    dec = dbn.DBNDecoder()
    dec.write(raw)
    out = dec.decode()
    return cast(dbn.Metadata, out[0]), [bytes(r) for r in out[1:]]


def test_demo_feed_with_official_client() -> None:
    """What `make run` serves: Metadata, acks, symbol mappings, then records."""
    with gateway(feeds={"DEMO.SYNTH": "synthetic:?rate=3000"}) as gw:
        s = OfficialSession(
            gw.port,
            "DEMO.SYNTH",
            [
                {"schema": "trades", "symbols": ["AAPL", "MSFT"]},
                {"schema": "mbp-1", "symbols": "ALL_SYMBOLS"},
            ],
        )
        s.start()
        assert s.wait_for(lambda recs: len(data_records(recs)) > 200)
        assert s.stop() is None
    meta = s.metadata
    assert meta.dataset == "DEMO.SYNTH" and meta.schema is None and not meta.ts_out
    assert meta.stype_out == dbn.SType.INSTRUMENT_ID and meta.version == 3
    recs = s.records
    # First the two acks, each followed by its mappings (2 for trades, 50 for ALL_SYMBOLS).
    assert isinstance(recs[0], dbn.SystemMsg) and recs[0].code == dbn.SystemCode.SUBSCRIPTION_ACK
    assert "for trades data succeeded" in recs[0].msg
    mappings = [r for r in recs if isinstance(r, dbn.SymbolMappingMsg)]
    by_symbol = {m.stype_out_symbol: m.instrument_id for m in mappings}
    assert {"AAPL", "MSFT"} <= set(by_symbol) and len(by_symbol) == 50
    first_data = next(i for i, r in enumerate(recs) if int(r.rtype) in (0x00, 0x01))
    assert all(int(r.rtype) in (0x16, 0x17) for r in recs[:first_data])
    trades = [r for r in recs if isinstance(r, dbn.TradeMsg)]
    assert trades and {t.instrument_id for t in trades} <= {by_symbol["AAPL"], by_symbol["MSFT"]}
    mbp = [r for r in recs if isinstance(r, dbn.MBP1Msg)]
    assert len({r.instrument_id for r in mbp}) > 5
    seqs = [r.sequence for r in mbp]
    assert seqs == sorted(seqs)  # feed order


def test_wrong_key_is_refused() -> None:
    with gateway(feeds={"DEMO.SYNTH": "synthetic:"}) as gw:
        s = OfficialSession(
            gw.port, "DEMO.SYNTH", [{"schema": "trades", "symbols": "AAPL"}], key=OTHER_KEY
        )
        assert s.subscribed.wait(20)
        assert s.error is not None and "Authentication failed" in str(s.error)


def test_unknown_dataset_is_refused() -> None:
    with gateway(feeds={"DEMO.SYNTH": "synthetic:"}) as gw:
        s = OfficialSession(gw.port, "NOPE.DATA", [{"schema": "trades", "symbols": "AAPL"}])
        assert s.subscribed.wait(20)
        assert s.error is not None and "Unknown dataset NOPE.DATA" in str(s.error)


@pytest.mark.slow_e2e  # file replay of every sample: the same bytes on any loop
def test_every_sample_schema_through_file_feeds() -> None:
    """Every real sample file, replayed in a loop, arrives byte-exact at the official client."""
    feeds = {f"T{i:02d}": f"file:{p}?pace=1000000&loop=1" for i, p in enumerate(SAMPLES)}
    assert len(feeds) >= 40
    with gateway(feeds=feeds) as gw:
        sessions = {}
        expected = {}
        for i, path in enumerate(SAMPLES):
            meta, records = _file_records(path)
            # the stubs type Metadata.schema as str; it is a databento_dbn.Schema
            schema = str(meta.schema.value) if meta.schema is not None else None  # type: ignore[attr-defined]
            if schema is None:
                continue  # the mixed LIVE capture is covered by the ingest test
            expected[i] = records
            sessions[i] = OfficialSession(
                gw.port,
                f"T{i:02d}",
                [{"schema": schema, "symbols": "ALL_SYMBOLS", "stype_in": "raw_symbol"}],
            )
        for s in sessions.values():
            s.start()
        for i, s in sessions.items():
            n = len(expected[i])
            assert s.wait_for(lambda recs, n=n: len(data_records(recs)) >= 2 * n), SAMPLES[i]
        for s in sessions.values():
            assert s.stop() is None
    for i, s in sessions.items():
        got = [bytes(r) for r in data_records(s.records)]
        want = expected[i]
        n = len(want)
        # The replay loops: what arrived is a run of the cyclic file sequence, whole passes.
        start = want.index(got[0])
        cyclic = [want[(start + k) % n] for k in range(len(got))]
        assert got == cyclic, SAMPLES[i]
        acks = [
            r
            for r in s.records
            if isinstance(r, dbn.SystemMsg) and r.code == dbn.SystemCode.SUBSCRIPTION_ACK
        ]
        assert len(acks) == 1


def _publish(port: int, payload: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(payload)
    return sock


def _ingest_payload(n: int = 3000) -> tuple[dict[str, int], list[bytes], bytes]:
    gen = SyntheticGenerator(SyntheticOptions(instruments=6, seed=3, schemas=("trades",)))
    symbols = dict(gen.instruments)
    chunks = []
    t0 = time.time_ns()
    for k in range(10):
        chunks += gen.make(n // 10, t0 + k * 1_000_000, 1_000_000)
    blob = b"".join(chunks)
    records = [blob[i : i + 48] for i in range(0, len(blob), 48)]
    meta = encode_publisher_metadata("ING.TEST", t0, symbols)
    return symbols, records, meta + blob


def test_ingest_fans_out_byte_exact_to_three_subscription_styles() -> None:
    symbols, records, payload = _ingest_payload()
    names = list(symbols)
    ids = {s: i for s, i in symbols.items()}
    with gateway(feeds={"ING.TEST": "ingest://127.0.0.1:0"}) as gw:
        raw = OfficialSession(
            gw.port,
            "ING.TEST",
            [{"schema": "trades", "symbols": names[:2], "stype_in": "raw_symbol"}],
        )
        by_id = OfficialSession(
            gw.port,
            "ING.TEST",
            [{"schema": "trades", "symbols": [ids[names[2]]], "stype_in": "instrument_id"}],
        )
        everything = OfficialSession(
            gw.port, "ING.TEST", [{"schema": "trades", "symbols": "ALL_SYMBOLS"}]
        )
        # First publisher: only the Metadata (so raw symbols resolve), then the sessions start.
        pub = _publish(gw.ingest_ports["ING.TEST"], payload[: payload.index(records[0])])
        # the gateway has read the Metadata and learnt the symbols
        poll_until(lambda: "feed ING.TEST up" in gw.log(), 10, what="feed ING.TEST up")
        for s in (raw, by_id, everything):
            s.start()
        assert raw.wait_for(lambda r: any(isinstance(x, dbn.SymbolMappingMsg) for x in r))
        pub.sendall(payload[payload.index(records[0]) :])
        want_raw = [r for r in records if _iid(r) in (ids[names[0]], ids[names[1]])]
        want_id = [r for r in records if _iid(r) == ids[names[2]]]
        for s, want in ((raw, want_raw), (by_id, want_id), (everything, records)):
            assert s.wait_for(lambda r, w=want: len(data_records(r)) >= len(w)), len(want)
        time.sleep(0.2)  # deliberate: time for any record too many to arrive
        pub.close()
        for s in (raw, by_id, everything):
            assert s.stop() is None
    assert [bytes(r) for r in data_records(raw.records)] == want_raw
    assert [bytes(r) for r in data_records(by_id.records)] == want_id
    assert [bytes(r) for r in data_records(everything.records)] == records
    maps = [r for r in by_id.records if isinstance(r, dbn.SymbolMappingMsg)]
    assert [(m.stype_in_symbol, m.stype_out_symbol) for m in maps] == [
        (str(ids[names[2]]), names[2])
    ]


def _iid(rec: bytes) -> int:
    return int.from_bytes(rec[4:8], "little")


def test_ts_out_stamps_every_record() -> None:
    with gateway(feeds={"DEMO.SYNTH": "synthetic:?rate=2000"}) as gw:
        s = OfficialSession(
            gw.port, "DEMO.SYNTH", [{"schema": "trades", "symbols": ["AAPL", "NOPE"]}], ts_out=True
        )
        before = time.time_ns()
        s.start()
        assert s.wait_for(lambda r: len(data_records(r)) > 20)
        s.stop()
    assert s.metadata.ts_out is True
    recs = s.records
    kinds = Counter(type(r).__name__ for r in recs)
    assert kinds["SystemMsg"] >= 1 and kinds["ErrorMsg"] == 1 and kinds["SymbolMappingMsg"] == 1
    for r in recs:
        assert before <= r.ts_out <= time.time_ns()
        raw = bytes(r)
        assert raw[0] * 4 == len(raw)  # header length includes the 8-byte stamp
        assert int.from_bytes(raw[-8:], "little") == r.ts_out


@pytest.mark.parametrize("ts_out", [False, True])
def test_zstd_sessions_decode(ts_out: bool) -> None:
    with gateway(feeds={"DEMO.SYNTH": "synthetic:?rate=5000"}) as gw:
        plain = OfficialSession(
            gw.port, "DEMO.SYNTH", [{"schema": "mbp-1", "symbols": "ALL_SYMBOLS"}], ts_out=ts_out
        )
        zipped = [
            OfficialSession(
                gw.port,
                "DEMO.SYNTH",
                [{"schema": "mbp-1", "symbols": "ALL_SYMBOLS"}],
                compression=dbn.Compression.ZSTD,
                ts_out=ts_out,
            )
            for _ in range(3)
        ]
        for s in [plain, *zipped]:
            s.start()
        for s in zipped:
            assert s.wait_for(lambda r: len(data_records(r)) > 1000)
        for s in [plain, *zipped]:
            assert s.stop() is None
    for s in zipped:
        assert s.metadata.ts_out is ts_out
        seqs = np.array([r.sequence for r in data_records(s.records)])
        assert len(seqs) > 1000 and (np.diff(seqs) > 0).all()  # every record, in order
        assert isinstance(s.records[0], dbn.SystemMsg)


def test_heartbeat_keeps_an_idle_session_alive() -> None:
    with gateway(feeds={"IDLE.FEED": "ingest://127.0.0.1:0"}) as gw:
        s = OfficialSession(
            gw.port,
            "IDLE.FEED",
            [{"schema": "trades", "symbols": "ALL_SYMBOLS"}],
            heartbeat_interval_s=5,
        )
        s.start()
        assert s.wait_for(
            lambda r: any(
                isinstance(x, dbn.SystemMsg) and x.code == dbn.SystemCode.HEARTBEAT for x in r
            ),
            timeout=9,
        )
        beats = [
            x
            for x in s.records
            if isinstance(x, dbn.SystemMsg) and x.code == dbn.SystemCode.HEARTBEAT
        ]
        assert beats[0].msg == "Heartbeat"
        assert s.stop() is None


def test_key_value_is_never_logged() -> None:
    with gateway(feeds={"DEMO.SYNTH": "synthetic:"}) as gw:
        s = OfficialSession(gw.port, "DEMO.SYNTH", [{"schema": "trades", "symbols": "AAPL"}])
        s.start()
        s.stop()
        poll_until(lambda: "session end" in gw.log(), what="the session end logged")
        log = gw.log()
    assert "session start" in log and "session end" in log
    assert KEY not in log and KEY[3:] not in log
