"""Per-dataset feed state: the symbol directory, the sessions' interests, the fan-out.

Sources (synthetic, file, ingest) push two things into a Feed: chunks of whole DBN v3
records (``publish``) and symbology (``on_metadata`` / records carrying it). The Feed
learns raw symbol <-> instrument_id from Metadata mappings, SymbolMappingMsg and
InstrumentDefMsg records, strips gateway-only records from the data, answers each new
subscription with its ack / mappings / resolution errors, and turns every session's
subscriptions into a fan-out selection. It never knows about sockets.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import numpy as np

from gateway import dbn
from gateway.control import ALL_SYMBOLS
from gateway.dbn import (
    GATEWAY_RTYPES,
    RTYPE_DEF,
    RTYPE_SYMBOL_MAPPING,
    STYPE_INSTRUMENT_ID,
    STYPE_RAW_SYMBOL,
    ChunkIndex,
    ErrorCode,
    SystemCode,
)
from gateway.fanout import FanOut, OutputSpec, Payload, make_selection
from gateway.session import Subscription

__all__ = ["Feed", "FeedMember", "FeedStats", "SymbolDirectory"]

log = logging.getLogger("gateway.feed")

_K = TypeVar("_K", str, int)

_SYMBOLOGY_RTYPES = np.array(sorted(GATEWAY_RTYPES | {RTYPE_DEF}), dtype=np.uint8)
_STRIP_RTYPES = np.array(sorted(GATEWAY_RTYPES), dtype=np.uint8)


class FeedMember(Protocol):
    """What a Feed needs from a streaming session (implemented by the adapter)."""

    ts_out: bool
    zstd: bool

    def deliver(self, data: Payload, records: int) -> None: ...

    def send_gateway_records(self, records: list[bytes]) -> None: ...


class SymbolDirectory:
    """raw_symbol <-> instrument_id for one dataset, as learnt from the feed."""

    def __init__(self) -> None:
        self.by_symbol: dict[str, int] = {}
        self.by_id: dict[int, str] = {}

    def learn(self, symbol: str, instrument_id: int) -> bool:
        """Record a mapping; True if it is new or changed."""
        symbol = symbol.strip()
        if not symbol or self.by_symbol.get(symbol) == instrument_id:
            return False
        old = self.by_symbol.get(symbol)
        if old is not None and self.by_id.get(old) == symbol:
            del self.by_id[old]
        self.by_symbol[symbol] = instrument_id
        self.by_id[instrument_id] = symbol
        return True

    def __len__(self) -> int:
        return len(self.by_symbol)


class _Interest:
    """One streaming session's subscriptions, resolved against the directory.

    Work for the session (acks, SymbolMappingMsgs, resolution errors) is queued in
    ``jobs`` and done in bounded slices (``Feed.slice_size`` units each), so a session
    with 100,000 symbols, or a burst of 100,000 new mappings, never holds the event loop.
    Its fan-out selection grows as its mappings are written: records of an instrument
    never reach it before the instrument's SymbolMappingMsg.
    """

    __slots__ = (
        "subscriptions",
        "announced",
        "all_cursor",
        "all_schemas",
        "named",
        "key_schemas",
        "counts",
        "jobs",
        "catch_up_queued",
        "dirty",
    )

    def __init__(self) -> None:
        self.subscriptions: list[Subscription] = []
        #: (stype, stype_in_symbol) -> instrument_id announced for a named symbol
        self.announced: dict[tuple[int, str], int] = {}
        #: stype -> position in the feed's mapping log up to which ALL_SYMBOLS is announced
        self.all_cursor: dict[int, int] = {}
        #: schemas subscribed with ALL_SYMBOLS whose mappings have been sent
        self.all_schemas: set[str] = set()
        #: (stype, named symbol) -> the instrument it selects now
        self.named: dict[tuple[int, str], int] = {}
        #: (stype, named symbol) -> the schemas it was named for
        self.key_schemas: dict[tuple[int, str], set[str]] = {}
        #: schema -> instrument id -> how many named symbols select it (the selection)
        self.counts: dict[str, dict[int, int]] = {}
        self.jobs: deque[_Job] = deque()
        self.catch_up_queued: set[int] = set()
        self.dirty = False


@dataclass
class _Emit:
    """Gateway records to write, in order (an ack, coalesced errors): one unit each."""

    records: list[bytes]


@dataclass
class _Resolve:
    """Resolve a subscription's named symbols, ``pos`` onwards: one unit per symbol."""

    sub: Subscription
    stype: int
    pos: int = 0
    unresolved: list[str] = field(default_factory=list)


