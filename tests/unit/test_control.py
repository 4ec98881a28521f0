"""Control lines (``gateway/control.py``): parse by key, first '=' only, typed values."""

from __future__ import annotations

import hashlib
import itertools
import re

import pytest

from gateway import auth, control
from gateway.control import AuthRequest, parse_auth, parse_fields, parse_subscription
from gateway.errors import NotSupportedError, ProtocolError

AUTH = "a" * 64 + "-AbC12"
PY_CLIENT = "Databento/0.88.0 Python/3.11.7 Linux/6.18.44-fc-v657"

# Auth lines in each official client's key order (databento-python, the Rust and C++ clients).
AUTH_LINES = {
    "python": f"auth={AUTH}|dataset=GLBX.MDP3|encoding=dbn|ts_out=0|compression=none|"
    f"client={PY_CLIENT}",
    "rust": f"auth={AUTH}|dataset=GLBX.MDP3|encoding=dbn|compression=none|ts_out=0|"
    f"client={PY_CLIENT}",
    "cpp": f"auth={AUTH}|dataset=GLBX.MDP3|encoding=dbn|ts_out=0|compression=none|"
    f"client={PY_CLIENT}",
}

# Subscription lines in each client's key order (500-symbol chunks, is_last on the final one).
SUB_LINES = {
    "python": "schema=trades|stype_in=raw_symbol|symbols=ESZ4,NQZ4|snapshot=0|id=0|is_last=1",
    "rust": "schema=trades|stype_in=raw_symbol|symbols=ESZ4,NQZ4|snapshot=0|is_last=1|id=0",
    "cpp": "schema=trades|stype_in=raw_symbol|id=0|symbols=ESZ4,NQZ4|snapshot=0|is_last=1",
}

ALL_SCHEMAS = (
    "mbo mbp-1 mbp-10 tbbo trades ohlcv-1s ohlcv-1m ohlcv-1h ohlcv-1d ohlcv-eod "
    "definition statistics status imbalance cmbp-1 cbbo-1s cbbo-1m tcbbo bbo-1s "
    "bbo-1m"
).split()


def fields(text: str) -> dict[str, str]:
    return parse_fields(text.encode())


# --- parse_fields --------------------------------------------------------------------


def test_parse_fields_splits_tokens_by_key():
    assert fields("a=1|bb=two|c=") == {"a": "1", "bb": "two", "c": ""}


def test_parse_fields_splits_on_first_equals_only():
    got = fields("client=x=y|details=a==b=|k==v")
    assert got == {"client": "x=y", "details": "a==b=", "k": "=v"}


def test_parse_fields_keeps_spaces_and_slashes_in_values():
    got = fields(f"client={PY_CLIENT}|symbols=AAPL  250221C00250000")
    assert got["client"] == PY_CLIENT
    assert got["symbols"] == "AAPL  250221C00250000"


@pytest.mark.parametrize("line", ["start_session", "start_session=0", "start_session=1"])
def test_parse_fields_start_session_forms(line):
    got = fields(line)
    assert list(got) == ["start_session"]


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"novalue",
        b"a=1|novalue",
        b"=value",
        b"a=1||b=2",
        b"a=1|=2",
        b"a=\x01",
        b"a=\x00b",
        b"a=\tb",
        b"\xff\xfe=1",
        "dataset=GL\u00c9X".encode(),
        b"a=1|b=\x1b[31m",
    ],
)
def test_parse_fields_rejects_malformed_lines(line):
    with pytest.raises(ProtocolError):
        parse_fields(line)


# --- parse_auth ----------------------------------------------------------------------


@pytest.mark.parametrize("client", sorted(AUTH_LINES))
def test_parse_auth_each_official_key_order(client):
    req = parse_auth(fields(AUTH_LINES[client]))
    assert isinstance(req, AuthRequest)
    assert req.auth == AUTH
    assert req.dataset == "GLBX.MDP3"
    assert req.encoding == "dbn"
    assert req.ts_out is False
    assert req.compression == "none"
    assert req.client == PY_CLIENT
    assert req.heartbeat_interval_s is None
    assert req.slow_reader_behavior is None


