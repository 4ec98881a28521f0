"""SharedLimits (gateway/workers/limits.py): gateway-wide counts across worker processes.

The race tests run real processes (tests/unit/limits_child.py) on one file; the rest drive the
hooks (ServerState.admit, Authenticator.acquire/release) with two "workers" mapped in this
process, and compare every refusal with the single-process line for the same limit.
"""

from __future__ import annotations

import os
import select
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest

from gateway.auth import Authenticator, KeyEntry
from gateway.config import LimitsConfig
from gateway.errors import AuthError
from gateway.metrics import Metrics
from gateway.server import ClientConnection, ServerState
from gateway.workers.limits import LimitsFileError, SharedLimits

KEY = "db-SHAREDKEY000000000000000000000"
OTHER = "db-OTHERSHARED0000000000000000000"


@pytest.fixture
def supervisor() -> Iterator[SharedLimits]:
    limits = SharedLimits.create(2)
    try:
        yield limits
    finally:
        limits.unlink()


def _attach(sup: SharedLimits, slot: int) -> SharedLimits:
    return SharedLimits.attach(sup.path, slot)


# --- real processes racing -------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]


class _Child:
    """A worker process (tests/unit/limits_child.py) stepped line by line."""

    def __init__(self, path: str, slot: int, max_sessions: int, attempts: int, mode: str) -> None:
        args = [path, str(slot), KEY, str(max_sessions), str(attempts), mode]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.unit.limits_child", *args],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def step(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()

    def line(self, timeout: float = 30.0) -> str:
        out = self.proc.stdout
        assert out is not None
        ready, _, _ = select.select([out], [], [], timeout)
        assert ready, "no answer from the child process in time"
        text = out.readline().strip()
        assert text, f"the child process ended (exit {self.proc.wait(5)})"
        return text

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


def _in_step(children: list[_Child]) -> list[str]:
    for child in children:
        child.step()
    return [child.line() for child in children]


def test_processes_racing_never_admit_more_than_max_sessions() -> None:
    workers, attempts, max_sessions = 3, 20000, 2
    sup = SharedLimits.create(workers)
    children: list[_Child] = []
    try:
        children = [_Child(sup.path, s, max_sessions, attempts, "race") for s in range(workers)]
        assert [c.line() for c in children] == ["ready"] * workers
        got = [int(line.split()[1]) for line in _in_step(children)]  # all grab at once
        assert sum(got) == max_sessions  # exactly the limit, over every process
        assert _in_step(children) == [f"total {max_sessions}"] * workers
        churn = [line.split() for line in _in_step(children)]
        assert sum(int(c[1]) for c in churn) >= attempts  # the churn admitted sessions...
        assert [c[3] for c in churn] == ["0"] * workers  # ...and never one too many
        for child in children:
            assert child.proc.wait(10) == 0
        assert sup.sessions_of(KEY) == 0
    finally:
        for child in children:
            child.stop()
        sup.unlink()


def test_clear_worker_after_a_worker_is_killed(supervisor: SharedLimits) -> None:
    child = _Child(supervisor.path, 1, 100, 3, "hold")
    other = _attach(supervisor, 0)
    try:
        assert child.line() == "ready"
        assert _in_step([child]) == ["held"]
        assert other.try_acquire(KEY, 100) is None
        assert supervisor.sessions_of(KEY) == 4
        assert supervisor.totals() == (3, 3)
        child.proc.kill()
        child.proc.wait(10)
        supervisor.clear_worker(1)  # what the supervisor does for a dead worker
        assert supervisor.sessions_of(KEY) == 1  # the other worker's session is kept
        assert supervisor.totals() == (0, 0)
        assert supervisor.row(1) == (0, 0, 0)
        assert supervisor.row(0) == (0, 0, 1)
    finally:
        child.stop()
        other.close()


# --- the file ---------------------------------------------------------------------------------


def test_file_is_private_and_checked(supervisor: SharedLimits, tmp_path: Path) -> None:
    assert stat.S_IMODE(os.stat(supervisor.path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(supervisor.path)).st_mode) == 0o700
    assert supervisor.workers == 2
    foreign = tmp_path / "limits"
    foreign.write_bytes(b"\0" * 4096)
    with pytest.raises(LimitsFileError, match="not a shared limits file"):
        SharedLimits.attach(str(foreign), 0)
    with pytest.raises(LimitsFileError, match="slot 2 out of range"):
        SharedLimits.attach(supervisor.path, 2)
    directory = os.path.dirname(supervisor.path)
    supervisor.unlink()
    assert not os.path.exists(directory)


