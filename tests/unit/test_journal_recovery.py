"""Journal recovery (issue 14): a torn tail written by ``kill -9`` of a real writer, crafted
torn tails, corrupted crcs, and the directory lock held by another process. After every
reopen the journal holds whole chunks only, each byte-identical to what was appended."""

from __future__ import annotations

import logging
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

from gateway.journal import (
    DatasetJournal,
    JournalFormatError,
    JournalLockedError,
    JournalStore,
)
from gateway.journal.format import INDEX_HEADER_LEN, ROW_LEN

from .conftest import NOW_NS, mbo, trade
from .test_journal import DATASET, chunk, read_entry, rebuild

REPO = Path(__file__).resolve().parents[2]

# The writer: appends two known chunks alternately (A: 40 trades; B: trades and mbo mixed)
# and a mapping every 50 chunks, as fast as it can, until killed (bounded: 20 s).
WRITER = """
import sys, time
from pathlib import Path
from gateway.dbn import index_records
from gateway.journal import JournalStore
store = JournalStore.open(sys.argv[1])
j = store.dataset("TEST.JRNL")
a, _ = index_records(Path(sys.argv[2]).read_bytes())
b, _ = index_records(Path(sys.argv[3]).read_bytes())
print("ready", flush=True)
deadline = time.monotonic() + 20
i = 0
while time.monotonic() < deadline:
    if i % 50 == 0:
        j.learn([(f"S{i}", i)], ts=i)
    j.append(a if i % 2 == 0 else b)
    i += 1
"""


def chunk_a() -> bytes:
    return b"".join(trade(i, NOW_NS + i) for i in range(40))


def chunk_b() -> bytes:
    return b"".join(trade(i, NOW_NS + i) + mbo(i, NOW_NS - i) for i in range(10))


def expected_chunk(seq: int) -> bytes:
    return chunk_a() if seq % 2 == 1 else chunk_b()


def chunk_bytes(j: DatasetJournal, seq: int) -> bytes:
    parts = j.entries({0x00, 0xA0}, seq - 1, seq)
    if len(parts) == 1:
        return read_entry(parts[0])
    return rebuild(j, parts)


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "gateway.journal" and r.levelno >= logging.WARNING
    ]


def cut_bytes(line: str) -> int:
    return int(line.split("cut ", 1)[1].split(" ", 1)[0])


