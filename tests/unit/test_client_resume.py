"""The resuming client against a scripted fake gateway on a real socket.

The fake speaks the Live handshake (greeting, CRAM, auth reply), collects the control
lines each connection sends, writes the Metadata header and then whatever the test's
script for that connection says: records, checkpoint records, a cut in the middle of a
record, an ErrorMsg. The tests then check the lines the client sent on each reconnect
(``lsg_resume_after=P``, no start, every subscription) and that the user saw every
record once: the n records after the checkpoint were dropped, no more, no less.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from gateway import control
from gateway.checkpoint import Backoff, Gap, ResumeCursor, encode_checkpoint
from gateway.client import ClientError
from gateway.client_resume import ResumingClient, classify_error
from gateway.dbn import encode_error, encode_metadata, encode_symbol_mapping, index_records
from tests.unit.conftest import NOW_NS, trade

KEY = "db-TESTKEY0000000000000000000000"
DATASET = "FAKE.TEST"
#: 40 distinct trades; the sequence field numbers them
R = [trade(1 + i % 3, NOW_NS + (i * 7919) % 1000, sequence=i) for i in range(40)]
FAST = Backoff(initial_s=0.01, max_s=0.05, max_elapsed_s=10.0)


def ckpt(seq: int) -> bytes:
    return encode_checkpoint(NOW_NS, seq)


@dataclass
class Conn:
    auth: dict[str, str] = field(default_factory=dict)
    subs: list[dict[str, str]] = field(default_factory=list)
    start_ns: int = 0


Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class FakeGateway:
    """Connection i runs ``scripts[i]`` after the Metadata header (later ones: the last)."""

    def __init__(self, scripts: list[Script], reply: str = "success=1|session_id=1") -> None:
        self.scripts = scripts
        self.conns: list[Conn] = []
        self.reply = reply
        self.server: asyncio.Server | None = None
        self.port = 0
        self.tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> FakeGateway:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        conn = Conn(start_ns=NOW_NS + len(self.conns))
        self.conns.append(conn)
        script = self.scripts[min(len(self.conns), len(self.scripts)) - 1]
        try:
            writer.write(b"lsg_version=0.1.0\ncram=" + b"C" * 32 + b"\n")
            conn.auth = control.parse_fields((await reader.readline()).rstrip(b"\n"))
            writer.write(self.reply.encode() + b"\n")
            if not self.reply.startswith("success=1"):
                return
            while True:
                line = await reader.readline()
                if not line or line.startswith(b"start_session"):
                    break
                conn.subs.append(control.parse_fields(line.rstrip(b"\n")))
            writer.write(encode_metadata(DATASET, conn.start_ns, False))
            await script(reader, writer)
        except ConnectionError:
            pass
        finally:
            writer.close()


def send(*parts: bytes) -> Script:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"".join(parts))
        await writer.drain()

    return script


def send_then_cut(*parts: bytes) -> Script:
    """Write, then reset the connection (no clean end)."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"".join(parts))
        await writer.drain()
        await asyncio.sleep(0)
        writer.transport.abort()

    return script


