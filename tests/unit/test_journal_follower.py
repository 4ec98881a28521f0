"""The journal's read-only follower (issue 15, ``--workers N``): a worker reads the
journal the supervisor writes. Against a writer in the same test (and one follower in a
separate process): the same entries, row slices, mappings, order bytes and replay plans
for every seq; a row being written is not there until whole; segments the writer deleted
are noticed while open descriptors keep working; the follower never touches a file."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gateway import dbn
from gateway.config import JournalConfig
from gateway.control import START_SESSION, encode_subscription
from gateway.dbn import ChunkIndex, index_records
from gateway.errors import ConfigError
from gateway.feeds.base import Feed
from gateway.journal import DatasetJournal, JournalLockedError, JournalStore
from gateway.journal.follower import (
    FollowerJournal,
    FollowerStore,
    attach_follower,
    open_follower,
)
from gateway.journal.format import ROW_LEN
from gateway.journal.symlog import SYMBOLOGY_NAME
from gateway.replay.plan import Replay, check
from tests.unit import test_adapter
from tests.unit.test_replay_plan import T0, Sub, data_of, mapping_symbols, play

from .conftest import mbo, ohlcv, trade

DATASET = "TEST.FOLLOW"
REPO = Path(__file__).resolve().parents[2]
RTYPES = (0x00, 0xA0, 0x20)

server = test_adapter.server  # the fixture: a listener on the loop under test


def chunk(records: list[bytes]) -> ChunkIndex:
    index, used = index_records(b"".join(records))
    assert used == sum(len(r) for r in records)
    return index


def chunks(seed: int, n: int) -> list[list[bytes]]:
    """Chunks of trades, some mixed with mbo and ohlcv records (several rtypes, lengths)."""
    rng = np.random.default_rng(seed)
    out: list[list[bytes]] = []
    k = 0
    for c in range(n):
        records: list[bytes] = []
        for _ in range(int(rng.integers(1, 6))):
            iid = int(rng.choice((11, 22, 33)))
            ts = T0 + k * 1000 + int(rng.integers(-3000, 3000))
            kind = int(rng.integers(0, 6)) if c % 3 else 0
            records.append(
                mbo(iid, ts) if kind == 1 else ohlcv(iid, ts) if kind == 2 else trade(iid, ts)
            )
            k += 1
        out.append(records)
    return out


@pytest.fixture
def writer(tmp_path: Path) -> Iterator[JournalStore]:
    # small segments: the journal rolls every few chunks
    s = JournalStore.open(tmp_path / "journal", segment_bytes=1500, max_bytes=1 << 30)
    yield s
    s.close()


def tree_state(root: Path) -> dict[str, tuple[int, int, str]]:
    """Every file's (size, mtime_ns, sha256) under root."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            st = path.stat()
            out[str(path.relative_to(root))] = (
                st.st_size,
                st.st_mtime_ns,
                hashlib.sha256(path.read_bytes()).hexdigest(),
            )
    return out


def publish(wj: DatasetJournal, fj: FollowerJournal, records: list[bytes]) -> int:
    """The supervisor appends a chunk; the worker's feeder notes its seq, its Feed appends."""
    index = chunk(records)
    seq = wj.append(index)
    assert seq > 0
    fj.note_seq(seq)
    assert fj.append(index) == seq
    return seq


