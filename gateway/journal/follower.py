"""A read-only follower of a journal another process writes (``--workers N``: the
supervisor writes, every worker follows).

``FollowerStore``/``FollowerJournal`` are a ``JournalStore``/``DatasetJournal`` that never
lock, create, write, truncate or delete anything: they read the files the writer makes and
offer the same read API (``entries``, ``row_slices``, ``skip_before_ts``,
``mappings_as_of``, ``mapping_changes``, ``order_bytes``, ``first_seq``, ``oldest_ts``,
``newest_ts``, ``stats``, ``last_seq``, ``enabled``, ``segments`` and ``Segment.open_fd``),
so the replay planner, the replay run, the refusals, checkpoints and the status snapshot
work on either unchanged.

Reading is on demand: a read asking for positions beyond the rows loaded reads the new
index rows of the newest segment (and new segments, in order) with ``pread``; symbology
rows are read from where the last read stopped. Every row carries a crc32 and only whole
chunks (all their ``nparts`` rows, crc-good, seqs contiguous) are taken: a row the writer
is writing now is simply not there yet and is read again later — nothing is ever cut.
Segments the writer deleted (retention) leave the list at the next read (their index
file is gone); descriptors a replay already opened keep working (the inode lives on).

Position: ``last_seq`` is not the file's newest seq but that of the last chunk this
process's Feed published live (``note_seq(seq)`` per ring CHUNK entry, before
``feed.publish``; ``append(index)`` — what ``Feed._publish_now`` calls — takes it and
returns it). The hand-over of a replay to live needs exactly that: the next chunk the
Feed publishes is ``last_seq + 1``. Until the first chunk the follower uses the newest
seq on file at open (``start_at(seq)`` sets it when the caller knows the seq that
precedes the first chunk it will see). A CHUNK noted with seq 0 means the writer's journal
is disabled (a write error): the follower reports disabled from then on, and replays are
refused or interrupted as with a disabled writer. ``learn()`` is a no-op (the writer
records mappings; the rows on file are read). ``end_seq()`` is the newest seq on file: a
resume may name a position this process's feed has not published yet (the checkpoint came
from a sibling worker ahead of it); its replay hands over once the feed is there.

Why one module: the tail-following (index rows, segments, symbology), the live position
(noted seqs, pieces) and the read API overrides share one dataset's follower state, and
the store and ``open_follower``/``attach_follower`` are its only entry points.
"""

from __future__ import annotations

import logging
import os
import zlib
from collections import deque
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final

import numpy as np
import numpy.typing as npt

from gateway.dbn import UNDEF_TIMESTAMP, ChunkIndex
from gateway.errors import ConfigError
from gateway.journal.dataset import DatasetJournal, JournalStats, _Settings, read_epoch
from gateway.journal.format import (
    FORMAT_VERSION,
    INDEX_HEADER_LEN,
    ROW_DTYPE,
    ROW_LEN,
    SYM_HEADER,
    SYM_ROW,
    parse_index_header,
    row_crcs,
)
from gateway.journal.segment import INDEX_NAME, Entry, Segment
from gateway.journal.store import JournalStore
from gateway.journal.symlog import SymbolLog

if TYPE_CHECKING:
    from gateway.config import JournalConfig
    from gateway.feeds.base import Feed

__all__ = ["FollowerJournal", "FollowerStore", "attach_follower", "open_follower"]

log = logging.getLogger("gateway.journal")

_RO: Final = os.O_RDONLY | os.O_CLOEXEC
_SYM_MAGIC: Final = b"LSGS"
#: noted seqs kept for chunks not yet appended (a Feed holds few; more means a caller bug)
_MAX_NOTED: Final = 4096
#: a chunk published from this many bytes up may be a piece of a larger one: the ring
#: splits chunks over a quarter of its size (at least 1 MiB: 256 KiB), less a record
_PIECE_BYTES: Final = 64 * 1024
#: index rows at the end of a read whose crcs are checked (see ``_whole_chunks``)
_CRC_TAIL: Final = 512


def _pread_from(path: Path, offset: int) -> tuple[bytes, int] | None:
    """(bytes of ``path`` from ``offset`` to its end, its inode), or None if it is gone."""
    try:
        fd = os.open(path, _RO)
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)
        if st.st_size <= offset:
            return b"", st.st_ino
        return os.pread(fd, st.st_size - offset, offset), st.st_ino
    finally:
        os.close(fd)


