"""The control channel between the supervisor and each worker: a Unix socketpair carrying
msgspec Structs (a tagged union) as msgpack, each frame prefixed with its length (4 bytes,
big-endian).

supervisor -> worker: :class:`Init` (first, once: the config, the slot, the rings...),
:class:`Start` (once, the answer to :class:`Prepared`: each feed as of the ring position the
worker's slot was made live at), :class:`Reload` (SIGHUP). worker -> supervisor:
:class:`Prepared` (imports done, state built: ready to read the rings), :class:`Ready`
(listening, with its transport report), :class:`Stats` (every tick), :class:`Blocked` (a
lossless feed's session over its high-water mark, or clear again).

Start-up is in two steps so that a (re)starting worker's ring slot goes live only once the
worker can read: while it boots (a second or two of imports) its slot does not hold the
writer, and a busy feed never pauses every worker's sessions for one that is starting.

Nothing secret travels in a worker's argv or environment: the config (API keys included)
arrives in :class:`Init`, over the socketpair only the two processes hold.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import Callable
from typing import Any, cast

import msgspec

from gateway.config import Config
from gateway.errors import GatewayError
from gateway.ops.snapshot import GatewaySnapshot
from gateway.workers.aggregate import Family

__all__ = [
    "MAX_FRAME",
    "Blocked",
    "ControlChannel",
    "ControlError",
    "FeedStart",
    "FrameReader",
    "Init",
    "Message",
    "Prepared",
    "Ready",
    "Reload",
    "Start",
    "Stats",
    "describe",
    "encode",
    "open_channel",
    "recv_message",
]

log = logging.getLogger("gateway.workers")

#: the largest frame either side accepts (a Stats message with every metric family is tens
#: of KiB; a config with many keys a few MiB at most)
MAX_FRAME = 64 << 20
_LEN = struct.Struct(">I")


class ControlError(GatewayError):
    """A malformed frame on the control channel (a bug, or a process that is not ours)."""


class FeedStart(msgspec.Struct, kw_only=True):
    """A dataset as the supervisor's feed knows it when a worker's slot goes live (its
    :class:`Prepared`); what happens after comes through the ring from ``start_pos`` on,
    in order."""

    #: the supervisor's ``RingSink.snapshot()``: symbology log, schema, state
    snapshot: bytes
    #: the ring position this worker reads from (its slot was made live there)
    start_pos: int
    #: the journal seq of the last chunk before ``start_pos`` (-1: no journal)
    journal_seq: int = -1


class Init(msgspec.Struct, tag="init", kw_only=True):
    """The worker's whole start-up: sent once, first."""

    config: Config
    #: this worker's slot in the rings and the shared limits (0..N-1)
    slot: int
    #: its name in logs and metrics: ``w<slot>``
    name: str
    #: how many workers there are (siblings = workers - 1)
    workers: int
    supervisor_pid: int
    #: the client port (the supervisor reserved it; port 0 is resolved already)
    port: int
    #: "uvloop" or "asyncio" (chosen once by the supervisor)
    loop: str
    #: the eventfd the supervisor writes when a ring has new entries (-1: none)
    eventfd: int = -1
    #: dataset -> shared ring name
    rings: dict[str, str] = {}
    #: the shared limits file ("" : none)
    limits_path: str = ""
    #: CPUs to pin the worker's loop thread to (None: all it may use)
    cpus: list[int] | None = None
    #: the CPUs the gateway may use (a worker inherits its parent thread's pinning)
    allowed_cpus: list[int] | None = None


class Prepared(msgspec.Struct, tag="prepared", kw_only=True):
    """The worker has its state built (config, limits, rings mapped, feeds, journal
    follower, loop): its slot can go live now. Answered by :class:`Start`."""

    pid: int


class Start(msgspec.Struct, tag="start", kw_only=True):
    """The worker's slot is live in every ring: each dataset's feed as of there."""

    #: dataset -> its feed at the worker's start position
    feeds: dict[str, FeedStart] = {}


class Reload(msgspec.Struct, tag="reload", kw_only=True):
    """SIGHUP: the config read again by the supervisor; applied as Gateway.reload does."""

    config: Config