def view(j: DatasetJournal) -> dict[str, object]:
    """Everything the read API says about the journal, for every seq."""
    last = j.last_seq
    entries = j.entries(RTYPES, 0, last, max_rows=100_000)
    out: dict[str, object] = {
        "last": last,
        "first": j.first_seq(),
        "oldest": j.oldest_ts(),
        "newest": j.newest_ts(),
        "entries": [
            (e.seq, e.rtype, e.nparts, e.segment.id, e.offset, e.length, e.count)
            + (e.min_ts, e.max_ts, e.order_off)
            for e in entries
        ],
        "order": [j.order_bytes(e).hex() for e in entries if e.order_off >= 0],
        "slices": [
            (seg.id, rows.tobytes().hex())
            for after in range(0, last + 1, 3)
            for seg, rows in j.row_slices(after, min(last, after + 5))
        ],
        "as_of": [sorted(j.mappings_as_of(s).items()) for s in range(last + 2)],
        "changes": [j.mapping_changes(a, last + 1) for a in range(last + 1)],
        "skip": [
            j.skip_before_ts((rt,), T0 + ts) for rt in RTYPES for ts in range(-5000, 90_000, 7000)
        ],
    }
    stats = j.stats()
    out["stats"] = (stats.first_seq, stats.last_seq, stats.segments, stats.bytes, stats.enabled)
    return out


def test_follower_reads_what_the_writer_reads_for_every_seq(writer: JournalStore) -> None:
    root = writer.path
    wj = writer.dataset(DATASET)
    wj.learn([("AAA", 11), ("BBB", 22)], ts=T0)
    follower = FollowerStore.open(root)  # no lock: the writer holds it
    fj = follower.dataset(DATASET)
    assert fj.last_seq == 0 and fj.first_seq() == 0
    for c, records in enumerate(chunks(1, 30)):
        if c % 4 == 3:
            wj.learn([("CCC", 33 + c), ("AAA", 11 + c)], ts=T0 + c)
        publish(wj, fj, records)
        if c % 5 == 4:
            assert view(fj) == view(wj), c
    assert len(wj.segments) > 3
    assert view(fj) == view(wj)
    # a follower opened now reads the same from scratch
    again = FollowerStore.open(root).dataset(DATASET)
    assert view(again) == view(wj)
    follower.close()


def test_follower_never_modifies_a_file_and_takes_no_lock(writer: JournalStore) -> None:
    root = writer.path
    wj = writer.dataset(DATASET)
    wj.learn([("AAA", 11)], ts=T0)
    fs = FollowerStore.open(root)
    fj = fs.dataset(DATASET)
    for records in chunks(2, 12):
        publish(wj, fj, records)
    before = tree_state(root)
    view(fj)
    fs.maintain()
    replay = Replay(fj, [Sub("trades", start_ns=0)], schema_rtype=dbn.SCHEMA_RTYPE)
    play(replay)
    replay.close()
    fj.learn([("ZZZ", 99)], ts=T0)  # a no-op
    fs.close()
    assert tree_state(root) == before
    with pytest.raises(JournalLockedError):
        JournalStore.open(root)  # the writer still holds its lock


_CHILD = """
import json, sys
from gateway.journal.follower import FollowerStore
from tests.unit.test_journal_follower import view
store = FollowerStore.open(sys.argv[1])
j = store.dataset(sys.argv[2])
print(json.dumps(view(j)))
store.close()
"""


def test_a_follower_in_another_process_reads_the_same(writer: JournalStore) -> None:
    root = writer.path
    wj = writer.dataset(DATASET)
    wj.learn([("AAA", 11), ("BBB", 22)], ts=T0)
    for c, records in enumerate(chunks(3, 16)):
        if c == 7:
            wj.learn([("BBB", 44)], ts=T0)
        wj.append(chunk(records))
    before = tree_state(root)
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(root), DATASET],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout)
    assert got == json.loads(json.dumps(view(wj)))
    assert tree_state(root) == before


