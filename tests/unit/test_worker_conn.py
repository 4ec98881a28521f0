"""WorkerConnection (gateway/workers/conn.py) over a real socket and the real loop: ring
memory a transport still holds is never overwritten, and a slow reader receives exactly
the bytes that were published.

uvloop keeps a reference to the unsent tail of a written memoryview (the stdlib loop up to
Python 3.11 copies it): the worker must not release that ring space until the kernel took
it. The peer here has a tiny receive buffer and reads only when the test says so."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from gateway.auth import Authenticator
from gateway.connection import ClientConnection
from gateway.metrics import Metrics
from gateway.server import ServerState
from gateway.workers.conn import WorkerConnection
from gateway.workers.pins import PinTracker
from gateway.workers.ring import CHUNK, Ring, RingReader, RingWriter

RING = 1 << 20
ENTRY = 600 * 1024
FILLER = 300 * 1024


@dataclass
class Rig:
    ring: Ring
    writer: RingWriter
    reader: RingReader
    pins: PinTracker
    state: ServerState
    peer: socket.socket
    transport: asyncio.Transport

    def release(self) -> None:
        oldest = self.pins.sweep()
        pos = self.reader.pos if oldest is None else min(oldest, self.reader.pos)
        self.reader.release(pos)

    def publish(self, conn: ClientConnection) -> bytes:
        """One fresh random entry through the ring to ``conn``; its original bytes."""
        data = os.urandom(ENTRY)
        assert self.writer.try_write(CHUNK, data, records=1) is not None
        entry = self.reader.next()
        assert entry is not None
        self.pins.begin(entry.pos, entry.payload)
        conn.deliver(entry.payload, 1)
        self.pins.end()
        return data

    async def recv(self, n: int, upto: int) -> bytes:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(5):
            return await loop.sock_recv(self.peer, min(n, upto))


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    loop = asyncio.get_running_loop()
    ring = Ring.create(RING, 2)
    writer = RingWriter(ring)
    writer.set_live(0, True)
    pins = PinTracker.for_loop(loop)
    state = ServerState(
        version="t", authenticator=Authenticator([]), feeds={}, metrics=Metrics(), pins=pins
    )
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.setblocking(False)
    peer = socket.socket()
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    peer.setblocking(False)
    await loop.sock_connect(peer, listener.getsockname())
    server_side, _ = await loop.sock_accept(listener)
    listener.close()
    server_side.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, server_side)
    transport.set_write_buffer_limits(high=64 << 20)
    mapped = Ring.attach(ring.name, creator=os.getpid())  # read-only, as in a worker
    try:
        yield Rig(ring, writer, RingReader(mapped, 0), pins, state, peer, transport)
    finally:
        transport.abort()
        peer.close()
        mapped.close()
        ring.close()
        ring.unlink()


class Spy:
    """The real transport, with what was handed to ``write`` recorded."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self.real = transport
        self.written: list[object] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(data)
        self.real.write(data)

    def get_write_buffer_size(self) -> int:
        return self.real.get_write_buffer_size()


def connection(rig: Rig, cls: type[ClientConnection] = WorkerConnection) -> ClientConnection:
    conn = cls(rig.state)
    conn.transport = rig.transport
    return conn


async def test_slow_reader_gets_the_original_bytes_while_the_writer_waits_for_the_pin(rig):
    conn = connection(rig)
    original = rig.publish(conn)
    entry_pos = 0
    rig.release()
    if rig.pins.enabled:
        assert rig.transport.get_write_buffer_size() > 0  # the premise: uvloop kept a tail
        assert len(rig.pins) == 1
        assert rig.writer.release_of(0) == entry_pos
    else:
        assert len(rig.pins) == 0  # the stdlib loop copied: nothing to hold
        assert rig.writer.release_of(0) == rig.reader.pos
    fillers = [bytes([0xA0 + i]) * FILLER for i in range(3)]
    refused_while_held = 0
    received = bytearray()
    for _ in range(10_000):
        while fillers:
            if rig.writer.try_write(CHUNK, fillers[0]) is None:
                assert rig.writer.holders() == [0]
                refused_while_held += rig.transport.get_write_buffer_size() > 0
                break
            fillers.pop(0)
            rig.reader.next()  # the worker keeps up with the ring itself
            if rig.pins.enabled:
                assert rig.transport.get_write_buffer_size() == 0 or not _overlaps(rig)
        if len(received) == len(original):
            break
        received += await rig.recv(4096, len(original) - len(received))
        rig.release()
    assert bytes(received) == original
    if rig.pins.enabled:
        assert refused_while_held > 0
    rig.release()
    for filler in fillers:
        assert rig.writer.try_write(CHUNK, filler) is not None
        rig.reader.next()
    # the entry's space was reused afterwards: the test would have seen early reuse
    assert rig.writer.head > RING + 32
    assert rig.ring.data[64:96] != original[32:64]