class _SymbolTail(SymbolLog):
    """The symbology log read as the writer appends it (never written here)."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self._ino = -1

    def recover(self, last_seq: int) -> int:
        raise NotImplementedError("a follower never cuts the symbology log")

    def compact(self, first_seq: int) -> bool:
        return False

    def append(self, at_seq: int, ts: int, changed: Sequence[tuple[str, int]]) -> int:
        raise NotImplementedError("a follower never writes the symbology log")

    def refresh(self) -> None:
        """Read the whole rows the writer appended since the last read."""
        got = _pread_from(self._path, self.size)
        if got is None:
            return
        raw, ino = got
        if ino != self._ino and self._ino != -1:
            # replaced (compacted by a writer that opened it again): read it from the start
            self._rows, self._at, self.size = [], [], 0
            got = _pread_from(self._path, 0)
            if got is None:
                return
            raw, ino = got
        self._ino = ino
        off = 0
        if self.size == 0:
            if len(raw) < SYM_HEADER.size:
                return
            magic, version, _, _ = SYM_HEADER.unpack_from(raw, 0)
            if magic != _SYM_MAGIC or version != FORMAT_VERSION:
                return
            off = SYM_HEADER.size
        total = len(raw)
        rows = self._rows
        at = self._at
        while off + SYM_ROW.size + 4 <= total:
            row_len, name_len, iid, at_seq, ts = SYM_ROW.unpack_from(raw, off)
            if row_len != SYM_ROW.size + name_len + 4 or off + row_len > total:
                break
            end = off + row_len - 4
            if int.from_bytes(raw[end : end + 4], "little") != _crc(raw, off, end):
                break  # being written: read again later
            rows.append((at_seq, ts, iid, raw[off + SYM_ROW.size : end].decode(errors="replace")))
            at.append(at_seq)
            off += row_len
        self.size += off


def _crc(raw: bytes, start: int, end: int) -> int:
    return zlib.crc32(memoryview(raw)[start:end])


class FollowerJournal(DatasetJournal):
    """A dataset's journal, read-only, following the writer's files (module docstring)."""

    def __init__(self, directory: Path, dataset: str, settings: _Settings) -> None:
        super().__init__(directory, dataset, settings)
        self._symbols: _SymbolTail = _SymbolTail(directory)
        #: journal seqs of chunks noted and not yet appended, oldest first
        self._noted: deque[int] = deque()
        #: newest seq whose index rows are loaded
        self._loaded = 0
        #: a chunk published in pieces (see ``append``): its seq, records published so far
        self._partial_seq = 0
        self._partial_done = 0
        #: the seq the first chunk published should have (``start_at``; 0: not known)
        self._first = 0
        #: segment id -> its index file's path (checked for deletion on reads)
        self._index_paths: dict[int, str] = {}

    @classmethod
    def open(cls, directory: Path, dataset: str, settings: _Settings) -> FollowerJournal:
        journal = cls(directory, dataset, settings)
        journal.epoch = read_epoch(directory)
        journal._load_new()
        journal._symbols.refresh()
        journal.last_seq = journal._loaded
        if journal.segments and not journal.segments[-1].n:
            journal.last_seq = max(journal.last_seq, journal.segments[-1].id - 1)
        return journal

    # --- the live position ------------------------------------------------------------

    def start_at(self, seq: int) -> None:
        """The seq of the chunk just before the first one this process will see live."""
        if not self._noted:
            self.last_seq = seq
            self._first = seq + 1

    def note_seq(self, seq: int) -> None:
        """The journal seq of the next chunk the Feed publishes (0: the writer's journal
        is disabled)."""
        if seq == 0:
            if self.enabled:
                self.enabled = False
                self.error = "the writer's journal stopped after a write error"
                log.error("journal %s follower disabled: %s", self.dataset, self.error)
            return
        if len(self._noted) >= _MAX_NOTED:
            self._noted.popleft()
        self._noted.append(seq)

    def append(self, index: ChunkIndex) -> int:
        """The noted seq of the chunk being published (0: none, or disabled).

        ``last_seq`` moves to it once the whole chunk is published: the ring carries a
        chunk larger than a quarter of it in pieces (each noted with the chunk's seq), and
        until the last piece is out a hand-over or a checkpoint at that seq would promise
        records live has not delivered yet. A piece can only be that large, so a smaller
        one is a whole chunk (or its last piece); a large one is counted against the
        chunk's index rows."""
        if not self._noted:
            return 0
        seq = self._noted.popleft()
        if not self.enabled or self._closed:
            return 0
        if self._first:
            if seq != self._first:
                log.warning(
                    "journal %s follower: the first chunk published is seq %d, not %d as "
                    "the writer said (a replay handed over before it may be off)",
                    *(self.dataset, seq, self._first),
                )
            self._first = 0
        if seq <= self.last_seq:
            return seq
        if index.nbytes < _PIECE_BYTES and seq != self._partial_seq:
            self.last_seq = seq
            self._partial_seq = 0
            return seq
        if seq != self._partial_seq:
            self._partial_seq, self._partial_done = seq, 0
        self._partial_done += index.count
        total = self._records_of(seq)
        if total is None or self._partial_done >= total:
            self.last_seq = seq
            self._partial_seq = 0
        return seq

    def _records_of(self, seq: int) -> int | None:
        """How many records the writer journaled in chunk ``seq`` (None: not on file)."""
        if seq > self._loaded:
            self._load_new(seq)
        for seg in reversed(self.segments):
            if seg.first_seq <= seq <= seg.last_seq:
                seqs = seg.rows["seq"]
                lo = int(np.searchsorted(seqs, seq, side="left"))
                hi = int(np.searchsorted(seqs, seq, side="right"))
                return int(seg.rows["count"][lo:hi].sum()) if hi > lo else None
        return None

    def learn(self, changed: Sequence[tuple[str, int]], ts: int | None = None) -> None:
        """The writer journals mappings; nothing to do here."""

    def close(self) -> list[int]:
        self._closed = True
        return []

    def deletable(self) -> list[Segment]:
        return []

    def expired(self) -> list[Segment]:
        return []

    def delete_segment(self, seg: Segment, reason: str) -> None:
        """Only the writer deletes."""

    def writer_fds(self) -> list[int]:
        return []

    # --- following the files ----------------------------------------------------------

    def refresh(self, upto: int | None = None) -> None:
        """Forget segments the writer deleted; read index rows up to ``upto`` (default:
        ``last_seq``) if not loaded yet."""
        self._drop_deleted()
        want = self.last_seq if upto is None else min(upto, self.last_seq)
        if want > self._loaded:
            self._load_new(want)

    def _drop_deleted(self) -> None:
        segments = self.segments
        while segments and not self._exists(segments[0]):
            seg = segments.pop(0)
            self._index_paths.pop(seg.id, None)
            seg.deleted = True
            self._counters.deleted["retention"] = self._counters.deleted.get("retention", 0) + 1

    def _exists(self, seg: Segment) -> bool:
        """Is the segment's index file still there (the writer deletes whole segments,
        oldest first)."""
        path = self._index_paths.get(seg.id)
        if path is None:
            path = self._index_paths[seg.id] = os.path.join(seg._dir, INDEX_NAME)
        try:
            os.stat(path)
        except FileNotFoundError:
            return False
        return True

    def _load_new(self, want: int | None = None) -> None:
        """The newest segment's new rows, then (unless those reach ``want``) any newer
        segment, in order."""
        if self.segments:
            self._load_rows(self.segments[-1])
            if want is not None and self._loaded >= want:
                return
        newest = self.segments[-1].id if self.segments else -1
        try:
            names = os.listdir(self._dir)
        except FileNotFoundError:
            return
        ids = sorted(int(n) for n in names if n.isdigit() and int(n) > newest)
        for pos, seg_id in enumerate(ids):
            seg = self._open_segment(seg_id)
            if seg is None:
                if pos == len(ids) - 1:
                    break  # being created: its header is not there yet
                continue  # being deleted (or unreadable): the next one says where we are
            if self.segments:
                prev = self.segments[-1]
                self._load_rows(prev)  # sealed now: its last rows are on file
                if prev.last_seq + 1 != seg_id:
                    log.warning(
                        "journal %s follower: segment %d does not follow seq %d",
                        *(self.dataset, seg_id, prev.last_seq),
                    )
                    self.segments = []
            self.segments.append(seg)
            self._load_rows(seg)
        if self.segments and self.segments[-1].n:
            self._loaded = max(self._loaded, self.segments[-1].last_seq)

    def _open_segment(self, seg_id: int) -> Segment | None:
        directory = self._dir / f"{seg_id:010d}"
        try:
            fd = os.open(directory / INDEX_NAME, _RO)
        except FileNotFoundError:
            return None
        try:
            head = os.pread(fd, INDEX_HEADER_LEN, 0)
        finally:
            os.close(fd)
        header = parse_index_header(head)
        if header is None or header[0] != FORMAT_VERSION or header[1] != seg_id:
            return None
        return Segment(directory, seg_id)

    def _load_rows(self, seg: Segment) -> None:
        """Append the segment's whole new chunks (crc-good rows) to its rows."""
        got = _pread_from(seg._dir / INDEX_NAME, seg.index_size)
        if got is None or len(got[0]) < ROW_LEN:
            return
        raw = got[0]
        n = len(raw) // ROW_LEN
        rows = np.frombuffer(raw, dtype=ROW_DTYPE, count=n)
        keep = _whole_chunks(rows, seg.last_seq + 1)
        if not keep:
            return
        rows = rows[:keep]
        seg.add_rows(raw[: keep * ROW_LEN])
        seg.index_size += keep * ROW_LEN
        seg.last_seq = int(rows["seq"][-1])
        lo = int(rows["min_ts"].min())
        hi = int(rows["max_ts"].max())
        seg.min_ts = lo if seg.min_ts is None else min(seg.min_ts, lo)
        seg.max_ts = hi if seg.max_ts is None else max(seg.max_ts, hi)
        maxes = rows["max_ts"]
        defined = maxes[maxes != UNDEF_TIMESTAMP]
        if len(defined):
            newest = int(defined.max())
            if seg.newest_ts is None or newest > seg.newest_ts:
                seg.newest_ts = newest
            if self._newest_ts is None or newest > self._newest_ts:
                self._newest_ts = newest
        ends = rows["offset"] + rows["length"].astype(np.uint64)
        for rtype in np.unique(rows["rtype"]).tolist():
            end = int(ends[rows["rtype"] == rtype].max())
            seg.rt_sizes[int(rtype)] = max(seg.rt_sizes.get(int(rtype), 0), end)
        mixed = rows["order_off"] >= 0
        if mixed.any():
            seqs = rows["seq"]
            for seq in np.unique(seqs[mixed]).tolist():
                part = rows[seqs == seq]
                end = int(part["order_off"][0]) + int(part["count"].sum())
                seg.order_size = max(seg.order_size, end)
        if seg.last_seq > self._loaded:
            self._loaded = seg.last_seq

    # --- reading (the writer's API, on what this process has published) ---------------

    def first_seq(self) -> int:
        self._drop_deleted()
        return super().first_seq()

    def oldest_ts(self) -> int | None:
        self._drop_deleted()
        return super().oldest_ts()

    def row_slices(
        self, after_seq: int, upto_seq: int
    ) -> Iterator[tuple[Segment, npt.NDArray[np.void]]]:
        upto = min(upto_seq, self.last_seq)
        self.refresh(upto)
        return super().row_slices(after_seq, upto)

    def entries(
        self, rtypes: Collection[int], after_seq: int, upto_seq: int, max_rows: int = 4096
    ) -> list[Entry]:
        # reads through ``row_slices`` (refreshed, capped at last_seq)
        return super().entries(rtypes, after_seq, upto_seq, max_rows)

    def skip_before_ts(self, rtypes: Collection[int], ts: int) -> int:
        self.refresh()
        return min(super().skip_before_ts(rtypes, ts), self.last_seq)

    def end_seq(self) -> int:
        """The newest seq on file (ahead of ``last_seq`` while this process's feed has
        not published it yet): a resume from a sibling worker's checkpoint is valid up
        to it, and its replay hands over once the feed is there."""
        self._load_new(self.last_seq + 1)
        return max(self.last_seq, self._loaded)

    def mappings_as_of(self, seq: int) -> dict[str, int]:
        # not capped at last_seq + 1: a resume ahead of this process's feed (``end_seq``)
        # starts from the mappings as of its own position
        self.refresh()
        self._symbols.refresh()
        return super().mappings_as_of(seq)

    def mapping_changes(self, after_seq: int, upto_seq: int) -> list[tuple[int, str, int]]:
        # the planner reads ``segments`` right after this (its fast path): rows first
        self.refresh(upto_seq)
        self._symbols.refresh()
        return super().mapping_changes(after_seq, upto_seq)

    def stats(self) -> JournalStats:
        """What is loaded (no rows read for it: the supervisor reports the journal; a
        worker that serves no replay keeps only what it read at open)."""
        self._drop_deleted()
        return super().stats()


def _whole_chunks(rows: npt.NDArray[np.void], first_seq: int) -> int:
    """How many leading rows are whole chunks: crc-good rows, seqs ``first_seq``, +1, …,
    each chunk all its ``nparts`` rows (a chunk cut short at the end is being written).

    Only the last ``_CRC_TAIL`` rows' crcs are checked: the writer writes a chunk's rows
    (at most 255) in one append, so only the bytes of the write in progress can be torn,
    at the end of what is read; rows before it were whole when it began (a worker
    restarted on a large journal does not crc every row in Python)."""
    tail = max(0, len(rows) - _CRC_TAIL)
    good = row_crcs(rows[tail:])
    limit = tail + int(np.argmin(good)) if not good.all() else len(rows)
    if limit == 0:
        return 0
    seqs = rows["seq"][:limit].astype(np.int64)
    starts = np.flatnonzero(np.concatenate(([True], seqs[1:] != seqs[:-1])))
    sizes = np.diff(np.append(starts, limit))
    expect = first_seq + np.arange(len(starts))
    okay = (seqs[starts] == expect) & (rows["nparts"][:limit][starts] == sizes)
    if okay.all():
        return limit
    return int(starts[int(np.argmin(okay))])


class FollowerStore(JournalStore):
    """A journal directory another process writes and locks, opened read-only."""

    def __init__(self, path: Path, settings: _Settings) -> None:
        super().__init__(path, -1, settings, "never", 1.0)

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        retention_s: float = 86400.0,
        max_bytes: int = 8 << 30,
        fsync: str = "never",
        fsync_interval_s: float = 1.0,
        segment_bytes: int = 256 << 20,
        segment_span_s: float = 3600.0,
    ) -> FollowerStore:
        """Follow the journal at ``path`` (no lock, nothing created): every dataset in it
        now; ``dataset(name)`` follows one that appears later. ``fsync`` is the writer's
        business and ignored here; the rest only shows in ``stats``."""
        root = Path(path)
        if not root.is_dir():
            raise ConfigError(f"journal dir {root}: not found (its writer creates it)")
        settings = _Settings(
            retention_s=retention_s,
            max_bytes=max_bytes,
            segment_bytes=segment_bytes,
            segment_span_s=segment_span_s,
        )
        store = cls(root, settings)
        for child in sorted(root.iterdir()):
            if child.is_dir() and not child.name.startswith("."):
                store._datasets[child.name] = FollowerJournal.open(child, child.name, settings)
        return store

    def dataset(self, name: str) -> FollowerJournal:
        journal = self._datasets.get(name)
        if journal is None:
            if not name or name.startswith(".") or "/" in name or "\0" in name:
                raise ConfigError(f"journal: bad dataset name {name!r}")
            journal = FollowerJournal.open(self.path / name, name, self._settings)
            self._datasets[name] = journal
        assert isinstance(journal, FollowerJournal)
        return journal

    def maintain(self) -> None:
        """Forget segments the writer deleted (the tick's upkeep)."""
        if self._closed:
            return
        for journal in self._datasets.values():
            assert isinstance(journal, FollowerJournal)
            journal._drop_deleted()

    def close(self) -> None:
        """Nothing to unlock or fsync. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for journal in self._datasets.values():
            journal.close()


def open_follower(jc: JournalConfig) -> FollowerStore | None:
    """Follow the journal ``[journal] dir`` read-only (a worker process: the supervisor
    writes it); None when no ``dir`` is configured. A directory that is not there is a
    ConfigError naming it."""
    if jc.dir is None:
        return None
    try:
        store = FollowerStore.open(
            jc.dir,
            retention_s=jc.retention_s,
            max_bytes=jc.max_bytes,
            segment_bytes=jc.segment_bytes,
            segment_span_s=jc.segment_span_s,
        )
    except OSError as exc:
        raise ConfigError(f"journal.dir {jc.dir}: cannot read the journal: {exc}") from exc
    log.debug(
        "journal follower dir=%s datasets=%s",
        jc.dir,
        ",".join(f"{ds}:{j.first_seq()}-{j.last_seq}" for ds, j in store.datasets().items())
        or "none",
    )
    return store


def attach_follower(store: FollowerStore, feed: Feed, *, start_seq: int | None = None) -> None:
    """Give ``feed`` its dataset's follower, its directory seeded with every mapping on
    file as of the next chunk (the writer's Feed learnt them before this process started;
    seeded mappings are not learnt again). ``start_seq``: the journal seq of the last chunk
    before the first one this process will see live (the supervisor knows it when it makes
    the worker's ring slot live: ``FeedStart.journal_seq``); without it the newest seq on
    file now is taken, exact unless a chunk is journaled between this call and the ring's
    start position (a replay handed over to live in that window could miss or repeat it)."""
    journal = store.dataset(feed.dataset)
    if start_seq is not None and start_seq >= 0:
        journal.start_at(start_seq)
    known = journal.mappings_as_of(journal.last_seq + 1)
    if known:
        feed.directory.learn_many(list(known.items()))
    feed.journal = journal
