"""The lingering close (gateway.linger.LingeringClose) over a real socketpair, on the loop
under test (GATEWAY_TEST_LOOP): what is buffered goes out before the FIN, the FIN waits for the
client's start_session (or quiet), late client bytes are discarded, everything is bounded."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway import linger as linger_module
from gateway.linger import LingeringClose as _Linger
from tests.integration.helpers import apoll_until


class _Conn:
    """Stands for the ClientConnection: counts connection_lost."""

    def __init__(self) -> None:
        self.lost: list[Exception | None] = []

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.append(exc)


class _Plain(asyncio.Protocol):
    def connection_made(self, transport: Any) -> None:
        self.transport = transport


@pytest.fixture
async def pair() -> AsyncIterator[tuple[asyncio.Transport, socket.socket]]:
    """(server transport, client socket)."""
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    loop = asyncio.get_running_loop()
    transport, _ = await loop.connect_accepted_socket(_Plain, ours)
    try:
        yield transport, theirs
    finally:
        transport.abort()
        theirs.close()


async def _read_to_eof(sock: socket.socket, timeout: float = 10.0) -> bytes:
    loop = asyncio.get_running_loop()
    out = bytearray()
    async with asyncio.timeout(timeout):
        while chunk := await loop.sock_recv(sock, 1 << 16):
            out += chunk
    return bytes(out)


async def _no_eof_for(sock: socket.socket, seconds: float) -> bool:
    """Nothing (in particular no EOF) arrives within ``seconds``."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(seconds):
            await loop.sock_recv(sock, 1)
    except TimeoutError:
        return True
    return False


async def test_buffered_data_goes_out_before_the_fin(pair: Any) -> None:
    transport, client = pair
    payload = bytes(range(256)) * (16 * 1024)  # 4 MiB: far more than the socket buffers
    transport.write(payload)
    assert transport.get_write_buffer_size() > 0
    conn = _Conn()
    transport.set_protocol(_Linger(conn, transport, fin_now=True))  # type: ignore[arg-type]
    assert await _read_to_eof(client) == payload
    client.shutdown(socket.SHUT_WR)  # the client's EOF ends the linger at once
    assert await apoll_until(lambda: conn.lost == [None])


async def test_the_fin_waits_for_start_session_and_late_bytes_are_discarded(
    pair: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(linger_module, "LINGER_QUIET_S", 60.0)
    monkeypatch.setattr(linger_module, "LINGER_FIN_MAX_S", 60.0)
    transport, client = pair
    loop = asyncio.get_running_loop()
    transport.write(b"the error\n")
    conn = _Conn()
    linger = _Linger(conn, transport, fin_now=False)  # type: ignore[arg-type]
    transport.set_protocol(linger)
    await loop.sock_sendall(client, b"schema=trades|symbols=A\n" * 1000)
    assert await loop.sock_recv(client, 100) == b"the error\n"
    assert await _no_eof_for(client, 0.3)  # still subscribing: the write side stays open
    await loop.sock_sendall(client, b"schema=trades|symbols=B\nstart_se")
    assert await apoll_until(lambda: linger.discarded >= 24_000 + 32)
    assert not linger.fin_sent
    await loop.sock_sendall(client, b"ssion\n")  # split across reads: still seen
    assert await _read_to_eof(client) == b""
    assert linger.fin_sent and linger.discarded == 24_000 + 24 + 8 + 6
    assert conn.lost == []  # it keeps reading until the client's EOF (or the bound)
    client.shutdown(socket.SHUT_WR)
    assert await apoll_until(lambda: conn.lost == [None])


async def test_the_fin_comes_when_the_client_is_quiet(
    pair: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(linger_module, "LINGER_QUIET_S", 0.05)
    monkeypatch.setattr(linger_module, "LINGER_FIN_MAX_S", 60.0)
    monkeypatch.setattr(linger_module, "LINGER_DRAIN_S", 0.2)
    transport, client = pair
    conn = _Conn()
    transport.set_protocol(_Linger(conn, transport, fin_now=False))  # type: ignore[arg-type]
    assert await _read_to_eof(client) == b""
    # The client never closes: the connection is closed after LINGER_DRAIN_S anyway.
    assert await apoll_until(lambda: conn.lost == [None])


async def test_a_client_that_keeps_sending_is_cut_off_at_the_byte_bound(
    pair: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(linger_module, "LINGER_MAX_BYTES", 10_000)
    transport, client = pair
    conn = _Conn()
    linger = _Linger(conn, transport, fin_now=True)  # type: ignore[arg-type]
    transport.set_protocol(linger)
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(client, b"x" * 20_000)
    assert await apoll_until(lambda: len(conn.lost) == 1)
    assert linger.discarded > 10_000


class _GoneTransport:
    """A transport whose peer has already reset: the stdlib loop's write_eof shuts the
    socket down at once when nothing is buffered, and that raises ENOTCONN."""

    def __init__(self) -> None:
        self.closed = False

    def is_closing(self) -> bool:
        return self.closed

    def write_eof(self) -> None:
        raise OSError(107, "Transport endpoint is not connected")

    def close(self) -> None:
        self.closed = True


async def test_a_peer_already_gone_is_closed_not_raised() -> None:
    # Shutdown ends every session with a lingering close in one loop: one peer that has
    # just reset must not raise out of it (and stop the others from being told).
    transport = _GoneTransport()
    linger = _Linger(_Conn(), transport, fin_now=True)  # type: ignore[arg-type]
    assert linger.fin_sent and transport.closed