def test_last_seq_is_what_this_process_published(writer: JournalStore) -> None:
    wj = writer.dataset(DATASET)
    wj.learn([("AAA", 11)], ts=T0)
    fj = FollowerStore.open(writer.path).dataset(DATASET)
    indexes = [chunk(r) for r in chunks(4, 6)]
    seqs = [wj.append(i) for i in indexes]
    wj.learn([("BBB", 22)], ts=T0)  # effective before seq 7
    # The worker has published chunks 1-3 only: reads stop there.
    for seq, index in zip(seqs[:3], indexes[:3], strict=True):
        fj.note_seq(seq)
        assert fj.append(index) == seq
    assert fj.last_seq == 3
    assert [e.seq for e in fj.entries(RTYPES, 0, 6)] == [e.seq for e in wj.entries(RTYPES, 0, 3)]
    assert [s.id for s, _ in fj.row_slices(0, 6)] == [s.id for s, _ in wj.row_slices(0, 3)]
    assert fj.skip_before_ts((0x00,), T0 + 10**12) == 3
    assert fj.mapping_changes(0, fj.last_seq + 1) == [(1, "AAA", 11)]
    assert fj.mappings_as_of(fj.last_seq + 1) == {"AAA": 11}
    # mappings past it are what the file says (a resume ahead of this worker starts there)
    assert fj.mapping_changes(0, 10) == wj.mapping_changes(0, 10)
    assert fj.mappings_as_of(10) == wj.mappings_as_of(10) == {"AAA": 11, "BBB": 22}
    # a resume may name any seq on file (a sibling worker ahead gave the checkpoint)
    assert fj.end_seq() == wj.end_seq() == 6
    assert check(fj, [Sub("trades", resume_after=6)], T0 + 10**12) is None
    ahead = check(fj, [Sub("trades", resume_after=7)], T0 + 10**12)
    assert ahead is not None and ahead.reason == "bad_resume" and "ends at 6" in ahead.text
    # the rest, then the mapping learnt after the last chunk
    for seq, index in zip(seqs[3:], indexes[3:], strict=True):
        fj.note_seq(seq)
        fj.append(index)
    assert fj.mapping_changes(0, 10) == wj.mapping_changes(0, 10)
    # append without a noted seq: nothing to report (never a guess)
    assert fj.append(indexes[0]) == 0 and fj.last_seq == 6


def test_seq_zero_means_the_writer_is_disabled(writer: JournalStore) -> None:
    wj = writer.dataset(DATASET)
    fs = FollowerStore.open(writer.path)
    fj = fs.dataset(DATASET)
    publish(wj, fj, [trade(11, T0)])
    assert fj.enabled and fj.stats().enabled
    fj.note_seq(0)
    assert fj.append(chunk([trade(11, T0 + 1)])) == 0
    assert not fj.enabled and not fj.stats().enabled
    assert fj.last_seq == 1
    fj.note_seq(2)  # a later seq does not bring it back (there would be a gap)
    assert fj.append(chunk([trade(11, T0 + 2)])) == 0 and not fj.enabled


def test_a_torn_tail_row_is_not_there_until_it_is_whole(writer: JournalStore) -> None:
    wj = writer.dataset(DATASET)
    wj.learn([("AAA", 11)], ts=T0)
    fj = FollowerStore.open(writer.path).dataset(DATASET)
    for records in chunks(5, 3):
        publish(wj, fj, records)
    # The writer appends a mixed chunk (2 index rows) and a mapping; we then take the tail
    # of both files back and write them again piece by piece, as a writer mid-write would
    # leave them: a row cut short, a whole row of an incomplete chunk, a row without its crc.
    wj.learn([("BBB", 22)], ts=T0)
    index = chunk([trade(11, T0 + 10), mbo(22, T0 + 11), trade(33, T0 + 12)])
    seq = wj.append(index)
    seg = wj.segments[-1]
    index_path = seg._dir / "index.bin"
    sym_path = writer.path / DATASET / SYMBOLOGY_NAME
    rows = index_path.read_bytes()[-2 * ROW_LEN :]
    sym = sym_path.read_bytes()
    sym_row = sym[-(24 + 3 + 4) :]
    os.truncate(index_path, index_path.stat().st_size - 2 * ROW_LEN)
    os.truncate(sym_path, len(sym) - len(sym_row))
    fj.note_seq(seq)
    assert fj.append(index) == seq
    want = wj.entries(RTYPES, 0, seq)
    with open(index_path, "ab") as fh, open(sym_path, "ab") as sh:
        for torn in (rows[:10], rows[10:ROW_LEN], rows[ROW_LEN : 2 * ROW_LEN - 4]):
            fh.write(torn)
            fh.flush()
            assert [e.seq for e in fj.entries(RTYPES, 0, seq)][-1] == seq - 1
        sh.write(sym_row[:-1])
        sh.flush()
        assert fj.mapping_changes(0, seq + 1) == [(1, "AAA", 11)]
        fh.write(rows[-4:])
        sh.write(sym_row[-1:])
    assert fj.entries(RTYPES, 0, seq) == want
    assert [e.segment.id for e in fj.entries(RTYPES, 0, seq)] == [e.segment.id for e in want]
    assert fj.mapping_changes(0, seq + 1) == [(1, "AAA", 11), (seq, "BBB", 22)]
    assert view(fj) == view(wj)