@dataclass
class _CatchUp:
    """Announce the mapping log to an ALL_SYMBOLS session: one unit per log entry."""

    stype: int


@dataclass
class _Activate:
    """An ALL_SYMBOLS subscription's mappings are out: start its records."""

    schema: str


@dataclass
class _Announce:
    """A symbol a session named was learnt (or remapped)."""

    stype: int
    symbol: str
    instrument_id: int


_Job = _Emit | _Resolve | _CatchUp | _Activate | _Announce

#: how many symbols one coalesced resolution ErrorMsg names at most (its text fits 301 bytes)
_ERROR_TEXT = 301
_MAX_SYMBOL_IN_ERROR = _ERROR_TEXT - len("Failed to resolve symbols: ")


def resolution_errors(now: int, symbols: list[str]) -> list[bytes]:
    """SYMBOL_RESOLUTION_FAILED ErrorMsgs for ``symbols``, coalesced: "Failed to resolve
    symbol: X" for one, else "Failed to resolve symbols: X, Y, Z" with as many as fit in
    one record's text (a symbol too long for one on its own is cut, with "..."); is_last
    on the final record only."""
    texts: list[str] = []
    names: list[str] = []
    size = 0
    for symbol in symbols:
        if len(symbol) > _MAX_SYMBOL_IN_ERROR:
            symbol = symbol[: _MAX_SYMBOL_IN_ERROR - 3] + "..."
        name = symbol
        if names and len("Failed to resolve symbols: ") + size + 2 + len(name) > _ERROR_TEXT:
            texts.append(_resolution_text(names))
            names, size = [], 0
        size += len(name) + (2 if names else 0)
        names.append(name)
    if names:
        texts.append(_resolution_text(names))
    return [
        dbn.encode_error(now, text, ErrorCode.SYMBOL_RESOLUTION_FAILED, is_last=i == len(texts) - 1)
        for i, text in enumerate(texts)
    ]


def _resolution_text(names: list[str]) -> str:
    if len(names) == 1:
        return f"Failed to resolve symbol: {names[0]}"
    return "Failed to resolve symbols: " + ", ".join(names)


def _name(interest: _Interest, stype: int, key: str, schema: str) -> None:
    """``key`` is named for ``schema``: if it already resolved, select its instrument."""
    schemas = interest.key_schemas.setdefault((stype, key), set())
    if schema in schemas:
        return
    schemas.add(schema)
    iid = interest.named.get((stype, key))
    if iid is not None:
        _count(interest, schema, iid, 1)


def _count(interest: _Interest, schema: str, iid: int, delta: int) -> None:
    counts = interest.counts.setdefault(schema, {})
    n = counts.get(iid, 0) + delta
    if n > 0:
        if iid not in counts:
            interest.dirty = True
        counts[iid] = n
    elif iid in counts:
        del counts[iid]
        interest.dirty = True


def _stype_of(sub: Subscription) -> int:
    return STYPE_RAW_SYMBOL if sub.stype_in == "raw_symbol" else STYPE_INSTRUMENT_ID


@dataclass
class FeedStats:
    records_in: int = 0
    bytes_in: int = 0
    chunks_in: int = 0
    last_ts_event: int = 0
    last_record_at: float = 0.0