def test_a_new_worker_in_a_slot_starts_at_zero(supervisor: SharedLimits) -> None:
    first = _attach(supervisor, 1)
    assert first.try_acquire(KEY, 5) is None
    assert first.try_open(5, 5) is None
    first.close()  # "died" without counting down; the next one in slot 1 starts clean
    second = _attach(supervisor, 1)
    assert supervisor.sessions_of(KEY) == 0
    assert supervisor.totals() == (0, 0)
    second.close()


def test_key_columns_grow_and_every_process_follows() -> None:
    sup = SharedLimits.create(2, key_columns=1)
    a, b = _attach(sup, 0), _attach(sup, 1)
    try:
        keys = [f"db-KEY{i:026d}" for i in range(5)]
        for key in keys:
            assert a.try_acquire(key, 2) is None
        for key in reversed(keys):  # b maps the grown file at its first locked step
            assert b.try_acquire(key, 2) is None
            assert a.try_acquire(key, 2) == 2
        assert [sup.sessions_of(k) for k in keys] == [2] * 5
        b.release_key(keys[0])
        assert a.try_acquire(keys[0], 2) is None
        sup.clear_worker(0)
        assert [sup.sessions_of(k) for k in keys] == [0, 1, 1, 1, 1]
    finally:
        a.close()
        b.close()
        sup.unlink()


# --- the hooks: refusals identical to the single process's ------------------------------------


def _entry(max_sessions: int, key: str = KEY, name: str = "desk") -> KeyEntry:
    return KeyEntry(key=key, key_id=name, datasets=None, max_sessions=max_sessions)


def _refusal(auth: Authenticator, entry: KeyEntry) -> str:
    with pytest.raises(AuthError) as info:
        auth.acquire(entry, "GLBX.MDP3", {"GLBX.MDP3"})
    assert info.value.reason == "session_limit"
    return str(info.value)


def test_session_limit_refusal_is_the_single_process_line(supervisor: SharedLimits) -> None:
    single = Authenticator([_entry(3)])
    one = single.entries[0]
    for _ in range(3):
        single.acquire(one, "GLBX.MDP3", {"GLBX.MDP3"})
    expected = _refusal(single, one)
    assert expected == "Connection limit exceeded: this API key already has 3 of 3 sessions"

    w0, w1 = _attach(supervisor, 0), _attach(supervisor, 1)
    auths = [Authenticator([_entry(3)]), Authenticator([_entry(3)])]
    auths[0].shared, auths[1].shared = w0, w1
    e0, e1 = auths[0].entries[0], auths[1].entries[0]
    auths[0].acquire(e0, "GLBX.MDP3", {"GLBX.MDP3"})
    auths[1].acquire(e1, "GLBX.MDP3", {"GLBX.MDP3"})
    auths[1].acquire(e1, "GLBX.MDP3", {"GLBX.MDP3"})
    assert _refusal(auths[0], e0) == expected  # on either worker
    assert _refusal(auths[1], e1) == expected
    auths[1].release(e1)
    auths[0].acquire(e0, "GLBX.MDP3", {"GLBX.MDP3"})
    assert (e0.active, e1.active) == (2, 1)
    assert supervisor.sessions_of(KEY) == 3
    w0.close()
    w1.close()


def test_reload_keeps_counts(supervisor: SharedLimits) -> None:
    w0, w1 = _attach(supervisor, 0), _attach(supervisor, 1)
    auths = [Authenticator([_entry(4), _entry(2, OTHER, "other")]) for _ in range(2)]
    auths[0].shared, auths[1].shared = w0, w1
    held = []
    for auth in auths:
        for entry in auth.entries:
            auth.acquire(entry, "GLBX.MDP3", {"GLBX.MDP3"})
            held.append((auth, entry))
    # Reload on both workers: KEY renamed with a lower limit, OTHER revoked.
    for auth in auths:
        added, revoked = auth.replace([_entry(2, KEY, "renamed")])
        assert not added and [e.key_id for e in revoked] == ["other"]
    kept = auths[0].entries[0]
    assert kept.key_id == "renamed" and kept.active == 1
    assert supervisor.sessions_of(KEY) == 2
    assert _refusal(auths[0], kept) == (
        "Connection limit exceeded: this API key already has 2 of 2 sessions"
    )
    for auth, entry in held:  # the sessions end: the revoked key's too
        auth.release(entry)
    assert supervisor.sessions_of(KEY) == 0
    assert supervisor.sessions_of(OTHER) == 0
    auths[1].acquire(auths[1].entries[0], "GLBX.MDP3", {"GLBX.MDP3"})
    assert supervisor.sessions_of(KEY) == 1
    w0.close()
    w1.close()


