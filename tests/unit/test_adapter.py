"""The per-connection adapter (gateway.connection.ClientConnection) in-process, over real
sockets on 127.0.0.1 and the loop under test (GATEWAY_TEST_LOOP): it only moves what the
sans-I/O Session decides, arms one timer at ``Session.next_deadline()`` with
``loop.call_at`` (no polling tick is running here), pauses/resumes and counts."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import zstandard

from gateway import dbn
from gateway.auth import Authenticator, KeyEntry
from gateway.config import LimitsConfig, SlowReaderConfig
from gateway.connection import ClientConnection
from gateway.control import START_SESSION, cram_response, encode_auth, encode_subscription
from gateway.fanout import FanOut
from gateway.feeds import Feed
from gateway.metrics import Metrics
from gateway.server import ServerState, connection_factory
from gateway.session import State
from gateway.zstd_baseline import PerSessionZstdConnection
from tests.integration.helpers import apoll_until

KEY = "db-ADAPTERTESTKEY00000000000ABCDE"
DATASET = "TEST.ADAPTER"


def new_state(lossless: bool = False, **kwargs: Any) -> ServerState:
    entry = KeyEntry(key=KEY, key_id="adapter-key", datasets=None, max_sessions=1)
    feed = Feed(DATASET, fanout=FanOut(), backpressure=lossless)
    return ServerState(
        version="9.9.9",
        authenticator=Authenticator([entry]),
        feeds={DATASET: feed},
        metrics=Metrics(),
        **kwargs,
    )


def armed_at(conn: ClientConnection) -> float:
    """When the connection's one timer is due (``loop.call_at``)."""
    assert conn._timer is not None
    return conn._timer.when()


def sample(state: ServerState, name: str, **labels: str) -> float:
    return state.metrics.registry.get_sample_value(name, labels) or 0.0


class Client:
    """A raw client socket with a read buffer."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.eof = False

    async def _fill(self, until: Callable[[], bool], timeout: float) -> None:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            while not until():
                chunk = await loop.sock_recv(self.sock, 1 << 16)
                if not chunk:
                    self.eof = True
                    return
                self.buf += chunk

    async def line(self, timeout: float = 5.0) -> bytes:
        await self._fill(lambda: b"\n" in self.buf, timeout)
        nl = self.buf.index(b"\n")
        out = bytes(self.buf[:nl])
        del self.buf[: nl + 1]
        return out

    async def take(self, n: int, timeout: float = 5.0) -> bytes:
        await self._fill(lambda: len(self.buf) >= n, timeout)
        assert len(self.buf) >= n, (n, bytes(self.buf[:80]))
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def metadata(self) -> bytes:
        head = await self.take(8)
        assert head[:3] == b"DBN", head
        return head + await self.take(int.from_bytes(head[4:8], "little"))

    async def record(self, timeout: float = 5.0) -> bytes:
        first = await self.take(1, timeout)
        return first + await self.take(first[0] * 4 - 1, timeout)

    async def to_eof(self, timeout: float = 10.0) -> bytes:
        """Reads to the gateway's EOF, then sends ours (as a client that is done does)."""
        await self._fill(lambda: self.eof, timeout)
        assert self.eof
        with contextlib.suppress(OSError):  # already shut by the test
            self.sock.shutdown(socket.SHUT_WR)
        out = bytes(self.buf)
        self.buf.clear()
        return out

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)


def text_of(record: bytes) -> str:
    """The message of a SystemMsg or an ErrorMsg."""
    assert record[1] in (dbn.RTYPE_SYSTEM, dbn.RTYPE_ERROR), record[:2]
    return record[16:318].split(b"\0", 1)[0].decode()


@pytest.fixture
async def server() -> AsyncIterator[Callable[..., Any]]:
    """``await start(state)`` -> a function that connects a Client to ``state``'s listener."""
    servers: list[asyncio.Server] = []
    clients: list[socket.socket] = []
    states: list[ServerState] = []

    async def start(state: ServerState) -> Callable[[], Any]:
        loop = asyncio.get_running_loop()
        states.append(state)
        srv = await loop.create_server(connection_factory(state), "127.0.0.1", 0)
        servers.append(srv)
        port = srv.sockets[0].getsockname()[1]

        async def connect() -> tuple[Client, ClientConnection]:
            before = set(state.connections)
            sock = socket.socket()
            sock.setblocking(False)
            clients.append(sock)
            await loop.sock_connect(sock, ("127.0.0.1", port))
            new = await apoll_until(lambda: set(state.connections) - before, timeout=5)
            return Client(sock), next(iter(new))

        return connect

    yield start
    for sock in clients:
        sock.close()
    for srv in servers:
        srv.close()
    for state in states:
        for conn in list(state.connections):
            if conn.transport is not None:
                conn.transport.abort()
    await apoll_until(lambda: not any(s.connections for s in states), timeout=5)
    for srv in servers:
        await srv.wait_closed()


