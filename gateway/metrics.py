"""Prometheus objects the data path and the probe update as things happen (connections,
refusals, disconnects, slow readers, heartbeats, limits, latency histograms, replay
catch-up times and refusals).

The feeds' and fan-out's running totals, the bytes written to sessions, the connection
counts and readiness are not here: ``gateway.ops.collector`` reads them when /metrics is
scraped. Labels stay bounded: nothing
per session or peer; the one per-key series, ``gateway_key_sessions{key_id}``, is
exported only with ``metrics_per_key = true`` (bounded by the configured key list)."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
)

__all__ = ["PROBE_LATENCIES", "PROBE_STEPS", "REPLAY_REFUSALS", "Metrics", "ProbeMetrics"]

#: why a replay request was refused (``gateway_replays_refused_total{reason}``): too many
#: concurrent replays, start older than the journal holds, no journal (off or disabled),
#: start in the future, resume position unusable
REPLAY_REFUSALS = ("limit", "aged_out", "unavailable", "future", "bad_resume")


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.sessions = Gauge(
            "gateway_sessions",
            "Open client sessions",
            ["dataset", "compression", "ts_out", "state"],
            registry=r,
        )
        #: ``sessions``' children by label tuple: a session moves between them at every phase
        #: change, and ``labels()`` (a lock and label checks per call) was ~9 % of the
        #: gateway's samples in a 1,000-session connect storm (py-spy)
        self._session_series: dict[tuple[str, ...], Gauge] = {}
        self.connections = Counter(
            "gateway_connections",
            "Client connections accepted or rejected",
            ["result", "reason"],
            registry=r,
        )
        self.auth_failures = Counter(
            "gateway_auth_failures", "Authentication failures", ["reason"], registry=r
        )
        self.disconnects = Counter(
            "gateway_disconnects", "Sessions ended, by reason", ["reason"], registry=r
        )
        self.slow_reader_events = Counter(
            "gateway_slow_reader_events",
            "Slow-reader warnings, skips and cuts",
            ["policy", "event"],
            registry=r,
        )
        self.records_skipped = Counter(
            "gateway_records_skipped", "Records skipped for slow readers", registry=r
        )
        self.heartbeats = Counter("gateway_heartbeats", "Heartbeat SystemMsgs sent", registry=r)
        self.limit_hits = Counter(
            "gateway_limit_hits", "Configured limits hit, by limit", ["limit"], registry=r
        )
        self.session_buffered = Histogram(
            "gateway_session_buffered_bytes",
            "Per-session unsent bytes, sampled every second",
            buckets=(0, 1024, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864),
            registry=r,
        )
        self.loop_lag = Histogram(
            "gateway_event_loop_lag_seconds",
            "Event-loop scheduling lag",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=r,
        )
        self.transport = Info("gateway_transport", "Transport and kernel-bypass state", registry=r)
        self.bypass_active = Gauge(
            "gateway_bypass_active",
            "1 when the requested preload library is loaded",
            ["vendor"],
            registry=r,
        )
        self.io_uring_fds = Gauge(
            "gateway_io_uring_fds",
            "io_uring descriptors open at start-up (must be 0 under a preload library)",
            registry=r,
        )
        self.listeners_accelerated = Gauge(
            "gateway_listeners_accelerated",
            "Listening sockets the bypass stack accelerates (onload_fd_stat; absent if unknown)",
            ["vendor"],
            registry=r,
        )
        self.info = Info("gateway", "Gateway version and event loop", registry=r)
        self.start_time = Gauge(
            "gateway_start_time_seconds", "Unix time the gateway started", registry=r
        )
        self.replay_catchup_seconds = Histogram(
            "gateway_replay_catchup_seconds",
            "Seconds from a replaying session's start to its hand-over to live",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800),
            registry=r,
        )
        self.replays_refused = Counter(
            "gateway_replays_refused",
            "Replay requests refused, by reason",
            ["reason"],
            registry=r,
        )
        for reason in REPLAY_REFUSALS:
            self.replays_refused.labels(reason)
        ProcessCollector(registry=r)

    def session_series(self, labels: tuple[str, ...]) -> Gauge:
        """``sessions.labels(*labels)``, looked up once per label tuple."""
        series = self._session_series.get(labels)
        if series is None:
            series = self._session_series[labels] = self.sessions.labels(*labels)
        return series


#: the probe's steps, in order; a failed strobe is labelled with the step that failed
PROBE_STEPS = ("connect", "auth", "subscribe", "start", "first_record")
#: the latencies the probe measures (total: the whole strobe)
PROBE_LATENCIES = ("connect", "auth", "first_record", "total")


class ProbeMetrics:
    """The uptime probe's own metrics, in its own registry (``gateway probe``) or in the
    gateway's (``gateway serve --strobe``)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.up = Gauge("gateway_probe_up", "1 when the last strobe succeeded", registry=r)
        self.strobes = Counter(
            "gateway_probe_strobes", "Strobes run, by result", ["result"], registry=r
        )
        self.failures = Counter(
            "gateway_probe_failures",
            "Failed strobes, by the step that failed",
            ["step"],
            registry=r,
        )
        self.latency = Histogram(
            "gateway_probe_latency_seconds",
            "Strobe latencies: TCP connect, authentication, start to first record, total",
            ["step"],
            buckets=(
                0.0005,
                0.001,
                0.0025,
                0.005,
                0.01,
                0.025,
                0.05,
                0.1,
                0.25,
                0.5,
                1,
                2.5,
                5,
                10,
            ),
            registry=r,
        )
        self.freshness = Gauge(
            "gateway_probe_feed_freshness_seconds",
            "Now minus ts_event of the first record the last successful strobe received",
            registry=r,
        )
        self.last_strobe = Gauge(
            "gateway_probe_last_strobe_timestamp_seconds",
            "Unix time of the last strobe",
            registry=r,
        )
        self.last_success = Gauge(
            "gateway_probe_last_success_timestamp_seconds",
            "Unix time of the last successful strobe",
            registry=r,
        )
        self.uptime = Gauge(
            "gateway_probe_uptime_ratio",
            "Share of successful strobes over the window, from the SQLite history",
            ["window"],
            registry=r,
        )
        for result in ("success", "failure"):
            self.strobes.labels(result)
        for step in PROBE_STEPS:
            self.failures.labels(step)
