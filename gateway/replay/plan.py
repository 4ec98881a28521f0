"""The replay of one session, planned from the journal: ``Replay`` (sans-I/O but for
``pread`` of journal files).

Given a dataset's journal, the session's replayed subscriptions (each from a ``start``
time or after a journal position), and how the session wants its bytes (ts_out, zstd),
``Replay`` produces, in journal order, what its pump writes:

* as of the start, per subscription, the records live would answer it with after its ack
  (``symbols.ReplaySymbols.opening``);
* per journaled chunk, the mapping changes recorded before it (``SymbolMappingMsg``s;
  the selections they move are updated), then the chunk's records the session selects:
  a *file range* (``FileRange``, sent with ``os.sendfile``) when the session wants every
  record of the part (an ALL_SYMBOLS subscription of its rtype whose start the part's
  oldest record already meets, no ts_out, no zstd, and no second replayed rtype in the
  chunk), consecutive ranges of one file coalesced; otherwise a *copy* (``Chunk``): the
  rows read with ``os.pread``, indexed, filtered with numpy (each subscription's start
  against the filter ts, its chunk position, its instruments), chunks holding several
  replayed rtypes put back in the exact live order (``journal.order_bytes``), ts_out
  stamped, one zstd frame per piece.

``step(budget)`` does at most about ``budget`` bytes of it (read or ranged) and returns
the items; memory stays bounded whatever the replay's size. ``target`` is the last seq to
replay; the owner moves it forward (``extend``) while the feed goes on, and hands the
session over to live once ``caught_up`` holds at the feed's last seq (``finish`` gives
the mapping changes recorded after the last chunk).

Why one module: the cursor, the parts fetched, the mapping changes pending, the fast
run and the opening are one state machine that every step reads and moves; the pieces
without state (items, symbols, refusals) live beside it.

The file descriptors of ``FileRange`` items are the planner's: a ``Retire`` item says
which ones are no longer needed once what precedes it is written (``release``), and
``close`` closes every one left.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from itertools import chain, islice
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from gateway.dbn import ChunkIndex, index_records, stamp_records, stamp_ts_out
from gateway.interest import stype_of
from gateway.journal.format import filter_ts
from gateway.replay.items import Chunk, FastRun, FileRange, Item, Out, Retire
from gateway.replay.refusals import (
    Refusal,
    ReplayError,
    ReplayRequest,
    check,
    iso_ns,
    wants_replay,
)
from gateway.replay.symbols import ReplaySub, ReplaySymbols

if TYPE_CHECKING:
    from gateway.journal import DatasetJournal, Entry, Segment

__all__ = [
    "Chunk",
    "FileRange",
    "Item",
    "Refusal",
    "Replay",
    "ReplayError",
    "ReplayRequest",
    "Retire",
    "check",
    "iso_ns",
    "wants_replay",
]

#: rows fetched from the journal's index at a time
FETCH_ROWS = 4096
#: index rows looked at by one pass of the sendfile fast path (bounds a step's work)
#: opening records (acks, mappings, resolution errors) written per step (~10 ms of encoding)
OPENING_SLICE = 2048
_FAST_ROWS = 1 << 16
#: what skipping a part (nothing selected, known from its index row) counts against a step
_SKIP_COST = 256


class Replay:
    """The replay of one session (see the module docstring)."""

    def __init__(
        self,
        journal: DatasetJournal,
        subs: Sequence[ReplayRequest],
        *,
        schema_rtype: Mapping[str, int],
        ts_out: bool = False,
        compress: Callable[[bytes], bytes] | None = None,
        clock_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self.journal = journal
        self.ts_out = ts_out
        self.compress = compress
        self._clock_ns = clock_ns
        last = journal.last_seq
        first = journal.first_seq()
        self.subs: list[ReplaySub] = []
        for sub in subs:
            rtype = schema_rtype.get(sub.schema, -1)
            start: int | None = None
            if sub.start_ns is not None and sub.start_ns != 0:
                start = sub.start_ns
                begin = journal.skip_before_ts((rtype,), start) if rtype >= 0 else last
            elif sub.start_ns is not None:
                begin = max(0, first - 1)
            elif sub.resume_after is not None:
                begin = sub.resume_after
            else:
                begin = last  # from now: joins at the hand-over, nothing lost
            self.subs.append(
                ReplaySub(
                    sub.schema,
                    rtype,
                    stype_of(sub),
                    sub.symbols,
                    sub.all_symbols,
                    begin,
                    start,
                )
            )
        #: every chunk with seq <= cursor is done
        self.cursor = min((s.begin for s in self.subs), default=last)
        #: a checkpoint may name a position only from here on: every subscription has begun,
        #: and no later chunk holds a record its start filters out (a resume after a
        #: checkpoint replays whole chunks, as live sends them)
        self.checkpoint_from = max((s.begin for s in self.subs), default=last)
        self.target = last
        self._by_rtype: dict[int, list[ReplaySub]] = {}
        for rs in self.subs:
            if rs.rtype >= 0:
                self._by_rtype.setdefault(rs.rtype, []).append(rs)
        self._rtypes = tuple(sorted(self._by_rtype))
        self._filtered_until(self.cursor, last)
        self._mapped = self.cursor + 1
        self.symbols = ReplaySymbols(
            journal.mappings_as_of(self._mapped), self.subs, now_ns=clock_ns()
        )
        self._pending: deque[Entry] = deque()
        self._fetched_upto = self.cursor
        self._changes: deque[tuple[int, str, int]] = deque()
        self._fds: dict[tuple[int, int], int] = {}
        self._segment: object = None
        self._retiring: set[int] = set()
        #: the rest of the opening (acks, mappings as of the start), written before data
        self._opening: Iterator[bytes] | None = None
        #: the contiguous run of whole parts the fast path found, consumed step by step
        self._fast: FastRun | None = None
        #: records and bytes planned, by path
        self.records = 0
        self.bytes_ranged = self.bytes_copied = 0

    # --- the owner's side -------------------------------------------------------------------

    @property
    def schemas(self) -> list[str]:
        """The replayed schemas, in subscription order (one REPLAY_COMPLETED each)."""
        return list(dict.fromkeys(s.schema for s in self.subs))

    @property
    def announced(self) -> dict[tuple[int, str], int]:
        return self.symbols.announced

    @property
    def caught_up(self) -> bool:
        return self._opening is None and not self._pending and self.cursor >= self.target

    @property
    def opening_pending(self) -> bool:
        """Part of the opening (``begin``) is still to be written."""
        return self._opening is not None

    def opening(self, index: int) -> list[bytes]:
        """What answers subscription ``index`` as of the start (after its ack)."""
        return self.symbols.opening(self.subs[index])

    def begin(self, acks: Sequence[bytes], slice_size: int = OPENING_SLICE) -> list[bytes]:
        """The session's opening: each subscription's ack (``acks``, in order) then what
        answers it as of the start. The first ``slice_size`` records are returned; the rest
        come first in the next steps, ``slice_size`` a step, before any replayed record."""
        self._opening = chain.from_iterable(
            chain((ack,), self.symbols.opening_iter(sub))
            for ack, sub in zip(acks, self.subs, strict=True)
        )
        return self._opening_slice(slice_size)

    def _opening_slice(self, size: int) -> list[bytes]:
        if self._opening is None:
            return []
        records = list(islice(self._opening, size))
        if len(records) < size:
            self._opening = None
        return records

    def extend(self, last_seq: int) -> None:
        """The journal has grown up to ``last_seq``: replay up to it too."""
        if last_seq > self.target:
            self._filtered_until(self.target, last_seq)
            self.target = last_seq

    def _filtered_until(self, after: int, upto: int) -> None:
        """Move ``checkpoint_from`` past every chunk in (after, upto] holding a record some
        subscription's start filters out (from the index rows' oldest filter ts)."""
        starts = [s for s in self.subs if s.start is not None and s.rtype >= 0]
        if not starts or upto <= after:
            return
        for _, part in self.journal.row_slices(after, upto):
            for s in starts:
                hit = (part["rtype"] == s.rtype) & (part["min_ts"] < np.uint64(s.start or 0))
                hit &= part["seq"] > np.uint64(s.begin)
                found = np.flatnonzero(hit)
                if found.size:
                    seq = int(part["seq"][found[-1]])
                    self.checkpoint_from = max(self.checkpoint_from, seq)

    def finish(self, last_seq: int) -> list[bytes]:
        """At the hand-over (``caught_up`` at ``last_seq``): the mappings recorded after the
        last chunk (effective before the next one, which the session gets live)."""
        self.symbols.now_ns = self._clock_ns()
        records, _ = self.symbols.apply(
            (s, i) for _, s, i in self.journal.mapping_changes(self._mapped, last_seq + 1)
        )
        self._mapped = max(self._mapped, last_seq + 1)
        return records

    def step(self, budget: int) -> list[Item]:
        """At most about ``budget`` bytes of the replay (read or ranged), in order."""
        now = self._clock_ns()
        self.symbols.now_ns = now
        out = Out(self.ts_out, self.compress, now)
        used = 0
        if self._opening is not None:
            # The opening first, a slice a step (a 100,000-symbol session's mappings).
            out.gateway(self._opening_slice(OPENING_SLICE))
            out.flush()
            return out.items
        while used < budget:
            if not self._pending:
                if self.cursor >= self.target:
                    break
                fast = self._whole_rows(out, budget - used)
                if fast:
                    used += fast
                    continue
                self._fetch()
                if not self._pending:
                    self._apply_changes(self._fetched_upto, out)
                    self.cursor = self._fetched_upto
                    continue
            used += self._run(out, max(1, budget - used))
        out.flush()
        return out.items

    def release(self, fds: tuple[int, ...]) -> None:
        """Close retired descriptors (their ranges are written)."""
        for fd in fds:
            if fd in self._retiring:
                self._retiring.discard(fd)
                os.close(fd)

    def close(self) -> None:
        """Close every descriptor still open. Idempotent."""
        fds = [*self._fds.values(), *self._retiring]
        self._fds.clear()
        self._retiring.clear()
        for fd in fds:
            os.close(fd)

    # --- planning -------------------------------------------------------------------------

    def _fetch(self) -> None:
        rows = self.journal.entries(self._rtypes, self.cursor, self.target, FETCH_ROWS)
        upto = self.target
        if len(rows) >= FETCH_ROWS:
            last = rows[-1].seq
            whole = [e for e in rows if e.seq < last]
            if whole:  # the last chunk's parts may go on in the next fetch
                rows, upto = whole, last - 1
            else:
                upto = last
        self._pending.extend(rows)
        self._fetched_upto = upto
        self._changes.extend(self.journal.mapping_changes(self._mapped, upto))

    def _apply_changes(self, seq: int, out: Out) -> None:
        """Mapping changes effective before chunk ``seq`` (at_seq <= seq)."""
        changes = self._changes
        if not changes or changes[0][0] > seq:
            self._mapped = max(self._mapped, seq)
            return
        picked: list[tuple[str, int]] = []
        while changes and changes[0][0] <= seq:
            _, symbol, iid = changes.popleft()
            picked.append((symbol, iid))
        records, _ = self.symbols.apply(picked)
        out.gateway(records)
        self._mapped = max(self._mapped, seq)

    def _run(self, out: Out, budget: int) -> int:
        """Plan the next run of parts: the bytes it counts against the step."""
        pending = self._pending
        first = pending[0]
        self._apply_changes(first.seq, out)
        if len(pending) > 1 and pending[1].seq == first.seq:
            group = [pending.popleft()]
            while pending and pending[0].seq == first.seq:
                group.append(pending.popleft())
            used = self._mixed(group, out)
        else:
            mode = self._mode(first)
            run = [pending.popleft()]
            size = first.length
            if mode:
                size = self._extend(run, mode, size, budget)
            if mode == "range":
                self._range(run, out)
                used = size
            elif mode == "copy":
                self._copy(run, out)
                used = size
            else:
                used = _SKIP_COST
        self.cursor = pending[0].seq - 1 if pending else self._fetched_upto
        if not pending:
            self._apply_changes(self._fetched_upto, out)
        return used

    def _mode(self, entry: Entry) -> str:
        """``range`` (every record wanted), ``copy`` (some), or ``""`` (none, from the
        index row alone)."""
        active = [
            s
            for s in self._by_rtype.get(entry.rtype, ())
            if entry.seq > s.begin and (s.start is None or entry.max_ts >= s.start)
        ]
        if not active:
            return ""
        if not self.ts_out and self.compress is None:
            for s in active:
                if s.ids is None and (s.start is None or entry.min_ts >= s.start):
                    return "range"
        return "copy"

    def _extend(self, run: list[Entry], mode: str, size: int, budget: int) -> int:
        """Add the following parts that continue ``run`` in the same file, the same way,
        with no mapping change before them; the run's size."""
        pending = self._pending
        changes = self._changes
        while pending and size < budget:
            nxt = pending[0]
            last = run[-1]
            if (
                nxt.rtype != last.rtype
                or nxt.segment is not last.segment
                or nxt.offset != last.offset + last.length
                or (len(pending) > 1 and pending[1].seq == nxt.seq)
                or (changes and changes[0][0] <= nxt.seq)
                or self._mode(nxt) != mode
            ):
                break
            run.append(pending.popleft())
            size += nxt.length
        return size

    def _whole_rows(self, out: Out, budget: int) -> int:
        """The common sendfile replay without an object per part: one replayed rtype, an
        ALL_SYMBOLS subscription whose start the parts already meet, no ts_out, no zstd, no
        mapping change on the way — the run of contiguous parts is found with numpy on the
        segment's index rows once, then consumed a step at a time as one range per step.
        The bytes it counts, or 0 when it does not apply here (the general path runs)."""
        if self._changes or len(self._rtypes) != 1 or self.ts_out or self.compress is not None:
            return 0
        run = self._fast
        if run is None or run.cursor != self.cursor:
            run = self._fast = self._find_run()
            if run is None:
                return 0
        pos = run.pos
        base = int(run.ends[pos - 1]) if pos else 0
        done = int(run.counts[pos - 1]) if pos else 0
        k = int(np.searchsorted(run.ends, base + budget, side="right"))
        k = min(max(k, pos + 1), len(run.ends))
        length = int(run.ends[k - 1]) - base
        records = int(run.counts[k - 1]) - done
        fd = self._fd_of(run.segment, run.rtype, out)
        out.item(FileRange(fd, run.offset + base, length, records))
        self.records += records
        self.bytes_ranged += length
        self.cursor = int(run.seqs[k]) - 1 if k < len(run.seqs) else run.end
        self._mapped = max(self._mapped, self.cursor)
        run.pos, run.cursor = k, self.cursor
        if k >= len(run.seqs):
            self._fast = None
        return length

    def _find_run(self) -> FastRun | None:
        """The longest run of whole, contiguous parts from the cursor on (see
        ``_whole_rows``). Rows already journaled never get a mapping change inserted
        among them (a change takes effect before the *next* chunk), so the run stays right
        however far the journal grows meanwhile."""
        rtype = self._rtypes[0]
        whole = [s for s in self._by_rtype[rtype] if s.ids is None]
        if not whole:
            return None
        after = self.cursor
        limit = self.target
        changes = self.journal.mapping_changes(self._mapped, limit)
        if changes:
            limit = min(limit, changes[0][0] - 1)  # the general path inserts it
        segment = next((g for g in list(self.journal.segments) if g.n and g.last_seq > after), None)
        if segment is None or limit <= after or segment.first_seq > limit:
            return None
        rows = segment.rows
        seqs = rows["seq"]
        lo = int(np.searchsorted(seqs, after, side="right"))
        hi = min(int(np.searchsorted(seqs, limit, side="right")), lo + _FAST_ROWS)
        part = rows[lo:hi]
        sel = part["rtype"] == rtype
        mine = part if bool(sel.all()) else part[sel]
        if not len(mine):
            return None
        if hi < len(rows) and int(seqs[hi - 1]) < limit:
            limit = int(seqs[hi - 1])  # the rows looked at end there
        mine_seqs = mine["seq"]
        ok = np.zeros(len(mine), dtype=np.bool_)
        for s in whole:
            hit = mine_seqs > np.uint64(s.begin)
            if s.start is not None:
                hit &= mine["min_ts"] >= np.uint64(s.start)
            ok |= hit
        offsets = mine["offset"].astype(np.int64)
        lengths = mine["length"].astype(np.int64)
        bad = ~ok
        bad[1:] |= offsets[1:] != offsets[:-1] + lengths[:-1]
        n = int(np.argmax(bad)) if bool(bad.any()) else len(mine)
        if n == 0:
            return None
        end = int(mine_seqs[n]) - 1 if n < len(mine) else min(limit, segment.last_seq)
        return FastRun(
            segment=segment,
            rtype=rtype,
            offset=int(offsets[0]),
            seqs=mine_seqs[:n].astype(np.int64),
            ends=np.cumsum(lengths[:n]),
            counts=np.cumsum(mine["count"][:n].astype(np.int64)),
            end=end,
            cursor=after,
        )

    def _fd(self, entry: Entry, out: Out) -> int:
        return self._fd_of(entry.segment, entry.rtype, out)

    def _fd_of(self, segment: Segment, rtype: int, out: Out) -> int:
        if segment is not self._segment:
            # A new segment: the older ones' descriptors retire once their ranges are out.
            self._segment = segment
            old = tuple(self._fds.values())
            self._fds.clear()
            if old:
                self._retiring.update(old)
                out.item(Retire(old))
        key = (id(segment), rtype)
        fd = self._fds.get(key)
        if fd is None:
            fd = self._fds[key] = segment.open_fd(rtype)
        return fd

    def _range(self, run: list[Entry], out: Out) -> None:
        fd = self._fd(run[0], out)
        length = sum(e.length for e in run)
        records = sum(e.count for e in run)
        out.item(FileRange(fd, run[0].offset, length, records))
        self.records += records
        self.bytes_ranged += length

    def _read(self, run: list[Entry], out: Out) -> tuple[bytes, npt.NDArray[np.uint64]]:
        fd = self._fd(run[0], out)
        length = sum(e.length for e in run)
        data = os.pread(fd, length, run[0].offset)
        if len(data) != length:
            raise ReplayError(
                f"journal segment {getattr(run[0].segment, 'id', '?')}: rtype "
                f"{run[0].rtype:#04x} file ends before its index says"
            )
        seqs = np.repeat(
            np.fromiter((e.seq for e in run), dtype=np.uint64, count=len(run)),
            [e.count for e in run],
        )
        return data, seqs

    def _mask(
        self, rtype: int, data: bytes, seqs: npt.NDArray[np.uint64]
    ) -> tuple[ChunkIndex, npt.NDArray[np.int64]]:
        index, used = index_records(data)
        if used != len(data) or index.count != len(seqs):
            raise ReplayError(f"journal rtype {rtype:#04x}: records do not match the index")
        fts: npt.NDArray[np.uint64] | None = None
        mask: npt.NDArray[np.bool_] | None = None
        for s in self._by_rtype.get(rtype, ()):
            m = seqs > np.uint64(s.begin)
            if s.start is not None:
                if fts is None:
                    fts = filter_ts(index)
                m &= fts >= np.uint64(s.start)
            if s.ids is not None:
                m &= np.isin(index.instrument_ids, s.ids)
            mask = m if mask is None else mask | m
        picked = np.flatnonzero(mask) if mask is not None else np.zeros(0, np.int64)
        return index, picked

    def _copy(self, run: list[Entry], out: Out) -> None:
        data, seqs = self._read(run, out)
        index, picked = self._mask(run[0].rtype, data, seqs)
        n = int(picked.size)
        self.bytes_copied += len(data)
        if not n:
            return
        whole = n == len(seqs)
        if self.ts_out:
            body: bytes | memoryview = stamp_ts_out(index, None if whole else picked, out.now_ns)
        elif whole:
            body = data
        else:
            body = index.select(picked)
        out.data(body, n)
        self.records += n

    def _mixed(self, group: list[Entry], out: Out) -> int:
        """One chunk holding several replayed rtypes: its selected records in the chunk's
        own order (as live sends them)."""
        order = np.frombuffer(self.journal.order_bytes(group[0]), dtype=np.uint8)
        positions: list[npt.NDArray[np.int64]] = []
        pieces: list[bytes | memoryview] = []
        used = 0
        for entry in group:
            used += entry.length
            if not self._mode(entry):
                continue
            data, seqs = self._read([entry], out)
            self.bytes_copied += len(data)
            index, picked = self._mask(entry.rtype, data, seqs)
            if not picked.size:
                continue
            at = np.flatnonzero(order == entry.rtype)
            if len(at) != entry.count:
                raise ReplayError(f"journal chunk {entry.seq}: order does not match its parts")
            positions.append(at[picked])
            offsets = index.offsets
            lengths = index.lengths
            view = memoryview(data)
            for i in picked.tolist():
                off = int(offsets[i])
                pieces.append(view[off : off + int(lengths[i])])
        if pieces:
            where = np.argsort(np.concatenate(positions), kind="stable")
            ordered = [pieces[i] for i in where.tolist()]
            if self.ts_out:
                body = stamp_records((bytes(p) for p in ordered), out.now_ns)
            else:
                body = b"".join(ordered)
            out.data(body, len(ordered))
            self.records += len(ordered)
        return used
