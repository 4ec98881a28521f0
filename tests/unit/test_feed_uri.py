"""Feed URIs (gateway/feeds/__init__.py) and the feed sources' own guards, in process:
option validation naming the bad option, the ingest allow-list check, the ingest idle clock
(paused by back-pressure), refusal counters, and file / synthetic feeds that fail visibly."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from pathlib import Path
from typing import cast

import pytest

from gateway.dbn import encode_publisher_metadata
from gateway.errors import ConfigError, DbnError
from gateway.fanout import FanOut
from gateway.feeds import build_source, parse_feed_uri
from gateway.feeds.base import Feed
from gateway.feeds.file import FileSource, public_reason
from gateway.feeds.ingest import DEFAULT_ALLOW, IngestSource, address_allowed, parse_allow
from gateway.feeds.synthetic import MAX_RATE, SyntheticOptions, SyntheticSource
from gateway.subscriptions import FeedMember
from tests.integration.helpers import apoll_until

# --- URI parsing ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "named"),
    [
        ("ingest://127.0.0.1:99999", "port"),
        ("ingest://127.0.0.1:-1", "port"),
        ("ingest://127.0.0.1:http", "port"),
        ("ingest://127.0.0.1", "HOST:PORT"),
        ("ingest://127.0.0.1:0?idle_timeout_s=0", "idle_timeout_s"),
        ("ingest://127.0.0.1:0?idle_timeout_s=-3", "idle_timeout_s"),
        ("ingest://127.0.0.1:0?idle_timeout_s=nan", "idle_timeout_s"),
        ("ingest://127.0.0.1:0?idle_timeout_s=inf", "idle_timeout_s"),
        ("ingest://127.0.0.1:0?idle_timeout_s=1e9", "idle_timeout_s"),
        ("ingest://127.0.0.1:0?idle_timeout_s=soon", "idle_timeout_s"),
        ("ingest://127.0.0.1:0?idle_timeout_s=", "idle_timeout_s"),
        ("ingest://127.0.0.1:0?allow=", "allow"),
        ("ingest://127.0.0.1:0?allow=localhost", "allow"),
        ("ingest://127.0.0.1:0?allow=10.0.0.0/33", "allow"),
        ("ingest://127.0.0.1:0?allow=10.0.0.1/8", "allow"),  # host bits set
        ("ingest://127.0.0.1:0?allow=10.0.0.0/8,,::1", "allow"),
        ("ingest://127.0.0.1:0?allow=300.1.2.3", "allow"),
        ("synthetic:?rate=nan", "rate"),
        ("synthetic:?rate=inf", "rate"),
        ("synthetic:?rate=1e12", "rate"),
        ("synthetic:?rate=-1", "rate"),
        ("synthetic:?rate=fast", "rate"),
        ("synthetic:?instruments=0", "instruments"),
        ("synthetic:?instruments=1.5", "instruments"),
        ("synthetic:?seed=-1", "seed"),
        ("file:/x.dbn?pace=nan", "pace"),
        ("file:/x.dbn?pace=0", "pace"),
    ],
)
def test_bad_option_is_a_config_error_naming_it(uri: str, named: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_feed_uri("X.FEED", uri)
    assert named in str(err.value)
    assert "feeds.X.FEED" in str(err.value)
    assert "unknown option" not in str(err.value)


def test_ingest_defaults_idle_timeout_30_and_loopback_only() -> None:
    spec = parse_feed_uri("X", "ingest://127.0.0.1:14000")
    assert spec.idle_timeout_s == 30.0
    assert spec.allow == DEFAULT_ALLOW
    assert {str(n) for n in spec.allow} == {"127.0.0.0/8", "::1/128"}


def test_ingest_options_are_parsed() -> None:
    spec = parse_feed_uri(
        "X", "ingest://0.0.0.0:0?idle_timeout_s=2.5&allow=10.0.0.0/8,192.168.1.7,fd00::/8"
    )
    assert spec.port == 0 and spec.host == "0.0.0.0"
    assert spec.idle_timeout_s == 2.5
    assert spec.allow == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("192.168.1.7/32"),
        ipaddress.ip_network("fd00::/8"),
    )
    assert parse_feed_uri("X", "ingest://[::1]:14000").host == "::1"


def test_synthetic_rate_bound_is_inclusive() -> None:
    spec = parse_feed_uri("X", f"synthetic:?rate={MAX_RATE}")
    assert spec.synthetic is not None and spec.synthetic.rate == MAX_RATE
    assert MAX_RATE == 1_000_000
    with pytest.raises(ConfigError, match="rate"):
        parse_feed_uri("X", f"synthetic:?rate={MAX_RATE + 1}")


def test_parse_allow_and_address_check() -> None:
    nets = parse_allow("10.0.0.0/8, ::1")
    assert address_allowed("10.200.3.4", nets)
    assert address_allowed("::ffff:10.1.2.3", nets)  # a dual-stack listener's view
    assert address_allowed("::1", nets)
    assert not address_allowed("127.0.0.1", nets)
    assert not address_allowed("11.0.0.1", nets)
    assert not address_allowed("not-an-address", nets)
    assert not address_allowed("", nets)
    assert address_allowed("fe80::1%eth0", parse_allow("fe80::/10"))
    for addr in ("127.0.0.1", "127.9.8.7", "::1", "::ffff:127.0.0.1"):
        assert address_allowed(addr, DEFAULT_ALLOW), addr
    for addr in ("10.0.0.1", "192.168.0.1", "::2", "0.0.0.0"):
        assert not address_allowed(addr, DEFAULT_ALLOW), addr
    with pytest.raises(ValueError, match="10.0.0.1/8"):
        parse_allow("10.0.0.1/8")


def test_build_source_passes_the_ingest_options() -> None:
    spec = parse_feed_uri("X", "ingest://127.0.0.1:0?idle_timeout_s=4&allow=10.0.0.0/8")
    source = build_source(spec, Feed("X"))
    assert isinstance(source, IngestSource)
    assert source.idle_timeout_s == 4.0
    assert source.allow == (ipaddress.ip_network("10.0.0.0/8"),)


# --- ingest guards over real sockets, in process --------------------------------------


async def _closed(reader: asyncio.StreamReader, timeout: float) -> bool:
    try:
        return await asyncio.wait_for(reader.read(100), timeout) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


async def test_refused_address_is_counted_and_closed_without_a_state_change() -> None:
    feed = Feed("ING.U")
    source = IngestSource(feed, "127.0.0.1", 0, allow=parse_allow("10.0.0.0/8"))
    await source.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", source.port)
        assert await _closed(reader, 5)
        writer.close()
        assert source.refused == 1 and source.publishers_seen == 0 and source.active is None
        assert not feed.connected and feed.state_detail == "waiting for a publisher"
    finally:
        await source.stop()


async def test_publisher_socket_gets_tcp_keepalive() -> None:
    feed = Feed("ING.K")
    source = IngestSource(feed, "127.0.0.1", 0)
    await source.start()
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", source.port)
        assert await apoll_until(lambda: source.active is not None)
        assert source.active is not None and source.active.transport is not None
        sock = source.active.transport.get_extra_info("socket")
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        if hasattr(socket, "TCP_KEEPIDLE"):
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 10
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 5
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3
        writer.close()
    finally:
        await source.stop()


async def test_idle_clock_stops_while_backpressure_pauses_the_publisher() -> None:
    feed = Feed("ING.P", fanout=FanOut(), backpressure=True)
    source = IngestSource(feed, "127.0.0.1", 0, idle_timeout_s=0.3)
    await source.start()
    blocker = cast("FeedMember", object())  # a stand-in: only its identity matters
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", source.port)
        writer.write(encode_publisher_metadata("ING.P", time.time_ns(), {"AAPL": 1}))
        assert await apoll_until(lambda: feed.connected)
        feed.member_blocked(blocker, True)  # reading paused
        # Three idle timeouts pass while the gateway itself is not reading: not dropped.
        assert not await _closed(reader, 1.0)
        assert feed.connected and source.idle_drops == 0
        # A newcomer is refused meanwhile: the paused publisher is not stale.
        r2, w2 = await asyncio.open_connection("127.0.0.1", source.port)
        assert await _closed(r2, 5)
        w2.close()
        assert source.busy == 1 and source.replaced == 0
        feed.member_blocked(blocker, False)  # reading resumes; now its silence counts
        assert await _closed(reader, 5)
        writer.close()
        assert source.idle_drops == 1
        assert feed.state_detail == "publisher timed out; waiting for a publisher"
    finally:
        await source.stop()


# --- file and synthetic feeds that fail visibly ------------------------------------------


def _meta() -> bytes:
    return encode_publisher_metadata("F.X", 1_700_000_000_000_000_000, {"AAPL": 1})


async def test_empty_looping_file_is_reported_down_and_retried_with_backoff(
    tmp_path: Path,
) -> None:
    path = tmp_path / "empty.dbn"
    path.write_bytes(b"")
    feed = Feed("F.X")
    source = FileSource(feed, path, None, loop=True)
    started = time.monotonic()
    await source.start()
    try:
        assert await apoll_until(lambda: source.failures >= 3)
        # 0.5 s then 1 s between the first three attempts: no busy loop
        assert time.monotonic() - started >= 1.4
        assert not feed.connected
        assert feed.state_detail == "file replay failed: the file is empty; retrying"
        assert str(tmp_path) not in feed.state_detail
    finally:
        await source.stop()


async def test_truncated_metadata_header_is_named_so(tmp_path: Path) -> None:
    path = tmp_path / "short.dbn"
    path.write_bytes(_meta()[:30])
    feed = Feed("F.X")
    source = FileSource(feed, path, None, loop=False)
    await source.start()
    try:
        assert await apoll_until(lambda: feed.state_detail != "starting")
        assert feed.state_detail == "file replay failed: truncated Metadata header"
        assert not feed.connected
    finally:
        await source.stop()


async def test_a_directory_is_called_a_directory(tmp_path: Path) -> None:
    with pytest.raises(DbnError, match="is a directory"):
        await FileSource(Feed("F.X"), tmp_path, None, loop=False).start()
    with pytest.raises(DbnError, match="does not exist"):
        await FileSource(Feed("F.X"), tmp_path / "nope.dbn", None, loop=False).start()


def test_public_reasons_carry_no_path() -> None:
    assert public_reason(FileNotFoundError(2, "No such file", "/srv/x.dbn")) == "file not found"
    assert public_reason(PermissionError(13, "denied", "/srv/x.dbn")) == "permission denied"
    assert public_reason(IsADirectoryError(21, "dir", "/srv")) == "path is a directory"
    assert public_reason(OSError(5, "EIO")) == "read error"
    assert public_reason(DbnError("record at /srv/x.dbn is bad")) == "invalid DBN data"
    assert public_reason(RuntimeError("/srv")) == "internal error"


class _Panic(BaseException):
    """Like pyo3's PanicException: not an Exception."""


async def test_file_task_that_dies_marks_the_feed_down(tmp_path: Path) -> None:
    path = tmp_path / "ok.dbn"
    path.write_bytes(_meta())
    feed = Feed("F.X")
    source = FileSource(feed, path, None, loop=True)

    async def panic() -> None:
        raise _Panic("decoder panicked")

    source._replay_once = panic  # type: ignore[method-assign]
    await source.start()
    try:
        assert await apoll_until(lambda: feed.state_detail != "starting")
        assert feed.state_detail == "file replay failed: internal error"
        assert not feed.connected
    finally:
        await source.stop()


async def test_synthetic_task_that_dies_marks_the_feed_down() -> None:
    feed = Feed("S.X")
    source = SyntheticSource(feed, SyntheticOptions(rate=1000, instruments=3))

    def broken(n: int, now_ns: int, span_ns: int) -> list[bytes]:
        raise MemoryError("cannot allocate")

    source.generator.make = broken  # type: ignore[method-assign]
    await source.start()
    try:
        assert feed.connected
        assert await apoll_until(lambda: not feed.connected)
        assert feed.state_detail == "synthetic feed stopped (internal error)"
    finally:
        await source.stop()
