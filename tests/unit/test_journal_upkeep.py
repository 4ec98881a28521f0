"""Journal upkeep (issue 14): segments roll by size and by ts span, retention by time and
by bytes (counted by reason, never the open segment, never breaking a reader's fd), the
three fsync modes (always off the caller's thread), and write errors that disable one
dataset's journal without ever raising into the feed."""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.journal import DatasetJournal, JournalStore

from .conftest import NOW_NS, trade
from .test_journal import DATASET, chunk, read_entry
from .test_journal_recovery import REPO, _check_files

SEC = 1_000_000_000
CHUNK = 40  # trades per chunk: 1920 bytes


def trades(ts: int, n: int = CHUNK) -> bytes:
    return b"".join(trade(i, ts + i) for i in range(n))


def seg_ids(j: DatasetJournal) -> list[int]:
    return [s.id for s in j.segments]


def on_disk(path: Path, dataset: str = DATASET) -> list[int]:
    return sorted(int(p.name) for p in (path / dataset).iterdir() if p.is_dir())


def poll(cond: Callable[[], bool], timeout: float = 5.0, tick: Callable[[], None] | None = None):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        if tick is not None:
            tick()
        time.sleep(0.005)


# --- rolling ---------------------------------------------------------------------------


def test_segments_roll_at_segment_bytes_and_read_across(tmp_path: Path) -> None:
    path = tmp_path / "j"
    with JournalStore.open(path, segment_bytes=4000) as s:
        j = s.dataset(DATASET)
        data = [trades(NOW_NS + q * SEC) for q in range(1, 13)]
        for q, raw in enumerate(data, start=1):
            assert j.append(chunk([raw])) == q
        ids = seg_ids(j)
        assert len(ids) == 6 and ids == on_disk(path)  # two 1920-byte chunks per segment
        assert ids == list(range(1, 13, 2))
        got = j.entries({0}, 0, 12)
        assert [e.seq for e in got] == list(range(1, 13))
        assert [read_entry(e) for e in got] == data
        assert [e.seq for e in j.entries({0}, 4, 9)] == [5, 6, 7, 8, 9]
        assert j.skip_before_ts({0}, NOW_NS + 7 * SEC) == 6
        assert j.stats().segments == 6
    with JournalStore.open(path, segment_bytes=4000) as s:
        j = s.dataset(DATASET)
        assert [read_entry(e) for e in j.entries({0}, 0, 12)] == data
        assert j.append(chunk([trades(NOW_NS)])) == 13


def test_segments_roll_when_they_span_more_than_segment_span_s(tmp_path: Path) -> None:
    with JournalStore.open(tmp_path / "j", segment_span_s=1.0) as s:
        j = s.dataset(DATASET)
        for q in range(10):
            j.append(chunk([trades(NOW_NS + q * 400_000_000, 2)]))
        for seg in j.segments:
            assert seg.max_ts is not None and seg.min_ts is not None
            assert seg.max_ts - seg.min_ts <= SEC
        assert seg_ids(j) == [1, 4, 7, 10]


# --- retention -------------------------------------------------------------------------


def test_retention_by_time_keeps_readers_fds_working(tmp_path: Path) -> None:
    path = tmp_path / "j"
    with JournalStore.open(path, retention_s=3.0, segment_span_s=1.0) as s:
        j = s.dataset(DATASET)
        data = {}
        for q in range(1, 5):  # one second apart: one segment each
            data[q] = trades(NOW_NS + q * SEC)
            j.append(chunk([data[q]]))
        assert seg_ids(j) == [1, 2, 3, 4]
        old = j.entries({0}, 0, 1)[0]
        fd = old.segment.open_fd(0)
        try:
            s.maintain()
            assert seg_ids(j) == [1, 2, 3, 4]  # newest ts is q=4: nothing older than 3 s
            data[5] = trades(NOW_NS + 5 * SEC + 500_000_000)
            j.append(chunk([data[5]]))
            s.maintain()
            assert seg_ids(j) == [3, 4, 5] == on_disk(path)
            st = j.stats()
            assert st.segments_deleted == {"retention": 2, "max_bytes": 0}
            assert (st.first_seq, st.last_seq) == (3, 5)
            assert j.oldest_ts() == NOW_NS + 3 * SEC
            assert [e.seq for e in j.entries({0}, 0, 9)] == [3, 4, 5]
            assert j.skip_before_ts({0}, 0) == 2
            assert os.pread(fd, old.length, old.offset) == data[1]  # deleted, still readable
            with pytest.raises(FileNotFoundError):
                old.segment.open_fd(0)
        finally:
            os.close(fd)
    with JournalStore.open(path, retention_s=3.0, segment_span_s=1.0) as s:
        assert s.dataset(DATASET).first_seq() == 3


