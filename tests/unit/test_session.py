"""Session state machine (``gateway/session.py``, its rules 1-4): bytes in, events out."""

from __future__ import annotations

import string

import pytest

from gateway.auth import cram_response, new_challenge
from gateway.config import LimitsConfig
from gateway.control import parse_fields
from gateway.session import (
    AuthRequested,
    Failed,
    Session,
    StartRequested,
    State,
    SubscriptionReady,
)

from .conftest import CHALLENGE, PY_AUTH, authed_session, new_session

KEY = "db-TESTKEY0000000000000000000000"
RESPONSE = cram_response(CHALLENGE, KEY)

#: Auth lines exactly as each official client orders them (databento-python, Rust, C++).
CLIENT_AUTH = {
    "python": (
        f"auth={RESPONSE}|dataset=GLBX.MDP3|encoding=dbn|ts_out=0|compression=zstd|"
        "client=Databento/0.88.0 Python/3.11.7 Linux/6.18.44-fc-v657\n"
    ),
    "python_hb_slow": (
        f"auth={RESPONSE}|dataset=GLBX.MDP3|encoding=dbn|ts_out=1|"
        "compression=none|heartbeat_interval_s=10|slow_reader_behavior=skip|"
        "client=Databento/0.88.0 Python/3.11.7 Linux/6.18.44\n"
    ),
    "rust": (
        f"auth={RESPONSE}|dataset=GLBX.MDP3|encoding=dbn|compression=zstd|ts_out=0|"
        "client=Databento/0.30.0 Rust linux-x86_64\n"
    ),
    "rust_hb": (
        f"auth={RESPONSE}|dataset=GLBX.MDP3|encoding=dbn|compression=none|ts_out=1|"
        "client=Databento/0.30.0 Rust linux-x86_64|heartbeat_interval_s=10|"
        "slow_reader_behavior=drop\n"
    ),
    "cpp": (
        f"auth={RESPONSE}|dataset=GLBX.MDP3|encoding=dbn|ts_out=0|compression=zstd|"
        "client=Databento C++/0.40.0 ext\n"
    ),
}


def lines(data: bytes) -> list[bytes]:
    assert data.endswith(b"\n")
    return data[:-1].split(b"\n")


def sub_line(
    symbols: list[str] | str,
    *,
    schema: str = "trades",
    sub_id: int | None = 1,
    is_last: bool = True,
    stype: str = "raw_symbol",
    order: str = "python",
) -> bytes:
    syms = symbols if isinstance(symbols, str) else ",".join(symbols)
    last = int(is_last)
    ident = "" if sub_id is None else f"|id={sub_id}"
    if order == "python":
        text = f"schema={schema}|stype_in={stype}|symbols={syms}|snapshot=0{ident}|is_last={last}"
    elif order == "rust":
        text = f"schema={schema}|stype_in={stype}|symbols={syms}|snapshot=0|is_last={last}{ident}"
    else:  # C++
        text = f"schema={schema}|stype_in={stype}{ident}|symbols={syms}|snapshot=0|is_last={last}"
    return text.encode() + b"\n"


def only_failed(events) -> Failed:
    assert len(events) == 1 and isinstance(events[0], Failed), events
    return events[0]


def assert_success0(out: bytes) -> str:
    """``out`` is exactly one ``success=0|error=...`` line; returns the error text."""
    assert out.count(b"\n") == 1 and out.endswith(b"\n"), out
    got = parse_fields(out[:-1])
    assert set(got) == {"success", "error"}
    assert got["success"] == "0"
    assert got["error"]
    return got["error"]


# --- greeting and authentication -------------------------------------------------------


def test_greeting_is_version_line_then_cram_line():
    challenge = new_challenge()
    s = Session(challenge=challenge, version="0.1.0", limits=LimitsConfig(), now=0.0)
    out = s.data_to_send()
    assert out == b"lsg_version=0.1.0\ncram=" + challenge.encode() + b"\n"
    first, second = lines(out)
    assert set(parse_fields(first)) == {"lsg_version"}
    assert set(parse_fields(second)) == {"cram"}
    assert len(challenge) == 32
    assert set(challenge) <= set(string.ascii_letters + string.digits)
    assert s.data_to_send() == b""
    assert s.state is State.AWAIT_AUTH


