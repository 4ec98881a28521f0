"""The --workers data path in one process (gateway/workers/sink.py, feeder.py): a supervisor
Feed writing into a real shared-memory Ring through a RingSink, worker Feeds driven from it
by RingFeeders (woken through real eventfds), compared with a single-process Feed given the
same input."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import databento_dbn as d
import pytest
from prometheus_client import CollectorRegistry

from gateway import dbn
from gateway.config import SlowReaderConfig
from gateway.control import ALL_SYMBOLS
from gateway.fanout import FanOut
from gateway.feeds.base import Feed
from gateway.session import Subscription
from gateway.slowreader import SlowReader, Verdict
from gateway.workers.feeder import PIN_TEXT, RingFeeder, behind_text
from gateway.workers.pins import PinTracker
from gateway.workers.ring import Ring, RingReader, RingWriter
from gateway.workers.sink import RingSink, Waker

from .conftest import (
    NOW_NS,
    decode,
    definition,
    sample_records,
    split_records,
    symbol_mapping,
    trade,
)

DS = "GLBX.MDP3"
CLOCK = 1_750_000_000_000_000_000
SLICE = 8


def clock_ns() -> int:
    return CLOCK


class Member:
    """A FeedMember (with the slow-reader state and ``cut`` a connection has) that logs what
    it is sent, in order."""

    def __init__(
        self, ts_out: bool = False, zstd: bool = False, behavior: str = "warn", lossless=False
    ) -> None:
        self.ts_out = ts_out
        self.zstd = zstd
        self.log: list[tuple[Any, ...]] = []
        self.slow = SlowReader(SlowReaderConfig(), behavior=behavior, lossless=lossless)
        self.cuts: list[tuple[str, str]] = []
        self.feed: Feed | None = None
        self.watch: Callable[[Any], None] | None = None

    def deliver(self, data, records: int) -> None:
        if self.watch is not None:
            self.watch(data)
        raw = bytes(data)
        if not self.zstd:
            assert len(split_records(raw)) == records
        self.log.append(("data", raw, records))

    def send_gateway_records(self, records: list[bytes]) -> None:
        self.log.extend(("gateway", bytes(r)) for r in records)

    def cut(self, label: str, message: str) -> None:
        self.cuts.append((label, message))
        if self.feed is not None:
            self.feed.leave(self)

    @property
    def data(self) -> bytes:
        return b"".join(e[1] for e in self.log if e[0] == "data")


#: (name, subscription, ts_out, zstd, slow-reader behavior)
MEMBERS = [
    ("named", Subscription("trades", "raw_symbol", ("ESZ4", "NQZ4", "DEF3", "BURST5"), 1)),
    ("all_trades", Subscription("trades", "raw_symbol", (ALL_SYMBOLS,), 2)),
    ("tbbo", Subscription("tbbo", "raw_symbol", (ALL_SYMBOLS,), 3)),
    ("mbp1", Subscription("mbp-1", "raw_symbol", (ALL_SYMBOLS,), 4)),
    ("by_id", Subscription("trades", "instrument_id", ("1001", "2003"), 5)),
]


class FakeJournal:
    """The supervisor's journal: every chunk appended gets the next seq."""

    def __init__(self) -> None:
        self.last_seq = 0

    def append(self, index: dbn.ChunkIndex) -> int:
        self.last_seq += 1
        return self.last_seq

    def learn(self, changed, ts=None) -> None:
        pass


class FakeFollower(FakeJournal):
    """A worker's follower: the seq of each CHUNK entry is noted, append returns it."""

    def __init__(self) -> None:
        super().__init__()
        self.noted: list[int] = []

    def note_seq(self, seq: int) -> None:
        self.noted.append(seq)

    def append(self, index: dbn.ChunkIndex) -> int:
        return self.noted[-1]