def test_retention_never_deletes_the_newest_segment(tmp_path: Path) -> None:
    with JournalStore.open(tmp_path / "j", retention_s=1.0, segment_span_s=1.0) as s:
        j = s.dataset(DATASET)
        j.append(chunk([trades(NOW_NS)]))
        j.append(chunk([trades(NOW_NS + 10 * SEC)]))
        j.append(chunk([trades(NOW_NS + 2)]))  # old data time lands in the open segment
        s.maintain()
        assert seg_ids(j) == [2, 3]
        assert j.last_seq == 3


def test_undefined_timestamps_do_not_make_everything_expire(tmp_path: Path) -> None:
    path = tmp_path / "j"
    undef = 2**64 - 1
    with JournalStore.open(path, retention_s=3.0, segment_span_s=1.0) as s:
        j = s.dataset(DATASET)
        j.append(chunk([trades(NOW_NS)]))
        j.append(chunk([trades(NOW_NS + SEC)]))
        no_ts = trade(2)[:8] + undef.to_bytes(8, "little") + trade(2)[16:]
        j.append(chunk([trade(1, NOW_NS + 2 * SEC), no_ts]))
        s.maintain()
        assert j.newest_ts() == NOW_NS + 2 * SEC
        assert seg_ids(j) == [1, 2, 3]
        assert j.skip_before_ts({0}, NOW_NS + 99 * SEC) == 2  # UNDEF sorts last: replayed
    with JournalStore.open(path, retention_s=3.0, segment_span_s=1.0) as s:
        assert s.dataset(DATASET).newest_ts() == NOW_NS + 2 * SEC


def test_max_bytes_deletes_oldest_first_over_the_whole_directory(tmp_path: Path) -> None:
    path = tmp_path / "j"
    # segment_bytes is capped at max_bytes / 4 = 5000 bytes: three chunks per segment
    with JournalStore.open(path, max_bytes=20_000) as s:
        a = s.dataset("AAA.X")
        b = s.dataset("BBB.X")
        for q in range(1, 11):
            a.append(chunk([trades(NOW_NS + q)]))
        for q in range(1, 11):
            b.append(chunk([trades(NOW_NS + q)]))
        assert seg_ids(a) == seg_ids(b) == [1, 4, 7, 10]
        assert a.stats().bytes == b.stats().bytes == 64 + 10 * (1920 + 64) + 3 * 64
        s.maintain()
        # AAA's segments were sealed first: 1, 4, 7 go, then BBB's 1; the open ones stay
        assert seg_ids(a) == [10] and seg_ids(b) == [4, 7, 10]
        assert a.stats().bytes + b.stats().bytes <= 20_000
        assert a.stats().segments_deleted == {"retention": 0, "max_bytes": 3}
        assert b.stats().segments_deleted == {"retention": 0, "max_bytes": 1}
        assert on_disk(path, "AAA.X") == seg_ids(a)
        assert on_disk(path, "BBB.X") == seg_ids(b)
        assert a.first_seq() == 10
        assert [e.seq for e in a.entries({0}, 0, 99)] == [10]
        s.maintain()
        assert seg_ids(a) == [10]  # never the open segment, even over the budget


# --- fsync -----------------------------------------------------------------------------


class FsyncSpy:
    def __init__(self, monkeypatch: pytest.MonkeyPatch, gate: threading.Event | None = None):
        self.calls: list[tuple[int, int]] = []  # (fd, thread id)
        self.gate = gate
        self._real = os.fsync
        monkeypatch.setattr(os, "fsync", self)

    def __call__(self, fd: int) -> None:
        if self.gate is not None:
            assert self.gate.wait(10)
        self._real(fd)
        self.calls.append((fd, threading.get_ident()))

    def off_main_thread(self) -> bool:
        return all(t != threading.main_thread().ident for _, t in self.calls)


