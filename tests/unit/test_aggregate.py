"""gateway/workers/aggregate.py: the workers' metric families and snapshots merged into one
gateway's, and the supervisor's /metrics (parsed back with prometheus-client's parser)."""

from __future__ import annotations

from typing import Any

import msgspec
from prometheus_client import CollectorRegistry, generate_latest

from gateway.metrics import Metrics
from gateway.ops.collector import GatewayCollector
from gateway.ops.snapshot import (
    FeedSnapshot,
    GatewayInfo,
    GatewaySnapshot,
    JournalStatus,
    ReplaySnapshot,
    SessionCounts,
    SessionsSnapshot,
)
from gateway.workers.aggregate import (
    GATEWAY_FAMILIES,
    Family,
    Retired,
    Sample,
    decode_families,
    families_of,
    merge_families,
    merge_snapshots,
    merged_registry,
)
from tests.support.prometheus import metric, parse_samples

DS = "GLBX.MDP3"


def _worker_metrics(sessions: int, lag: list[float], refused: int, started: float) -> Metrics:
    m = Metrics()
    m.sessions.labels(DS, "none", "0", "streaming").set(sessions)
    m.sessions.labels(DS, "zstd", "1", "streaming").set(1)
    for v in lag:
        m.loop_lag.observe(v)
    m.connections.labels("accepted", "none").inc(sessions + 1)
    m.limit_hits.labels("sessions_per_key").inc(refused)
    m.start_time.set(started)
    m.info.info({"version": "9.9", "loop": "worker-loop"})
    m.bypass_active.labels("onload").set(1)
    return m


def _fams(m: Metrics) -> dict[str, Family]:
    return {f.name: f for f in families_of(m.registry)}


def _sample(fam: Family, name: str, **labels: str) -> float:
    (value,) = [s.value for s in fam.samples if s.name == name and s.labels == labels]
    return value


def test_families_round_trip_through_msgspec() -> None:
    m = _worker_metrics(3, [0.002, 0.3], 2, 100.0)
    fams = families_of(m.registry)
    names = {f.name for f in fams}
    assert {"gateway_sessions", "gateway_event_loop_lag_seconds", "gateway"} <= names
    assert "process_cpu_seconds" in names  # the process collector's too
    for codec in (msgspec.msgpack, msgspec.json):
        data = codec.encode(fams)
        assert codec.decode(data, type=list[Family]) == fams
        assert decode_families(codec.decode(data)) == fams  # a list[Any] field
    lag = {f.name: f for f in fams}["gateway_event_loop_lag_seconds"]
    assert lag.type == "histogram"
    assert _sample(lag, "gateway_event_loop_lag_seconds_bucket", le="0.0025") == 1.0
    assert _sample(lag, "gateway_event_loop_lag_seconds_count") == 2.0


def test_families_leave_out_what_gateway_collector_makes() -> None:
    m = Metrics()
    m.registry.register(GatewayCollector(lambda: _snapshot(feeds=[_feed()])))
    names = {f.name for f in families_of(m.registry)}
    assert "gateway_records_out" in GATEWAY_FAMILIES
    assert not names & GATEWAY_FAMILIES
    assert "gateway_sessions" in names