def test_parse_auth_is_key_order_independent():
    tokens = AUTH_LINES["python"].split("|") + [
        "heartbeat_interval_s=10",
        "slow_reader_behavior=skip",
    ]
    expected = parse_auth(fields("|".join(tokens)))
    for perm in itertools.islice(itertools.permutations(tokens), 0, None, 97):
        assert parse_auth(fields("|".join(perm))) == expected
    assert expected.heartbeat_interval_s == 10
    assert expected.slow_reader_behavior == "skip"


def test_parse_auth_ignores_unknown_keys():
    base = parse_auth(fields(AUTH_LINES["rust"]))
    more = parse_auth(fields(AUTH_LINES["rust"] + "|details=x|future_key=1|zz=a=b"))
    assert more == base


def test_parse_auth_typed_values():
    req = parse_auth(
        fields(f"auth={AUTH}|dataset=XNAS.ITCH|ts_out=1|compression=zstd|heartbeat_interval_s=10")
    )
    assert req.heartbeat_interval_s == 10
    assert type(req.heartbeat_interval_s) is int
    assert req.ts_out is True
    assert req.compression == "zstd"
    assert req.dataset == "XNAS.ITCH"


def test_parse_auth_defaults_for_older_clients():
    # Python < 0.71 sends no compression key; nobody must send heartbeat/slow reader.
    req = parse_auth(fields(f"auth={AUTH}|dataset=GLBX.MDP3|encoding=dbn|ts_out=1|client=x"))
    assert req.compression == "none"
    assert req.ts_out is True
    assert req.heartbeat_interval_s is None


@pytest.mark.parametrize("value", [5, 6, 30, 1799, 1800])
def test_parse_auth_heartbeat_in_range(value):
    req = parse_auth(fields(AUTH_LINES["cpp"] + f"|heartbeat_interval_s={value}"))
    assert req.heartbeat_interval_s == value


@pytest.mark.parametrize("value", ["4", "0", "-5", "1801", "100000", "ten", "", "1.5x"])
def test_parse_auth_heartbeat_out_of_range_or_bad(value):
    with pytest.raises(ProtocolError):
        parse_auth(fields(AUTH_LINES["cpp"] + f"|heartbeat_interval_s={value}"))


@pytest.mark.parametrize("encoding", ["csv", "json", "DBN", "dbn2"])
def test_parse_auth_encoding_other_than_dbn_not_supported(encoding):
    line = AUTH_LINES["python"].replace("encoding=dbn", f"encoding={encoding}")
    with pytest.raises(NotSupportedError):
        parse_auth(fields(line))


@pytest.mark.parametrize("value", ["warn", "skip", "drop"])
def test_parse_auth_slow_reader_behaviors(value):
    req = parse_auth(fields(AUTH_LINES["python"] + f"|slow_reader_behavior={value}"))
    assert req.slow_reader_behavior == value


@pytest.mark.parametrize(
    "line",
    [
        f"dataset=GLBX.MDP3|encoding=dbn|ts_out=0|client={PY_CLIENT}",  # no auth
        f"auth={AUTH}|encoding=dbn|ts_out=0",  # no dataset
        AUTH_LINES["python"] + "|slow_reader_behavior=fast",
        AUTH_LINES["python"].replace("compression=none", "compression=gzip"),
        AUTH_LINES["python"].replace("ts_out=0", "ts_out=maybe"),
        "schema=trades|symbols=ESZ4",  # a subscription is not an auth request
    ],
)
def test_parse_auth_rejects_bad_requests(line):
    with pytest.raises(ProtocolError):
        parse_auth(fields(line))


# --- parse_subscription --------------------------------------------------------------


@pytest.mark.parametrize("client", sorted(SUB_LINES))
def test_parse_subscription_each_official_key_order(client):
    req = parse_subscription(fields(SUB_LINES[client]))
    assert req.schema == "trades"
    assert req.stype_in == "raw_symbol"
    assert req.symbol_list == ["ESZ4", "NQZ4"]
    assert req.id == 0
    assert type(req.id) is int
    assert req.is_last is True
    assert req.snapshot is False
    assert req.start is None


