"""The journal of one dataset: the write-ahead ``append`` on the feed's hot path, the
symbology log (``symlog``), recovery at open, and the in-process read API replays use.

Hot path: one ``os.write`` per file per chunk, no per-record Python objects. A chunk of
one rtype is written straight from ``index.data``; a mixed chunk is split per rtype with
one numpy gather each, its rtype-per-record bytes go to order.bin. Index rows are packed
with ``struct`` and also kept in the segment's numpy array, so reads never touch
index.bin after recovery. Any OSError while writing disables the journal (one ERROR line)
and never reaches the feed.

Why one module: the writer, recovery and the read API share one dataset's segment list
and counters; the on-disk parts live elsewhere (``format``, ``segment``, ``symlog``).
"""

from __future__ import annotations

import bisect
import logging
import os
import secrets
import time
import zlib
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt

from gateway.dbn import UNDEF_TIMESTAMP, ChunkIndex
from gateway.journal.format import filter_ts, pack_row
from gateway.journal.segment import Entry, Segment, recover_segment
from gateway.journal.symlog import SYMBOLOGY_NAME, SymbolLog, write_all

__all__ = ["WRITE_BUCKETS", "DatasetJournal", "JournalStats"]

log = logging.getLogger("gateway.journal")

WRITE_BUCKETS: Final = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 1e-2, 0.1)
_NO_ORDER: Final = -1
_MIN: Final = np.minimum.reduce  # the ufuncs, without ndarray.min's Python wrapper
_MAX: Final = np.maximum.reduce


@dataclass
class JournalStats:
    """Plain data for gateway/ops."""

    enabled: bool
    error: str | None
    bytes: int
    segments: int
    first_seq: int
    last_seq: int
    oldest_ts: int | None
    newest_ts: int | None
    retention_s: float
    max_bytes: int
    appended_chunks: int
    appended_bytes: int
    write_errors: int
    segments_deleted: dict[str, int]
    write_seconds_sum: float
    write_seconds_count: int
    write_seconds_buckets: list[int]
    fsyncs: int = 0


@dataclass
class _Settings:
    retention_s: float = 86400.0
    max_bytes: int = 8 << 30
    segment_bytes: int = 256 << 20
    segment_span_s: float = 3600.0
    #: called with a sealed segment's writer fds (the store fsyncs and closes them)
    on_seal: Callable[[str, Segment, list[int]], None] | None = None


@dataclass
class _Counters:
    appended_chunks: int = 0
    appended_bytes: int = 0
    write_errors: int = 0
    deleted: dict[str, int] = field(default_factory=lambda: {"retention": 0, "max_bytes": 0})
    write_sum: float = 0.0
    write_count: int = 0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(WRITE_BUCKETS) + 1))
    fsyncs: int = 0