def test_merge_counters_gauges_histograms_and_exceptions() -> None:
    own = Metrics()
    own.info.info({"version": "1.0", "loop": "uvloop"})
    own.start_time.set(50.0)
    own.bypass_active.labels("onload").set(0)  # not loaded in the supervisor
    w1 = _worker_metrics(3, [0.002, 0.3], 2, 120.0)
    w2 = _worker_metrics(4, [0.0001], 1, 110.0)
    f1, f2 = _fams(w1), _fams(w2)
    merged = {
        f.name: f
        for f in merge_families(families_of(own.registry), [list(f1.values()), list(f2.values())])
    }

    sessions = merged["gateway_sessions"]
    assert sessions.type == "gauge"
    labels = {"dataset": DS, "compression": "none", "ts_out": "0", "state": "streaming"}
    assert _sample(sessions, "gateway_sessions", **labels) == 7
    assert (
        _sample(sessions, "gateway_sessions", **{**labels, "compression": "zstd", "ts_out": "1"})
        == 2
    )
    conns = merged["gateway_connections"]
    assert _sample(conns, "gateway_connections_total", result="accepted", reason="none") == 9
    created = [s.value for s in conns.samples if s.name == "gateway_connections_created"]
    assert created == [
        min(
            _sample(
                f["gateway_connections"],
                "gateway_connections_created",
                result="accepted",
                reason="none",
            )
            for f in (f1, f2)
        )
    ]
    hits = merged["gateway_limit_hits"]
    assert _sample(hits, "gateway_limit_hits_total", limit="sessions_per_key") == 3
    lag = merged["gateway_event_loop_lag_seconds"]
    for le, n in (("0.0005", 1), ("0.0025", 2), ("0.25", 2), ("1.0", 3), ("+Inf", 3)):
        assert _sample(lag, "gateway_event_loop_lag_seconds_bucket", le=le) == n
    assert _sample(lag, "gateway_event_loop_lag_seconds_count") == 3
    assert abs(_sample(lag, "gateway_event_loop_lag_seconds_sum") - 0.3021) < 1e-9
    # exceptions: start times and max_fds the smallest, bypass_active 1 only if everywhere
    assert _sample(merged["gateway_start_time_seconds"], "gateway_start_time_seconds") == 50.0
    proc_start = [
        _sample(f["process_start_time_seconds"], "process_start_time_seconds") for f in (f1, f2)
    ]
    assert _sample(merged["process_start_time_seconds"], "process_start_time_seconds") == min(
        proc_start
        + [_sample(_fams(own)["process_start_time_seconds"], "process_start_time_seconds")]
    )
    max_fds = _sample(f1["process_max_fds"], "process_max_fds")
    assert _sample(merged["process_max_fds"], "process_max_fds") == max_fds
    assert _sample(merged["gateway_bypass_active"], "gateway_bypass_active", vendor="onload") == 0
    cpu = [_sample(f["process_cpu_seconds"], "process_cpu_seconds_total") for f in (f1, f2)]
    assert _sample(merged["process_cpu_seconds"], "process_cpu_seconds_total") >= sum(cpu)
    # Info: the supervisor's, never added up
    info = merged["gateway"]
    assert [(s.labels, s.value) for s in info.samples] == [
        ({"version": "1.0", "loop": "uvloop"}, 1.0)
    ]


def test_info_from_a_worker_when_the_supervisor_has_none() -> None:
    def info(labels: dict[str, str]) -> Family:
        return Family(
            "gateway_transport",
            "info",
            "t",
            samples=[Sample("gateway_transport_info", labels, 1.0)],
        )

    merged = merge_families([], [[info({"mode": "a"})], [info({"mode": "b"})]])
    assert merged == [info({"mode": "a"})]


# --- snapshots ------------------------------------------------------------------------------


def _feed(**kw: Any) -> FeedSnapshot:
    base: dict[str, Any] = dict(
        dataset=DS,
        connected=True,
        detail="up",
        paused=False,
        paused_total_s=0.0,
        pauses=0,
        lossless=False,
        lag_s=None,
        last_record_age_s=None,
        records_in=0,
        bytes_in=0,
        sessions=0,
        readiness="up",
        ups=0,
        downs=0,
        invalid_inputs=0,
        records_out=0,
        fanout_groups=0,
        variant_builds=0,
        variant_writes=0,
        zstd_bytes_before=0,
        zstd_bytes_after=0,
        zstd_frames_built=0,
        zstd_frames_written=0,
        zstd_compress_seconds=0.0,
    )
    return FeedSnapshot(**(base | kw))


def _snapshot(
    *,
    feeds: list[FeedSnapshot],
    ready: bool = True,
    port: int = 0,
    sessions: SessionsSnapshot | None = None,
    **kw: Any,
) -> GatewaySnapshot:
    base: dict[str, Any] = dict(
        taken_at=1000.0,
        connections_unauthenticated=0,
        key_sessions={},
        bytes_out={},
    )
    return GatewaySnapshot(
        gateway=GatewayInfo(
            version="1.0",
            started_at=900.0,
            uptime_s=100.0,
            ready=ready,
            accepting=True,
            port=port,
            loop="uvloop",
        ),
        sessions=sessions
        or SessionsSnapshot(total=0, by_dataset={}, connections_open=0, unauthenticated=0),
        feeds=feeds,
        **(base | kw),
    )