def test_parse_subscription_key_order_independent_and_unknown_keys():
    tokens = [
        "schema=mbp-10",
        "stype_in=instrument_id",
        "symbols=1,2,3",
        "snapshot=0",
        "id=17",
        "is_last=0",
        "zzz=1",
    ]
    expected = parse_subscription(fields("|".join(tokens)))
    for perm in itertools.permutations(tokens):
        assert parse_subscription(fields("|".join(perm))) == expected
    assert expected.schema == "mbp-10"
    assert expected.stype_in == "instrument_id"
    assert expected.symbol_list == ["1", "2", "3"]
    assert expected.id == 17
    assert expected.is_last is False


@pytest.mark.parametrize("schema", ALL_SCHEMAS)
def test_parse_subscription_every_documented_schema(schema):
    req = parse_subscription(
        fields(f"schema={schema}|stype_in=raw_symbol|symbols=A|snapshot=0|is_last=1")
    )
    assert req.schema == schema


@pytest.mark.parametrize("schema", ["mbp-2", "trade", "MBO", "ohlcv-5m", "", "bbo-1h"])
def test_parse_subscription_unknown_schema_is_protocol_error(schema):
    with pytest.raises(ProtocolError) as exc:
        parse_subscription(fields(f"schema={schema}|stype_in=raw_symbol|symbols=A|is_last=1"))
    assert not isinstance(exc.value, NotSupportedError)


@pytest.mark.parametrize(
    ("start", "ns"),
    [
        ("0", 0),
        ("1700000000000000000", 1_700_000_000_000_000_000),
        ("2024-01-01T00:00:00", 1_704_067_200_000_000_000),
    ],
)
def test_parse_subscription_start_accepted(start, ns):
    req = parse_subscription(
        fields(f"schema=trades|stype_in=raw_symbol|symbols=A|start={start}|snapshot=0|is_last=1")
    )
    assert req.start == start
    assert req.start_ns == ns
    assert req.lsg_resume_after is None


def test_parse_subscription_empty_start_is_no_start():
    req = parse_subscription(fields("schema=trades|symbols=A|start=|is_last=1"))
    assert req.start_ns is None


@pytest.mark.parametrize("start", ["x", "-1", "1.5e18", "2026-02-30", "2026-12-01T10:00:00+24:00"])
def test_parse_subscription_bad_start_names_the_field(start):
    with pytest.raises(ProtocolError) as exc:
        parse_subscription(fields(f"schema=trades|symbols=A|start={start}|is_last=1"))
    assert not isinstance(exc.value, NotSupportedError)
    assert str(exc.value).startswith("invalid subscription: bad value for start (")


def test_parse_subscription_snapshot_with_start_is_refused():
    # as the official clients: a snapshot is of the live books, never with a replay
    with pytest.raises(ProtocolError, match="snapshot=1 cannot be combined with start"):
        parse_subscription(fields("schema=mbo|symbols=A|start=0|snapshot=1|is_last=1"))
    with pytest.raises(ProtocolError, match="snapshot=1 cannot be combined with start"):
        parse_subscription(fields("schema=mbo|symbols=A|lsg_resume_after=5|snapshot=1|is_last=1"))


def test_parse_subscription_snapshot_only_for_mbo():
    with pytest.raises(ProtocolError, match="snapshot=1 is only for mbo, not trades"):
        parse_subscription(fields("schema=trades|symbols=A|snapshot=1|is_last=1"))
    req = parse_subscription(
        fields("schema=mbo|stype_in=raw_symbol|symbols=A|snapshot=1|is_last=1")
    )
    assert req.snapshot is True
    req = parse_subscription(
        fields("schema=mbo|stype_in=raw_symbol|symbols=A|snapshot=0|is_last=1")
    )
    assert req.snapshot is False


@pytest.mark.parametrize("stype", ["parent", "continuous"])
def test_parse_subscription_parent_continuous_accepted(stype):
    req = parse_subscription(
        fields(f"schema=trades|stype_in={stype}|symbols=ES.FUT|snapshot=0|is_last=1")
    )
    assert req.stype_in == stype