class DatasetJournal:
    """Segments of one dataset, oldest first; the newest is the one written."""

    def __init__(self, directory: Path, dataset: str, settings: _Settings) -> None:
        self.dataset = dataset
        self._dir = directory
        self._settings = settings
        self.segments: list[Segment] = []
        self.last_seq = 0
        self.enabled = True
        self.error: str | None = None
        self._newest_ts: int | None = None
        self._counters = _Counters()
        self._writer: Segment | None = None
        self._closed = False
        self._symbols = SymbolLog(directory)
        #: which journal this is (checkpoints carry it): new whenever the directory holds
        #: no chunk at open, when seqs start from 1 again (``load_epoch``)
        self.epoch = ""

    # --- open / recover ---------------------------------------------------------------

    @classmethod
    def open(cls, directory: Path, dataset: str, settings: _Settings) -> DatasetJournal:
        journal = cls(directory, dataset, settings)
        directory.mkdir(parents=True, exist_ok=True)
        journal._recover()
        journal.epoch = load_epoch(directory, fresh=journal.last_seq == 0)
        return journal

    def _recover(self) -> None:
        ids = sorted(int(p.name) for p in self._dir.iterdir() if p.is_dir() and p.name.isdigit())
        cut: dict[str, int] = {}
        problems: list[str] = []
        segments: list[Segment] = []
        for pos, seg_id in enumerate(ids):
            seg_dir = self._dir / f"{seg_id:010d}"
            got = recover_segment(seg_dir, seg_id, self.dataset)
            for name, nbytes in got.cut.items():
                key = f"{seg_id:010d}/{name}"
                cut[key] = cut.get(key, 0) + nbytes
            if got.problem:
                problems.append(f"segment {seg_id}: {got.problem}")
            last = pos == len(ids) - 1
            if got.segment is None:
                if last:
                    # a newest segment torn at its creation: it is started again
                    _remove_tree(seg_dir, cut, f"{seg_id:010d}")
                    continue
                # an unreadable older segment: it and everything older go (seqs stay
                # contiguous from first_seq)
                for older in segments:
                    _remove_tree(older._dir, cut, f"{older.id:010d}")
                segments = []
                _remove_tree(seg_dir, cut, f"{seg_id:010d}")
                continue
            seg = got.segment
            if segments and seg.id != segments[-1].last_seq + 1:
                problems.append(f"segment {seg.id} does not follow seq {segments[-1].last_seq}")
                for older in segments:
                    _remove_tree(older._dir, cut, f"{older.id:010d}")
                segments = []
            if got.cut and not last:
                # a sealed segment was damaged: later segments would leave a seq gap
                for older in segments:
                    _remove_tree(older._dir, cut, f"{older.id:010d}")
                segments = []
                _remove_tree(seg._dir, cut, f"{seg.id:010d}")
                continue
            segments.append(seg)
        self.segments = segments
        newest = segments[-1].last_seq if segments else 0
        self.last_seq = max(newest, ids[-1] - 1 if ids else 0)
        for seg in segments:
            if seg.newest_ts is not None:
                self._newest_ts = max(self._newest_ts or 0, seg.newest_ts)
        sym_cut = self._symbols.recover(self.last_seq)
        if sym_cut:
            cut[SYMBOLOGY_NAME] = sym_cut
        if self._symbols.compact(self.first_seq() or self.last_seq + 1):
            log.info("journal %s: symbology log compacted", self.dataset)
        if cut:
            total = sum(cut.values())
            detail = ", ".join(f"{name} {n}" for name, n in sorted(cut.items()))
            log.warning(
                "journal %s recovered: cut %d bytes of torn tail (%s)%s; last seq %d",
                self.dataset,
                total,
                detail,
                f" [{'; '.join(problems)}]" if problems else "",
                self.last_seq,
            )

    # --- writing ----------------------------------------------------------------------

    def append(self, index: ChunkIndex) -> int:
        """Journal one published chunk; its seq, or 0 when disabled. Never raises."""
        if not self.enabled or self._closed or index.count == 0:
            return 0
        started = time.perf_counter()
        seq = self.last_seq + 1
        undo: list[tuple[int, int]] = []  # (fd, size before) to truncate back on error
        try:
            ts = filter_ts(index)
            rtset = index.rtype_set
            if len(rtset) == 1:
                (rtype,) = rtset
                parts: list[_Part] = [
                    (rtype, index.data, index.count, int(_MIN(ts)), int(_MAX(ts)))
                ]
            else:
                parts = _split(index, ts, rtset)
            chunk_min = min(p[3] for p in parts)
            chunk_max = max(p[4] for p in parts)
            seg = self._writer
            if seg is None:
                seg = self._resume(seq)
            if self._must_roll(seg, chunk_min, chunk_max):
                seg = self._roll(seq)
            order_off = _NO_ORDER
            if len(parts) > 1:
                order_fd = seg.get_order_fd()
                order_off = seg.order_size
                undo.append((order_fd, order_off))
                write_all(order_fd, index.rtypes.tobytes())
                seg.order_size = order_off + index.count
            rows = []
            for rtype, data, count, lo, hi in parts:
                fd = seg.rt_fd(rtype)
                offset = seg.rt_sizes[rtype]
                undo.append((fd, offset))
                write_all(fd, data)
                seg.rt_sizes[rtype] = offset + len(data)
                rows.append(
                    pack_row(
                        seq,
                        rtype,
                        len(parts),
                        count,
                        offset,
                        len(data),
                        zlib.crc32(data),
                        lo,
                        hi,
                        order_off,
                    )  # fmt: skip
                )
            row_bytes = rows[0] if len(rows) == 1 else b"".join(rows)
            undo.append((seg.index_fd, seg.index_size))
            write_all(seg.index_fd, row_bytes)
        except Exception as exc:  # OSError, or a bug: never into the feed
            self._disable(exc, undo)
            return 0
        seg.index_size += len(row_bytes)
        seg.add_rows(row_bytes)
        seg.last_seq = seq
        seg.min_ts = chunk_min if seg.min_ts is None else min(seg.min_ts, chunk_min)
        seg.max_ts = chunk_max if seg.max_ts is None else max(seg.max_ts, chunk_max)
        newest = chunk_max if chunk_max != UNDEF_TIMESTAMP else _defined_max(ts)
        if newest is not None:
            if seg.newest_ts is None or newest > seg.newest_ts:
                seg.newest_ts = newest
            if self._newest_ts is None or newest > self._newest_ts:
                self._newest_ts = newest
        self.last_seq = seq
        c = self._counters
        c.appended_chunks += 1
        c.appended_bytes += index.nbytes
        elapsed = time.perf_counter() - started
        c.write_sum += elapsed
        c.write_count += 1
        c.buckets[bisect.bisect_left(WRITE_BUCKETS, elapsed)] += 1
        return seq

    def _must_roll(self, seg: Segment, chunk_min: int, chunk_max: int) -> bool:
        if seg.n == 0:
            return False
        s = self._settings
        if seg.nbytes >= s.segment_bytes:
            return True
        lo = min(chunk_min, seg.min_ts if seg.min_ts is not None else chunk_min)
        hi = max(chunk_max, seg.max_ts if seg.max_ts is not None else chunk_max)
        return hi - lo > s.segment_span_s * 1e9

    def _resume(self, seq: int) -> Segment:
        """The segment to write after open: the newest recovered one, else a new one."""
        if self.segments:
            newest = self.segments[-1]
            if newest.last_seq == seq - 1:
                newest.open_writer(create=False, dataset=self.dataset)
                self._writer = newest
                return newest
        return self._roll(seq)

    def _roll(self, seq: int) -> Segment:
        """Seal the writer (if any) and start segment ``seq``."""
        if self._writer is not None:
            self._seal(self._writer)
        seg = Segment(self._dir / f"{seq:010d}", seq)
        seg.open_writer(create=True, dataset=self.dataset)
        self._writer = seg
        self.segments.append(seg)
        return seg

    def _seal(self, seg: Segment) -> None:
        seg.sealed = True
        fds = seg.detach_writer()
        if self._writer is seg:
            self._writer = None
        on_seal = self._settings.on_seal
        seg.last_write = time.time()
        if on_seal is not None:
            on_seal(self.dataset, seg, fds)
        else:
            for fd in fds:
                os.close(fd)

    def learn(self, changed: Sequence[tuple[str, int]], ts: int | None = None) -> None:
        """Journal mapping changes the feed's directory learnt; effective before the next
        chunk (at_seq = last_seq + 1). Never raises."""
        if not self.enabled or self._closed or not changed:
            return
        stamp = ts if ts is not None else (self._newest_ts or 0)
        symbols = self._symbols
        before = symbols.size
        try:
            symbols.append(self.last_seq + 1, stamp, changed)
        except Exception as exc:  # OSError, or a bug: never into the feed
            self._disable(exc, [(symbols.fd, before)] if symbols.fd >= 0 else [])

    def _disable(self, exc: BaseException, undo: list[tuple[int, int]]) -> None:
        self._counters.write_errors += 1
        self.enabled = False
        self.error = str(exc) or type(exc).__name__
        log.error("journal %s disabled: %s", self.dataset, self.error)
        for fd, size in reversed(undo):
            try:
                os.ftruncate(fd, size)
            except OSError:
                pass  # recovery at the next open cuts it back

    def written(self) -> tuple[int, int]:
        """What has been written so far (chunks, symbology bytes): a change marker."""
        return self._counters.appended_chunks, self._symbols.size

    def writer_fds(self) -> list[int]:
        """The fds being written now (the interval fsync dups them)."""
        fds = self._writer.writer_fds() if self._writer is not None else []
        if self._symbols.fd >= 0:
            fds.append(self._symbols.fd)
        return fds

    def close(self) -> list[int]:
        """Stop writing; the writer's fds, for the caller to fsync and close."""
        self._closed = True
        fds: list[int] = []
        if self._writer is not None:
            fds = self._writer.detach_writer()
            self._writer = None
        if self._symbols.fd >= 0:
            fds.append(self._symbols.fd)
            self._symbols.fd = -1
        return fds

    # --- retention --------------------------------------------------------------------

    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.segments) + self._symbols.size

    def deletable(self) -> list[Segment]:
        """Segments retention may delete: all but the newest (and never the writer)."""
        return [s for s in self.segments[:-1] if s is not self._writer]

    def delete_segment(self, seg: Segment, reason: str) -> None:
        if seg not in self.segments or seg is self.segments[-1] or seg is self._writer:
            return
        self.segments.remove(seg)
        self._counters.deleted[reason] = self._counters.deleted.get(reason, 0) + 1
        try:
            seg.remove()
        except OSError as exc:
            log.warning("journal %s: deleting segment %d failed: %s", self.dataset, seg.id, exc)

    def expired(self) -> list[Segment]:
        """Oldest segments whose every record is older than retention_s before the
        newest journaled record (in order, stopping at the first one still needed)."""
        if self._newest_ts is None:
            return []
        cutoff = self._newest_ts - int(self._settings.retention_s * 1e9)
        out: list[Segment] = []
        for seg in self.deletable():
            if seg.newest_ts is None or seg.newest_ts >= cutoff:
                break  # still needed (or of unknown age: max_bytes bounds it)
            out.append(seg)
        return out

    # --- reading ----------------------------------------------------------------------

    def end_seq(self) -> int:
        """The newest seq journaled: a resume may name any position up to it. (A worker's
        follower: on file, which can be ahead of ``last_seq``, what its feed published.)"""
        return self.last_seq

    @property
    def directory(self) -> Path:
        """Where this dataset's journal lives (a relay keeps its position beside it)."""
        return self._dir

    def records_after(self, seq: int) -> int:
        """How many records the chunks after ``seq`` hold (those still retained)."""
        total = 0
        for _, rows in self.row_slices(seq, self.last_seq):
            total += int(rows["count"].sum())
        return total

    def records_of(self, rtype: int, record_len: int, piece: int = 1 << 20) -> Iterator[bytes]:
        """Every retained record of one fixed-length ``rtype``, in feed order, as whole
        records of at most ``piece`` bytes (each segment keeps an rtype's records in one
        file, appended chunk by chunk). Rebuilds state after a restart (the order books)."""
        step = max(record_len, piece // record_len * record_len)
        for seg in list(self.segments):
            size = seg.rt_sizes.get(rtype, 0)
            if not size or seg.deleted:
                continue
            try:
                fd = os.open(seg.rt_path(rtype), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue  # deleted by retention meanwhile
            try:
                done = 0
                while done < size:
                    data = os.pread(fd, min(step, size - done), done)
                    if not data:
                        break
                    whole = len(data) // record_len * record_len
                    if whole:
                        yield data[:whole]
                    done += whole
                    if whole < len(data) or not whole:
                        break  # a short read in the middle of a record: stop there
            finally:
                os.close(fd)

    def first_seq(self) -> int:
        for seg in self.segments:
            if seg.n:
                return int(seg.rows["seq"][0])
        return 0

    def oldest_ts(self) -> int | None:
        lows = [s.min_ts for s in self.segments if s.min_ts is not None]
        return min(lows) if lows else None

    def newest_ts(self) -> int | None:
        return self._newest_ts

    def row_slices(
        self, after_seq: int, upto_seq: int
    ) -> Iterator[tuple[Segment, npt.NDArray[np.void]]]:
        """Per retained segment, in order, its index rows with after_seq < seq <= upto_seq
        (numpy views, never copies; segments without such rows are left out)."""
        for seg in list(self.segments):
            if seg.n == 0 or seg.last_seq <= after_seq:
                continue
            if seg.first_seq > upto_seq:
                return
            rows = seg.rows
            seqs = rows["seq"]
            lo = int(np.searchsorted(seqs, after_seq, side="right"))
            hi = int(np.searchsorted(seqs, upto_seq, side="right"))
            yield seg, rows[lo:hi]

    def entries(
        self, rtypes: Collection[int], after_seq: int, upto_seq: int, max_rows: int = 4096
    ) -> list[Entry]:
        """Rows of ``rtypes`` with after_seq < seq <= upto_seq, in seq order (at most
        ``max_rows``; call again after the last one's seq for more)."""
        wanted = np.fromiter(rtypes, dtype=np.uint8)
        out: list[Entry] = []
        for seg, part in self.row_slices(after_seq, upto_seq):
            if len(out) >= max_rows:
                break
            picked = part[np.isin(part["rtype"], wanted)][: max_rows - len(out)]
            for r in picked.tolist():
                # seq rtype nparts pad count offset length crc min max order_off pad row_crc
                out.append(Entry(r[0], r[1], r[2], seg, r[5], r[6], r[4], r[8], r[9], r[10]))
        return out

    def skip_before_ts(self, rtypes: Collection[int], ts: int) -> int:
        """The largest seq S such that no retained record of ``rtypes`` with seq <= S has
        filter ts >= ``ts``: a replay from ``ts`` starts after S."""
        wanted = np.fromiter(rtypes, dtype=np.uint8)
        for seg in list(self.segments):
            if seg.n == 0 or seg.max_ts is None or seg.max_ts < ts:
                continue
            rows = seg.rows
            hit = np.flatnonzero((rows["max_ts"] >= ts) & np.isin(rows["rtype"], wanted))
            if len(hit):
                return int(rows["seq"][hit[0]]) - 1
        return self.last_seq

    def mappings_as_of(self, seq: int) -> dict[str, int]:
        """symbol -> instrument_id after every change with at_seq <= seq."""
        return self._symbols.as_of(seq)

    def mapping_changes(self, after_seq: int, upto_seq: int) -> list[tuple[int, str, int]]:
        """(at_seq, symbol, iid) with after_seq < at_seq <= upto_seq, in order."""
        return self._symbols.changes(after_seq, upto_seq)

    def order_bytes(self, entry: Entry) -> bytes:
        """The rtype of every record of the entry's chunk, in chunk order (mixed chunks;
        a single-rtype chunk gives ``count`` bytes of its rtype)."""
        seg = entry.segment
        if entry.order_off < 0:
            return bytes([entry.rtype]) * entry.count
        rows = seg.rows
        seqs = rows["seq"]
        lo = int(np.searchsorted(seqs, entry.seq, side="left"))
        hi = int(np.searchsorted(seqs, entry.seq, side="right"))
        total = int(rows["count"][lo:hi].sum())
        fd = seg.open_order_fd()
        try:
            return os.pread(fd, total, entry.order_off)
        finally:
            os.close(fd)

    def stats(self) -> JournalStats:
        c = self._counters
        cumulative: list[int] = []
        running = 0
        for n in c.buckets[: len(WRITE_BUCKETS)]:
            running += n
            cumulative.append(running)
        return JournalStats(
            enabled=self.enabled,
            error=self.error,
            bytes=self.nbytes(),
            segments=len(self.segments),
            first_seq=self.first_seq(),
            last_seq=self.last_seq,
            oldest_ts=self.oldest_ts(),
            newest_ts=self._newest_ts,
            retention_s=self._settings.retention_s,
            max_bytes=self._settings.max_bytes,
            appended_chunks=c.appended_chunks,
            appended_bytes=c.appended_bytes,
            write_errors=c.write_errors,
            segments_deleted=dict(c.deleted),
            write_seconds_sum=c.write_sum,
            write_seconds_count=c.write_count,
            write_seconds_buckets=cumulative,
            fsyncs=c.fsyncs,
        )


#: rtype, data, record count, min and max filter ts of one part of a chunk
_Part = tuple[int, bytes | memoryview, int, int, int]


EPOCH_NAME: Final = "epoch"


def read_epoch(directory: Path) -> str:
    """The journal's epoch as written in ``directory/epoch`` ("" when there is none)."""
    try:
        text = (directory / EPOCH_NAME).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return ""
    return text if len(text) == 16 and all(c in "0123456789abcdef" for c in text) else ""


def load_epoch(directory: Path, *, fresh: bool) -> str:
    """The writer's epoch: the one on file, or a new random one (written by rename) when
    ``fresh`` (no chunk held: seqs start again) or when there is none yet (a journal from
    before epochs)."""
    path = directory / EPOCH_NAME
    if not fresh:
        text = read_epoch(directory)
        if text:
            return text
    epoch = secrets.token_hex(8)
    tmp = directory / f"{EPOCH_NAME}.tmp"
    try:
        tmp.write_text(epoch + "\n", encoding="ascii")
        os.replace(tmp, path)
    except OSError as exc:
        log.warning(
            "journal %s: cannot write its epoch (%s): checkpoints name none", directory, exc
        )
        return ""
    return epoch


def _split(index: ChunkIndex, ts: npt.NDArray[np.uint64], rtset: frozenset[int]) -> list[_Part]:
    """A mixed chunk's records per rtype (ascending), one gather each: of rows when every
    record has one length, else of 4-byte words (a record is a whole number of words)
    picked by a per-word rtype mask."""
    rtypes = index.rtypes
    words = word_rtypes = None
    if index.rows is None:
        words = np.frombuffer(index.data, dtype=np.uint32)
        word_rtypes = np.repeat(rtypes, index.lengths >> 2)
    parts: list[_Part] = []
    for rtype in sorted(rtset):
        mask = rtypes == rtype
        if words is not None and word_rtypes is not None:
            data: bytes | memoryview = words[word_rtypes == rtype].data.cast("B")
        else:
            data = index.select(mask)
        part_ts = ts[mask]
        parts.append((rtype, data, len(part_ts), int(_MIN(part_ts)), int(_MAX(part_ts))))
    return parts


def _defined_max(ts: npt.NDArray[np.uint64]) -> int | None:
    """The largest filter ts that is not UNDEF_TIMESTAMP (None: there is none)."""
    defined = ts[ts != UNDEF_TIMESTAMP]
    return int(defined.max()) if len(defined) else None


def _remove_tree(path: Path, cut: dict[str, int], label: str) -> None:
    total = 0
    if path.is_dir():
        for child in path.iterdir():
            try:
                total += child.stat().st_size
                child.unlink()
            except OSError:
                pass
        try:
            path.rmdir()
        except OSError:
            pass
    cut[label] = cut.get(label, 0) + total
