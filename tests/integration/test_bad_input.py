"""Bad input over real sockets: each case gets a clear error and a clean close, and a
healthy session running beside them all the time sees nothing of it."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import databento_dbn as dbn
import numpy as np
import pytest

from tests.integration.helpers import (
    GatewayProcess,
    OfficialSession,
    RawClient,
    data_records,
    error_texts,
    split_records,
    start_gateway,
)

LIMITS = """
[limits]
handshake_timeout_s = 1.5
max_symbols = 600
max_subscriptions = 5
"""


@pytest.fixture(scope="module")
def gw() -> Iterator[GatewayProcess]:
    proc = start_gateway(feeds={"DEMO.SYNTH": "synthetic:?rate=2000"}, config=LIMITS)
    watcher = OfficialSession(
        proc.port, "DEMO.SYNTH", [{"schema": "mbp-1", "symbols": "ALL_SYMBOLS"}]
    )
    watcher.start()
    try:
        yield proc
        # The healthy session saw no error and every record of its subscription, in order.
        assert watcher.wait_for(lambda r: len(data_records(r)) > 100)
        assert watcher.stop() is None
        assert not [r for r in watcher.records if isinstance(r, dbn.ErrorMsg)]
        seqs = np.array([r.sequence for r in data_records(watcher.records)])
        assert (np.diff(seqs) > 0).all()
    finally:
        rc = proc.stop()
        proc.cleanup()
        assert rc == 0


def _pre_auth_error(port: int, payload: bytes) -> tuple[str, bytes]:
    c = RawClient(port)
    assert c.line().startswith("lsg_version=")
    assert c.line().startswith("cram=")
    c.send(payload)
    rest = c.read_all()
    c.close()
    line, _, tail = rest.partition(b"\n")
    return line.decode(), tail


def _post_auth_errors(port: int, lines: bytes) -> list[tuple[int, str]]:
    c = RawClient(port)
    assert c.handshake().startswith("success=1|session_id=")
    c.send(lines)
    data = c.read_all()
    c.close()
    _, records = split_records(data)
    return error_texts(records)


def test_malformed_line_before_auth(gw: GatewayProcess) -> None:
    line, tail = _pre_auth_error(gw.port, b"hello there\n")
    assert line.startswith("success=0|error=malformed control line") and tail == b""


def test_missing_auth(gw: GatewayProcess) -> None:
    line, _ = _pre_auth_error(gw.port, b"dataset=DEMO.SYNTH|encoding=dbn\n")
    assert line == "success=0|error=expected an authentication request: missing field auth"


def test_binary_garbage_before_auth(gw: GatewayProcess) -> None:
    line, _ = _pre_auth_error(gw.port, bytes(range(128, 256)) * 4 + b"\n")
    assert line.startswith("success=0|error=control line is not ASCII")


def test_never_authenticates(gw: GatewayProcess) -> None:
    started = time.monotonic()
    line, _ = _pre_auth_error(gw.port, b"")
    assert line == "success=0|error=authentication timed out"
    assert 1.0 < time.monotonic() - started < 8


def test_heartbeat_out_of_range(gw: GatewayProcess) -> None:
    c = RawClient(gw.port)
    reply = c.handshake(extra="|heartbeat_interval_s=2")
    c.close()
    assert reply == "success=0|error=heartbeat_interval_s=2 is out of range (5 to 1800 seconds)"


def test_unknown_schema(gw: GatewayProcess) -> None:
    errors = _post_auth_errors(gw.port, b"schema=mbp-99|stype_in=raw_symbol|symbols=AAPL\n")
    assert errors == [(5, "unknown schema 'mbp-99'")]


def test_unknown_stype(gw: GatewayProcess) -> None:
    errors = _post_auth_errors(gw.port, b"schema=trades|stype_in=isin|symbols=AAPL\n")
    assert errors == [(5, "unknown stype_in 'isin'")]


@pytest.mark.parametrize(
    "line,needle",
    [
        (b"schema=trades|stype_in=smart|symbols=ES.FUT\n", "stype_in=smart is not supported yet"),
        (
            # replay needs a journal; this gateway keeps none
            b"schema=trades|stype_in=raw_symbol|symbols=AAPL|start=0\nstart_session\n",
            "Replay (start) is not available: this gateway keeps no journal",
        ),
        (
            # the demo feed carries no MBO: no order books to take a snapshot of
            b"schema=trades|stype_in=raw_symbol|symbols=AAPL|snapshot=1\n",
            "snapshot=1 is only for mbo, not trades",
        ),
    ],
)
def test_not_supported_yet_is_explicit(gw: GatewayProcess, line: bytes, needle: str) -> None:
    errors = _post_auth_errors(gw.port, line)
    assert len(errors) == 1 and needle in errors[0][1]


def test_symbols_over_limit(gw: GatewayProcess) -> None:
    syms = ",".join(f"S{i}" for i in range(500))
    lines = (
        f"schema=trades|stype_in=raw_symbol|symbols={syms}|id=1|is_last=0\n"
        f"schema=trades|stype_in=raw_symbol|symbols={syms}|id=1|is_last=1\n"
    ).encode()
    errors = _post_auth_errors(gw.port, lines)
    assert errors == [(5, "too many symbols: a session may subscribe to at most 600")]


def test_subscriptions_over_limit(gw: GatewayProcess) -> None:
    lines = b"".join(f"schema=trades|symbols=AAPL|id={i}\n".encode() for i in range(6))
    errors = _post_auth_errors(gw.port, lines)
    assert errors[-1] == (5, "too many subscriptions: a session may make at most 5")


def test_64k_line_is_accepted_and_longer_line_refused(gw: GatewayProcess) -> None:
    # 500 symbols of 132 characters: a line over 64 KiB, as a client's chunk may be.
    syms = ",".join(f"{i:03d}" + "X" * 129 for i in range(500))
    line = f"schema=trades|stype_in=raw_symbol|symbols={syms}|id=7|is_last=1\n".encode()
    assert len(line) > 64 * 1024
    c = RawClient(gw.port)
    assert c.handshake().startswith("success=1")
    c.send(line + b"start_session\n")
    c.buf = c.recv_some()  # the ack: the long line was read before the over-long one is sent
    c.send(b"schema=trades|symbols=" + b"A" * (200 * 1024) + b"\n")
    _, records = split_records(c.read_all())
    c.close()
    assert records[0][1] == 0x17  # the ack for subscription 7
    errors = error_texts(records)
    unresolved = [e for e in errors if e[0] == 4]
    # every long symbol was read whole (named in coalesced errors: issue 11)
    named = [s for _, text in unresolved for s in text.split(": ", 1)[1].split(", ")]
    assert named == [f"{i:03d}" + "X" * 129 for i in range(500)]
    assert errors[-1] == (5, "control line longer than 131072 bytes")


def test_second_start_session(gw: GatewayProcess) -> None:
    errors = _post_auth_errors(
        gw.port, b"schema=trades|symbols=AAPL\nstart_session=0\nstart_session\n"
    )
    assert errors == [(5, "start_session was already received")]


def test_malformed_line_after_auth(gw: GatewayProcess) -> None:
    errors = _post_auth_errors(gw.port, b"schema=trades|symbols\n")
    assert errors == [(5, "malformed control line: 'symbols' has no '='")]


def test_pipelined_handshake_in_one_write(gw: GatewayProcess) -> None:
    """auth, subscription and start_session in a single segment still work."""
    from gateway.control import cram_response
    from tests.integration.helpers import KEY

    c = RawClient(gw.port)
    c.line()
    challenge = c.line()[5:]
    c.send(
        f"auth={cram_response(challenge, KEY)}|dataset=DEMO.SYNTH|encoding=dbn|ts_out=0|"
        "client=t\nschema=trades|stype_in=raw_symbol|symbols=AAPL\nstart_session\n".encode()
    )
    assert c.line().startswith("success=1")
    data = b""
    deadline = time.monotonic() + 5
    while len(data) < 2000 and time.monotonic() < deadline:
        data += c.recv_some()
    c.close()
    assert data[:3] == b"DBN"


def test_client_disconnects_mid_stream(gw: GatewayProcess) -> None:
    for _ in range(5):
        c = RawClient(gw.port)
        assert c.handshake().startswith("success=1")
        c.send(b"schema=mbp-1|symbols=ALL_SYMBOLS\nstart_session\n")
        c.recv_some()
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        c.close()  # RST while the gateway is writing
    # The gateway still serves a new session normally.
    c = RawClient(gw.port)
    assert c.handshake().startswith("success=1")
    c.close()