@pytest.mark.parametrize("extra", ["start=0", "lsg_resume_after=9"])
def test_parse_subscription_parent_replay_not_supported(extra):
    with pytest.raises(NotSupportedError, match="stype_in=parent with start or lsg_resume_after"):
        parse_subscription(
            fields(f"schema=trades|stype_in=parent|symbols=ES.FUT|{extra}|is_last=1")
        )


def test_parse_subscription_smart_not_supported():
    with pytest.raises(NotSupportedError, match="stype_in=smart is not supported yet"):
        parse_subscription(fields("schema=trades|stype_in=smart|symbols=ES.FUT|is_last=1"))


def test_parse_subscription_unknown_stype_is_protocol_error():
    with pytest.raises(ProtocolError):
        parse_subscription(fields("schema=trades|stype_in=ticker|symbols=ES|is_last=1"))


def test_parse_subscription_instrument_ids_must_be_u32():
    ok = parse_subscription(
        fields(f"schema=trades|stype_in=instrument_id|symbols=0,42,{2**32 - 1}|is_last=1")
    )
    assert ok.symbol_list == ["0", "42", str(2**32 - 1)]
    for bad in ("ESZ4", "-1", str(2**32), "1.5"):
        with pytest.raises(ProtocolError):
            parse_subscription(
                fields(f"schema=trades|stype_in=instrument_id|symbols={bad}|is_last=1")
            )


@pytest.mark.parametrize("sub_id", ["-1", str(2**32), "x"])
def test_parse_subscription_bad_id(sub_id):
    with pytest.raises(ProtocolError):
        parse_subscription(fields(f"schema=trades|symbols=A|id={sub_id}|is_last=1"))


def test_parse_subscription_all_symbols():
    req = parse_subscription(
        fields("schema=trades|stype_in=raw_symbol|symbols=ALL_SYMBOLS|snapshot=0|is_last=1")
    )
    assert req.symbol_list == [control.ALL_SYMBOLS]


def test_parse_subscription_500_symbol_chunk():
    symbols = [f"SYM{i:04d}" for i in range(500)]
    req = parse_subscription(
        fields(
            f"schema=mbp-1|stype_in=raw_symbol|symbols={','.join(symbols)}"
            "|snapshot=0|id=3|is_last=0"
        )
    )
    assert req.symbol_list == symbols
    assert req.is_last is False


# --- server lines --------------------------------------------------------------------


def test_server_lines():
    assert control.greeting_line("1.2.3") == b"lsg_version=1.2.3\n"
    assert control.challenge_line("abc") == b"cram=abc\n"
    assert control.auth_success(12345) == b"success=1|session_id=12345\n"
    assert control.auth_failure("Authentication failed.") == (
        b"success=0|error=Authentication failed.\n"
    )


@pytest.mark.parametrize("reason", ["bad|key", "two\nlines", "cr\rlf\r\n", "caf\u00e9 | x=y"])
def test_auth_failure_is_always_one_parseable_line(reason):
    line = control.auth_failure(reason)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    got = parse_fields(line[:-1])
    assert set(got) == {"success", "error"}
    assert got["success"] == "0"
    assert got["error"]


# --- client lines (the one wire codec) -------------------------------------------------


def test_cram_response_is_sha256_of_challenge_bar_key_then_bucket():
    key = "db-" + "k" * 27 + "AbC12"
    challenge = "c" * 32
    digest = hashlib.sha256(f"{challenge}|{key}".encode()).hexdigest()
    assert control.cram_response(challenge, key) == f"{digest}-AbC12"
    # The gateway checks answers with the same function (one implementation).
    assert auth.cram_response is control.cram_response


KEY = "db-" + "k" * 27 + "AbC12"


def _old_client_auth(challenge, key, dataset, ts_out, compression, hb, slow, name):
    """The authentication line exactly as gateway/client.py built it by hand before."""
    digest = hashlib.sha256(f"{challenge}|{key}".encode()).hexdigest()
    fields = [
        f"auth={digest}-{key[-5:]}",
        f"dataset={dataset}",
        "encoding=dbn",
        f"ts_out={int(ts_out)}",
        f"compression={compression}",
    ]
    if hb is not None:
        fields.append(f"heartbeat_interval_s={hb}")
    if slow is not None:
        fields.append(f"slow_reader_behavior={slow}")
    fields.append(f"client={name}")
    return ("|".join(fields) + "\n").encode()