def test_challenges_differ():
    assert len({new_challenge() for _ in range(20)}) == 20


@pytest.mark.parametrize("client", sorted(CLIENT_AUTH))
def test_auth_line_in_client_key_order(client):
    s = new_session()
    s.data_to_send()
    events = s.receive_data(CLIENT_AUTH[client].encode(), 0.0)
    assert len(events) == 1 and isinstance(events[0], AuthRequested)
    req = events[0].request
    assert req.auth == RESPONSE
    assert req.dataset == "GLBX.MDP3"
    assert req.encoding == "dbn"
    fields = parse_fields(CLIENT_AUTH[client].encode().rstrip(b"\n"))
    assert req.ts_out is (fields["ts_out"] == "1")
    assert req.compression == fields["compression"]
    assert req.client == fields["client"]
    if "heartbeat_interval_s" in fields:
        assert req.heartbeat_interval_s == 10
    # Rule 2: nothing is written until the adapter decides.
    assert s.data_to_send() == b""
    assert s.state is State.AWAIT_AUTH


def test_accept_writes_success_line_with_decimal_session_id():
    s = new_session()
    s.data_to_send()
    s.receive_data(PY_AUTH, 0.0)
    s.accept(1_700_000_000_123)
    out = s.data_to_send()
    assert out == b"success=1|session_id=1700000000123\n"
    got = parse_fields(out[:-1])
    assert set(got) == {"success", "session_id"}
    assert got["session_id"].isdigit()
    assert s.state is State.AUTHENTICATED
    assert s.next_deadline() is None


def test_reject_writes_success0_and_closes():
    s = new_session()
    s.data_to_send()
    s.receive_data(PY_AUTH, 0.0)
    failed = s.reject("Authentication failed.")
    assert isinstance(failed, Failed)
    assert failed.after_auth is False
    assert s.data_to_send() == b"success=0|error=Authentication failed.\n"
    assert s.state is State.CLOSED
    assert s.receive_data(sub_line(["A"]), 1.0) == []
    assert s.data_to_send() == b""


def test_heartbeat_interval_property():
    s = new_session()
    assert s.heartbeat_interval_s is None
    s.receive_data(CLIENT_AUTH["python_hb_slow"].encode(), 0.0)
    assert s.heartbeat_interval_s == 10
    assert s.auth is not None and s.auth.slow_reader_behavior == "skip"


def test_auth_and_subscription_in_one_read_wait_for_the_decision():
    s = new_session()
    s.data_to_send()
    events = s.receive_data(PY_AUTH + sub_line(["ESZ4"]) + b"start_session=0\n", 0.0)
    assert [type(e) for e in events] == [AuthRequested]
    assert s.data_to_send() == b""
    s.accept(9)
    assert s.data_to_send() == b"success=1|session_id=9\n"
    later = s.resume(0.1)
    assert [type(e) for e in later] == [SubscriptionReady, StartRequested]
    assert later[0].subscription.symbols == ("ESZ4",)
    assert s.state is State.STREAMING
    assert s.data_to_send() == b""


@pytest.mark.parametrize(
    "line",
    [
        b"schema=trades|stype_in=raw_symbol|symbols=A|is_last=1\n",  # subscription first
        b"start_session\n",
        b"hello\n",
        b"auth=x|encoding=dbn\n",  # no dataset
        b"auth=x|dataset=GLBX.MDP3|encoding=csv\n",  # encoding != dbn
        b"auth=x|dataset=GLBX.MDP3|heartbeat_interval_s=4\n",
        b"auth=x|dataset=GLBX.MDP3|heartbeat_interval_s=1801\n",
    ],
)
def test_bad_first_line_gets_success0(line):
    s = new_session()
    s.data_to_send()
    failed = only_failed(s.receive_data(line, 0.0))
    assert failed.after_auth is False
    assert_success0(s.data_to_send())
    assert s.state is State.CLOSED


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00\x01\x02\xff\xfe\n",
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\n",
        b"DBN\x03x\x00\x00\x00\n",
        b"\xe2\x82\xac=1\n",
    ],
)
def test_binary_garbage_before_auth_gets_success0(garbage):
    s = new_session()
    s.data_to_send()
    events = s.receive_data(garbage, 0.0)
    failed = only_failed(events)
    assert failed.after_auth is False
    assert_success0(s.data_to_send())
    assert s.receive_data(PY_AUTH, 0.0) == []


