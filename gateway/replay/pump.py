"""The ordered output of one replaying session: ``ReplayPump``.

While a session replays, everything it is sent goes through its pump, in order: bytes
(``transport.write``: mapping records, SystemMsgs, filtered copies, the connection's own
records), byte ranges of journal files (``os.sendfile`` straight from the page cache to the
socket, nothing read into Python), and calls (run once everything queued before them has
been handed to the kernel or the transport; the hand-over to live is one).

Why not the loop's sendfile: uvloop transports have none, and both loops refuse
``add_writer`` on a transport's own fd. So the pump sends a file range itself, on a
``os.dup`` of the socket's fd, and only while the transport's buffer is empty (bytes written
before the range are all in the kernel, so nothing interleaves); while a range is partly
sent, nothing else is written. Bytes go to ``transport.write`` only while the transport
holds less than ``step_bytes``, so memory stays bounded however slow the reader (the
producer is asked for more only as the socket drains). When the socket is full
(``BlockingIOError``, or a short send) or the transport holds too much, the pump waits for
the dup to be writable with ``loop.add_writer`` (one-shot: removed in the callback,
re-armed only if still needed) and then looks again. The transport writes its own buffer on
the same writability, so waiting for it to drain costs one wake-up each time the kernel
takes more bytes: no spin, and no pause/resume forwarding needed from the protocol
(``kick`` is a harmless nudge). The dup keeps the socket open: the owner must ``close()``
the pump when the connection is lost or before it closes or resets the transport; the pump
closes it itself on an error.

Fairness: one turn hands at most ``step_bytes`` to the kernel/transport, then the pump
continues from ``loop.call_soon``, so live sessions and other replays get the loop. When the
queue runs empty the pump asks its producer for more (``refill``); when that has nothing now
the pump idles until ``kick``. Errors (peer reset, a closed transport, a file shorter than
its range, an exception from a callback) reach ``on_error`` once, on a later loop turn, and
stop the pump; nothing is raised into the loop. File descriptors of ranges stay the
caller's: close them after the range (a ``push_call``) or after ``close()``.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
from collections import deque
from collections.abc import Callable

__all__ = ["ReplayPump"]

log = logging.getLogger("gateway.replay")

#: most queue items one turn goes through (bounds a producer that pushes only calls)
MAX_ITEMS_PER_TURN = 4096


class _Range:
    """A file range still to send: ``fd`` from ``offset`` up to ``end``."""

    __slots__ = ("end", "fd", "offset")

    def __init__(self, fd: int, offset: int, end: int) -> None:
        self.fd = fd
        self.offset = offset
        self.end = end


_Item = bytes | bytearray | memoryview | _Range | Callable[[], None]


class ReplayPump:
    """Ordered output of one replaying session, owning the socket until closed.

    ``on_written(n, path)`` follows every piece handed over (``"sendfile"`` for file
    ranges, ``"copy"`` for bytes); ``on_error(exc)`` is called once, on a later loop turn,
    when the pump stops on an error (never after ``close()``); ``refill()`` is called when
    the queue runs empty (the first time on the loop turn after construction): the producer
    may push more and returns False when it has nothing now (the pump then idles until
    ``kick()``).
    """

    def __init__(
        self,
        transport: asyncio.Transport,
        *,
        step_bytes: int = 1 << 20,
        on_written: Callable[[int, str], None],
        on_error: Callable[[BaseException], None],
        refill: Callable[[], bool],
    ) -> None:
        self.transport = transport
        self.step_bytes = max(1, int(step_bytes))
        self._on_written = on_written
        self._on_error = on_error
        self._refill = refill
        self._loop = asyncio.get_running_loop()
        self._queue: deque[_Item] = deque()
        self._dup = -1  # our dup of the socket fd: writability, and sendfile's target
        self._waiting = False  # a writer is armed on the dup
        self._scheduled: asyncio.Handle | None = None
        self._running = False
        self._owner_closed = False
        #: stopped (``close()`` or an error); pushes are then dropped
        self.closed = False
        #: the error that stopped the pump, if one did
        self.error: BaseException | None = None
        #: ``time.monotonic()`` when the last piece was handed over (for a stall check)
        self.last_progress = time.monotonic()
        self.bytes_sendfile = self.bytes_copied = 0
        #: turns run, writability wake-ups, refill calls (the proof it waits, not spins)
        self.turns = self.wakeups = self.refills = 0
        self._schedule()  # the first turn asks the producer (refill) for what comes first

    # --- the producer's side ----------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """Something queued, or a file range partly sent."""
        return bool(self._queue)

    @property
    def waiting(self) -> bool:
        """Waiting for the socket to take more (the kernel's or the transport's buffer)."""
        return self._waiting

    def push_bytes(self, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` after everything pushed before (through ``transport.write``)."""
        if self.closed or not len(data):
            return
        transport = self.transport
        if (
            self._queue
            or self._running
            or transport.is_closing()
            or transport.get_write_buffer_size() >= self.step_bytes
        ):
            self._queue.append(data)
            self._schedule()
            return
        # Nothing ahead of it: straight to the transport.
        try:
            self._write(data)
        except Exception as exc:
            self._fail(exc)

    def push_file(self, fd: int, offset: int, count: int) -> None:
        """Send ``count`` bytes of ``fd`` from ``offset`` with ``os.sendfile``, in order.
        ``fd`` stays the caller's; it must stay open until the range is sent."""
        if offset < 0 or count < 0:
            raise ValueError(f"bad file range: offset {offset}, count {count}")
        if self.closed or not count:
            return
        self._queue.append(_Range(fd, offset, offset + count))
        self._schedule()

    def push_call(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` once everything pushed before it has been handed over (not after
        ``close()``)."""
        if self.closed:
            return
        self._queue.append(fn)
        self._schedule()

    def kick(self) -> None:
        """The producer has more (after ``refill`` returned False)."""
        if not self.closed:
            self._schedule()

    def close(self) -> None:
        """Stop: drop what is queued, remove the writer, close the dup. The transport is
        left as it is (open). Idempotent."""
        self._owner_closed = True
        self._stop()

    # --- the engine ---------------------------------------------------------------------------

    def _schedule(self) -> None:
        if self._scheduled is None and not self._waiting and not self._running:
            self._scheduled = self._loop.call_soon(self._turn)

    def _turn(self) -> None:
        self._scheduled = None
        if self.closed:
            return
        self.turns += 1
        self._running = True
        try:
            self._step()
        except Exception as exc:
            self._fail(exc)
        finally:
            self._running = False

    def _step(self) -> None:
        queue = self._queue
        transport = self.transport
        budget = self.step_bytes
        for _ in range(MAX_ITEMS_PER_TURN):
            if self.closed:
                return
            if transport.is_closing():
                raise ConnectionResetError(errno.ECONNRESET, "the connection is closed")
            if not queue:
                self.refills += 1
                more = self._refill()
                if self.closed:
                    return
                if not queue:
                    if more:
                        self._again()
                    return  # idle until kick()
                continue
            if budget <= 0:
                break
            item = queue[0]
            if isinstance(item, _Range):
                if transport.get_write_buffer_size():
                    self._wait()  # bytes before the range are not all in the kernel yet
                    return
                want = min(item.end - item.offset, budget)
                try:
                    sent = os.sendfile(self._sock_fd(), item.fd, item.offset, want)
                except BlockingIOError:
                    self._wait()
                    return
                if sent <= 0:
                    raise EOFError("a journal file ended before its byte range")
                item.offset += sent
                budget -= sent
                if item.offset >= item.end:
                    queue.popleft()
                self.bytes_sendfile += sent
                self.last_progress = time.monotonic()
                self._on_written(sent, "sendfile")
                if sent < want:
                    self._wait()  # the socket took less: it is full
                    return
            elif callable(item):
                queue.popleft()
                item()
            else:
                if transport.get_write_buffer_size() >= self.step_bytes:
                    self._wait()  # bounded memory: the transport holds a step already
                    return
                queue.popleft()
                budget -= self._write(item)
        self._again()

    def _write(self, data: bytes | bytearray | memoryview) -> int:
        self.transport.write(data)
        n = data.nbytes if isinstance(data, memoryview) else len(data)
        self.bytes_copied += n
        self.last_progress = time.monotonic()
        self._on_written(n, "copy")
        return n

    def _again(self) -> None:
        """Budget spent: continue on a later loop turn."""
        self._scheduled = self._loop.call_soon(self._turn)

    def _sock_fd(self) -> int:
        if self._dup < 0:
            sock = self.transport.get_extra_info("socket")
            fd = sock.fileno() if sock is not None else -1
            if fd < 0:
                raise ConnectionResetError(errno.EBADF, "the connection has no socket")
            self._dup = os.dup(fd)
        return self._dup

    def _wait(self) -> None:
        self._loop.add_writer(self._sock_fd(), self._on_writable)
        self._waiting = True

    def _on_writable(self) -> None:
        self.wakeups += 1
        self._unwait()
        self._turn()

    def _unwait(self) -> None:
        if self._waiting:
            self._waiting = False
            self._loop.remove_writer(self._dup)

    # --- ending -------------------------------------------------------------------------------

    def _stop(self) -> None:
        self.closed = True
        self._queue.clear()
        if self._scheduled is not None:
            self._scheduled.cancel()
            self._scheduled = None
        try:
            self._unwait()
        except Exception:  # a closed loop: nothing is polled any more
            log.debug("replay pump: removing the writer failed", exc_info=True)
        if self._dup >= 0:
            dup, self._dup = self._dup, -1
            os.close(dup)

    def _fail(self, exc: BaseException) -> None:
        if self.closed:
            return
        self.error = exc
        self._stop()
        self._loop.call_soon(self._report, exc)

    def _report(self, exc: BaseException) -> None:
        if self._owner_closed:
            return
        try:
            self._on_error(exc)
        except Exception:
            log.exception("replay pump: on_error failed")
