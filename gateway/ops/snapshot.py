"""The gateway's figures at one instant, as typed, serialisable values.

``Gateway.snapshot()`` returns a :class:`GatewaySnapshot`: the gateway itself, its sessions
counted by dataset and phase (and by API key id), the bytes written to them by dataset and
compression, and one :class:`FeedSnapshot` per feed with the feed's cumulative totals
(records and bytes in, records out, fan-out and zstd work, state changes). Everything the
operations side shows is derived from it: the Prometheus collector
(``gateway.ops.collector``) turns the totals into counters and gauges at scrape time, and
the status page and ``/status.json`` (``gateway.ops.http``) show the parts of it that
:class:`FeedStatus`, :class:`GatewayInfo` and :class:`SessionsSnapshot` name. The structs
hold plain values only (``msgspec.json.encode`` round-trips them), so a supervisor can
later add up the snapshots of worker processes.

A feed with a journal (``feed.journal``, ``[journal] dir``) adds what
``DatasetJournal.stats()`` says of it: :class:`JournalStatus` (how far back it can be
replayed; on the status page and in ``/status.json``) and :class:`JournalTotals` (its
counters and write-latency histogram, for /metrics only). A journal disabled by a write error
shows as ``state="disabled"``: the error itself (a path, an errno) goes to the log and never
into a snapshot. The server's replay counters (sessions replaying now, bytes replayed by
path) are :class:`ReplaySnapshot`, from :func:`replay_snapshot`.

This module reads feeds (their ``stats``, fan-out counters and state) in one place,
:func:`feed_snapshot`; it never sees a client connection: the gateway hands it how many
connections there are of each :class:`ConnectionFacts`. :class:`Totals` is the cheap part
(no connection is looked at): what the status page's throughput rates are taken from.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import msgspec

if TYPE_CHECKING:
    from gateway.feeds import Feed
    from gateway.journal import JournalStats

__all__ = [
    "ConnectionFacts",
    "FeedSnapshot",
    "FeedStatus",
    "GatewayInfo",
    "GatewaySnapshot",
    "JournalStatus",
    "JournalTotals",
    "ReplaySnapshot",
    "SessionCounts",
    "SessionsSnapshot",
    "Totals",
    "WorkersInfo",
    "feed_snapshot",
    "feed_status",
    "journal_parts",
    "replay_snapshot",
    "sessions_snapshot",
]


class ConnectionFacts(NamedTuple):
    """What the snapshot needs to know of a client connection (connections alike in
    these are counted together)."""

    #: the dataset of an authenticated session, else None
    dataset: str | None
    #: the API key id of an authenticated session, else None
    key_id: str | None
    #: True once the session has started (its Metadata is sent)
    streaming: bool


class WorkersInfo(msgspec.Struct, kw_only=True):
    """``--workers N``: worker processes up (Ready and alive) of how many, and the names
    (``w<slot>``) of those down (dead, restarting or starting)."""

    up: int
    of: int
    down: list[str] = msgspec.field(default_factory=list)


class GatewayInfo(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The gateway's own state (``/status.json`` ``gateway``)."""

    version: str
    started_at: float
    uptime_s: float
    ready: bool
    accepting: bool
    port: int
    loop: str
    #: only with ``--workers N`` (absent from the document otherwise)
    workers: WorkersInfo | None = None


class SessionCounts(msgspec.Struct, kw_only=True):
    streaming: int = 0
    authenticated: int = 0


class SessionsSnapshot(msgspec.Struct, kw_only=True):
    """Authenticated sessions by dataset and phase (``/status.json`` ``sessions``)."""

    total: int
    by_dataset: dict[str, SessionCounts]
    connections_open: int
    #: open connections without an authenticated session
    unauthenticated: int


#: JournalStatus.state: no journal configured, journaling, stopped by a write error
JOURNAL_OFF, JOURNAL_ON, JOURNAL_DISABLED = "off", "on", "disabled"