# --- subscriptions ---------------------------------------------------------------------


@pytest.mark.parametrize("order", ["python", "rust", "cpp"])
def test_chunked_subscription_surfaces_once_with_all_symbols(order):
    s = authed_session()
    symbols = [f"S{i:04d}" for i in range(1200)]
    chunks = [symbols[i : i + 500] for i in range(0, 1200, 500)]
    events = []
    for n, chunk in enumerate(chunks):
        got = s.receive_data(
            sub_line(chunk, schema="mbp-1", sub_id=3, is_last=n == len(chunks) - 1, order=order),
            1.0,
        )
        if n < len(chunks) - 1:
            assert got == []
        events += got
    assert len(events) == 1 and isinstance(events[0], SubscriptionReady)
    sub = events[0].subscription
    assert sub.schema == "mbp-1"
    assert sub.stype_in == "raw_symbol"
    assert sub.sub_id == 3
    assert sub.symbols == tuple(symbols)
    assert not sub.all_symbols
    assert s.subscriptions == [sub]
    assert s.data_to_send() == b""


def test_interleaved_subscription_ids():
    s = authed_session()
    assert s.receive_data(sub_line(["A", "B"], sub_id=1, is_last=False), 0.0) == []
    got = s.receive_data(sub_line(["X"], schema="mbo", sub_id=2), 0.0)
    assert [e.subscription.symbols for e in got] == [("X",)]
    assert got[0].subscription.schema == "mbo"
    got = s.receive_data(sub_line(["C"], sub_id=1), 0.0)
    assert [e.subscription.symbols for e in got] == [("A", "B", "C")]
    assert [sub.sub_id for sub in s.subscriptions] == [2, 1]


def test_subscription_without_id():
    s = authed_session()
    got = s.receive_data(sub_line(["ESZ4"], sub_id=None), 0.0)
    assert got[0].subscription.sub_id is None
    assert got[0].subscription.symbols == ("ESZ4",)


def test_all_symbols_and_instrument_id_subscriptions():
    s = authed_session()
    (ev,) = s.receive_data(sub_line("ALL_SYMBOLS", schema="definition"), 0.0)
    assert ev.subscription.all_symbols
    (ev,) = s.receive_data(sub_line(["101", "202"], stype="instrument_id", sub_id=2), 0.0)
    assert ev.subscription.stype_in == "instrument_id"
    assert ev.subscription.symbols == ("101", "202")


def test_chunk_with_other_schema_is_failed_after_auth():
    s = authed_session()
    assert s.receive_data(sub_line(["A"], sub_id=5, is_last=False), 0.0) == []
    failed = only_failed(s.receive_data(sub_line(["B"], schema="mbo", sub_id=5), 0.0))
    assert failed.after_auth is True
    assert s.data_to_send() == b""
    assert s.state is State.CLOSED
    assert s.subscriptions == []


@pytest.mark.parametrize(
    ("line", "kind"),
    [
        (
            b"schema=trades|stype_in=raw_symbol|symbols=A|start=yesterday|snapshot=0|is_last=1\n",
            "protocol",
        ),
        (
            b"schema=mbo|stype_in=raw_symbol|symbols=A|start=0|snapshot=1|is_last=1\n",
            "protocol",
        ),
        (b"schema=trades|stype_in=raw_symbol|symbols=A|snapshot=1|is_last=1\n", "protocol"),
        (b"schema=trades|stype_in=smart|symbols=ES.FUT|snapshot=0|is_last=1\n", "not_supported"),
        (b"schema=nope|stype_in=raw_symbol|symbols=A|is_last=1\n", "protocol"),
        (b"symbols=A|is_last=1\n", "protocol"),
        (b"hello\n", "protocol"),
        (b"\xff\x00\x01\n", "protocol"),
        (b"auth=again|dataset=GLBX.MDP3\n", "protocol"),
        (b"schema=trades|stype_in=raw_symbol|symbols=|is_last=1\n", "protocol"),
    ],
)
def test_bad_line_after_auth_is_failed_without_text(line, kind):
    s = authed_session()
    failed = only_failed(s.receive_data(line, 0.0))
    assert failed.after_auth is True
    assert failed.kind == kind
    assert failed.reason
    assert s.data_to_send() == b""
    assert s.state is State.CLOSED


