"""The relay feed's sans-I/O parts: URI options, the key, the saved position, the order
upstreams are tried in, what is taken out of an upstream stream, declared schemas."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import parse_qsl, urlsplit

import pytest

from gateway.client import INVALID_DATA, ClientError, LiveClient
from gateway.client_resume import ResumingClient
from gateway.dbn import ChunkIndex, SystemCode, encode_error, encode_system, index_records
from gateway.errors import ConfigError
from gateway.feeds import parse_feed_uri
from gateway.feeds.base import Feed
from gateway.feeds.relay import CursorFile, RelaySource
from gateway.feeds.relay_options import RelayOptions, parse_relay, read_key
from tests.integration.helpers import synthetic_trades

KEY = "db-RELAYKEY0000000000000000000000"[:32]
ROTATED = "db-ROTATED000000000000000000000000"[:32]


def _opts(uri: str, dataset: str = "EDGE") -> RelayOptions:
    parts = urlsplit(uri)
    return parse_relay(dataset, parts, dict(parse_qsl(parts.query, keep_blank_values=True)))


def test_defaults_and_several_upstreams() -> None:
    opts = _opts("lsg://10.0.0.1:13000,[::1]:13001,primary.local:9?schemas=trades,mbo")
    assert opts.upstreams == (("10.0.0.1", 13000), ("::1", 13001), ("primary.local", 9))
    assert opts.schemas == ("trades", "mbo")
    assert opts.dataset == "EDGE"
    assert opts.symbols == ("ALL_SYMBOLS",)
    assert opts.stype_in == "raw_symbol"
    assert opts.compression == "none"
    assert opts.key_env == "DATABENTO_API_KEY" and opts.key_file is None
    assert opts.heartbeat_interval_s == 5 and opts.failover_after_s == 10.0


def test_every_option() -> None:
    opts = _opts(
        "lsg://h:1?schemas=mbp-1&dataset=XNAS.ITCH&symbols=AAPL,MSFT&stype_in=instrument_id"
        "&compression=zstd&key_file=/run/secrets/upstream&heartbeat_interval_s=30"
        "&failover_after_s=2.5"
    )
    assert opts.dataset == "XNAS.ITCH"
    assert opts.symbols == ("AAPL", "MSFT")
    assert opts.stype_in == "instrument_id"
    assert opts.compression == "zstd"
    assert opts.key_file == Path("/run/secrets/upstream") and opts.key_env is None
    assert opts.heartbeat_interval_s == 30 and opts.failover_after_s == 2.5
    spec = parse_feed_uri("EDGE", "lsg://h:1?schemas=trades&key_env=UPSTREAM_KEY")
    assert spec.kind == "relay" and spec.relay is not None
    assert spec.relay.key_env == "UPSTREAM_KEY"


@pytest.mark.parametrize(
    ("uri", "named"),
    [
        ("lsg://h:1", "schemas="),
        ("lsg://h:1?schemas=", "schemas="),
        ("lsg://h:1?schemas=trades,candles", "'candles'"),
        ("lsg://h:1?schemas=tbbo,mbp-1", "share rtype 0x01"),
        ("lsg://h?schemas=trades", "'h'"),
        ("lsg://h:0?schemas=trades", "'h:0'"),
        ("lsg://h:70000?schemas=trades", "'h:70000'"),
        ("lsg://h:1,?schemas=trades", "''"),
        ("lsg://h:1/x?schemas=trades", "no path"),
        ("lsg://h:1?schemas=trades&stype_in=parent", "stype_in='parent'"),
        ("lsg://h:1?schemas=trades&compression=gzip", "compression='gzip'"),
        ("lsg://h:1?schemas=trades&key_env=A&key_file=/k", "not both"),
        ("lsg://h:1?schemas=trades&key_env=A-B", "key_env='A-B'"),
        ("lsg://h:1?schemas=trades&key_file=", "key_file= needs a path"),
        ("lsg://h:1?schemas=trades&heartbeat_interval_s=2", "heartbeat_interval_s='2'"),
        ("lsg://h:1?schemas=trades&failover_after_s=-1", "failover_after_s='-1'"),
        ("lsg://h:1?schemas=trades&failover_after_s=nan", "failover_after_s='nan'"),
        ("lsg://h:1?schemas=trades&symbols=A,,B", "empty symbol"),
        ("lsg://h:1?schemas=trades&dataset=WAY.TOO.LONG.DATASET", "1-16 ASCII"),
    ],
)
def test_bad_options_are_named(uri: str, named: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_feed_uri("EDGE", uri)
    assert named in str(err.value)
    assert str(err.value).startswith("feeds.EDGE:")


def test_an_unknown_option_does_not_echo_the_query() -> None:
    with pytest.raises(ConfigError) as err:
        parse_feed_uri("EDGE", f"lsg://h:1?schemas=trades&key={KEY}")
    assert "'key'" in str(err.value) and KEY not in str(err.value)


def test_key_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABENTO_API_KEY", f"  {KEY}\n")
    assert read_key("EDGE", _opts("lsg://h:1?schemas=trades")) == KEY
    monkeypatch.delenv("DATABENTO_API_KEY")
    with pytest.raises(ConfigError, match="environment variable DATABENTO_API_KEY"):
        read_key("EDGE", _opts("lsg://h:1?schemas=trades"))


def test_key_from_a_file_is_read_at_every_call(tmp_path: Path) -> None:
    path = tmp_path / "key"
    opts = _opts(f"lsg://h:1?schemas=trades&key_file={path}")
    with pytest.raises(ConfigError, match="cannot read key_file"):
        read_key("EDGE", opts)
    path.write_text(KEY + "\n")
    assert read_key("EDGE", opts) == KEY
    path.write_text(ROTATED)
    assert read_key("EDGE", opts) == ROTATED
    path.write_text("\n\n")
    with pytest.raises(ConfigError, match="no upstream API key"):
        read_key("EDGE", opts)


def test_a_malformed_key_is_refused_without_showing_it(tmp_path: Path) -> None:
    path = tmp_path / "key"
    secret = "db-SECRET PART 0000000000000000"
    path.write_text(secret)
    with pytest.raises(ConfigError) as err:
        read_key("EDGE", _opts(f"lsg://h:1?schemas=trades&key_file={path}"))
    assert "malformed" in str(err.value) and "SECRET" not in str(err.value)


def test_cursor_file_round_trip_and_damage(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "relay-cursor.json"
    cf = CursorFile(path)
    assert cf.load() is None
    cf.save("h:1", "DS", 42, "0123456789abcdef", 7, 1000)
    assert CursorFile(path).load() == {
        "upstream": "h:1",
        "dataset": "DS",
        "seq": 42,
        "epoch": "0123456789abcdef",
        "count": 7,
        "journal_seq": 1000,
    }
    assert not path.with_suffix(".tmp").exists()
    caplog.set_level(logging.WARNING)
    for body in ("{not json", "[1, 2]", json.dumps({"upstream": "h:1", "seq": 1})):
        path.write_text(body)
        assert CursorFile(path).load() is None
    negative = {"upstream": "h:1", "dataset": "D", "seq": 1, "count": -1, "journal_seq": 0}
    path.write_text(json.dumps(negative))
    assert CursorFile(path).load() is None


def _client(n: int, failover_after_s: float = 10.0) -> ResumingClient:
    alternates = [(f"h{i}", 1) for i in range(1, n)]
    return ResumingClient(
        "h0", 1, KEY, "DS", alternates=alternates, failover_after_s=failover_after_s
    )


def test_the_upstream_the_position_came_from_is_retried_alone_first() -> None:
    client = _client(3, failover_after_s=5.0)
    client.cursor.seq, client.cursor_upstream = 10, 1
    assert [client._pick_upstream(a, 1.0) for a in range(4)] == [1, 1, 1, 1]
    client._round = 0
    # then every upstream, in order, round and round
    assert [client._pick_upstream(a, 6.0) for a in range(5)] == [0, 1, 2, 0, 1]


def test_a_resume_is_only_sent_to_the_upstream_the_position_came_from() -> None:
    client = _client(2)
    client.cursor.seq, client.cursor_upstream = 10, 0
    client.upstream = 0
    assert client._plan(None) == ("resume", 10)
    client.upstream = 1
    assert client._plan(None) == ("live", None)
    fresh = _client(2)
    assert fresh._plan(None) == ("live", None)  # no position yet: live


def test_without_a_position_upstreams_are_tried_in_order() -> None:
    client = _client(2)
    assert [client._pick_upstream(a, 0.0) for a in range(4)] == [0, 1, 0, 1]


def _chunk(records: list[bytes]) -> ChunkIndex:
    index, used = index_records(b"".join(records))
    assert used == sum(len(r) for r in records)
    return index


async def test_the_upstream_sessions_own_records_are_taken_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    feed = Feed("EDGE")
    published: list[ChunkIndex] = []
    feed.publish = published.append  # type: ignore[method-assign,assignment]
    source = RelaySource(feed, _opts("lsg://h:1?schemas=trades"))
    _, trades = synthetic_trades(3, seed=1)
    heartbeat = encode_system(1, "Heartbeat", SystemCode.HEARTBEAT)
    notice = encode_system(2, "Feed EDGE: publisher disconnected", SystemCode.UNSET)
    error = encode_error(3, "slow reader", 4)
    caplog.set_level(logging.INFO, logger="gateway.feed")
    source._relay(_chunk([trades[0], heartbeat, trades[1], notice, error, trades[2]]))
    source._relay(_chunk([heartbeat]))
    assert len(published) == 1
    assert bytes(published[0].data) == b"".join(trades)
    said = [r.getMessage() for r in caplog.records if "upstream says" in r.getMessage()]
    assert said == [
        "feed EDGE: upstream says: Feed EDGE: publisher disconnected",
        "feed EDGE: upstream says: slow reader",
    ]
    assert source.stats.last_heard > 0


def test_a_relay_declares_its_schemas() -> None:
    feed = Feed("EDGE")
    feed.on_metadata(SimpleNamespace(schema="trades,tbbo"), mappings=[])
    assert feed.serves("trades") and feed.serves("tbbo")
    assert not feed.serves("mbp-1") and not feed.serves("mbo")
    feed.on_metadata(SimpleNamespace(schema="mbp-1"), mappings=[])
    assert feed.serves("mbp-1") and not feed.serves("tbbo")


async def _batches_of(stream: bytes) -> tuple[list[ChunkIndex], BaseException | None]:
    reader = asyncio.StreamReader()
    reader.feed_data(stream)
    reader.feed_eof()
    client = LiveClient(
        reader,
        None,  # type: ignore[arg-type]  # never written to here
        compression="none",
        ts_out=False,
        heartbeat_interval_s=None,
    )
    client.metadata = object()
    got: list[ChunkIndex] = []
    try:
        async for batch in client.batches():
            got.append(batch.index)
    except ClientError as exc:
        return got, exc
    return got, None


async def test_the_client_hands_over_only_valid_records() -> None:
    _, trades = synthetic_trades(2, seed=3)
    short = bytearray(trades[1])
    short[0] = 8  # a trade header claiming 32 bytes: shorter than a TradeMsg
    got, exc = await _batches_of(trades[0] + bytes(short[:32]))
    assert exc is not None and str(exc).startswith(INVALID_DATA)
    assert "shorter than" in str(exc)
    assert sum(i.count for i in got) == 0  # the batch with the bad record is not handed on
    got, exc = await _batches_of(trades[0] + bytes([2]) + bytes(15))
    assert exc is not None and str(exc).startswith(INVALID_DATA)
    got, exc = await _batches_of(b"".join(trades))
    assert exc is None and sum(i.count for i in got) == 2


def test_checkpoints_name_their_journal_and_a_resume_carries_it() -> None:
    from gateway.checkpoint import ResumeCursor, encode_checkpoint, parse_checkpoint_fields

    assert parse_checkpoint_fields(encode_checkpoint(1, 42, "00ff00ff00ff00ff")) == (
        42,
        "00ff00ff00ff00ff",
    )
    assert parse_checkpoint_fields(encode_checkpoint(1, 42)) == (42, None)
    cursor = ResumeCursor()
    _, trades = synthetic_trades(2, seed=5)
    cursor.feed(_chunk([trades[0], encode_checkpoint(1, 7, "aaaaaaaaaaaaaaaa"), trades[1]]))
    assert (cursor.seq, cursor.epoch, cursor.count) == (7, "aaaaaaaaaaaaaaaa", 1)
    cursor.reset()
    assert cursor.epoch is None


def test_a_journal_keeps_its_epoch_until_it_starts_again_empty(tmp_path: Path) -> None:
    from gateway.journal.dataset import load_epoch, read_epoch

    assert read_epoch(tmp_path) == ""
    first = load_epoch(tmp_path, fresh=False)  # a journal from before epochs gets one
    assert len(first) == 16 and read_epoch(tmp_path) == first
    assert load_epoch(tmp_path, fresh=False) == first
    again = load_epoch(tmp_path, fresh=True)  # no chunk held: seqs start from 1 again
    assert again != first and read_epoch(tmp_path) == again


def test_a_resume_into_another_journal_is_refused(tmp_path: Path) -> None:
    from gateway import control
    from gateway.errors import ProtocolError
    from gateway.journal import JournalStore
    from gateway.replay.refusals import check
    from tests.unit.test_replay_plan import Sub

    store = JournalStore.open(tmp_path, retention_s=86_400.0)
    try:
        journal = store.dataset("DS")
        _, trades = synthetic_trades(4, seed=2)
        for rec in trades:
            journal.append(_chunk([rec]))
        now = 2_000_000_000 * 10**9
        same = Sub("trades", resume_after=2, resume_epoch=journal.epoch)
        assert check(journal, [same], now) is None
        assert check(journal, [Sub("trades", resume_after=2)], now) is None  # none named
        other = check(journal, [Sub("trades", resume_after=2, resume_epoch="0" * 16)], now)
        assert other is not None and other.reason == "bad_resume"
        assert "lsg_resume_after 2" in other.text and "another journal" in other.text
    finally:
        store.close()
    line = control.encode_subscription("trades", "ALL_SYMBOLS", resume_after=5, epoch="ab12")
    assert b"lsg_resume_after=5|lsg_epoch=ab12" in line
    for bad in ("lsg_epoch=xyz|lsg_resume_after=1", "lsg_epoch=ab"):
        line = f"schema=trades|symbols=ALL_SYMBOLS|{bad}".encode()
        with pytest.raises(ProtocolError, match="lsg_epoch"):
            control.parse_subscription(control.parse_fields(line))


def test_an_edge_is_not_ready_before_it_reached_its_upstream() -> None:
    from gateway.feeds.readiness import FeedReadiness
    from gateway.feeds.relay import RelayStats

    edge, ingest = Feed("EDGE"), Feed("ING")
    edge.relay = RelayStats(upstreams=1)
    readiness = FeedReadiness({"EDGE": edge, "ING": ingest}, grace_s=60.0)
    readiness.note()
    ok, detail = readiness.check()
    assert not ok and detail["EDGE"].startswith("down:")
    assert "grace" in detail["ING"]  # other feeds keep their grace at the start
    edge.set_state(True, "upstream connected", notify=False)
    readiness.note()
    assert readiness.check()[0]
    edge.set_state(False, "upstream lost; reconnecting", notify=False)
    readiness.note()
    ok, detail = readiness.check()
    assert ok and "grace" in detail["EDGE"]  # once it was up: the usual grace


async def test_an_abandoned_name_lookup_is_collected_not_logged(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import gc
    import socket

    loop = asyncio.get_running_loop()
    done = asyncio.Event()

    async def slow_lookup(*args: object, **kwargs: object) -> list[object]:
        # as a resolver thread: it goes on when its caller gives up, then fails
        inner: asyncio.Future[list[object]] = loop.create_future()
        failure = socket.gaierror(-3, "Temporary failure in name resolution")
        loop.call_later(0.2, inner.set_exception, failure)
        inner.add_done_callback(lambda _: done.set())
        return await asyncio.shield(inner)

    monkeypatch.setattr(loop, "getaddrinfo", slow_lookup)
    caplog.set_level(logging.ERROR, logger="asyncio")
    with pytest.raises(TimeoutError, match="looking up 'upstream'"):
        await LiveClient.connect("upstream", 1, KEY, "DS", timeout=0.02)
    await asyncio.wait_for(done.wait(), 5.0)
    await asyncio.sleep(0)
    gc.collect()
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]