def add_members(feed: Feed, *, behavior: str = "warn", lossless: bool = False) -> dict:
    members = {}
    for name, subscription in MEMBERS:
        member = Member(ts_out=name == "all_trades", behavior=behavior, lossless=lossless)
        member.feed = feed
        feed.join(member)
        for rec in feed.subscribe(member, subscription):
            member.log.append(("answer", rec))
        members[name] = member
    return members


class Worker:
    def __init__(self, world: World, slot: int, reader_cls: type[RingReader] = RingReader) -> None:
        self.slot = slot
        self.feed = Feed(
            DS,
            fanout=FanOut(clock_ns=clock_ns),
            clock_ns=clock_ns,
            slice_size=SLICE,
            backpressure=world.lossless,
        )
        self.follower = FakeFollower()
        self.feed.journal = self.follower  # type: ignore[assignment]  # a stand-in follower
        self.members = add_members(self.feed, behavior=world.behavior, lossless=world.lossless)
        world.writer.set_live(slot, True)
        # as a worker process maps it: the data area read-only
        self.ring = Ring.attach(world.ring.name, creator=os.getpid())
        assert self.ring.data.readonly
        self.reader = reader_cls(self.ring, slot, start=world.writer.head)
        self.efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        world.waker.add(slot, self.efd)
        self.blocked: list[bool] = []
        self.registry = CollectorRegistry()

        def notify(dataset: str, blocked: bool) -> None:
            assert dataset == DS
            self.blocked.append(blocked)
            world.sup.remote_blocked(slot, blocked)

        self.pins = PinTracker(enabled=True)
        self.feeder = RingFeeder(
            {DS: self.feed},
            {DS: self.reader},
            self.pins,
            {DS: world.lossless},
            notify,
            efd=self.efd,
            registry=self.registry,
        )

    def caught_up(self, head: int) -> bool:
        return self.reader.pos == head and not self.feed.paused and not self.feeder._scheduled


class World:
    def __init__(
        self,
        *,
        ring_bytes: int = 1 << 20,
        workers: int = 2,
        lossless: bool = False,
        behavior: str = "warn",
    ) -> None:
        self.lossless = lossless
        self.behavior = behavior
        self.ring = Ring.create(ring_bytes, 4)
        self.writer = RingWriter(self.ring)
        self.waker = Waker()
        self.registry = CollectorRegistry()
        self.sink = RingSink(self.writer, wake=self.waker.wake, registry=self.registry)
        self.sup = Feed(
            DS, fanout=self.sink, clock_ns=clock_ns, slice_size=SLICE, backpressure=lossless
        )
        self.sup.journal = FakeJournal()  # type: ignore[assignment]  # a stand-in journal
        self.sink.attach(self.sup)
        self.flow: list[bool] = []
        self.sup.flow_listeners.append(self.flow.append)
        self.ref = Feed(
            DS,
            fanout=FanOut(clock_ns=clock_ns),
            clock_ns=clock_ns,
            slice_size=SLICE,
            backpressure=lossless,
        )
        self.ref_members = add_members(self.ref, behavior=behavior, lossless=lossless)
        self.workers = [Worker(self, slot) for slot in range(workers)]

    def both(self, op: Callable[[Feed], None]) -> None:
        op(self.sup)
        op(self.ref)

    def idle(self) -> bool:
        feeds = [self.sup, self.ref] + [w.feed for w in self.workers]
        if any(f.paused or f._drain_pending for f in feeds) or self.sink.pending:
            return False
        head = self.writer.head
        return all(w.caught_up(head) for w in self.workers)

    async def settle(self, timeout: float = 3.0) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while not self.idle():
            assert loop.time() < end, "the workers did not catch up"
            await asyncio.sleep(0.001)

    def close(self) -> None:
        for w in self.workers:
            w.feeder.stop()
            os.close(w.efd)
            w.ring.close()
        self.sink.close()
        self.ring.unlink()
        self.ring.close()


@pytest.fixture
def worlds():
    made: list[World] = []

    def make(**kw: Any) -> World:
        world = World(**kw)
        made.append(world)
        return world

    yield make
    for world in made:
        world.close()