def _worker_snapshot(n: int) -> GatewaySnapshot:
    return _snapshot(
        feeds=[
            _feed(
                records_in=999,  # the worker's own intake: not the gateway's
                records_out=100 * n,
                sessions=n,
                fanout_groups=1,
                variant_builds=n,
                variant_writes=2 * n,
                zstd_bytes_before=10 * n,
                zstd_bytes_after=n,
                zstd_frames_built=n,
                zstd_frames_written=n,
                zstd_compress_seconds=0.5 * n,
            )
        ],
        port=7000,
        sessions=SessionsSnapshot(
            total=n,
            by_dataset={DS: SessionCounts(streaming=n, authenticated=1)},
            connections_open=n + 2,
            unauthenticated=1,
        ),
        connections_unauthenticated=1,
        key_sessions={"desk": n, "other": 0},
        bytes_out={f"{DS}/none": 1000.0 * n, f"{DS}/zstd": 10.0},
        replays=ReplaySnapshot(active=1, bytes={"sendfile": 5 * n, "copy": n}),
    )


def _own_snapshot(ready: bool = True) -> GatewaySnapshot:
    return _snapshot(
        feeds=[
            _feed(
                records_in=5000,
                bytes_in=80000,
                pauses=2,
                paused=True,
                journal=JournalStatus(state="on", bytes=4096, segments=1),
                ups=1,
            )
        ],
        ready=ready,
        key_sessions={"desk": 0, "other": 0, "third": 0},
    )


def test_merge_snapshots() -> None:
    own = _own_snapshot()
    merged = merge_snapshots(own, [_worker_snapshot(2), _worker_snapshot(3)])
    (feed,) = merged.feeds
    assert (feed.records_in, feed.bytes_in, feed.pauses, feed.paused, feed.ups) == (
        5000,
        80000,
        2,
        True,
        1,
    )
    assert feed.journal.bytes == 4096
    assert (feed.records_out, feed.sessions, feed.fanout_groups) == (500, 5, 2)
    assert (feed.variant_builds, feed.variant_writes) == (5, 10)
    assert (feed.zstd_bytes_before, feed.zstd_bytes_after, feed.zstd_frames_built) == (50, 5, 5)
    assert feed.zstd_compress_seconds == 2.5
    assert merged.sessions.total == 5
    assert merged.sessions.by_dataset == {DS: SessionCounts(streaming=5, authenticated=2)}
    assert (merged.sessions.connections_open, merged.sessions.unauthenticated) == (9, 2)
    assert merged.connections_unauthenticated == 2
    assert merged.key_sessions == {"desk": 5, "other": 0, "third": 0}
    assert merged.bytes_out == {f"{DS}/none": 5000.0, f"{DS}/zstd": 20.0}
    assert merged.replays == ReplaySnapshot(active=2, bytes={"sendfile": 25, "copy": 5})
    assert merged.gateway.ready and merged.gateway.accepting
    assert merged.gateway.port == 7000  # the supervisor's own is 0 here
    assert merged.gateway.started_at == own.gateway.started_at
    assert merged.totals().records_out == 500
    assert msgspec.json.decode(msgspec.json.encode(merged), type=GatewaySnapshot) == merged


def test_merged_readiness_needs_every_worker() -> None:
    workers = [_worker_snapshot(1), _worker_snapshot(2)]
    assert merge_snapshots(_own_snapshot(), workers, expected=2).gateway.ready
    assert not merge_snapshots(_own_snapshot(), workers, expected=3).gateway.ready
    assert not merge_snapshots(_own_snapshot(ready=False), workers).gateway.ready
    workers[1].gateway.ready = False
    assert not merge_snapshots(_own_snapshot(), workers).gateway.ready
    assert not merge_snapshots(_own_snapshot(), []).gateway.accepting


# --- the supervisor's /metrics ------------------------------------------------------------