def test_fsync_never(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spy = FsyncSpy(monkeypatch)
    with JournalStore.open(tmp_path / "j", segment_bytes=4000, fsync_interval_s=0.001) as s:
        j = s.dataset(DATASET)
        for q in range(6):
            j.append(chunk([trades(NOW_NS + q)]))
            s.maintain()
        assert len(j.segments) == 3
    assert spy.calls == [] and j.stats().fsyncs == 0


def test_fsync_segment_on_seal_and_close(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spy = FsyncSpy(monkeypatch)
    s = JournalStore.open(tmp_path / "j", fsync="segment", segment_bytes=4000)
    j = s.dataset(DATASET)
    j.learn([("ES", 1)])
    j.append(chunk([trades(NOW_NS)]))
    j.append(chunk([trades(NOW_NS)]))
    s.maintain()
    assert spy.calls == []  # nothing sealed yet
    j.append(chunk([trades(NOW_NS)]))  # rolls: segment 1 sealed
    # its rt-00.dbn and index.bin, the dataset's directory and the segment's
    poll(lambda: len(spy.calls) == 4)
    s.close()
    # at close: the open segment's two files, symbology.bin and the two directories
    assert len(spy.calls) == 9
    assert spy.off_main_thread()
    assert j.stats().fsyncs == 9


def test_fsync_interval_runs_on_a_thread_and_never_blocks_maintain(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = threading.Event()
    spy = FsyncSpy(monkeypatch, gate)
    s = JournalStore.open(tmp_path / "j", fsync="interval", fsync_interval_s=0.05)
    try:
        j = s.dataset(DATASET)
        j.append(chunk([trades(NOW_NS)]))
        s.maintain()
        assert s.fsyncs_pending == 0  # the interval has not passed yet
        took: list[float] = []

        def tick() -> None:
            started = time.perf_counter()
            s.maintain()
            took.append(time.perf_counter() - started)

        # an interval later the work is handed to the thread (blocked on the gate), and
        # maintain() returns at once, again and again
        poll(lambda: s.fsyncs_pending == 1, tick=tick)
        for _ in range(3):
            tick()
        assert max(took) < 0.05 and s.fsyncs_pending == 1
        assert spy.calls == []
        gate.set()
        poll(lambda: len(spy.calls) >= 3)  # rt-00.dbn, index.bin, dirs
        poll(lambda: s.fsyncs_pending == 0)
        first = len(spy.calls)
        j.append(chunk([trades(NOW_NS)]))
        poll(lambda: len(spy.calls) > first, tick=s.maintain)  # and again, an interval later
        poll(lambda: s.fsyncs_pending == 0)
        third = len(spy.calls)
        deadline = time.monotonic() + 0.2  # nothing new written: no more fsyncs
        while time.monotonic() < deadline:
            s.maintain()
            time.sleep(0.01)
        assert len(spy.calls) == third
        assert spy.off_main_thread()
    finally:
        gate.set()
        s.close()
    assert j.stats().fsyncs == len(spy.calls)


# --- write errors ----------------------------------------------------------------------


def failing_writes(
    monkeypatch: pytest.MonkeyPatch, root: Path, fail: Callable[[int, bytes], int | None]
) -> list[int]:
    """Make os.write on files under ``root`` call ``fail`` (its int result is what the
    write returns; None: write for real)."""
    real = os.write
    seen: list[int] = []

    def write(fd: int, data: bytes) -> int:
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = ""
        if target.startswith(str(root)):
            seen.append(fd)
            got = fail(len(seen), bytes(data))
            if got is not None:
                return got
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)
    return seen


@pytest.mark.parametrize("how", ["enospc_on_index", "short_data_write"])
def test_a_write_error_disables_the_dataset_with_one_error_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    path = tmp_path / "j"
    s = JournalStore.open(path)
    j = s.dataset(DATASET)
    other = s.dataset("OTHER.X")
    for q in range(3):
        assert j.append(chunk([trades(NOW_NS + q)])) == q + 1
    rt = path / DATASET / "0000000001" / "rt-00.dbn"
    size = rt.stat().st_size
    armed = [True]

    def fail(n: int, data: bytes) -> int | None:
        if not armed[0]:
            return None
        if how == "enospc_on_index" and len(data) == 64:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if how == "short_data_write" and len(data) > 64:
            fd_written = os.open(rt, os.O_WRONLY | os.O_APPEND)
            try:
                return os.write(fd_written, data[: len(data) // 2])
            finally:
                os.close(fd_written)
        return None

    failing_writes(monkeypatch, path / DATASET, fail)
    caplog.set_level(logging.INFO, logger="gateway.journal")
    assert j.append(chunk([trades(NOW_NS + 9)])) == 0
    armed[0] = False
    assert j.append(chunk([trades(NOW_NS + 10)])) == 0  # no-op from now on
    j.learn([("ES", 1)])
    assert not j.enabled and j.error
    assert ("No space left" in j.error) if how == "enospc_on_index" else ("short write" in j.error)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == [f"journal {DATASET} disabled: {j.error}"]
    st = j.stats()
    assert (st.enabled, st.write_errors, st.last_seq, st.appended_chunks) == (False, 1, 3, 3)
    assert rt.stat().st_size == size  # truncated back to the last whole chunk
    assert other.append(chunk([trades(NOW_NS)])) == 1  # other datasets go on
    assert j.mappings_as_of(9) == {}
    s.close()
    caplog.clear()
    with JournalStore.open(path) as s2:
        j2 = s2.dataset(DATASET)
        assert j2.enabled and j2.last_seq == 3
        assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    _check_files(path / DATASET)


FSIZE_WRITER = """
import json, logging, resource, sys
from pathlib import Path
from gateway.dbn import index_records
from gateway.journal import JournalStore
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
store = JournalStore.open(sys.argv[1])
j = store.dataset("TEST.JRNL")
index, _ = index_records(Path(sys.argv[2]).read_bytes())
seqs = []
for i in range(2000):
    seq = j.append(index)
    if seq == 0:
        break
    seqs.append(seq)
again = j.append(index)
st = j.stats()
store.close()
print(json.dumps({"last": seqs[-1], "again": again, "enabled": st.enabled, "error": st.error,
                  "write_errors": st.write_errors, "last_seq": st.last_seq}))
"""


def test_rlimit_fsize_in_a_real_process_disables_the_journal(tmp_path: Path) -> None:
    import resource

    path = tmp_path / "j"
    (tmp_path / "chunk").write_bytes(trades(NOW_NS))
    limit = 100_000

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run(
        [sys.executable, "-c", FSIZE_WRITER, str(path), str(tmp_path / "chunk")],
        cwd=REPO,
        capture_output=True,
        timeout=60,
        preexec_fn=cap,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    out = json.loads(proc.stdout)
    assert out["enabled"] is False and out["again"] == 0 and out["write_errors"] == 1
    assert out["last"] == out["last_seq"] and out["last"] >= 40
    assert "File too large" in out["error"] or "short write" in out["error"]
    errors = [ln for ln in proc.stderr.decode().splitlines() if ln.startswith("ERROR")]
    assert errors == [f"ERROR journal {DATASET} disabled: {out['error']}"]
    with JournalStore.open(path) as s:
        j = s.dataset(DATASET)
        assert j.last_seq == out["last_seq"]
        assert read_entry(j.entries({0}, j.last_seq - 1, j.last_seq)[0]) == trades(NOW_NS)
    _check_files(path / DATASET)


def test_symbology_log_is_compacted_at_open_once_its_chunks_aged_out(tmp_path: Path) -> None:
    path = tmp_path / "j"
    kw = {"retention_s": 3.0, "segment_span_s": 1.0}
    with JournalStore.open(path, **kw) as s:  # type: ignore[arg-type]
        j = s.dataset(DATASET)
        for k in range(1200):  # ten symbols remapped over and over before chunk 1
            j.learn([(f"S{k % 10}", k)])
        for q in range(1, 7):
            j.learn([(f"Q{q}", 1000 + q)])
            j.append(chunk([trades(NOW_NS + q * SEC, 2)]))
        s.maintain()
        assert j.first_seq() == 3
        as_of = {q: j.mappings_as_of(q) for q in range(2, 7)}
        changes = j.mapping_changes(2, 6)
    sym = path / DATASET / "symbology.bin"
    before = sym.stat().st_size
    with JournalStore.open(path, **kw) as s:  # type: ignore[arg-type]
        j = s.dataset(DATASET)
        assert sym.stat().st_size < before // 10
        assert {q: j.mappings_as_of(q) for q in range(2, 7)} == as_of
        assert j.mapping_changes(2, 6) == changes
        assert as_of[2]["S3"] == 1193 and as_of[2]["Q2"] == 1002
        j.learn([("Q9", 9)])
        assert j.mappings_as_of(7)["Q9"] == 9
    with JournalStore.open(path, **kw) as s:  # type: ignore[arg-type]
        assert s.dataset(DATASET).mappings_as_of(7) == {**as_of[6], "Q9": 9}
