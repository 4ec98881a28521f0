"""Fatal errors reach the client: a lingering close instead of a reset (issue 11, item 6).

After a fatal ErrorMsg (or ``success=0``) the gateway shuts its write side down and keeps
reading and discarding what the client still sends for a bounded time, so the kernel never
answers the client's late bytes with a reset that would destroy the error it has not read.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import pytest

from tests.integration.helpers import (
    KEY,
    RawClient,
    error_texts,
    gateway,
    metric,
    metric_samples,
    poll_until,
    split_records,
)

FEEDS = {"DEMO.SYNTH": "synthetic:?rate=200"}
BAD = b"schema=trades|stype_in=raw_symbol|symbols=ALL_SYMBOLS|snapshot=1\n"
REASON = "invalid subscription: snapshot=1 is only for mbo, not trades"


def _read_to_eof(sock: socket.socket, limit: float = 10.0) -> bytes:
    """Everything until EOF; a reset fails the test (that is the bug)."""
    sock.settimeout(limit)
    out = b""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        data = sock.recv(65536)  # ConnectionResetError propagates
        if not data:
            return out
        out += data
    raise AssertionError(f"no EOF within {limit} s; have {len(out)} bytes")


@pytest.mark.parametrize("run", range(3))
def test_client_still_writing_after_a_fatal_error_reads_it_and_a_clean_eof(run: int) -> None:
    with gateway(feeds=FEEDS) as gw:
        c = RawClient(gw.port)
        assert c.handshake().startswith("success=1")
        line = b"schema=trades|stype_in=raw_symbol|symbols=ALL_SYMBOLS\n"
        filler = line * (1024 * 1024 // len(line) + 1)
        # The bad subscription, then 1 MB more without reading anything back.
        c.send(BAD + filler)
        data = c.buf + _read_to_eof(c.sock)
        c.close()
    head, records = split_records(data)
    assert head[:3] == b"DBN"
    assert error_texts(records) == [(5, REASON)]


def test_a_lingering_connection_still_counts_and_is_released_once() -> None:
    config = "[limits]\nmax_connections = 2\n"
    with gateway("--metrics-port", "0", feeds=FEEDS, config=config, max_sessions=1) as gw:
        lingering = RawClient(gw.port)
        assert lingering.handshake().startswith("success=1")
        lingering.send(BAD)
        # The gateway sent the error and shut its write side down ...
        head, records = split_records(_read_to_eof(lingering.sock))
        assert error_texts(records)[0][0] == 5
        # ... but the client has not closed: the connection still holds its slot.
        other = RawClient(gw.port)
        assert other.line().startswith("lsg_version=")
        third = RawClient(gw.port)
        assert third.line() == "success=0|error=too many connections to this gateway"
        third.close()
        lingering.close()  # the client's EOF ends the lingering close at once
        other.close()
        # Everything is released exactly once: a new session with the same key (one
        # session allowed) authenticates, and the end was counted once.

        def authenticates() -> bool:
            c = RawClient(gw.port)
            try:
                first = c.line()
                if not first.startswith("lsg_version="):
                    return False
                c.buf = (first + "\n").encode() + c.buf
                return c.handshake().startswith("success=1")
            finally:
                c.close()

        poll_until(authenticates, 10, 0.05, what="a new session with the same key")
        m = poll_until(
            lambda: (
                (m := metric_samples(gw.metrics_port))
                and metric(m, "gateway_disconnects_total", reason="client_closed") >= 1
                and m
            ),
            10,
            0.05,
            what="client_closed counted",
        )
        assert metric(m, "gateway_disconnects_total", reason="protocol") == 1
        assert metric(m, "gateway_connections_total", result="rejected", reason="max_connections")


def _official_run(port: int) -> tuple[str, str]:
    """subscribe(snapshot=True), 20 more subscriptions, then iterate: what the user sees."""
    import databento as db

    client = db.Live(key=KEY, gateway="127.0.0.1", port=port)
    outcome: dict[str, Any] = {}

    def body() -> None:
        try:
            client.subscribe(
                dataset="DEMO.SYNTH", schema="trades", symbols="ALL_SYMBOLS", snapshot=True
            )
            for _ in range(20):
                client.subscribe(dataset="DEMO.SYNTH", schema="trades", symbols="ALL_SYMBOLS")
            for _ in client:
                pass
            outcome["result"] = ("no error", "")
        except BaseException as exc:  # noqa: BLE001 - what the user would see
            outcome["result"] = (type(exc).__name__, str(exc))

    t = threading.Thread(target=body, daemon=True)
    t.start()
    t.join(20)
    if t.is_alive():
        client.terminate()
        t.join(5)
        return ("timeout", "")
    return outcome["result"]


def test_official_client_sees_the_reason_of_a_fatal_error_every_time() -> None:
    with gateway(feeds=FEEDS) as gw:
        seen = [_official_run(gw.port) for _ in range(10)]
    assert all(kind == "BentoError" and REASON in text for kind, text in seen), seen