def test_segments_the_writer_deletes_are_noticed_and_open_fds_keep_working(
    writer: JournalStore,
) -> None:
    wj = writer.dataset(DATASET)
    wj.learn([("AAA", 11), ("BBB", 22), ("CCC", 33)], ts=T0)
    fs = FollowerStore.open(writer.path)
    fj = fs.dataset(DATASET)
    all_chunks = chunks(6, 24)
    for records in all_chunks:
        publish(wj, fj, records)
    fj.refresh()
    assert len(fj.segments) == len(wj.segments) > 3
    # A replay in the worker has begun on the oldest segment (its descriptor open).
    replay = Replay(fj, [Sub("trades", start_ns=0)], schema_rtype=dbn.SCHEMA_RTYPE)
    first_items = replay.step(200)
    assert first_items
    oldest = fj.segments[0]
    fd = oldest.open_fd(0x00)
    expect = os.pread(fd, 1 << 20, 0)
    # Retention in the supervisor deletes the two oldest segments.
    gone = wj.segments[:2]
    for seg in gone:
        wj.delete_segment(seg, "retention")
    fs.maintain()
    assert [s.id for s in fj.segments] == [s.id for s in wj.segments]
    assert oldest.deleted
    assert fj.first_seq() == wj.first_seq() > 1
    assert view(fj) == view(wj)
    assert os.pread(fd, 1 << 20, 0) == expect  # the inode lives while the fd is open
    os.close(fd)
    with pytest.raises(FileNotFoundError):
        oldest.open_fd(0x00)
    # A resume from a position the supervisor deleted is refused as aged out, as in one
    # process; a start before the oldest data kept too.
    now = T0 + 10**12
    for sub in (Sub("trades", resume_after=1), Sub("trades", start_ns=T0 - 10**9)):
        got = check(fj, [sub], now)
        assert got == check(wj, [sub], now) and got is not None and got.reason == "aged_out"
    replay.close()
    # deletion noticed on a read alone too (no maintain call)
    wj.delete_segment(wj.segments[0], "max_bytes")
    assert fj.first_seq() == wj.first_seq()
    assert [e.seq for e in fj.entries(RTYPES, 0, fj.last_seq)] == [
        e.seq for e in wj.entries(RTYPES, 0, wj.last_seq)
    ]


