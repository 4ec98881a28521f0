"""A worker's side of the data path with ``--workers N``: ``RingFeeder``.

The feeder reads each dataset's ring (``ring.RingReader``) and drives the worker's own Feed
with what the supervisor's Feed published, in the same order: ``CHUNK`` entries are indexed
in place (``index_records`` over the read-only mapping, no copy) and published;
``LEARN``/``STATE``/``METADATA`` entries (payloads written by ``sink.RingSink``) become
``learn_many``/``set_state``/``on_metadata``. The worker's Feed, subscription index and
fan-out then serve its sessions exactly as in the single-process gateway.

Pacing: the worker's eventfd becomes readable when the supervisor wrote something
(``on_wake``); each turn handles at most ``budget_entries`` entries per dataset and about
``budget_s`` seconds in all, then yields (``call_soon``) if more is waiting. While a Feed is
paused (a mapping burst being learnt with its chunks held, or a lossless session over its
high-water mark) its ring is not read; the Feed's flow listener resumes it.

Releases (what the supervisor may overwrite): after every turn each reader releases
``min(next unread entry, the chunk the Feed holds behind a mapping burst, the oldest entry a
session's transport still references (pins.PinTracker))``. A session whose transport has
held ring memory for more than half the ring (on a lossless feed: for ``lossless_pin_s``,
the feed waiting for it meanwhile) is cut (``ring_pin``: its final ErrorMsg queued
behind what it has not read); if it still holds it three quarters of the ring back (the
writer, and so every worker's sessions, would soon wait for it) its transport is aborted.

Falling behind: on a non-lossless feed a worker that has been more than half the ring
behind the supervisor for ``skip_after_s`` (0.25 s; a worker catching up after a burst does
not skip) jumps ahead (``skip_chunks``: mappings, states and schemas passed over are still
applied, in order); its sessions of that dataset are told per their slow-reader policy:
``skip`` sessions are told how many records they missed (the slow-reader notice, before
their next chunk), every other session is cut ("worker fell behind the feed by more than
the shared ring (N MiB); reconnect"). Lossless feeds never skip: the supervisor waits for
the slowest worker. A lapped reader (its entry overwritten: only if its slot was declared
dead while it ran) jumps to the head and cuts every session of the dataset (mappings may
have been lost with the chunks).

Lossless: while any session of a lossless dataset is over its high-water mark the feeder
calls ``notify_blocked(dataset, True)`` (the worker sends a control message so the
supervisor pauses the source), and ``False`` once none is; transitions are checked on the
Feed's flow changes, after every turn and on ``tick``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import msgspec
from prometheus_client import CollectorRegistry, Counter

from gateway.dbn import ChunkIndex, index_records
from gateway.workers.ring import CHUNK, LEARN, METADATA, STATE, Entry, RingLapped
from gateway.workers.sink import Snapshot

if TYPE_CHECKING:
    from gateway.feeds.base import Feed
    from gateway.workers.pins import PinTracker
    from gateway.workers.ring import RingReader

__all__ = ["RingFeeder"]

log = logging.getLogger("gateway.workers")

_decode_learn = msgspec.msgpack.Decoder(list[tuple[str, int]]).decode
_decode_any = msgspec.msgpack.Decoder().decode
_decode_snapshot = msgspec.msgpack.Decoder(Snapshot).decode
#: a ring is skipped ahead when the reader is more than size // _BEHIND_DIV behind head, and
#: sessions pinning entries further back than that are cut
_BEHIND_DIV = 2
#: while pins hold the release back, sweep again this often (the writer may be waiting)
_PIN_SWEEP_S = 0.005

PIN_TEXT = "slow reader: held shared ring memory too long; disconnecting"
LAPPED_TEXT = "worker lost its place in the shared ring; reconnect"


def behind_text(ring_bytes: int) -> str:
    return (
        "worker fell behind the feed by more than the shared ring "
        f"({ring_bytes / (1 << 20):g} MiB); reconnect"
    )


@dataclass(eq=False)
class _Lane:
    """One dataset: its Feed, reader and state."""

    dataset: str
    feed: Feed
    reader: RingReader
    lossless: bool
    #: position of the chunk the Feed holds behind a mapping burst (None: none)
    held_pos: int | None = None
    #: what notify_blocked was last told
    blocked_sent: bool = False
    #: since when (clock) the reader has been more than half the ring behind (None: not)
    behind_since: float | None = None
    #: lossless: since when (clock) a session has pinned ring memory more than half the
    #: ring back (None: none does)
    pinned_since: float | None = None


class RingFeeder:
    """Ring entries in, the worker's Feeds driven (see the module docstring).

    PROC: build it with the worker's Feeds (real FanOut), one ``RingReader`` per dataset
    (started at the position the supervisor made the slot live at), ``state.pins``,
    ``lossless`` = each dataset's backpressure setting and a ``notify_blocked`` that sends
    ``Blocked(dataset, blocked)``; ``restore(dataset, snapshot)`` for each dataset (the
    supervisor's ``RingSink.snapshot()``), then ``start()`` inside the running loop (it
    watches ``efd``, the worker's eventfd, non-blocking), ``tick()`` every TICK_S,
    ``stop()`` at exit."""

    def __init__(
        self,
        feeds: dict[str, Feed],
        readers: dict[str, RingReader],
        pins: PinTracker,
        lossless: dict[str, bool],
        notify_blocked: Callable[[str, bool], None],
        *,
        efd: int | None = None,
        registry: CollectorRegistry | None = None,
        budget_entries: int = 64,
        budget_s: float = 0.002,
        skip_after_s: float = 0.25,
        lossless_pin_s: float = 10.0,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.pins = pins
        #: lossless feeds: how long a session may pin ring memory more than half the ring
        #: back before it is cut (the feed waits for it meanwhile, as for a session over its
        #: high-water mark; the worker passes ``[slow_reader] stall_timeout_s``)
        self.lossless_pin_s = lossless_pin_s
        self.notify_blocked = notify_blocked
        self.efd = efd
        self.budget_entries = max(1, budget_entries)
        self.budget_s = budget_s
        self.skip_after_s = skip_after_s
        self._clock = clock
        self.lanes = [
            _Lane(ds, feed, readers[ds], bool(lossless.get(ds, feed.backpressure)))
            for ds, feed in feeds.items()
        ]
        self._loop: asyncio.AbstractEventLoop | None = None
        self._scheduled = False
        self._stopped = False
        self._first = 0
        self._sweep_timer: asyncio.TimerHandle | None = None
        self._pin_cut: set[Any] = set()
        self._pin_aborted: set[Any] = set()
        r = registry if registry is not None else CollectorRegistry()
        self.skips_metric = Counter(
            "gateway_worker_ring_skips",
            "Times a worker fell behind a shared ring and skipped ahead (or lost its place)",
            ["dataset"],
            registry=r,
        )
        self.skipped_records_metric = Counter(
            "gateway_worker_ring_skipped_records",
            "Records a worker skipped after falling behind a shared ring",
            ["dataset"],
            registry=r,
        )
        #: per dataset: skips (and laps), records skipped, sessions cut for it (tests, logs)
        self.skips: dict[str, int] = {lane.dataset: 0 for lane in self.lanes}
        self.skipped_records: dict[str, int] = {lane.dataset: 0 for lane in self.lanes}
        self.laps = 0
        self.cuts = 0
        self.pin_cuts = 0
        self.pin_aborts = 0
        #: entries applied (tests, observability)
        self.entries = 0
        for lane in self.lanes:
            lane.feed.flow_listeners.append(functools.partial(self._flow, lane))
            lane.feed.on_held = functools.partial(self._on_held, lane)

    # --- set-up ---------------------------------------------------------------------------

    def restore(self, dataset: str, snapshot: bytes) -> None:
        """Apply the supervisor Feed's ``RingSink.snapshot()`` to this worker's Feed (schema,
        symbology, state) before reading its ring."""
        snap = _decode_snapshot(snapshot)
        feed = self._lane(dataset).feed
        if snap.schema is not None:
            feed.on_metadata(SimpleNamespace(schema=snap.schema), mappings=[])
        if snap.mappings:
            feed.learn_many(snap.mappings)
        feed.set_state(snap.connected, snap.detail, notify=False)

    def start(self) -> None:
        """Inside the running loop: watch the eventfd and read what is there already."""
        loop = self._loop = asyncio.get_running_loop()
        if self.efd is not None:
            loop.add_reader(self.efd, self.on_wake)
        self._kick()

    def stop(self) -> None:
        """Stop watching the eventfd; turns already scheduled do nothing (the rings may be
        closed next)."""
        self._stopped = True
        loop = self._loop
        if loop is not None and self.efd is not None:
            loop.remove_reader(self.efd)
        if self._sweep_timer is not None:
            self._sweep_timer.cancel()
            self._sweep_timer = None

    def _lane(self, dataset: str) -> _Lane:
        for lane in self.lanes:
            if lane.dataset == dataset:
                return lane
        raise KeyError(dataset)

    # --- turns ----------------------------------------------------------------------------

    def on_wake(self) -> None:
        """The eventfd is readable: reset it (before reading, so no wake is lost), then a
        turn."""
        if self.efd is not None:
            try:
                os.eventfd_read(self.efd)
            except BlockingIOError:
                pass
        self.run()

    def _kick(self) -> None:
        if self._scheduled:
            return
        loop = self._loop
        if loop is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
        self._scheduled = True
        loop.call_soon(self._scheduled_run)

    def _scheduled_run(self) -> None:
        self._scheduled = False
        if not self._stopped:
            self.run()

    def run(self) -> bool:
        """One turn over every dataset; True when entries are left (another turn is
        scheduled). The dataset served first rotates: one busy dataset cannot spend every
        turn's time budget before the others get an entry."""
        deadline = self._clock() + self.budget_s
        more = False
        lanes = self.lanes
        first = self._first = (self._first + 1) % len(lanes) if lanes else 0
        for lane in lanes[first:] + lanes[:first] if first else lanes:
            lane.reader.heartbeat()
            if self._turn(lane, deadline):
                more = True
        self._after_turn()
        if more:
            self._kick()
        return more

    def _turn(self, lane: _Lane, deadline: float) -> bool:
        feed = lane.feed
        reader = lane.reader
        if feed.paused:
            return False  # resumed by the flow listener
        try:
            if not lane.lossless and self._fell_behind(lane):
                self._skip_ahead(lane)
                if feed.paused:
                    return False
            budget = self.budget_entries
            clock = self._clock
            while budget:
                entry = reader.next()
                if entry is None:
                    return False
                self._apply(lane, entry)
                budget -= 1
                if feed.paused:
                    return False
                if clock() > deadline:
                    break
            return True
        except RingLapped as exc:
            self._lapped(lane, exc)
            return True

    def _apply(self, lane: _Lane, entry: Entry) -> None:
        self.entries += 1
        kind = entry.kind
        feed = lane.feed
        if kind == CHUNK:
            index, _ = index_records(entry.payload)
            pins = self.pins
            pins.begin(entry.pos, index.data, lane.dataset)
            try:
                journal = feed.journal
                if journal is not None:
                    note = getattr(journal, "note_seq", None)
                    if note is not None:
                        note(entry.seq)
                feed.publish(index)
            finally:
                pins.end()
            if lane.held_pos is None and feed.holding:
                lane.held_pos = entry.pos
        elif kind == LEARN:
            feed.learn_many(_decode_learn(entry.payload))
        elif kind == STATE:
            connected, detail, *rest = _decode_any(entry.payload)
            feed.set_state(bool(connected), str(detail), bool(rest[0]) if rest else True)
        elif kind == METADATA:
            (name,) = _decode_any(entry.payload)
            feed.on_metadata(SimpleNamespace(schema=str(name)), mappings=[])

    # --- the Feed's hooks -------------------------------------------------------------------

    def _flow(self, lane: _Lane, paused: bool) -> None:
        self._check_blocked(lane)
        if not paused:
            if not lane.feed.holding:
                lane.held_pos = None
            self._kick()

    def _on_held(self, lane: _Lane, index: ChunkIndex | None) -> None:
        """A chunk held behind a mapping burst is published now (its data is ring memory
        at ``held_pos``: pinned like any chunk), or the held chunks are done (None)."""
        if index is None:
            self.pins.end()
            if not lane.feed.holding:
                lane.held_pos = None
        elif lane.held_pos is not None:
            self.pins.begin(lane.held_pos, index.data, lane.dataset)

    # --- after a turn: releases, pins, lossless ---------------------------------------------------

    def tick(self) -> None:
        """Every TICK_S (PROC): heartbeat, releases and pin checks while no entry comes."""
        for lane in self.lanes:
            lane.reader.heartbeat()
        self._after_turn()
        if any(not lane.feed.paused and lane.reader.behind() > 0 for lane in self.lanes):
            self._kick()

    def _after_turn(self) -> None:
        floors = self._pin_floors()
        pinned = False
        for lane in self.lanes:
            reader = lane.reader
            release = reader.pos
            if lane.held_pos is not None:
                release = min(release, lane.held_pos)
            floor = floors.get(lane.dataset)
            if floor is not None:
                if floor < release:
                    release = floor
                    pinned = True
                head = reader.pos + reader.behind()
                if floor < head - reader.size // _BEHIND_DIV and self._pin_overdue(lane):
                    self._cut_pinned(lane, head - reader.size // _BEHIND_DIV)
                    if floor < head - reader.size * 3 // 4:
                        self._abort_pinned(lane, head - reader.size * 3 // 4)
            else:
                lane.pinned_since = None
            reader.release(release)
            self._check_blocked(lane)
        if pinned:
            self._schedule_sweep()

    def _pin_overdue(self, lane: _Lane) -> bool:
        """A session pins ring memory more than half the ring back: cut it now, or (a
        lossless feed: the feed waits for its slowest session, the source paused while the
        ring is full) once that has lasted ``lossless_pin_s``."""
        if not lane.lossless:
            return True
        now = self._clock()
        if lane.pinned_since is None:
            lane.pinned_since = now
        return now - lane.pinned_since >= self.lossless_pin_s

    def _pin_floors(self) -> dict[object, int]:
        """The oldest pinned position per dataset (pins are keyed by the dataset given to
        ``PinTracker.begin``: positions of different rings do not compare)."""
        pins = self.pins
        oldest = pins.sweep()
        if self._pin_cut:
            still = pins.older_than(1 << 62)
            self._pin_cut.intersection_update(still)
            self._pin_aborted.intersection_update(still)
        return pins.floors if oldest is not None else {}

    def _cut_pinned(self, lane: _Lane, limit: int) -> None:
        for conn in self.pins.older_than(limit, key=lane.dataset):
            if conn in self._pin_cut:
                continue
            self._pin_cut.add(conn)
            self.pin_cuts += 1
            cut = getattr(conn, "cut", None)
            if cut is not None:
                cut("ring_pin", PIN_TEXT)

    def _abort_pinned(self, lane: _Lane, limit: int) -> None:
        """A session cut for pinning that still pins three quarters of the ring back: the
        writer is about to wait for it (every dataset's sessions would): its transport is
        aborted now rather than after the cut's grace (that drops what it holds)."""
        for conn in self.pins.older_than(limit, key=lane.dataset):
            if conn not in self._pin_cut:
                continue
            abort = getattr(getattr(conn, "transport", None), "abort", None)
            if abort is not None and conn not in self._pin_aborted:
                self._pin_aborted.add(conn)
                self.pin_aborts += 1
                log.warning("session transport aborted reason=ring_pin dataset=%s", lane.dataset)
                abort()

    def _schedule_sweep(self) -> None:
        if self._sweep_timer is not None or self._loop is None:
            return
        self._sweep_timer = self._loop.call_later(_PIN_SWEEP_S, self._on_sweep)

    def _on_sweep(self) -> None:
        self._sweep_timer = None
        if not self._stopped:
            self._after_turn()

    def _check_blocked(self, lane: _Lane) -> None:
        if not lane.lossless:
            return
        blocked = bool(lane.feed.subscriptions.blocked)
        if blocked != lane.blocked_sent:
            lane.blocked_sent = blocked
            self.notify_blocked(lane.dataset, blocked)

    # --- behind -------------------------------------------------------------------------

    def _fell_behind(self, lane: _Lane) -> bool:
        """More than half the ring behind at the start of every turn for ``skip_after_s``
        (a worker that is merely catching up after a burst, or after the writer was held
        by another worker, does not skip: with chunks of a quarter of a small ring, one
        burst is already half of it)."""
        reader = lane.reader
        if reader.behind() <= reader.size // _BEHIND_DIV:
            lane.behind_since = None
            return False
        now = self._clock()
        if lane.behind_since is None:
            lane.behind_since = now
        if now - lane.behind_since < self.skip_after_s:
            return False
        lane.behind_since = None
        return True

    def _skip_ahead(self, lane: _Lane) -> None:
        reader = lane.reader
        chunks, records = reader.skip_chunks(functools.partial(self._apply, lane))
        if not chunks:
            return
        dataset = lane.dataset
        self.skips[dataset] += 1
        self.skipped_records[dataset] += records
        self.skips_metric.labels(dataset).inc()
        self.skipped_records_metric.labels(dataset).inc(records)
        log.warning(
            "worker fell behind ring dataset=%s chunks=%d records=%d ring_bytes=%d",
            dataset,
            chunks,
            records,
            reader.size,
        )
        text = behind_text(reader.size)
        for member in lane.feed.members:
            slow = getattr(member, "slow", None)
            if slow is not None and slow.behavior == "skip" and not slow.lossless:
                # Told by the slow-reader notice before its next chunk (or on its tick).
                slow.skipped += records
                slow.skipped_total += records
                state = getattr(member, "state", None)
                if state is not None:
                    state.metrics.records_skipped.inc(records)
            else:
                self._cut(member, "ring_behind", text)

    def _lapped(self, lane: _Lane, exc: RingLapped) -> None:
        skipped = lane.reader.resync()
        lane.held_pos = None
        self.laps += 1
        self.skips[lane.dataset] += 1
        self.skips_metric.labels(lane.dataset).inc()
        log.error("worker lapped dataset=%s skipped_bytes=%d: %s", lane.dataset, skipped, exc)
        for member in lane.feed.members:
            self._cut(member, "ring_lapped", LAPPED_TEXT)

    def _cut(self, member: object, label: str, text: str) -> None:
        cut = getattr(member, "cut", None)
        if cut is not None:
            self.cuts += 1
            cut(label, text)