def test_merged_registry_exposition_parses_to_the_sums() -> None:
    own = Metrics()
    own.info.info({"version": "1.0", "loop": "uvloop"})
    own.registry.register(GatewayCollector(_own_snapshot))  # left out: made from the merge
    w1 = _worker_metrics(3, [0.002], 2, 120.0)
    w2 = _worker_metrics(4, [0.3], 1, 110.0)
    latest = [families_of(w1.registry), families_of(w2.registry)]
    snaps = [_worker_snapshot(2), _worker_snapshot(3)]
    registry = merged_registry(
        own.registry,
        lambda: latest,
        lambda: merge_snapshots(_own_snapshot(), snaps),
        per_key=True,
        created=900.0,
    )
    text = generate_latest(registry).decode()
    samples = parse_samples(text)  # prometheus-client's own parser

    def one(name: str, **labels: str) -> float:
        return metric(samples, name, **labels)

    assert one("gateway_sessions", compression="none") == 7
    assert one("gateway_sessions") == 9
    assert one("gateway_connections_total", result="accepted") == 9
    assert one("gateway_event_loop_lag_seconds_count") == 2
    assert one("gateway_event_loop_lag_seconds_bucket", le="0.0025") == 1
    assert one("gateway_records_out_total", dataset=DS) == 500
    assert one("gateway_feed_records_in_total", dataset=DS) == 5000
    assert one("gateway_bytes_out_total", dataset=DS, compression="none") == 5000
    assert one("gateway_connections_open") == 9
    assert one("gateway_key_sessions", key_id="desk") == 5
    assert one("gateway_replay_bytes_total", path="sendfile") == 25
    assert one("gateway_ready") == 1
    assert [lab for (n, lab) in samples if n == "gateway_info"] == [
        (("loop", "uvloop"), ("version", "1.0"))
    ]
    # every family once (the supervisor's own GatewayCollector did not add a second)
    types = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
    assert len(types) == len(set(types))


def test_collector_reads_the_latest_at_each_scrape() -> None:
    own = Metrics()
    latest: list[list[Family]] = []
    registry = merged_registry(
        own.registry, lambda: latest, lambda: merge_snapshots(_own_snapshot(), [])
    )
    assert metric(parse_samples(generate_latest(registry).decode()), "gateway_sessions") == 0
    latest.append(families_of(_worker_metrics(5, [], 0, 1.0).registry))
    assert metric(parse_samples(generate_latest(registry).decode()), "gateway_sessions") == 6
    assert isinstance(registry, CollectorRegistry)


def test_a_dead_workers_counters_are_kept_and_its_gauges_dropped() -> None:
    own = Metrics()
    w1 = _worker_metrics(3, [0.002], 2, 120.0)
    w2 = _worker_metrics(4, [0.3], 1, 110.0)
    f1, f2 = families_of(w1.registry), families_of(w2.registry)
    s1, s2 = _worker_snapshot(2), _worker_snapshot(3)
    retired = Retired()
    live: list[list[Family]] = [f1, f2]
    snaps = [s1, s2]
    registry = merged_registry(
        own.registry,
        lambda: [*live, retired.families()],
        lambda: merge_snapshots(_own_snapshot(), snaps, retired=retired),
    )
    before = parse_samples(generate_latest(registry).decode())
    # worker 1 dies: the supervisor keeps its last report's counters
    retired.add(f1, s1)
    live.remove(f1)
    snaps.remove(s1)
    after = parse_samples(generate_latest(registry).decode())
    for name, labels in (
        ("gateway_connections_total", {"result": "accepted"}),
        ("gateway_limit_hits_total", {}),
        ("gateway_event_loop_lag_seconds_count", {}),
        ("gateway_event_loop_lag_seconds_bucket", {"le": "0.0025"}),
        ("gateway_records_out_total", {}),
        ("gateway_bytes_out_total", {}),
        ("gateway_replay_bytes_total", {}),
        ("gateway_fanout_variant_writes_total", {}),
    ):
        assert metric(after, name, **labels) == metric(before, name, **labels), name
    assert metric(after, "process_cpu_seconds_total") >= metric(before, "process_cpu_seconds_total")
    # gauges left with the process
    assert metric(after, "gateway_sessions") == 5
    assert metric(after, "gateway_connections_open") == 5
    assert metric(after, "gateway_fanout_groups") == 1
    assert metric(after, "process_resident_memory_bytes") < metric(
        before, "process_resident_memory_bytes"
    )
    # a second death adds up; the kept counters are plain data
    retired.add(f2, s2)
    live.clear()
    snaps.clear()
    final = parse_samples(generate_latest(registry).decode())
    assert metric(final, "gateway_records_out_total") == 500
    assert metric(final, "gateway_connections_total", result="accepted") == 9
    assert metric(final, "gateway_sessions") == 0
    assert retired.families() == decode_families(
        msgspec.msgpack.decode(msgspec.msgpack.encode(retired.families()))
    )
