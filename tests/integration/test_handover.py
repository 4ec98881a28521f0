"""Zero-downtime hand-over (issue 11, item 5): a new gateway binds the same port
(SO_REUSEPORT) while the old one runs; the old one, on SIGTERM, closes its listener and ends
each session with an ErrorMsg, so that official clients with a reconnect policy land on the
new process. Without a successor, SIGTERM still ends sessions with an ErrorMsg."""

from __future__ import annotations

import os
import signal
import socket
import tempfile
from typing import Any

import databento_dbn as dbn

from tests.integration.helpers import (
    KEY,
    OfficialSession,
    RawClient,
    data_records,
    error_texts,
    poll_until,
    split_records,
    start_gateway,
)

FEEDS = {"DEMO.SYNTH": "synthetic:?rate=2000"}
TRADES = [{"schema": "trades", "symbols": "ALL_SYMBOLS"}]


def _errors(records: list[Any]) -> list[tuple[int, str]]:
    return [(int(r.code), r.err) for r in records if isinstance(r, dbn.ErrorMsg)]


def test_official_client_follows_a_hand_over_and_is_told_the_gap() -> None:
    old = start_gateway("--reuse-port", feeds=FEEDS)
    new = None
    s = None
    try:
        s = OfficialSession(old.port, "DEMO.SYNTH", TRADES, reconnect_policy="reconnect")
        gaps: list[tuple[Any, Any, int]] = []
        s.client.add_reconnect_callback(
            lambda start, end: gaps.append((start, end, len(s.records)))
        )
        s.start()
        assert s.wait_for(lambda r: len(data_records(r)) >= 20)
        # The successor binds the same port while the old gateway still serves.
        new = start_gateway("--port", str(old.port), "--reuse-port", feeds=FEEDS)
        assert new.port == old.port
        old.proc.send_signal(signal.SIGTERM)
        assert old.proc.wait(20) == 0
        poll_until(lambda: bool(gaps), 20, what="the reconnect callback")
        at = gaps[0][2]
        # Records keep flowing after the hand-over, from the new process.
        assert s.wait_for(lambda r: len(data_records(r[at:])) >= 20)
        assert s.client.is_connected()
        assert s.stop() is None
    finally:
        if s is not None and s.client.is_connected():
            s.client.terminate()
        for gw in (old, new):
            if gw is not None:
                gw.stop()
                gw.cleanup()
    gap_start, gap_end, _ = gaps[0]
    assert gap_start <= gap_end and (gap_end - gap_start).total_seconds() < 10
    # The old gateway said why, with an ErrorMsg (what makes the reconnect policy fire).
    assert (6, "Gateway restarting; reconnect") in _errors(s.records[:at])
    assert f"listener closed port={old.port} successor=1" in old.log()
    assert "is shared with 1 other listener(s)" in new.log()


def test_sigterm_without_a_successor_ends_sessions_with_an_error() -> None:
    gw = start_gateway("--reuse-port", feeds=FEEDS)
    try:
        s = OfficialSession(gw.port, "DEMO.SYNTH", TRADES, reconnect_policy="reconnect")
        gaps: list[Any] = []
        s.client.add_reconnect_callback(lambda *a: gaps.append(a))
        s.start()
        assert s.wait_for(lambda r: len(data_records(r)) >= 5)
        gw.proc.send_signal(signal.SIGTERM)
        assert gw.proc.wait(20) == 0
        # The reconnect policy fired, found nobody listening and gave up with an error.
        assert s.wait_for(lambda r: bool(_errors(r)))
        exc = s.stop()
    finally:
        gw.stop()
        gw.cleanup()
    assert _errors(s.records) == [(6, "Gateway shutting down")]
    assert exc is not None and not gaps
    assert "successor=0" in gw.log()


def test_connections_waiting_in_the_accept_queue_are_answered_not_reset() -> None:
    gw = start_gateway(feeds=FEEDS)
    socks: list[socket.socket] = []
    try:
        # Stopped, the gateway accepts nothing: the kernel queues the connections.
        gw.proc.send_signal(signal.SIGSTOP)
        socks = [socket.create_connection(("127.0.0.1", gw.port), timeout=10) for _ in range(20)]
        gw.proc.send_signal(signal.SIGTERM)
        gw.proc.send_signal(signal.SIGCONT)
        answers = []
        for sock in socks:
            data = b""
            while b"success=" not in data:
                chunk = sock.recv(4096)  # a reset raises: that is the bug
                if not chunk:
                    break
                data += chunk
            answers.append(data.decode(errors="replace").rstrip("\n").rsplit("\n", 1)[-1])
        assert gw.proc.wait(20) == 0
    finally:
        gw.proc.send_signal(signal.SIGCONT)
        for sock in socks:
            sock.close()
        gw.stop()
        gw.cleanup()
    # Taken from the queue and refused, or accepted just before and told at the shutdown.
    assert all(
        a in ("success=0|error=Gateway shutting down", "success=0|error=gateway is shutting down")
        for a in answers
    ), answers
    assert "refused_from_queue=" in gw.log()


def test_official_client_without_a_reconnect_policy_sees_the_reason() -> None:
    """The ErrorMsg is what the official client raises (BentoError), not a bare close."""
    import databento as db

    gw = start_gateway(feeds=FEEDS)
    try:
        client = db.Live(key=KEY, gateway="127.0.0.1", port=gw.port)
        client.subscribe(dataset="DEMO.SYNTH", schema="trades", symbols="ALL_SYMBOLS")
        client.start()
        gw.proc.send_signal(signal.SIGTERM)
        try:
            client.block_for_close(timeout=20)
            raised = ""
        except db.BentoError as exc:
            raised = str(exc)
        assert gw.proc.wait(20) == 0
    finally:
        gw.stop()
        gw.cleanup()
    assert raised == "Gateway shutting down"


def test_sigterm_tells_a_session_still_subscribing_why() -> None:
    """Authenticated, not started: the Metadata header and the ErrorMsg, then a clean EOF."""
    gw = start_gateway(feeds=FEEDS)
    try:
        c = RawClient(gw.port)
        assert c.handshake().startswith("success=1")
        c.send(b"schema=trades|stype_in=raw_symbol|symbols=ALL_SYMBOLS\n")
        gw.proc.send_signal(signal.SIGTERM)
        c.sock.settimeout(10)
        data = c.buf
        while chunk := c.sock.recv(65536):  # a reset raises
            data += chunk
        c.close()
        assert gw.proc.wait(20) == 0
    finally:
        gw.stop()
        gw.cleanup()
    _, records = split_records(data)
    assert error_texts(records) == [(6, "Gateway shutting down")]


def test_systemd_is_told_ready_with_the_main_pid_and_stopping() -> None:
    """Type=notify: READY=1 once listening (MAINPID= lets a successor started by ExecReload
    become the unit's main process), STOPPING=1 on SIGTERM."""
    with tempfile.TemporaryDirectory(prefix="gw-notify-") as tmp:
        path = os.path.join(tmp, "notify")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.settimeout(10)
        gw = start_gateway(feeds=FEEDS, env={"NOTIFY_SOCKET": path})
        try:
            ready = sock.recv(4096).decode()
            gw.proc.send_signal(signal.SIGTERM)
            stopping = sock.recv(4096).decode()
            assert gw.proc.wait(20) == 0
        finally:
            sock.close()
            gw.stop()
            gw.cleanup()
    assert ready == f"READY=1\nMAINPID={gw.proc.pid}"
    assert stopping == "STOPPING=1"