def _state(limits: LimitsConfig, shared: SharedLimits | None) -> ServerState:
    return ServerState(
        version="test",
        authenticator=Authenticator([_entry(3)]),
        feeds={},
        metrics=Metrics(),
        limits=limits,
        shared_limits=shared,
    )


class _Conn:
    """What admission looks at of a connection (its peer), hashable like one."""

    def __init__(self, peer: str) -> None:
        self.peer = peer


def _conn(n: int) -> ClientConnection:
    return cast(ClientConnection, _Conn(f"10.0.0.{n}:5000"))


def test_connection_limits_across_workers(supervisor: SharedLimits) -> None:
    limits = LimitsConfig(max_connections=3, max_unauthenticated=2, per_ip_rate=0)
    single = _state(limits, None)
    lines = [single.admit(_conn(i), "10.0.0.1", 0.0) for i in range(3)]
    assert lines[:2] == [None, None]
    unauth_line = lines[2]
    assert unauth_line == b"success=0|error=too many unauthenticated connections\n"
    first = next(iter(single.admission.unauthenticated))
    single.admission.unauthenticated.discard(first)  # authenticated
    assert single.admit(_conn(3), "10.0.0.1", 0.0) is None
    max_line = single.admit(_conn(4), "10.0.0.1", 0.0)
    assert max_line == b"success=0|error=too many connections to this gateway\n"

    w0 = _state(limits, _attach(supervisor, 0))
    w1 = _state(limits, _attach(supervisor, 1))
    c0, c1 = _conn(0), _conn(1)
    assert w0.admit(c0, "10.0.0.1", 0.0) is None
    assert w1.admit(c1, "10.0.0.1", 0.0) is None
    assert w0.admit(_conn(2), "10.0.0.1", 0.0) == unauth_line
    assert w1.admit(_conn(2), "10.0.0.1", 0.0) == unauth_line
    w1.admission.unauthenticated.discard(c1)  # authenticated on worker 1
    assert supervisor.totals() == (2, 1)
    assert w0.admit(_conn(3), "10.0.0.1", 0.0) is None
    assert w1.admit(_conn(4), "10.0.0.1", 0.0) == max_line
    assert w0.admit(_conn(4), "10.0.0.1", 0.0) == max_line
    w1.connections.discard(c1)  # closed
    w1.connections.discard(c1)  # (once only)
    assert supervisor.totals() == (2, 2)
    assert w1.admit(_conn(5), "10.0.0.1", 0.0) == unauth_line  # 2 unauthenticated on w0
    w0.admission.unauthenticated.discard(c0)
    assert w1.admit(_conn(5), "10.0.0.1", 0.0) is None
    assert supervisor.totals() == (3, 2)
    assert w1.admission.shared is not None and w1.authenticator.shared is not None
    w0.admission.shared.close()  # type: ignore[union-attr]
    w1.admission.shared.close()


def test_per_ip_burst_is_divided_between_workers() -> None:
    sup = SharedLimits.create(4)
    w = _state(
        LimitsConfig(per_ip_rate=0.001, per_ip_burst=10, exempt_loopback=False),
        _attach(sup, 2),
    )
    try:
        lines = [w.admit(_conn(i), "10.1.2.3", 100.0) for i in range(4)]
        assert lines[:3] == [None, None, None]  # ceil(10 / 4)
        assert lines[3] == (
            b"success=0|error=too many new connections per second from 10.1.2.3; wait 1 s\n"
        )
        assert sup.totals() == (3, 3)  # the refused one is not counted
    finally:
        assert w.admission.shared is not None
        w.admission.shared.close()
        sup.unlink()


def test_supervisor_mapping_admits_nothing(supervisor: SharedLimits) -> None:
    with pytest.raises(ValueError, match="slot -1"):
        _state(LimitsConfig(), supervisor)
