"""``gateway.replay.pump.ReplayPump`` over real loopback TCP, under the loop under test
(GATEWAY_TEST_LOOP): the server side is an asyncio transport from ``loop.create_server``,
the client a plain non-blocking socket the test reads (or does not read) itself."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest

from gateway.replay import pump as pump_module
from gateway.replay.pump import ReplayPump

MiB = 1 << 20
DEADLINE_S = 20.0


class _ServerSide(asyncio.Protocol):
    def __init__(self, made: asyncio.Future[asyncio.Transport]) -> None:
        self.made = made
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made.set_result(cast(asyncio.Transport, transport))  # uvloop's is no subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True


@dataclass
class Link:
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    protocol: _ServerSide
    client: socket.socket
    written: dict[str, int] = field(default_factory=lambda: {"sendfile": 0, "copy": 0})
    errors: list[BaseException] = field(default_factory=list)
    loop_errors: list[dict[str, Any]] = field(default_factory=list)

    def pump(self, refill: Callable[[], bool] = lambda: False, step: int = 1 << 20) -> ReplayPump:
        def written(n: int, path: str) -> None:
            self.written[path] += n

        return ReplayPump(
            self.transport,
            step_bytes=step,
            on_written=written,
            on_error=self.errors.append,
            refill=refill,
        )

    async def read(self, n: int, chunk: int = MiB) -> bytes:
        out = bytearray()
        async with asyncio.timeout(DEADLINE_S):
            while len(out) < n:
                data = await self.loop.sock_recv(self.client, min(chunk, n - len(out)))
                assert data, f"the connection ended after {len(out)} of {n} bytes"
                out += data
        return bytes(out)

    def socket_links(self) -> int:
        """How many fds of this process refer to the server side's socket."""
        return _links(self.inode)

    @property
    def inode(self) -> int:
        return int(self.__dict__["_inode"])


def _links(inode: int) -> int:
    want = f"socket:[{inode}]"
    count = 0
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{name}") == want
    return count


@contextlib.asynccontextmanager
async def link(rcvbuf: int = 0, sndbuf: int = 0) -> AsyncIterator[Link]:
    loop = asyncio.get_running_loop()
    made: asyncio.Future[asyncio.Transport] = loop.create_future()
    protocol = _ServerSide(made)
    server = await loop.create_server(lambda: protocol, "127.0.0.1", 0)
    client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if rcvbuf:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        client.setblocking(False)
        await loop.sock_connect(client, server.sockets[0].getsockname())
        async with asyncio.timeout(DEADLINE_S):
            transport = await made
        sock = transport.get_extra_info("socket")
        if sndbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        lk = Link(loop, transport, protocol, client)
        lk.__dict__["_inode"] = os.fstat(sock.fileno()).st_ino
        loop.set_exception_handler(lambda _loop, ctx: lk.loop_errors.append(ctx))
        yield lk
        assert lk.loop_errors == [], lk.loop_errors
    finally:
        loop.set_exception_handler(None)
        client.close()
        server.close()
        if made.done() and not made.result().is_closing():
            made.result().abort()
        await server.wait_closed()
        await asyncio.sleep(0)