class JournalStatus(msgspec.Struct, kw_only=True):
    """How far back a dataset can be replayed (``/status.json`` ``feeds[].journal``).
    Times are Unix seconds of the records' filter ts (``ts_event``; ``ts_recv`` for
    bbo/cbbo), so a file feed of old data shows its data time."""

    #: "off" (no journal configured), "on", or "disabled" (a write error; see the log)
    state: str = JOURNAL_OFF
    #: the oldest and newest retained record (None while the journal is empty)
    oldest_ts: float | None = None
    newest_ts: float | None = None
    #: bytes and segments on disk
    bytes: int = 0
    segments: int = 0
    #: the configured retention (None: no journal)
    retention_s: float | None = None

    @property
    def span_s(self) -> float | None:
        """The history held: newest minus oldest retained record."""
        if self.oldest_ts is None or self.newest_ts is None:
            return None
        return max(0.0, self.newest_ts - self.oldest_ts)


class JournalTotals(msgspec.Struct, kw_only=True):
    """A journal's counters (cumulative) and limits, for /metrics."""

    max_bytes: int
    first_seq: int
    last_seq: int
    appended_chunks: int
    appended_bytes: int
    write_errors: int
    #: segments deleted so far, by reason ("retention", "max_bytes")
    segments_deleted: dict[str, int]
    write_seconds_sum: float
    write_seconds_count: int
    #: cumulative counts per bound of ``gateway.journal.WRITE_BUCKETS``
    write_seconds_buckets: list[int]


class ReplaySnapshot(msgspec.Struct, kw_only=True):
    """The server's replays: how many run now, and the bytes replayed so far by path
    ("sendfile": handed to the kernel from the journal files; "copy": through Python)."""

    active: int = 0
    bytes: dict[str, int] = msgspec.field(default_factory=lambda: {"sendfile": 0, "copy": 0})


class RelayStatus(msgspec.Struct, kw_only=True):
    """A relay feed's upstream (``lsg://``): never its address, only its place in the list."""

    up: bool
    #: 1-based position of the upstream in use in the feed's list (0 while none)
    upstream: int
    upstreams: int
    #: reconnections by how they carried on: "resume" (exact) or "live" (with a gap)
    reconnects: dict[str, int]
    #: gaps reported to sessions, by reason (aged_out, unavailable, bad_resume, failover,
    #: no_checkpoint)
    gaps: dict[str, int]
    #: records a resumed stream sent again and the relay dropped
    deduplicated: int
    #: the upstream's last checkpoint, where a resume would start (None: none yet)
    checkpoint: int | None = None
    #: the last outage: loss to the first byte of the resumed stream (0: none yet)
    resume_s: float
    #: seconds since the upstream last sent anything (records or heartbeats)
    silence_s: float | None


class BooksStatus(msgspec.Struct, kw_only=True):
    """A feed's order books (gateway/books): built from its MBO records."""

    #: books are built (False: off in the config, dropped past max_orders, or unavailable)
    on: bool
    #: why they are off ("" while on)
    off_reason: str
    books: int
    #: books seen from a clear record (R) since the start (or in the journal it rebuilt
    #: from): only these are snapshotted while books.snapshot_requires_clear
    whole_books: int
    orders: int
    levels: int
    memory_bytes: int
    #: MBO records applied
    records: int
    #: cancels or modifies of orders the books do not hold
    unknown_orders: int
    apply_seconds: float
    #: derived records built, per schema (only schemas someone subscribed to are built)
    derived: dict[str, int]
    #: schemas the publisher sends itself (never derived for this feed)
    published: list[str]
    snapshots: int
    snapshot_records: int
    snapshot_seconds: float


class FeedStatus(msgspec.Struct, kw_only=True):
    """One feed as ``/status.json`` shows it (and in this order)."""

    dataset: str
    connected: bool
    detail: str
    paused: bool
    paused_total_s: float
    pauses: int
    lossless: bool
    #: now minus the ts_event of the last record (None before the first)
    lag_s: float | None
    #: seconds since the feed last delivered a record, on the wall clock
    last_record_age_s: float | None
    records_in: int
    bytes_in: int
    #: sessions joined to this feed
    sessions: int
    #: what /readyz says of it
    readiness: str
    #: its journal: how far back it can be replayed ("off" without one)
    journal: JournalStatus = msgspec.field(default_factory=JournalStatus)
    #: a relay feed's upstream (None for other sources)
    relay: RelayStatus | None = None
    #: the feed's order books (None: books off in the config)
    books: BooksStatus | None = None