async def handshake(client: Client, **auth: Any) -> bytes:
    """Greeting, CRAM, auth; returns the reply line."""
    assert (await client.line()).startswith(b"lsg_version=")
    cram = await client.line()
    assert cram.startswith(b"cram=")
    key = auth.pop("key", KEY)
    client.send(encode_auth(cram_response(cram[5:].decode(), key), DATASET, **auth))
    return await client.line()


async def streaming(server: Any, state: ServerState) -> tuple[Client, ClientConnection]:
    """A client authenticated and started (its Metadata header read) on ``state``."""
    connect = await server(state)
    client, conn = await connect()
    assert (await handshake(client)).startswith(b"success=1")
    client.send(START_SESSION)
    await client.metadata()
    return client, conn


async def test_handshake_start_and_a_queued_subscription(server: Any) -> None:
    state = new_state()
    connect = await server(state)
    client, conn = await connect()
    reply = await handshake(client)
    assert reply.startswith(b"success=1|session_id=")
    assert state.unauthenticated == 0
    # A subscription before start_session waits in the Session: nothing is written yet.
    client.send(encode_subscription("trades", "ALL_SYMBOLS", sub_id=1))
    session = conn.session
    assert session is not None
    await apoll_until(lambda: session.subscriptions, timeout=5)
    assert not conn.metadata_sent
    assert state.feeds[DATASET].members == []
    assert client.buf == b""
    # start_session: the Metadata header, then the queued subscription's acknowledgement.
    client.send(START_SESSION)
    meta = await client.metadata()
    assert DATASET.encode() in meta
    ack = await client.record()
    assert text_of(ack) == "Subscription request 1 for trades data succeeded"
    assert conn.metadata_sent and session.state is State.STREAMING
    assert state.feeds[DATASET].members == [conn]
    # One more after start is answered at once.
    client.send(encode_subscription("mbo", "ALL_SYMBOLS", sub_id=2))
    assert text_of(await client.record()) == "Subscription request 2 for mbo data succeeded"


async def test_auth_failure_is_told_with_its_reason(server: Any) -> None:
    state = new_state()
    connect = await server(state)
    client, conn = await connect()
    reply = await handshake(client, key="db-WRONGKEYWRONGKEYWRONGKEYABCDE")
    assert reply == b"success=0|error=Authentication failed."
    assert await client.to_eof() == b""
    assert sample(state, "gateway_auth_failures_total", reason="bad_key") == 1
    assert sample(state, "gateway_limit_hits_total", limit="bad_key") == 0
    await apoll_until(lambda: not state.connections, timeout=5)
    assert state.unauthenticated == 0


async def test_session_limit_is_a_limit_hit_named_by_reason(server: Any) -> None:
    state = new_state()
    connect = await server(state)
    first, _ = await connect()
    assert (await handshake(first)).startswith(b"success=1")
    second, _ = await connect()
    reply = await handshake(second)
    assert reply.startswith(b"success=0|error=Connection limit exceeded")
    assert sample(state, "gateway_auth_failures_total", reason="session_limit") == 1
    assert sample(state, "gateway_limit_hits_total", limit="sessions_per_key") == 1


async def test_error_after_auth_gets_the_metadata_header_first(server: Any) -> None:
    state = new_state()
    connect = await server(state)
    client, conn = await connect()
    assert (await handshake(client)).startswith(b"success=1")
    client.send(b"schema=trades|stype_in=smart|symbols=ES.FUT|is_last=1\n")
    await client.metadata()
    err = await client.record()
    assert err[1] == dbn.RTYPE_ERROR and "stype_in=smart" in text_of(err)
    assert await client.to_eof() == b""
    await apoll_until(lambda: not state.connections, timeout=5)
    assert sample(state, "gateway_disconnects_total", reason="not_supported") == 1
    assert state.authenticator.entries[0].active == 0


async def test_handshake_timeout_fires_from_the_armed_timer(server: Any) -> None:
    state = new_state(limits=LimitsConfig(handshake_timeout_s=0.2))
    connect = await server(state)
    client, conn = await connect()
    session = conn.session
    assert session is not None
    assert armed_at(conn) == pytest.approx(session.next_deadline(), abs=0.002)
    await client.line()
    await client.line()
    assert await client.line() == b"success=0|error=authentication timed out"
    assert sample(state, "gateway_limit_hits_total", limit="handshake_timeout") == 1
    assert await client.to_eof() == b""