def chunk(recs: list[bytes]) -> dbn.ChunkIndex:
    index, used = dbn.index_records(b"".join(recs))
    assert used == sum(map(len, recs))
    return index


def merged(log: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """The log with consecutive data pieces joined (a chunk split over ring entries)."""
    out: list[tuple[Any, ...]] = []
    for entry in log:
        if entry[0] == "data" and out and out[-1][0] == "data":
            out[-1] = ("data", out[-1][1] + entry[1], out[-1][2] + entry[2])
        else:
            out.append(entry)
    return out


def trades(*ids: int, at: int = 0) -> list[bytes]:
    return [trade(iid, NOW_NS + at + n, sequence=at + n) for n, iid in enumerate(ids)]


# --- the same records in the same order ---------------------------------------------------------


async def test_workers_see_exactly_what_a_single_process_feed_sees(worlds):
    world = worlds(workers=2)
    for w in world.workers:
        w.feeder.start()
    tbbo = list(sample_records("GLBX.MDP3", "tbbo"))
    burst = [(f"BURST{i}", 3000 + i) for i in range(30)]
    ops: list[Callable[[Feed], None]] = [
        lambda f: f.on_metadata(SimpleNamespace(schema="tbbo"), mappings=[("ESZ4", 1001)]),
        lambda f: f.set_state(True, "publisher connected"),
        lambda f: f.learn_many([("NQZ4", 1002)]),
        lambda f: f.publish(chunk(trades(1001, 1002, 1001, at=0))),
        lambda f: f.publish(chunk(tbbo)),
        # definitions and a SymbolMappingMsg inside the data (learnt, then stripped)
        lambda f: f.publish(
            chunk([definition(2003, "DEF3"), symbol_mapping(2004, "MAP4")] + trades(2003, 2004))
        ),
        lambda f: f.set_state(False, "publisher gone"),
        lambda f: f.set_state(True, "publisher connected"),
        # a burst larger than a slice: learnt slice by slice (the source paused)
        lambda f: f.learn_many(burst),
        lambda f: f.publish(chunk(trades(3005, 1001, at=10))),
        lambda f: f.publish(chunk(trades(*range(3000, 3030), at=20))),
    ]
    for op in ops:
        world.both(op)
        await world.settle()
    ref = world.ref_members
    for w in world.workers:
        for name, member in w.members.items():
            assert member.log == ref[name].log, name
    # a chunk larger than a quarter of the ring: several entries, the same records
    big = trades(*([1001, 1002, 2003] * 2000), at=100)
    entries = world.sink.entries
    world.both(lambda f: f.publish(chunk(big)))
    await world.settle()
    assert world.sink.entries - entries > 1
    for w in world.workers:
        for name, member in w.members.items():
            assert merged(member.log) == merged(ref[name].log), name
        assert w.feed.directory.log == world.sup.directory.log == world.ref.directory.log
        assert w.feed.schema_rtype == world.ref.schema_rtype
        assert (w.feed.connected, w.feed.state_detail) == (True, "publisher connected")
        # every CHUNK entry carried the supervisor journal's seq of its chunk
        # (the big chunk's pieces share its seq)
        noted = w.follower.noted
        assert noted == sorted(noted) and noted.count(noted[-1]) == 2
        assert set(noted) == set(range(1, world.sup.journal.last_seq + 1))
    # something of every kind reached the sessions
    named = decode(world.workers[0].members["named"].data)
    assert {r.instrument_id for r in named} == {1001, 1002, 2003, 3005}
    assert decode(world.workers[0].members["tbbo"].data) == decode(b"".join(tbbo))
    assert world.workers[0].members["mbp1"].data == b""  # tbbo feed: no mbp-1
    gateway = [
        decode(e[1])[0] for e in world.workers[1].members["all_trades"].log if e[0] != "data"
    ]
    texts = [g.msg for g in gateway if isinstance(g, d.SystemMsg)]
    assert f"Feed {DS}: publisher gone" in texts
    assert not world.sink.pending
    assert world.waker.writes >= 1


async def test_budget_per_turn_and_release_at_the_reader(worlds):
    world = worlds(workers=1)
    w = world.workers[0]
    w.feeder.budget_entries = 4
    w.feeder.budget_s = 10.0  # (the time budget is not what this checks)
    for n in range(10):
        world.sup.publish(chunk(trades(1001, at=n)))
    assert w.feeder.run() is True  # more left: another turn is scheduled
    assert w.feeder.entries == 4
    assert world.writer.release_of(0) == w.reader.pos
    await world.settle()
    assert w.feeder.entries == 10
    assert world.writer.release_of(0) == world.writer.head


# --- ring full: the source paused, nothing lost -------------------------------------------------


async def publish_until_full(
    world: World, stalled: Worker, make: Callable[[int], list[bytes]], *, ref: bool = False
) -> list[bytes]:
    """Publish chunks ``make(n)`` until the supervisor's source is paused (the ring full
    because ``stalled`` reads nothing), letting the other workers keep up; the chunks."""
    loop = asyncio.get_running_loop()
    others = [w for w in world.workers if w is not stalled]
    sent: list[bytes] = []
    n = 0
    while not world.sup.paused:
        assert n < 2000, "the ring never filled"
        recs = make(n)
        sent.append(b"".join(recs))
        world.sup.publish(chunk(recs))
        if ref:
            world.ref.publish(chunk(recs))
        n += 1
        end = loop.time() + 3.0
        while any(w.reader.pos != world.writer.head for w in others):
            assert loop.time() < end, "a worker did not keep up"
            await asyncio.sleep(0.001)
    return sent


async def test_ring_full_pauses_the_source_and_loses_nothing(worlds):
    # lossless: the slow worker may not skip (on other feeds it would jump ahead, below)
    world = worlds(ring_bytes=64 << 10, workers=2, lossless=True)
    fast, slow = world.workers
    fast.feeder.start()  # the slow worker does not read yet
    sent = await publish_until_full(
        world, slow, lambda n: trades(*[1001, 1002] * 12, at=24 * n), ref=True
    )
    assert world.flow == [True]
    assert world.sink.full_events == 1
    full = world.registry.get_sample_value("gateway_worker_ring_full_total", {"dataset": DS})
    assert full == 1
    assert world.writer.holders() == [slow.slot]
    # The source may still push what it had read: it queues behind, in order.
    for k in range(5):
        recs = trades(1002, at=10_000 + k)
        sent.append(b"".join(recs))
        world.both(lambda f, recs=recs: f.publish(chunk(recs)))
    assert len(world.sink.pending) >= 6
    await asyncio.sleep(0.01)  # the sink retries while the slow worker still reads nothing
    assert world.sup.paused and world.flow == [True]
    slow.feeder.start()
    await world.settle()
    assert world.flow == [True, False]
    assert not world.sup.paused and world.sink.full_since is None
    for w in world.workers:
        for name, member in w.members.items():
            assert member.log == world.ref_members[name].log, name
            assert not member.cuts
        want = [r for r in decode(b"".join(sent)) if r.instrument_id in (1001, 2003)]
        assert decode(w.members["by_id"].data) == want
        assert w.feeder.skips[DS] == 0


# --- a worker behind the ring: skip or cut, never wrong bytes -------------------------------------


@pytest.mark.parametrize("behavior", ["skip", "warn"])
async def test_a_worker_behind_the_ring_skips_ahead_and_tells_its_sessions(worlds, behavior):
    world = worlds(ring_bytes=64 << 10, workers=2, behavior=behavior)
    ok, stalled = world.workers
    whole = Member(behavior=behavior)  # wants every record: handed the ring entry itself
    whole.feed = stalled.feed
    stalled.feed.join(whole)
    stalled.feed.subscribe(whole, Subscription("trades", "raw_symbol", (ALL_SYMBOLS,), 9))
    ok.feeder.start()
    stalled.feeder.skip_after_s = 0.0  # (the persistence is checked below)

    def make(n: int) -> list[bytes]:
        if n == 5:
            world.sup.learn_many([("LATE", 4242)])  # among the chunks that will be skipped
        return trades(*[1001, 1002, 4242] * 8, at=24 * n)

    sent = await publish_until_full(world, stalled, make)
    records = 24 * len(sent)
    assert stalled.reader.behind() > world.ring.size // 2
    # the source may still push a few: held (pending), read after the jump
    tail = [trades(2003, 1001, at=50_000 + k) for k in range(3)]
    for recs in tail:
        sent.append(b"".join(recs))
        world.sup.publish(chunk(recs))
    stalled.feeder.start()
    await world.settle()
    assert stalled.feeder.skips[DS] == 1
    skipped = stalled.feeder.skipped_records[DS]
    assert 0 < skipped <= records
    sample = stalled.registry.get_sample_value
    assert sample("gateway_worker_ring_skips_total", {"dataset": DS}) == 1
    assert sample("gateway_worker_ring_skipped_records_total", {"dataset": DS}) == skipped
    # the mapping learnt among the skipped chunks was still applied, in order
    assert stalled.feed.directory.by_symbol["LATE"] == 4242
    members = list(stalled.members.values()) + [whole]
    for member in members:
        if behavior == "skip":
            assert not member.cuts
            assert member.slow.skipped == skipped
            # told before its next chunk: the slow-reader notice with the count
            assert member.slow.on_chunk(0, 64, 1, 0.0) is Verdict.SEND
            [(_, event, record)] = member.slow.notice_records(NOW_NS)
            assert event == "skipped"
            assert decode(record)[0].err == f"Skipped {skipped} records after slow reading"
        else:
            assert member.cuts == [("ring_behind", behind_text(64 << 10))]
            assert member not in stalled.feed.members
    if behavior == "skip":
        # never wrong bytes: what it got after the jump are whole published chunks, the
        # last ones, in order
        got = [e[1] for e in whole.log if e[0] == "data"]
        assert len(got) >= len(tail)
        assert got == sent[len(sent) - len(got) :]
        ids = decode(stalled.members["by_id"].data)
        want = [r for r in decode(b"".join(sent)) if r.instrument_id in (1001, 2003)]
        assert ids and ids == want[len(want) - len(ids) :]
    else:
        assert whole.data == b""
    # the worker that kept up got everything, untouched
    assert decode(ok.members["all_trades"].data, ts_out=True)[0].sequence == 0
    assert len(decode(ok.members["by_id"].data)) == sum(
        1 for r in decode(b"".join(sent)) if r.instrument_id in (1001, 2003)
    )
    assert not any(m.cuts for m in ok.members.values()) and ok.feeder.skips[DS] == 0


async def test_a_worker_catching_up_after_a_burst_does_not_skip(worlds):
    # More than half the ring behind for a moment (the writer was held by another worker,
    # or one burst of large chunks) is not falling behind: it catches up, nothing skipped.
    world = worlds(ring_bytes=64 << 10, workers=2)
    ok, late = world.workers
    ok.feeder.start()
    sent = await publish_until_full(world, late, lambda n: trades(*[1001, 2003] * 12, at=24 * n))
    assert late.reader.behind() > world.ring.size // 2
    late.feeder.start()
    await world.settle()
    assert late.feeder.skips[DS] == 0
    assert not any(m.cuts for m in late.members.values())
    want = [r for r in decode(b"".join(sent)) if r.instrument_id in (1001, 2003)]
    assert decode(late.members["by_id"].data) == want


async def test_a_worker_skips_only_after_being_behind_for_skip_after_s(worlds):
    world = worlds(ring_bytes=64 << 10, workers=2)
    ok, slow = world.workers
    now = [100.0]
    slow.feeder._clock = lambda: now[0]
    slow.feeder.budget_entries = 2  # a worker that cannot catch up in one turn
    ok.feeder.start()
    await publish_until_full(world, slow, lambda n: trades(*[1001] * 24, at=24 * n))
    assert slow.feeder.run() is True  # behind: noted, not skipped yet
    now[0] += 0.2
    slow.feeder.run()
    assert slow.feeder.skips[DS] == 0 and slow.feeder.entries == 4
    now[0] += 0.06  # behind at the start of every turn for 0.26 s
    slow.feeder.run()
    assert slow.feeder.skips[DS] == 1
    assert all(m.cuts for m in slow.members.values())


# --- lossless: blocked notifications, no skipping ----------------------------------------------


async def test_lossless_blocked_session_pauses_the_supervisor_and_nothing_is_skipped(worlds):
    world = worlds(ring_bytes=64 << 10, workers=2, lossless=True)
    a, b = world.workers
    for w in world.workers:
        w.feeder.start()
    member = b.members["by_id"]
    b.feed.member_blocked(member, True)
    assert b.blocked == [True]
    assert world.sup.paused and world.sup.pauses == 1
    sent: list[bytes] = []
    for n in range(200):  # the source may still push: held in the ring, then pending
        recs = trades(1001, 2003, at=2 * n)
        sent.append(b"".join(recs))
        world.sup.publish(chunk(recs))
        await asyncio.sleep(0)
    assert world.writer.holders() == [b.slot] or not world.sink.pending
    assert b.reader.behind() > 0
    b.feed.member_blocked(member, False)
    assert b.blocked == [True, False]
    assert a.blocked == []
    await world.settle()
    assert not world.sup.paused
    for w in world.workers:
        assert w.feeder.skips[DS] == 0
        assert decode(w.members["by_id"].data) == decode(b"".join(sent))


# --- chunks held during a mapping burst, pins -----------------------------------------------------


class RecordingReader(RingReader):
    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.calls: list[int] = []

    def release(self, pos: int) -> None:
        self.calls.append(pos)
        super().release(pos)


async def test_release_never_passes_a_chunk_held_behind_a_mapping_burst(worlds):
    world = worlds(workers=1)
    w = Worker(world, 1, reader_cls=RecordingReader)
    world.workers.append(w)
    reader = w.reader
    assert isinstance(reader, RecordingReader)
    held_at: list[int] = []
    seen: list[tuple[int, bool]] = []
    lane = w.feeder.lanes[0]

    def watch(data: Any) -> None:
        # the held chunk is published as ring memory, pinned at its own entry
        seen.append((w.pins.current_pos, data is w.pins.current_view))

    whole = Member()  # wants every record of these chunks: handed the entry's own view
    whole.watch = watch
    w.feed.join(whole)
    w.feed.subscribe(whole, Subscription("definition", "raw_symbol", (ALL_SYMBOLS,), 7))
    w.feed.subscribe(whole, Subscription("trades", "raw_symbol", (ALL_SYMBOLS,), 8))
    releases_while_held: list[tuple[int, int]] = []
    real_release = reader.release

    def release(pos: int) -> None:
        if lane.held_pos is not None:
            held_at.append(lane.held_pos)
            releases_while_held.append((pos, lane.held_pos))
        real_release(pos)

    reader.release = release  # type: ignore[method-assign]
    for x in world.workers:
        x.feeder.start()
    # definitions of more instruments than a slice, then trades: the worker's Feed learns
    # them in slices (paused), its chunk held in ring memory meanwhile
    defs = [definition(5000 + i, f"HELD{i}") for i in range(3 * SLICE)]
    recs = defs + trades(5001, 5002)
    world.both(lambda f: f.publish(chunk(recs)))
    world.both(lambda f: f.publish(chunk(trades(5003, at=50))))
    await world.settle()
    assert releases_while_held, "the feed never held the chunk"
    assert all(pos <= held for pos, held in releases_while_held)
    entry_pos = held_at[0]
    assert (entry_pos, True) in seen
    assert lane.held_pos is None
    assert world.writer.release_of(1) == world.writer.head
    # the same records and mappings as one process (how announcements interleave with
    # the data during a burst depends on how the supervisor sliced it)
    for name, member in w.members.items():
        ref = world.ref_members[name]
        assert member.data == ref.data, name
        assert sorted(e[1] for e in member.log if e[0] == "gateway") == sorted(
            e[1] for e in ref.log if e[0] == "gateway"
        ), name
    assert decode(whole.data) == decode(b"".join(recs + trades(5003, at=50)))


class FakeTransport:
    def __init__(self) -> None:
        self.buffered = 0
        self.aborted = 0

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def abort(self) -> None:
        self.aborted += 1


class PinnedConn:
    """A connection whose transport kept part of a ring entry."""

    def __init__(self, feed: Feed) -> None:
        self.feed = feed
        self.transport = FakeTransport()
        self.bytes_sent = 0
        self.cuts: list[tuple[str, str]] = []

    def cut(self, label: str, message: str) -> None:
        self.cuts.append((label, message))


async def test_pins_hold_the_release_and_a_pin_too_old_is_cut(worlds):
    world = worlds(ring_bytes=64 << 10, workers=1)
    w = world.workers[0]
    w.feeder.start()
    world.sup.publish(chunk(trades(1001)))
    await world.settle()
    conn = PinnedConn(w.feed)
    pinned_at = world.writer.head  # the next entry: its transport will keep part of it
    conn.transport.buffered = 100
    conn.bytes_sent = 100
    w.pins.begin(pinned_at, memoryview(b""), DS)  # (as while that entry was published)
    w.pins.note(conn, pinned_at, 100)
    w.pins.end()
    n = 0
    while not conn.cuts:
        assert n < 1000, "the pinned session was never cut"
        world.sup.publish(chunk(trades(1002, 1001, at=2 * n)))
        await asyncio.sleep(0)
        assert world.writer.release_of(0) <= pinned_at
        n += 1
    assert conn.cuts == [("ring_pin", PIN_TEXT)]
    assert w.feeder.pin_cuts == 1 and not conn.transport.aborted
    assert world.writer.head - pinned_at > world.ring.size // 2
    # still pinned three quarters of the ring back, before the writer has to wait: aborted
    while not conn.transport.aborted:
        assert n < 2000 and not world.sup.paused, "the pinned session was never aborted"
        world.sup.publish(chunk(trades(1002, 1001, at=2 * n)))
        await asyncio.sleep(0)
        assert world.writer.release_of(0) <= pinned_at
        n += 1
    assert world.writer.head - pinned_at > world.ring.size * 3 // 4
    assert w.feeder.pin_aborts == 1 and conn.transport.aborted == 1
    # once its transport has sent the entry (or the connection is gone) the release moves
    conn.transport.buffered = 0
    await world.settle()
    loop = asyncio.get_running_loop()
    end = loop.time() + 3.0
    while world.writer.release_of(0) != world.writer.head:
        assert loop.time() < end, "the release never moved past the pin"
        await asyncio.sleep(0.001)
    assert not world.sup.paused
    assert conn.cuts == [("ring_pin", PIN_TEXT)]


# --- a worker started late ---------------------------------------------------------------------


async def test_a_worker_started_late_restores_the_snapshot(worlds):
    world = worlds(workers=1)
    world.workers[0].feeder.start()
    world.sup.on_metadata(SimpleNamespace(schema="tbbo"), mappings=[("ESZ4", 1001)])
    world.sup.learn_many([("NQZ4", 1002), ("ESZ4", 1003)])
    world.sup.set_state(True, "publisher connected")
    world.sup.publish(chunk(trades(1001)))
    await world.settle()
    late = Worker(world, 2)
    world.workers.append(late)
    late.feeder.restore(DS, world.sink.snapshot())
    late.feeder.start()
    world.sup.publish(chunk(trades(1003, 1002, at=5)))
    await world.settle()
    assert late.feed.directory.log == world.sup.directory.log
    assert late.feed.directory.by_symbol == {"ESZ4": 1003, "NQZ4": 1002}
    assert late.feed.schema_rtype["tbbo"] == 0x01 and late.feed.schema_rtype["mbp-1"] < 0
    assert (late.feed.connected, late.feed.state_detail) == (True, "publisher connected")
    assert decode(late.members["named"].data) == decode(b"".join(trades(1003, 1002, at=5)))


async def test_pins_of_one_dataset_do_not_hold_another_datasets_ring():
    # one worker, two datasets, one pin tracker: ring positions of different datasets are
    # not comparable, so a pin in A must not hold B's release back (nor B's pins A's)
    rings = {ds: Ring.create(64 << 10, 2) for ds in ("A", "B")}
    try:
        writers = {ds: RingWriter(ring) for ds, ring in rings.items()}
        sinks = {ds: RingSink(writer) for ds, writer in writers.items()}
        sups = {ds: Feed(ds, fanout=sinks[ds]) for ds in rings}
        for ds in rings:
            sinks[ds].attach(sups[ds])
            writers[ds].set_live(0, True)
        readers = {ds: RingReader(rings[ds], 0) for ds in rings}
        feeds = {ds: Feed(ds) for ds in rings}
        pins = PinTracker(enabled=True)
        feeder = RingFeeder(feeds, readers, pins, {"A": False, "B": False}, lambda ds, b: None)
        sups["B"].publish(chunk(trades(1001)))  # B is ahead of A
        sups["B"].publish(chunk(trades(1001)))
        feeder.run()
        conn = PinnedConn(feeds["A"])
        conn.transport.buffered = conn.bytes_sent = 1
        pinned_at = writers["A"].head
        pins.begin(pinned_at, memoryview(b""), "A")  # (as while that entry was published)
        pins.note(conn, pinned_at, 1)
        pins.end()
        for n in range(20):
            for ds in rings:
                sups[ds].publish(chunk(trades(1001, 1002, at=n)))
            feeder.run()
        assert writers["A"].release_of(0) == pinned_at < readers["A"].pos
        assert writers["B"].release_of(0) == readers["B"].pos == writers["B"].head
        conn.transport.buffered = 0
        feeder.tick()
        assert writers["A"].release_of(0) == readers["A"].pos == writers["A"].head
    finally:
        for ring in rings.values():
            ring.unlink()
            ring.close()


def test_the_dataset_served_first_rotates():
    rings = {ds: Ring.create(64 << 10, 2) for ds in ("A", "B")}
    try:
        sups: dict[str, Feed] = {}
        for ds, ring in rings.items():
            writer = RingWriter(ring)
            sink = RingSink(writer)
            sups[ds] = Feed(ds, fanout=sink)
            sink.attach(sups[ds])
            writer.set_live(0, True)
        readers = {ds: RingReader(rings[ds], 0) for ds in rings}
        feeds = {ds: Feed(ds) for ds in rings}
        ticks = iter(range(1000))
        feeder = RingFeeder(
            feeds,
            readers,
            PinTracker(enabled=False),
            {"A": False, "B": False},
            lambda ds, b: None,
            budget_s=3.5,  # four entries of this clock: the first dataset uses it up
            clock=lambda: float(next(ticks)),
        )
        for n in range(10):
            for sup in sups.values():
                sup.publish(chunk(trades(1001, at=n)))
        feeder.run()
        feeder.run()
        # (4 + 1 each; served in the same order every turn: 8 and 2)
        assert feeds["A"].stats.chunks_in == feeds["B"].stats.chunks_in == 5
    finally:
        for ring in rings.values():
            ring.unlink()
            ring.close()
