"""Every configured limit, hit over real sockets: the client gets a clear reason and the
hit is counted in /metrics."""

from __future__ import annotations

import socket
import time

from tests.integration.helpers import (
    KEY,
    RawClient,
    error_texts,
    gateway,
    metric,
    metric_at_least,
    metric_samples,
    poll_until,
    split_records,
)

FEEDS = {"DEMO.SYNTH": "synthetic:?rate=500"}


def _first_line(port: int) -> str:
    c = RawClient(port)
    try:
        return c.line()
    finally:
        c.close()


def test_max_connections() -> None:
    with gateway(
        "--metrics-port", "0", feeds=FEEDS, config="[limits]\nmax_connections = 3\n"
    ) as gw:
        held = [RawClient(gw.port) for _ in range(3)]
        for c in held:
            assert c.line().startswith("lsg_version=")
        assert _first_line(gw.port) == "success=0|error=too many connections to this gateway"
        assert (
            metric_at_least(gw.metrics_port, "gateway_limit_hits_total", 1, limit="max_connections")
            == 1
        )
        for c in held:
            c.close()
        # room again once the gateway has seen the closes
        poll_until(lambda: _first_line(gw.port).startswith("lsg_version="), what="a free slot")


def test_max_unauthenticated_connections() -> None:
    with gateway(
        "--metrics-port", "0", feeds=FEEDS, config="[limits]\nmax_unauthenticated = 2\n"
    ) as gw:
        authed = RawClient(gw.port)
        assert authed.handshake().startswith("success=1")  # authenticated: not counted
        idle = [RawClient(gw.port) for _ in range(2)]
        for c in idle:
            c.line()
        assert _first_line(gw.port) == "success=0|error=too many unauthenticated connections"
        assert (
            metric_at_least(
                gw.metrics_port, "gateway_limit_hits_total", 1, limit="max_unauthenticated"
            )
            == 1
        )
        for c in [authed, *idle]:
            c.close()


def test_new_connections_per_second_per_ip() -> None:
    config = "[limits]\nper_ip_rate = 1.0\nper_ip_burst = 3\nexempt_loopback = false\n"
    with gateway("--metrics-port", "0", feeds=FEEDS, config=config) as gw:
        lines = [_first_line(gw.port) for _ in range(5)]
        assert all(line.startswith("lsg_version=") for line in lines[:3])
        assert lines[3] == (
            "success=0|error=too many new connections per second from 127.0.0.1; wait 1 s"
        )
        assert metric_at_least(gw.metrics_port, "gateway_limit_hits_total", 2, limit="ip_rate") >= 2
        time.sleep(1.2)  # deliberate: let the bucket refill (1 token per second)
        assert _first_line(gw.port).startswith("lsg_version=")  # the bucket refilled


def test_sessions_per_key() -> None:
    config = f'[[api_keys]]\nkey = "{"db-" + "L" * 29}"\nmax_sessions = 1\n'
    with gateway("--metrics-port", "0", feeds=FEEDS, config=config) as gw:
        key = "db-" + "L" * 29
        first = RawClient(gw.port)
        assert first.handshake(key=key).startswith("success=1")
        second = RawClient(gw.port)
        assert second.handshake(key=key) == (
            # the key's name is for the operator's log only (issue 11)
            "success=0|error=Connection limit exceeded: this API key already has 1 of 1 sessions"
        )
        assert (
            metric_at_least(
                gw.metrics_port, "gateway_limit_hits_total", 1, limit="sessions_per_key"
            )
            == 1
        )
        first.close()
        second.close()

        def third_session() -> bool:
            third = RawClient(gw.port)
            try:
                return third.handshake(key=key).startswith("success=1")
            finally:
                third.close()

        poll_until(third_session, what="the key's slot released on disconnect")


def test_control_messages_per_second() -> None:
    config = "[limits]\ncontrol_rate_per_s = 1.0\ncontrol_burst = 3\n"
    with gateway("--metrics-port", "0", feeds=FEEDS, config=config) as gw:
        c = RawClient(gw.port)
        assert c.handshake().startswith("success=1")  # the auth line used one token
        c.send(b"schema=trades|symbols=AAPL|id=1\n" * 4)
        _, records = split_records(c.read_all())
        c.close()
        assert error_texts(records) == [(5, "more than 1 control messages per second")]
        assert (
            metric_at_least(gw.metrics_port, "gateway_limit_hits_total", 1, limit="control_rate")
            == 1
        )


def test_limit_hits_for_line_length_symbols_and_handshake_are_counted() -> None:
    config = (
        "[limits]\nmax_line_bytes = 65536\nmax_symbols = 3\nmax_subscriptions = 2\n"
        "handshake_timeout_s = 0.5\n"
    )
    with gateway("--metrics-port", "0", feeds=FEEDS, config=config) as gw:
        c = RawClient(gw.port)
        c.line()
        c.line()
        c.send(b"x" * 70000)
        assert c.line() == "success=0|error=control line longer than 65536 bytes"
        c.close()
        c = RawClient(gw.port)
        assert c.handshake().startswith("success=1")
        c.send(b"schema=trades|symbols=A,B,C,D\n")
        _, records = split_records(c.read_all())
        c.close()
        assert error_texts(records) == [
            (5, "too many symbols: a session may subscribe to at most 3")
        ]
        c = RawClient(gw.port)
        assert c.line().startswith("lsg_version=")
        c.line()
        assert c.line() == "success=0|error=authentication timed out"
        c.close()
        for limit in ("line_too_long", "max_symbols", "handshake_timeout"):
            metric_at_least(gw.metrics_port, "gateway_limit_hits_total", 1, limit=limit)
        m = metric_samples(gw.metrics_port)
        assert metric(m, "gateway_limit_hits_total", limit="line_too_long") == 1
        assert metric(m, "gateway_limit_hits_total", limit="max_symbols") == 1
        assert metric(m, "gateway_limit_hits_total", limit="handshake_timeout") == 1


def test_keys_must_be_32_characters() -> None:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--port", "0", "--api-key", "short"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2
    assert "api_keys[0].key: must be 32 printable ASCII characters" in out.stderr
    assert KEY not in out.stderr


def test_unknown_config_field_is_named() -> None:
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    path = Path(tempfile.mkstemp(suffix=".toml")[1])
    path.write_text("[limits]\nmax_symbol = 5\n")
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--config", str(path), "--api-key", KEY],
        capture_output=True,
        text=True,
        timeout=30,
    )
    path.unlink()
    assert out.returncode == 2
    assert "limits.max_symbol: unknown field (did you mean max_symbols?)" in out.stderr


def test_socket_is_closed_cleanly_after_an_error() -> None:
    with gateway(feeds=FEEDS) as gw:
        c = RawClient(gw.port)
        c.line()
        c.line()
        c.send(b"nonsense\n")
        assert c.line().startswith("success=0|error=")
        c.sock.settimeout(5)
        assert c.sock.recv(10) == b""  # orderly FIN, not a reset
        c.sock.shutdown(socket.SHUT_RDWR)
        c.close()