async def test_heartbeat_from_the_session_deadline(server: Any) -> None:
    state = new_state(default_heartbeat_s=0.3)
    client, conn = await streaming(server, state)
    session = conn.session
    assert session is not None
    due = session.next_deadline()
    assert due is not None and armed_at(conn) == pytest.approx(due, abs=0.002)
    loop = asyncio.get_running_loop()
    started = loop.time()
    beat = await client.record(timeout=5.0)
    assert text_of(beat) == "Heartbeat"
    assert loop.time() - started >= 0.2  # not before the interval (a tick of slack)
    assert sample(state, "gateway_heartbeats_total") >= 1
    # Re-armed for the next one, one interval after the heartbeat was written.
    nxt = session.next_deadline()
    assert nxt is not None and nxt > due and armed_at(conn) == pytest.approx(nxt, abs=0.002)
    assert text_of(await client.record(timeout=5.0)) == "Heartbeat"


async def test_a_write_postpones_the_heartbeat(server: Any) -> None:
    state = new_state(default_heartbeat_s=1.0)
    connect = await server(state)
    client, conn = await connect()
    assert (await handshake(client)).startswith(b"success=1")
    client.send(encode_subscription("trades", "ALL_SYMBOLS", sub_id=1) + START_SESSION)
    await client.metadata()
    await client.record()  # the acknowledgement
    session = conn.session
    assert session is not None
    first_due = session.next_deadline()
    assert first_due is not None
    # Writes keep the session from being idle: when the timer fires it moves the deadline
    # to a heartbeat interval after the last write instead of sending a heartbeat.
    loop = asyncio.get_running_loop()
    while loop.time() < first_due + 0.3:
        conn.send_gateway_records([dbn.encode_system(0, "busy", dbn.SystemCode.HEARTBEAT)])
        await asyncio.sleep(0.05)  # the pace of the writes under test, not a wait
    assert sample(state, "gateway_heartbeats_total") == 0
    later = session.next_deadline()
    assert later is not None and later > first_due


async def test_pause_and_resume_follow_the_transport(server: Any) -> None:
    slow = SlowReaderConfig(write_high_water=64 * 1024, write_low_water=16 * 1024)
    state = new_state(slow=slow, lossless=True)
    client, conn = await streaming(server, state)
    feed = state.feeds[DATASET]
    chunk = b"\x04" + b"\0" * 15  # a 16-byte record, as far as the socket cares
    for _ in range(1000):  # the client reads nothing meanwhile
        conn.deliver(chunk * 4096, 4096)
        if conn.paused:
            break
        await asyncio.sleep(0)
    assert conn.paused
    assert feed.paused  # a lossless feed waits for its blocked session
    await client._fill(lambda: not conn.paused, timeout=10.0)  # reading drains it
    assert not conn.paused
    assert not feed.paused


async def test_client_close_releases_everything(server: Any) -> None:
    state = new_state()
    client, conn = await streaming(server, state)
    entry = state.authenticator.entries[0]
    assert entry.active == 1 and conn._timer is not None
    client.sock.shutdown(socket.SHUT_WR)
    assert await client.to_eof() == b""
    await apoll_until(lambda: not state.connections, timeout=5)
    assert entry.active == 0
    assert conn._timer is None
    assert conn.session is not None and conn.session.state is State.CLOSED
    assert state.feeds[DATASET].members == []
    assert sample(state, "gateway_disconnects_total", reason="client_closed") == 1


async def test_shutdown_ends_a_session_with_an_error_msg(server: Any) -> None:
    state = new_state()
    client, conn = await streaming(server, state)
    conn.shutdown()
    err = await client.record()
    assert err[1] == dbn.RTYPE_ERROR and text_of(err) == "Gateway shutting down"
    assert err[318] == dbn.ErrorCode.INTERNAL_ERROR
    assert await client.to_eof() == b""
    await apoll_until(lambda: not state.connections, timeout=5)
    assert sample(state, "gateway_disconnects_total", reason="gateway_shutting_down") == 1


async def test_refused_connection_gets_the_reason(server: Any) -> None:
    state = new_state(limits=LimitsConfig(max_connections=1))
    connect = await server(state)
    first, _ = await connect()
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, state_port(state, first))
        second = Client(sock)
        assert await second.line() == b"success=0|error=too many connections to this gateway"
        assert sample(state, "gateway_limit_hits_total", limit="max_connections") == 1
    finally:
        sock.close()


