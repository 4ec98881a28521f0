"""The supervisor's side of the data path with ``--workers N``: ``RingSink``, ``Waker``.

A ``RingSink`` is the fan-out of one dataset's Feed in the supervisor (no session ever joins
it): every chunk the Feed publishes is written ONCE into the dataset's shared ring (a
``CHUNK`` entry, with its journal seq), and what the workers' Feeds must learn in order with
the chunks goes through the same ordered path: mappings learnt (``LEARN``), state changes
(``STATE``), the schema of the source's Metadata (``METADATA``). The payload formats are
this module's and ``feeder.py``'s (msgpack):

    LEARN      [[symbol, instrument_id], ...]   (at most ``LEARN_PAIRS`` per entry)
    STATE      [connected, detail, notify]
    METADATA   [schema name or ""]

When the ring is full (a worker has not released the space yet) the entry is held, with
everything after it, in a pending queue (references to the bytes, no copy); the Feed is told
(``Feed.set_sink_blocked``) so its source stops reading, and a timer retries every
``retry_s`` until the queue is written, in order; then the source resumes. Nothing is ever
dropped here: a worker that falls behind skips by itself (feeder.py), and one that is stuck
is killed by the supervisor (``RingWriter.heartbeat_age_s``).

After writes, ``Waker.wake`` makes every live worker's eventfd readable: one
``os.eventfd_write`` per worker per event-loop turn, however many entries were written in it.

A worker (re)started while the feed runs starts reading at the ring's head, so it misses what
was learnt before: ``snapshot()`` is the Feed's symbology, schema and state as of now, to
send in the worker's Init; the worker applies it (``RingFeeder.restore``) before reading from
the position at which the supervisor made its slot live in the same event-loop step.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import msgspec
from prometheus_client import CollectorRegistry, Counter

from gateway.dbn import ChunkIndex
from gateway.fanout import FanOut, Payload
from gateway.workers.ring import CHUNK, LEARN, METADATA, STATE

if TYPE_CHECKING:
    from gateway.feeds.base import Feed
    from gateway.workers.ring import RingWriter

__all__ = ["LEARN_PAIRS", "RingSink", "Snapshot", "Waker"]

log = logging.getLogger("gateway.workers")

#: mapping pairs per LEARN entry (a burst is learnt in slices of this size anyway)
LEARN_PAIRS = 4096
#: a chunk larger than this fraction of the ring is written as several CHUNK entries (at
#: record boundaries, each with the chunk's seq) so that one entry always fits
_MAX_ENTRY_DIV = 4

_encode = msgspec.msgpack.Encoder().encode


_full_counters: weakref.WeakKeyDictionary[CollectorRegistry, Counter] = weakref.WeakKeyDictionary()


def _full_counter(registry: CollectorRegistry) -> Counter:
    """The registry's ring-full counter (made once per registry: one per dataset's sink)."""
    counter = _full_counters.get(registry)
    if counter is None:
        counter = _full_counters[registry] = Counter(
            "gateway_worker_ring_full",
            "Times a dataset's shared ring was full (its source paused until workers released)",
            ["dataset"],
            registry=registry,
        )
    return counter


class Snapshot(msgspec.Struct, array_like=True):
    """What a worker's Feed must know before it reads the ring from a position: the
    supervisor's symbology log (in order), the schema of the Metadata (None: none seen) and
    the feed's state."""

    mappings: list[tuple[str, int]]
    schema: str | None
    connected: bool
    detail: str


class Waker:
    """The eventfds of the live workers (slot -> fd; the supervisor owns them). ``wake``
    writes each once per event-loop turn (coalesced with ``call_soon``), at once when no
    loop runs."""

    def __init__(self) -> None:
        self.fds: dict[int, int] = {}
        self._pending = False
        #: eventfd writes done (observability, tests)
        self.writes = 0

    def add(self, slot: int, efd: int) -> None:
        self.fds[slot] = efd

    def remove(self, slot: int) -> None:
        self.fds.pop(slot, None)

    def wake(self) -> None:
        if self._pending:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        self._pending = True
        loop.call_soon(self.flush)

    def flush(self) -> None:
        self._pending = False
        for efd in list(self.fds.values()):
            try:
                os.eventfd_write(efd, 1)
            except BlockingIOError:
                pass  # the counter is at its maximum: readable anyway
            except OSError as exc:  # closed under us (a worker being replaced)
                log.debug("eventfd %d: %s", efd, exc)
            self.writes += 1


