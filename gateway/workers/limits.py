"""Gateway-wide connection and session counts shared by the worker processes (``--workers N``).

With N workers each process only sees its own connections, yet ``[limits] max_connections``,
``max_unauthenticated`` and every key's ``max_sessions`` are limits of the whole gateway.
:class:`SharedLimits` is a small file (0600, in the supervisor's private temporary
directory) that the supervisor and every worker map ``MAP_SHARED``, each opening it itself.
It holds 64-bit counters, one row per worker slot:

* per slot: connections open, connections not authenticated yet;
* per API key (a column, found by a salted hash of the key, never the key itself): the
  sessions open in each slot.

Only a slot's own worker writes its row (the supervisor zeroes the row of a dead worker,
:meth:`SharedLimits.clear_worker`, before it starts the next one in that slot). An admission
is a check-and-increment under ``fcntl.lockf`` on the file: the sum over every row is
compared with the limit and the worker's own cell counted up, atomically for all the
processes. Counting down (a connection closed, a session authenticated or ended) touches
only the worker's own cell and takes no lock: an aligned 8-byte store (x86-64) that a
concurrent reader sees either before or after, and before is the safe side. A worker that
dies holding the lock releases it with its last descriptor (POSIX record locks).

The refusals are the single-process ones, word for word (``gateway.admission``,
``gateway.auth``): the 31st session of a ``max_sessions = 30`` key is answered
``success=0|error=Connection limit exceeded: this API key already has 30 of 30 sessions``
whatever worker it lands on.

``per_ip_rate`` and ``per_ip_burst`` stay per worker (a token bucket needs the clock of
every connection attempt, not worth a lock): each worker allows ``per_ip_rate / N`` new
connections a second per IP, with a burst of ``ceil(per_ip_burst / N)``. The kernel spreads
connections over the workers by a hash of the address and port, so one source's
connections land on every worker and the gateway-wide rate is about the configured one.

Keys get their column on their first session and keep it while the file lives (a reload
that removes a key leaves its counts to fall to zero as its sessions end; a key kept keeps
its counts whatever its new name or limit). When the columns run out the file grows; every
process maps the new size at its next locked operation.

How the server uses it (``gateway.server``): ``ServerState(..., shared_limits=limits)``
binds it (:meth:`SharedLimits.bind`): the admission asks :meth:`SharedLimits.try_open`, the
authenticator :meth:`SharedLimits.try_acquire` / :meth:`SharedLimits.release_key`, and
``state.connections`` / ``admission.unauthenticated`` become sets that count down the
worker's cells as connections leave them. ``shared_limits=None`` (one process) is today's
code path.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import mmap
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, TypeVar

from gateway.admission import burst_per_worker
from gateway.errors import GatewayError

if TYPE_CHECKING:
    from gateway.server import ServerState

__all__ = ["CountingSet", "LimitsFileError", "SharedLimits", "burst_per_worker"]

_T = TypeVar("_T")

_MAGIC = 0x4C53474C494D0001  # "LSGLIM", layout 1
#: header cells: magic, slots, key columns, workers, salt (2 cells), 2 spare
_HEADER = 8
_SALT = 4
#: a column: the key's hash (2 cells, 0 = free), then one count per slot
_DIGEST = 2
#: key columns in a new file (doubled when they run out)
DEFAULT_KEY_COLUMNS = 64
#: refusal reasons of try_open (gateway.admission.Refusal.reason)
MAX_CONNECTIONS, MAX_UNAUTHENTICATED = "max_connections", "max_unauthenticated"


class LimitsFileError(GatewayError):
    """The shared limits file is not one of ours (or not readable)."""


class CountingSet(set[_T]):
    """A set that calls ``on_remove()`` once for each member ``discard`` takes out (the
    only way the server removes connections from its sets)."""

    def __init__(self, items: Iterable[_T], on_remove: Callable[[], None]) -> None:
        super().__init__(items)
        self.on_remove = on_remove

    def discard(self, item: object) -> None:
        if item in self:
            super().discard(item)
            self.on_remove()


class SharedLimits:
    """One process's mapping of the shared limits file.

    The supervisor makes it (:meth:`create`, ``slot = -1``: it admits nothing), workers
    :meth:`attach` to it with their slot. Not thread-safe (one event loop per process).
    """

    def __init__(self, path: str, fd: int, slot: int, owned_dir: str | None = None) -> None:
        self.path = path
        self.slot = slot
        self._fd = fd
        self._owned_dir = owned_dir
        self._mm: mmap.mmap | None = None
        self._cells = memoryview(b"").cast("q")
        self._cols = 0
        #: key -> its column (this process's cache; columns never move)
        self._key_col: dict[str, int] = {}
        self._map()
        cells = self._cells
        if cells[0] != _MAGIC:
            self.close()
            raise LimitsFileError("not a shared limits file")
        self.slots = int(cells[1])
        #: N: how many workers share the gateway (the per-IP rate divisor)
        self.workers = int(cells[3])
        self._salt = cells[_SALT : _SALT + 2].tobytes()
        if not -1 <= slot < self.slots:
            self.close()
            raise LimitsFileError(f"slot {slot} out of range (0..{self.slots - 1})")
        self._stride = _DIGEST + self.slots

    # --- making, opening, closing ----------------------------------------------------------

    @classmethod
    def create(
        cls,
        workers: int,
        directory: str | None = None,
        *,
        key_columns: int = DEFAULT_KEY_COLUMNS,
    ) -> SharedLimits:
        """The supervisor's file for ``workers`` slots, in ``directory`` (None: a new
        private temporary directory, removed again by :meth:`unlink`)."""
        if workers < 1:
            raise ValueError("workers must be at least 1")
        owned = None
        if directory is None:
            directory = owned = tempfile.mkdtemp(prefix="lsg-limits-")
        path = os.path.join(directory, "limits")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            cols = max(1, key_columns)
            os.ftruncate(fd, _size(workers, cols))
            with mmap.mmap(fd, _size(workers, cols)) as mm, memoryview(mm) as raw:
                cells = raw.cast("q")
                cells[1] = workers
                cells[2] = cols
                cells[3] = workers
                cells[_SALT : _SALT + 2] = memoryview(secrets.token_bytes(16)).cast("q")
                cells[0] = _MAGIC
                cells.release()
        except BaseException:
            os.close(fd)
            os.unlink(path)
            if owned is not None:
                shutil.rmtree(owned, ignore_errors=True)
            raise
        return cls(path, fd, -1, owned)

    @classmethod
    def attach(cls, path: str, slot: int) -> SharedLimits:
        """A worker's mapping, for ``slot``; its own row starts at zero (a new worker in
        a slot never inherits the counts of the one before)."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise LimitsFileError(f"cannot open the shared limits file: {exc.strerror}") from None
        if os.fstat(fd).st_size < _size(1, 1):
            os.close(fd)
            raise LimitsFileError("not a shared limits file")
        self = cls(path, fd, slot)
        if slot >= 0:
            self.clear_worker(slot)
        return self

    def close(self) -> None:
        """Unmap and close (the counts stay in the file for the others)."""
        self._unmap()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def unlink(self) -> None:
        """The supervisor, at exit: close and remove the file (and the directory
        :meth:`create` made for it)."""
        self.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        if self._owned_dir is not None:
            shutil.rmtree(self._owned_dir, ignore_errors=True)

    def bind(self, state: ServerState) -> None:
        """Make ``state`` (a worker's server) use these counts: its admission, its
        authenticator, and its connection sets count down this worker's cells."""
        if self.slot < 0:
            raise ValueError("the supervisor's SharedLimits admits nothing (slot -1)")
        state.connections = CountingSet(state.connections, self._closed)
        state.admission.unauthenticated = CountingSet(
            state.admission.unauthenticated, self._authenticated
        )
        state.admission.shared = self
        state.authenticator.shared = self

    # --- the worker's operations -------------------------------------------------------------

    def try_open(self, max_connections: int, max_unauthenticated: int) -> str | None:
        """Count one new connection (open and unauthenticated) if the gateway-wide limits
        allow it; else the refusal reason (``max_connections`` or ``max_unauthenticated``)."""
        row = _HEADER + 2 * self.slot
        with self._locked() as cells:
            end = _HEADER + 2 * self.slots
            if sum(cells[_HEADER:end:2]) >= max_connections:
                return MAX_CONNECTIONS
            if sum(cells[_HEADER + 1 : end : 2]) >= max_unauthenticated:
                return MAX_UNAUTHENTICATED
            cells[row] += 1
            cells[row + 1] += 1
        return None

    def undo_open(self) -> None:
        """A connection :meth:`try_open` counted was refused after all (per-IP rate)."""
        self._closed()
        self._authenticated()

    def try_acquire(self, key: str, max_sessions: int) -> int | None:
        """Count one more session of ``key`` if the key has fewer than ``max_sessions``
        over every worker (None); else the sessions it has (the refusal says so)."""
        with self._locked():
            base = self._column(key) + _DIGEST
            cells = self._cells  # after _column: it may have grown the file
            held = sum(cells[base : base + self.slots])
            if held >= max_sessions:
                return int(held)
            cells[base + self.slot] += 1
        return None

    def release_key(self, key: str) -> None:
        """One session of ``key`` (counted by :meth:`try_acquire` here) ended."""
        col = self._key_col.get(key)
        if col is not None:
            self._count_down(self._col_base(col) + _DIGEST + self.slot)

    # --- the supervisor's operations, and reading -------------------------------------------

    def clear_worker(self, slot: int) -> None:
        """Zero ``slot``'s row: its worker died (the supervisor, before the next one starts
        in that slot), or a new worker starts in it."""
        if not 0 <= slot < self.slots:
            raise ValueError(f"slot {slot} out of range (0..{self.slots - 1})")
        with self._locked() as cells:
            cells[_HEADER + 2 * slot] = 0
            cells[_HEADER + 2 * slot + 1] = 0
            for col in range(self._cols):
                cells[self._col_base(col) + _DIGEST + slot] = 0

    def totals(self) -> tuple[int, int]:
        """(connections open, unauthenticated) over every worker."""
        with self._locked() as cells:
            end = _HEADER + 2 * self.slots
            return int(sum(cells[_HEADER:end:2])), int(sum(cells[_HEADER + 1 : end : 2]))

    def sessions_of(self, key: str) -> int:
        """``key``'s sessions over every worker."""
        with self._locked() as cells:
            col = self._find(self._digest(key), cells)
            if col is None:
                return 0
            base = self._col_base(col) + _DIGEST
            return int(sum(cells[base : base + self.slots]))

    def row(self, slot: int) -> tuple[int, int, int]:
        """``slot``'s (connections, unauthenticated, sessions of every key together)."""
        with self._locked() as cells:
            sessions = sum(cells[self._col_base(c) + _DIGEST + slot] for c in range(self._cols))
            return (
                int(cells[_HEADER + 2 * slot]),
                int(cells[_HEADER + 2 * slot + 1]),
                int(sessions),
            )

    # --- internals -------------------------------------------------------------------------

    def _closed(self) -> None:
        self._count_down(_HEADER + 2 * self.slot)

    def _authenticated(self) -> None:
        self._count_down(_HEADER + 2 * self.slot + 1)

    def _count_down(self, cell: int) -> None:
        cells = self._cells
        if cells[cell] > 0:
            cells[cell] -= 1

    @contextlib.contextmanager
    def _locked(self) -> Iterator[memoryview]:
        fcntl.lockf(self._fd, fcntl.LOCK_EX)
        try:
            if self._cells[2] != self._cols:  # another process added key columns
                self._map()
            yield self._cells
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)

    def _column(self, key: str) -> int:
        """The cell index of ``key``'s column (found or given one; under the lock)."""
        col = self._key_col.get(key)
        if col is None:
            digest = self._digest(key)
            col = self._find(digest, self._cells)
            if col is None:
                col = self._find((0, 0), self._cells)
                if col is None:
                    col = self._grow()
                cells = self._cells
                base = self._col_base(col)
                cells[base : base + _DIGEST] = memoryview(
                    b"".join(d.to_bytes(8, "little", signed=True) for d in digest)
                ).cast("q")
            self._key_col[key] = col
        return self._col_base(col)

    def _digest(self, key: str) -> tuple[int, int]:
        raw = hashlib.blake2b(key.encode(), digest_size=16, key=self._salt).digest()
        first = int.from_bytes(raw[:8], "little", signed=True) | 1  # never the free mark
        return first, int.from_bytes(raw[8:], "little", signed=True)

    def _find(self, digest: tuple[int, int], cells: memoryview) -> int | None:
        for col in range(self._cols):
            base = self._col_base(col)
            if cells[base] == digest[0] and cells[base + 1] == digest[1]:
                return col
        return None

    def _col_base(self, col: int) -> int:
        return _HEADER + 2 * self.slots + col * self._stride

    def _grow(self) -> int:
        """Double the key columns (under the lock); returns the first new column."""
        first = self._cols
        cols = first * 2
        os.ftruncate(self._fd, _size(self.slots, cols))
        self._map(cols)
        self._cells[2] = cols
        return first

    def _map(self, cols: int | None = None) -> None:
        self._unmap()
        size = os.fstat(self._fd).st_size
        if size < _size(1, 1):
            raise LimitsFileError("not a shared limits file")
        mm = mmap.mmap(self._fd, size)
        self._mm = mm
        self._cells = memoryview(mm).cast("q")
        self._cols = int(self._cells[2]) if cols is None else cols

    def _unmap(self) -> None:
        self._cells.release()
        if self._mm is not None:
            self._mm.close()
            self._mm = None


def _size(slots: int, cols: int) -> int:
    return 8 * (_HEADER + 2 * slots + cols * (_DIGEST + slots))
