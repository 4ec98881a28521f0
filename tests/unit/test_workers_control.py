"""``--workers N`` process plumbing: the control channel's framing and messages, the
worker count and ``[workers]`` settings, CPU placement, worker-named logs."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import struct
from pathlib import Path

import msgspec
import pytest

from gateway.cli import build_parser, config_from_args
from gateway.config import (
    Config,
    JournalConfig,
    WorkersConfig,
    dump_config,
    parse_config,
    validate,
    worker_count,
)
from gateway.dbn import ChunkIndex, index_records
from gateway.errors import ConfigError
from gateway.feeds import Feed
from gateway.journal import DatasetJournal, JournalStore
from gateway.journal.follower import open_follower
from gateway.journal_setup import attach_feed
from gateway.ops.logs import setup_logging
from gateway.ops.snapshot import GatewayInfo, GatewaySnapshot, SessionsSnapshot, WorkersInfo
from gateway.ops.status import assess
from gateway.transport import place_workers
from gateway.workers.aggregate import Family, Sample
from gateway.workers.control import (
    MAX_FRAME,
    Blocked,
    ControlError,
    FeedStart,
    FrameReader,
    Init,
    Message,
    Prepared,
    Ready,
    Reload,
    Start,
    Stats,
    encode,
    open_channel,
    recv_message,
)
from gateway.workers.ring import Ring, RingWriter
from gateway.workers.sink import RingSink
from gateway.workers.supervisor import start_seq
from gateway.workers.worker import follow

from .conftest import NOW_NS, trade

KEY = "db-UNITKEY00000000000000000000AB"


def _snapshot() -> GatewaySnapshot:
    return GatewaySnapshot(
        taken_at=1.5,
        gateway=GatewayInfo(
            version="x",
            started_at=1.0,
            uptime_s=0.5,
            ready=True,
            accepting=True,
            port=13000,
            loop="uvloop",
        ),
        sessions=SessionsSnapshot(total=3, by_dataset={}, connections_open=4, unauthenticated=1),
        feeds=[],
        connections_unauthenticated=1,
        key_sessions={"key-00AB": 3},
        bytes_out={"A/none": 10.0},
    )


def _messages() -> list[Message]:
    cfg = validate(parse_config(f'workers = 2\n[[api_keys]]\nkey = "{KEY}"\n'))
    return [
        Init(
            config=cfg,
            slot=1,
            name="w1",
            workers=2,
            supervisor_pid=42,
            port=13000,
            loop="uvloop",
            eventfd=7,
            rings={"A": "lsg-1-2-abcdef01"},
            limits_path="/tmp/x/limits",
            cpus=[3],
        ),
        Prepared(pid=1234),
        Start(feeds={"A": FeedStart(snapshot=b"\x94\x90\xc0\xc2\xa0", start_pos=4096)}),
        Reload(config=cfg),
        Ready(pid=1234, report="transport=plain"),
        Stats(
            snapshot=_snapshot(),
            families=[
                Family("gateway_x", "counter", "doc", "", [Sample("gateway_x_total", {}, 2)])
            ],
        ),
        Blocked(dataset="A", blocked=True),
    ]


def test_every_message_survives_framing_split_at_every_byte() -> None:
    msgs = _messages()
    stream = b"".join(encode(m) for m in msgs)
    for step in (1, 7, len(stream)):
        reader = FrameReader()
        got: list[Message] = []
        for at in range(0, len(stream), step):
            got += reader.feed(stream[at : at + step])
        assert got == msgs
        assert reader.pending == 0
    init = msgs[0]
    assert isinstance(init, Init) and init.config.api_keys[0].key == KEY


def test_frame_is_a_big_endian_length_then_msgpack() -> None:
    frame = encode(Blocked(dataset="A", blocked=False))
    (size,) = struct.unpack(">I", frame[:4])
    assert size == len(frame) - 4


def test_bad_frames_are_refused() -> None:
    with pytest.raises(ControlError, match="at most"):
        FrameReader().feed(struct.pack(">I", MAX_FRAME + 1))
    with pytest.raises(ControlError, match="bad control message"):
        FrameReader().feed(struct.pack(">I", 3) + b"\xc1\xc1\xc1")
    with pytest.raises(ControlError, match="bad control message"):  # an unknown tag
        FrameReader().feed(
            encode(Blocked(dataset="A", blocked=True)).replace(b"blocked", b"xlocked")
        )


def test_recv_message_reads_one_frame_and_none_at_eof() -> None:
    a, b = socket.socketpair()
    with a, b:
        msgs = _messages()
        a.sendall(encode(msgs[2]) + encode(msgs[4]))
        assert recv_message(b, timeout=5) == msgs[2]
        assert recv_message(b, timeout=5) == msgs[4]
        a.sendall(encode(msgs[2])[:5])
        a.shutdown(socket.SHUT_WR)
        assert recv_message(b, timeout=5) is None


async def test_channel_on_the_loop_delivers_messages_and_eof() -> None:
    a, b = socket.socketpair()
    got: list[Message] = []
    closed = asyncio.Event()
    chan = await open_channel(b, got.append, lambda exc: closed.set())
    with a:
        a.setblocking(True)
        ready = Ready(pid=1, report="r")
        for piece in (encode(ready)[:3], encode(ready)[3:] + encode(ready)):
            a.sendall(piece)
        assert chan.send(Blocked(dataset="D", blocked=True))
        loop = asyncio.get_running_loop()
        reply = await loop.run_in_executor(None, recv_message, a, 5.0)
        assert reply == Blocked(dataset="D", blocked=True)
        for _ in range(200):
            if len(got) == 2:
                break
            await asyncio.sleep(0.01)
        assert got == [ready, ready]
        a.shutdown(socket.SHUT_WR)
        await asyncio.wait_for(closed.wait(), 5)
    assert chan.closed and not chan.send(ready)


# --- config and CLI ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "count"),
    [
        ("", 1),
        ("workers = 3", 3),
        ("[workers]\ncount = 4\nring_bytes = 1048576", 4),
        ("[workers]\nworker_stall_s = 2.0", 1),
    ],
)
def test_workers_as_a_number_or_a_table(text: str, count: int) -> None:
    cfg = validate(parse_config(text))
    assert worker_count(cfg) == count
    again = validate(parse_config(dump_config(cfg)))
    assert again.workers == cfg.workers


def test_workers_auto_is_the_usable_cpus() -> None:
    import os

    assert worker_count(parse_config('workers = "auto"')) == len(os.sched_getaffinity(0))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("workers = 0", "workers: Expected int >= 1"),
        ("workers = 65", "workers: Expected int <= 64"),
        ('workers = "many"', "workers: Invalid enum value 'many'"),
        ("[workers]\nring_bytes = 4096", "workers.ring_bytes: Expected int >= 1048576"),
        ("[workers]\nring_bytes = 1048577", "workers.ring_bytes: must be a multiple of 4096"),
        ("[workers]\ncont = 2", "workers.cont: unknown field (did you mean count?)"),
        ("[workers]\nworker_stall_s = 0.5", "workers.worker_stall_s: Expected float >= 1"),
        (
            'workers = 2\nzstd_mode = "per_session"',
            "zstd_mode: per_session is not supported with workers > 1",
        ),
        (
            "workers = 2\n[transport]\nreuse_port = false",
            "transport.reuse_port: workers > 1 share the client port",
        ),
    ],
)
def test_bad_workers_settings_name_the_field(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate(parse_config(text, "gw.toml"))
    assert message in str(info.value)


def _serve(*argv: str, config: str | None = None) -> Config:
    return config_from_args(build_parser().parse_args(["serve", "--api-key", KEY, *argv]))


def test_workers_flag_sets_the_count_and_keeps_the_table(tmp_path: object) -> None:
    assert worker_count(_serve()) == 1
    assert _serve("--workers", "2").workers == 2
    assert _serve("--workers", "auto").workers == "auto"
    from pathlib import Path

    path = Path(str(tmp_path)) / "gw.toml"
    path.write_text("[workers]\ncount = 3\nring_bytes = 2097152\n")
    cfg = _serve("--config", str(path), "--workers", "2")
    assert worker_count(cfg) == 2 and isinstance(cfg.workers, WorkersConfig)
    assert cfg.workers.ring_bytes == 2 << 20
    with pytest.raises(ConfigError, match=r"^--workers 'x': expected a number of workers or auto"):
        _serve("--workers", "x")
    with pytest.raises(ConfigError, match="^workers: Expected int >= 1"):
        _serve("--workers", "0")


def test_one_worker_never_imports_the_workers_package() -> None:
    import subprocess
    import sys

    code = (
        "import sys, gateway.app, gateway.cli, gateway.server, gateway.feeds, gateway.fanout;"
        "print(sorted(m for m in sys.modules if m.startswith('gateway.workers')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- placement and logs -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cpus", "n", "supervisor", "workers"),
    [
        (None, 2, None, [None, None]),
        ([5], 3, [5], [[5], [5], [5]]),
        ([0, 1, 2], 2, [0], [[1], [2]]),
        ([0, 1, 2], 4, [0], [[1], [2], [1], [2]]),
    ],
)
def test_cpu_placement(
    cpus: list[int] | None, n: int, supervisor: list[int] | None, workers: list[object]
) -> None:
    assert place_workers(cpus, n) == (supervisor, workers)


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_logs_name_the_worker(fmt: str, capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging(fmt, "info", worker="w3")
        logging.getLogger("gateway.test").info("hello peer=%s", "x")
        err = capsys.readouterr().err.strip()
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    if fmt == "json":
        doc = json.loads(err)
        assert doc["worker"] == "w3" and doc["peer"] == "x" and doc["msg"] == "hello peer=x"
    else:
        assert err.endswith("INFO gateway.test worker=w3 hello peer=x")


# --- where a (re)started worker's feeds begin ------------------------------------------------


def _chunk(n: int, at: int) -> ChunkIndex:
    index, _ = index_records(b"".join(trade(1001, NOW_NS + at + i) for i in range(n)))
    return index


def test_a_worker_starts_before_the_chunks_still_pending_for_a_full_ring(
    tmp_path: Path,
) -> None:
    store = JournalStore.open(tmp_path / "journal")
    ring = Ring.create(1 << 20, 1)
    sink = RingSink(RingWriter(ring))
    try:
        sink.writer.set_live(0, True)  # a worker that releases nothing: the ring fills
        feed = Feed("T.FEED", fanout=sink)
        sink.attach(feed)
        attach_feed(store, feed)
        journal = feed.journal
        assert isinstance(journal, DatasetJournal)
        assert start_seq(sink, journal) == journal.last_seq
        for n in range(100):  # 24 KiB chunks: bounded well past 1 MiB
            feed.publish(_chunk(512, n * 512))
            if len(sink.pending) >= 3:
                break
        queued = [seq for _, _, seq, _ in sink.pending]
        assert len(queued) >= 3 and queued[-1] == journal.last_seq, queued
        # journaled already, but reaching a worker starting at the head only after it
        assert start_seq(sink, journal) == queued[0] - 1 < journal.last_seq
        assert start_seq(sink, None) == -1
        sink.pending.clear()
        assert start_seq(sink, journal) == journal.last_seq
    finally:
        sink.close()
        ring.unlink()
        ring.close()
        store.close()


def test_a_worker_journal_and_directory_start_at_the_start_seq(tmp_path: Path) -> None:
    store = JournalStore.open(tmp_path / "journal")
    try:
        writer = Feed("T.FEED")
        attach_feed(store, writer)
        writer.learn_many([("AAA", 1001)])
        writer.publish(_chunk(4, 0))
        start = writer.journal_seq  # the worker's slot goes live after this chunk ...
        writer.publish(_chunk(4, 10))
        writer.learn_many([("BBB", 1002)])  # ... so this comes to it through the ring
        writer.publish(_chunk(4, 20))
        assert writer.journal_seq == start + 2
        follower = open_follower(JournalConfig(dir=str(tmp_path / "journal")))
        assert follower is not None
        feed = Feed("T.FEED")
        follow(
            follower,
            {"T.FEED": feed},
            Start(feeds={"T.FEED": FeedStart(snapshot=b"", start_pos=0, journal_seq=start)}),
        )
        assert feed.journal is not None and feed.journal.last_seq == start
        assert [sym for sym, _ in feed.directory.log] == ["AAA"]  # BBB: not yet
    finally:
        store.close()


def test_a_worker_down_degrades_the_status_and_single_process_documents_are_unchanged() -> None:
    info = _snapshot().gateway
    assert "workers" not in msgspec.to_builtins(info)  # one process: no new field
    down = msgspec.structs.replace(info, workers=WorkersInfo(up=1, of=2, down=["w0"]))
    gw = msgspec.to_builtins(down)
    assert gw["workers"] == {"up": 1, "of": 2, "down": ["w0"]}
    assert assess({"gateway": gw, "feeds": []}) == (
        "degraded",
        ["worker(s) down: w0 (1 of 2 up)"],
    )
    gw["workers"] = {"up": 2, "of": 2, "down": []}
    assert assess({"gateway": gw, "feeds": []}) == ("operational", [])
