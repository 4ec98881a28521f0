"""The journal's storage (issue 14): chunks written per rtype, read back by seq and by
filter ts, symbology as of any seq, the directory lock. Records are built with
databento_dbn; every expected byte string is cut from the chunks the test built."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import databento_dbn as d
import numpy as np
import pytest

from gateway.dbn import ChunkIndex, index_records
from gateway.errors import ConfigError
from gateway.journal import (
    WRITE_BUCKETS,
    DatasetJournal,
    Entry,
    JournalLockedError,
    JournalStore,
    filter_ts,
)
from gateway.journal.format import TS_RECV_OFFSET

from .conftest import NOW_NS, mbo, trade

DATASET = "TEST.JRNL"


def mbp1(iid: int, ts: int = NOW_NS) -> bytes:
    return bytes(
        d.MBP1Msg(
            publisher_id=1,
            instrument_id=iid,
            ts_event=ts,
            price=100,
            size=1,
            action=d.Action.ADD,  # type: ignore[arg-type]
            side=d.Side.BID,  # type: ignore[arg-type]
            depth=0,
            ts_recv=ts + 3,
        )
    )


def bbo(iid: int, ts_event: int, ts_recv: int, rtype: int = 0xC3) -> bytes:
    cls = d.BBOMsg if rtype in (0xC3, 0xC4) else d.CBBOMsg
    return bytes(
        cls(
            rtype=rtype,
            publisher_id=1,
            instrument_id=iid,
            ts_event=ts_event,
            price=1,
            size=1,
            side=d.Side.BID,  # type: ignore[arg-type]
            ts_recv=ts_recv,
        )
    )


def chunk(records: list[bytes]) -> ChunkIndex:
    index, used = index_records(b"".join(records))
    assert used == sum(len(r) for r in records)
    return index


def read_entry(entry: Entry) -> bytes:
    fd = entry.segment.open_fd(entry.rtype)
    try:
        return os.pread(fd, entry.length, entry.offset)
    finally:
        os.close(fd)


def rebuild(journal: DatasetJournal, entries: list[Entry]) -> bytes:
    """The chunk's bytes in live order, from its parts and order.bin."""
    parts = {e.rtype: read_entry(e) for e in entries}
    first = entries[0]
    order = journal.order_bytes(first)
    out = bytearray()
    pos = dict.fromkeys(parts, 0)
    for rtype in order:
        data = parts[rtype]
        length = data[pos[rtype]] * 4
        out += data[pos[rtype] : pos[rtype] + length]
        pos[rtype] += length
    return bytes(out)


@pytest.fixture
def store(tmp_path: Path):
    s = JournalStore.open(tmp_path / "j")
    yield s
    s.close()


def test_single_rtype_chunks_round_trip_as_one_byte_range(store: JournalStore) -> None:
    j = store.dataset(DATASET)
    a = [trade(i, NOW_NS + i) for i in range(10)]
    b = [trade(i, NOW_NS + 100 + i) for i in range(5)]
    assert j.append(chunk(a)) == 1
    assert j.append(chunk(b)) == 2
    assert j.last_seq == 2 and j.first_seq() == 1
    got = j.entries({0x00}, 0, 2)
    assert [(e.seq, e.rtype, e.nparts, e.count, e.order_off) for e in got] == [
        (1, 0, 1, 10, -1),
        (2, 0, 1, 5, -1),
    ]
    assert got[1].offset == got[0].offset + got[0].length
    fd = got[0].segment.open_fd(0x00)
    try:  # an ALL_SYMBOLS replay of the schema is one plain range of the file
        assert os.pread(fd, 1 << 20, 0) == b"".join(a + b)
    finally:
        os.close(fd)
    assert (got[0].min_ts, got[0].max_ts) == (NOW_NS, NOW_NS + 9)
    assert j.entries({0xA0}, 0, 2) == []
    assert [e.seq for e in j.entries({0x00}, 1, 2)] == [2]
    assert [e.seq for e in j.entries({0x00}, 0, 1)] == [1]
    assert len(j.entries({0x00}, 0, 2, max_rows=1)) == 1


