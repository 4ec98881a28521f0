"""A dataset's feed: chunks and symbology in; the fan-out and the subscription index fed.

Sources (synthetic, file, ingest) push two things into a Feed: chunks of whole DBN v3
records (``publish``) and symbology (``on_metadata``, ``learn_many``, and records carrying
it inside the chunks). The Feed keeps the dataset's ``SymbolDirectory`` (gateway/symbology.py)
up to date, takes gateway-only records out of the data, hands every chunk to the ``FanOut``
and every mapping it learnt to the ``SubscriptionIndex`` (gateway/subscriptions.py), which
answers the sessions' subscriptions and places them in fan-out groups.

It also paces that work: subscription work runs in slices of ``slice_size`` units, one per
event-loop turn, and a burst of mappings larger than a slice is learnt slice by slice while
the source is paused (``flow_listeners``) and its chunks are held, so records never overtake
their mappings. A lossless feed (``backpressure``) pauses its source while any session is
over its write-buffer high-water mark. It never knows about sockets or the session protocol.

With ``--workers N`` (gateway/workers) a few hooks, all None or empty by default (a None
check outside any per-session loop, nothing on the per-chunk path): the supervisor's Feed
reports what it learnt, its state and its schema (``on_learned``/``on_state``/
``on_schema``) to its ``RingSink``, and pauses its source while the ring is full
(``set_sink_blocked``) or while a worker's lossless session is over its high-water mark
(``remote_blocked``); a worker's Feed tells its ``RingFeeder`` which held chunk it
publishes (``on_held``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import numpy as np

from gateway import dbn
from gateway.books.feed_books import (
    RTYPE_MBO,
    TBBO_KEY,
    BooksUnavailable,
    FeedBooks,
    SnapshotTooLarge,
    SnapshotUnverified,
)
from gateway.dbn import RTYPE_DEF, ChunkIndex, SystemCode
from gateway.fanout import FanOut, OutputSpec, Subscriber
from gateway.subscriptions import FeedMember, SubscriptionIndex, SubscriptionLike
from gateway.symbology import (
    SYMBOLOGY_RTYPES,
    SymbolDirectory,
    mappings_in_chunk,
    mappings_in_metadata,
    without_gateway_records,
)

if TYPE_CHECKING:
    from gateway.feeds.relay import RelayStats
    from gateway.journal import DatasetJournal

__all__ = ["SLICE_SIZE", "Feed", "FeedMember", "FeedStats", "SymbolDirectory"]

log = logging.getLogger("gateway.feed")


_NONE: Final[frozenset[int]] = frozenset({-1})  # no MBO in a selection


def _mbo_selection(spec: OutputSpec | None) -> frozenset[int] | None:
    """The MBO part of a fan-out selection: None for every instrument, the ids, or _NONE."""
    if spec is None:
        return _NONE
    for rtype, ids in spec.selection:
        if rtype == RTYPE_MBO:
            return ids
    return _NONE


def _without_instruments(data: bytes, exclude: frozenset[int]) -> tuple[bytes, int]:
    rows = np.frombuffer(data, np.uint8).reshape(-1, 56)
    iids = rows[:, 4:8].copy().view("<u4").ravel()
    keep = rows[~np.isin(iids, np.fromiter(exclude, np.uint32, len(exclude)))]
    return keep.tobytes(), int(keep.shape[0])


#: InstrumentDefMsg and StatMsg
REFERENCE_RTYPES: Final = frozenset({RTYPE_DEF, 0x18})


@dataclass
class FeedStats:
    records_in: int = 0
    bytes_in: int = 0
    chunks_in: int = 0
    last_ts_event: int = 0
    #: wall-clock time (time.time()) of the last chunk published
    last_record_at: float = 0.0


#: units of subscription work (symbols resolved, mappings learnt or announced) per slice
SLICE_SIZE = 4096


class Feed:
    def __init__(
        self,
        dataset: str,
        *,
        fanout: FanOut | None = None,
        clock_ns: Callable[[], int] = time.time_ns,
        backpressure: bool = False,
        slice_size: int = SLICE_SIZE,
        schedule: Callable[[Callable[[], None]], object] | None = None,
    ) -> None:
        self.dataset = dataset
        self.directory = SymbolDirectory()
        self.fanout = fanout or FanOut(clock_ns=clock_ns)
        self.stats = FeedStats()
        self.connected = False
        self.state_detail = "starting"
        #: state changes, counted as they happen (a flap shorter than a metrics tick counts)
        self.ups = 0
        self.downs = 0
        #: feed input refused as invalid (bad DBN from a publisher or a file), counted
        self.invalid_inputs = 0
        self.backpressure = backpressure
        self._clock_ns = clock_ns
        #: the dataset's journal (``[journal] dir``): every chunk is appended to it before
        #: the fan-out sees it, every mapping learnt is recorded in it; None: no journal
        self.journal: DatasetJournal | None = None
        #: the journal seq of the chunk being published (0: no journal, or disabled)
        self.journal_seq = 0
        #: called with True when the source must stop reading, False to resume
        self.flow_listeners: list[Callable[[bool], None]] = []
        #: lossless pauses (a session over its high-water mark): since when, total, count
        self.paused_since: float | None = None
        self.paused_total_s = 0.0
        self.pauses = 0
        #: rtype 0x01 means mbp-1 unless the feed's Metadata declares tbbo
        self.schema_rtype: dict[str, int] = dict(dbn.SCHEMA_RTYPE)
        self.schema_rtype["tbbo"] = -1
        #: the schemas this feed's source declares it carries (None: unknown or mixed)
        self.schemas: frozenset[str] | None = None
        self._metadata_seen = False
        # Bounded work: one slice per event-loop turn (``schedule``, else call_soon).
        self.slice_size = max(1, slice_size)
        self._schedule = schedule
        self._drain_pending = False
        # A burst of mappings larger than a slice is learnt slice by slice while the source
        # is paused and its chunks are held, so records never overtake their mappings.
        self._learning: deque[tuple[str, int]] = deque()
        self._held: deque[ChunkIndex] = deque()
        #: held chunks whose own mappings are already queued for learning
        self._learnt_held: set[ChunkIndex] = set()
        self._flow_paused = False
        #: slices run and the most units any one slice handled (observability, tests)
        self.slices = 0
        self.max_slice_units = 0
        # --- with --workers N (gateway/workers); None / empty: the single-process gateway
        #: supervisor: mappings that were new or changed, after the journal recorded them
        self.on_learned: Callable[[list[tuple[str, int]]], None] | None = None
        #: supervisor: a state change (connected, detail, notify)
        self.on_state: Callable[[bool, str, bool], None] | None = None
        #: supervisor: the schema named by the source's Metadata ("" when none), before
        #: the mappings it carries are learnt
        self.on_schema: Callable[[str], None] | None = None
        #: worker: a chunk held during a mapping burst is about to be published (its
        #: index), or the held chunks of this slice are done (None)
        self.on_held: Callable[[ChunkIndex | None], None] | None = None
        #: supervisor: the ring is full (``set_sink_blocked``), workers whose lossless
        #: sessions are over their high-water mark (``remote_blocked``)
        self.sink_blocked = False
        self.remote_blocked_slots: set[int] = set()
        #: called with each chunk that carries definitions or statistics (REFERENCE_RTYPES)
        #: before it is published: parent and continuous symbology learn from them
        self.reference_listeners: list[Callable[[ChunkIndex], None]] = []
        #: the order books built from this feed's MBO records (gateway/books); None: off
        self.books: FeedBooks | None = None
        #: why there are no books when ``books`` is None (told to a snapshot=1 session)
        self.no_books_reason = "order books are off for this dataset (books.enabled = false)"
        #: a relay feed's upstream figures (gateway/feeds/relay.py); None for other sources
        self.relay: RelayStats | None = None
        self.subscriptions = SubscriptionIndex(
            dataset,
            self.directory,
            self.fanout,
            schema_rtype=self.schema_rtype,
            serves=self.serves,
            clock_ns=clock_ns,
            slice_size=self.slice_size,
            request_drain=self._request_drain,
        )
        # parent and continuous symbols resolve from the feed's definitions and statistics
        self.reference_listeners.append(self.subscriptions.on_reference)

    # --- sessions (kept in the subscription index) --------------------------------------

    @property
    def members(self) -> list[FeedMember]:
        return self.subscriptions.members

    def join(self, member: FeedMember) -> None:
        self.subscriptions.join(member)

    def leave(self, member: FeedMember) -> None:
        self.subscriptions.leave(member)
        self._update_flow()

    def subscribe(self, member: FeedMember, sub: SubscriptionLike) -> list[bytes]:
        """Register ``sub`` for ``member``; the gateway records that answer it, in order
        (see ``SubscriptionIndex.subscribe``): what fits in one slice is returned, the rest
        is written to the member by later slices."""
        return self.subscriptions.subscribe(member, sub)

    def member_blocked(self, member: FeedMember, blocked: bool) -> None:
        """A session's transport went over (or back under) its write-buffer high-water mark.
        A lossless feed stops reading its source while any session is over it; queued
        subscription work for the session waits until it is back under."""
        self.subscriptions.set_blocked(member, blocked)
        self._update_flow()

    def _update_flow(self) -> None:
        """Tell the source to stop reading while a lossless feed has a session over its
        high-water mark (counted as a pause) or a mapping burst is being learnt."""
        lossless = self.backpressure and (
            bool(self.subscriptions.blocked) or bool(self.remote_blocked_slots)
        )
        if lossless and self.paused_since is None:
            self.paused_since = time.monotonic()
            self.pauses += 1
        elif not lossless and self.paused_since is not None:
            self.paused_total_s += time.monotonic() - self.paused_since
            self.paused_since = None
        want = lossless or self.sink_blocked or bool(self._learning) or bool(self._held)
        if want != self._flow_paused:
            self._flow_paused = want
            for listener in self.flow_listeners:
                listener(want)

    @property
    def paused(self) -> bool:
        """The source should not read now (see ``_update_flow``)."""
        return self._flow_paused

    @property
    def settled(self) -> bool:
        """Every chunk published so far has gone through (none held behind mappings)."""
        return not self._learning and not self._held

    @property
    def holding(self) -> bool:
        """Chunks are held behind a mapping burst being learnt."""
        return bool(self._held)

    def set_sink_blocked(self, blocked: bool) -> None:
        """Supervisor (``--workers``): the dataset's ring is full (True) or has room again;
        the source is paused meanwhile (``flow_listeners``)."""
        if blocked != self.sink_blocked:
            self.sink_blocked = blocked
            self._update_flow()

    def remote_blocked(self, slot: int, blocked: bool) -> None:
        """Supervisor (``--workers``): worker ``slot`` has a session of this lossless feed
        over its high-water mark (True) or none any more; a dead worker's slot is cleared
        with False. The source pauses while any worker says so (counted as a lossless
        pause)."""
        slots = self.remote_blocked_slots
        if blocked == (slot in slots):
            return
        if blocked:
            slots.add(slot)
        else:
            slots.discard(slot)
        self._update_flow()

    def serves(self, schema: str) -> bool:
        """False when this feed is known never to carry ``schema``: its source declared
        other schemas, or its Metadata decided tbbo vs mbp-1 the other way. A schema
        derived from MBO is served where the books derive it and MBO may come."""
        books = self.books
        if books is not None and books.derives(schema):
            if self.schemas is None or "mbo" in self.schemas:
                return self.schema_rtype.get(schema, -1) >= 0
        if not self._metadata_seen and self.schemas is None:
            return True
        if self.schema_rtype.get(schema, -1) < 0:
            return False
        return self.schemas is None or schema in self.schemas

    # --- order books (gateway/books) ------------------------------------------------------

    def attach_books(self, books: FeedBooks) -> None:
        """Build books from this feed's MBO records; serve snapshots and derived schemas."""
        self.books = books
        if self.schema_rtype["tbbo"] < 0:
            self.schema_rtype["tbbo"] = self._derived_tbbo_key()
        self.fanout.on_place = self._placed

    def _derived_tbbo_key(self) -> int:
        books = self.books
        return TBBO_KEY if books is not None and books.derive else -1

    def snapshots_available(self) -> bool:
        return self.books is not None and self.books.on

    def books_off_reason(self) -> str:
        books = self.books
        if books is None:
            return self.no_books_reason
        return f"order books are off for this dataset ({books.counters.off_reason})"

    def _placed(self, member: Subscriber, old: OutputSpec | None, new: OutputSpec) -> None:
        """A member's fan-out selection changed: a session that asked for a snapshot gets
        the books of the instruments that just joined its MBO selection, taken now,
        between two chunks (the next chunk it is sent follows them exactly)."""
        books = self.books
        if books is None or not getattr(member, "snapshot_wanted", False):
            return
        before = _mbo_selection(old)
        after = _mbo_selection(new)
        if after is _NONE or after == before or before is None:
            return
        exclude: frozenset[int] = frozenset()
        ids: frozenset[int] | None
        if after is None:
            ids, exclude = None, frozenset() if before is _NONE else before
        else:
            ids = after if before is _NONE else after - before
            if not ids:
                return
        try:
            data, count = books.snapshot(ids, self._clock_ns())
        except BooksUnavailable as exc:  # dropped since the subscription was accepted
            member.snapshot_refused(f"order books are off for this dataset ({exc})")  # type: ignore[attr-defined]
            return
        except (SnapshotTooLarge, SnapshotUnverified) as exc:
            member.snapshot_refused(str(exc))  # type: ignore[attr-defined]
            return
        if exclude and data:
            data, count = _without_instruments(data, exclude)
        member.snapshot_ready(data, count)  # type: ignore[attr-defined]

    # --- bounded work ---------------------------------------------------------------------

    def _request_drain(self) -> None:
        if self._drain_pending:
            return
        schedule = self._schedule
        if schedule is None:
            try:
                schedule = asyncio.get_running_loop().call_soon
            except RuntimeError:
                # No loop (unit tests, tools): do it all now.
                while self._has_work():
                    self.drain_slice()
                return
        self._drain_pending = True
        schedule(self._scheduled_drain)

    def _has_work(self) -> bool:
        return bool(self._learning) or self.subscriptions.has_work()

    def _scheduled_drain(self) -> None:
        self._drain_pending = False
        self.drain_slice()

    def drain_slice(self) -> None:
        """Do at most ``slice_size`` units of queued work: mappings of a burst being learnt
        (then the chunks held behind them), then the sessions' subscription work,
        round-robin over the members that have some (blocked members wait); schedule the
        next slice."""
        budget = self.slice_size
        used = 0
        if self._learning:
            take = min(budget, len(self._learning))
            self._learn_now([self._learning.popleft() for _ in range(take)])
            used += take
        if self._held and not self._learning:
            on_held = self.on_held
            while self._held and not self._learning:
                index = self._held.popleft()
                if on_held is not None:
                    on_held(index)
                self._publish_now(index)
            if on_held is not None:
                on_held(None)
        if not self._learning and not self._held:
            self._update_flow()
        used = self.subscriptions.run(budget, used)
        self.slices += 1
        self.max_slice_units = max(self.max_slice_units, used)
        if self._has_work():
            self._request_drain()

    # --- symbology ----------------------------------------------------------------------

    def on_metadata(self, metadata: object, mappings: list[tuple[str, int]] | None = None) -> None:
        """Learn the feed's schema (tbbo vs mbp-1) and its symbol mappings (``mappings``
        when the source read them from the raw header, else from the decoded Metadata).
        A relay declares the schemas it subscribed to as one comma-separated name."""
        schema = getattr(metadata, "schema", None)
        name = str(getattr(schema, "value", schema) or "") if schema is not None else ""
        if self.on_schema is not None:
            self.on_schema(name)
        self._metadata_seen = True
        names = frozenset(name.split(","))
        self.schemas = names if names.issubset(dbn.SCHEMAS) else None
        tbbo = "tbbo" in names
        if (self.schema_rtype["tbbo"] == 0x01) != tbbo:
            self.schema_rtype["tbbo"] = 0x01 if tbbo else self._derived_tbbo_key()
            self.schema_rtype["mbp-1"] = -1 if tbbo else 0x01
            self.subscriptions.regroup_all()
        if mappings is None:
            mappings = mappings_in_metadata(metadata)
        self.learn_many(mappings)

    def learn_many(self, pairs: list[tuple[str, int]]) -> None:
        """Learn mappings; the subscription index queues a SymbolMappingMsg for every session
        that named the symbol (or its instrument id) or follows ALL_SYMBOLS: work
        proportional to what is new and who asked for it, done in bounded slices. A burst
        larger than a slice is itself learnt in slices (the source paused, its chunks held
        until it is done)."""
        if self._learning or (len(pairs) > self.slice_size and self._can_defer()):
            self._learning.extend(pairs)
            self._update_flow()
            self._request_drain()
            return
        self._learn_now(pairs)
        self.drain_slice()

    def _can_defer(self) -> bool:
        if self._schedule is not None:
            return True
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return False
        return True

    def _learn_now(self, pairs: list[tuple[str, int]]) -> None:
        changed = self.directory.learn_many(pairs)
        journal = self.journal
        if journal is not None and changed:
            journal.learn(changed, ts=self.stats.last_ts_event or None)
        if changed and self.on_learned is not None:
            self.on_learned(changed)
        self.subscriptions.announce(changed)

    # --- data -----------------------------------------------------------------------------

    def publish(self, index: ChunkIndex) -> None:
        """Fan one chunk of whole records out to every session that wants part of it."""
        if index.count == 0:
            return
        stats = self.stats
        stats.records_in += index.count
        stats.bytes_in += index.nbytes
        stats.chunks_in += 1
        stats.last_ts_event = int(index.ts_events[-1])
        stats.last_record_at = time.time()
        if self._learning or self._held:
            self._held.append(index)  # after the mappings being learnt (source paused)
            return
        self._publish_now(index)

    def _publish_now(self, index: ChunkIndex) -> None:
        if self.reference_listeners and index.rtype_set & REFERENCE_RTYPES:
            # definitions and statistics, before the chunk's records flow (a new listing
            # that matches a parent subscription is selected for this very chunk)
            for listener in self.reference_listeners:
                listener(index)
        if index.rtype_set & SYMBOLOGY_RTYPES:
            if index in self._learnt_held:
                # Held behind its own definitions, now learnt: learning them again would
                # start the same burst again and hold it for ever.
                self._learnt_held.discard(index)
            else:
                self.learn_many(mappings_in_chunk(index))
                index = without_gateway_records(index)
                if index.count == 0:
                    return
                if self._learning:
                    self._held.appendleft(index)  # its definitions are being learnt
                    self._learnt_held.add(index)
                    self._update_flow()
                    return
        journal = self.journal
        if journal is not None:
            # write-ahead: on file before any session is sent it (its seq for a RingSink)
            self.journal_seq = journal.append(index)
        self.fanout.publish(index)
        if self.books is not None:
            self.books.on_chunk(index)  # the books, then the derived schemas' records

    # --- feed health ----------------------------------------------------------------------

    def set_state(self, connected: bool, detail: str, notify: bool = True) -> None:
        """Record a feed state change; tell every streaming session with a SystemMsg."""
        changed = connected != self.connected or detail != self.state_detail
        if connected != self.connected:
            if connected:
                self.ups += 1
            else:
                self.downs += 1
        self.connected = connected
        self.state_detail = detail
        if changed:
            (log.info if connected else log.warning)(
                "feed %s %s: %s", self.dataset, "up" if connected else "down", detail
            )
            if self.on_state is not None:
                self.on_state(connected, detail, notify)
        if changed and notify and self.subscriptions:
            msg = dbn.encode_system(
                self._clock_ns(), f"Feed {self.dataset}: {detail}"[:300], SystemCode.UNSET
            )
            for member in self.subscriptions.members:
                member.send_gateway_records([msg])
