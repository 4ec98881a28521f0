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
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Protocol, TypeVar

from gateway import dbn
from gateway.control import ALL_SYMBOLS
from gateway.dbn import STYPE_INSTRUMENT_ID, STYPE_RAW_SYMBOL, ErrorCode, SystemCode
from gateway.fanout import FanOut, OutputSpec, Payload, make_selection
from gateway.interest import (
    Activate,
    Announce,
    CatchUp,
    Emit,
    Interest,
    Resolve,
    SubscriptionLike,
    resolution_errors,
    stype_of,
)
from gateway.symbology import SymbolDirectory

__all__ = ["FeedMember", "SubscriptionIndex", "SubscriptionLike", "resolution_errors"]

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
            interest.jobs.append(Resolve(sub, stype))
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
                job = Resolve(sub, stype_of(sub))
                self._resolve(member, interest, job, len(sub.symbols), now, out)
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