def test_the_planner_makes_the_same_replay_from_a_follower(writer: JournalStore) -> None:
    wj = writer.dataset(DATASET)
    wj.learn([("AAA", 11), ("BBB", 22), ("CCC", 33)], ts=T0)
    fj = FollowerStore.open(writer.path).dataset(DATASET)
    data = chunks(7, 40)
    for c, records in enumerate(data[:30]):
        if c == 12:
            wj.learn([("BBB", 55)], ts=T0)
        publish(wj, fj, records)
    cases = [
        ([Sub("trades", start_ns=0)], False),
        ([Sub("trades", start_ns=T0 + 20_000)], False),
        ([Sub("trades", symbols=("AAA", "BBB"), start_ns=T0 + 5_000)], True),
        ([Sub("trades", start_ns=0), Sub("mbo", symbols=("CCC",), start_ns=0)], False),
        ([Sub("trades", resume_after=9), Sub("ohlcv-1s", resume_after=9)], False),
    ]
    for subs, ts_out in cases:
        plans = [
            Replay(j, subs, schema_rtype=dbn.SCHEMA_RTYPE, clock_ns=lambda: T0, ts_out=ts_out)
            for j in (wj, fj)
        ]
        outs = []
        for plan in plans:
            opening = b"".join(plan.begin([b""] * len(subs)))
            out, items = play(plan, budget=700)
            kinds = [
                (type(i).__name__, getattr(i, "offset", None), getattr(i, "length", None))
                for i in items
            ]
            outs.append((opening, out, kinds, plan.cursor, plan.checkpoint_from))
        assert outs[0] == outs[1], subs
        assert data_of(outs[1][1]), subs
        # the journal grows; both follow it
        if subs[0].start_ns == 0 and len(subs) == 1:
            for records in data[30:]:
                publish(wj, fj, records)
            for plan in plans:
                plan.extend(plan.journal.last_seq)
            more = [play(plan, budget=700)[0] for plan in plans]
            assert more[0] == more[1] and data_of(more[1])
            assert mapping_symbols(outs[1][0])  # the opening: mappings as of the start
            # a mapping learnt after the last chunk comes with the hand-over, on both
            wj.learn([("DDD", 77)], ts=T0)
            done = [plan.finish(plan.journal.last_seq) for plan in plans]
            assert done[0] == done[1] and mapping_symbols(b"".join(done[1])) == [(77, "DDD")]
        for plan in plans:
            plan.close()


def test_open_and_attach_like_the_writer(
    tmp_path: Path, writer: JournalStore, caplog: pytest.LogCaptureFixture
) -> None:
    assert open_follower(JournalConfig()) is None
    with pytest.raises(ConfigError, match="not found"):
        open_follower(JournalConfig(dir=str(tmp_path / "nowhere")))
    wj = writer.dataset(DATASET)
    wj.learn([("AAA", 11), ("BBB", 22)], ts=T0)
    wj.append(chunk([trade(11, T0)]))
    wj.learn([("AAA", 33)], ts=T0)  # after the last chunk: known before the next
    store = open_follower(JournalConfig(dir=str(writer.path)))
    assert store is not None
    assert set(store.datasets()) == {DATASET}
    feed = Feed(DATASET)
    attach_follower(store, feed)
    assert feed.journal is store.dataset(DATASET)
    assert feed.directory.by_symbol == {"AAA": 33, "BBB": 22}
    # the Feed publishes a chunk the supervisor journaled: append gives the noted seq
    index = chunk([trade(33, T0 + 1)])
    seq = wj.append(index)
    assert isinstance(feed.journal, FollowerJournal)
    feed.journal.note_seq(seq)
    feed.publish(index)
    assert feed.journal.last_seq == seq
    assert not (tmp_path / "nowhere").exists()
    store.close()
    # A worker (re)started while the supervisor journals: the seq before the first chunk
    # its ring slot will show is given, whatever the files hold by then.
    for records in chunks(8, 3):
        wj.append(chunk(records))
    late = open_follower(JournalConfig(dir=str(writer.path)))
    assert late is not None
    feed2 = Feed(DATASET)
    attach_follower(late, feed2, start_seq=seq + 1)
    assert feed2.journal is not None and feed2.journal.last_seq == seq + 1
    assert [e.seq for e in feed2.journal.entries(RTYPES, 0, 99)] == list(range(1, seq + 2))
    # the first chunk this worker publishes is not the one after it: said in the log
    assert isinstance(feed2.journal, FollowerJournal)
    with caplog.at_level(logging.WARNING, logger="gateway.journal"):
        feed2.journal.note_seq(seq + 3)
        feed2.publish(chunk([trade(33, T0 + 2)]))
    assert "the first chunk published is seq 5, not 4" in caplog.text
    late.close()