def state_port(state: ServerState, client: Client) -> tuple[str, int]:
    """The listener's address, as the first client sees it."""
    host, port = client.sock.getpeername()[:2]
    return host, port


async def test_per_session_zstd_mode_compresses_its_own_stream(server: Any) -> None:
    state = new_state(zstd_per_session=True)
    connect = await server(state)
    client, conn = await connect()
    assert isinstance(conn, PerSessionZstdConnection)
    assert (await handshake(client, compression="zstd")).startswith(b"success=1")
    client.send(encode_subscription("trades", "ALL_SYMBOLS", sub_id=1) + START_SESSION)
    chunk = b"\x04" + bytes(range(15))
    await apoll_until(lambda: conn.metadata_sent, timeout=5)
    conn.deliver(chunk * 100, 100)
    stream = zstandard.ZstdDecompressor().decompressobj()
    plain = bytearray()

    async with asyncio.timeout(10):
        while not plain.endswith(chunk * 100):
            await client._fill(lambda: bool(client.buf), timeout=5.0)
            plain.extend(stream.decompress(bytes(client.buf)))
            client.buf.clear()
    assert plain[:3] == b"DBN"
    assert b"Subscription request 1 for trades data succeeded" in plain


def test_the_factory_picks_the_per_session_zstd_subclass_only_when_asked() -> None:
    assert connection_factory(new_state())().__class__ is ClientConnection
    bench = new_state(zstd_per_session=True)
    assert isinstance(connection_factory(bench)(), PerSessionZstdConnection)
    # The production send path has no per-session zstd branch at all.
    assert "_stream" not in ClientConnection.deliver.__code__.co_names


SKIPPED_TEXT = "Skipped {} records after slow reading"


async def test_a_client_leaving_while_skipping_is_told_what_it_missed(server: Any) -> None:
    # Nothing is lost silently: records skipped since the last notice are still told when
    # the client half-closes in the middle of a skip episode.
    state = new_state()
    client, conn = await streaming(server, state)
    conn.slow.skipped = conn.slow.skipped_total = 7  # a skip episode in progress
    client.sock.shutdown(socket.SHUT_WR)
    err = await client.record()
    assert err[1] == dbn.RTYPE_ERROR and text_of(err) == SKIPPED_TEXT.format(7)
    assert err[318] == dbn.ErrorCode.SKIPPED_RECORDS_AFTER_SLOW_READING
    assert await client.to_eof() == b""
    assert sample(state, "gateway_slow_reader_events_total", policy="skip", event="skipped") == 1


async def test_a_session_ended_while_skipping_is_told_before_the_reason(server: Any) -> None:
    state = new_state()
    client, conn = await streaming(server, state)
    conn.slow.skipped = conn.slow.skipped_total = 5
    conn.shutdown()
    told = await client.record()
    assert told[1] == dbn.RTYPE_ERROR and text_of(told) == SKIPPED_TEXT.format(5)
    err = await client.record()
    assert text_of(err) == "Gateway shutting down"
    assert await client.to_eof() == b""


async def test_a_cut_session_that_does_not_drain_is_reset_and_logged(
    server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # The final ErrorMsg of a cut waits behind what the client has not read; a client that
    # still has not read it after cut_grace_s is reset (never a clean end), and the log
    # says so, so that an operator (and the soak) can tell a reset from a drained cut.
    state = new_state(slow=SlowReaderConfig(cut_grace_s=0.2))
    client, conn = await streaming(server, state)
    chunk = b"\x04" + b"\0" * 15
    for _ in range(1000):  # the client reads nothing: fill its socket and our buffer
        conn.deliver(chunk * 4096, 4096)
        transport = conn.transport
        if transport is not None and transport.get_write_buffer_size() > 256 * 1024:
            break
        await asyncio.sleep(0)
    with caplog.at_level("WARNING", logger="gateway.session"):
        conn.cut("slow_reader_cap", "slow reader: over the cap; disconnecting")
        assert await apoll_until(
            lambda: any("session reset" in r.getMessage() for r in caplog.records), timeout=10
        )
    line = next(r.getMessage() for r in caplog.records if "session reset" in r.getMessage())
    assert f"session_id={conn.session_id}" in line and "reason=cut_not_drained" in line
    with pytest.raises(ConnectionResetError):  # not a clean EOF
        await client._fill(lambda: False, timeout=10.0)
