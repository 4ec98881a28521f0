"""Which connections' transports still reference shared-ring memory (``--workers N``).

A worker publishes each ring CHUNK as a memoryview into the read-only mapping, and the
fan-out hands that same object to every plain session. When a socket takes only part of a
write, uvloop keeps a reference to the rest of the memoryview until the kernel takes it
(and so does the stdlib loop from Python 3.12 on, whose transport buffers memoryviews; up
to 3.11 it copies into a bytearray). Those bytes must not be overwritten in the ring
meanwhile: the connection notes a *pin* (entry position, its ``bytes_sent`` right after the
write), and the worker's release position never passes the oldest pin left.

A pin is released once ``transport.get_write_buffer_size() <= bytes_sent - mark``: every
byte written after the pinned entry may still be queued, but none of the entry's own. Bytes
a connection writes without counting them in ``bytes_sent`` only make that test later (safe).

Where the loop copies (``enabled`` False), nothing is ever pinned and the tracker costs a
flag test per write.
"""

from __future__ import annotations

import asyncio
import sys
from collections import deque
from typing import Protocol

__all__ = ["PinHolder", "PinTracker", "loop_keeps_references"]


class PinHolder(Protocol):
    """What a pinning connection offers (``SessionOutput`` does)."""

    @property
    def transport(self) -> asyncio.WriteTransport | None: ...

    @property
    def bytes_sent(self) -> int: ...


def loop_keeps_references(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether ``loop``'s socket transports may keep a reference to written buffers: True
    for uvloop (and any loop not known to copy), False for the stdlib selector loop up to
    Python 3.11 (it copies the unsent tail into a bytearray)."""
    from asyncio.selector_events import BaseSelectorEventLoop

    return not (isinstance(loop, BaseSelectorEventLoop) and sys.version_info < (3, 12))


class PinTracker:
    """One worker's pins; ``current_*`` describe the ring entry being published now."""

    def __init__(self, enabled: bool) -> None:
        #: True where transports keep references (uvloop): see ``loop_keeps_references``
        self.enabled = enabled
        #: position of the ring entry being published now (-1: none)
        self.current_pos = -1
        #: its payload: the object the fan-out hands to plain sessions unchanged
        self.current_view: memoryview | None = None
        #: which ring the current entry is in (``begin(key=)``: e.g. the dataset); pins of
        #: different rings are kept apart in ``floors``
        self.current_key: object = None
        #: after ``sweep``: the oldest pinned position per ring key
        self.floors: dict[object, int] = {}
        self._copy_of: memoryview | None = None
        self._copy = b""
        self._pins: dict[PinHolder, deque[tuple[int, int]]] = {}
        self._keys: dict[PinHolder, object] = {}

    @classmethod
    def for_loop(cls, loop: asyncio.AbstractEventLoop) -> PinTracker:
        return cls(loop_keeps_references(loop))

    def begin(self, pos: int, view: memoryview, key: object = None) -> None:
        """The entry at ``pos`` of ring ``key`` is being published (its payload ``view``)."""
        self.current_pos = pos
        self.current_view = view
        self.current_key = key

    def end(self) -> None:
        self.current_pos = -1
        self.current_view = None
        self.current_key = None
        self._copy_of = None
        self._copy = b""

    def copy_of_current(self) -> bytes:
        """One bytes copy of the current payload, shared by every session that needs one
        (made on first use per entry)."""
        view = self.current_view
        if view is None:
            raise RuntimeError("no ring entry is being published")
        if self._copy_of is not view:
            self._copy = bytes(view)
            self._copy_of = view
        return self._copy

    def note(self, conn: PinHolder, pos: int, mark: int) -> None:
        """``conn``'s transport kept part of entry ``pos`` (of ring ``current_key``: a
        connection reads one ring); released once its write buffer is no larger than
        ``conn.bytes_sent - mark``."""
        pins = self._pins.get(conn)
        if pins is None:
            self._pins[conn] = deque(((pos, mark),))
            self._keys[conn] = self.current_key
        else:
            pins.append((pos, mark))

    def drop(self, conn: PinHolder) -> None:
        """``conn`` is gone (connection_lost): its transport holds nothing any more."""
        self._pins.pop(conn, None)
        self._keys.pop(conn, None)

    def sweep(self) -> int | None:
        """Forget released pins; the oldest pinned position left (None: no pins), and
        ``floors``: the oldest per ring key (positions of different rings do not compare:
        with several datasets use ``floors[key]``)."""
        oldest: int | None = None
        floors: dict[object, int] = {}
        keys = self._keys
        gone = []
        for conn, pins in self._pins.items():
            transport = conn.transport
            if transport is None:
                gone.append(conn)
                continue
            done = conn.bytes_sent - transport.get_write_buffer_size()
            while pins and pins[0][1] <= done:
                pins.popleft()
            if not pins:
                gone.append(conn)
            else:
                pos = pins[0][0]
                if oldest is None or pos < oldest:
                    oldest = pos
                key = keys.get(conn)
                if key not in floors or pos < floors[key]:
                    floors[key] = pos
        for conn in gone:
            del self._pins[conn]
            keys.pop(conn, None)
        self.floors = floors
        return oldest

    def older_than(self, pos: int, key: object = ...) -> list[PinHolder]:
        """Pinned connections that still hold an entry below ``pos`` (as of the last
        sweep); only those of ring ``key`` when given."""
        keys = self._keys
        return [
            conn
            for conn, pins in self._pins.items()
            if pins and pins[0][0] < pos and (key is ... or keys.get(conn) == key)
        ]

    def __len__(self) -> int:
        return len(self._pins)