def test_kill_9_of_a_writer_leaves_whole_chunks_and_a_lock_that_frees(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "j"
    (tmp_path / "a").write_bytes(chunk_a())
    (tmp_path / "b").write_bytes(chunk_b())
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), str(tmp_path / "a"), str(tmp_path / "b")],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"ready"
        deadline = time.monotonic() + 15
        while dir_bytes(path) < (1 << 20) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert dir_bytes(path) >= 1 << 20
        # the lock is held by the writer: a second open names its pid
        with pytest.raises(JournalLockedError, match=rf"pid {proc.pid}\b"):
            JournalStore.open(path)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    caplog.set_level(logging.WARNING, logger="gateway.journal")
    with JournalStore.open(path) as store:  # the dead writer's lock is gone
        j = store.dataset(DATASET)
        last = j.last_seq
        assert last > 10 and j.first_seq() == 1
        for seq in (1, 2, last // 2, last // 2 + 1, last - 1, last):
            assert chunk_bytes(j, seq) == expected_chunk(seq), seq
        changes = j.mapping_changes(0, last + 1)
        assert [c[1] for c in changes] == [f"S{i}" for i in range(0, last + 1, 50)][: len(changes)]
        assert all(at <= last + 1 for at, _, _ in changes)
        lines = warnings_of(caplog)
        assert len(lines) <= 1
        if lines:
            assert cut_bytes(lines[0]) > 0
        assert j.append(chunk([trade(1)])) == last + 1
    _check_files(path / DATASET)


def _check_files(dataset_dir: Path) -> None:
    """Every index row crc and every part's data crc is good; files end where rows do."""
    for seg_dir in sorted(p for p in dataset_dir.iterdir() if p.is_dir()):
        raw = (seg_dir / "index.bin").read_bytes()
        assert (len(raw) - INDEX_HEADER_LEN) % ROW_LEN == 0
        ends: dict[int, int] = {}
        for off in range(INDEX_HEADER_LEN, len(raw), ROW_LEN):
            row = raw[off : off + ROW_LEN]
            assert zlib.crc32(row[:60]) == struct.unpack_from("<I", row, 60)[0]
            rtype = row[8]
            offset, length, crc = struct.unpack_from("<QII", row, 16)
            data = (seg_dir / f"rt-{rtype:02x}.dbn").read_bytes()
            assert zlib.crc32(data[offset : offset + length]) == crc
            ends[rtype] = offset + length
        for rtype, end in ends.items():
            assert (seg_dir / f"rt-{rtype:02x}.dbn").stat().st_size == end


def _fill(path: Path, n: int = 10, **kw: object) -> None:
    with JournalStore.open(path, **kw) as s:  # type: ignore[arg-type]
        j = s.dataset(DATASET)
        for seq in range(1, n + 1):
            if seq == 3:
                j.learn([("ES", 7)], ts=NOW_NS)
            assert j.append(chunk([expected_chunk(seq)])) == seq


def _seg(path: Path, n: int = 1) -> Path:
    return path / DATASET / f"{n:010d}"


def test_crafted_torn_tail_is_cut_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "j"
    _fill(path)
    seg = _seg(path)
    with (seg / "rt-00.dbn").open("ab") as fh:
        fh.write(trade(1) + trade(2)[:20])  # a whole record without its row, and a torn one
    with (seg / "index.bin").open("ab") as fh:
        fh.write(b"\x0b" * 30)  # a partial row
    with (seg / "order.bin").open("ab") as fh:
        fh.write(b"\x00\xa0\x00")
    with (path / DATASET / "symbology.bin").open("ab") as fh:
        fh.write(b"\x01\x02")
    caplog.set_level(logging.WARNING, logger="gateway.journal")
    with JournalStore.open(path) as s:
        j = s.dataset(DATASET)
        assert j.last_seq == 10
        assert [chunk_bytes(j, q) for q in range(1, 11)] == [
            expected_chunk(q) for q in range(1, 11)
        ]
        assert j.mappings_as_of(10) == {"ES": 7}
        (line,) = warnings_of(caplog)
        assert cut_bytes(line) == 48 + 20 + 30 + 3 + 2
        assert "index.bin 30" in line and "rt-00.dbn 68" in line
        assert j.append(chunk([trade(5)])) == 11
    _check_files(path / DATASET)
    caplog.clear()
    JournalStore.open(path).close()
    assert warnings_of(caplog) == []  # nothing left to cut


def test_a_chunk_whose_row_never_landed_is_cut(tmp_path: Path, caplog) -> None:
    path = tmp_path / "j"
    _fill(path, 4)
    seg = _seg(path)
    raw = (seg / "index.bin").read_bytes()
    # chunk 4 is mixed (two rows): keep only its first row, as if killed between rows
    os.truncate(seg / "index.bin", len(raw) - ROW_LEN)
    caplog.set_level(logging.WARNING, logger="gateway.journal")
    with JournalStore.open(path) as s:
        j = s.dataset(DATASET)
        assert j.last_seq == 3
        assert chunk_bytes(j, 3) == expected_chunk(3)
        (line,) = warnings_of(caplog)
        assert cut_bytes(line) == ROW_LEN + len(expected_chunk(4)) + 20
    _check_files(path / DATASET)


@pytest.mark.parametrize("where", ["data", "row"])
def test_a_bad_crc_in_the_middle_of_the_last_segment_cuts_from_there(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, where: str
) -> None:
    path = tmp_path / "j"
    _fill(path)
    seg = _seg(path)
    if where == "data":  # a byte of chunk 5 (a trades-only chunk at a known offset)
        name = "rt-00.dbn"
        at = len(chunk_a()) * 2 + 10 * 48 * 2 + 100
    else:  # the row of chunk 5 (rows: 1, 2a, 2b, 3, 4a, 4b, 5, ...)
        name = "index.bin"
        at = INDEX_HEADER_LEN + 6 * ROW_LEN + 20
    raw = bytearray((seg / name).read_bytes())
    raw[at] ^= 0xFF
    (seg / name).write_bytes(bytes(raw))
    caplog.set_level(logging.WARNING, logger="gateway.journal")
    with JournalStore.open(path) as s:
        j = s.dataset(DATASET)
        assert j.last_seq == 4
        assert [chunk_bytes(j, q) for q in range(1, 5)] == [expected_chunk(q) for q in range(1, 5)]
        (line,) = warnings_of(caplog)
        assert "crc" in line and cut_bytes(line) > 0
        assert j.mappings_as_of(4) == {"ES": 7}
        assert j.append(chunk([trade(5)])) == 5
    _check_files(path / DATASET)


def test_a_damaged_sealed_segment_drops_it_and_older_ones(tmp_path: Path, caplog) -> None:
    path = tmp_path / "j"
    _fill(path, 12, segment_bytes=4000)
    ids = sorted(int(p.name) for p in (path / DATASET).iterdir() if p.is_dir())
    assert len(ids) >= 4
    victim = _seg(path, ids[1])
    raw = bytearray((victim / "rt-00.dbn").read_bytes())
    raw[5] ^= 0xFF
    (victim / "rt-00.dbn").write_bytes(bytes(raw))
    caplog.set_level(logging.WARNING, logger="gateway.journal")
    with JournalStore.open(path, segment_bytes=4000) as s:
        j = s.dataset(DATASET)
        assert j.first_seq() == ids[2]
        assert j.last_seq == 12
        assert [chunk_bytes(j, q) for q in range(ids[2], 13)] == [
            expected_chunk(q) for q in range(ids[2], 13)
        ]
        assert len(warnings_of(caplog)) == 1
    assert sorted(int(p.name) for p in (path / DATASET).iterdir() if p.is_dir()) == ids[2:]


def test_a_newest_segment_torn_at_creation_is_started_again(tmp_path: Path) -> None:
    path = tmp_path / "j"
    _fill(path, 3)
    torn = _seg(path, 4)
    torn.mkdir()
    (torn / "index.bin").write_bytes(b"LSGJ\x01")
    with JournalStore.open(path) as s:
        j = s.dataset(DATASET)
        assert j.last_seq == 3
        assert j.append(chunk([trade(1)])) == 4
    with JournalStore.open(path) as s:
        assert s.dataset(DATASET).last_seq == 4


def test_seq_survives_when_every_row_was_cut(tmp_path: Path) -> None:
    path = tmp_path / "j"
    _fill(path, 3, segment_bytes=1)  # one chunk per segment: 1, 2, 3
    os.truncate(_seg(path, 3) / "index.bin", INDEX_HEADER_LEN + 10)
    with JournalStore.open(path, segment_bytes=1) as s:
        j = s.dataset(DATASET)
        assert j.last_seq == 2
        assert j.append(chunk([trade(1)])) == 3


def test_another_format_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "j"
    _fill(path, 1)
    index = _seg(path) / "index.bin"
    raw = bytearray(index.read_bytes())
    raw[4:6] = struct.pack("<H", 99)
    body = bytes(raw[:64])[:60]
    raw[60:64] = struct.pack("<I", zlib.crc32(body))
    index.write_bytes(bytes(raw))
    with pytest.raises(JournalFormatError, match="format version 99"):
        JournalStore.open(path)
    JournalStore.open(tmp_path / "other").close()  # the failed open released its lock
    with pytest.raises(JournalFormatError):
        JournalStore.open(path)