def send_and_hold(*parts: bytes) -> Script:
    """Write, then keep the connection open until the client closes it."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"".join(parts))
        await writer.drain()
        await asyncio.wait_for(reader.read(), 20.0)  # the client sends nothing more

    return script


async def collect(client: ResumingClient, want: int, limit_s: float = 10.0) -> list[bytes]:
    """Every record the user sees until ``want`` data records arrived; then close."""
    got: list[bytes] = []

    async def run() -> None:
        async for _rtype, _iid, rec in client.records():
            got.append(bytes(rec))
            if len(data_of(got)) >= want:
                break

    try:
        await asyncio.wait_for(run(), limit_s)
    finally:
        await client.close()
    return got


def data_of(records: list[bytes]) -> list[bytes]:
    return [r for r in records if r[1] not in (0x15, 0x16, 0x17)]


def sub_keys(conn: Conn) -> list[tuple[str, str, str | None, str | None]]:
    return [
        (s["schema"], s["symbols"], s.get("start"), s.get("lsg_resume_after")) for s in conn.subs
    ]


async def two_subs(client: ResumingClient, start: int | None = None) -> None:
    await client.subscribe("trades", "ALL_SYMBOLS", start=start)
    await client.subscribe("mbp-1", ["A", "B"], start=start)


# --- the cursor, sans I/O -----------------------------------------------------------------


def test_cursor_counts_strips_checkpoints_and_drops_repeats() -> None:
    cur = ResumeCursor()
    mapping = encode_symbol_mapping(NOW_NS, 1, 1, "A", "A", NOW_NS)
    out = cur.feed(index_records(b"".join([*R[0:3], ckpt(5), mapping, *R[3:6]]))[0])
    assert out is not None
    assert [bytes(out.data)] == [b"".join([*R[0:3], mapping, *R[3:6]])]
    assert (cur.seq, cur.count, cur.last_ts_event) == (5, 3, NOW_NS + (5 * 7919) % 1000)
    cur.begin_resume()
    # the resumed stream repeats R[3:6]; a checkpoint while still dropping keeps the rest
    out = cur.feed(index_records(b"".join([mapping, R[3], ckpt(6), *R[4:8]]))[0])
    assert out is not None and bytes(out.data) == mapping + b"".join(R[6:8])
    assert (cur.seq, cur.count, cur.skip, cur.dropped) == (6, 4, 0, 3)
    assert cur.feed(index_records(ckpt(7))[0]) is None
    assert (cur.seq, cur.count) == (7, 0)


def test_classify_error() -> None:
    assert classify_error(8, "start is older than the oldest data") == "aged_out"
    assert classify_error(6, "replay is not available on this gateway") == "unavailable"
    assert classify_error(3, "replay limit reached (16); retry later") == "busy"
    assert classify_error(5, "Invalid lsg_resume_after 9: the journal ends at 2") == "bad_resume"
    assert classify_error(2, "API key deactivated") == "fatal"
    assert classify_error(6, "Gateway restarting; reconnect") is None


def test_backoff_is_bounded_jittered_and_gives_up() -> None:
    b = Backoff()
    rng = random.Random(7)
    delays = [b.delay(k, rng) for k in range(40)]
    for k, d in enumerate(delays):
        base = min(5.0, 0.1 * 2**k)
        assert base / 2 <= d <= base
    assert max(delays) <= 5.0 and len(set(delays)) == len(delays)  # jittered: no two equal
    assert delays[0] < 0.11 and delays[-1] >= 2.5
    assert b.delay(10**6, rng) <= 5.0  # no overflow far out
    assert Backoff(max_attempts=3).exhausted(3, 0.0)
    assert not Backoff(max_attempts=3).exhausted(2, 0.0)
    assert Backoff(max_elapsed_s=1.0).exhausted(1, 1.5)
    with pytest.raises(ValueError, match="initial_s"):
        Backoff(initial_s=0.0)


# --- against the fake gateway ---------------------------------------------------------------


async def test_resume_after_cut_sends_resume_lines_and_drops_exactly_n() -> None:
    mapping = encode_symbol_mapping(NOW_NS, 1, 1, "A", "A", NOW_NS)
    restarting = encode_error(NOW_NS, "Gateway restarting; reconnect", 6)
    scripts = [
        # 5 records, checkpoint 3, 4 more, half a record, reset: the client has n=4 after P=3
        send_then_cut(*R[0:5], ckpt(3), *R[5:9], R[9][:20]),
        # replay after 3: the 4 again (a checkpoint 4 after two of them), 6 new, a clean end
        send(mapping, *R[5:7], ckpt(4), *R[7:15], restarting),
        # replay after 4: R[7:15] again (8 to drop), then new records
        send_and_hold(*R[7:22]),
    ]
    async with FakeGateway(scripts) as gw:
        gaps: list[Gap] = []
        client = await ResumingClient.connect(
            "127.0.0.1", gw.port, KEY, DATASET, backoff=FAST, on_gap=gaps.append
        )
        await two_subs(client)
        await client.start()
        got = await collect(client, 22)
    assert data_of(got) == R[0:22]
    assert mapping in got and restarting in got
    assert not any(r == ckpt(3) or r == ckpt(4) for r in got)
    assert gaps == [] and client.gaps == [] and client.reconnects == 2
    assert len(gw.conns) == 3
    for conn in gw.conns:
        assert conn.auth["lsg_checkpoints"] == "1"
        assert conn.auth["slow_reader_behavior"] == "warn"
    assert sub_keys(gw.conns[0]) == [
        ("trades", "ALL_SYMBOLS", None, None),
        ("mbp-1", "A,B", None, None),
    ]
    assert sub_keys(gw.conns[1]) == [
        ("trades", "ALL_SYMBOLS", None, "3"),
        ("mbp-1", "A,B", None, "3"),
    ]
    assert sub_keys(gw.conns[2]) == [
        ("trades", "ALL_SYMBOLS", None, "4"),
        ("mbp-1", "A,B", None, "4"),
    ]
    assert client.cursor.dropped == 4 + 8


async def test_before_any_checkpoint_resumes_with_the_original_start() -> None:
    scripts = [send_then_cut(*R[0:3]), send_and_hold(*R[0:6])]
    async with FakeGateway(scripts) as gw:
        client = await ResumingClient.connect("127.0.0.1", gw.port, KEY, DATASET, backoff=FAST)
        await two_subs(client, start=1000)
        await client.start()
        got = await collect(client, 6)
    assert data_of(got) == R[0:6] and client.gaps == []
    assert sub_keys(gw.conns[0]) == sub_keys(gw.conns[1])
    assert sub_keys(gw.conns[1]) == [
        ("trades", "ALL_SYMBOLS", "1000", None),
        ("mbp-1", "A,B", "1000", None),
    ]


async def test_no_checkpoint_and_no_start_is_a_reported_gap() -> None:
    scripts = [send_then_cut(*R[0:3]), send_and_hold(*R[10:12])]
    async with FakeGateway(scripts) as gw:
        gaps: list[Gap] = []
        client = await ResumingClient.connect(
            "127.0.0.1", gw.port, KEY, DATASET, backoff=FAST, on_gap=gaps.append
        )
        await two_subs(client)
        await client.start()
        got = await collect(client, 5)
    assert data_of(got) == R[0:3] + R[10:12]
    assert sub_keys(gw.conns[1]) == sub_keys(gw.conns[0])  # live: no start, no resume
    assert gaps == client.gaps
    assert [(g.reason, g.after_seq, g.last_ts_event, g.resumed_start) for g in gaps] == [
        ("no_checkpoint", None, NOW_NS + (2 * 7919) % 1000, gw.conns[1].start_ns)
    ]


@pytest.mark.parametrize(
    ("code", "text", "reason"),
    [
        (8, "start 2026-12-01T00:00:00Z is older than the oldest retained data", "aged_out"),
        (6, "replay is not available on this gateway", "unavailable"),
        (5, "Invalid lsg_resume_after 7: the journal ends at 3", "bad_resume"),
    ],
)
async def test_refused_resume_goes_live_and_reports_the_gap(
    code: int, text: str, reason: str
) -> None:
    refusal = encode_error(NOW_NS, text, code)
    scripts = [
        send_then_cut(*R[0:3], ckpt(7), *R[3:5]),
        send(refusal),
        send_and_hold(*R[10:12]),
    ]
    async with FakeGateway(scripts) as gw:
        gaps: list[Gap] = []
        client = await ResumingClient.connect(
            "127.0.0.1", gw.port, KEY, DATASET, backoff=FAST, on_gap=gaps.append
        )
        await two_subs(client)
        await client.start()
        got = await collect(client, 7)
    assert data_of(got) == R[0:5] + R[10:12]
    assert refusal in got  # the gateway's word reaches the user too
    assert [s[3] for s in sub_keys(gw.conns[1])] == ["7", "7"]
    assert [s[2:] for s in sub_keys(gw.conns[2])] == [(None, None), (None, None)]
    assert gaps == client.gaps
    assert [(g.reason, g.after_seq, g.last_ts_event, g.message) for g in gaps] == [
        (reason, 7, NOW_NS + (4 * 7919) % 1000, text)
    ]


async def test_replay_limit_is_retried_with_the_resume() -> None:
    busy = encode_error(NOW_NS, "replay limit reached (1); retry later", 3)
    scripts = [send_then_cut(*R[0:2], ckpt(2), R[2]), send(busy), send_and_hold(*R[2:6])]
    async with FakeGateway(scripts) as gw:
        client = await ResumingClient.connect("127.0.0.1", gw.port, KEY, DATASET, backoff=FAST)
        await client.subscribe("trades", "ALL_SYMBOLS")
        await client.start()
        got = await collect(client, 6)
    assert data_of(got) == R[0:6] and client.gaps == []
    assert [sub_keys(c)[0][3] for c in gw.conns] == [None, "2", "2"]


async def test_a_refused_start_on_the_first_connection_is_raised() -> None:
    aged = encode_error(NOW_NS, "start is older than the oldest retained data", 8)
    async with FakeGateway([send(aged)]) as gw:
        client = await ResumingClient.connect("127.0.0.1", gw.port, KEY, DATASET, backoff=FAST)
        await client.subscribe("trades", "ALL_SYMBOLS", start=5)
        await client.start()
        with pytest.raises(ClientError, match="refused the replay: start is older"):
            await collect(client, 1)
    assert len(gw.conns) == 1


async def test_close_does_not_reconnect_and_subscribe_after_start_is_refused() -> None:
    async with FakeGateway([send_and_hold(*R[0:3])]) as gw:
        client = await ResumingClient.connect("127.0.0.1", gw.port, KEY, DATASET, backoff=FAST)
        await client.subscribe("trades", "ALL_SYMBOLS")
        await client.start()
        with pytest.raises(ClientError, match="before start"):
            await client.subscribe("mbp-1", "ALL_SYMBOLS")
        got = await collect(client, 3)  # closes the client when it has them
        # the generator ended on close: nothing left that could reconnect
        assert [r async for r in client.records()] == []
    assert data_of(got) == R[0:3] and len(gw.conns) == 1


async def test_gives_up_after_max_attempts() -> None:
    scripts = [send_then_cut(*R[0:2]), send_then_cut()]
    async with FakeGateway(scripts) as gw:
        client = await ResumingClient.connect(
            "127.0.0.1",
            gw.port,
            KEY,
            DATASET,
            backoff=Backoff(initial_s=0.01, max_s=0.02, max_attempts=3),
        )
        await client.subscribe("trades", "ALL_SYMBOLS")
        await client.start()
        with pytest.raises(ClientError, match="could not reconnect after 3 attempts"):
            await collect(client, 5)
    assert len(gw.conns) == 4  # the first, then three attempts


async def test_authentication_refused_on_reconnect_is_raised() -> None:
    async with FakeGateway([send_then_cut(*R[0:2])]) as gw:
        client = await ResumingClient.connect("127.0.0.1", gw.port, KEY, DATASET, backoff=FAST)
        await client.subscribe("trades", "ALL_SYMBOLS")
        await client.start()
        gw.reply = "success=0|error=Unknown API key"
        with pytest.raises(ClientError, match="authentication failed"):
            await collect(client, 5)
    assert len(gw.conns) == 2


async def test_heartbeat_timeout_resumes(monkeypatch: pytest.MonkeyPatch) -> None:
    """A gateway gone silent (no heartbeat within interval + margin) is reconnected to."""
    import gateway.client

    monkeypatch.setattr(gateway.client, "CLIENT_TIMEOUT_MARGIN_S", -4.8)  # 5 s -> 0.2 s
    scripts = [send_and_hold(*R[0:4], ckpt(2), *R[4:6]), send_and_hold(*R[4:9])]
    async with FakeGateway(scripts) as gw:
        client = await ResumingClient.connect(
            "127.0.0.1", gw.port, KEY, DATASET, backoff=FAST, heartbeat_interval_s=5
        )
        await client.subscribe("trades", "ALL_SYMBOLS")
        await client.start()
        got = await collect(client, 9)
    assert data_of(got) == R[0:9] and client.gaps == [] and client.reconnects == 1
    assert gw.conns[0].auth["heartbeat_interval_s"] == "5"
    assert [sub_keys(c)[0][3] for c in gw.conns] == [None, "2"]
