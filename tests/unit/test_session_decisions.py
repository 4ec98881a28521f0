"""The protocol decisions the Session makes for its adapter (issue 13): subscriptions held
until start_session, the Metadata header before an ErrorMsg, limit labels, heartbeat
deadlines, and how an end the gateway decides is told."""

from __future__ import annotations

import pytest

from gateway.config import LimitsConfig
from gateway.dbn import ErrorCode
from gateway.errors import (
    AuthError,
    ConfigError,
    LimitExceeded,
    NotSupportedError,
    ProtocolError,
)
from gateway.session import (
    Failed,
    HeartbeatDue,
    Session,
    StartRequested,
    State,
    SubscriptionReady,
)

from .conftest import CHALLENGE, PY_AUTH, authed_session, new_session

SUB = b"schema=trades|stype_in=raw_symbol|symbols=ESZ4|is_last=1|id=1\n"
SUB2 = b"schema=mbo|stype_in=raw_symbol|symbols=NQZ4|is_last=1|id=2\n"
HB10 = PY_AUTH.replace(b"|client=", b"|heartbeat_interval_s=10|client=")


def started(now: float = 0.0, default_heartbeat_s: float = 30.0, auth: bytes = PY_AUTH):
    s = Session(
        challenge=CHALLENGE,
        version="0.1.0",
        limits=LimitsConfig(),
        now=now,
        default_heartbeat_s=default_heartbeat_s,
    )
    s.receive_data(auth, now)
    s.accept(7, now)
    s.data_to_send()
    (start,) = s.receive_data(b"start_session\n", now)
    assert isinstance(start, StartRequested)
    return s


# --- subscriptions wait for start_session ----------------------------------------------


def test_subscriptions_before_start_are_queued_and_handed_back_with_start():
    s = authed_session()
    (ready,) = s.receive_data(SUB, 0.0)
    assert isinstance(ready, SubscriptionReady) and ready.queued
    (start,) = s.receive_data(b"start_session\n", 0.0)
    assert isinstance(start, StartRequested)
    assert start.subscriptions == (ready.subscription,)
    (later,) = s.receive_data(SUB2, 0.0)
    assert isinstance(later, SubscriptionReady) and not later.queued


def test_start_without_subscriptions_hands_back_none():
    s = authed_session()
    (start,) = s.receive_data(b"start_session\n", 0.0)
    assert isinstance(start, StartRequested) and start.subscriptions == ()


# --- the Metadata header before an ErrorMsg ---------------------------------------------


def test_error_before_start_needs_the_metadata_header_first():
    s = authed_session()
    failed = s.receive_data(b"bogus\n", 0.0)[-1]
    assert isinstance(failed, Failed)
    assert failed.after_auth and failed.metadata_first
    assert s.stream_open
    assert not failed.fin_now  # still subscribing: the client may be writing


def test_error_after_start_in_the_same_read_does_not_repeat_the_header():
    s = authed_session()
    events = s.receive_data(b"start_session\nstart_session\n", 0.0)
    assert [type(e) for e in events] == [StartRequested, Failed]
    assert events[1].after_auth and not events[1].metadata_first


def test_error_before_auth_is_a_text_line_without_a_header():
    s = new_session()
    s.data_to_send()
    (failed,) = s.receive_data(b"hello\n", 0.0)
    assert isinstance(failed, Failed)
    assert not failed.after_auth and not failed.metadata_first
    assert s.data_to_send().startswith(b"success=0|error=")


# --- machine-readable reasons -------------------------------------------------------------


@pytest.mark.parametrize(
    ("limits", "data", "kind", "limit"),
    [
        (LimitsConfig(max_symbols=1), SUB.replace(b"ESZ4", b"A,B"), "max_symbols", "max_symbols"),
        (
            LimitsConfig(max_line_bytes=200),
            SUB.replace(b"ESZ4", b"A" * 300),
            "line_too_long",
            "line_too_long",
        ),
        (LimitsConfig(control_burst=1), SUB + SUB2, "control_rate", "control_rate"),
        (LimitsConfig(), b"schema=trades|stype_in=smart|symbols=ES.FUT\n", "not_supported", None),
        (LimitsConfig(), b"bogus\n", "protocol", None),
    ],
)
def test_failures_name_their_reason_and_limit(limits, data, kind, limit):
    s = authed_session(limits)
    failed = s.receive_data(data, 0.0)[-1]
    assert isinstance(failed, Failed)
    assert (failed.kind, failed.limit) == (kind, limit)


