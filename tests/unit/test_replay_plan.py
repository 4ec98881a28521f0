"""The replay planner (gateway/replay/plan.py) against a real journal in tmp_path: what a
replaying session gets, in order — file ranges where it wants whole parts, filtered copies
elsewhere, mappings as of the start and where they changed, refusals."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import zstandard

from gateway import dbn
from gateway.control import ALL_SYMBOLS
from gateway.dbn import ErrorCode, index_records
from gateway.journal import DatasetJournal, JournalStore
from gateway.replay.plan import (
    OPENING_SLICE,
    Chunk,
    FileRange,
    Replay,
    Retire,
    check,
    iso_ns,
)
from tests.unit.conftest import decode, header, mbo, split_records, trade

T0 = 1_764_000_000_000_000_000
MAPPINGS = {"AAA": 11, "BBB": 22, "CCC": 33}


@dataclass(frozen=True)
class Sub:
    schema: str
    symbols: tuple[str, ...] = (ALL_SYMBOLS,)
    stype_in: str = "raw_symbol"
    sub_id: int | None = None
    start_ns: int | None = None
    resume_after: int | None = None
    resume_epoch: str | None = None
    all_symbols: bool = field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "all_symbols", ALL_SYMBOLS in self.symbols)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[JournalStore]:
    s = JournalStore.open(tmp_path / "journal")
    yield s
    s.close()


def journal_of(store: JournalStore, chunks: list[list[bytes]]) -> DatasetJournal:
    j = store.dataset("TEST.PLAN")
    j.learn(list(MAPPINGS.items()), ts=T0)
    for chunk in chunks:
        index, _ = index_records(b"".join(chunk))
        assert j.append(index) > 0
    return j


def play(replay: Replay, budget: int = 1 << 20) -> tuple[bytes, list[object]]:
    """Run the replay to its target: the bytes a session would get, and every item."""
    out = bytearray()
    items: list[object] = []
    for _ in range(10_000):
        step = replay.step(budget)
        items += step
        for item in step:
            if isinstance(item, Chunk):
                out += item.data
            elif isinstance(item, FileRange):
                got = os.pread(item.fd, item.length, item.offset)
                assert len(got) == item.length
                out += got
            else:
                assert isinstance(item, Retire)
                replay.release(item.fds)
        if replay.caught_up:
            break
    assert replay.caught_up
    return bytes(out), items


def data_of(out: bytes) -> list[bytes]:
    return [r for r in split_records(out) if r[1] not in dbn.GATEWAY_RTYPES]


def mapping_symbols(out: bytes) -> list[tuple[int, str]]:
    return [
        (rec.instrument_id, rec.stype_in_symbol)
        for rec in decode(out)
        if int(rec.rtype) == dbn.RTYPE_SYMBOL_MAPPING
    ]


def jittered(seed: int, chunks: int, per: int, ids: tuple[int, ...] = (11, 22, 33)) -> list:
    """Trade chunks whose ts_event goes up by 1 µs a record with ±3 µs of jitter."""
    rng = np.random.default_rng(seed)
    out = []
    n = 0
    for _ in range(chunks):
        chunk = []
        for _ in range(per):
            ts = T0 + n * 1000 + int(rng.integers(-3000, 3000))
            chunk.append(trade(int(rng.choice(ids)), ts, sequence=n))
            n += 1
        out.append(chunk)
    return out


def test_all_symbols_from_zero_is_one_coalesced_file_range(
    store: JournalStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    chunks = jittered(1, 20, 7)
    j = journal_of(store, chunks)
    # straight from the index rows: no Entry object per part on this path
    monkeypatch.setattr(j, "entries", None)
    replay = Replay(j, [Sub("trades", start_ns=0)], schema_rtype=dbn.SCHEMA_RTYPE)
    head = replay.opening(0)
    assert sorted(mapping_symbols(b"".join(head))) == sorted((i, s) for s, i in MAPPINGS.items())
    out, items = play(replay)
    assert data_of(out) == [r for c in chunks for r in c]
    ranges = [i for i in items if isinstance(i, FileRange)]
    assert len(ranges) == 1 and not any(isinstance(i, Chunk) for i in items)
    assert ranges[0].records == 140
    replay.close()


def test_start_filters_on_jittered_ts_and_whole_parts_go_as_ranges(store: JournalStore) -> None:
    chunks = jittered(2, 30, 10)
    j = journal_of(store, chunks)
    start = T0 + 95_500  # inside chunk 9 or 10, with jitter around it
    replay = Replay(j, [Sub("trades", start_ns=start)], schema_rtype=dbn.SCHEMA_RTYPE)
    out, items = play(replay)
    want = [r for c in chunks for r in c if header(r)[4] >= start]
    assert data_of(out) == want
    # the records just before the start that jitter past it are kept, in journal order
    assert any(header(a)[4] > header(b)[4] for a, b in zip(want, want[1:], strict=False))
    assert any(isinstance(i, Chunk) for i in items)  # the boundary chunks are copies
    assert any(isinstance(i, FileRange) for i in items)  # the rest is ranged
    replay.close()


def test_named_symbols_ts_out_and_zstd_are_copies(store: JournalStore) -> None:
    chunks = jittered(3, 10, 9)
    j = journal_of(store, chunks)
    sub = Sub("trades", symbols=("BBB", "ZZZ"), start_ns=0)
    replay = Replay(j, [sub], schema_rtype=dbn.SCHEMA_RTYPE, ts_out=True)
    head = replay.opening(0)
    assert mapping_symbols(b"".join(head)) == [(22, "BBB")]
    errors = [r for r in head if r[1] == dbn.RTYPE_ERROR]
    assert len(errors) == 1 and b"Failed to resolve symbol: ZZZ" in errors[0]
    out, items = play(replay)
    assert not any(isinstance(i, FileRange) for i in items)
    recs = decode(out, ts_out=True)
    assert [r.instrument_id for r in recs] == [
        header(r)[3] for c in chunks for r in c if header(r)[3] == 22
    ]
    assert all(r.ts_out > 0 for r in recs)
    replay.close()

    z = Replay(
        j,
        [Sub("trades", start_ns=0)],
        schema_rtype=dbn.SCHEMA_RTYPE,
        compress=zstandard.ZstdCompressor().compress,
    )
    zout, zitems = play(z, budget=400)
    assert all(isinstance(i, Chunk) for i in zitems) and len(zitems) > 2
    plain = b"".join(
        zstandard.ZstdDecompressor().decompress(bytes(i.data), max_output_size=1 << 20)
        for i in zitems
        if isinstance(i, Chunk)
    )
    assert data_of(plain) == [r for c in chunks for r in c]
    assert zout != plain
    z.close()


def test_two_subscriptions_with_different_starts_merge_in_live_order(
    store: JournalStore,
) -> None:
    # Mixed chunks: trades and mbo interleaved as a feed would publish them.
    chunks = []
    for c in range(12):
        chunk = []
        for k in range(6):
            ts = T0 + (c * 6 + k) * 1000
            chunk.append(trade(11, ts, sequence=c * 6 + k) if k % 2 else mbo(22, ts, order_id=k))
        chunks.append(chunk)
    j = journal_of(store, chunks)
    t_start, m_start = T0 + 20_000, T0 + 50_000
    subs = [
        Sub("trades", start_ns=t_start),
        Sub("mbo", symbols=("BBB",), start_ns=m_start),
    ]
    replay = Replay(j, subs, schema_rtype=dbn.SCHEMA_RTYPE)
    out, _ = play(replay, budget=300)
    want = [
        r
        for c in chunks
        for r in c
        if (r[1] == 0x00 and header(r)[4] >= t_start) or (r[1] == 0xA0 and header(r)[4] >= m_start)
    ]
    assert data_of(out) == want
    assert replay.schemas == ["trades", "mbo"]
    replay.close()


def test_mapping_changes_are_inserted_before_their_chunk(store: JournalStore) -> None:
    j = store.dataset("TEST.PLAN")
    j.learn([("AAA", 11)], ts=T0)
    for c in range(6):
        if c == 3:
            j.learn([("BBB", 22)], ts=T0)  # effective before chunk 4 (seq 4)
        chunk = [trade(11, T0 + c * 10), trade(22, T0 + c * 10 + 1)]
        j.append(index_records(b"".join(chunk))[0])
    replay = Replay(
        j, [Sub("trades", symbols=("AAA", "BBB"), start_ns=0)], schema_rtype=dbn.SCHEMA_RTYPE
    )
    head = replay.opening(0)
    assert mapping_symbols(b"".join(head)) == [(11, "AAA")]
    assert any(b"Failed to resolve symbol: BBB" in r for r in head)
    out, _ = play(replay)
    kinds = [(r[1], header(r)[3]) for r in split_records(out)]
    # chunks 1-3: AAA only; BBB's mapping before chunk 4; then both, in chunk order
    assert (
        kinds == [(0x00, 11)] * 3 + [(dbn.RTYPE_SYMBOL_MAPPING, 22)] + [(0x00, 11), (0x00, 22)] * 3
    )
    assert replay.announced == {
        (dbn.STYPE_RAW_SYMBOL, "AAA"): 11,
        (dbn.STYPE_RAW_SYMBOL, "BBB"): 22,
    }
    # A mapping learnt after the last chunk comes at the hand-over.
    j.learn([("CCC", 33), ("AAA", 44)], ts=T0)
    assert [decode(r)[0].stype_in_symbol for r in replay.finish(j.last_seq)] == ["AAA"]
    replay.close()


def test_resume_after_and_follow_the_journal_as_it_grows(store: JournalStore) -> None:
    chunks = jittered(4, 8, 5)
    j = journal_of(store, chunks)
    replay = Replay(j, [Sub("trades", resume_after=5)], schema_rtype=dbn.SCHEMA_RTYPE)
    out, _ = play(replay)
    assert data_of(out) == [r for c in chunks[5:] for r in c]
    more = jittered(5, 2, 5)
    for chunk in more:
        j.append(index_records(b"".join(chunk))[0])
    replay.extend(j.last_seq)
    assert not replay.caught_up
    out2, _ = play(replay)
    assert data_of(out2) == [r for c in more for r in c]
    replay.close()


def test_a_step_is_bounded(store: JournalStore) -> None:
    chunks = jittered(6, 60, 20)
    j = journal_of(store, chunks)
    replay = Replay(j, [Sub("trades", symbols=("AAA",), start_ns=0)], schema_rtype=dbn.SCHEMA_RTYPE)
    steps = 0
    while not replay.caught_up:
        replay.step(4096)
        steps += 1
        assert steps < 100
    assert steps >= 60 * 20 * 48 // 4096 // 2
    replay.close()


def test_refusals(store: JournalStore) -> None:
    chunks = jittered(7, 4, 5)
    j = journal_of(store, chunks)
    now = T0 + 10**12
    oldest = j.oldest_ts()
    assert oldest is not None
    aged = check(j, [Sub("trades", start_ns=oldest - 1)], now)
    assert aged is not None and aged.code == ErrorCode.REPLAY_DATA_AGED_OUT
    assert aged.reason == "aged_out"
    assert iso_ns(oldest) in aged.text and str(oldest) in aged.text
    assert check(j, [Sub("trades", start_ns=oldest)], now) is None
    assert check(j, [Sub("trades", start_ns=0)], now) is None
    future = check(j, [Sub("trades", start_ns=now + 2 * 10**9)], now)
    assert future is not None and future.reason == "future"
    assert future.code == ErrorCode.INVALID_SUBSCRIPTION
    ahead = check(j, [Sub("trades", resume_after=j.last_seq + 1)], now)
    assert ahead is not None and ahead.reason == "bad_resume"
    assert check(j, [Sub("trades", resume_after=0)], now) is None
    assert iso_ns(T0 + 5) == "2025-11-24T16:00:00.000000005Z"
    # named symbols: the hand-over registers them in one step, so their number is bounded
    syms = tuple(f"S{i}" for i in range(6_000))
    assert check(j, [Sub("trades", symbols=syms, start_ns=0), Sub("mbp-1")], now) is None
    many = check(j, [Sub("trades", symbols=syms, start_ns=0), Sub("mbp-1", symbols=syms)], now)
    assert many is not None and many.reason == "too_many_symbols"
    assert many.code == ErrorCode.INVALID_SUBSCRIPTION and "10000 named symbols" in many.text


def test_checkpoints_only_past_the_chunks_a_start_filters(store: JournalStore) -> None:
    chunks = jittered(8, 30, 10)
    j = journal_of(store, chunks)
    start = T0 + 95_500
    replay = Replay(j, [Sub("trades", start_ns=start)], schema_rtype=dbn.SCHEMA_RTYPE)
    # the last chunk holding a record older than the start (jitter): a resume after an
    # earlier position would replay that record, which this session was never sent
    last_filtered = max(i + 1 for i, c in enumerate(chunks) if min(map(ts_of, c)) < start)
    assert replay.checkpoint_from == last_filtered > replay.cursor
    more = [trade(11, start - 1, sequence=999)]  # a late record older than the start
    j.append(index_records(b"".join(more))[0])
    replay.extend(j.last_seq)
    assert replay.checkpoint_from == j.last_seq
    everything = Replay(j, [Sub("trades", start_ns=0)], schema_rtype=dbn.SCHEMA_RTYPE)
    assert everything.checkpoint_from == 0


def ts_of(rec: bytes) -> int:
    return header(rec)[4]


def test_a_subscription_without_start_joins_from_now(store: JournalStore) -> None:
    chunks = jittered(9, 6, 4)
    j = journal_of(store, chunks)
    subs = [Sub("trades", symbols=("AAA",), start_ns=0), Sub("trades", symbols=("BBB",))]
    replay = Replay(j, subs, schema_rtype=dbn.SCHEMA_RTYPE)
    assert replay.checkpoint_from == j.last_seq  # the second one begins at the session's start
    out, _ = play(replay)
    assert {header(r)[3] for r in data_of(out)} == {11}
    # what the feed publishes before the hand-over reaches both: nothing lost
    later = [trade(11, T0 + 10**9), trade(22, T0 + 10**9 + 1), trade(33, T0 + 10**9 + 2)]
    j.append(index_records(b"".join(later))[0])
    replay.extend(j.last_seq)
    out2, _ = play(replay)
    assert data_of(out2) == later[:2]
    replay.close()


def test_a_mapping_change_splits_the_range_around_it(store: JournalStore) -> None:
    j = store.dataset("TEST.PLAN")
    j.learn([("AAA", 11)], ts=T0)
    chunks = []
    for c in range(6):
        if c == 3:
            j.learn([("BBB", 22)], ts=T0)  # before chunk 4
        chunk = [trade(11, T0 + c * 10), trade(22, T0 + c * 10 + 1)]
        chunks.append(chunk)
        j.append(index_records(b"".join(chunk))[0])
    replay = Replay(j, [Sub("trades", start_ns=0)], schema_rtype=dbn.SCHEMA_RTYPE)
    out, items = play(replay)
    kinds = [type(i).__name__ for i in items]
    assert kinds == ["FileRange", "Chunk", "FileRange"], kinds
    assert [r.records for r in items if isinstance(r, FileRange)] == [6, 6]
    recs = split_records(out)
    assert recs[6][1] == dbn.RTYPE_SYMBOL_MAPPING and header(recs[6])[3] == 22
    assert data_of(out) == [r for c in chunks for r in c]
    replay.close()


def test_the_fast_run_is_consumed_step_by_step_while_the_journal_grows(
    store: JournalStore,
) -> None:
    # ALL_SYMBOLS from 0: the run of whole parts is found once and sent a step at a time;
    # small steps, and chunks appended between steps, give exactly the journal's records.
    chunks = jittered(9, 40, 10)
    j = journal_of(store, chunks)
    replay = Replay(j, [Sub("trades", start_ns=0)], schema_rtype=dbn.SCHEMA_RTYPE)
    out = bytearray()
    grown = jittered(10, 20, 10)
    for step in range(10_000):
        for item in replay.step(3 * 48 * 10):  # about three chunks a step
            assert isinstance(item, FileRange)
            out += os.pread(item.fd, item.length, item.offset)
        if step % 3 == 0 and grown:
            j.append(index_records(b"".join(grown.pop(0)))[0])
            replay.extend(j.last_seq)
        if replay.caught_up and not grown:
            break
    assert data_of(bytes(out)) == [r for c in jittered(9, 40, 10) + jittered(10, 20, 10) for r in c]
    replay.close()


def test_a_large_opening_is_written_in_slices_before_any_record(store: JournalStore) -> None:
    # 10,000 mappings as of the start (an ALL_SYMBOLS replay of a big feed): the first
    # slice comes with the ack, the rest a slice a step, all of it before any record.
    chunks = jittered(11, 3, 5)
    j = store.dataset("TEST.PLAN")
    j.learn([*MAPPINGS.items(), *((f"S{i}", 1000 + i) for i in range(10_000))], ts=T0)
    for chunk in chunks:
        j.append(index_records(b"".join(chunk))[0])
    replay = Replay(j, [Sub("trades", start_ns=0)], schema_rtype=dbn.SCHEMA_RTYPE)
    ack = dbn.encode_system(T0, "ack", dbn.SystemCode.SUBSCRIPTION_ACK)
    first = replay.begin([ack], slice_size=4096)
    assert first[0] == ack and len(first) == 4096
    assert not replay.caught_up
    slices = -(-(1 + 10_003 - 4096) // OPENING_SLICE)
    steps = [replay.step(1 << 20) for _ in range(slices)]
    sizes = [OPENING_SLICE] * (slices - 1) + [1 + 10_003 - 4096 - OPENING_SLICE * (slices - 1)]
    for items, size in zip(steps, sizes, strict=True):
        assert len(items) == 1 and isinstance(items[0], Chunk)  # mappings only, a slice
        assert len(mapping_symbols(bytes(items[0].data))) == size
    out, _ = play(replay)
    heads = [s[0] for s in steps]
    opening = b"".join(first[1:]) + b"".join(bytes(h.data) for h in heads if isinstance(h, Chunk))
    assert len(mapping_symbols(opening + out)) == 3 + 10_000  # every mapping once
    assert data_of(out) == [r for c in chunks for r in c]
    rtypes = index_records(opening + out)[0].rtypes.tolist()
    first_data = rtypes.index(0x00)
    assert first_data == 3 + 10_000 and set(rtypes[:first_data]) == {dbn.RTYPE_SYMBOL_MAPPING}
    replay.close()