def test_mixed_chunk_is_split_per_rtype_and_order_rebuilds_it(store: JournalStore) -> None:
    j = store.dataset(DATASET)
    records = [trade(1, NOW_NS), mbo(2, NOW_NS + 5), trade(3, NOW_NS + 1), mbp1(4, NOW_NS + 9)]
    records += [mbo(5, NOW_NS + 2), trade(6, NOW_NS + 3)]
    assert j.append(chunk(records)) == 1
    got = j.entries({0x00, 0xA0, 0x01}, 0, 1)
    assert sorted(e.rtype for e in got) == [0x00, 0x01, 0xA0]
    assert {e.nparts for e in got} == {3}
    by_rtype = {e.rtype: e for e in got}
    assert read_entry(by_rtype[0x00]) == records[0] + records[2] + records[5]
    assert read_entry(by_rtype[0xA0]) == records[1] + records[4]
    assert read_entry(by_rtype[0x01]) == records[3]
    assert (by_rtype[0xA0].min_ts, by_rtype[0xA0].max_ts) == (NOW_NS + 2, NOW_NS + 5)
    assert j.order_bytes(got[0]) == bytes([0x00, 0xA0, 0x00, 0x01, 0xA0, 0x00])
    assert rebuild(j, got) == b"".join(records)
    # a second mixed chunk's order bytes follow the first's
    more = [mbo(1, NOW_NS + 20), trade(1, NOW_NS + 21)]
    assert j.append(chunk(more)) == 2
    second = j.entries({0x00, 0xA0}, 1, 2)
    assert rebuild(j, second) == b"".join(more)
    assert [e.rtype for e in j.entries({0xA0}, 0, 9)] == [0xA0, 0xA0]


def test_filter_ts_is_ts_recv_for_bbo_rtypes() -> None:
    ts_recv = 0x1122334455667788
    for rtype in (0xC0, 0xC1, 0xC3, 0xC4):
        raw = bbo(7, 5, ts_recv, rtype)
        assert raw[1] == rtype
        assert raw.find(struct.pack("<Q", ts_recv)) == TS_RECV_OFFSET
    index = chunk([trade(1, 50), bbo(2, 60, 600), trade(3, 70), bbo(4, 80, 800, 0xC0)])
    assert filter_ts(index).tolist() == [50, 600, 70, 800]
    plain = chunk([trade(1, 50), trade(1, 40)])
    assert filter_ts(plain) is plain.ts_events


def test_bbo_entries_carry_ts_recv_bounds(store: JournalStore) -> None:
    j = store.dataset(DATASET)
    j.append(chunk([bbo(1, 10, 1000), bbo(2, 20, 900)]))
    (entry,) = j.entries({0xC3}, 0, 1)
    assert (entry.min_ts, entry.max_ts) == (900, 1000)
    assert j.skip_before_ts({0xC3}, 950) == 0
    assert j.skip_before_ts({0xC3}, 1001) == 1


def test_skip_before_ts_on_jittered_timestamps(store: JournalStore) -> None:
    j = store.dataset(DATASET)
    rng = np.random.default_rng(7)
    base = NOW_NS
    tss: list[list[int]] = []
    for c in range(30):
        # ts_event jitters: within a chunk and across chunks it goes backwards
        chunk_ts = [base + c * 1000 + int(x) for x in rng.integers(-1500, 1500, 8)]
        tss.append(chunk_ts)
        records = [trade(i, t) for i, t in enumerate(chunk_ts)]
        if c % 3 == 0:
            records.append(mbo(9, base + c * 1000))
        assert j.append(chunk(records)) == c + 1
    for probe in (base - 10_000, base, base + 5_000, base + 17_321, base + 40_000):
        expect = 0
        for seq, chunk_ts in enumerate(tss, start=1):
            if max(chunk_ts) >= probe:
                break
            expect = seq
        else:
            expect = 30
        assert j.skip_before_ts({0x00}, probe) == expect, probe
    # the mbo parts only: chunks 1, 4, 7, ...
    assert j.skip_before_ts({0xA0}, base + 3000) == 3
    assert j.skip_before_ts({0xA0}, base + 3001) == 6
    assert j.oldest_ts() == min(min(t) for t in tss)
    assert j.newest_ts() == max(max(t) for t in tss)