def _old_client_subscribe(schema, items, stype_in, sub_id):
    """The subscription lines exactly as gateway/client.py built them by hand before."""
    chunks = [items[i : i + 500] for i in range(0, len(items), 500)] or [[]]
    lines = []
    for n, chunk in enumerate(chunks):
        last = int(n == len(chunks) - 1)
        lines.append(
            f"schema={schema}|stype_in={stype_in}|symbols={','.join(chunk)}"
            f"|snapshot=0|id={sub_id}|is_last={last}\n"
        )
    return "".join(lines).encode()


@pytest.mark.parametrize(
    ("ts_out", "compression", "hb", "slow", "name"),
    [
        (False, "none", None, None, "gateway-client"),
        (True, "zstd", 10, "skip", "probe"),
        (False, "none", None, "warn", "bench"),
        (True, "none", 1800, None, "x=y/1.0 Linux"),
    ],
)
def test_encode_auth_is_the_bytes_the_client_sent(ts_out, compression, hb, slow, name):
    challenge = "Q" * 32
    got = control.encode_auth(
        control.cram_response(challenge, KEY),
        "GLBX.MDP3",
        ts_out=ts_out,
        compression=compression,
        heartbeat_interval_s=hb,
        slow_reader_behavior=slow,
        client=name,
    )
    assert got == _old_client_auth(challenge, KEY, "GLBX.MDP3", ts_out, compression, hb, slow, name)
    req = parse_auth(parse_fields(got[:-1]))
    assert req == AuthRequest(
        auth=control.cram_response(challenge, KEY),
        dataset="GLBX.MDP3",
        ts_out=ts_out,
        compression=compression,
        heartbeat_interval_s=hb,
        slow_reader_behavior=slow,
        client=name,
    )


def test_encode_auth_optional_keys_and_extra():
    line = control.encode_auth(
        "r", "D", ts_out=None, compression=None, extra={"heartbeat_interval_s": 2}, client="t"
    )
    assert line == b"auth=r|dataset=D|encoding=dbn|heartbeat_interval_s=2|client=t\n"
    assert control.encode_auth("r", "D") == (
        b"auth=r|dataset=D|encoding=dbn|ts_out=0|compression=none\n"
    )