class Ready(msgspec.Struct, tag="ready", kw_only=True):
    """The worker is listening; ``report`` is its transport start-up line."""

    pid: int
    report: str


class Stats(msgspec.Struct, tag="stats", kw_only=True):
    """The worker's figures, every tick: its snapshot and its metric families (the
    serialisable form made by ``gateway.workers.aggregate.families_of``)."""

    snapshot: GatewaySnapshot
    families: list[Family] = []


class Blocked(msgspec.Struct, tag="blocked", kw_only=True):
    """A lossless feed in this worker has a session over its high-water mark (or not)."""

    dataset: str
    blocked: bool


Message = Init | Start | Reload | Prepared | Ready | Stats | Blocked

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode(msg: Message) -> bytes:
    """One frame: the length (4 bytes, big-endian), then the message as msgpack."""
    body = _encoder.encode(msg)
    if len(body) > MAX_FRAME:
        raise ControlError(f"control message too large ({len(body)} bytes)")
    return _LEN.pack(len(body)) + body


class FrameReader:
    """Splits a byte stream into messages; keeps a partial frame for the next ``feed``."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Message]:
        buf = self._buf
        buf += data
        out: list[Message] = []
        pos = 0
        while len(buf) - pos >= _LEN.size:
            (size,) = _LEN.unpack_from(buf, pos)
            if size > MAX_FRAME:
                raise ControlError(f"control frame of {size} bytes (at most {MAX_FRAME})")
            end = pos + _LEN.size + size
            if len(buf) < end:
                break
            try:
                out.append(_decoder.decode(memoryview(buf)[pos + _LEN.size : end]))
            except msgspec.DecodeError as exc:
                raise ControlError(f"bad control message: {exc}") from None
            pos = end
        del buf[:pos]
        return out

    @property
    def pending(self) -> int:
        """Bytes of a frame not complete yet."""
        return len(self._buf)


def recv_message(sock: socket.socket, timeout: float | None = None) -> Message | None:
    """Read exactly one message from a blocking socket (the worker's Init, before its
    loop starts); None on EOF before a whole frame."""
    sock.settimeout(timeout)
    head = _recv_exactly(sock, _LEN.size)
    if head is None:
        return None
    (size,) = _LEN.unpack(head)
    if size > MAX_FRAME:
        raise ControlError(f"control frame of {size} bytes (at most {MAX_FRAME})")
    body = _recv_exactly(sock, size)
    if body is None:
        return None
    try:
        msg: Message = _decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise ControlError(f"bad control message: {exc}") from None
    return msg


def _recv_exactly(sock: socket.socket, n: int) -> bytes | None:
    chunks = bytearray()
    while len(chunks) < n:
        part = sock.recv(n - len(chunks))
        if not part:
            return None
        chunks += part
    return bytes(chunks)


class ControlChannel(asyncio.Protocol):
    """One end of the control socketpair on an event loop: ``send`` frames a message;
    each message received goes to ``on_message``; EOF (or a bad frame) to ``on_close``."""

    def __init__(
        self,
        on_message: Callable[[Message], None],
        on_close: Callable[[Exception | None], None],
    ) -> None:
        self._on_message = on_message
        self._on_close = on_close
        self._reader = FrameReader()
        self.transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        try:
            messages = self._reader.feed(data)
        except ControlError as exc:
            log.error("control channel: %s; closing it", exc)
            if self.transport is not None:
                self.transport.abort()
            return
        for msg in messages:
            self._on_message(msg)

    def eof_received(self) -> bool:
        return False  # close our end too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.transport = None
        self._on_close(exc)

    def send(self, msg: Message) -> bool:
        """Queue a message; False when the channel is closed."""
        if self.transport is None or self.transport.is_closing():
            return False
        self.transport.write(encode(msg))
        return True

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def open_channel(
    sock: socket.socket,
    on_message: Callable[[Message], None],
    on_close: Callable[[Exception | None], None],
) -> ControlChannel:
    """Run the control channel over a connected Unix socket on the running loop."""
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    _, proto = await loop.connect_accepted_socket(
        lambda: ControlChannel(on_message, on_close), sock
    )
    return proto


def describe(msg: Any) -> str:
    """A message's tag, for logs (never its content: Init and Reload carry API keys)."""
    return type(msg).__name__.lower()