def test_symbology_as_of_and_changes(store: JournalStore) -> None:
    j = store.dataset(DATASET)
    j.learn([("ESZ6", 1), ("NQZ6", 2)], ts=NOW_NS)
    j.append(chunk([trade(1)]))
    j.append(chunk([trade(2)]))
    j.learn([("ESZ6", 3)], ts=NOW_NS + 5)
    j.append(chunk([trade(3)]))
    assert j.mappings_as_of(0) == {}
    assert j.mappings_as_of(1) == {"ESZ6": 1, "NQZ6": 2}
    assert j.mappings_as_of(2) == {"ESZ6": 1, "NQZ6": 2}
    assert j.mappings_as_of(3) == {"ESZ6": 3, "NQZ6": 2}
    assert j.mapping_changes(0, 3) == [(1, "ESZ6", 1), (1, "NQZ6", 2), (3, "ESZ6", 3)]
    assert j.mapping_changes(1, 3) == [(3, "ESZ6", 3)]
    assert j.mapping_changes(3, 9) == []


def test_reopen_keeps_seq_rows_and_symbology(tmp_path: Path) -> None:
    path = tmp_path / "j"
    records = [trade(i, NOW_NS + i) for i in range(4)]
    with JournalStore.open(path) as s:
        j = s.dataset(DATASET)
        j.learn([("A", 1)])
        j.append(chunk(records))
        j.append(chunk([mbo(1), trade(2)]))
        j.learn([("B", 2)])
    with JournalStore.open(path) as s:
        assert list(s.datasets()) == [DATASET]
        j = s.dataset(DATASET)
        assert (j.first_seq(), j.last_seq) == (1, 2)
        assert j.mappings_as_of(2) == {"A": 1}
        assert j.mappings_as_of(3) == {"A": 1, "B": 2}
        assert read_entry(j.entries({0}, 0, 1)[0]) == b"".join(records)
        assert rebuild(j, j.entries({0, 0xA0}, 1, 2)) == mbo(1) + trade(2)
        assert j.append(chunk([trade(9)])) == 3
        assert j.stats().segments == 1  # the newest segment is written on
    with JournalStore.open(path) as s:
        j = s.dataset(DATASET)
        assert j.last_seq == 3
        assert [e.seq for e in j.entries({0}, 0, 9)] == [1, 2, 3]


def test_empty_chunks_and_stats(store: JournalStore) -> None:
    j = store.dataset(DATASET)
    assert j.first_seq() == 0 and j.oldest_ts() is None and j.newest_ts() is None
    assert j.append(chunk([])) == 0
    j.append(chunk([trade(1), trade(2)]))
    st = j.stats()
    assert st.enabled and st.error is None
    assert (st.first_seq, st.last_seq, st.appended_chunks) == (1, 1, 1)
    assert st.appended_bytes == 96
    assert st.bytes >= 96 and st.segments == 1
    assert st.write_seconds_count == 1
    assert len(st.write_seconds_buckets) == len(WRITE_BUCKETS)
    assert st.write_seconds_buckets[-1] <= 1
    assert st.segments_deleted == {"retention": 0, "max_bytes": 0}


def test_second_open_of_a_locked_dir_names_the_holder(tmp_path: Path) -> None:
    path = tmp_path / "j"
    first = JournalStore.open(path)
    try:
        with pytest.raises(JournalLockedError, match=rf"pid {os.getpid()}\b") as err:
            JournalStore.open(path)
        assert isinstance(err.value, ConfigError)
        assert str(path) in str(err.value)
    finally:
        first.close()
    first.close()  # idempotent
    JournalStore.open(path).close()  # free again


def test_another_process_cannot_open_a_locked_dir(tmp_path: Path) -> None:
    path = tmp_path / "j"
    code = (
        "import sys\n"
        "from gateway.journal import JournalLockedError, JournalStore\n"
        "try:\n"
        "    JournalStore.open(sys.argv[1])\n"
        "except JournalLockedError as exc:\n"
        "    print(exc)\n"
        "    sys.exit(3)\n"
    )
    repo = Path(__file__).resolve().parents[2]
    with JournalStore.open(path):
        proc = subprocess.run(
            [sys.executable, "-c", code, str(path)], cwd=repo, capture_output=True, timeout=60
        )
    assert proc.returncode == 3, proc.stderr.decode()
    assert proc.stdout.decode().strip() == (
        f"journal dir {path} is locked by another gateway (pid {os.getpid()})"
    )


def test_bad_settings_and_names_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="fsync"):
        JournalStore.open(tmp_path / "j", fsync="always")
    with JournalStore.open(tmp_path / "j") as s, pytest.raises(ConfigError, match="dataset"):
        s.dataset("../x")
