"""The shared-memory ring of ``--workers N`` (gateway/workers/ring.py): one writer, readers
in this process and in another one, the writer rule, the sequence check, skips."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.workers.ring import (
    CHUNK,
    ENTRY_HEADER,
    LEARN,
    METADATA,
    PAD,
    STATE,
    Entry,
    Ring,
    RingError,
    RingLapped,
    RingReader,
    RingWriter,
    remove_stale,
)

REPO = Path(__file__).resolve().parents[2]
SIZE = 64 * 1024


@pytest.fixture
def ring() -> Iterator[Ring]:
    r = Ring.create(SIZE, 4)
    try:
        yield r
    finally:
        r.close()
        r.unlink()


def attach(r: Ring) -> Ring:
    return Ring.attach(r.name, creator=os.getpid())


def payload(i: int, n: int) -> bytes:
    return bytes((i + k) % 251 for k in range(n))


def entry_bytes(n: int) -> int:
    return (ENTRY_HEADER + n + 7) & ~7


def test_segment_is_private_and_named_uniquely(ring):
    path = Path("/dev/shm") / ring.name
    st = path.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_size == 4096 + SIZE
    assert ring.name.startswith(f"lsg-{os.getpid()}-")
    other = Ring.create(SIZE, 4)
    try:
        assert other.name != ring.name
    finally:
        other.close()
        other.unlink()
    assert not (Path("/dev/shm") / other.name).exists()


def test_roundtrip_of_every_kind_zero_copy_and_read_only(ring):
    w = RingWriter(ring)
    w.set_live(0, True)
    r = attach(ring)
    try:
        rd = RingReader(r, 0)
        assert rd.next() is None
        items = [
            (CHUNK, payload(1, 1000), 7, 12),
            (LEARN, b"\x91\x92\xa3ESH\x01", 0, 0),
            (STATE, b"\x92\xc3\xa0", 0, 0),
            (METADATA, b"\x91\xa4tbbo", 0, 0),
            (CHUNK, b"", 8, 0),
            (CHUNK, payload(2, 13), 9, 1),
        ]
        positions = [w.try_write(k, p, seq=s, records=n) for k, p, s, n in items]
        assert positions[0] == 0 and None not in positions
        got: list[Entry] = []
        while (e := rd.next()) is not None:
            got.append(e)
        assert [(e.kind, bytes(e.payload), e.seq, e.records) for e in got] == items
        assert [e.pos for e in got] == positions
        assert all(a.end == b.pos for a, b in zip(got, got[1:], strict=False))
        assert rd.pos == w.head == got[-1].end
        view = got[0].payload
        assert view.readonly and view.obj is not None
        with pytest.raises(TypeError):
            view[0] = 1  # type: ignore[index]
        assert rd.behind() == 0
    finally:
        r.close()


def test_wrap_writes_a_pad_and_the_next_entry_starts_at_offset_zero(ring):
    w = RingWriter(ring)
    w.set_live(0, True)
    rd = RingReader(ring, 0)
    n = 10_000
    step = entry_bytes(n)
    fits = SIZE // step  # 6 entries, then a tail smaller than one
    for i in range(fits):
        assert w.try_write(CHUNK, payload(i, n)) == i * step
    for i in range(fits):
        e = rd.next()
        assert e is not None and bytes(e.payload) == payload(i, n)
    rd.release(rd.pos)
    pos = w.try_write(CHUNK, payload(99, n))
    assert pos == SIZE  # the wrap: offset 0 of the second lap
    tail = SIZE - fits * step
    kind, length, at = ring.data[fits * step + 2], 0, 0
    assert kind == PAD
    length = int.from_bytes(ring.data[fits * step + 4 : fits * step + 8], "little")
    at = int.from_bytes(ring.data[fits * step + 8 : fits * step + 16], "little")
    assert (length, at) == (tail - ENTRY_HEADER, fits * step)
    e = rd.next()
    assert e is not None and (e.pos, bytes(e.payload)) == (SIZE, payload(99, n))


def test_a_tail_shorter_than_a_header_is_skipped_by_position(ring):
    w = RingWriter(ring)
    w.set_live(0, True)
    rd = RingReader(ring, 0)
    n = SIZE - 16 - ENTRY_HEADER  # leaves 16 bytes: no room for a PAD header
    assert w.try_write(CHUNK, payload(1, n)) == 0
    e = rd.next()
    assert e is not None and e.end == SIZE - 16
    rd.release(rd.pos)
    assert w.try_write(CHUNK, b"abc") == SIZE
    e = rd.next()
    assert e is not None and (e.pos, bytes(e.payload)) == (SIZE, b"abc")


def test_writer_never_overwrites_a_live_slots_release(ring):
    w = RingWriter(ring)
    w.set_live(0, True)
    w.set_live(2, True)
    fast, slow = RingReader(ring, 0), RingReader(ring, 2)
    n = 4000
    accepted = 0
    while w.try_write(CHUNK, payload(accepted, n), seq=accepted + 1) is not None:
        accepted += 1
        assert accepted < 100
    assert accepted == SIZE // entry_bytes(n)
    assert w.holders() == [0, 2]
    assert w.used() == SIZE  # the PAD to the wrap went in too
    while fast.next() is not None:
        pass
    fast.release(fast.pos)
    assert w.try_write(CHUNK, payload(999, n)) is None  # slot 2 still holds all of it
    assert w.holders() == [2]
    first = slow.next()
    assert first is not None and first.seq == 1
    slow.release(first.end)  # frees exactly the first entry
    assert w.try_write(CHUNK, payload(accepted, n), seq=accepted + 1) is not None
    assert w.holders() == []
    assert w.used() == SIZE + entry_bytes(n) - first.end
    # the slow reader still reads every entry it had not released, intact
    for i in range(1, accepted):
        e = slow.next()
        assert e is not None and (e.seq, bytes(e.payload)) == (i + 1, payload(i, n))


def test_writer_proceeds_past_a_slot_that_is_not_live(ring):
    w = RingWriter(ring)
    w.set_live(1, True)
    rd = RingReader(ring, 1)
    for i in range(SIZE // 1024):
        if w.try_write(CHUNK, payload(i, 1000)) is None:
            break
    assert w.try_write(CHUNK, payload(0, 1000)) is None
    assert w.holders() == [1]
    w.set_live(1, False)  # its worker died
    assert w.holders() == []
    for i in range(200):  # laps the dead slot several times
        assert w.try_write(CHUNK, payload(i, 1000)) is not None
    with pytest.raises(RingLapped):
        rd.next()


def test_set_live_at_a_position_and_heartbeat(ring):
    w = RingWriter(ring)
    for _ in range(3):
        w.try_write(CHUNK, b"x" * 100)
    w.set_live(3, True, at=0)
    assert w.release_of(3) == 0 and w.live(3)
    assert w.heartbeat_age_s(3) < 1.0
    rd = RingReader(ring, 3, start=0)
    assert sum(1 for _ in iter(rd.next, None)) == 3
    rd.heartbeat()
    rd.release(rd.pos)
    assert w.release_of(3) == rd.pos
    rd.release(0)  # releases only grow
    assert w.release_of(3) == rd.pos


def test_torn_entry_raises_lapped_and_resync_recovers(ring):
    """An entry whose recorded position is not the one expected (the writer lapped a reader
    whose slot was declared dead, or bytes are torn) is never handed out."""
    w = RingWriter(ring)
    w.set_live(0, True)
    rd = RingReader(ring, 0)
    first = w.try_write(CHUNK, payload(1, 500))
    w.try_write(CHUNK, payload(2, 500))
    assert first == 0
    # forge the header's position field as if a later lap had rewritten it
    ring.data[8:16] = (first + SIZE).to_bytes(8, "little")
    with pytest.raises(RingLapped):
        rd.next()
    assert rd.pos == 0  # nothing consumed
    skipped = rd.resync()
    assert skipped == w.head
    assert rd.next() is None
    w.try_write(CHUNK, payload(3, 50))
    e = rd.next()
    assert e is not None and bytes(e.payload) == payload(3, 50)


def test_torn_length_and_magic_raise_lapped(ring):
    w = RingWriter(ring)
    w.set_live(0, True)
    w.try_write(CHUNK, payload(1, 500))
    rd = RingReader(ring, 0, start=0)
    ring.data[4:8] = (SIZE * 2).to_bytes(4, "little")
    with pytest.raises(RingLapped):
        rd.next()
    ring.data[4:8] = (500).to_bytes(4, "little")
    ring.data[0:2] = b"\0\0"
    with pytest.raises(RingLapped):
        rd.next()


def test_a_reader_more_than_the_ring_behind_is_lapped(ring):
    w = RingWriter(ring)
    w.set_live(0, True)
    rd = RingReader(ring, 0)
    w.try_write(CHUNK, payload(1, 100))
    w.set_live(0, False)
    for i in range(SIZE // 100):
        w.try_write(CHUNK, payload(i, 100))
    w.set_live(0, True, at=rd.pos)  # live again, but the writer already went round
    with pytest.raises(RingLapped):
        rd.next()


def test_skip_chunks_keeps_the_other_entries_in_order(ring):
    w = RingWriter(ring)
    w.set_live(0, True)
    rd = RingReader(ring, 0)
    plan = [
        (CHUNK, 5),
        (LEARN, 0),
        (CHUNK, 7),
        (STATE, 0),
        (CHUNK, 1),
        (METADATA, 0),
        (LEARN, 0),
        (CHUNK, 2),
    ]
    for i, (kind, records) in enumerate(plan):
        assert w.try_write(kind, payload(i, 3000), records=records) is not None
    kept: list[tuple[int, bytes]] = []
    assert rd.skip_chunks(lambda e: kept.append((e.kind, bytes(e.payload)))) == (4, 15)
    assert kept == [(kind, payload(i, 3000)) for i, (kind, _) in enumerate(plan) if kind != CHUNK]
    assert rd.pos == w.head and rd.behind() == 0
    w.try_write(CHUNK, b"after")
    e = rd.next()
    assert e is not None and bytes(e.payload) == b"after"


def test_entry_larger_than_the_ring_is_an_error(ring):
    w = RingWriter(ring)
    with pytest.raises(ValueError, match="does not fit"):
        w.try_write(CHUNK, bytes(SIZE))
    # the largest entry that fits is accepted even after a wrap
    w.set_live(0, True)
    rd = RingReader(ring, 0)
    w.try_write(CHUNK, b"x" * 40_000)
    big = SIZE - ENTRY_HEADER
    assert w.try_write(CHUNK, bytes(big)) is None
    assert rd.next() is not None
    rd.release(rd.pos)
    assert w.try_write(CHUNK, bytes(big)) is None  # the PAD went in at the first try
    assert rd.next() is None
    rd.release(rd.pos)
    assert w.try_write(CHUNK, bytes(big)) == SIZE


def test_attach_refuses_what_is_not_this_supervisors_ring(ring, tmp_path):
    with pytest.raises(RingError, match="not a ring segment name"):
        Ring.attach("../etc/passwd")
    with pytest.raises(RingError, match="cannot be opened"):
        Ring.attach(f"lsg-{os.getpid()}-999999-deadbeef")
    with pytest.raises(RingError, match="not the expected"):
        Ring.attach(ring.name, creator=os.getpid() + 1)
    r = Ring.attach(ring.name)
    assert (r.size, r.max_workers, r.writable) == (SIZE, 4, False)
    with pytest.raises(RingError, match="read-only"):
        RingWriter(r)
    r.close()
    # a file with a ring's name but not a ring
    fake = f"lsg-{os.getpid()}-888888-0badcafe"
    path = Path("/dev/shm") / fake
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, 4096 + SIZE)
        with pytest.raises(RingError, match="not the expected"):
            Ring.attach(fake)
        os.fchmod(fd, 0o644)
        with pytest.raises(RingError, match="not a private"):
            Ring.attach(fake)
    finally:
        os.close(fd)
        path.unlink()


def test_remove_stale_unlinks_only_segments_of_dead_creators(ring):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=10)
    stale = Path("/dev/shm") / f"lsg-{proc.pid}-0-00112233"
    stale.write_bytes(b"")
    try:
        removed = remove_stale()
        assert stale.name in removed and not stale.exists()
        assert ring.name not in removed and (Path("/dev/shm") / ring.name).exists()
    finally:
        stale.unlink(missing_ok=True)


def test_invalid_create_arguments():
    with pytest.raises(RingError, match="multiple of 4096"):
        Ring.create(5000, 2)
    with pytest.raises(RingError, match="max_workers"):
        Ring.create(SIZE, 65)


_CHILD = """
import hashlib, json, os, sys, time
from gateway.workers.ring import Ring, RingReader
name, slot, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ring = Ring.attach(name, creator=os.getppid())
rd = RingReader(ring, slot, start=int(sys.argv[4]))
digest, seqs = hashlib.sha256(), []
deadline = time.monotonic() + 20
while len(seqs) < count and time.monotonic() < deadline:
    e = rd.next()
    if e is None:
        rd.release(rd.pos)
        time.sleep(0.0005)
        continue
    digest.update(e.payload)
    seqs.append(e.seq)
rd.release(rd.pos)
print(json.dumps({"seqs": seqs, "sha": digest.hexdigest()}))
"""


def test_a_reader_in_another_process_reads_what_the_writer_wrote(ring):
    """A worker-like child process maps the ring (data read-only) and reads 300 entries
    while the writer laps a 64 KiB ring ~5 times, waiting on the child's release."""
    w = RingWriter(ring)
    w.set_live(1, True)
    count = 300
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, ring.name, "1", str(count), str(w.head)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        expected = hashlib.sha256()
        deadline = time.monotonic() + 20
        for i in range(count):
            data = payload(i, 1000 + i)
            expected.update(data)
            while w.try_write(CHUNK, data, seq=i + 1) is None:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.0002)
        out, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    got = json.loads(out)
    assert got["seqs"] == list(range(1, count + 1))
    assert got["sha"] == expected.hexdigest()
    assert w.head > 4 * SIZE
    assert w.release_of(1) == w.head