def test_timeouts_are_limits():
    s = new_session(LimitsConfig(handshake_timeout_s=1.0))
    (failed,) = s.handle_timer(1.0)
    assert isinstance(failed, Failed) and failed.limit == "handshake_timeout"
    s = new_session(LimitsConfig(start_timeout_s=1.0))
    s.receive_data(PY_AUTH, 0.0)
    s.accept(1, 0.0)
    (failed,) = s.handle_timer(1.0)
    assert isinstance(failed, Failed) and failed.limit == "start_timeout"


def test_reject_carries_the_auth_error_reason_and_limit():
    s = new_session()
    s.receive_data(PY_AUTH, 0.0)
    exc = AuthError("Connection limit exceeded", "session_limit", limit="sessions_per_key")
    failed = s.reject(str(exc), kind=exc.reason, limit=exc.limit)
    assert (failed.kind, failed.limit, failed.after_auth) == (
        "session_limit",
        "sessions_per_key",
        False,
    )


def test_errors_have_a_reason():
    assert ProtocolError("x").reason == "protocol"
    assert NotSupportedError("x").reason == "not_supported"
    assert LimitExceeded("x", "max_symbols").reason == "max_symbols"
    assert LimitExceeded("x", "max_symbols").limit == "max_symbols"
    assert AuthError("x").reason == "bad_key" and AuthError("x").limit is None
    assert ConfigError("x").reason == "config"
    assert str(LimitExceeded("the text", "max_symbols")) == "the text"


# --- heartbeats ---------------------------------------------------------------------------


def test_no_heartbeat_deadline_until_the_header_is_written():
    s = started(now=10.0)
    assert s.next_deadline() is None
    assert s.handle_timer(1e9, last_write=0.0) == []
    s.stream_started(11.0)
    assert s.next_deadline() == 41.0


def test_heartbeat_due_when_idle_for_the_interval():
    s = started(default_heartbeat_s=5.0)
    s.stream_started(0.0)
    assert s.handle_timer(4.9, last_write=0.0) == []
    assert s.handle_timer(5.0, last_write=0.0) == [HeartbeatDue()]
    assert s.next_deadline() == 10.0


def test_a_write_moves_the_heartbeat_deadline():
    s = started(default_heartbeat_s=5.0)
    s.stream_started(0.0)
    assert s.handle_timer(5.0, last_write=3.0) == []
    assert s.next_deadline() == 8.0
    assert s.handle_timer(8.0, last_write=3.0) == [HeartbeatDue()]


def test_the_auth_line_interval_wins_over_the_default():
    s = started(default_heartbeat_s=30.0, auth=HB10)
    assert s.heartbeat_s == 10.0
    s.stream_started(0.0)
    assert s.next_deadline() == 10.0


def test_a_closed_session_has_no_deadline():
    s = started()
    s.stream_started(0.0)
    s.receive_data(b"bogus\n", 1.0)
    assert s.state is State.CLOSED
    assert s.next_deadline() is None
    assert s.handle_timer(1e9, last_write=0.0) == []


# --- ends the gateway decides -------------------------------------------------------------


def test_end_before_auth_is_a_text_line_and_fin_at_once():
    s = new_session()
    s.data_to_send()
    failed = s.end("Gateway shutting down", kind="shutting_down", code=ErrorCode.INTERNAL_ERROR)
    assert failed is not None
    assert not failed.after_auth and failed.fin_now
    assert s.data_to_send() == b"success=0|error=Gateway shutting down\n"


def test_end_while_subscribing_gets_the_header_and_keeps_the_write_side_open():
    s = authed_session()
    failed = s.end("API key revoked", kind="revoked", code=ErrorCode.API_KEY_DEACTIVATED)
    assert failed is not None
    assert failed.after_auth and failed.metadata_first and not failed.fin_now
    assert failed.code == ErrorCode.API_KEY_DEACTIVATED
    assert s.data_to_send() == b""


def test_end_while_streaming_fins_at_once():
    s = started()
    failed = s.end("slow", kind="slow_reader_cap", code=ErrorCode.INTERNAL_ERROR)
    assert failed is not None
    assert failed.after_auth and not failed.metadata_first and failed.fin_now
    assert s.end("again", kind="x", code=ErrorCode.INTERNAL_ERROR) is None