class FeedSnapshot(FeedStatus, kw_only=True):
    """A feed's status and its cumulative totals (counters only grow)."""

    ups: int
    downs: int
    invalid_inputs: int
    records_out: int
    fanout_groups: int
    variant_builds: int
    variant_writes: int
    zstd_bytes_before: int
    zstd_bytes_after: int
    zstd_frames_built: int
    zstd_frames_written: int
    zstd_compress_seconds: float
    #: its journal's counters (None: no journal)
    journal_totals: JournalTotals | None = None


class GatewaySnapshot(msgspec.Struct, kw_only=True):
    """Everything the operations side reports, taken at ``taken_at`` (Unix time)."""

    taken_at: float
    gateway: GatewayInfo
    sessions: SessionsSnapshot
    feeds: list[FeedSnapshot]
    #: connections that have not authenticated yet (the server's own count)
    connections_unauthenticated: int
    #: authenticated sessions per API key id: every configured key, 0 when it has none
    key_sessions: dict[str, int]
    #: bytes written to sessions, by (dataset, compression) as "dataset/compression"
    bytes_out: dict[str, float]
    #: replays running and bytes replayed (zero without a journal)
    replays: ReplaySnapshot = msgspec.field(default_factory=ReplaySnapshot)

    def totals(self) -> Totals:
        return Totals(
            records_in=sum(f.records_in for f in self.feeds),
            bytes_in=sum(f.bytes_in for f in self.feeds),
            records_out=sum(f.records_out for f in self.feeds),
            bytes_out=sum(self.bytes_out.values()),
        )


class Totals(msgspec.Struct, kw_only=True):
    """Records and bytes in and out since the start, over every feed and session."""

    records_in: int
    bytes_in: int
    records_out: int
    bytes_out: float


def feed_snapshot(feed: Feed, readiness: str, now: float, mono: float) -> FeedSnapshot:
    """One feed's figures at wall time ``now`` (monotonic ``mono``)."""
    st = feed.stats
    fo = feed.fanout
    journal = feed.journal
    status, totals = journal_parts(journal.stats()) if journal is not None else (None, None)
    paused_since = feed.paused_since
    paused_total = feed.paused_total_s + (mono - paused_since if paused_since is not None else 0)
    return FeedSnapshot(
        dataset=feed.dataset,
        connected=feed.connected,
        detail=feed.state_detail,
        paused=feed.paused,
        paused_total_s=max(0.0, paused_total),
        pauses=feed.pauses,
        lossless=feed.backpressure,
        lag_s=(int(now * 1e9) - st.last_ts_event) / 1e9 if st.last_ts_event else None,
        last_record_age_s=now - st.last_record_at if st.last_record_at else None,
        records_in=st.records_in,
        bytes_in=st.bytes_in,
        sessions=fo.member_count,
        readiness=readiness,
        journal=status or JournalStatus(),
        journal_totals=totals,
        ups=feed.ups,
        downs=feed.downs,
        invalid_inputs=feed.invalid_inputs,
        records_out=fo.records_out,
        fanout_groups=len(fo.groups),
        variant_builds=fo.variant_builds,
        variant_writes=fo.variant_writes,
        zstd_bytes_before=fo.bytes_compressed_in,
        zstd_bytes_after=fo.bytes_compressed_out,
        zstd_frames_built=fo.frames_built,
        zstd_frames_written=fo.frames_written,
        zstd_compress_seconds=fo.compress_seconds,
        relay=_relay_status(feed, mono),
        books=_books_status(feed),
    )