@pytest.mark.parametrize(
    ("schema", "items", "stype_in", "sub_id"),
    [
        ("trades", ["AAPL", "MSFT"], "raw_symbol", 1),
        ("mbp-1", ["ALL_SYMBOLS"], "instrument_id", 7),
        ("trades", [], "raw_symbol", 2),
        ("mbp-10", [f"S{i}" for i in range(1001)], "raw_symbol", 3),
        ("ohlcv-1s", [f"S{i}" for i in range(500)], "raw_symbol", 4),
    ],
)
def test_encode_subscriptions_is_the_bytes_the_client_sent(schema, items, stype_in, sub_id):
    got = control.encode_subscriptions(schema, items, stype_in=stype_in, sub_id=sub_id)
    assert got == _old_client_subscribe(schema, items, stype_in, sub_id)
    lines = got.split(b"\n")[:-1]
    assert len(lines) == max(1, -(-len(items) // 500))
    reqs = [parse_subscription(parse_fields(line)) for line in lines]
    assert [s for r in reqs for s in r.symbol_list] == items
    assert [r.is_last for r in reqs] == [False] * (len(reqs) - 1) + [True]
    assert {(r.schema, r.stype_in, r.id, r.snapshot) for r in reqs} == {
        (schema, stype_in, sub_id, False)
    }


def test_encode_subscription_string_symbols_and_left_out_keys():
    assert control.encode_subscription("trades", "ALL_SYMBOLS", snapshot=None, is_last=None) == (
        b"schema=trades|stype_in=raw_symbol|symbols=ALL_SYMBOLS\n"
    )
    line = control.encode_subscription("mbp-1", ["A", "B"], sub_id=0, is_last=False)
    assert line == b"schema=mbp-1|stype_in=raw_symbol|symbols=A,B|snapshot=0|id=0|is_last=0\n"
    assert parse_subscription(parse_fields(line[:-1])).id == 0


def test_start_session_line_parses():
    assert control.START_SESSION == b"start_session\n"
    assert list(parse_fields(control.START_SESSION[:-1])) == ["start_session"]


@pytest.mark.parametrize(
    ("fields_in", "named"),
    [
        ({"symbols": "A|B"}, "symbols"),
        ({"client": "two\nlines"}, "client"),
        ({"client": "cr\r"}, "client"),
        ({"a=b": "1"}, "a=b"),
        ({"": "1"}, "''"),
    ],
)
def test_encode_fields_refuses_what_would_not_read_back(fields_in, named):
    with pytest.raises(ValueError, match=re.escape(named)):
        control.encode_fields(fields_in)


def test_encode_fields_round_trips_through_parse_fields():
    src = {"a": "1", "b": "x=y", "c": "", "d": True, "e": 0, "f": None}
    line = control.encode_fields(src)
    assert line == b"a=1|b=x=y|c=|d=1|e=0\n"
    assert parse_fields(line[:-1]) == {"a": "1", "b": "x=y", "c": "", "d": "1", "e": "0"}


async def test_live_client_sends_the_codec_bytes():
    """What LiveClient writes on a real socket: the same bytes as before the codec."""
    import asyncio

    from gateway.client import LiveClient

    got = bytearray()
    done = asyncio.Event()

    async def serve(reader, writer):
        writer.write(b"lsg_version=0.1.0\ncram=" + b"Z" * 32 + b"\n")
        got.extend(await reader.readline())
        writer.write(b"success=1|session_id=9\n")
        while b"start_session\n" not in got:
            more = await reader.read(65536)
            if not more:
                break
            got.extend(more)
        done.set()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        client = await LiveClient.connect(
            "127.0.0.1", port, KEY, "DEMO.SYNTH", heartbeat_interval_s=15, ts_out=True
        )
        symbols = [f"S{i}" for i in range(600)]
        assert await client.subscribe("trades", symbols) == 1
        client.started = True  # the fake server sends no Metadata: write start by hand
        client._writer.write(control.START_SESSION)
        await asyncio.wait_for(done.wait(), 10)
        await client.close()
    finally:
        server.close()
        await server.wait_closed()
    expected = (
        _old_client_auth("Z" * 32, KEY, "DEMO.SYNTH", True, "none", 15, None, "gateway-client")
        + _old_client_subscribe("trades", symbols, "raw_symbol", 1)
        + b"start_session\n"
    )
    assert bytes(got) == expected


def test_encode_auth_extra_keeps_a_repeated_key_where_it_is_given():
    line = control.encode_auth("r", "D", extra={"ts_out": 1}, client="t")
    assert line == b"auth=r|dataset=D|encoding=dbn|ts_out=0|compression=none|ts_out=1|client=t\n"
    assert parse_auth(parse_fields(line[:-1])).ts_out is True


async def test_support_clients_send_the_bytes_they_built_by_hand():
    """tests.support.wire writes with the codec: the same lines as the hand-built ones it
    replaced (helpers' RawClient.handshake, the soak's hostile client)."""
    import asyncio

    from tests.support.waiting import apoll_until
    from tests.support.wire import AsyncRawClient, RawClient

    challenge = "Y" * 32
    got: list[bytes] = []

    async def serve(reader, writer):
        writer.write(b"lsg_version=0.1.0\ncram=" + challenge.encode() + b"\n")
        data = await reader.readline()
        writer.write(b"success=1|session_id=1\n")
        while not data.endswith(b"start_session\n"):
            more = await reader.readline()
            if not more:
                break
            data += more
        got.append(data)
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    digest = hashlib.sha256(f"{challenge}|{KEY}".encode()).hexdigest()
    try:

        def raw() -> None:
            c = RawClient(port)
            assert c.handshake(KEY, "DS", extra="|heartbeat_interval_s=2").startswith("success=1")
            c.start()
            c.close()

        await asyncio.to_thread(raw)
        h = AsyncRawClient(port, KEY, "DS", client_name="soak")
        await h.open()
        assert await h.authed()
        await h.send(
            control.encode_subscription("trades", "ALL_SYMBOLS", snapshot=None, is_last=None)
        )
        await h.send(control.START_SESSION)
        await apoll_until(lambda: len(got) == 2, timeout=10, what="both clients' lines")
        h.close()
    finally:
        server.close()
        await server.wait_closed()
    assert (
        got[0]
        == (
            f"auth={digest}-{KEY[-5:]}|dataset=DS|encoding=dbn|ts_out=0|"
            "compression=none|heartbeat_interval_s=2|client=test\nstart_session\n"
        ).encode()
    )
    assert (
        got[1]
        == (
            f"auth={digest}-{KEY[-5:]}|dataset=DS|encoding=dbn|ts_out=0|client=soak\n"
            "schema=trades|stype_in=raw_symbol|symbols=ALL_SYMBOLS\nstart_session\n"
        ).encode()
    )


# --- replay fields: start (parse_start), lsg_resume_after, lsg_checkpoints --------------

# 2026-12-01T00:00:00Z in UNIX seconds
DEC1 = 1_796_083_200
NS = 1_000_000_000


@pytest.mark.parametrize(
    ("text", "ns"),
    [
        ("0", 0),
        ("1", 1),
        ("1796083200123456789", 1_796_083_200_123_456_789),
        ("18446744073709551615", 2**64 - 1),
        ("2026-12-01", DEC1 * NS),
        ("2026-12-01T10:00", (DEC1 + 36_000) * NS),
        ("2026-12-01T10:00:00", (DEC1 + 36_000) * NS),
        ("2026-12-01 10:00:00", (DEC1 + 36_000) * NS),
        ("2026-12-01T10:00:00Z", (DEC1 + 36_000) * NS),
        ("2026-12-01T10:00:00z", (DEC1 + 36_000) * NS),
        ("2026-12-01T10:00:00.5Z", (DEC1 + 36_000) * NS + 500_000_000),
        ("2026-12-01T10:00:00,25", (DEC1 + 36_000) * NS + 250_000_000),
        # nine digits kept exactly (a float would round the last ones)
        ("2026-12-01T10:00:00.123456789Z", (DEC1 + 36_000) * NS + 123_456_789),
        ("2026-12-01T10:00:00.000000001", (DEC1 + 36_000) * NS + 1),
        ("2026-12-01T10:00:00.123456789+01:00", (DEC1 + 32_400) * NS + 123_456_789),
        ("2026-12-01T10:00:00-05:30", (DEC1 + 36_000 + 19_800) * NS),
        ("2026-12-01T10:00:00+0100", (DEC1 + 32_400) * NS),
        ("2026-12-01T10:00:00+01", (DEC1 + 32_400) * NS),
        ("2026-12-01T00:30:00+01:00", (DEC1 - 1_800) * NS),
        ("1970-01-01", 0),
        (" 2026-12-01 ", DEC1 * NS),
    ],
)
def test_parse_start_forms(text, ns):
    assert control.parse_start(text) == ns


@pytest.mark.parametrize(
    "text",
    [
        "",
        "now",
        "-1",
        "+5",
        "1e18",
        "1.5",
        "0x10",
        "18446744073709551616",
        "2026-12",
        "2026-1-1",
        "26-12-01",
        "2026-13-01",
        "2026-02-30",
        "2026-12-01T25:00",
        "2026-12-01T10:60",
        "2026-12-01T10",
        "2026-12-01T10:00:00.",
        "2026-12-01T10:00:00.1234567891",
        "2026-12-01T10:00:00+24:00",
        "2026-12-01T10:00:00+01:60",
        "2026-12-01T10:00:00 UTC",
        "1969-12-31T23:59:59Z",
        "1970-01-01T00:30:00+01:00",
        "2600-01-01",
        "١٢٣",  # digits, but not ASCII ones
    ],
)
def test_parse_start_malformed_names_the_field(text):
    with pytest.raises(ProtocolError) as exc:
        control.parse_start(text)
    assert not isinstance(exc.value, NotSupportedError)
    assert str(exc.value).startswith("bad value for start (")


def test_parse_start_message_is_clear():
    with pytest.raises(ProtocolError, match=r"UNIX nanoseconds, or an ISO 8601 date"):
        control.parse_start("yesterday")
    with pytest.raises(ProtocolError, match=r"month must be in 1\.\.12"):
        control.parse_start("2026-13-01")


@pytest.mark.parametrize(
    ("text", "seq"), [("0", 0), ("17", 17), ("18446744073709551615", 2**64 - 1)]
)
def test_parse_subscription_resume_after(text, seq):
    req = parse_subscription(fields(f"schema=trades|symbols=A|lsg_resume_after={text}|is_last=1"))
    assert req.lsg_resume_after == seq
    assert req.start_ns is None


@pytest.mark.parametrize("text", ["-1", "18446744073709551616", "x", "1.5", ""])
def test_parse_subscription_bad_resume_after_names_the_field(text):
    with pytest.raises(ProtocolError, match="bad value for lsg_resume_after"):
        parse_subscription(fields(f"schema=trades|symbols=A|lsg_resume_after={text}|is_last=1"))


@pytest.mark.parametrize("start", ["0", "2026-12-01"])
def test_parse_subscription_start_with_resume_after_is_refused(start):
    with pytest.raises(ProtocolError, match="start and lsg_resume_after") as exc:
        parse_subscription(
            fields(f"schema=trades|symbols=A|start={start}|lsg_resume_after=3|is_last=1")
        )
    assert not isinstance(exc.value, NotSupportedError)


def test_parse_subscription_without_replay_fields():
    req = parse_subscription(fields(SUB_LINES["python"]))
    assert req.start_ns is None
    assert req.lsg_resume_after is None


@pytest.mark.parametrize(("text", "on"), [(None, False), ("0", False), ("1", True)])
def test_parse_auth_checkpoints(text, on):
    line = AUTH_LINES["python"] + ("" if text is None else f"|lsg_checkpoints={text}")
    assert parse_auth(fields(line)).lsg_checkpoints is on


def test_parse_auth_bad_checkpoints_names_the_field():
    with pytest.raises(ProtocolError, match="bad value for lsg_checkpoints"):
        parse_auth(fields(AUTH_LINES["python"] + "|lsg_checkpoints=maybe"))


def test_encode_subscription_replay_fields():
    line = control.encode_subscription("trades", ["A"], sub_id=1, start=1_700_000_000_000_000_000)
    assert line == (
        b"schema=trades|stype_in=raw_symbol|symbols=A|start=1700000000000000000|snapshot=0"
        b"|id=1|is_last=1\n"
    )
    assert parse_subscription(parse_fields(line[:-1])).start_ns == 1_700_000_000_000_000_000
    line = control.encode_subscription("trades", "ALL_SYMBOLS", start="2026-12-01T10:00:00Z")
    assert parse_subscription(parse_fields(line[:-1])).start_ns == (DEC1 + 36_000) * NS
    line = control.encode_subscription("trades", ["A"], resume_after=42, is_last=None)
    assert line == b"schema=trades|stype_in=raw_symbol|symbols=A|lsg_resume_after=42|snapshot=0\n"
    assert parse_subscription(parse_fields(line[:-1])).lsg_resume_after == 42


def test_encode_subscriptions_replay_fields_on_every_line():
    got = control.encode_subscriptions(
        "trades", [f"S{i}" for i in range(501)], sub_id=3, resume_after=9
    )
    reqs = [parse_subscription(parse_fields(line)) for line in got.split(b"\n")[:-1]]
    assert [r.lsg_resume_after for r in reqs] == [9, 9]
    got = control.encode_subscriptions("trades", ["A"], sub_id=3, start=0)
    assert parse_subscription(parse_fields(got[:-1])).start_ns == 0


def test_encode_auth_checkpoints():
    assert control.encode_auth("r", "D", lsg_checkpoints=True, client="t") == (
        b"auth=r|dataset=D|encoding=dbn|ts_out=0|compression=none|lsg_checkpoints=1|client=t\n"
    )
    line = control.encode_auth("r", "D", lsg_checkpoints=True)
    assert parse_auth(parse_fields(line[:-1])).lsg_checkpoints is True
