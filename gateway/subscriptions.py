"""The subscription index of one dataset: who asked for what, and what each is owed.

For every streaming session (a ``FeedMember``) the index keeps its subscriptions resolved
against the dataset's ``SymbolDirectory``, answers each new subscription (ack, one
SymbolMappingMsg per resolved instrument, coalesced resolution errors), announces mappings
learnt later to the sessions that named the symbol (or its instrument id) or follow
ALL_SYMBOLS, and places each session in the fan-out group of its selection.

Work for a session is queued and done in bounded slices (``run(budget)``), so a session
with 100,000 symbols, or a burst of 100,000 new mappings, never holds the event loop; when
to run a slice is the owner's call (``request_drain``, given by the Feed). Records of an
instrument never reach a session before the instrument's SymbolMappingMsg: its fan-out
selection grows only as its mappings are written. Nothing here awaits or does I/O.

Parent and continuous subscriptions (``stype_in=parent|continuous``) resolve through the
``SmartResolver`` (gateway/smart_symbols.py), which learns from the feed's definitions and
statistics in ``on_reference`` — called by the Feed with every chunk carrying them, before
the chunk is published. Each instrument a smart symbol resolves to gets a SymbolMappingMsg
(``stype_in_symbol`` = the smart symbol, normalised) and is selected; a later listing that
joins a parent is mapped and selected before the chunk that lists it flows (within one slice
of work; a session with work already queued gets it after that work); a continuous symbol
maps once and is never remapped while the session lives, and one that did not resolve maps
when it first does. A symbol that does not resolve is answered as an unknown raw symbol is.

Why one module: raw, instrument-id and smart symbols share each member's job queue, its
selection counts and the slice budget — the order of a session's gateway records and the
growth of its selection are one state; the parts without sessions live elsewhere
(``interest`` for the per-session data, ``smart_symbols`` for the resolver).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Protocol, TypeVar

from gateway import dbn
from gateway.control import ALL_SYMBOLS
from gateway.dbn import STYPE_INSTRUMENT_ID, STYPE_RAW_SYMBOL, ChunkIndex, ErrorCode, SystemCode
from gateway.fanout import FanOut, OutputSpec, Payload, make_selection
from gateway.interest import (
    Activate,
    Announce,
    CatchUp,
    Emit,
    Interest,
    Resolve,
    SmartMap,
    SubscriptionLike,
    resolution_errors,
    smart_stype,
    stype_of,
)
from gateway.smart_symbols import (
    STYPE_CONTINUOUS,
    STYPE_PARENT,
    SmartResolver,
    SmartSymbolError,
    encode_mappings,
    parse_smart,
)
from gateway.symbology import SymbolDirectory

__all__ = ["FeedMember", "SubscriptionIndex", "SubscriptionLike", "resolution_errors"]

_SMART_STYPES = frozenset({STYPE_CONTINUOUS, STYPE_PARENT})

_K = TypeVar("_K", str, int)


class FeedMember(Protocol):
    """What a Feed needs from a streaming session (implemented by the adapter)."""

    ts_out: bool
    zstd: bool

    def deliver(self, data: Payload, records: int) -> None: ...

    def send_gateway_records(self, records: list[bytes]) -> None: ...


def _discard(index: dict[_K, set[FeedMember]], key: _K, member: FeedMember) -> None:
    members = index.get(key)
    if members is not None:
        members.discard(member)
        if not members:
            del index[key]


class SubscriptionIndex:
    """Subscriptions of one dataset's sessions, and the work owed to them.

    ``schema_rtype`` (schema -> rtype, negative when the feed never carries it) and
    ``serves`` are the feed's, read as they change; ``request_drain`` asks the owner to
    call ``run`` soon (it may call it at once)."""

    def __init__(
        self,
        dataset: str,
        directory: SymbolDirectory,
        fanout: FanOut,
        *,
        schema_rtype: Mapping[str, int],
        serves: Callable[[str], bool],
        clock_ns: Callable[[], int],
        slice_size: int,
        request_drain: Callable[[], None],
    ) -> None:
        self.dataset = dataset
        self.directory = directory
        self.fanout = fanout
        self.schema_rtype = schema_rtype
        self._serves = serves
        self._clock_ns = clock_ns
        self.slice_size = slice_size
        self._request_drain = request_drain
        self._interests: dict[FeedMember, Interest] = {}
        #: members over their transport's high-water mark: their work waits
        self.blocked: set[FeedMember] = set()
        # Who named which symbol (computed once per subscription) and who follows every
        # mapping (ALL_SYMBOLS, with a cursor into the directory's log).
        self.want_raw: dict[str, set[FeedMember]] = {}
        self.want_iid: dict[int, set[FeedMember]] = {}
        self._all_members: dict[FeedMember, None] = {}
        #: members with queued jobs, in round-robin order
        self.work: dict[FeedMember, None] = {}
        #: parent and continuous symbology: what the feed's reference records taught, and
        #: which members subscribed a smart symbol on which root
        self.smart = SmartResolver()
        self.want_root: dict[str, set[FeedMember]] = {}
        self._last_reference: ChunkIndex | None = None

    # --- members ----------------------------------------------------------------------

    @property
    def members(self) -> list[FeedMember]:
        return list(self._interests)

    def __contains__(self, member: object) -> bool:
        return member in self._interests

    def __bool__(self) -> bool:
        return bool(self._interests)

    def join(self, member: FeedMember) -> None:
        if member not in self._interests:
            self._interests[member] = Interest()

    def leave(self, member: FeedMember) -> None:
        """Forget ``member``: its fan-out place, queued work and index entries."""
        interest = self._interests.pop(member, None)
        self.fanout.remove(member)
        self.set_blocked(member, False)
        self.work.pop(member, None)
        self._all_members.pop(member, None)
        if interest is None:
            return
        for root in interest.smart_roots:
            _discard(self.want_root, root, member)
        for sub in interest.subscriptions:
            if sub.all_symbols and len(sub.symbols) == 1:
                continue
            stype = stype_of(sub)
            for symbol in sub.symbols:
                if symbol == ALL_SYMBOLS:
                    continue
                if stype == STYPE_RAW_SYMBOL:
                    _discard(self.want_raw, symbol, member)
                elif symbol.isdigit():
                    _discard(self.want_iid, int(symbol), member)

    def set_blocked(self, member: FeedMember, blocked: bool) -> None:
        """``member`` went over (or back under) its write-buffer high-water mark; its queued
        work waits while it is over."""
        if blocked:
            self.blocked.add(member)
        else:
            if member in self.blocked and member in self.work:
                self._request_drain()
            self.blocked.discard(member)

    def regroup_all(self) -> None:
        """``schema_rtype`` changed: place every member again."""
        for member, interest in list(self._interests.items()):
            self._regroup(member, interest)

    # --- subscriptions ----------------------------------------------------------------

    def subscribe(self, member: FeedMember, sub: SubscriptionLike) -> list[bytes]:
        """Register ``sub`` for ``member``; the gateway records that answer it, in order:
        SUBSCRIPTION_ACK (or a non-fatal ErrorMsg when the feed never carries the schema),
        one SymbolMappingMsg per resolved instrument, then the unresolved symbols in
        coalesced SYMBOL_RESOLUTION_FAILED ErrorMsgs (is_last on the final one).

        What fits in one slice is returned; the rest is written to the member by later
        slices (``send_gateway_records``), in the same order."""
        self.join(member)
        interest = self._interests[member]
        interest.subscriptions.append(sub)
        first = self.answer(sub)
        was_idle = not interest.jobs
        interest.jobs.append(Emit([first]))
        stype = stype_of(sub)
        if len(sub.symbols) > (1 if sub.all_symbols else 0):
            interest.jobs.append(Resolve(sub, smart_stype(sub) or stype))
        if sub.all_symbols:
            self._all_members[member] = None
            interest.all_cursor.setdefault(stype, 0)
            interest.queue_catch_up(stype)
            interest.jobs.append(Activate(sub.schema))
        self.work[member] = None
        if not was_idle:
            self._request_drain()
            return []
        records, _ = self._run_member(member, interest, self.slice_size, collect=True)
        self._flush_dirty(member, interest)
        if interest.jobs:
            self._request_drain()
        return records

    def answer(self, sub: SubscriptionLike) -> bytes:
        """The record that answers ``sub`` first: its SUBSCRIPTION_ACK, or a non-fatal
        ErrorMsg when the feed never carries its schema."""
        now = self._clock_ns()
        ident = f" {sub.sub_id}" if sub.sub_id is not None else ""
        if self._serves(sub.schema):
            return dbn.encode_system(
                now,
                f"Subscription request{ident} for {sub.schema} data succeeded",
                SystemCode.SUBSCRIPTION_ACK,
            )
        return dbn.encode_error(
            now,
            f"Subscription request{ident}: {sub.schema} data is not available from "
            f"dataset {self.dataset}",
            ErrorCode.INVALID_SUBSCRIPTION,
        )

    def handover(
        self,
        member: FeedMember,
        subs: Sequence[SubscriptionLike],
        announced: Mapping[tuple[int, str], int],
    ) -> list[bytes]:
        """A replaying session joins live (gateway/replay): ``subs`` were answered and
        their mappings sent by the replay (``announced``: (stype, symbol) -> instrument),
        up to the directory as it is now. Registers them as if acked and mapped (no ack;
        ALL_SYMBOLS followed from the directory's end on) and places ``member`` in the
        fan-out at once with its full selection, synchronously: the next chunk published
        reaches it. Returns the mappings the replay did not send (normally none), to be
        written before anything else."""
        self.join(member)
        interest = self._interests[member]
        interest.announced.update(announced)
        now = self._clock_ns()
        out: list[bytes] = []
        ordered = sorted(subs, key=lambda sub: not sub.all_symbols)
        for sub in ordered:  # ALL_SYMBOLS first: its stype's named symbols need no mapping
            interest.subscriptions.append(sub)
            if sub.all_symbols:
                stype = stype_of(sub)
                self._all_members[member] = None
                interest.all_cursor[stype] = len(self.directory.log)
                interest.all_schemas.add(sub.schema)
                interest.dirty = True
        for sub in ordered:
            if len(sub.symbols) > (1 if sub.all_symbols else 0):
                smart = smart_stype(sub)
                job = Resolve(sub, smart or stype_of(sub))
                while job.pos < len(sub.symbols):
                    self._resolve(member, interest, job, len(sub.symbols), now, out)
                if smart is not None and job.unresolved:
                    # a replay does not resolve smart symbols: their errors come from here
                    out += resolution_errors(now, job.unresolved)
        interest.dirty = False
        self._regroup(member, interest)
        return out

    def announce(self, changed: list[tuple[str, int]]) -> None:
        """Mappings the directory just learnt (new or changed): queue a SymbolMappingMsg for
        every member that named the symbol or its instrument id, and a catch-up for every
        ALL_SYMBOLS member."""
        if not changed or not self._interests:
            return
        interests = self._interests
        for symbol, iid in changed:
            for member in self.want_raw.get(symbol, ()):
                interest = interests.get(member)
                if interest is not None:
                    interest.jobs.append(Announce(STYPE_RAW_SYMBOL, symbol, iid))
                    self.work[member] = None
            for member in self.want_iid.get(iid, ()):
                interest = interests.get(member)
                if interest is not None:
                    interest.jobs.append(Announce(STYPE_INSTRUMENT_ID, symbol, iid))
                    self.work[member] = None
        for member in self._all_members:
            interest = interests[member]
            for stype in interest.all_cursor:
                interest.queue_catch_up(stype)
            self.work[member] = None

    # --- bounded work -----------------------------------------------------------------

    def has_work(self) -> bool:
        """Some member that is not blocked has queued work."""
        return any(m not in self.blocked for m in self.work)

    def run(self, budget: int, used: int = 0) -> int:
        """Do queued work, round-robin over the members that have some (blocked members
        wait), until ``used`` reaches ``budget`` units; the units used in all."""
        for member in list(self.work):
            if used >= budget:
                break
            if member in self.blocked:
                continue
            interest = self._interests.get(member)
            if interest is None:
                self.work.pop(member, None)
                continue
            before = budget - used
            _, left = self._run_member(member, interest, before, collect=False)
            used += before - left
            self._flush_dirty(member, interest)
            if interest.jobs and member in self.work:
                # round robin: to the back of the line
                self.work.pop(member, None)
                self.work[member] = None
        return used

    def _run_member(
        self, member: FeedMember, interest: Interest, budget: int, *, collect: bool
    ) -> tuple[list[bytes], int]:
        """Run ``member``'s jobs within ``budget`` units: its records are returned
        (``collect``) or written to it; and the budget left."""
        out: list[bytes] = []
        now = self._clock_ns()
        jobs = interest.jobs
        while jobs and budget > 0:
            job = jobs[0]
            if isinstance(job, Emit):
                take = job.records[:budget]
                out += take
                del job.records[: len(take)]
                budget -= len(take)
                if not job.records:
                    jobs.popleft()
            elif isinstance(job, Resolve):
                budget = self._resolve(member, interest, job, budget, now, out)
                if job.pos >= len(job.sub.symbols):
                    jobs.popleft()
                    if job.unresolved:
                        jobs.appendleft(Emit(resolution_errors(now, job.unresolved)))
            elif isinstance(job, CatchUp):
                budget = self._catch_up(interest, job.stype, budget, now, out)
                if interest.all_cursor[job.stype] >= len(self.directory.log):
                    jobs.popleft()
                    interest.catch_up_queued.discard(job.stype)
            elif isinstance(job, SmartMap):
                jobs.popleft()
                mapped = self._map_smart(interest, job.stype, job.symbol, job.found, now, out)
                budget -= max(1, mapped)
            elif isinstance(job, Activate):
                jobs.popleft()
                budget -= 1
                if job.schema not in interest.all_schemas:
                    interest.all_schemas.add(job.schema)
                    interest.dirty = True
            else:
                jobs.popleft()
                budget -= 1
                self._announce_named(interest, job.stype, job.symbol, job.instrument_id, now, out)
        if not jobs:
            self.work.pop(member, None)
        if collect:
            return out, budget
        if out:
            member.send_gateway_records(out)
        return [], budget

    def _resolve(
        self,
        member: FeedMember,
        interest: Interest,
        job: Resolve,
        budget: int,
        now: int,
        out: list[bytes],
    ) -> int:
        if job.stype in _SMART_STYPES:
            return self._resolve_smart(member, interest, job, budget, now, out)
        symbols = job.sub.symbols
        schema = job.sub.schema
        stype = job.stype
        directory = self.directory
        end = min(len(symbols), job.pos + budget)
        for symbol in symbols[job.pos : end]:
            if symbol == ALL_SYMBOLS:
                continue
            if stype == STYPE_RAW_SYMBOL:
                self.want_raw.setdefault(symbol, set()).add(member)
                interest.name(stype, symbol, schema)
                found = directory.by_symbol.get(symbol)
                if found is None:
                    job.unresolved.append(symbol)
                    continue
                iid, raw = found, symbol
            else:
                iid = int(symbol)
                self.want_iid.setdefault(iid, set()).add(member)
                if (stype, symbol) not in interest.named:
                    interest.named[(stype, symbol)] = iid
                interest.name(stype, symbol, schema)
                known = directory.by_id.get(iid)
                if known is None:
                    continue
                raw = known
            self._announce_named(interest, stype, raw, iid, now, out)
        budget -= end - job.pos
        job.pos = end
        return budget

    def _resolve_smart(
        self,
        member: FeedMember,
        interest: Interest,
        job: Resolve,
        budget: int,
        now: int,
        out: list[bytes],
    ) -> int:
        """Resolve a parent/continuous subscription's symbols, ``job.pos`` onwards: one
        unit per symbol, or per instrument mapped."""
        symbols = job.sub.symbols
        schema = job.sub.schema
        stype = job.stype
        while job.pos < len(symbols) and budget > 0:
            symbol = symbols[job.pos]
            job.pos += 1
            if symbol == ALL_SYMBOLS:
                continue
            try:
                parsed = parse_smart(symbol, job.sub.stype_in)
            except SmartSymbolError:
                job.unresolved.append(symbol)
                budget -= 1
                continue
            key = (stype, parsed.text)
            if key not in interest.smart_symbols:
                interest.smart_symbols[key] = parsed
                interest.smart_roots.setdefault(parsed.root, set()).add(key)
                self.want_root.setdefault(parsed.root, set()).add(member)
            interest.name(stype, parsed.text, schema)
            had = bool(interest.smart.get(key))
            if had and stype == STYPE_CONTINUOUS:
                budget -= 1  # mapped once, for the session's life
                continue
            found = self.smart.resolve(parsed, now)
            mapped = self._map_smart(interest, stype, parsed.text, found, now, out)
            if not found and not had:
                job.unresolved.append(parsed.text)
            budget -= max(1, mapped)
        return budget

    def _map_smart(
        self,
        interest: Interest,
        stype: int,
        symbol: str,
        found: list[tuple[int, str]],
        now: int,
        out: list[bytes],
    ) -> int:
        """Map and select the instruments of ``found`` that ``symbol`` does not map yet (a
        continuous symbol: only if it maps nothing yet, and only one); how many."""
        mapped = interest.smart.setdefault((stype, symbol), {})
        if stype == STYPE_CONTINUOUS:
            if mapped:
                return 0
            found = found[:1]
        fresh = [pair for pair in found if pair[0] not in mapped]
        if not fresh:
            return 0
        schemas = interest.key_schemas.get((stype, symbol), ())
        for iid, raw in fresh:
            mapped[iid] = raw
            for schema in schemas:
                interest.count(schema, iid, 1)
        out += encode_mappings(now, stype, symbol, fresh)
        return len(fresh)

    def on_reference(self, index: ChunkIndex) -> None:
        """A chunk with definitions or statistics, before it is published: learn from it;
        map new listings to the parent symbols they join and continuous symbols that now
        resolve for the first time, and do that work at once (one slice) so the chunk's own
        records reach the sessions that now select them."""
        if index is self._last_reference:
            return  # the same chunk again (held behind a mapping burst, then published)
        self._last_reference = index
        update = self.smart.learn(index)
        if not self.want_root:
            return
        roots = update.roots & self.want_root.keys()
        if not roots:
            return
        now = self._clock_ns()
        resolved: dict[tuple[int, str, str], list[tuple[int, str]]] = {}
        queued = False
        for root in roots:
            for member in self.want_root[root]:
                interest = self._interests.get(member)
                if interest is None:
                    continue
                for key in interest.smart_roots.get(root, ()):
                    stype, text = key
                    if stype == STYPE_CONTINUOUS and interest.smart.get(key):
                        continue  # not remapped while the session lives
                    if stype != STYPE_CONTINUOUS and not len(update.listed):
                        continue
                    parsed = interest.smart_symbols[key]
                    cache = (stype, root, parsed.kind if stype != STYPE_CONTINUOUS else text)
                    found = resolved.get(cache)
                    if found is None:
                        if stype == STYPE_CONTINUOUS:
                            found = self.smart.resolve(parsed, now)
                        else:
                            found = self.smart.listed_in(update.listed, root, parsed.kind, now)
                        resolved[cache] = found
                    if found:
                        interest.jobs.append(SmartMap(stype, text, found))
                        self.work[member] = None
                        queued = True
        if queued:
            self.run(self.slice_size)
            if self.has_work():
                self._request_drain()

    def _announce_named(
        self, interest: Interest, stype: int, raw: str, iid: int, now: int, out: list[bytes]
    ) -> None:
        """A named symbol resolved: select its instrument and announce it (once; an
        ALL_SYMBOLS subscription of the same stype announces it on its own)."""
        key = raw if stype == STYPE_RAW_SYMBOL else str(iid)
        prev = interest.named.get((stype, key))
        if prev != iid:
            interest.named[(stype, key)] = iid
            for schema in interest.key_schemas.get((stype, key), ()):
                interest.count(schema, iid, 1)
                if prev is not None:
                    interest.count(schema, prev, -1)
        if stype in interest.all_cursor or interest.announced.get((stype, key)) == iid:
            return
        interest.announced[(stype, key)] = iid
        out.append(dbn.encode_symbol_mapping(now, iid, stype, key, raw, now))

    def _catch_up(
        self, interest: Interest, stype: int, budget: int, now: int, out: list[bytes]
    ) -> int:
        log_ = self.directory.log
        latest = self.directory.latest
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

    def _flush_dirty(self, member: FeedMember, interest: Interest) -> None:
        if self._interests.get(member) is not interest:
            self.work.pop(member, None)  # it left (or was cut) while being written to
            return
        if interest.dirty:
            interest.dirty = False
            self._regroup(member, interest)

    def _regroup(self, member: FeedMember, interest: Interest) -> None:
        spec = OutputSpec(
            make_selection(interest.selection(self.schema_rtype)), member.ts_out, member.zstd
        )
        self.fanout.place(member, spec)
