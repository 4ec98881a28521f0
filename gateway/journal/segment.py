"""One journal segment: its files, its index rows in memory, and its recovery from disk.

A segment's id is the seq of its first chunk, so the directory names alone say where
every segment starts, and an empty newest segment still says where the journal is.
"""

from __future__ import annotations

import logging
import mmap
import os
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt

from gateway.dbn import UNDEF_TIMESTAMP, index_records
from gateway.errors import ConfigError
from gateway.journal.format import (
    FORMAT_VERSION,
    INDEX_HEADER_LEN,
    ROW_DTYPE,
    ROW_LEN,
    filter_ts,
    pack_index_header,
    parse_index_header,
    row_crcs,
)

__all__ = ["Entry", "JournalFormatError", "Recovered", "Segment", "recover_segment"]

log = logging.getLogger("gateway.journal")

INDEX_NAME: Final = "index.bin"
ORDER_NAME: Final = "order.bin"
_RO: Final = os.O_RDONLY | os.O_CLOEXEC


class JournalFormatError(ConfigError):
    """A journal directory written by an incompatible format version."""

    reason = "journal_format"


def rt_name(rtype: int) -> str:
    return f"rt-{rtype:02x}.dbn"


class Segment:
    """The files of one segment and its index rows (a numpy array, grown amortised).

    Readers get their own fds (``open_fd``); deleting the segment (retention) never breaks
    an fd already opened (the inode lives until it is closed), and a deleted segment is
    gone from its journal's list, so no new Entry points at it.
    """

    def __init__(self, directory: Path, segment_id: int) -> None:
        self.id = segment_id
        self._dir = directory
        # the rows' bytes (a plain uint8 buffer: appending is a memcpy; ``rows`` views it)
        self._buf: npt.NDArray[np.uint8] = np.zeros(64 * ROW_LEN, dtype=np.uint8)
        self.n = 0
        self.rt_sizes: dict[int, int] = {}
        self.order_size = 0
        self.index_size = INDEX_HEADER_LEN
        self.min_ts: int | None = None
        self.max_ts: int | None = None
        #: max filter ts without UNDEF_TIMESTAMP (what retention and newest_ts use)
        self.newest_ts: int | None = None
        self.last_seq = segment_id - 1
        self.last_write = time.time()
        self.deleted = False
        self.sealed = False
        # writer state (the newest segment only)
        self.fds: dict[int, int] = {}
        self.order_fd = -1
        self.index_fd = -1

    def rt_path(self, rtype: int) -> Path:
        """The file of this segment's records of ``rtype`` (in feed order)."""
        return self._dir / rt_name(rtype)

    def __repr__(self) -> str:
        return f"Segment(id={self.id}, rows={self.n}, bytes={self.nbytes})"

    @property
    def rows(self) -> npt.NDArray[np.void]:
        """The index rows (ROW_DTYPE), a view: a reader's copy of it stays valid."""
        return self._buf[: self.n * ROW_LEN].view(ROW_DTYPE)

    @property
    def first_seq(self) -> int:
        return self.id

    @property
    def nbytes(self) -> int:
        return sum(self.rt_sizes.values()) + self.order_size + self.index_size

    def add_rows(self, raw: bytes) -> None:
        start = self.n * ROW_LEN
        end = start + len(raw)
        if end > len(self._buf):
            grown = np.zeros(max(end, 2 * len(self._buf)), dtype=np.uint8)
            grown[:start] = self._buf[:start]
            self._buf = grown  # views handed out keep the old buffer alive
        self._buf[start:end] = np.frombuffer(raw, dtype=np.uint8)
        self.n = end // ROW_LEN

    def open_fd(self, rtype: int) -> int:
        """An O_RDONLY fd of the segment's file of ``rtype``; the caller closes it.
        Raises OSError (FileNotFoundError) when the segment was deleted meanwhile."""
        return os.open(self._dir / rt_name(rtype), _RO)

    def open_order_fd(self) -> int:
        return os.open(self._dir / ORDER_NAME, _RO)

    # --- writer -----------------------------------------------------------------------

    def writer_fds(self) -> list[int]:
        fds = list(self.fds.values())
        if self.order_fd >= 0:
            fds.append(self.order_fd)
        if self.index_fd >= 0:
            fds.append(self.index_fd)
        return fds

    def detach_writer(self) -> list[int]:
        """Stop writing; hand back the writer's fds (the caller fsyncs and/or closes them)."""
        fds = self.writer_fds()
        self.fds = {}
        self.order_fd = -1
        self.index_fd = -1
        return fds

    def open_writer(self, create: bool, dataset: str) -> None:
        """Open index.bin for appending (a new segment: create it with its header)."""
        flags = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC
        if create:
            self._dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self._dir / INDEX_NAME, flags | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                header = pack_index_header(self.id, dataset)
                if os.write(fd, header) != len(header):
                    raise OSError(28, "short write of the index header")
            except BaseException:
                os.close(fd)
                raise
            self.index_fd = fd
        else:
            self.index_fd = os.open(self._dir / INDEX_NAME, flags)

    def rt_fd(self, rtype: int) -> int:
        fd = self.fds.get(rtype)
        if fd is None:
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
            fd = os.open(self._dir / rt_name(rtype), flags, 0o644)
            self.fds[rtype] = fd
            self.rt_sizes.setdefault(rtype, 0)
        return fd

    def get_order_fd(self) -> int:
        if self.order_fd < 0:
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
            self.order_fd = os.open(self._dir / ORDER_NAME, flags, 0o644)
        return self.order_fd

    def dir_fd(self) -> int:
        return os.open(self._dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def remove(self) -> None:
        """Delete the segment's files and directory (fds already open keep working)."""
        self.deleted = True
        for fd in self.detach_writer():
            os.close(fd)
        for child in list(self._dir.iterdir()) if self._dir.is_dir() else []:
            child.unlink(missing_ok=True)
        self._dir.rmdir()


@dataclass(frozen=True)
class Entry:
    """One (chunk, rtype) part of the journal: ``length`` bytes at ``offset`` of the
    segment's file of ``rtype``, ``count`` records; ``order_off`` is where the chunk's
    rtype-per-record bytes start in order.bin (-1: the chunk has one rtype)."""

    seq: int
    rtype: int
    nparts: int
    segment: Segment = field(compare=False)
    offset: int
    length: int
    count: int
    min_ts: int
    max_ts: int
    order_off: int


@dataclass
class Recovered:
    segment: Segment | None  # None: not a segment (no readable header)
    cut: dict[str, int] = field(default_factory=dict)  # file name -> bytes cut
    problem: str = ""  # why it was cut (empty: nothing cut)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return -1


def recover_segment(directory: Path, segment_id: int, dataset: str) -> Recovered:
    """Read a segment back, verify it (header, row crcs, chunk structure, contiguous
    offsets, file sizes, every part's data crc) and cut it back to its last good chunk.
    Raises JournalFormatError for another format version."""
    raw = _read(directory / INDEX_NAME)
    header = parse_index_header(raw)
    if header is None:
        return Recovered(None, problem="unreadable index header")
    version, stored_id, _ = header
    if version != FORMAT_VERSION:
        raise JournalFormatError(
            f"journal segment {directory} has format version {version}; this gateway "
            f"reads version {FORMAT_VERSION} (move the journal directory away)"
        )
    if stored_id != segment_id:
        return Recovered(None, problem="segment id does not match its directory")
    seg = Segment(directory, segment_id)
    nrows = (len(raw) - INDEX_HEADER_LEN) // ROW_LEN
    rows = np.frombuffer(raw, dtype=ROW_DTYPE, count=nrows, offset=INDEX_HEADER_LEN).copy()
    problems: list[str] = []
    keep = _good_prefix(directory, segment_id, rows, problems)
    rows = rows[:keep]
    if len(rows):
        seg.add_rows(rows.tobytes())
        seg.last_seq = int(rows["seq"][-1])
        seg.min_ts = int(rows["min_ts"].min())
        seg.max_ts = int(rows["max_ts"].max())
        seg.newest_ts = _newest_defined(directory, rows)
    seg.index_size = INDEX_HEADER_LEN + keep * ROW_LEN
    ends = rows["offset"] + rows["length"].astype(np.uint64)
    for rtype in np.unique(rows["rtype"]).tolist():
        seg.rt_sizes[int(rtype)] = int(ends[rows["rtype"] == rtype].max())
    mixed = rows["order_off"] >= 0
    if mixed.any():
        chunk_counts = _chunk_counts(rows)
        seg.order_size = int((rows["order_off"] + chunk_counts)[mixed].max())
    cut: dict[str, int] = {}
    _cut_file(directory / INDEX_NAME, seg.index_size, cut)
    _cut_file(directory / ORDER_NAME, seg.order_size, cut)
    for child in directory.glob("rt-*.dbn"):
        try:
            rtype = int(child.name[3:5], 16)
        except ValueError:
            continue
        _cut_file(child, seg.rt_sizes.get(rtype, 0), cut)
    try:
        seg.last_write = (directory / INDEX_NAME).stat().st_mtime
    except OSError:
        pass
    return Recovered(seg, cut, "; ".join(problems))


def _newest_defined(directory: Path, rows: npt.NDArray[np.void]) -> int | None:
    """The largest filter ts of the rows that is not UNDEF_TIMESTAMP; parts whose max is
    UNDEF (rare) are read back to find their largest defined one."""
    maxes = rows["max_ts"]
    undef = maxes == UNDEF_TIMESTAMP
    best = [int(maxes[~undef].max())] if (~undef).any() else []
    for row in rows[undef]:
        fd = os.open(directory / rt_name(int(row["rtype"])), _RO)
        try:
            data = os.pread(fd, int(row["length"]), int(row["offset"]))
        finally:
            os.close(fd)
        index, _ = index_records(data)
        ts = filter_ts(index)
        ts = ts[ts != UNDEF_TIMESTAMP]
        if len(ts):
            best.append(int(ts.max()))
    return max(best) if best else None


def _cut_file(path: Path, size: int, cut: dict[str, int]) -> None:
    have = _size(path)
    if have > size:
        os.truncate(path, size)
        cut[path.name] = have - size


def _chunk_counts(rows: npt.NDArray[np.void]) -> npt.NDArray[np.int64]:
    """Per row: the record count of its whole chunk (the sum over the chunk's parts)."""
    seqs = rows["seq"]
    starts = np.flatnonzero(np.concatenate(([True], seqs[1:] != seqs[:-1])))
    sums = np.add.reduceat(rows["count"].astype(np.int64), starts)
    return np.repeat(sums, np.diff(np.append(starts, len(rows))))


def _good_prefix(
    directory: Path, segment_id: int, rows: npt.NDArray[np.void], problems: list[str]
) -> int:
    """How many leading rows form whole, verified chunks."""
    n = len(rows)
    if n == 0:
        return 0
    # 1. row crcs
    good = row_crcs(rows)
    bad = int(np.argmin(good)) if not good.all() else n
    if bad < n:
        problems.append(f"bad index row crc at row {bad}")
    # 2. chunk structure: seqs segment_id, +1, ...; each chunk has nparts rows of distinct
    #    rtypes; a chunk cut short at the end is torn.
    limit = bad
    seqs = rows["seq"][:limit].astype(np.int64)
    if limit:
        starts = np.flatnonzero(np.concatenate(([True], seqs[1:] != seqs[:-1])))
        sizes = np.diff(np.append(starts, limit))
        expect_seq = segment_id + np.arange(len(starts))
        okay = (seqs[starts] == expect_seq) & (rows["nparts"][starts] == sizes)
        if not okay.all():
            first_bad = int(np.argmin(okay))
            limit = int(starts[first_bad])
            problems.append(f"torn or inconsistent chunk at seq {segment_id + first_bad}")
    rows = rows[:limit]
    # 3. contiguous offsets per rtype, file sizes, data crcs; order.bin for mixed chunks
    cut_seq = segment_id + len(np.unique(rows["seq"])) if limit else segment_id
    for rtype in np.unique(rows["rtype"]).tolist():
        mine = np.flatnonzero(rows["rtype"] == rtype)
        offs = rows["offset"][mine].astype(np.int64)
        lens = rows["length"][mine].astype(np.int64)
        expect = np.concatenate(([0], np.cumsum(lens)[:-1]))
        size = max(_size(directory / rt_name(int(rtype))), 0)
        ok = (offs == expect) & (offs + lens <= size)
        first = int(np.argmin(ok)) if not ok.all() else len(mine)
        if first < len(mine):
            problems.append(
                f"{rt_name(int(rtype))} short or misplaced at seq {rows['seq'][mine[first]]}"
            )
        first = min(
            first, _first_bad_crc(directory / rt_name(int(rtype)), rows[mine[:first]], problems)
        )
        if first < len(mine):
            cut_seq = min(cut_seq, int(rows["seq"][mine[first]]))
    mixed = np.flatnonzero(rows["order_off"] >= 0)
    if len(mixed):
        cut_seq = min(cut_seq, _check_order(directory, rows, mixed, problems))
    return int(np.searchsorted(rows["seq"], cut_seq, side="left"))


def _first_bad_crc(path: Path, rows: npt.NDArray[np.void], problems: list[str]) -> int:
    if len(rows) == 0:
        return 0
    with path.open("rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size == 0:
            return 0
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            view = memoryview(mm)
            try:
                offs = rows["offset"].tolist()
                lens = rows["length"].tolist()
                crcs = rows["crc"].tolist()
                for i, (off, length, crc) in enumerate(zip(offs, lens, crcs, strict=True)):
                    if zlib.crc32(view[off : off + length]) != crc:
                        problems.append(f"bad data crc in {path.name} at seq {rows['seq'][i]}")
                        return i
            finally:
                view.release()
    return len(rows)


def _check_order(
    directory: Path, rows: npt.NDArray[np.void], mixed: npt.NDArray[np.int64], problems: list[str]
) -> int:
    """The first seq whose order.bin bytes are missing or disagree with its parts."""
    counts = _chunk_counts(rows)
    data = _read(directory / ORDER_NAME)
    order = np.frombuffer(data, dtype=np.uint8)
    expect = 0
    for i in mixed.tolist():
        seq = int(rows["seq"][i])
        off = int(rows["order_off"][i])
        total = int(counts[i])
        if i and int(rows["seq"][i - 1]) == seq:
            continue  # checked with the chunk's first part
        if off != expect or off + total > len(order):
            problems.append(f"order.bin short or misplaced at seq {seq}")
            return seq
        part = order[off : off + total]
        j = i
        while j < len(rows) and int(rows["seq"][j]) == seq:
            if int((part == rows["rtype"][j]).sum()) != int(rows["count"][j]):
                problems.append(f"order.bin disagrees with the index at seq {seq}")
                return seq
            j += 1
        expect = off + total
    return int(rows["seq"][-1]) + 1 if len(rows) else 0
