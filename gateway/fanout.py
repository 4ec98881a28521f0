"""Fan-out: sessions grouped by output spec, each chunk's variants built once, shared.

An output spec is (selection, ts_out, zstd). The selection says which records a group
wants: for each rtype, either every instrument (``None``) or a set of instrument ids.
For every chunk, ``FanOut.publish`` builds each distinct variant once and lazily:

* the chunk itself (no copy) when a group wants every record in it,
* one numpy gather per distinct selection, shared by the ts_out and zstd groups of
  that selection (with four or more filter-only selections, one gather for all of them,
  each selection a slice of it),
* one re-stamped copy per selection for ts_out groups (its send stamp taken just before
  that variant's first write),
* one independent zstd frame per (selection, ts_out) for compressed groups,

and hands the *same object* to every member of the group. Cost grows with the number of
distinct specs, never with the number of sessions. Nothing here awaits or does I/O.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import zstandard

from gateway.dbn import ChunkIndex, stamp_ts_out

__all__ = ["FanOut", "Group", "OutputSpec", "Selection", "Subscriber", "make_selection"]

#: frozenset of (rtype, None for every instrument | frozenset of instrument ids)
Selection = frozenset[tuple[int, frozenset[int] | None]]

Payload = bytes | memoryview
#: filters with at most this many instruments look them up one by one in the chunk's
#: per-instrument table; larger ones use a vectorised search
_FEW_IDS = 64
#: with at least this many filter-only selections, a chunk is split for all of them at once
_BULK_MIN_SELECTIONS = 4
#: a plan of more keys than this is rebuilt at most every _PLAN_REBUILD_S while groups
#: change (sessions joining, symbols resolving); groups it does not cover yet are served
#: one by one in the meantime, so a flood of subscriptions cannot rebuild it per chunk
_PLAN_CHEAP_KEYS = 50_000
_PLAN_REBUILD_S = 0.25


class Subscriber(Protocol):
    def deliver(self, data: Payload, records: int) -> None: ...


def make_selection(wanted: dict[int, set[int] | None]) -> Selection:
    return frozenset(
        (rtype, None if ids is None else frozenset(ids))
        for rtype, ids in wanted.items()
        if ids is None or ids
    )


@dataclass(frozen=True)
class OutputSpec:
    selection: Selection
    ts_out: bool = False
    zstd: bool = False


@dataclass(eq=False)
class Group:
    spec: OutputSpec
    members: dict[Subscriber, None] = field(default_factory=dict)
    _all_rtypes: frozenset[int] = frozenset()
    _filters: list[tuple[int, npt.NDArray[np.uint32]]] = field(default_factory=list)
    _all_array: npt.NDArray[np.uint8] = field(default_factory=lambda: np.zeros(0, np.uint8))
    _filter_lists: list[tuple[int, list[int]]] = field(default_factory=list)
    #: writes of this group's variants (one per member per chunk) and variants it built
    writes: int = 0
    builds: int = 0

    def __post_init__(self) -> None:
        self._all_rtypes = frozenset(r for r, ids in self.spec.selection if ids is None)
        self._all_array = np.fromiter(sorted(self._all_rtypes), dtype=np.uint8)
        self._filters = [
            (r, np.fromiter(sorted(ids), dtype=np.uint32, count=len(ids)))
            for r, ids in self.spec.selection
            if ids is not None
        ]
        self._filter_lists = [(r, sorted(ids)) for r, ids in self.spec.selection if ids is not None]

    def positions(self, index: ChunkIndex) -> npt.NDArray[np.int64] | bool:
        """True: every record; False: none; else the ascending positions selected."""
        present = index.rtype_set
        if not self._filters:
            if present <= self._all_rtypes:
                return True
            if not (present & self._all_rtypes):
                return False
            return np.flatnonzero(np.isin(index.rtypes, self._all_array))
        parts: list[npt.NDArray[np.int64]] = []
        if self._all_rtypes & present:
            parts.append(np.flatnonzero(np.isin(index.rtypes, self._all_array)))
        single_rtype = len(present) == 1
        for (rtype, ids), (_, id_list) in zip(self._filters, self._filter_lists, strict=True):
            if rtype not in present:
                continue
            if len(id_list) <= _FEW_IDS:
                ranges = index.instrument_ranges()
                hits = [hit for hit in map(ranges.get, id_list) if hit is not None]
                if not hits:
                    continue
                order = index.instrument_order()
                if len(hits) == 1:
                    start, count = hits[0]
                    pos = order[start : start + count]
                else:
                    pos = np.sort(np.concatenate([order[s : s + c] for s, c in hits]))
            else:
                pos = index.positions_of(ids)
            if not single_rtype and pos.size:
                pos = pos[index.rtypes[pos] == rtype]
            if pos.size:
                parts.append(pos)
        if not parts:
            return False
        if len(parts) == 1:
            return parts[0]
        return np.unique(np.concatenate(parts))


@dataclass
class _FilterPlan:
    """The (rtype, instrument_id) keys of every filter-only selection, sorted, with the
    selection each key belongs to: rebuilt only when groups come or go."""

    selections: list[Selection]
    #: distinct keys, sorted; for each, where its run of (key, owner) pairs starts and its length
    unique_keys: npt.NDArray[np.uint64]
    starts: npt.NDArray[np.int64]
    counts: npt.NDArray[np.int64]
    owners: npt.NDArray[np.signedinteger[Any]]

    @classmethod
    def build(cls, groups: dict[OutputSpec, Group]) -> _FilterPlan:
        # One pass over the groups' own sorted id arrays (built once per group), no
        # Python loop per instrument: a plan of 500,000 keys builds in tens of ms.
        first_group: dict[Selection, Group] = {}
        for spec, group in groups.items():
            if spec.selection and not group._all_rtypes:
                first_group.setdefault(spec.selection, group)
        selections = list(first_group)
        key_parts: list[npt.NDArray[np.uint64]] = []
        owner_parts: list[npt.NDArray[np.int32]] = []
        for i, group in enumerate(first_group.values()):
            for rtype, ids in group._filters:
                key_parts.append(ids.astype(np.uint64) | np.uint64(rtype << 32))
                owner_parts.append(np.full(len(ids), i, dtype=np.int32))
        key_array = np.concatenate(key_parts) if key_parts else np.zeros(0, np.uint64)
        owners = np.concatenate(owner_parts) if owner_parts else np.zeros(0, np.int32)
        order = np.argsort(key_array, kind="stable")
        sorted_keys = key_array[order]
        # Small owner ids make the per-chunk stable sort a radix sort.
        owner_array: npt.NDArray[np.signedinteger[Any]] = (
            owners.astype(np.int16) if len(selections) < 2**15 else owners
        )[order]
        if not len(sorted_keys):
            empty = np.zeros(0, dtype=np.int64)
            return cls(selections, sorted_keys, empty, empty, owner_array)
        first = np.empty(len(sorted_keys), dtype=np.bool_)
        first[:1] = True
        np.not_equal(sorted_keys[1:], sorted_keys[:-1], out=first[1:])
        starts = np.flatnonzero(first)
        counts = np.diff(starts, append=len(sorted_keys))
        return cls(selections, sorted_keys[starts], starts, counts, owner_array)


@dataclass
class _ChunkCache:
    """Variants of one chunk, keyed by selection (and ts_out for frames)."""

    selected: dict[Selection, tuple[Payload, int, npt.NDArray[np.int64] | None] | None] = field(
        default_factory=dict
    )
    stamped: dict[Selection, bytes] = field(default_factory=dict)
    frames: dict[tuple[Selection, bool], bytes] = field(default_factory=dict)


class FanOut:
    def __init__(
        self,
        *,
        zstd_level: int = 1,
        clock_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self.groups: dict[OutputSpec, Group] = {}
        self._member_spec: dict[Subscriber, OutputSpec] = {}
        self._compressor = zstandard.ZstdCompressor(level=zstd_level)
        self._clock_ns = clock_ns
        self.bytes_compressed_in = 0
        self.bytes_compressed_out = 0
        self.compress_seconds = 0.0
        self.frames_built = 0
        self.frames_written = 0
        self.records_out = 0
        #: variants built (gathers, stamps, frames) and shared variants written, all groups
        self.variant_builds = 0
        self.variant_writes = 0
        self._plan: _FilterPlan | None = None
        self._plan_stale = False
        self._plan_built_at = float("-inf")
        self._rtype_keys: frozenset[int] | None = frozenset()
        #: called with (member, old spec, new spec) after a member's placement changed (the
        #: Feed's books answer snapshot=1 there)
        self.on_place: Callable[[Subscriber, OutputSpec | None, OutputSpec], None] | None = None

    # --- membership -------------------------------------------------------------------

    def place(self, member: Subscriber, spec: OutputSpec) -> None:
        """Put ``member`` in the group of ``spec`` (moving it if it was elsewhere)."""
        old = self._member_spec.get(member)
        if old == spec:
            return
        if old is not None:
            self._drop(member, old)
        if not spec.selection:
            self._member_spec.pop(member, None)
            return
        group = self.groups.get(spec)
        if group is None:
            group = self.groups[spec] = Group(spec)
            self._plan_stale = True
            self._rtype_keys = None
        group.members[member] = None
        self._member_spec[member] = spec
        if self.on_place is not None:
            self.on_place(member, old, spec)

    def remove(self, member: Subscriber) -> None:
        spec = self._member_spec.pop(member, None)
        if spec is not None:
            self._drop(member, spec)

    def spec_of(self, member: Subscriber) -> OutputSpec | None:
        return self._member_spec.get(member)

    def _drop(self, member: Subscriber, spec: OutputSpec) -> None:
        group = self.groups.get(spec)
        if group is None:
            return
        group.members.pop(member, None)
        if not group.members:
            del self.groups[spec]
            self._plan_stale = True
            self._rtype_keys = None

    def rtype_keys(self) -> frozenset[int]:
        """Every rtype some group selects (cached until the groups change): what is worth
        building for this fan-out (gateway/books derives only those schemas)."""
        keys = self._rtype_keys
        if keys is None:
            keys = self._rtype_keys = frozenset(
                rtype for spec in self.groups for rtype, _ in spec.selection
            )
        return keys

    @property
    def member_count(self) -> int:
        return len(self._member_spec)

    # --- the hot path -------------------------------------------------------------------

    def publish(self, index: ChunkIndex) -> None:
        if not self.groups or index.count == 0:
            return
        cache = _ChunkCache()
        if index.rows is not None:
            plan = self._current_plan()
            if len(plan.selections) >= _BULK_MIN_SELECTIONS:
                self._bulk_select(plan, index, cache)
        # Snapshot: a member's deliver() may regroup or close sessions.
        for group in list(self.groups.values()):
            payload = self._variant(group, index, cache)
            if payload is None:
                continue
            data, records = payload
            members: Iterable[Subscriber] = list(group.members)
            for member in members:
                member.deliver(data, records)
            group.writes += len(group.members)
            self.variant_writes += len(group.members)
            self.records_out += records * len(group.members)
            if group.spec.zstd:
                self.frames_written += len(group.members)

    def _current_plan(self) -> _FilterPlan:
        plan = self._plan
        if plan is not None and not self._plan_stale:
            return plan
        now = time.monotonic()
        if plan is not None and now - self._plan_built_at < _PLAN_REBUILD_S:
            if len(plan.owners) > _PLAN_CHEAP_KEYS:
                return plan  # stale but still right for the groups it covers
        self._plan = plan = _FilterPlan.build(self.groups)
        self._plan_stale = False
        self._plan_built_at = now
        return plan

    def _variant(
        self, group: Group, index: ChunkIndex, cache: _ChunkCache
    ) -> tuple[Payload, int] | None:
        spec = group.spec
        sel = spec.selection
        if sel not in cache.selected:
            cache.selected[sel] = self._select(group, index)
        selected = cache.selected[sel]
        if selected is None:
            return None
        data, records, mask = selected
        if spec.ts_out:
            stamped = cache.stamped.get(sel)
            if stamped is None:
                stamped = cache.stamped[sel] = stamp_ts_out(index, mask, self._clock_ns())
                group.builds += 1
                self.variant_builds += 1
            data = stamped
        if spec.zstd:
            key = (sel, spec.ts_out)
            frame = cache.frames.get(key)
            if frame is None:
                started = time.perf_counter()
                frame = cache.frames[key] = self._compressor.compress(data)
                self.compress_seconds += time.perf_counter() - started
                self.bytes_compressed_in += len(data)
                self.bytes_compressed_out += len(frame)
                self.frames_built += 1
                group.builds += 1
                self.variant_builds += 1
            data = frame
        return data, records

    def _bulk_select(self, plan: _FilterPlan, index: ChunkIndex, cache: _ChunkCache) -> None:
        """Every filter-only selection of this chunk at once: a few vectorised passes and one
        gather for all of them, then each selection is a slice of the gathered buffer. Per
        group this leaves a memoryview slice, not a handful of numpy calls."""
        assert index.rows is not None
        keys = (index.rtypes.astype(np.uint64) << np.uint64(32)) | index.instrument_ids
        slot = np.searchsorted(plan.unique_keys, keys)
        np.minimum(slot, len(plan.unique_keys) - 1, out=slot)
        hit = plan.unique_keys[slot] == keys
        lo = plan.starts[slot]
        counts = np.where(hit, plan.counts[slot], 0)
        total = int(counts.sum())
        if total == 0:
            for sel in plan.selections:
                cache.selected[sel] = None
            return
        ends = np.cumsum(counts)
        pair = np.repeat(lo - ends + counts, counts) + np.arange(total)
        record = np.repeat(np.arange(index.count), counts)
        owner = plan.owners[pair]
        # By selection, records still in feed order (a radix sort for small owner types).
        order = np.argsort(owner, kind="stable")
        positions = record[order]
        bounds = np.searchsorted(owner[order], np.arange(len(plan.selections) + 1))
        flat = index.rows[positions].reshape(-1).data
        size = index.record_len
        for i, sel in enumerate(plan.selections):
            a, b = int(bounds[i]), int(bounds[i + 1])
            if a == b:
                cache.selected[sel] = None
            else:
                cache.selected[sel] = (flat[a * size : b * size], b - a, positions[a:b])
        self.variant_builds += len(plan.selections)

    def _select(
        self, group: Group, index: ChunkIndex
    ) -> tuple[Payload, int, npt.NDArray[np.int64] | None] | None:
        picked = group.positions(index)
        if picked is True:
            return index.data, index.count, None
        if picked is False:
            return None
        assert not isinstance(picked, bool)
        count = int(picked.size)
        if count == 0:
            return None
        if count == index.count:
            return index.data, count, None
        group.builds += 1
        self.variant_builds += 1
        return index.select(picked), count, picked

    def compress(self, data: bytes) -> bytes:
        """A single independent frame, for per-session pieces (Metadata, acks, ...)."""
        started = time.perf_counter()
        frame: bytes = self._compressor.compress(data)
        self.compress_seconds += time.perf_counter() - started
        self.bytes_compressed_in += len(data)
        self.bytes_compressed_out += len(frame)
        return frame