def _books_status(feed: Feed) -> BooksStatus | None:
    books = feed.books
    if books is None:
        return None
    c = books.counters
    return BooksStatus(
        on=books.on,
        off_reason=c.off_reason,
        books=c.books,
        whole_books=books.whole_books(),
        orders=c.orders,
        levels=c.levels,
        memory_bytes=c.memory_bytes,
        records=c.records_applied,
        unknown_orders=c.unknown_cancels,
        apply_seconds=c.apply_seconds,
        derived=dict(c.derived),
        published=sorted(c.published),
        snapshots=c.snapshots,
        snapshot_records=c.snapshot_records,
        snapshot_seconds=c.snapshot_seconds,
    )


def _relay_status(feed: Feed, mono: float) -> RelayStatus | None:
    r = feed.relay
    if r is None:
        return None
    return RelayStatus(
        up=r.up,
        upstream=r.upstream_index,
        upstreams=r.upstreams,
        reconnects=dict(r.reconnects),
        gaps=dict(r.gaps),
        deduplicated=r.deduplicated,
        checkpoint=r.checkpoint,
        resume_s=r.resume_s,
        silence_s=max(0.0, mono - r.last_heard) if r.last_heard else None,
    )


def journal_parts(stats: JournalStats) -> tuple[JournalStatus, JournalTotals]:
    """What the snapshot keeps of a journal's stats (its error text left out: the log has
    it); ns times become Unix seconds."""
    status = JournalStatus(
        state=JOURNAL_ON if stats.enabled else JOURNAL_DISABLED,
        oldest_ts=stats.oldest_ts / 1e9 if stats.oldest_ts is not None else None,
        newest_ts=stats.newest_ts / 1e9 if stats.newest_ts is not None else None,
        bytes=stats.bytes,
        segments=stats.segments,
        retention_s=stats.retention_s,
    )
    totals = JournalTotals(
        max_bytes=stats.max_bytes,
        first_seq=stats.first_seq,
        last_seq=stats.last_seq,
        appended_chunks=stats.appended_chunks,
        appended_bytes=stats.appended_bytes,
        write_errors=stats.write_errors,
        segments_deleted=dict(stats.segments_deleted),
        write_seconds_sum=stats.write_seconds_sum,
        write_seconds_count=stats.write_seconds_count,
        write_seconds_buckets=list(stats.write_seconds_buckets),
    )
    return status, totals


def replay_snapshot(active: int, replay_bytes: Mapping[str, int]) -> ReplaySnapshot:
    """The server's replay counters (``ServerState.replays_active``, ``.replay_bytes``)."""
    out = ReplaySnapshot(active=active)
    out.bytes.update(replay_bytes)
    return out


def feed_status(feed: FeedSnapshot) -> dict[str, Any]:
    """The ``/status.json`` part of a feed's snapshot (its totals left out)."""
    out: dict[str, Any] = {name: getattr(feed, name) for name in FeedStatus.__struct_fields__}
    out["paused_total_s"] = round(feed.paused_total_s, 3)
    journal = feed.journal
    out["journal"] = {**msgspec.to_builtins(journal), "span_s": journal.span_s}
    out["relay"] = msgspec.to_builtins(feed.relay) if feed.relay is not None else None
    out["books"] = msgspec.to_builtins(feed.books) if feed.books is not None else None
    return out


def sessions_snapshot(
    connections: Mapping[ConnectionFacts, int], key_ids: Iterable[str]
) -> tuple[SessionsSnapshot, dict[str, int]]:
    """Sessions by dataset and phase, and per API key id (each of ``key_ids`` listed),
    from how many connections there are of each kind."""
    by_dataset: dict[str, SessionCounts] = {}
    per_key = dict.fromkeys(key_ids, 0)
    total = unauth = opened = 0
    for conn, n in connections.items():
        opened += n
        if conn.dataset is None or conn.key_id is None:
            unauth += n
            continue
        counts = by_dataset.setdefault(conn.dataset, SessionCounts())
        if conn.streaming:
            counts.streaming += n
        else:
            counts.authenticated += n
        per_key[conn.key_id] = per_key.get(conn.key_id, 0) + n
        total += n
    sessions = SessionsSnapshot(
        total=total, by_dataset=by_dataset, connections_open=opened, unauthenticated=unauth
    )
    return sessions, per_key
