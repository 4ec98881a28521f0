"""The gateway's totals as Prometheus metrics, read when /metrics is scraped.

Feeds, fan-out groups and the server (bytes written to sessions) keep plain cumulative
totals; :class:`GatewayCollector` asks for a :class:`~gateway.ops.snapshot.GatewaySnapshot`
at scrape time and yields counter and gauge families from it, so nothing is copied into
Prometheus objects between scrapes and nothing remembers what was already exported. The
names, types, labels and help texts are the ones the alert rules and dashboards in
``deploy/monitoring`` use.

A feed with a journal adds the ``gateway_journal_*`` families, labelled by dataset (no
series for a dataset without a journal, so ``gateway_journal_enabled == 0`` means "disabled
by a write error", never "not configured"); the write latency is a histogram rebuilt from
the journal's cumulative bucket counts. ``gateway_replays_active`` and
``gateway_replay_bytes_total{path}`` are the server's replay counters. (The replay catch-up
histogram and the refusals counter are ordinary prometheus-client objects in
``gateway.metrics``: they are observed as things happen.)

A relay feed (``lsg://``) adds the ``gateway_relay_*`` families, labelled by dataset: the
upstream up or not and which of the list is in use (by position, never by address),
reconnections by mode, gaps reported by reason, replayed records dropped as already
relayed, the last outage's length and the silence since the upstream last sent anything.

Labels stay bounded (datasets, event names); the one per-key family,
``gateway_key_sessions{key_id}``, has samples only when the config sets
``metrics_per_key = true`` (bounded by the configured key list).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from gateway.journal import WRITE_BUCKETS
from gateway.ops.snapshot import (
    BooksStatus,
    FeedSnapshot,
    GatewaySnapshot,
    JournalTotals,
    RelayStatus,
)

__all__ = ["FEED_EVENTS", "JOURNAL_DELETE_REASONS", "RELAY_GAP_REASONS", "GatewayCollector"]

#: gateway_feed_events{event}: how each is counted from a feed's snapshot
FEED_EVENTS = (("up", "ups"), ("down", "downs"), ("invalid", "invalid_inputs"))
#: gateway_journal_segments_deleted{reason}: every reason has a series (0 until it happens)
JOURNAL_DELETE_REASONS = ("retention", "max_bytes")
#: gateway_relay_gaps_total{reason}: every reason has a series (0 until it happens)
RELAY_GAP_REASONS = ("aged_out", "unavailable", "bad_resume", "failover", "no_checkpoint")


class GatewayCollector:
    """A prometheus-client collector over ``snapshot()`` (register it on a registry)."""

    def __init__(
        self,
        snapshot: Callable[[], GatewaySnapshot],
        *,
        per_key: bool = False,
        created: float | None = None,
    ) -> None:
        self._snapshot = snapshot
        self.per_key = per_key
        #: the ``_created`` time of every counter (the gateway's start)
        self.created = created

    def describe(self) -> Iterator[Metric]:
        """The families without samples (the registry checks names without a scrape)."""
        return iter(_Families().all())

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        fams = _Families()
        feed_totals = fams.feed_totals
        for f in snap.feeds:
            ds = [f.dataset]
            feed_totals["records_in"].add_metric(ds, f.records_in, self.created)
            feed_totals["bytes_in"].add_metric(ds, f.bytes_in, self.created)
            feed_totals["records_out"].add_metric(ds, f.records_out, self.created)
            feed_totals["paused_seconds"].add_metric(ds, f.paused_total_s, self.created)
            fams.feed_pauses.add_metric([f.dataset, "session_high_water"], f.pauses, self.created)
            for event, attr in FEED_EVENTS:
                fams.feed_events.add_metric([f.dataset, event], getattr(f, attr), self.created)
            fams.fanout_groups.add_metric(ds, f.fanout_groups)
            fams.feed_up.add_metric(ds, 1 if f.connected else 0)
            fams.feed_paused.add_metric(ds, 1 if f.paused else 0)
            if f.lag_s is not None:
                fams.feed_lag.add_metric(ds, max(0.0, f.lag_s))
            if f.last_record_age_s is not None:
                fams.feed_last_record_age.add_metric(ds, max(0.0, f.last_record_age_s))
            if f.journal_totals is not None:
                self._journal(fams, f, f.journal_totals)
            if f.relay is not None:
                self._relay(fams, f.dataset, f.relay)
            if f.books is not None:
                self._books(fams, f.dataset, f.books)
        for key, n in snap.bytes_out.items():
            dataset, _, compression = key.rpartition("/")
            fams.bytes_out.add_metric([dataset, compression], n, self.created)
        sums = {
            "variant_builds": sum(f.variant_builds for f in snap.feeds),
            "variant_writes": sum(f.variant_writes for f in snap.feeds),
            "zstd_bytes_before": sum(f.zstd_bytes_before for f in snap.feeds),
            "zstd_bytes_after": sum(f.zstd_bytes_after for f in snap.feeds),
            "zstd_frames_built": sum(f.zstd_frames_built for f in snap.feeds),
            "zstd_frames_written": sum(f.zstd_frames_written for f in snap.feeds),
            "zstd_compress_seconds": sum(f.zstd_compress_seconds for f in snap.feeds),
        }
        for attr, family in fams.totals.items():
            family.add_metric([], sums[attr], self.created)
        fams.connections_open.add_metric([], snap.sessions.connections_open)
        fams.connections_unauthenticated.add_metric([], snap.connections_unauthenticated)
        if self.per_key:
            for key_id, n in sorted(snap.key_sessions.items()):
                fams.key_sessions.add_metric([key_id], n)
        fams.ready.add_metric([], 1 if snap.gateway.ready else 0)
        fams.replays_active.add_metric([], snap.replays.active)
        for path, n in sorted(snap.replays.bytes.items()):
            fams.replay_bytes.add_metric([path], n, self.created)
        return iter(fams.all())

    def _books(self, fams: _Families, dataset: str, b: BooksStatus) -> None:
        ds = [dataset]
        fams.books_on.add_metric(ds, 1 if b.on else 0)
        fams.books_held.add_metric(ds, b.books)
        fams.books_whole.add_metric(ds, b.whole_books)
        fams.books_orders.add_metric(ds, b.orders)
        fams.books_memory.add_metric(ds, b.memory_bytes)
        fams.books_records.add_metric(ds, b.records, self.created)
        fams.books_unknown.add_metric(ds, b.unknown_orders, self.created)
        fams.books_apply_seconds.add_metric(ds, b.apply_seconds, self.created)
        for schema, n in sorted(b.derived.items()):
            fams.books_derived.add_metric([dataset, schema], n, self.created)
        fams.books_snapshots.add_metric(ds, b.snapshots, self.created)
        fams.books_snapshot_records.add_metric(ds, b.snapshot_records, self.created)
        fams.books_snapshot_seconds.add_metric(ds, b.snapshot_seconds, self.created)

    def _relay(self, fams: _Families, dataset: str, r: RelayStatus) -> None:
        ds = [dataset]
        fams.relay_up.add_metric(ds, 1 if r.up else 0)
        fams.relay_index.add_metric(ds, r.upstream)
        for mode in ("resume", "live"):
            fams.relay_reconnects.add_metric(
                [dataset, mode], r.reconnects.get(mode, 0), self.created
            )
        gaps = dict.fromkeys(RELAY_GAP_REASONS, 0) | r.gaps
        for reason, n in sorted(gaps.items()):
            fams.relay_gaps.add_metric([dataset, reason], n, self.created)
        fams.relay_dedup.add_metric(ds, r.deduplicated, self.created)
        fams.relay_resume.add_metric(ds, r.resume_s)
        if r.silence_s is not None:
            fams.relay_silence.add_metric(ds, r.silence_s)

    def _journal(self, fams: _Families, f: FeedSnapshot, t: JournalTotals) -> None:
        ds = [f.dataset]
        j = f.journal
        fams.journal_enabled.add_metric(ds, 1 if j.state == "on" else 0)
        fams.journal_bytes.add_metric(ds, j.bytes)
        fams.journal_segments.add_metric(ds, j.segments)
        if j.oldest_ts is not None:
            fams.journal_oldest.add_metric(ds, j.oldest_ts)
        if j.newest_ts is not None:
            fams.journal_newest.add_metric(ds, j.newest_ts)
        if j.retention_s is not None:
            fams.journal_retention.add_metric(ds, j.retention_s)
        fams.journal_max_bytes.add_metric(ds, t.max_bytes)
        fams.journal_appended_chunks.add_metric(ds, t.appended_chunks, self.created)
        fams.journal_appended_bytes.add_metric(ds, t.appended_bytes, self.created)
        fams.journal_write_errors.add_metric(ds, t.write_errors, self.created)
        deleted = dict.fromkeys(JOURNAL_DELETE_REASONS, 0) | t.segments_deleted
        for reason, n in sorted(deleted.items()):
            fams.journal_deleted.add_metric([f.dataset, reason], n, self.created)
        buckets = [
            (f"{bound:g}", float(n))
            for bound, n in zip(WRITE_BUCKETS, t.write_seconds_buckets, strict=False)
        ]
        buckets.append(("+Inf", float(t.write_seconds_count)))
        fams.journal_write_seconds.add_metric(ds, buckets, t.write_seconds_sum)


class _Families:
    """One scrape's empty families, in the order they are exposed."""

    def __init__(self) -> None:
        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, labels=labels)

        def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=labels)

        ds = ("dataset",)
        self.feed_totals = {
            "records_in": counter("gateway_feed_records_in", "Records received from feeds", ds),
            "bytes_in": counter("gateway_feed_bytes_in", "Bytes received from feeds", ds),
            "paused_seconds": counter(
                "gateway_feed_paused_seconds",
                "Time a lossless feed spent paused for its sessions",
                ds,
            ),
            "records_out": counter("gateway_records_out", "Records written to sessions", ds),
        }
        self.bytes_out = counter(
            "gateway_bytes_out",
            "Bytes written to sessions (after compression)",
            ("dataset", "compression"),
        )
        self.feed_up = gauge("gateway_feed_up", "1 while the feed is connected and delivering", ds)
        self.feed_events = counter(
            "gateway_feed_events", "Feed disconnects, errors and recoveries", ("dataset", "event")
        )
        self.feed_lag = gauge(
            "gateway_feed_lag_seconds", "Now minus the ts_event of the last record", ds
        )
        self.feed_pauses = counter(
            "gateway_feed_pauses", "Lossless feed pauses, by cause", ("dataset", "cause")
        )
        self.totals = {
            "zstd_bytes_before": counter(
                "gateway_zstd_bytes_before", "Bytes given to the zstd compressor"
            ),
            "zstd_bytes_after": counter(
                "gateway_zstd_bytes_after", "Bytes produced by the zstd compressor"
            ),
            "zstd_frames_built": counter("gateway_zstd_frames_built", "Shared zstd frames built"),
            "zstd_frames_written": counter(
                "gateway_zstd_frames_written", "Shared zstd frames written to sessions"
            ),
            "zstd_compress_seconds": counter(
                "gateway_zstd_compress_seconds", "CPU time spent compressing"
            ),
            "variant_builds": counter(
                "gateway_fanout_variant_builds",
                "Per-group variants built (gathers, stamps, frames)",
            ),
            "variant_writes": counter(
                "gateway_fanout_variant_writes", "Shared variants written to sessions"
            ),
        }
        self.fanout_groups = gauge("gateway_fanout_groups", "Distinct output specs", ds)
        self.connections_open = gauge(
            "gateway_connections_open", "Open client connections (any state)"
        )
        self.connections_unauthenticated = gauge(
            "gateway_connections_unauthenticated",
            "Open client connections that have not authenticated yet",
        )
        self.feed_last_record_age = gauge(
            "gateway_feed_last_record_age_seconds",
            "Seconds since the feed last delivered a record (the gateway's wall clock)",
            ds,
        )
        self.feed_paused = gauge(
            "gateway_feed_paused",
            "1 while a lossless feed is paused for a session over its high-water mark",
            ds,
        )
        self.key_sessions = gauge(
            "gateway_key_sessions",
            "Authenticated sessions per API key id (metrics_per_key = true only)",
            ("key_id",),
        )
        self.ready = gauge("gateway_ready", "1 while /readyz answers ready")
        self.journal_enabled = gauge(
            "gateway_journal_enabled",
            "1 while the dataset's journal is written; 0 once a write error disabled it "
            "(no series without a journal)",
            ds,
        )
        self.journal_bytes = gauge("gateway_journal_bytes", "Bytes the journal holds on disk", ds)
        self.journal_segments = gauge(
            "gateway_journal_segments", "Journal segments on disk (the open one included)", ds
        )
        self.journal_oldest = gauge(
            "gateway_journal_oldest_timestamp_seconds",
            "Filter ts (ts_event; ts_recv for bbo/cbbo) of the oldest retained record: "
            "how far back replay reaches",
            ds,
        )
        self.journal_newest = gauge(
            "gateway_journal_newest_timestamp_seconds",
            "Filter ts of the newest journaled record (retention is measured from it)",
            ds,
        )
        self.journal_retention = gauge(
            "gateway_journal_retention_seconds", "Configured journal retention ([journal])", ds
        )
        self.journal_max_bytes = gauge(
            "gateway_journal_max_bytes", "Configured bound on the journal directory's size", ds
        )
        self.journal_appended_chunks = counter(
            "gateway_journal_appended_chunks", "Chunks appended to the journal", ds
        )
        self.journal_appended_bytes = counter(
            "gateway_journal_appended_bytes", "Record bytes appended to the journal", ds
        )
        self.journal_write_errors = counter(
            "gateway_journal_write_errors",
            "Journal write errors (the first disables the dataset's journal)",
            ds,
        )
        self.journal_deleted = counter(
            "gateway_journal_segments_deleted",
            "Journal segments deleted, by reason (retention: aged out; max_bytes: disk bound)",
            ("dataset", "reason"),
        )
        self.journal_write_seconds = HistogramMetricFamily(
            "gateway_journal_write_seconds",
            "Time to append one chunk to the journal (all its files)",
            labels=ds,
        )
        self.relay_up = gauge(
            "gateway_relay_upstream_up", "1 while a relay feed's upstream session is up", ds
        )
        self.relay_index = gauge(
            "gateway_relay_upstream_index",
            "1-based position in the feed's list of the upstream in use (0 while none)",
            ds,
        )
        self.relay_reconnects = counter(
            "gateway_relay_reconnects",
            "Relay reconnections, by mode (resume: exact; live: with a gap reported)",
            ("dataset", "mode"),
        )
        self.relay_gaps = counter(
            "gateway_relay_gaps",
            "Gaps a relay reported to its sessions, by reason",
            ("dataset", "reason"),
        )
        self.relay_dedup = counter(
            "gateway_relay_records_deduplicated",
            "Records a resumed upstream stream sent again, dropped by the relay",
            ds,
        )
        self.relay_resume = gauge(
            "gateway_relay_resume_seconds",
            "The last upstream outage: loss to the first byte of the resumed stream",
            ds,
        )
        self.relay_silence = gauge(
            "gateway_relay_upstream_silence_seconds",
            "Seconds since the upstream last sent anything (records or heartbeats)",
            ds,
        )
        self.books_on = gauge(
            "gateway_books_enabled",
            "1 while the feed's order books are built (0: dropped past books.max_orders)",
            ds,
        )
        self.books_held = gauge(
            "gateway_books", "Order books held, per (instrument, publisher)", ds
        )
        self.books_whole = gauge(
            "gateway_books_whole",
            "Books seen from a clear record (R) since the start: the ones snapshot=1 serves",
            ds,
        )
        self.books_orders = gauge("gateway_books_orders", "Resting orders held in the books", ds)
        self.books_memory = gauge(
            "gateway_books_memory_bytes", "Memory the feed's books hold (native engine)", ds
        )
        self.books_records = counter(
            "gateway_books_records", "MBO records applied to the books", ds
        )
        self.books_unknown = counter(
            "gateway_books_unknown_orders",
            "Cancels or modifies naming an order the books do not hold",
            ds,
        )
        self.books_apply_seconds = counter(
            "gateway_books_apply_seconds",
            "Time spent applying chunks to the books and building derived records",
            ds,
        )
        self.books_derived = counter(
            "gateway_books_derived_records",
            "Records derived from MBO, by schema (built only for schemas with subscribers)",
            ("dataset", "schema"),
        )
        self.books_snapshots = counter(
            "gateway_books_snapshots", "Book snapshots taken for snapshot=1 sessions", ds
        )
        self.books_snapshot_records = counter(
            "gateway_books_snapshot_records", "Records sent in book snapshots", ds
        )
        self.books_snapshot_seconds = counter(
            "gateway_books_snapshot_seconds", "Time spent taking book snapshots", ds
        )
        self.replays_active = gauge("gateway_replays_active", "Sessions replaying from the journal")
        self.replay_bytes = counter(
            "gateway_replay_bytes",
            "Bytes replayed from the journal, by path (sendfile: kernel copy; copy: via Python)",
            ("path",),
        )

    def all(self) -> list[Metric]:
        return [
            *self.feed_totals.values(),
            self.bytes_out,
            self.feed_up,
            self.feed_events,
            self.feed_lag,
            self.feed_pauses,
            *self.totals.values(),
            self.fanout_groups,
            self.connections_open,
            self.connections_unauthenticated,
            self.feed_last_record_age,
            self.feed_paused,
            self.relay_up,
            self.relay_index,
            self.relay_reconnects,
            self.relay_gaps,
            self.relay_dedup,
            self.relay_resume,
            self.relay_silence,
            self.books_on,
            self.books_held,
            self.books_whole,
            self.books_orders,
            self.books_memory,
            self.books_records,
            self.books_unknown,
            self.books_apply_seconds,
            self.books_derived,
            self.books_snapshots,
            self.books_snapshot_records,
            self.books_snapshot_seconds,
            self.key_sessions,
            self.ready,
            self.journal_enabled,
            self.journal_bytes,
            self.journal_segments,
            self.journal_oldest,
            self.journal_newest,
            self.journal_retention,
            self.journal_max_bytes,
            self.journal_appended_chunks,
            self.journal_appended_bytes,
            self.journal_write_errors,
            self.journal_deleted,
            self.journal_write_seconds,
            self.replays_active,
            self.replay_bytes,
        ]