def test_a_segment_being_created_or_deleted_is_skipped_until_it_is_readable(
    writer: JournalStore,
) -> None:
    wj = writer.dataset(DATASET)
    fj = FollowerStore.open(writer.path).dataset(DATASET)
    for records in chunks(9, 40):
        publish(wj, fj, records)
        if wj.segments[-1].nbytes >= 1500:
            break  # the next append rolls to a new segment
    else:
        pytest.fail("the segment never filled")
    last = wj.last_seq
    # The new segment's directory and empty index file, as the writer creates them
    # (its header not written yet): not a segment yet.
    new_dir = writer.path / DATASET / f"{last + 1:010d}"
    new_dir.mkdir()
    (new_dir / "index.bin").write_bytes(b"")
    fj.note_seq(last + 1)
    fj.append(chunk([trade(11, T0)]))  # the follower is told before it can read it
    assert fj.entries(RTYPES, 0, last + 1)[-1].seq == last
    assert [s.id for s in fj.segments] == [s.id for s in wj.segments]
    # The writer writes it for real; the follower reads it on the next read.
    index = chunk([trade(11, T0 + 1)])
    assert wj.append(index) == last + 1 and wj.segments[-1].id == last + 1
    assert fj.entries(RTYPES, 0, last + 1) == wj.entries(RTYPES, 0, last + 1)
    # An older segment half deleted (its index gone first): skipped, the rest is read.
    gone = wj.segments[0]
    (gone._dir / "index.bin").unlink()
    again = FollowerStore.open(writer.path).dataset(DATASET)
    assert [s.id for s in again.segments] == [s.id for s in wj.segments[1:]]
    assert again.first_seq() == wj.segments[1].id


