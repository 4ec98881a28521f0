"""Control lines (PROTOCOL.md §1): parse by key, first '=' only, typed values."""

from __future__ import annotations

import hashlib
import itertools

import pytest

from gateway import auth, control
from gateway.control import AuthRequest, parse_auth, parse_fields, parse_subscription
from gateway.errors import NotSupportedError, ProtocolError

AUTH = "a" * 64 + "-AbC12"
PY_CLIENT = "Databento/0.88.0 Python/3.11.7 Linux/6.18.44-fc-v657"

# Auth lines in each official client's key order (PROTOCOL.md §1.4).
AUTH_LINES = {
    "python": f"auth={AUTH}|dataset=GLBX.MDP3|encoding=dbn|ts_out=0|compression=none|"
    f"client={PY_CLIENT}",
    "rust": f"auth={AUTH}|dataset=GLBX.MDP3|encoding=dbn|compression=none|ts_out=0|"
    f"client={PY_CLIENT}",
    "cpp": f"auth={AUTH}|dataset=GLBX.MDP3|encoding=dbn|ts_out=0|compression=none|"
    f"client={PY_CLIENT}",
}

# Subscription lines in each client's key order (PROTOCOL.md §1.6).
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


@pytest.mark.parametrize("start", ["0", "1700000000000000000", "2024-01-01T00:00:00"])
def test_parse_subscription_start_not_supported(start):
    with pytest.raises(NotSupportedError):
        parse_subscription(
            fields(
                f"schema=trades|stype_in=raw_symbol|symbols=A|start={start}|snapshot=0|is_last=1"
            )
        )


def test_parse_subscription_snapshot_not_supported():
    with pytest.raises(NotSupportedError):
        parse_subscription(fields("schema=mbo|stype_in=raw_symbol|symbols=A|snapshot=1|is_last=1"))
    req = parse_subscription(
        fields("schema=mbo|stype_in=raw_symbol|symbols=A|snapshot=0|is_last=1")
    )
    assert req.snapshot is False


@pytest.mark.parametrize("stype", ["parent", "continuous"])
def test_parse_subscription_parent_continuous_not_supported(stype):
    with pytest.raises(NotSupportedError):
        parse_subscription(
            fields(f"schema=trades|stype_in={stype}|symbols=ES.FUT|snapshot=0|is_last=1")
        )


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