async def until(predicate: Callable[[], object], what: str, timeout: float = DEADLINE_S) -> None:
    """Poll on the loop (a zero sleep: every loop turn) until ``predicate`` holds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0)


def journal_file(tmp_path: Path, size: int) -> tuple[int, bytes]:
    data = os.urandom(size)
    path = tmp_path / "rt-00.dbn"
    path.write_bytes(data)
    return os.open(path, os.O_RDONLY), data


async def test_ranges_and_bytes_arrive_in_order_then_the_handover_call(tmp_path: Path) -> None:
    fd, data = journal_file(tmp_path, 6 * MiB)
    try:
        async with link() as lk:
            seen: list[tuple[int, int]] = []
            ranges = [(0, 2 * MiB), (2 * MiB, 3 * MiB + 12345), (5 * MiB + 12345, MiB - 12345)]
            plan: list[Callable[[ReplayPump], None]] = [
                lambda p: p.push_file(fd, *ranges[0]),
                lambda p: p.push_bytes(b"between-1"),
                lambda p: p.push_file(fd, *ranges[1]),
                lambda p: p.push_bytes(memoryview(b"xxbetween-2")[2:]),
                lambda p: p.push_file(fd, *ranges[2]),
                lambda p: p.push_call(lambda: seen.append((p.bytes_sendfile, p.bytes_copied))),
                lambda p: p.push_bytes(b"after"),
            ]

            def refill() -> bool:
                if plan:
                    plan.pop(0)(pump)
                return bool(plan)

            pump = lk.pump(refill, step=512 << 10)
            pump.push_bytes(b"before")
            expected = b"before" + data[: 2 * MiB] + b"between-1" + data[2 * MiB : 5 * MiB + 12345]
            expected += b"between-2" + data[5 * MiB + 12345 :] + b"after"
            got = await lk.read(len(expected))
            assert got == expected
            copied = len(b"before" + b"between-1" + b"between-2")
            assert seen == [(6 * MiB, copied)]  # the call ran once all before it was handed over
            await until(lambda: not pump.busy, "the pump to idle")
            assert lk.written == {"sendfile": 6 * MiB, "copy": copied + len(b"after")}

            # Idle until kicked; the hand-over call closes the pump and writes directly.
            refills = pump.refills
            plan.append(lambda p: p.push_file(fd, 0, 1000))
            plan.append(lambda p: p.push_call(handover))

            def handover() -> None:
                pump.close()
                lk.transport.write(b"live")

            pump.kick()
            assert await lk.read(1004) == data[:1000] + b"live"
            assert pump.closed and not pump.busy and pump.refills > refills
            assert lk.errors == [] and not lk.transport.is_closing()
    finally:
        os.close(fd)


async def test_slow_reader_gets_everything_and_the_pump_waits(tmp_path: Path) -> None:
    fd, data = journal_file(tmp_path, 2 * MiB)
    try:
        async with link(rcvbuf=4096, sndbuf=8192) as lk:
            pump = lk.pump(step=256 << 10)
            pump.push_file(fd, 0, MiB)
            pump.push_bytes(b"m" * (64 << 10))  # fills the transport's buffer: waits to drain
            pump.push_file(fd, MiB, MiB)
            expected = data[:MiB] + b"m" * (64 << 10) + data[MiB:]
            got = bytearray()
            reads = 0
            async with asyncio.timeout(DEADLINE_S):
                while len(got) < len(expected):
                    # Read only once the pump waits for room (or has handed everything over).
                    await until(lambda: pump.waiting or not pump.busy, "the pump to wait")
                    got += await lk.loop.sock_recv(lk.client, 32 << 10)
                    reads += 1
            assert bytes(got) == expected
            assert pump.wakeups > 0  # it waited for writability ...
            assert pump.turns <= 2 * reads + 20  # ... rather than spinning
            assert pump.refills <= pump.turns
            assert lk.written == {"sendfile": 2 * MiB, "copy": 64 << 10}
            pump.close()
    finally:
        os.close(fd)


async def test_range_behind_a_full_transport_buffer_keeps_order(tmp_path: Path) -> None:
    fd, data = journal_file(tmp_path, MiB)
    try:
        async with link() as lk:
            first = bytes(range(256)) * (16 << 10)  # 4 MiB through the transport first
            lk.transport.write(first)
            assert lk.transport.get_write_buffer_size() > 0
            pump = lk.pump()
            pump.push_file(fd, 0, MiB)
            pump.push_bytes(b"tail")
            got = await lk.read(len(first) + MiB + 4)
            assert got == first + data + b"tail"
            assert lk.written == {"sendfile": MiB, "copy": 4}
            pump.close()
    finally:
        os.close(fd)


async def test_sendfile_is_what_sends_the_ranges(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fd, data = journal_file(tmp_path, 3 * MiB)
    calls: list[int] = []
    real = os.sendfile

    def counting(out_fd: int, in_fd: int, offset: int | None, count: int) -> int:
        sent = real(out_fd, in_fd, offset, count)
        calls.append(sent)
        return sent

    # the pump calls os.sendfile through the os module it imported (the syscall wrapper)
    monkeypatch.setattr(pump_module.os, "sendfile", counting)  # type: ignore[attr-defined]
    try:
        async with link() as lk:
            pump = lk.pump(step=MiB)
            pump.push_bytes(b"head")
            pump.push_file(fd, 0, 2 * MiB)
            pump.push_bytes(b"mid")
            pump.push_file(fd, 2 * MiB, MiB)
            got = await lk.read(3 * MiB + 7)
            assert got == b"head" + data[: 2 * MiB] + b"mid" + data[2 * MiB :]
            assert len(calls) > 0 and sum(calls) == 3 * MiB
            assert lk.written == {"sendfile": 3 * MiB, "copy": 7}
            assert (pump.bytes_sendfile, pump.bytes_copied) == (3 * MiB, 7)
            pump.close()
    finally:
        os.close(fd)


async def test_other_callbacks_run_between_steps_of_a_large_range(tmp_path: Path) -> None:
    fd, data = journal_file(tmp_path, 4 * MiB)
    step = 256 << 10
    try:
        async with link() as lk:
            events: list[int] = []  # bytes handed over; 0 = the test's own callback ran
            done = False

            def tick() -> None:
                events.append(0)
                if not done:
                    lk.loop.call_soon(tick)

            pump = ReplayPump(
                lk.transport,
                step_bytes=step,
                on_written=lambda n, _path: events.append(n),
                on_error=lk.errors.append,
                refill=lambda: False,
            )
            pump.push_file(fd, 0, 4 * MiB)
            lk.loop.call_soon(tick)
            try:
                assert await lk.read(4 * MiB) == data
            finally:
                done = True
            runs: list[int] = [0]
            for n in events:
                if n:
                    runs[-1] += n
                elif runs[-1]:
                    runs.append(0)
            assert max(runs) <= step  # never more than step_bytes without the loop moving on
            assert len([r for r in runs if r]) >= 4 * MiB // step
            pump.close()
    finally:
        os.close(fd)


@pytest.mark.parametrize("reading", [True, False], ids=["reading", "paused_reading"])
async def test_peer_reset_mid_range_reports_once_and_lets_the_socket_go(
    tmp_path: Path, reading: bool
) -> None:
    # paused_reading: only the pump's writer sees the reset (an error event on its dup)
    fd, _ = journal_file(tmp_path, 4 * MiB)
    try:
        async with link(rcvbuf=4096, sndbuf=8192) as lk:
            if not reading:
                lk.transport.pause_reading()
            pump = lk.pump()
            pump.push_file(fd, 0, 4 * MiB)
            await until(lambda: pump.waiting and pump.bytes_sendfile > 0, "a partly sent range")
            assert lk.socket_links() == 2  # the transport's fd and the pump's dup
            lk.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            lk.client.close()  # RST
            await until(lambda: lk.errors, "on_error")
            assert len(lk.errors) == 1 and isinstance(lk.errors[0], OSError), lk.errors
            assert pump.closed and not pump.waiting and pump.error is lk.errors[0]
            assert lk.socket_links() <= 1  # the dup is closed
            if not reading:
                lk.transport.resume_reading()
            await until(lambda: lk.protocol.lost, "the transport to close")
            assert lk.socket_links() == 0  # nothing of ours holds the socket open
            pump.close()  # idempotent, and no second report
            pump.push_file(fd, 0, 10)
            pump.kick()
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            assert len(lk.errors) == 1
    finally:
        os.close(fd)


async def test_close_while_waiting_removes_the_writer(tmp_path: Path) -> None:
    fd, data = journal_file(tmp_path, 4 * MiB)
    try:
        async with link(rcvbuf=4096, sndbuf=8192) as lk:
            pump = lk.pump()
            pump.push_file(fd, 0, 4 * MiB)
            pump.push_bytes(b"never")
            await until(lambda: pump.waiting, "the pump to wait")
            sent, wakeups, turns = pump.bytes_sendfile, pump.wakeups, pump.turns
            pump.close()
            pump.close()
            assert pump.closed and not pump.waiting and not pump.busy
            assert lk.socket_links() == 1  # the dup is closed; the transport's fd stays
            assert not lk.transport.is_closing()
            lk.transport.write(b"after")  # the transport is the connection's again
            assert await lk.read(sent + 5, chunk=16 << 10) == data[:sent] + b"after"
            for _ in range(5):  # the socket is writable now: nothing of the pump's may run
                await asyncio.sleep(0)
            assert (pump.wakeups, pump.turns, lk.errors) == (wakeups, turns, [])
    finally:
        os.close(fd)


async def test_a_file_shorter_than_its_range_is_an_error(tmp_path: Path) -> None:
    fd, data = journal_file(tmp_path, 1000)
    try:
        async with link() as lk:
            pump = lk.pump()
            pump.push_file(fd, 0, 2000)
            pump.push_bytes(b"dropped")
            await until(lambda: lk.errors, "on_error")
            assert isinstance(lk.errors[0], EOFError) and pump.closed
            assert await lk.read(1000) == data
            assert lk.socket_links() == 1 and not lk.transport.is_closing()
    finally:
        os.close(fd)


async def test_a_failing_call_stops_the_pump_without_raising_into_the_loop() -> None:
    async with link() as lk:
        pump = lk.pump()

        def boom() -> None:
            raise RuntimeError("producer bug")

        pump.push_call(boom)
        pump.push_bytes(b"dropped")
        await until(lambda: lk.errors, "on_error")
        assert [type(e) for e in lk.errors] == [RuntimeError] and pump.closed
        assert lk.written == {"sendfile": 0, "copy": 0}


async def test_copies_wait_for_a_slow_reader_memory_stays_bounded() -> None:
    step = 128 << 10
    piece = bytes(range(256)) * 256  # 64 KiB
    total = 64  # 4 MiB in all, pushed only as the pump asks
    pushed = 0
    async with link(rcvbuf=4096, sndbuf=8192) as lk:

        def refill() -> bool:
            nonlocal pushed
            if pushed < total:
                pushed += 1
                pump.push_bytes(piece)
            return pushed < total

        pump = lk.pump(refill, step=step)
        await until(lambda: pump.waiting, "the pump to wait for the reader")
        for _ in range(5):  # the reader reads nothing: the pump stays put
            await asyncio.sleep(0)
        assert pump.waiting and pushed < 8
        assert lk.transport.get_write_buffer_size() <= step + len(piece)
        got = bytearray()
        high = 0
        async with asyncio.timeout(DEADLINE_S):
            while len(got) < total * len(piece):
                await until(lambda: pump.waiting or not pump.busy, "the pump to wait")
                high = max(high, lk.transport.get_write_buffer_size())
                got += await lk.loop.sock_recv(lk.client, 64 << 10)
        assert bytes(got) == piece * total
        assert high <= step + len(piece)
        assert lk.written == {"sendfile": 0, "copy": total * len(piece)}
        pump.close()
