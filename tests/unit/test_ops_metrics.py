"""The operations seams without a gateway process: the Prometheus collector over a
snapshot, the snapshot's serialisation, the status document and the page template; and
``Gateway.snapshot()`` of a gateway started in this process."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import Counter
from typing import Any

import msgspec
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.journal import WRITE_BUCKETS, JournalStats
from gateway.ops.collector import GatewayCollector
from gateway.ops.page import Markup, fill, render_html
from gateway.ops.snapshot import (
    ConnectionFacts,
    FeedSnapshot,
    FeedStatus,
    GatewayInfo,
    GatewaySnapshot,
    JournalStatus,
    SessionCounts,
    Totals,
    feed_status,
    journal_parts,
    replay_snapshot,
    sessions_snapshot,
)
from gateway.ops.status import Sample, ThroughputSampler, document

#: every family the collector exposes, with its type: the alert rules and dashboards in
#: deploy/monitoring use these names (test_observability checks them against a scrape)
FAMILIES = {
    "gateway_feed_records_in": "counter",
    "gateway_feed_bytes_in": "counter",
    "gateway_feed_paused_seconds": "counter",
    "gateway_records_out": "counter",
    "gateway_bytes_out": "counter",
    "gateway_feed_up": "gauge",
    "gateway_feed_events": "counter",
    "gateway_feed_lag_seconds": "gauge",
    "gateway_feed_pauses": "counter",
    "gateway_zstd_bytes_before": "counter",
    "gateway_zstd_bytes_after": "counter",
    "gateway_zstd_frames_built": "counter",
    "gateway_zstd_frames_written": "counter",
    "gateway_zstd_compress_seconds": "counter",
    "gateway_fanout_variant_builds": "counter",
    "gateway_fanout_variant_writes": "counter",
    "gateway_fanout_groups": "gauge",
    "gateway_connections_open": "gauge",
    "gateway_connections_unauthenticated": "gauge",
    "gateway_feed_last_record_age_seconds": "gauge",
    "gateway_feed_paused": "gauge",
    "gateway_key_sessions": "gauge",
    "gateway_ready": "gauge",
    "gateway_journal_enabled": "gauge",
    "gateway_journal_bytes": "gauge",
    "gateway_journal_segments": "gauge",
    "gateway_journal_oldest_timestamp_seconds": "gauge",
    "gateway_journal_newest_timestamp_seconds": "gauge",
    "gateway_journal_retention_seconds": "gauge",
    "gateway_journal_max_bytes": "gauge",
    "gateway_journal_appended_chunks": "counter",
    "gateway_journal_appended_bytes": "counter",
    "gateway_journal_write_errors": "counter",
    "gateway_journal_segments_deleted": "counter",
    "gateway_journal_write_seconds": "histogram",
    "gateway_replays_active": "gauge",
    "gateway_replay_bytes": "counter",
    "gateway_relay_upstream_up": "gauge",
    "gateway_relay_upstream_index": "gauge",
    "gateway_relay_reconnects": "counter",
    "gateway_relay_gaps": "counter",
    "gateway_relay_records_deduplicated": "counter",
    "gateway_relay_resume_seconds": "gauge",
    "gateway_relay_upstream_silence_seconds": "gauge",
    "gateway_books_enabled": "gauge",
    "gateway_books": "gauge",
    "gateway_books_whole": "gauge",
    "gateway_books_orders": "gauge",
    "gateway_books_memory_bytes": "gauge",
    "gateway_books_records": "counter",
    "gateway_books_unknown_orders": "counter",
    "gateway_books_apply_seconds": "counter",
    "gateway_books_derived_records": "counter",
    "gateway_books_snapshots": "counter",
    "gateway_books_snapshot_records": "counter",
    "gateway_books_snapshot_seconds": "counter",
}


def _feed(dataset: str, **over: Any) -> FeedSnapshot:
    values: dict[str, Any] = {
        "dataset": dataset,
        "connected": True,
        "detail": "running",
        "paused": False,
        "paused_total_s": 1.25,
        "pauses": 2,
        "lossless": True,
        "lag_s": 0.5,
        "last_record_age_s": 0.25,
        "records_in": 100,
        "bytes_in": 8000,
        "sessions": 3,
        "readiness": "up: running",
        "ups": 1,
        "downs": 0,
        "invalid_inputs": 4,
        "records_out": 300,
        "fanout_groups": 2,
        "variant_builds": 10,
        "variant_writes": 30,
        "zstd_bytes_before": 1000,
        "zstd_bytes_after": 250,
        "zstd_frames_built": 5,
        "zstd_frames_written": 15,
        "zstd_compress_seconds": 0.5,
    }
    values.update(over)
    return FeedSnapshot(**values)


def _snapshot(feeds: list[FeedSnapshot] | None = None, **over: Any) -> GatewaySnapshot:
    values: dict[str, Any] = {
        "taken_at": 1_800_000_000.0,
        "gateway": GatewayInfo(
            version="0.1.0",
            started_at=1_799_999_988.0,
            uptime_s=12.0,
            ready=True,
            accepting=True,
            port=13000,
            loop="uvloop",
        ),
        "sessions": sessions_snapshot(
            Counter(
                [
                    ConnectionFacts("A", "key-1", True),
                    ConnectionFacts("A", "key-1", False),
                    ConnectionFacts(None, None, False),
                ]
            ),
            ["key-1", "key-2"],
        )[0],
        "feeds": feeds if feeds is not None else [_feed("A"), _feed("B", connected=False)],
        "connections_unauthenticated": 1,
        "key_sessions": {"key-1": 2, "key-2": 0},
        "bytes_out": {"A/none": 5000.0, "A/zstd": 1000.0},
    }
    values.update(over)
    return GatewaySnapshot(**values)


def _scrape(collector: GatewayCollector) -> dict[str, Any]:
    registry = CollectorRegistry()
    registry.register(collector)
    out: dict[str, Any] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        out[family.name] = family
    return out


def _value(family: Any, name: str, **labels: str) -> float:
    found = [s.value for s in family.samples if s.name == name and s.labels == labels]
    assert len(found) == 1, (name, labels, family.samples)
    return float(found[0])


def test_collector_exposes_the_snapshot_totals_under_the_deployed_names() -> None:
    fams = _scrape(GatewayCollector(lambda: _snapshot(), created=1_799_999_988.0))
    # (the text format lists each counter's _created samples as a family of their own)
    assert {name: f.type for name, f in fams.items() if not name.endswith("_created")} == FAMILIES
    assert (
        _value(fams["gateway_feed_records_in"], "gateway_feed_records_in_total", dataset="A") == 100
    )
    assert _value(fams["gateway_records_out"], "gateway_records_out_total", dataset="B") == 300
    created = fams["gateway_feed_records_in_created"]
    assert _value(created, "gateway_feed_records_in_created", dataset="A") == 1_799_999_988.0
    events = fams["gateway_feed_events"]
    for event, want in (("up", 1), ("down", 0), ("invalid", 4)):
        assert _value(events, "gateway_feed_events_total", dataset="A", event=event) == want
    bytes_out = fams["gateway_bytes_out"]
    assert bytes_out.documentation == "Bytes written to sessions (after compression)"
    assert _value(bytes_out, "gateway_bytes_out_total", dataset="A", compression="none") == 5000
    assert _value(bytes_out, "gateway_bytes_out_total", dataset="A", compression="zstd") == 1000
    assert (
        _value(
            fams["gateway_bytes_out_created"],
            "gateway_bytes_out_created",
            dataset="A",
            compression="zstd",
        )
        == 1_799_999_988.0
    )
    pauses = fams["gateway_feed_pauses"]
    assert _value(pauses, "gateway_feed_pauses_total", dataset="A", cause="session_high_water") == 2
    # unlabelled totals add up over the feeds
    assert _value(fams["gateway_zstd_bytes_before"], "gateway_zstd_bytes_before_total") == 2000
    assert (
        _value(fams["gateway_fanout_variant_writes"], "gateway_fanout_variant_writes_total") == 60
    )
    assert _value(fams["gateway_feed_up"], "gateway_feed_up", dataset="B") == 0
    assert _value(fams["gateway_connections_open"], "gateway_connections_open") == 3
    assert (
        _value(fams["gateway_connections_unauthenticated"], "gateway_connections_unauthenticated")
        == 1
    )
    assert _value(fams["gateway_ready"], "gateway_ready") == 1
    # per-key series only when asked for
    assert fams["gateway_key_sessions"].samples == []
    keyed = _scrape(GatewayCollector(lambda: _snapshot(), per_key=True))["gateway_key_sessions"]
    assert {s.labels["key_id"]: s.value for s in keyed.samples} == {"key-1": 2, "key-2": 0}
    assert (
        fams["gateway_feed_lag_seconds"].documentation
        == "Now minus the ts_event of the last record"
    )


def test_collector_reads_the_totals_at_each_scrape() -> None:
    current = {"snap": _snapshot([_feed("A", lag_s=None, last_record_age_s=None)])}
    collector = GatewayCollector(lambda: current["snap"])
    first = _scrape(collector)
    # a feed with no record yet has no lag or age sample (an absent series, not a 0)
    assert first["gateway_feed_lag_seconds"].samples == []
    assert first["gateway_feed_last_record_age_seconds"].samples == []
    current["snap"] = _snapshot([_feed("A", records_in=250, lag_s=-0.1)])
    second = _scrape(collector)
    assert (
        _value(second["gateway_feed_records_in"], "gateway_feed_records_in_total", dataset="A")
        == 250
    )
    # a clock step never makes a negative lag
    assert _value(second["gateway_feed_lag_seconds"], "gateway_feed_lag_seconds", dataset="A") == 0


def test_snapshot_round_trips_through_json() -> None:
    snap = _snapshot()
    raw = msgspec.json.encode(snap)
    assert msgspec.json.decode(raw, type=GatewaySnapshot) == snap
    plain = json.loads(raw)
    assert plain["sessions"]["by_dataset"] == {"A": {"streaming": 1, "authenticated": 1}}
    assert plain["feeds"][0]["zstd_frames_written"] == 15
    assert snap.totals() == Totals(records_in=200, bytes_in=16000, records_out=600, bytes_out=6000)


def test_sessions_are_counted_by_dataset_phase_and_key() -> None:
    sessions, per_key = sessions_snapshot(
        Counter(
            [
                ConnectionFacts("A", "k1", True),
                ConnectionFacts("B", "k1", False),
                ConnectionFacts(None, None, False),
                ConnectionFacts("A", "gone", True),
                ConnectionFacts("A", "gone", True),
            ]
        ),
        ["k1", "k2"],
    )
    assert sessions.total == 4 and sessions.connections_open == 5 and sessions.unauthenticated == 1
    assert sessions.by_dataset == {
        "A": SessionCounts(streaming=3, authenticated=0),
        "B": SessionCounts(streaming=0, authenticated=1),
    }
    # every configured key is listed; a revoked key with a session left counts too
    assert per_key == {"k1": 2, "k2": 0, "gone": 2}


def test_status_document_shows_the_status_fields_only() -> None:
    snap = _snapshot()
    sampler = ThroughputSampler()
    sampler.add(Sample(0.0, 0, 0, 0, 0.0))
    sampler.add(Sample.of(snap.totals(), 2.0))
    data = document(snap, sampler.throughput(snap.taken_at), None, snap.taken_at)
    assert list(data) == [
        "generated_at",
        "version",
        "gateway",
        "sessions",
        "throughput",
        "feeds",
        "probe",
        "state",
        "reasons",
    ]
    assert list(data["feeds"][0]) == list(FeedStatus.__struct_fields__)
    assert data["feeds"][1] == feed_status(snap.feeds[1])
    assert data["throughput"]["windows"]["1m"]["records_in_per_s"] == pytest.approx(100)
    assert data["throughput"]["windows"]["1m"]["bytes_out_per_s"] == pytest.approx(3000)
    assert (data["state"], data["reasons"]) == ("degraded", ["feed B down"])
    json.dumps(data)  # JSON types only
    # a stand-alone probe: no gateway part
    alone = document(None, None, None, 1.0)
    assert alone["gateway"] is None and alone["feeds"] is None and alone["state"] == "operational"


def test_template_substitution_escapes_what_it_did_not_build() -> None:
    out = fill("<p>{{a}}</p>{{b}}", a='<img src=x onerror="1">', b=Markup("<i>kept</i>"))
    assert out == "<p>&lt;img src=x onerror=&quot;1&quot;&gt;</p><i>kept</i>"
    with pytest.raises(KeyError):
        fill("{{missing}}")
    snap = _snapshot(feeds=[_feed("<b>X</b>", detail="{{title}}")])
    page = render_html(document(snap, None, None, snap.taken_at))
    assert "{{" not in page.replace("{{title}}", "") and "<b>X" not in page
    assert "&lt;b&gt;X&lt;/b&gt;" in page
    assert re.search(r"<title>Gateway status: Operational</title>", page)
    assert page.startswith("<!doctype html>") and page.endswith("</html>")


async def test_a_running_gateway_snapshot_counts_its_session() -> None:
    from gateway.app import Gateway
    from gateway.client import LiveClient
    from gateway.config import ApiKeyConfig, Config, validate

    key = "db-" + "S" * 29
    cfg = validate(
        Config(port=0, api_keys=[ApiKeyConfig(key=key)], feeds={"SNAP.T": "synthetic:?rate=500"})
    )
    gw = Gateway(cfg)
    await gw.start()
    try:
        client = await LiveClient.connect("127.0.0.1", gw.port, key, "SNAP.T")
        try:
            await client.subscribe("trades", "ALL_SYMBOLS")
            await client.start()
            deadline = time.monotonic() + 10
            while True:
                snap = gw.snapshot()
                if snap.sessions.total == 1 and snap.feeds[0].records_out > 0:
                    break
                assert time.monotonic() < deadline, snap
                await asyncio.sleep(0.05)
        finally:
            await client.close()
        deadline = time.monotonic() + 10
        while gw.snapshot().sessions.connections_open:  # the gateway saw the close
            assert time.monotonic() < deadline, gw.snapshot().sessions
            await asyncio.sleep(0.05)
        assert snap.sessions.by_dataset["SNAP.T"].streaming == 1
        assert snap.key_sessions == {"key-SSSSS": 1}
        assert snap.gateway.port == gw.port and snap.feeds[0].connected
        assert msgspec.json.decode(msgspec.json.encode(snap), type=GatewaySnapshot) == snap
        totals = gw.totals()
        assert totals.records_out >= snap.feeds[0].records_out > 0
        assert totals.bytes_out >= client.bytes_received > 0  # (less what it did not read)
        # the bytes are the server's own running total, not read back out of Prometheus
        assert gw.state.bytes_out == {("SNAP.T", "none"): totals.bytes_out}
        fams = _scrape(GatewayCollector(gw.snapshot))
        scraped = _value(
            fams["gateway_bytes_out"],
            "gateway_bytes_out_total",
            dataset="SNAP.T",
            compression="none",
        )
        assert scraped == totals.bytes_out
        assert (
            _value(
                fams["gateway_feed_records_in"], "gateway_feed_records_in_total", dataset="SNAP.T"
            )
            > 0
        )
    finally:
        await gw.shutdown()


def _stats(**over: Any) -> JournalStats:
    values: dict[str, Any] = {
        "enabled": True,
        "error": None,
        "bytes": 3 << 20,
        "segments": 2,
        "first_seq": 5,
        "last_seq": 90,
        "oldest_ts": 1_799_913_600_500_000_000,
        "newest_ts": 1_799_999_999_000_000_000,
        "retention_s": 86400.0,
        "max_bytes": 8 << 30,
        "appended_chunks": 86,
        "appended_bytes": 3 << 20,
        "write_errors": 0,
        "segments_deleted": {"retention": 4},
        "write_seconds_sum": 0.0125,
        "write_seconds_count": 86,
        "write_seconds_buckets": [0, 10, 40, 80, 85, 86, 86, 86, 86, 86],
    }
    values.update(over)
    return JournalStats(**values)


def _journal_feed(dataset: str, stats: JournalStats) -> FeedSnapshot:
    status, totals = journal_parts(stats)
    return _feed(dataset, journal=status, journal_totals=totals)


def test_collector_exports_each_journal_and_the_replays() -> None:
    snap = _snapshot(
        [
            _journal_feed("A", _stats()),
            # disabled by a write error: its error text goes nowhere near a metric
            _journal_feed(
                "B",
                _stats(enabled=False, error="/secret/path: [Errno 28] No space", write_errors=1),
            ),
            _feed("C"),  # no journal
        ],
        replays=replay_snapshot(2, {"sendfile": 1 << 30, "copy": 4096}),
    )
    fams = _scrape(GatewayCollector(lambda: snap, created=1_799_999_988.0))
    text = generate_latest(_registry(GatewayCollector(lambda: snap))).decode()
    assert "secret" not in text and "Errno" not in text

    def v(family: str, sample: str = "", **labels: str) -> float:
        return _value(fams[family], sample or family, **labels)

    assert v("gateway_journal_enabled", dataset="A") == 1
    assert v("gateway_journal_enabled", dataset="B") == 0
    # a dataset without a journal has no journal series at all (enabled == 0 means disabled)
    for name, family in fams.items():
        if name.startswith("gateway_journal"):
            assert all(s.labels.get("dataset") != "C" for s in family.samples), name
    assert v("gateway_journal_bytes", dataset="A") == 3 << 20
    assert v("gateway_journal_segments", dataset="A") == 2
    assert v("gateway_journal_oldest_timestamp_seconds", dataset="A") == 1_799_913_600.5
    assert v("gateway_journal_newest_timestamp_seconds", dataset="A") == 1_799_999_999.0
    assert v("gateway_journal_retention_seconds", dataset="A") == 86400
    assert v("gateway_journal_max_bytes", dataset="A") == 8 << 30
    assert v("gateway_journal_write_errors", "gateway_journal_write_errors_total", dataset="B") == 1
    deleted = "gateway_journal_segments_deleted_total"
    assert v("gateway_journal_segments_deleted", deleted, dataset="A", reason="retention") == 4
    # every reason has a series from the start (an increase() needs the zero)
    assert v("gateway_journal_segments_deleted", deleted, dataset="A", reason="max_bytes") == 0
    hist = "gateway_journal_write_seconds"
    buckets = {
        s.labels["le"]: s.value
        for s in fams[hist].samples
        if s.name == hist + "_bucket" and s.labels["dataset"] == "A"
    }
    assert list(buckets) == [f"{b:g}" for b in WRITE_BUCKETS] + ["+Inf"]
    assert list(buckets.values()) == [0, 10, 40, 80, 85, 86, 86, 86, 86, 86, 86]
    assert v(hist, hist + "_count", dataset="A") == 86
    assert v(hist, hist + "_sum", dataset="A") == 0.0125
    assert v("gateway_replays_active") == 2
    assert v("gateway_replay_bytes", "gateway_replay_bytes_total", path="sendfile") == 1 << 30
    assert v("gateway_replay_bytes", "gateway_replay_bytes_total", path="copy") == 4096
    # the existing families are as they were
    assert v("gateway_feed_records_in", "gateway_feed_records_in_total", dataset="C") == 100


def _registry(collector: GatewayCollector) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(collector)
    return registry


def test_status_json_says_how_far_back_each_feed_replays() -> None:
    snap = _snapshot(
        [
            _journal_feed("A", _stats()),
            _journal_feed("B", _stats(enabled=False, error="/secret: EIO")),
            _journal_feed("E", _stats(oldest_ts=None, newest_ts=None, bytes=0, segments=0)),
            _feed("C"),
        ],
        replays=replay_snapshot(1, {"sendfile": 10}),
    )
    data = document(snap, None, None, snap.taken_at)
    raw = json.dumps(data)
    assert "secret" not in raw and "EIO" not in raw
    journals = {f["dataset"]: f["journal"] for f in data["feeds"]}
    assert journals["A"] == {
        "state": "on",
        "oldest_ts": 1_799_913_600.5,
        "newest_ts": 1_799_999_999.0,
        "bytes": 3 << 20,
        "segments": 2,
        "retention_s": 86400.0,
        "span_s": 86_398.5,
    }
    assert journals["B"]["state"] == "disabled"
    assert journals["E"]["state"] == "on" and journals["E"]["span_s"] is None
    assert journals["C"] == msgspec.to_builtins(JournalStatus()) | {"span_s": None}
    assert journals["C"]["state"] == "off"
    assert data["sessions"]["replays_active"] == 1
    assert data["sessions"]["replay_bytes"] == {"sendfile": 10, "copy": 0}
    assert data["reasons"][-1] == "feed B: journal disabled by a write error (see log)"
    page = render_html(data)
    assert "replay back to 2027-01-14 08:00:00 UTC (23h 59m)" in page
    assert "journal disabled: write error (see log)" in page and "journal off" in page
    # a supervisor can add snapshots up: they round-trip with the journal parts
    assert msgspec.json.decode(msgspec.json.encode(snap), type=GatewaySnapshot) == snap
