"""The lingering close of a client connection, and the reset.

After a fatal error (an ErrorMsg or ``success=0|error=``) the client may still be writing
(subscriptions sent before it read the error). The connection keeps reading and
discarding, so that the kernel never answers those bytes with a reset, which would
destroy the error the client has not read yet. The write side is shut down once what is
queued is sent and the client has sent start_session, its own EOF, or nothing for
``LINGER_QUIET_S`` (at the latest after ``LINGER_FIN_MAX_S``); the connection is closed at
the client's EOF, after ``LINGER_DRAIN_S`` more or after ``LINGER_MAX_BYTES`` discarded.
``connection_lost`` is handed back to the connection, which releases its slot once.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Protocol

__all__ = [
    "LINGER_DRAIN_S",
    "LINGER_FIN_MAX_S",
    "LINGER_MAX_BYTES",
    "LINGER_QUIET_S",
    "LingeringClose",
    "abort_if_undrained",
    "reset",
]


class _Lost(Protocol):
    def connection_lost(self, exc: Exception | None) -> None: ...


#: shut the write side down once the client has
#: been quiet this long (or has sent start_session, or its EOF) ...
LINGER_QUIET_S = 0.3
#: ... and at the latest this long after the close
LINGER_FIN_MAX_S = 1.0
#: after that, read and discard until the client's EOF for at most this long ...
LINGER_DRAIN_S = 2.0
#: ... and at most this many bytes (more: closed at once, the kernel may reset it)
LINGER_MAX_BYTES = 4 * 1024 * 1024
_START = b"start_session"


class LingeringClose(asyncio.Protocol):
    """The protocol of a connection in its lingering close (see the module docstring):
    discards what the client sends, shuts the write side down when due, closes at the
    client's EOF or a bound, and hands ``connection_lost`` back to the connection."""

    def __init__(self, conn: _Lost, transport: asyncio.Transport, fin_now: bool) -> None:
        self.conn = conn
        self.transport = transport
        self.discarded = 0
        self.fin_sent = False
        self._loop = asyncio.get_running_loop()
        self._since = self._last_rx = self._loop.time()
        self._tail = b""
        self._timer: asyncio.TimerHandle | None = None
        if fin_now:
            self._fin()
        else:
            self._timer = self._loop.call_later(LINGER_QUIET_S, self._quiet_check)

    def _quiet_check(self) -> None:
        now = self._loop.time()
        due = min(self._last_rx + LINGER_QUIET_S, self._since + LINGER_FIN_MAX_S)
        if now >= due - 0.001:
            self._fin()
        else:
            self._timer = self._loop.call_later(due - now, self._quiet_check)

    def _fin(self) -> None:
        if self.fin_sent:
            return
        self.fin_sent = True
        if self._timer is not None:
            self._timer.cancel()
        transport = self.transport
        if transport.is_closing():
            return
        try:
            transport.write_eof()  # after what is still buffered: both loops flush first
        except OSError:
            # The peer is already gone (the stdlib loop shuts the socket down at once when
            # nothing is buffered: ENOTCONN after a reset); nothing more can reach it.
            transport.close()
            return
        self._timer = self._loop.call_later(LINGER_DRAIN_S, transport.close)

    def data_received(self, data: bytes) -> None:
        self.discarded += len(data)
        if self.discarded > LINGER_MAX_BYTES:
            self.transport.close()
            return
        if not self.fin_sent:
            self._last_rx = self._loop.time()
            seen = self._tail + data
            if _START in seen:
                self._fin()
            self._tail = seen[-(len(_START) - 1) :]

    def eof_received(self) -> bool | None:
        return None  # the client is done: close (after flushing what is left)

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.conn.connection_lost(exc)


def abort_if_undrained(transport: asyncio.Transport) -> bool:
    """A cut session still holding unsent bytes after its grace is reset (True); one that
    has drained is left to its lingering close (it may still be reading its last bytes)."""
    if transport.get_write_buffer_size():
        reset(transport)
        return True
    return False


def reset(transport: asyncio.Transport) -> None:
    """Abort with a TCP reset (SO_LINGER 0): a client that did not get everything must
    not see a clean end of stream."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    transport.abort()
