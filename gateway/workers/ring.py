"""One dataset's shared-memory ring: the supervisor writes every published chunk once, the
workers read it in place (``--workers N``).

Segment: a POSIX shared-memory file ``/dev/shm/lsg-<pid>-<n>-<random>`` (mode 0600, created
with ``O_EXCL`` so a name is never reused; unlinked by the supervisor). Its first 4096
bytes are the header page, the rest (``size`` bytes) the data area. Workers map the data
area read-only (``PROT_READ``, the same file at offset 4096) and the header page
read-write; a worker writes only its own slot there.

Header page, as 512 native u64 words (one aligned 8-byte store each: no torn word):

====== ==============================================================================
word   meaning
====== ==============================================================================
0      magic ``LSGRING1``; 1: layout version; 2: data size; 3: max workers;
       4: creator pid
8      ``head``: the position after the last complete entry (its own cache line)
16..31 the segment's name (NUL padded): ``attach`` checks it is the name it opened
256+4i slot i: ``release`` (lowest position the worker may still reference),
       ``alive`` (its heartbeat, CLOCK_MONOTONIC ms), ``live`` (1 while a worker
       process owns the slot; written by the supervisor only)
====== ==============================================================================

Positions are monotonic byte counts (never wrap; offset = pos % size). An entry is a
32-byte header (``magic u16, kind u8, pad, payload length u32, pos u64, seq u64, records
u32, pad``) and its payload, padded to 8 bytes; an entry is never split across the end
of the area: a ``PAD`` entry fills the tail (a tail shorter than a header is skipped by
position alone) and the next entry starts at offset 0.

Ordering: the writer copies header and payload, THEN stores ``head``; a reader loads
``head``, then reads entries below it. That is correct on x86-64 (TSO: stores are seen in
program order, loads are not reordered with older loads) and is what this module assumes;
on a weakly ordered CPU it would need fences.

Writer rule (no reader is ever handed torn bytes): the writer never overwrites a position
>= the ``release`` of a live slot; an entry that does not fit is refused (``try_write``
returns None) and the caller holds it. A reader still checks every entry's recorded
position against the one it expects (``RingLapped`` on a mismatch: only possible when its
slot was declared dead while it still ran).
"""

from __future__ import annotations

import itertools
import mmap
import os
import re
import secrets
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from gateway.errors import GatewayError

__all__ = [
    "CHUNK",
    "ENTRY_HEADER",
    "HEADER_PAGE",
    "KINDS",
    "LEARN",
    "MAX_WORKERS",
    "METADATA",
    "PAD",
    "STATE",
    "Entry",
    "Ring",
    "RingError",
    "RingLapped",
    "RingReader",
    "RingWriter",
    "remove_stale",
]

CHUNK = 1
LEARN = 2
STATE = 3
METADATA = 4
PAD = 255
KINDS = frozenset({CHUNK, LEARN, STATE, METADATA})

HEADER_PAGE = 4096
MAX_WORKERS = 64
SHM_DIR = Path("/dev/shm")

_MAGIC = int.from_bytes(b"LSGRING1", "little")
_VERSION = 1
_W_MAGIC, _W_VERSION, _W_SIZE, _W_WORKERS, _W_PID = 0, 1, 2, 3, 4
_W_HEAD = 8
_NAME_AT, _NAME_MAX = 16 * 8, 16 * 8
_SLOTS_WORD, _SLOT_WORDS = 256, 4
_RELEASE, _ALIVE, _LIVE = 0, 1, 2

_ENTRY = struct.Struct("<HBxIQQI4x")
ENTRY_HEADER = _ENTRY.size  # 32
_ENTRY_MAGIC = 0x524C  # "LR"
_NAME_RE = re.compile(r"lsg-[0-9]+-[0-9]+-[0-9a-f]{8,32}")
_counter = itertools.count()


class RingError(GatewayError):
    """A ring segment that cannot be created or attached (its message names why)."""

    reason = "ring"


class RingLapped(GatewayError):
    """The entry a reader expected is gone or torn: the reader must ``resync``."""

    reason = "ring_lapped"


def _now_ms() -> int:
    return time.monotonic_ns() // 1_000_000


def _slot_word(slot: int, field: int) -> int:
    return _SLOTS_WORD + slot * _SLOT_WORDS + field