# --- start_session ---------------------------------------------------------------------


@pytest.mark.parametrize("line", [b"start_session\n", b"start_session=0\n"])
def test_start_session_forms(line):
    s = authed_session()
    assert s.receive_data(sub_line(["A"]), 0.0)
    events = s.receive_data(line, 0.0)
    assert len(events) == 1 and isinstance(events[0], StartRequested)
    assert s.state is State.STREAMING
    assert s.data_to_send() == b""


def test_subscriptions_after_start_are_allowed():
    s = authed_session()
    s.receive_data(b"start_session\n", 0.0)
    (ev,) = s.receive_data(sub_line(["NQZ4"], sub_id=2, order="rust"), 1.0)
    assert isinstance(ev, SubscriptionReady)
    assert ev.subscription.symbols == ("NQZ4",)


@pytest.mark.parametrize("second", [b"start_session\n", b"start_session=0\n"])
def test_second_start_session_fails(second):
    s = authed_session()
    assert isinstance(s.receive_data(b"start_session\n", 0.0)[0], StartRequested)
    failed = only_failed(s.receive_data(second, 0.1))
    assert failed.after_auth is True
    assert s.state is State.CLOSED
    assert s.data_to_send() == b""


# --- split reads -------------------------------------------------------------------------

SCRIPT = (
    sub_line(["ESZ4", "NQZ4"], sub_id=1, is_last=False)
    + sub_line(["RTYZ4"], sub_id=1)
    + sub_line("ALL_SYMBOLS", schema="definition", sub_id=2, order="cpp")
    + b"start_session\n"
    + sub_line(["CLZ4"], schema="mbo", sub_id=3, order="rust")
)


def summarize(events) -> list[tuple]:
    out: list[tuple] = []
    for e in events:
        if isinstance(e, SubscriptionReady):
            sub = e.subscription
            out.append(("sub", sub.schema, sub.stype_in, sub.symbols, sub.sub_id))
        elif isinstance(e, AuthRequested):
            out.append(("auth", e.request))
        else:
            out.append((type(e).__name__,))
    return out


def test_script_fed_whole():
    s = authed_session()
    got = summarize(s.receive_data(SCRIPT, 0.0))
    assert got == [
        ("sub", "trades", "raw_symbol", ("ESZ4", "NQZ4", "RTYZ4"), 1),
        ("sub", "definition", "raw_symbol", ("ALL_SYMBOLS",), 2),
        ("StartRequested",),
        ("sub", "mbo", "raw_symbol", ("CLZ4",), 3),
    ]


def test_lines_split_at_every_byte():
    s = authed_session()
    expected = summarize(s.receive_data(SCRIPT, 0.0))
    for cut in range(1, len(SCRIPT)):
        s = authed_session()
        got = s.receive_data(SCRIPT[:cut], 0.0) + s.receive_data(SCRIPT[cut:], 0.0)
        assert summarize(got) == expected, cut
    s = authed_session()
    got = []
    for i in range(len(SCRIPT)):
        got += s.receive_data(SCRIPT[i : i + 1], 0.0)
    assert summarize(got) == expected


@pytest.mark.parametrize("client", sorted(CLIENT_AUTH))
def test_auth_line_split_at_every_byte(client):
    line = CLIENT_AUTH[client].encode()
    whole = new_session().receive_data(line, 0.0)
    for cut in range(len(line) + 1):
        s = new_session()
        got = s.receive_data(line[:cut], 0.0) + s.receive_data(line[cut:], 0.0)
        assert summarize(got) == summarize(whole)


def test_greeting_then_auth_one_byte_at_a_time():
    s = new_session()
    got = []
    for i in range(len(PY_AUTH)):
        got += s.receive_data(PY_AUTH[i : i + 1], 0.0)
    assert [type(e) for e in got] == [AuthRequested]


# --- limits ------------------------------------------------------------------------------

SMALL_LINES = LimitsConfig(max_line_bytes=200)


