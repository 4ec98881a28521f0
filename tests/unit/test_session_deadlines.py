"""Session deadlines (issue 11): an authenticated session must start in time, and the
auth line names its missing field plainly."""

from __future__ import annotations

from gateway.config import LimitsConfig
from gateway.session import Failed, StartRequested, State

from .conftest import PY_AUTH, new_session


def accepted(limits: LimitsConfig, now: float = 100.0):
    s = new_session(limits, now)
    s.receive_data(PY_AUTH, now)
    s.accept(7, now)
    s.data_to_send()
    return s


def test_start_deadline_is_armed_at_accept_and_fails_after_auth():
    s = accepted(LimitsConfig(start_timeout_s=5.0))
    assert s.next_deadline() == 105.0
    assert s.handle_timer(104.9) == []
    (failed,) = s.handle_timer(105.0)
    assert isinstance(failed, Failed)
    assert failed.kind == "start_timeout"
    assert failed.after_auth  # an ErrorMsg after the Metadata, not a success=0 line
    assert "start_session not received within 5 s" in failed.reason
    assert s.state is State.CLOSED and s.data_to_send() == b""


def test_start_session_disarms_the_deadline():
    s = accepted(LimitsConfig(start_timeout_s=5.0))
    events = s.receive_data(b"schema=trades|symbols=ALL_SYMBOLS\nstart_session\n", 101.0)
    assert isinstance(events[-1], StartRequested)
    assert s.next_deadline() is None
    assert s.handle_timer(1_000.0) == []


def test_missing_dataset_is_named():
    s = new_session()
    s.data_to_send()
    (failed,) = s.receive_data(b"auth=" + b"a" * 64 + b"-00000|encoding=dbn\n", 0.0)
    assert isinstance(failed, Failed)
    assert s.data_to_send() == (
        b"success=0|error=invalid authentication request: missing field dataset\n"
    )
