"""The adapter's replay mode (gateway/replay/run.py, begin.py) in-process, over real sockets
on 127.0.0.1 and the loop under test: a feed with a journal in tmp_path, a session that
subscribes with ``start=`` replays through the pump (sendfile for whole parts) and hands
over to live with no gap and no duplicate while the feed publishes; refusals; checkpoints
only for the sessions that ask for them."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zstandard

from gateway import dbn
from gateway.auth import Authenticator, KeyEntry
from gateway.checkpoint import parse_checkpoint
from gateway.config import SlowReaderConfig
from gateway.control import START_SESSION, encode_subscription
from gateway.dbn import index_records
from gateway.journal import JournalStore
from gateway.replay.budget import ReplayBudget
from gateway.server import ServerState
from tests.integration.helpers import apoll_until
from tests.unit import test_adapter
from tests.unit.conftest import decode, trade
from tests.unit.test_adapter import (
    DATASET,
    KEY,
    Client,
    handshake,
    new_state,
    sample,
    text_of,
)

server = test_adapter.server  # the fixture: a listener on the loop under test

T0 = 1_764_000_000_000_000_000
PER_CHUNK = 10


@pytest.fixture
def store(tmp_path: Path) -> Iterator[JournalStore]:
    s = JournalStore.open(tmp_path / "journal")
    yield s
    s.close()


def journaled_state(store: JournalStore, **kwargs: Any) -> ServerState:
    state = new_state(**kwargs)
    feed = state.feeds[DATASET]
    feed.journal = store.dataset(DATASET)
    state.journal_enabled = True
    feed.learn_many([("AAA", 11), ("BBB", 22)])
    return state


class Publisher:
    """Chunks of trades whose ``sequence`` field counts every record published."""

    def __init__(self, state: ServerState) -> None:
        self.feed = state.feeds[DATASET]
        self.n = 0

    def chunk(self) -> None:
        recs = [
            trade(11 if (self.n + k) % 3 else 22, T0 + (self.n + k) * 1000, sequence=self.n + k)
            for k in range(PER_CHUNK)
        ]
        self.n += PER_CHUNK
        self.feed.publish(index_records(b"".join(recs))[0])


def sequence_of(rec: bytes) -> int:
    return int(struct.unpack_from("<I", rec, 44)[0])  # TradeMsg.sequence


async def read_until(client: Client, stop: Any, timeout: float = 10.0) -> list[bytes]:
    out: list[bytes] = []
    async with asyncio.timeout(timeout):
        while True:
            rec = await client.record(timeout)
            out.append(rec)
            if stop(rec):
                return out


async def start_replay(server: Any, state: ServerState, extra: str = "", **sub: Any) -> Client:
    connect = await server(state)
    client, _ = await connect()
    assert (await handshake(client, **({"lsg_checkpoints": True} if extra else {}))).startswith(
        b"success=1"
    )
    client.send(encode_subscription("trades", "ALL_SYMBOLS", sub_id=1, **sub))
    client.send(START_SESSION)
    await client.metadata()
    return client


async def test_replay_hands_over_to_live_with_no_gap_and_no_duplicate(
    server: Any, store: JournalStore
) -> None:
    state = journaled_state(store, replay_step_bytes=4096)
    pub = Publisher(state)
    for _ in range(100):
        pub.chunk()
    client = await start_replay(server, state, start=0)
    # The feed goes on at full speed (a chunk a loop turn) while the session replays.
    for _ in range(150):
        pub.chunk()
        await asyncio.sleep(0)
    last = pub.n - 1
    got = await read_until(client, lambda r: r[1] == 0x00 and sequence_of(r) == last)
    texts = [text_of(r) for r in got if r[1] in (dbn.RTYPE_SYSTEM, dbn.RTYPE_ERROR)]
    assert texts[0] == "Subscription request 1 for trades data succeeded"
    assert "Finished trades replay" in texts
    seqs = [sequence_of(r) for r in got if r[1] == 0x00]
    assert seqs == list(range(pub.n))
    assert state.replay_bytes["sendfile"] > 0  # whole parts went with os.sendfile
    conn = next(iter(state.connections))
    assert conn.replay is None and state.replays_active == 0
    assert conn in state.feeds[DATASET].members
    assert sample(state, "gateway_replay_catchup_seconds_count") == 1
    # Live from here on, nothing twice.
    pub.chunk()
    more = await read_until(client, lambda r: r[1] == 0x00 and sequence_of(r) == pub.n - 1)
    assert [sequence_of(r) for r in more if r[1] == 0x00] == list(range(last + 1, pub.n))


async def test_a_start_filters_and_mappings_come_first(server: Any, store: JournalStore) -> None:
    state = journaled_state(store)
    pub = Publisher(state)
    for _ in range(20):
        pub.chunk()
    client = await start_replay(server, state, start=T0 + 105_000)
    got = await read_until(client, lambda r: r[1] == dbn.RTYPE_SYSTEM and b"Finished" in r)
    kinds = [r[1] for r in got]
    assert kinds[:3] == [dbn.RTYPE_SYSTEM, dbn.RTYPE_SYMBOL_MAPPING, dbn.RTYPE_SYMBOL_MAPPING]
    assert [sequence_of(r) for r in got if r[1] == 0x00] == list(range(105, 200))


async def test_no_journal_and_the_replay_limit_are_clear_fatal_errors(server: Any) -> None:
    state = new_state()
    client = await start_replay(server, state, start=0)
    err = await client.record()
    assert err[1] == dbn.RTYPE_ERROR and "keeps no journal" in text_of(err)
    assert await client.to_eof() == b""
    assert sample(state, "gateway_replays_refused_total", reason="unavailable") == 1


async def test_past_max_replays_is_refused_with_retry_later(
    server: Any, store: JournalStore
) -> None:
    state = journaled_state(store, max_replays=0)
    client = await start_replay(server, state, start=0)
    err = await client.record()
    assert text_of(err) == "replay limit reached (0); retry later"
    assert err[-1 - 0] in (0, 1) and dbn.ErrorCode.CONNECTION_LIMIT_EXCEEDED == 3
    assert sample(state, "gateway_replays_refused_total", reason="limit") == 1
    assert state.replays_active == 0


async def test_aged_out_names_the_oldest_time(server: Any, store: JournalStore) -> None:
    state = journaled_state(store)
    Publisher(state).chunk()
    client = await start_replay(server, state, start=T0 - 1)
    err = await client.record()
    assert err[1] == dbn.RTYPE_ERROR
    assert "aged out" in text_of(err) and str(T0) in text_of(err)
    assert sample(state, "gateway_replays_refused_total", reason="aged_out") == 1


async def test_checkpoints_only_for_sessions_that_ask(server: Any, store: JournalStore) -> None:
    state = journaled_state(store)
    state.authenticator = Authenticator([KeyEntry(KEY, "k", None, max_sessions=2)])
    pub = Publisher(state)
    for _ in range(5):
        pub.chunk()
    asker = await start_replay(server, state, extra="ckpt", start=0)
    got = await read_until(asker, lambda r: r[1] == dbn.RTYPE_SYSTEM and b"Finished" in r)
    # once, at the end of the replayed chunks (before the hand-over's REPLAY_COMPLETED)
    assert [parse_checkpoint(r) for r in got if parse_checkpoint(r) is not None] == [5]
    assert len([r for r in got if r[1] == 0x00]) == 5 * PER_CHUNK
    connect = await server(state)
    plain, _ = await connect()
    assert (await handshake(plain)).startswith(b"success=1")
    plain.send(encode_subscription("trades", "ALL_SYMBOLS", sub_id=1))
    plain.send(START_SESSION)
    await plain.metadata()
    await plain.record()  # the ack
    await apoll_until(lambda: len(state.feeds[DATASET].members) == 2, timeout=5)
    pub.chunk()
    for conn in list(state.connections):
        conn.tick(state.clock())
    live = await read_until(asker, lambda r: parse_checkpoint(r) is not None)
    assert parse_checkpoint(live[-1]) == 6 and len(live) == PER_CHUNK + 1
    other = await read_until(plain, lambda r: r[1] == 0x00 and sequence_of(r) == pub.n - 1)
    assert not any(parse_checkpoint(r) is not None for r in other)


async def test_a_subscription_during_the_replay_is_applied_live_at_the_hand_over(
    server: Any, store: JournalStore
) -> None:
    state = journaled_state(store, replay_step_bytes=2048)
    pub = Publisher(state)
    for _ in range(50):
        pub.chunk()
    client = await start_replay(server, state, start=0)
    # Sent after start_session, with a start of its own: no replay for it (as Databento),
    # held while the replay runs and answered live at the hand-over.
    client.send(encode_subscription("mbo", "ALL_SYMBOLS", sub_id=2, start=0))
    got = await read_until(client, lambda r: r[1] == dbn.RTYPE_SYSTEM and b"mbo" in r)
    texts = [text_of(r) for r in got if r[1] == dbn.RTYPE_SYSTEM]
    assert texts[-2:] == ["Finished trades replay", "Subscription request 2 for mbo data succeeded"]
    assert [sequence_of(r) for r in got if r[1] == 0x00] == list(range(pub.n))


async def test_a_start_after_start_session_acts_live(server: Any, store: JournalStore) -> None:
    state = journaled_state(store)
    pub = Publisher(state)
    pub.chunk()
    connect = await server(state)
    client, conn = await connect()
    assert (await handshake(client)).startswith(b"success=1")
    client.send(START_SESSION)
    await client.metadata()
    client.send(encode_subscription("trades", "ALL_SYMBOLS", sub_id=1, start=0))
    assert text_of(await client.record()) == "Subscription request 1 for trades data succeeded"
    await apoll_until(lambda: state.feeds[DATASET].fanout.spec_of(conn), timeout=5)
    assert conn.replay is None and state.replays_active == 0
    pub.chunk()
    got = await read_until(client, lambda r: r[1] == 0x00)
    assert sequence_of(got[-1]) == PER_CHUNK  # the second chunk, live; nothing replayed


async def test_shutdown_during_a_replay_ends_after_the_step_in_flight(
    server: Any, store: JournalStore
) -> None:
    state = journaled_state(store, replay_step_bytes=4096)
    pub = Publisher(state)
    for _ in range(2000):
        pub.chunk()
    client = await start_replay(server, state, start=0)
    conn = next(iter(state.connections))
    assert conn.replay is not None
    conn.shutdown()
    rest = await client.to_eof()
    records = []
    while rest:
        records.append(rest[: rest[0] * 4])
        rest = rest[rest[0] * 4 :]
    assert text_of(records[-1]) == "Gateway shutting down"
    data = [sequence_of(r) for r in records if r[1] == 0x00]
    assert data == list(range(len(data))) and len(data) < pub.n
    await apoll_until(lambda: not state.connections, timeout=5)
    assert state.replays_active == 0


async def test_a_stalled_replay_is_cut_and_its_slot_released(
    server: Any, store: JournalStore
) -> None:
    slow = SlowReaderConfig(stall_timeout_s=0.2, cut_grace_s=0.2)
    state = journaled_state(store, slow=slow)
    feed = state.feeds[DATASET]
    chunk = b"".join(trade(11, T0 + k) for k in range(1000))
    for _ in range(200):  # ~10 MB: more than the socket buffers hold
        feed.publish(index_records(chunk)[0])
    client = await start_replay(server, state, start=0)
    conn = next(iter(state.connections))
    # The client reads nothing more: the pump waits for the socket, nothing moves.
    await apoll_until(lambda: conn.replay is not None and conn.replay.pump.waiting, timeout=5)

    def tick_until_cut() -> bool:
        conn.tick(state.clock())
        return conn.closing

    await apoll_until(tick_until_cut, timeout=5)
    await apoll_until(lambda: not state.connections, timeout=5)
    assert state.replays_active == 0
    assert sample(state, "gateway_disconnects_total", reason="replay_stall") == 1
    client.sock.close()


async def test_zstd_and_ts_out_replays_are_framed_and_stamped(
    server: Any, store: JournalStore
) -> None:
    state = journaled_state(store, replay_step_bytes=2048)
    pub = Publisher(state)
    for _ in range(30):
        pub.chunk()
    connect = await server(state)
    client, _ = await connect()
    reply = await handshake(client, compression="zstd", ts_out=True)
    assert reply.startswith(b"success=1")
    client.send(encode_subscription("trades", "ALL_SYMBOLS", sub_id=1, start=0))
    client.send(START_SESSION)
    plain = bytearray()
    dctx = zstandard.ZstdDecompressor()

    def frames() -> bool:
        # every frame written so far, each independent (one per piece)
        while client.buf:
            try:
                obj = dctx.decompressobj()
                out = obj.decompress(bytes(client.buf))
            except zstandard.ZstdError:
                return False
            if not obj.eof:
                return False
            used = len(client.buf) - len(obj.unused_data)
            del client.buf[:used]
            plain.extend(out)
        return b"Finished trades replay" in plain

    async with asyncio.timeout(10):
        while not frames():
            data = await asyncio.get_running_loop().sock_recv(client.sock, 1 << 16)
            assert data
            client.buf += data
    meta_len = 8 + int.from_bytes(plain[4:8], "little")
    recs = decode(bytes(plain[meta_len:]), ts_out=True)
    trades = [r for r in recs if int(r.rtype) == 0x00]
    assert [r.sequence for r in trades] == list(range(pub.n))
    assert all(r.ts_out > 0 for r in recs)


async def test_a_copied_replay_to_a_slow_reader_stays_within_its_buffer(
    server: Any, store: JournalStore
) -> None:
    state = journaled_state(store)
    feed = state.feeds[DATASET]
    chunk = b"".join(trade(11 if k % 2 else 22, T0 + k) for k in range(1000))
    for _ in range(200):  # ~10 MB, half of it AAA's: a filtered replay copies
        feed.publish(index_records(chunk)[0])
    connect = await server(state)
    client, conn = await connect()
    assert conn.transport is not None
    # small kernel buffers both ways: the transport's own buffer fills soon
    server_sock = conn.transport.get_extra_info("socket")
    server_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    assert (await handshake(client)).startswith(b"success=1")
    client.send(encode_subscription("trades", ["AAA"], sub_id=1, start=0))
    client.send(START_SESSION)
    await apoll_until(lambda: conn.paused, timeout=5)
    cap = state.slow.write_high_water + state.replay_step_bytes
    seen = []
    for _ in range(10):
        seen.append(conn.transport.get_write_buffer_size())
        await asyncio.sleep(0.01)
    assert max(seen) <= cap, seen
    assert conn.replay is not None and not conn.replay.plan.caught_up
    # It reads: the replay goes on (bytes are taken in bulk, not parsed one by one).
    await client.take(2 << 20, timeout=10)
    assert conn.replay is not None and conn.replay.plan.cursor > 0


async def test_no_checkpoint_while_subscription_work_is_queued(
    server: Any, store: JournalStore
) -> None:
    # A checkpoint names a position a resume replays from with the session's whole
    # selection: while acks/mappings/ALL_SYMBOLS catch-up are still queued for the session,
    # live has not selected all of it yet, so no checkpoint may go out.
    state = journaled_state(store)
    pub = Publisher(state)
    pub.chunk()
    client = await start_replay(server, state, extra="ckpt")  # live: no start
    feed = state.feeds[DATASET]
    await apoll_until(lambda: len(feed.members) == 1, timeout=5)
    (conn,) = list(state.connections)
    subs = feed.subscriptions
    subs.work[conn] = None  # work queued for it, waiting (blocked) …
    subs.set_blocked(conn, True)
    pub.chunk()
    conn.tick(state.clock())
    subs.set_blocked(conn, False)
    subs.work.pop(conn, None)  # … then done
    pub.chunk()
    conn.tick(state.clock())
    got = await read_until(client, lambda r: parse_checkpoint(r) == 3)
    # one where the live stream started (chunk 1 was journaled before it joined), none
    # while its work was queued (2), then 3
    assert [parse_checkpoint(r) for r in got if parse_checkpoint(r) is not None] == [1, 3]
    # the records of both chunks came before it, live
    assert [sequence_of(r) for r in got if r[1] == 0x00] == list(range(PER_CHUNK, 3 * PER_CHUNK))


async def test_the_replay_bandwidth_holds_replays_back_and_they_still_complete(
    server: Any, store: JournalStore
) -> None:
    state = journaled_state(store, replay_step_bytes=4096)
    budget = state.replay_budget = ReplayBudget(400_000)  # 20 KB of burst
    pub = Publisher(state)
    for _ in range(200):  # ~96 KB
        pub.chunk()
    client = await start_replay(server, state, start=0)
    last = pub.n - 1
    got = await read_until(client, lambda r: r[1] == 0x00 and sequence_of(r) == last)
    assert [sequence_of(r) for r in got if r[1] == 0x00] == list(range(pub.n))
    assert budget.waits > 0  # it waited for the bucket, and went on by itself
    await apoll_until(lambda: state.replays_active == 0, timeout=5)


def test_the_replay_budget_is_a_token_bucket() -> None:
    now = [0.0]
    budget = ReplayBudget(1_000_000, burst_s=0.01, clock=lambda: now[0])
    assert budget.wait_s() == 0  # 10 KB of burst
    budget.spend(60_000)  # a step may overdraw …
    wait = budget.wait_s()
    assert 0.05 < wait < 0.052  # … then the next waits until the bucket is back above 0
    now[0] += wait
    assert budget.wait_s() == 0
    now[0] += 10.0  # idle time refills only up to the burst
    assert budget.wait_s() == 0
    budget.spend(30_000)
    assert 0.02 < budget.wait_s() < 0.022