class RingSink(FanOut):
    """The supervisor Feed's fan-out: every chunk, mapping change, state change and schema
    written once, in order, into the dataset's ring (see the module docstring).

    ``RingSink(writer, wake=waker.wake)``, then ``Feed(dataset, fanout=sink, ...)`` and
    ``sink.attach(feed)`` (installs the Feed hooks). ``publish`` keeps FanOut's signature;
    the chunk's journal seq is read from ``feed.journal_seq``."""

    def __init__(
        self,
        writer: RingWriter,
        *,
        wake: Callable[[], None] | None = None,
        retry_s: float = 0.001,
        clock: Callable[[], float] = time.monotonic,
        registry: CollectorRegistry | None = None,
    ) -> None:
        super().__init__()
        self.writer = writer
        self._wake = wake
        self.retry_s = retry_s
        self._clock = clock
        self.feed: Feed | None = None
        self.max_entry = max(4096, writer.ring.size // _MAX_ENTRY_DIV)
        #: entries waiting for room: (kind, payload, seq, records), in order
        self.pending: deque[tuple[int, Payload, int, int]] = deque()
        self._retry: asyncio.TimerHandle | None = None
        #: the schema of the last Metadata (None: none seen), the last state (snapshot)
        self.schema: str | None = None
        self.connected = False
        self.detail = "starting"
        #: entries and payload bytes written; times the ring was full, and for how long
        self.entries = 0
        self.bytes = 0
        self.full_events = 0
        self.full_since: float | None = None
        self.full_total_s = 0.0
        #: ``gateway_worker_ring_full_total{dataset}`` where a registry is given (the
        #: supervisor's; the sinks of every dataset share one counter)
        self._full_metric: Counter | None = None
        if registry is not None:
            self._full_metric = _full_counter(registry)

    def attach(self, feed: Feed) -> None:
        """Install the Feed hooks (the Feed must have been built with ``fanout=self``)."""
        self.feed = feed
        self.connected = feed.connected
        self.detail = feed.state_detail
        feed.on_learned = self.learned
        feed.on_state = self.state_changed
        feed.on_schema = self.schema_seen

    # --- entries --------------------------------------------------------------------------

    def publish(self, index: ChunkIndex) -> None:
        if index.count == 0:
            return
        feed = self.feed
        seq = feed.journal_seq if feed is not None and feed.journal is not None else 0
        data = index.data
        if len(data) <= self.max_entry:
            self._put(CHUNK, data, seq, index.count)
            return
        # Too large for one entry: pieces at record boundaries, in order.
        ends = (index.offsets + index.lengths).tolist()
        start = first = 0
        for i, end in enumerate(ends):
            if end - start > self.max_entry and i > first:
                off = ends[i - 1]
                self._put(CHUNK, data[start:off], seq, i - first)
                start, first = off, i
        self._put(CHUNK, data[start:], seq, index.count - first)

    def learned(self, changed: list[tuple[str, int]]) -> None:
        """Feed hook: mappings that were new or changed (after the journal got them)."""
        for at in range(0, len(changed), LEARN_PAIRS):
            self._put(LEARN, _encode(changed[at : at + LEARN_PAIRS]), 0, 0)

    def state_changed(self, connected: bool, detail: str, notify: bool) -> None:
        """Feed hook: the feed went up or down (or its detail changed)."""
        self.connected, self.detail = connected, detail
        self._put(STATE, _encode([connected, detail, notify]), 0, 0)

    def schema_seen(self, name: str) -> None:
        """Feed hook: the source's Metadata names ``name`` ("" when none)."""
        self.schema = name
        self._put(METADATA, _encode([name]), 0, 0)

    def snapshot(self) -> bytes:
        """The Feed's symbology, schema and state now (msgpack ``Snapshot``), for a worker
        that starts reading the ring at the current head (see the module docstring)."""
        feed = self.feed
        mappings = list(feed.directory.log) if feed is not None else []
        return _encode(Snapshot(mappings, self.schema, self.connected, self.detail))

    # --- writing, holding when full -----------------------------------------------------------

    def _put(self, kind: int, payload: Payload, seq: int, records: int) -> None:
        if self.pending:
            self.pending.append((kind, payload, seq, records))
            return
        writer = self.writer
        head = writer.head
        if writer.try_write(kind, payload, seq=seq, records=records) is None:
            self.pending.append((kind, payload, seq, records))
            if writer.head != head and self._wake is not None:
                self._wake()  # a PAD to the wrap was written: readers move past it
            self._full()
            return
        self.entries += 1
        self.bytes += len(payload)
        if self._wake is not None:
            self._wake()

    def _full(self) -> None:
        self.full_events += 1
        if self._full_metric is not None:
            self._full_metric.labels(self.feed.dataset if self.feed is not None else "").inc()
        self.full_since = self._clock()
        if self.feed is not None:
            self.feed.set_sink_blocked(True)
        self._schedule_retry()

    def _schedule_retry(self) -> None:
        if self._retry is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (tools, tests): ``drain()`` by hand
        self._retry = loop.call_later(self.retry_s, self._on_retry)

    def _on_retry(self) -> None:
        self._retry = None
        self.drain()

    def drain(self) -> bool:
        """Write what is pending, in order, while it fits; True when nothing is left (the
        source is then told to resume)."""
        pending = self.pending
        head = self.writer.head
        wrote = False
        try_write = self.writer.try_write
        while pending:
            kind, payload, seq, records = pending[0]
            if try_write(kind, payload, seq=seq, records=records) is None:
                break
            pending.popleft()
            self.entries += 1
            self.bytes += len(payload)
            wrote = True
        if (wrote or self.writer.head != head) and self._wake is not None:
            self._wake()
        if pending:
            self._schedule_retry()
            return False
        if self.full_since is not None:
            self.full_total_s += self._clock() - self.full_since
            self.full_since = None
        if self.feed is not None:
            self.feed.set_sink_blocked(False)
        return True

    def close(self) -> None:
        """Stop retrying (supervisor shutdown); what is pending is dropped."""
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        self.pending.clear()