def test_line_under_limit_is_accepted():
    s = authed_session(SMALL_LINES)
    line = sub_line(["X" * 100])
    assert len(line) <= 200
    assert isinstance(s.receive_data(line, 0.0)[0], SubscriptionReady)


def test_line_too_long_before_auth_with_newline():
    s = new_session(SMALL_LINES)
    s.data_to_send()
    line = b"auth=" + b"a" * 300 + b"|dataset=GLBX.MDP3\n"
    failed = only_failed(s.receive_data(line, 0.0))
    assert failed.kind == "line_too_long"
    assert failed.after_auth is False
    assert_success0(s.data_to_send())
    assert s.state is State.CLOSED


def test_line_too_long_before_auth_without_newline_fails_early():
    s = new_session(SMALL_LINES)
    s.data_to_send()
    fed = 0
    events = []
    while not events:
        events = s.receive_data(b"x" * 10, 0.0)
        fed += 10
        assert fed <= 210, "an endless line must be refused once it passes the limit"
    failed = only_failed(events)
    assert failed.kind == "line_too_long"
    assert failed.after_auth is False
    assert_success0(s.data_to_send())


def test_line_too_long_after_auth():
    s = authed_session(SMALL_LINES)
    failed = only_failed(s.receive_data(sub_line([f"S{i:03d}" for i in range(100)]), 0.0))
    assert failed.kind == "line_too_long"
    assert failed.after_auth is True
    assert s.data_to_send() == b""
    assert s.state is State.CLOSED


def test_line_too_long_after_auth_without_newline():
    s = authed_session(SMALL_LINES)
    events = s.receive_data(b"schema=trades|symbols=" + b"A," * 200, 0.0)
    failed = only_failed(events)
    assert failed.kind == "line_too_long"
    assert failed.after_auth is True
    assert s.data_to_send() == b""


def test_default_limit_accepts_a_full_500_symbol_chunk():
    # 500 symbols of up to 70 characters: ~36 KB, must fit (the clients' 500-symbol chunks).
    s = authed_session()
    symbols = [f"{i:03d}".ljust(70, "X") for i in range(500)]
    line = sub_line(symbols)
    assert len(line) > 35_000
    (ev,) = s.receive_data(line, 0.0)
    assert len(ev.subscription.symbols) == 500


def test_handshake_timeout():
    s = new_session(LimitsConfig(handshake_timeout_s=5.0), now=100.0)
    s.data_to_send()
    assert s.next_deadline() == 105.0
    assert s.handle_timer(104.9) == []
    failed = only_failed(s.handle_timer(105.0))
    assert failed.kind == "handshake_timeout"
    assert failed.after_auth is False
    assert_success0(s.data_to_send())
    assert s.state is State.CLOSED
    assert s.receive_data(PY_AUTH, 105.1) == []


def test_handshake_timer_stops_after_accept():
    s = authed_session(LimitsConfig(handshake_timeout_s=5.0), now=0.0)
    assert s.next_deadline() is None
    assert s.handle_timer(1e9) == []
    assert s.state is State.AUTHENTICATED


def test_partial_auth_line_does_not_stop_the_timeout():
    s = new_session(LimitsConfig(handshake_timeout_s=5.0))
    s.receive_data(PY_AUTH[:20], 1.0)
    assert only_failed(s.handle_timer(5.0)).kind == "handshake_timeout"


def test_symbols_over_max_symbols():
    s = authed_session(LimitsConfig(max_symbols=5))
    assert s.receive_data(sub_line(["A", "B", "C"], sub_id=1), 0.0)
    assert s.receive_data(sub_line(["D", "E"], sub_id=2), 0.0)
    failed = only_failed(s.receive_data(sub_line(["F"], sub_id=3), 0.0))
    assert failed.kind == "max_symbols"
    assert failed.after_auth is True
    assert s.data_to_send() == b""


def test_symbols_over_max_symbols_across_chunks():
    s = authed_session(LimitsConfig(max_symbols=4))
    assert s.receive_data(sub_line(["A", "B", "C"], is_last=False), 0.0) == []
    failed = only_failed(s.receive_data(sub_line(["D", "E"]), 0.0))
    assert failed.kind == "max_symbols"