def _overlaps(rig: Rig) -> bool:
    """The writer has reached the pinned entry's bytes (positions 0..ENTRY of lap 2)."""
    return rig.writer.head > RING


async def test_sessions_behind_get_a_shared_copy_not_the_view(rig):
    first, second = connection(rig), connection(rig)
    sent = rig.publish(first)  # fills the transport: both connections share it here
    if not rig.pins.enabled:
        assert len(rig.pins) == 0
        return
    assert rig.transport.get_write_buffer_size() > 0
    spy = Spy(rig.transport)
    first.transport = second.transport = spy  # type: ignore[assignment]
    written = spy.written
    data = os.urandom(FILLER)  # fits behind the pinned entry
    rig.release()
    assert rig.writer.release_of(0) == 0
    assert rig.writer.try_write(CHUNK, data) is not None
    entry = rig.reader.next()
    assert entry is not None
    rig.pins.begin(entry.pos, entry.payload)
    first.deliver(entry.payload, 1)
    second.deliver(entry.payload, 1)
    copy = rig.pins.copy_of_current()
    rig.pins.end()
    assert len(written) == 2 and all(w is copy for w in written)
    assert len(rig.pins) == 1  # only the first entry's fast-path write is pinned
    # drain the socket: what was sent is the original first entry, then the copies
    expected = sent + data + data
    received = bytearray()
    for _ in range(10_000):
        if len(received) == len(expected):
            break
        received += await rig.recv(65536, len(expected) - len(received))
    assert bytes(received) == expected


async def test_a_view_derived_from_the_entry_is_copied(rig):
    conn = connection(rig)
    spy = Spy(rig.transport)
    conn.transport = spy  # type: ignore[assignment]
    written = spy.written
    assert rig.writer.try_write(CHUNK, b"x" * 100) is not None
    entry = rig.reader.next()
    assert entry is not None
    rig.pins.begin(entry.pos, entry.payload)
    conn.deliver(entry.payload[:50], 1)
    rig.pins.end()
    if rig.pins.enabled:
        assert type(written[0]) is bytes and written[0] == b"x" * 50
    else:
        assert written[0] == b"x" * 50
    assert len(rig.pins) == 0


async def test_a_writable_view_of_a_fresh_copy_goes_out_as_it_is(rig):
    """The fan-out's filtered selections are views of fresh numpy gathers (writable):
    neither copied nor pinned."""
    conn = connection(rig)
    spy = Spy(rig.transport)
    conn.transport = spy  # type: ignore[assignment]
    assert rig.writer.try_write(CHUNK, b"y" * 64) is not None
    entry = rig.reader.next()
    assert entry is not None
    fresh = memoryview(bytearray(ENTRY))
    rig.pins.begin(entry.pos, entry.payload)
    conn.deliver(fresh, 1)
    rig.pins.end()
    assert spy.written[0] is fresh
    assert len(rig.pins) == 0


async def test_connection_lost_drops_its_pins(rig):
    conn = connection(rig)
    rig.publish(conn)
    expected = 1 if rig.pins.enabled else 0
    assert len(rig.pins) == expected
    conn.connection_lost(None)
    assert len(rig.pins) == 0


async def test_without_pins_the_loop_decides_what_the_peer_gets(rig):
    """Why the tracker exists: a plain ClientConnection releases at once; the writer then
    overwrites the entry. uvloop (which keeps the view) sends the new bytes; the stdlib
    loop up to 3.11 had copied them."""
    conn = connection(rig, ClientConnection)
    original = rig.publish(conn)
    rig.reader.release(rig.reader.pos)
    assert rig.writer.try_write(CHUNK, b"\xee" * FILLER) is not None
    assert rig.writer.try_write(CHUNK, b"\xee" * FILLER) is not None  # wraps over entry 0
    received = bytearray()
    for _ in range(10_000):
        if len(received) == len(original):
            break
        received += await rig.recv(65536, len(original) - len(received))
    assert (bytes(received) == original) == (not rig.pins.enabled)
