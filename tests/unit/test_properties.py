"""Property tests: hostile bytes never crash the sans-I/O core."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings, strategies as st

from gateway import control
from gateway.config import LimitsConfig as Limits
from gateway.control import parse_fields
from gateway.dbn import SCHEMAS, index_records
from gateway.errors import GatewayError, NotSupportedError, ProtocolError
from gateway.session import (
    AuthRequested,
    Failed,
    StartRequested,
    State,
    SubscriptionReady,
)

from .conftest import PY_AUTH, authed_session, mixed_records, new_session, split_records

SETTINGS = settings(
    max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)

FRAGMENTS = [
    PY_AUTH,
    b"schema=trades|stype_in=raw_symbol|symbols=ESZ4,NQZ4|snapshot=0|id=1|is_last=0\n",
    b"schema=trades|stype_in=raw_symbol|symbols=RTYZ4|snapshot=0|id=1|is_last=1\n",
    b"schema=mbo|stype_in=instrument_id|symbols=1,2|id=2|is_last=1\n",
    b"schema=mbp-1|stype_in=raw_symbol|symbols=ALL_SYMBOLS|is_last=1\n",
    b"start_session\n",
    b"start_session=0\n",
    b"auth=x|dataset=GLBX.MDP3|heartbeat_interval_s=4\n",
    b"schema=tbbo|start=0|symbols=A\n",
    b"\n",
    b"\r\n",
    b"|",
    b"=",
    b"id=",
    b"is_last=0",
    b"\x00\xff\x80",
    b"symbols=" + b"A," * 40,
]

byte_soup = st.lists(
    st.one_of(st.sampled_from(FRAGMENTS), st.binary(max_size=40)), max_size=12
).map(b"".join)
splits = st.lists(st.integers(min_value=0, max_value=10_000), max_size=12)
LIMITS = Limits(
    max_line_bytes=256,
    max_symbols=20,
    max_subscriptions=5,
    control_rate_per_s=50.0,
    control_burst=8,
)


def pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False)] or [b""]


def check_events(events, session, *, after_auth: bool) -> None:
    for i, event in enumerate(events):
        assert isinstance(event, (AuthRequested, SubscriptionReady, StartRequested, Failed))
        if isinstance(event, Failed):
            assert i == len(events) - 1
            assert event.after_auth is after_auth
            assert event.reason
            assert session.state is State.CLOSED
        if isinstance(event, SubscriptionReady):
            assert event.subscription.symbols
            assert event.subscription.schema in SCHEMAS


@SETTINGS
@given(data=byte_soup, cuts=splits)
def test_any_bytes_before_auth(data, cuts):
    s = new_session(LIMITS)
    s.data_to_send()
    events = []
    now = 0.0
    for piece in pieces(data, cuts):
        events += s.receive_data(piece, now)
        now += 0.001
    check_events(events, s, after_auth=False)
    out = s.data_to_send()
    if any(isinstance(e, Failed) for e in events):
        # exactly one success=0 line, parseable by the clients
        assert out.endswith(b"\n") and out.count(b"\n") == 1
        got = parse_fields(out[:-1])
        assert set(got) == {"success", "error"} and got["success"] == "0"
    else:
        assert out == b""
        assert len([e for e in events if isinstance(e, AuthRequested)]) <= 1


@SETTINGS
@given(data=byte_soup, cuts=splits)
def test_any_bytes_after_accept(data, cuts):
    s = authed_session(LIMITS)
    events = []
    now = 0.0
    for piece in pieces(data, cuts):
        events += s.receive_data(piece, now)
        now += 0.001
    check_events(events, s, after_auth=True)
    assert not any(isinstance(e, AuthRequested) for e in events)
    assert s.data_to_send() == b""  # after success=1 the session writes no text
    assert sum(isinstance(e, StartRequested) for e in events) <= 1


@SETTINGS
@given(data=byte_soup)
def test_split_does_not_change_events(data):
    whole = authed_session(LIMITS)
    expected = whole.receive_data(data, 0.0)
    byte_by_byte = authed_session(LIMITS)
    got = []
    for i in range(len(data)):
        got += byte_by_byte.receive_data(data[i : i + 1], 0.0)
    assert [type(e) for e in got] == [type(e) for e in expected]
    assert [e.subscription for e in got if isinstance(e, SubscriptionReady)] == [
        e.subscription for e in expected if isinstance(e, SubscriptionReady)
    ]


@settings(max_examples=500, deadline=None, database=None)
@given(line=st.binary(max_size=200).filter(lambda b: b"\n" not in b))
def test_parse_fields_only_raises_protocol_error(line):
    try:
        fields = parse_fields(line)
    except ProtocolError:
        return
    except Exception as exc:  # pragma: no cover - the failure message
        raise AssertionError(f"parse_fields raised {exc!r}") from exc
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in fields.items())
    for parse in (control.parse_auth, control.parse_subscription):
        try:
            parse(fields)
        except (ProtocolError, NotSupportedError):
            pass


keys = st.sampled_from(
    [
        "auth",
        "dataset",
        "encoding",
        "ts_out",
        "compression",
        "heartbeat_interval_s",
        "slow_reader_behavior",
        "client",
        "schema",
        "stype_in",
        "symbols",
        "start",
        "snapshot",
        "id",
        "is_last",
        "other",
    ]
)
values = st.one_of(
    st.sampled_from(
        [
            "",
            "0",
            "1",
            "-1",
            "10",
            "1800",
            "1801",
            "dbn",
            "zstd",
            "trades",
            "mbo",
            "raw_symbol",
            "instrument_id",
            "parent",
            "ALL_SYMBOLS",
            "2.5",
            "1e3",
            str(2**64),
            "true",
        ]
    ),
    st.text(
        alphabet=st.characters(min_codepoint=32, max_codepoint=126, blacklist_characters="|"),
        max_size=12,
    ),
)


@settings(max_examples=500, deadline=None, database=None)
@given(pairs=st.lists(st.tuples(keys, values), min_size=1, max_size=8))
def test_typed_parsers_only_raise_gateway_errors(pairs):
    line = "|".join(f"{k}={v}" for k, v in pairs).encode()
    fields = parse_fields(line)
    for parse in (control.parse_auth, control.parse_subscription):
        try:
            parse(fields)
        except GatewayError as exc:
            assert isinstance(exc, (ProtocolError, NotSupportedError))


@settings(max_examples=200, deadline=None, database=None)
@given(order=st.permutations(range(12)), cut=st.integers(min_value=0, max_value=5000))
def test_index_records_random_concatenations(order, cut):
    pool = mixed_records()
    recs = [pool[(i * 7) % len(pool)] for i in order]
    blob = b"".join(recs)
    cut %= len(blob) + 1
    index, used = index_records(blob[:cut])
    whole = []
    total = 0
    for r in recs:
        if total + len(r) > cut:
            break
        whole.append(r)
        total += len(r)
    assert used == total
    assert index.count == len(whole)
    assert split_records(index.data) == whole