#: units of subscription work (symbols resolved, mappings announced) per event-loop turn
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
        self._interests: dict[FeedMember, _Interest] = {}
        self._blocked: set[FeedMember] = set()
        #: called with True when a lossless feed must stop reading its source, False to resume
        self.flow_listeners: list[Callable[[bool], None]] = []
        self.paused_since: float | None = None
        self.paused_total_s = 0.0
        self.pauses = 0
        #: rtype 0x01 means mbp-1 unless the feed's Metadata declares tbbo
        self.schema_rtype: dict[str, int] = dict(dbn.SCHEMA_RTYPE)
        self.schema_rtype["tbbo"] = -1
        #: the schemas this feed's source declares it carries (None: unknown or mixed)
        self.schemas: frozenset[str] | None = None
        self._metadata_seen = False
        # The symbol index: who named which symbol (computed once per subscription), and
        # the log of every mapping learnt, which ALL_SYMBOLS sessions follow with a cursor.
        self._want_raw: dict[str, set[FeedMember]] = {}
        self._want_iid: dict[int, set[FeedMember]] = {}
        self._all_members: dict[FeedMember, None] = {}
        self._log: list[tuple[str, int]] = []
        self._latest: dict[str, int] = {}
        # Bounded work: members with queued jobs, drained slice by slice.
        self.slice_size = max(1, slice_size)
        self._schedule = schedule
        self._work: dict[FeedMember, None] = {}
        self._drain_pending = False
        # A burst of mappings larger than a slice is learnt slice by slice while the source
        # is paused and its chunks are held, so records never overtake their mappings.
        self._learning: deque[tuple[str, int]] = deque()
        self._held: deque[ChunkIndex] = deque()
        self._flow_paused = False
        #: slices run and the most units any one slice handled (observability, tests)
        self.slices = 0
        self.max_slice_units = 0

    # --- sessions -------------------------------------------------------------------

    @property
    def members(self) -> list[FeedMember]:
        return list(self._interests)

    def join(self, member: FeedMember) -> None:
        if member not in self._interests:
            self._interests[member] = _Interest()

    def leave(self, member: FeedMember) -> None:
        interest = self._interests.pop(member, None)
        self.fanout.remove(member)
        self.member_blocked(member, False)
        self._work.pop(member, None)
        self._all_members.pop(member, None)
        if interest is None:
            return
        for sub in interest.subscriptions:
            if sub.all_symbols and len(sub.symbols) == 1:
                continue
            stype = _stype_of(sub)
            for symbol in sub.symbols:
                if symbol == ALL_SYMBOLS:
                    continue
                if stype == STYPE_RAW_SYMBOL:
                    _discard(self._want_raw, symbol, member)
                elif symbol.isdigit():
                    _discard(self._want_iid, int(symbol), member)

    def member_blocked(self, member: FeedMember, blocked: bool) -> None:
        """A session's transport went over (or back under) its write-buffer high-water mark.
        A lossless feed stops reading its source while any session is over it; queued
        subscription work for the session waits until it is back under."""
        if blocked:
            self._blocked.add(member)
        else:
            if member in self._blocked and member in self._work:
                self._request_drain()
            self._blocked.discard(member)
        self._update_flow()

    def _update_flow(self) -> None:
        """Tell the source to stop reading while a lossless feed has a session over its
        high-water mark (counted as a pause) or a mapping burst is being learnt."""
        lossless = self.backpressure and bool(self._blocked)
        if lossless and self.paused_since is None:
            self.paused_since = time.monotonic()
            self.pauses += 1
        elif not lossless and self.paused_since is not None:
            self.paused_total_s += time.monotonic() - self.paused_since
            self.paused_since = None
        want = lossless or bool(self._learning) or bool(self._held)
        if want != self._flow_paused:
            self._flow_paused = want
            for listener in self.flow_listeners:
                listener(want)

    @property
    def paused(self) -> bool:
        """The source should not read now (see ``_update_flow``)."""
        return self._flow_paused

    def serves(self, schema: str) -> bool:
        """False when this feed is known never to carry ``schema``: its source declared
        other schemas, or its Metadata decided tbbo vs mbp-1 the other way."""
        if not self._metadata_seen and self.schemas is None:
            return True
        if self.schema_rtype.get(schema, -1) < 0:
            return False
        return self.schemas is None or schema in self.schemas

    def subscribe(self, member: FeedMember, sub: Subscription) -> list[bytes]:
        """Register ``sub`` for ``member``; the gateway records that answer it, in order:
        SUBSCRIPTION_ACK (or a non-fatal ErrorMsg when this feed never carries the schema),
        one SymbolMappingMsg per resolved instrument, then the unresolved symbols in
        coalesced SYMBOL_RESOLUTION_FAILED ErrorMsgs (is_last on the final one).

        What fits in one slice is returned; the rest is written to the member by later
        slices (``send_gateway_records``), in the same order."""
        self.join(member)
        interest = self._interests[member]
        interest.subscriptions.append(sub)
        now = self._clock_ns()
        ident = f" {sub.sub_id}" if sub.sub_id is not None else ""
        if self.serves(sub.schema):
            first = dbn.encode_system(
                now,
                f"Subscription request{ident} for {sub.schema} data succeeded",
                SystemCode.SUBSCRIPTION_ACK,
            )
        else:
            first = dbn.encode_error(
                now,
                f"Subscription request{ident}: {sub.schema} data is not available from "
                f"dataset {self.dataset}",
                ErrorCode.INVALID_SUBSCRIPTION,
            )
        was_idle = not interest.jobs
        interest.jobs.append(_Emit([first]))
        stype = _stype_of(sub)
        if len(sub.symbols) > (1 if sub.all_symbols else 0):
            interest.jobs.append(_Resolve(sub, stype))
        if sub.all_symbols:
            self._all_members[member] = None
            interest.all_cursor.setdefault(stype, 0)
            self._queue_catch_up(interest, stype)
            interest.jobs.append(_Activate(sub.schema))
        self._work[member] = None
        if not was_idle:
            self._request_drain()
            return []
        records = self._run_member(member, interest, self.slice_size, collect=True)
        self._flush_dirty(member, interest)
        if interest.jobs:
            self._request_drain()
        return records

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
        return bool(self._learning) or any(m not in self._blocked for m in self._work)

    def _scheduled_drain(self) -> None:
        self._drain_pending = False
        self.drain_slice()

    def drain_slice(self) -> None:
        """Do at most ``slice_size`` units of queued subscription work, round-robin over
        the members that have some (blocked members wait); schedule the next slice."""
        budget = self.slice_size
        used = 0
        if self._learning:
            take = min(budget, len(self._learning))
            self._learn_now([self._learning.popleft() for _ in range(take)])
            used += take
        while self._held and not self._learning:
            self._publish_now(self._held.popleft())
        if not self._learning and not self._held:
            self._update_flow()
        for member in list(self._work):
            if used >= budget:
                break
            if member in self._blocked:
                continue
            interest = self._interests.get(member)
            if interest is None:
                self._work.pop(member, None)
                continue
            before = budget - used
            self._run_member(member, interest, before, collect=False)
            used += before - self._last_left
            self._flush_dirty(member, interest)
            if interest.jobs and member in self._work:
                # round robin: to the back of the line
                self._work.pop(member, None)
                self._work[member] = None
        self.slices += 1
        self.max_slice_units = max(self.max_slice_units, used)
        if self._has_work():
            self._request_drain()

    _last_left = 0

    def _run_member(
        self, member: FeedMember, interest: _Interest, budget: int, *, collect: bool
    ) -> list[bytes]:
        """Run ``member``'s jobs within ``budget`` units; its records are returned
        (``collect``) or written to it."""
        out: list[bytes] = []
        now = self._clock_ns()
        jobs = interest.jobs
        while jobs and budget > 0:
            job = jobs[0]
            if isinstance(job, _Emit):
                take = job.records[:budget]
                out += take
                del job.records[: len(take)]
                budget -= len(take)
                if not job.records:
                    jobs.popleft()
            elif isinstance(job, _Resolve):
                budget = self._resolve(member, interest, job, budget, now, out)
                if job.pos >= len(job.sub.symbols):
                    jobs.popleft()
                    if job.unresolved:
                        jobs.appendleft(_Emit(resolution_errors(now, job.unresolved)))
            elif isinstance(job, _CatchUp):
                budget = self._catch_up(interest, job.stype, budget, now, out)
                if interest.all_cursor[job.stype] >= len(self._log):
                    jobs.popleft()
                    interest.catch_up_queued.discard(job.stype)
            elif isinstance(job, _Activate):
                jobs.popleft()
                budget -= 1
                if job.schema not in interest.all_schemas:
                    interest.all_schemas.add(job.schema)
                    interest.dirty = True
            else:
                jobs.popleft()
                budget -= 1
                self._announce_named(interest, job.stype, job.symbol, job.instrument_id, now, out)
        self._last_left = budget
        if not jobs:
            self._work.pop(member, None)
        if collect:
            return out
        if out:
            member.send_gateway_records(out)
        return []

    def _resolve(
        self,
        member: FeedMember,
        interest: _Interest,
        job: _Resolve,
        budget: int,
        now: int,
        out: list[bytes],
    ) -> int:
        symbols = job.sub.symbols
        schema = job.sub.schema
        stype = job.stype
        directory = self.directory
        end = min(len(symbols), job.pos + budget)
        for symbol in symbols[job.pos : end]:
            if symbol == ALL_SYMBOLS:
                continue
            if stype == STYPE_RAW_SYMBOL:
                self._want_raw.setdefault(symbol, set()).add(member)
                _name(interest, stype, symbol, schema)
                found = directory.by_symbol.get(symbol)
                if found is None:
                    job.unresolved.append(symbol)
                    continue
                iid, raw = found, symbol
            else:
                iid = int(symbol)
                self._want_iid.setdefault(iid, set()).add(member)
                if (stype, symbol) not in interest.named:
                    interest.named[(stype, symbol)] = iid
                _name(interest, stype, symbol, schema)
                known = directory.by_id.get(iid)
                if known is None:
                    continue
                raw = known
            self._announce_named(interest, stype, raw, iid, now, out)
        budget -= end - job.pos
        job.pos = end
        return budget

    def _announce_named(
        self, interest: _Interest, stype: int, raw: str, iid: int, now: int, out: list[bytes]
    ) -> None:
        """A named symbol resolved: select its instrument and announce it (once; an
        ALL_SYMBOLS subscription of the same stype announces it on its own)."""
        key = raw if stype == STYPE_RAW_SYMBOL else str(iid)
        prev = interest.named.get((stype, key))
        if prev != iid:
            interest.named[(stype, key)] = iid
            for schema in interest.key_schemas.get((stype, key), ()):
                _count(interest, schema, iid, 1)
                if prev is not None:
                    _count(interest, schema, prev, -1)
        if stype in interest.all_cursor or interest.announced.get((stype, key)) == iid:
            return
        interest.announced[(stype, key)] = iid
        out.append(dbn.encode_symbol_mapping(now, iid, stype, key, raw, now))

    def _catch_up(
        self, interest: _Interest, stype: int, budget: int, now: int, out: list[bytes]
    ) -> int:
        log_ = self._log
        latest = self._latest
        announced = interest.announced
        pos = interest.all_cursor[stype]
        end = min(len(log_), pos + budget)
        for i in range(pos, end):
            raw, iid = log_[i]
            if latest.get(raw) != i:
                continue  # remapped since: its latest entry comes later
            key = raw if stype == STYPE_RAW_SYMBOL else str(iid)
            if announced.get((stype, key)) == iid:
                continue
            out.append(dbn.encode_symbol_mapping(now, iid, stype, key, raw, now))
        interest.all_cursor[stype] = end
        return budget - (end - pos)

    def _queue_catch_up(self, interest: _Interest, stype: int) -> None:
        if stype not in interest.catch_up_queued:
            interest.catch_up_queued.add(stype)
            interest.jobs.append(_CatchUp(stype))

    def _flush_dirty(self, member: FeedMember, interest: _Interest) -> None:
        if self._interests.get(member) is not interest:
            self._work.pop(member, None)  # it left (or was cut) while being written to
            return
        if interest.dirty:
            interest.dirty = False
            self._regroup(member, interest)

    def _selection_of(self, interest: _Interest) -> dict[int, set[int] | None]:
        wanted: dict[int, set[int] | None] = {}
        for schema in interest.all_schemas:
            rtype = self.schema_rtype.get(schema, -1)
            if rtype >= 0:
                wanted[rtype] = None
        for schema, counts in interest.counts.items():
            rtype = self.schema_rtype.get(schema, -1)
            if rtype < 0 or not counts:
                continue
            have = wanted.get(rtype, set())
            if have is None:
                continue
            wanted[rtype] = have | counts.keys()
        return wanted

    def _regroup(self, member: FeedMember, interest: _Interest) -> None:
        spec = OutputSpec(make_selection(self._selection_of(interest)), member.ts_out, member.zstd)
        self.fanout.place(member, spec)

    # --- symbology ----------------------------------------------------------------------

    def on_metadata(self, metadata: object, mappings: list[tuple[str, int]] | None = None) -> None:
        """Learn the feed's schema (tbbo vs mbp-1) and its symbol mappings (``mappings``
        when the source read them from the raw header, else from the decoded Metadata)."""
        schema = getattr(metadata, "schema", None)
        name = str(getattr(schema, "value", schema) or "") if schema is not None else ""
        self._metadata_seen = True
        self.schemas = frozenset({name}) if name in dbn.SCHEMAS else None
        tbbo = name == "tbbo"
        if (self.schema_rtype["tbbo"] == 0x01) != tbbo:
            self.schema_rtype["tbbo"] = 0x01 if tbbo else -1
            self.schema_rtype["mbp-1"] = -1 if tbbo else 0x01
            for member, interest in list(self._interests.items()):
                self._regroup(member, interest)
        if mappings is not None:
            self.learn_many(mappings)
            return
        decoded = getattr(metadata, "mappings", None) or {}
        learned: list[tuple[str, int]] = []
        for symbol, intervals in decoded.items():
            if not intervals:
                continue
            target = str(intervals[-1].get("symbol", ""))
            if target.isdigit():
                learned.append((str(symbol), int(target)))
        self.learn_many(learned)

    def learn_many(self, pairs: list[tuple[str, int]]) -> None:
        """Learn mappings; queue a SymbolMappingMsg for every session that named the symbol
        (or its instrument id) or follows ALL_SYMBOLS: work proportional to what is new and
        who asked for it, done in bounded slices. A burst larger than a slice is itself
        learnt in slices (the source paused, its chunks held until it is done)."""
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
        directory = self.directory
        changed: list[tuple[str, int]] = []
        for symbol, iid in pairs:
            if directory.learn(symbol, iid):
                symbol = symbol.strip()
                self._latest[symbol] = len(self._log)
                self._log.append((symbol, iid))
                changed.append((symbol, iid))
        if not changed or not self._interests:
            return
        interests = self._interests
        for symbol, iid in changed:
            for member in self._want_raw.get(symbol, ()):
                interest = interests.get(member)
                if interest is not None:
                    interest.jobs.append(_Announce(STYPE_RAW_SYMBOL, symbol, iid))
                    self._work[member] = None
            for member in self._want_iid.get(iid, ()):
                interest = interests.get(member)
                if interest is not None:
                    interest.jobs.append(_Announce(STYPE_INSTRUMENT_ID, symbol, iid))
                    self._work[member] = None
        for member in self._all_members:
            interest = interests[member]
            for stype in interest.all_cursor:
                self._queue_catch_up(interest, stype)
            self._work[member] = None

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
        present = index.rtype_set
        if present & (GATEWAY_RTYPES | {RTYPE_DEF}):
            index = self._take_symbology(index)
            if index.count == 0:
                return
            if self._learning:
                self._held.appendleft(index)  # its definitions are being learnt
                self._update_flow()
                return
        self.fanout.publish(index)

    def _take_symbology(self, index: ChunkIndex) -> ChunkIndex:
        hits = np.flatnonzero(np.isin(index.rtypes, _SYMBOLOGY_RTYPES))
        learned: list[tuple[str, int]] = []
        data = index.data
        for i in hits.tolist():
            off = int(index.offsets[i])
            rec = data[off : off + int(index.lengths[i])]
            rtype = int(index.rtypes[i])
            iid = int(index.instrument_ids[i])
            if rtype == RTYPE_DEF:
                symbol = dbn.symbol_from_definition(rec)
                if symbol:
                    learned.append((symbol, iid))
            elif rtype == RTYPE_SYMBOL_MAPPING:
                _, out_symbol = dbn.symbols_from_mapping(rec)
                if out_symbol:
                    learned.append((out_symbol, iid))
        self.learn_many(learned)
        strip = np.isin(index.rtypes, _STRIP_RTYPES)
        if not strip.any():
            return index
        kept = index.select(~strip)
        new_index, _ = dbn.index_records(kept)
        return new_index

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
        if changed and notify and self._interests:
            msg = dbn.encode_system(
                self._clock_ns(), f"Feed {self.dataset}: {detail}"[:300], SystemCode.UNSET
            )
            for member in list(self._interests):
                member.send_gateway_records([msg])


def _discard(index: dict[_K, set[FeedMember]], key: _K, member: FeedMember) -> None:
    members = index.get(key)
    if members is not None:
        members.discard(member)
        if not members:
            del index[key]