class Ring:
    """One dataset's mapping: ``hdr`` (the header page as u64 words, read-write) and
    ``data`` (the data area: read-write for the creator, read-only for ``attach``)."""

    name: str
    size: int
    max_workers: int

    def __init__(self, name: str, hdr_map: mmap.mmap, data_map: mmap.mmap, writable: bool):
        self.name = name
        self.writable = writable
        self._hdr_map = hdr_map
        self._data_map = data_map
        self.hdr = memoryview(hdr_map).cast("Q")
        self.data = memoryview(data_map)
        self.size = self.hdr[_W_SIZE]
        self.max_workers = self.hdr[_W_WORKERS]

    @classmethod
    def create(cls, size: int, max_workers: int) -> Ring:
        """A new segment (supervisor): ``size`` bytes of data, a multiple of 4096."""
        if size < HEADER_PAGE or size % HEADER_PAGE:
            raise RingError(f"ring size must be a positive multiple of 4096 bytes, not {size}")
        if not 1 <= max_workers <= MAX_WORKERS:
            raise RingError(f"ring max_workers must be 1..{MAX_WORKERS}, not {max_workers}")
        name = f"lsg-{os.getpid()}-{next(_counter)}-{secrets.token_hex(4)}"
        path = SHM_DIR / name
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, HEADER_PAGE + size)
            hdr_map = mmap.mmap(fd, HEADER_PAGE)
            data_map = mmap.mmap(fd, size, offset=HEADER_PAGE)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        os.close(fd)
        hdr = memoryview(hdr_map).cast("Q")
        hdr[_W_VERSION] = _VERSION
        hdr[_W_SIZE] = size
        hdr[_W_WORKERS] = max_workers
        hdr[_W_PID] = os.getpid()
        hdr_map[_NAME_AT : _NAME_AT + len(name)] = name.encode()
        hdr[_W_MAGIC] = _MAGIC  # last: a half-made segment never looks valid
        hdr.release()
        return cls(name, hdr_map, data_map, writable=True)

    @classmethod
    def attach(cls, name: str, *, creator: int | None = None) -> Ring:
        """Map an existing segment (worker): the data area read-only. ``creator``: the pid
        that must have created it (the supervisor's); a name from elsewhere is refused."""
        if not _NAME_RE.fullmatch(name):
            raise RingError(f"not a ring segment name: {name!r}")
        try:
            fd = os.open(SHM_DIR / name, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise RingError(f"ring {name} cannot be opened: {exc.strerror}") from exc
        try:
            st = os.fstat(fd)
            if st.st_uid != os.getuid() or st.st_mode & 0o077 or st.st_size <= HEADER_PAGE:
                raise RingError(f"ring {name} is not a private ring segment")
            hdr_map = mmap.mmap(fd, HEADER_PAGE)
            hdr = memoryview(hdr_map).cast("Q")
            try:
                stored = bytes(hdr_map[_NAME_AT : _NAME_AT + _NAME_MAX]).rstrip(b"\0")
                bad = (
                    hdr[_W_MAGIC] != _MAGIC
                    or hdr[_W_VERSION] != _VERSION
                    or stored != name.encode()
                    or hdr[_W_SIZE] + HEADER_PAGE != st.st_size
                    or (creator is not None and hdr[_W_PID] != creator)
                )
                size = hdr[_W_SIZE]
            finally:
                hdr.release()
            if bad:
                hdr_map.close()
                raise RingError(f"ring {name} is not the expected ring segment")
            data_map = mmap.mmap(fd, size, prot=mmap.PROT_READ, offset=HEADER_PAGE)
        finally:
            os.close(fd)
        return cls(name, hdr_map, data_map, writable=False)

    @property
    def head(self) -> int:
        return self.hdr[_W_HEAD]

    def close(self) -> None:
        """Unmap (a mapping still referenced by a payload view stays until the view goes)."""
        self.hdr.release()
        self.data.release()
        for m in (self._hdr_map, self._data_map):
            try:
                m.close()
            except BufferError:
                pass  # an Entry's payload still views it: unmapped when that goes

    def unlink(self) -> None:
        """Remove the segment's name (supervisor, at exit); mappings stay valid."""
        (SHM_DIR / self.name).unlink(missing_ok=True)


def remove_stale() -> list[str]:
    """Unlink this user's ring segments whose creating process is gone (a supervisor that
    was killed); returns their names. Live supervisors' segments are left alone."""
    removed = []
    uid = os.getuid()
    for path in SHM_DIR.glob("lsg-*"):
        if not _NAME_RE.fullmatch(path.name):
            continue
        pid = int(path.name.split("-")[1])
        try:
            if path.stat().st_uid != uid:
                continue
            os.kill(pid, 0)
        except ProcessLookupError:
            path.unlink(missing_ok=True)
            removed.append(path.name)
        except OSError:
            continue
    return removed


class RingWriter:
    """The supervisor's side of one ring: entries in, ``head`` published after each."""

    def __init__(self, ring: Ring) -> None:
        if not ring.writable:
            raise RingError("a ring attached read-only cannot be written")
        self.ring = ring
        self.size = ring.size
        self._hdr = ring.hdr
        self._data = ring.data
        self._head = ring.hdr[_W_HEAD]
        #: writes may end at or below this without looking at the slots (releases only grow)
        self._limit = 0
        #: the end a refused entry needed (0: the last write succeeded)
        self._refused = 0
        self._recompute()

    @property
    def head(self) -> int:
        return self._head

    def _recompute(self) -> int:
        hdr = self._hdr
        low = self._head
        for slot in range(self.ring.max_workers):
            if hdr[_slot_word(slot, _LIVE)]:
                low = min(low, hdr[_slot_word(slot, _RELEASE)])
        self._limit = low + self.size
        return self._limit

    def try_write(
        self, kind: int, payload: bytes | memoryview, *, seq: int = 0, records: int = 0
    ) -> int | None:
        """Append one entry; its position, or None when a live slot still holds the space
        it needs (nothing written, except maybe the PAD that moves ``head`` to the wrap)."""
        n = len(payload)
        total = (ENTRY_HEADER + n + 7) & ~7
        size = self.size
        head = self._head
        off = head % size
        if off + total > size:
            if total > size:
                raise ValueError(f"ring entry of {n} bytes does not fit a {size}-byte ring")
            wrap = head + size - off
            if wrap > self._limit and wrap > self._recompute():
                self._refused = wrap
                return None
            if size - off >= ENTRY_HEADER:
                pad = size - off - ENTRY_HEADER
                _ENTRY.pack_into(self._data, off, _ENTRY_MAGIC, PAD, pad, head, 0, 0)
            self._head = head = wrap
            self._hdr[_W_HEAD] = wrap
            off = 0
        end = head + total
        if end > self._limit and end > self._recompute():
            self._refused = end
            return None
        _ENTRY.pack_into(self._data, off, _ENTRY_MAGIC, kind, n, head, seq, records)
        self._data[off + ENTRY_HEADER : off + ENTRY_HEADER + n] = payload
        self._head = end
        self._hdr[_W_HEAD] = end  # after the bytes (x86-64 TSO: seen in this order)
        self._refused = 0
        return head

    def set_live(self, slot: int, live: bool, *, at: int | None = None) -> None:
        """A (re)started worker's slot becomes live with ``release = at`` (default: head),
        its heartbeat now; ``live=False`` after its process died (its release no longer
        holds the writer)."""
        hdr = self._hdr
        if live:
            hdr[_slot_word(slot, _RELEASE)] = self._head if at is None else at
            hdr[_slot_word(slot, _ALIVE)] = _now_ms()
            hdr[_slot_word(slot, _LIVE)] = 1
        else:
            hdr[_slot_word(slot, _LIVE)] = 0
        self._recompute()

    def live(self, slot: int) -> bool:
        return bool(self._hdr[_slot_word(slot, _LIVE)])

    def release_of(self, slot: int) -> int:
        return int(self._hdr[_slot_word(slot, _RELEASE)])

    def holders(self) -> list[int]:
        """Live slots whose release keeps the last refused entry out (empty after a
        successful write): the workers the writer is waiting for."""
        need = self._refused
        if not need:
            return []
        hdr = self._hdr
        return [
            slot
            for slot in range(self.ring.max_workers)
            if hdr[_slot_word(slot, _LIVE)] and hdr[_slot_word(slot, _RELEASE)] + self.size < need
        ]

    def used(self) -> int:
        """Bytes the live slots still hold (head - the lowest live release): how full the
        ring is for the writer (a gauge; ``size`` means the next entry waits)."""
        hdr = self._hdr
        low = self._head
        for slot in range(self.ring.max_workers):
            if hdr[_slot_word(slot, _LIVE)]:
                low = min(low, hdr[_slot_word(slot, _RELEASE)])
        return int(self._head - low)

    def heartbeat_age_s(self, slot: int) -> float:
        return max(0, _now_ms() - self._hdr[_slot_word(slot, _ALIVE)]) / 1000.0


class Entry(NamedTuple):
    """One ring entry; ``payload`` views the mapping (read-only, no copy). A NamedTuple
    (immutable like a frozen dataclass) because it is made per entry: ~0.2 us against
    ~1.2 us for a frozen dataclass on this VM."""

    kind: int
    pos: int
    end: int
    seq: int
    records: int
    payload: memoryview


_new = tuple.__new__


class RingReader:
    """A worker's side of one ring, starting at the current head (or ``start``)."""

    def __init__(self, ring: Ring, slot: int, *, start: int | None = None) -> None:
        if not 0 <= slot < ring.max_workers:
            raise RingError(f"ring slot {slot} out of range 0..{ring.max_workers - 1}")
        self.ring = ring
        self.slot = slot
        self.size = ring.size
        self._hdr = ring.hdr
        self._data = ring.data
        self._release_word = _slot_word(slot, _RELEASE)
        self._alive_word = _slot_word(slot, _ALIVE)
        self._live_word = _slot_word(slot, _LIVE)
        self._head = ring.hdr[_W_HEAD]
        #: the next entry to read
        self.pos = self._head if start is None else start
        self._released = self._hdr[self._release_word]

    def behind(self) -> int:
        """Bytes between this reader and the writer's head."""
        self._head = head = self._hdr[_W_HEAD]
        return int(head - self.pos)

    def next(self) -> Entry | None:
        """The entry at ``pos`` (and ``pos`` moves past it), or None when nothing is new.
        Raises ``RingLapped`` if that entry is gone or torn; call ``resync`` then."""
        size = self.size
        while True:
            pos = self.pos
            if pos >= self._head:
                hdr = self._hdr
                self._head = head = hdr[_W_HEAD]
                if pos >= head:
                    return None
                if head - pos > size or not hdr[self._live_word]:
                    raise RingLapped(f"ring {self.ring.name}: entry {pos} overwritten")
            off = pos % size
            if size - off < ENTRY_HEADER:
                self.pos = pos + size - off
                continue
            magic, kind, n, epos, seq, records = _ENTRY.unpack_from(self._data, off)
            if epos != pos or magic != _ENTRY_MAGIC or off + ENTRY_HEADER + n > size:
                raise RingLapped(f"ring {self.ring.name}: entry {pos} overwritten")
            end = pos + ((ENTRY_HEADER + n + 7) & ~7)
            self.pos = end
            if kind == PAD:
                continue
            start = off + ENTRY_HEADER
            return _new(Entry, (kind, pos, end, seq, records, self._data[start : start + n]))

    def resync(self) -> int:
        """Jump to the writer's head; the bytes skipped."""
        skipped = self.behind()
        self.pos = self._head
        return skipped

    def skip_chunks(self, keep: Callable[[Entry], None]) -> tuple[int, int]:
        """Jump to the head as it is now: every entry passed over that is not a CHUNK is
        still given to ``keep`` in order; returns (chunks skipped, records skipped).
        Raises ``RingLapped`` like ``next`` (``pos`` is then where it stopped)."""
        target = self._hdr[_W_HEAD]
        chunks = records = 0
        while self.pos < target:
            entry = self.next()
            if entry is None:
                break
            if entry.kind == CHUNK:
                chunks += 1
                records += entry.records
            else:
                keep(entry)
        return chunks, records

    def release(self, pos: int) -> None:
        """Store this slot's release: the writer may reuse everything below ``pos``.
        Releases only grow (a lower value is ignored: that space may be reused already)."""
        if pos > self._released:
            self._released = pos
            self._hdr[self._release_word] = pos

    def heartbeat(self) -> None:
        self._hdr[self._alive_word] = _now_ms()
