"""PinTracker (gateway/workers/pins.py): which connections' transports still hold ring
memory, and the oldest position the worker must keep."""

from __future__ import annotations

import asyncio
import sys

import pytest

from gateway.workers.pins import PinTracker, loop_keeps_references
from tests.conftest import TEST_LOOP


class FakeTransport:
    def __init__(self) -> None:
        self.buffered = 0

    def get_write_buffer_size(self) -> int:
        return self.buffered


class Conn:
    def __init__(self) -> None:
        self.transport: FakeTransport | None = FakeTransport()
        self.bytes_sent = 0

    def write(self, n: int, kept: int) -> None:
        """n bytes written, of which the transport kept ``kept`` more than it had."""
        self.bytes_sent += n
        assert self.transport is not None
        self.transport.buffered += kept

    def drain(self, n: int) -> None:
        assert self.transport is not None
        self.transport.buffered -= n


def test_a_pin_holds_until_the_transport_sent_that_entry():
    pins = PinTracker(enabled=True)
    a = Conn()
    a.write(1000, kept=600)  # entry at 100: 600 of its 1000 bytes queued
    pins.note(a, 100, a.bytes_sent)
    a.write(500, kept=500)  # a later entry (a copy, not pinned) queued behind it
    assert pins.sweep() == 100
    a.drain(599)
    assert pins.sweep() == 100  # one byte of the entry is still queued
    assert pins.older_than(101) == [a] and pins.older_than(100) == []
    a.drain(1)
    assert pins.sweep() is None  # what is left queued was written after the entry
    assert len(pins) == 0


def test_oldest_pin_over_several_connections_and_entries():
    pins = PinTracker(enabled=True)
    a, b = Conn(), Conn()
    a.write(100, kept=50)
    pins.note(a, 10, a.bytes_sent)
    b.write(100, kept=100)
    pins.note(b, 10, b.bytes_sent)
    a.write(100, kept=100)
    pins.note(a, 20, a.bytes_sent)
    assert pins.sweep() == 10
    a.drain(50)  # a's first entry sent, its second still queued
    assert pins.sweep() == 10  # b still holds 10
    assert set(map(id, pins.older_than(20))) == {id(b)}
    pins.drop(b)  # connection_lost
    assert pins.sweep() == 20
    a.drain(100)
    assert pins.sweep() is None


def test_a_connection_without_transport_holds_nothing():
    pins = PinTracker(enabled=True)
    a = Conn()
    a.write(10, kept=10)
    pins.note(a, 5, a.bytes_sent)
    a.transport = None
    assert pins.sweep() is None and len(pins) == 0


def test_copy_of_current_is_one_copy_per_entry():
    pins = PinTracker(enabled=True)
    with pytest.raises(RuntimeError):
        pins.copy_of_current()
    area = bytearray(b"abcdef")
    view = memoryview(area)[1:4]
    pins.begin(7, view)
    first = pins.copy_of_current()
    assert first == b"bcd" and pins.copy_of_current() is first
    pins.end()
    assert (pins.current_pos, pins.current_view) == (-1, None)
    pins.begin(8, memoryview(area)[2:5])
    assert pins.copy_of_current() == b"cde"


def test_enabled_where_the_loop_keeps_references():
    loop = asyncio.new_event_loop()
    try:
        assert loop_keeps_references(loop) == (sys.version_info >= (3, 12))
    finally:
        loop.close()
    import uvloop

    loop = uvloop.new_event_loop()
    try:
        assert loop_keeps_references(loop)
        assert PinTracker.for_loop(loop).enabled
    finally:
        loop.close()


async def test_for_the_running_test_loop():
    pins = PinTracker.for_loop(asyncio.get_running_loop())
    if sys.version_info < (3, 12):
        assert pins.enabled == (TEST_LOOP == "uvloop")


def test_floors_keep_the_rings_of_different_datasets_apart():
    pins = PinTracker(enabled=True)
    a, b, c = Conn(), Conn(), Conn()
    view = memoryview(b"xyz")
    pins.begin(5000, view, key="A")
    a.write(10, kept=10)
    pins.note(a, pins.current_pos, a.bytes_sent)
    pins.end()
    pins.begin(70, view, key="B")
    b.write(10, kept=10)
    pins.note(b, pins.current_pos, b.bytes_sent)
    pins.end()
    pins.begin(90, view, key="B")
    c.write(10, kept=10)
    pins.note(c, pins.current_pos, c.bytes_sent)
    pins.end()
    assert pins.current_key is None
    assert pins.sweep() == 70
    assert pins.floors == {"A": 5000, "B": 70}
    assert pins.older_than(6000, key="B") == [b, c]
    assert pins.older_than(6000, key="A") == [a]
    assert pins.older_than(80) == [b]
    b.drain(10)
    assert pins.sweep() == 90 and pins.floors == {"A": 5000, "B": 90}
    pins.drop(a)
    assert pins.sweep() == 90 and pins.floors == {"B": 90}