def test_subscriptions_over_max_subscriptions():
    s = authed_session(LimitsConfig(max_subscriptions=2))
    assert s.receive_data(sub_line(["A"], sub_id=1), 0.0)
    assert s.receive_data(sub_line(["B"], sub_id=2), 0.0)
    failed = only_failed(s.receive_data(sub_line(["C"], sub_id=3), 0.0))
    assert failed.kind == "max_subscriptions"


def test_control_rate_limit():
    s = authed_session(LimitsConfig(control_rate_per_s=10.0, control_burst=5))
    events = []
    for i in range(10):
        events += s.receive_data(sub_line(["A"], sub_id=i), 0.0)
        if s.state is State.CLOSED:
            break
    assert isinstance(events[-1], Failed)
    assert events[-1].kind == "control_rate"
    assert events[-1].after_auth is True
    ready = [e for e in events if isinstance(e, SubscriptionReady)]
    assert 4 <= len(ready) < 10
    assert s.data_to_send() == b""


def test_control_rate_within_budget_never_fails():
    s = authed_session(LimitsConfig(control_rate_per_s=10.0, control_burst=5))
    now = 0.0
    for i in range(200):  # 5 per second, half the allowed rate
        now += 0.2
        (ev,) = s.receive_data(sub_line(["A"], sub_id=i), now)
        assert isinstance(ev, SubscriptionReady)


# --- closed ------------------------------------------------------------------------------


def test_data_after_closed_is_ignored():
    s = authed_session()
    only_failed(s.receive_data(b"bogus\n", 0.0))
    assert s.receive_data(SCRIPT, 1.0) == []
    assert s.handle_timer(1e9) == []
    assert s.data_to_send() == b""


def test_receive_eof_closes():
    s = authed_session()
    s.receive_eof()
    assert s.state is State.CLOSED
    assert s.receive_data(SCRIPT, 0.0) == []


# --- replay fields ------------------------------------------------------------------------


def test_subscription_carries_start_and_resume_after():
    s = authed_session()
    (a,) = s.receive_data(
        b"schema=trades|stype_in=raw_symbol|symbols=A|start=2026-12-01T00:00:00.5Z|id=1\n", 0.0
    )
    (b,) = s.receive_data(b"schema=mbp-1|symbols=ALL_SYMBOLS|lsg_resume_after=41|id=2\n", 0.0)
    (c,) = s.receive_data(b"schema=trades|symbols=B|start=0|id=3\n", 0.0)
    (d,) = s.receive_data(sub_line(["C"], sub_id=4), 0.0)
    (start,) = s.receive_data(b"start_session\n", 0.0)
    assert isinstance(start, StartRequested)
    subs = start.subscriptions
    assert [e.subscription for e in (a, b, c, d)] == list(subs)
    assert [(x.start_ns, x.resume_after) for x in subs] == [
        (1_796_083_200_500_000_000, None),
        (None, 41),
        (0, None),
        (None, None),
    ]


def test_chunked_subscription_keeps_the_start_of_its_first_line():
    s = authed_session()
    assert s.receive_data(b"schema=trades|symbols=A|start=5|id=7|is_last=0\n", 0.0) == []
    (ev,) = s.receive_data(b"schema=trades|symbols=B|start=5|id=7|is_last=1\n", 0.0)
    assert ev.subscription.symbols == ("A", "B")
    assert ev.subscription.start_ns == 5


def test_subscription_after_start_keeps_its_start_as_sent():
    s = authed_session()
    s.receive_data(b"start_session\n", 0.0)
    (ev,) = s.receive_data(b"schema=trades|symbols=A|start=9\n", 1.0)
    assert isinstance(ev, SubscriptionReady) and not ev.queued
    assert ev.subscription.start_ns == 9


@pytest.mark.parametrize(
    "line",
    [
        b"schema=trades|symbols=A|start=tomorrow\n",
        b"schema=trades|symbols=A|start=0|lsg_resume_after=1\n",
        b"schema=trades|symbols=A|lsg_resume_after=-1\n",
    ],
)
def test_bad_replay_fields_fail_the_session(line):
    s = authed_session()
    failed = only_failed(s.receive_data(line, 0.0))
    assert failed.kind == "protocol"
    assert "start" in failed.reason or "lsg_resume_after" in failed.reason