def test_a_chunk_published_in_pieces_counts_once_its_last_piece_is_out(
    writer: JournalStore,
) -> None:
    wj = writer.dataset(DATASET)
    fj = FollowerStore.open(writer.path).dataset(DATASET)
    publish(wj, fj, [trade(11, T0)])
    # 400 KiB of trades: a ring of 1 MiB carries it in pieces of at most 256 KiB
    big = chunk([trade(11, T0)] * (400 * 1024 // 48))
    seq = wj.append(big)
    cut = [0, 4000, 7000, big.count]  # pieces at record boundaries, each over 64 KiB
    pieces = [index_records(bytes(big.data[cut[i] * 48 : cut[i + 1] * 48]))[0] for i in range(3)]
    for n, piece in enumerate(pieces):
        fj.note_seq(seq)
        assert fj.append(piece) == seq
        # a hand-over or checkpoint at seq only once every record of it is out
        assert fj.last_seq == (seq if n == 2 else seq - 1), n
    # a small whole chunk after: at once
    publish(wj, fj, [trade(22, T0 + 1)])
    assert fj.last_seq == seq + 1


# --- a worker's session (the adapter over a real socket, a follower as the feed's journal) ---


async def test_a_resume_ahead_of_this_worker_waits_for_its_feed(
    server: Any, writer: JournalStore
) -> None:
    """A ResumingClient's checkpoint came from a sibling worker a few chunks ahead of this
    one: the resume is not refused, and the session gets every chunk after it exactly once,
    live from where this worker's feed takes over."""
    wj = writer.dataset(test_adapter.DATASET)
    wj.learn([("AAA", 11), ("BBB", 22)], ts=T0)
    state = test_adapter.new_state()
    feed = state.feeds[test_adapter.DATASET]
    store = FollowerStore.open(writer.path)
    attach_follower(store, feed)
    state.journal = store
    state.journal_enabled = True
    sent = 0
    backlog: list[tuple[int, ChunkIndex]] = []

    def supervisor_chunk() -> None:
        nonlocal sent
        recs = [trade(11, T0 + (sent + k) * 1000, sequence=sent + k) for k in range(10)]
        sent += 10
        index = chunk(recs)
        backlog.append((wj.append(index), index))

    def worker_publishes(n: int) -> None:
        for _ in range(min(n, len(backlog))):
            seq, index = backlog.pop(0)
            assert isinstance(feed.journal, FollowerJournal)
            feed.journal.note_seq(seq)
            feed.publish(index)

    for _ in range(20):
        supervisor_chunk()
    worker_publishes(15)  # this worker is 5 chunks behind the supervisor
    assert feed.journal is not None and feed.journal.last_seq == 15
    connect = await server(state)
    client, _ = await connect()
    reply = await test_adapter.handshake(client, lsg_checkpoints=True)
    assert reply.startswith(b"success=1")
    client.send(encode_subscription("trades", "ALL_SYMBOLS", sub_id=1, resume_after=18))
    client.send(START_SESSION)
    await client.metadata()
    for _ in range(10):
        supervisor_chunk()
        worker_publishes(2)
        await asyncio.sleep(0)
    worker_publishes(len(backlog))
    last = sent - 1
    got: list[bytes] = []
    async with asyncio.timeout(10):
        while not got or got[-1][1] != 0x00 or struct.unpack_from("<I", got[-1], 44)[0] != last:
            got.append(await client.record(10))
            if got[-1][1] == dbn.RTYPE_ERROR:
                break
    assert not [r for r in got if r[1] == dbn.RTYPE_ERROR], [test_adapter.text_of(r) for r in got]
    seqs = [struct.unpack_from("<I", r, 44)[0] for r in got if r[1] == 0x00]
    assert seqs == list(range(180, sent))  # chunks 19.. : nothing missed, nothing twice
    store.close()


_WRITER = """
import sys
from gateway.dbn import index_records
from gateway.journal import JournalStore
from tests.unit.conftest import mbo, trade
store = JournalStore.open(sys.argv[1], segment_bytes=4096, max_bytes=64 * 1024)
journal = store.dataset(sys.argv[2])
kinds = [
    index_records(b"".join([trade(11, 10**18 + k), mbo(22, 10**18 + k)][: 1 + k % 2] * (1 + k))
    )[0]
    for k in range(8)
]
print("open", flush=True)
for c in range(1500):
    if c % 50 == 0:
        journal.learn([(f"S{c}", c)])
    journal.append(kinds[c % len(kinds)])
    if c % 100 == 0:
        store.maintain()  # retention: max_bytes deletes the oldest segments
store.close()
"""


def test_following_a_writer_in_another_process_as_it_writes_rolls_and_deletes(
    tmp_path: Path,
) -> None:
    """Real concurrency: every read while another process appends, rolls segments and
    deletes old ones gives whole, crc-good parts with contiguous seqs."""
    root = tmp_path / "journal"
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(root), DATASET],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "open\n"
        fj = FollowerStore.open(root).dataset(DATASET)
        dummy = chunk([trade(11, T0)])
        reads = 0
        while True:
            done = proc.poll() is not None
            end = fj.end_seq()
            for seq in range(fj.last_seq + 1, end + 1):  # this process "publishes" them
                fj.note_seq(seq)
                fj.append(dummy)
            assert fj.last_seq == end
            seqs: list[int] = []
            for seg, rows in fj.row_slices(0, end):
                try:
                    fds = {rt: seg.open_fd(rt) for rt in set(rows["rtype"].tolist())}
                except FileNotFoundError:
                    seqs = []  # deleted by retention since (it and all before it)
                    continue
                try:
                    for row in rows.tolist():
                        data = os.pread(fds[row[1]], row[6], row[5])
                        assert zlib.crc32(data) == row[7], (seg.id, row[0])
                        if not seqs or seqs[-1] != row[0]:
                            seqs.append(row[0])
                finally:
                    for fd in fds.values():
                        os.close(fd)
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs))) if seqs else True
            assert not seqs or seqs[-1] == end
            changes = fj.mapping_changes(0, end + 1)
            assert [a for a, _, _ in changes] == sorted(a for a, _, _ in changes)
            reads += 1
            if done:
                break
        assert proc.wait(30) == 0
        assert fj.end_seq() == 1500 and fj.first_seq() > 1  # it rolled and deleted
        assert reads > 3, reads
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
