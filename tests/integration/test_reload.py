"""Reload without a restart (issue 12, item 3): SIGHUP reads the config file (and key files)
again and applies API keys and limits. Sessions of a revoked key, or of a key that lost its
dataset, end with an ErrorMsg (code 2) and a clean EOF; everyone else keeps streaming; a bad
file is refused with the field named in the log and the running config kept."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.helpers import (
    KEY,
    OTHER_KEY,
    GatewayProcess,
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
THIRD_KEY = "db-THIRDKEY000000000000000000000"
API_KEY_DEACTIVATED = 2


def _keys(*entries: tuple[str, str]) -> str:
    """[[api_keys]] tables: (key, extra TOML lines)."""
    return "".join(f'[[api_keys]]\nkey = "{key}"\n{extra}\n' for key, extra in entries)


def _poll(predicate: Callable[[], Any], what: str, timeout: float = 20.0) -> None:
    poll_until(predicate, timeout, what=what)


def _reload(gw: GatewayProcess, text: str, expect: str) -> None:
    """Rewrite the config file, SIGHUP, wait for the log line ``expect`` to appear once more."""
    assert gw.config_path is not None
    before = gw.log().count(expect)
    gw.config_path.write_text(text)
    gw.proc.send_signal(signal.SIGHUP)
    _poll(lambda: gw.log().count(expect) > before, f"{expect!r} in the log")


def _stream_to_eof(c: RawClient, limit: float = 15.0) -> bytes:
    """Everything until the gateway's FIN; a reset or a timeout fails the test."""
    c.sock.settimeout(limit)
    data, c.buf = c.buf, b""
    while chunk := c.sock.recv(65536):
        data += chunk
    return data


@pytest.fixture
def gw() -> Iterator[GatewayProcess]:
    proc = start_gateway(feeds=FEEDS, keys=[KEY, OTHER_KEY])
    try:
        yield proc
    finally:
        rc = proc.stop()
        tail = proc.log()[-4000:]
        proc.cleanup()
        assert rc == 0, tail


def _streaming(port: int, key: str = KEY) -> RawClient:
    c = RawClient(port)
    assert c.handshake(key=key).startswith("success=1")
    c.send(b"schema=trades|stype_in=raw_symbol|symbols=ALL_SYMBOLS\nstart_session\n")
    c.buf = c.recv_some(10)  # kept: _stream_to_eof returns the whole stream
    assert c.buf[:3] == b"DBN"
    return c


def test_revoked_key_sessions_end_with_an_error_and_others_keep_streaming(
    gw: GatewayProcess,
) -> None:
    victim = _streaming(gw.port)
    waiting = RawClient(gw.port)  # authenticated, still subscribing
    assert waiting.handshake().startswith("success=1")
    waiting.send(b"schema=trades|stype_in=raw_symbol|symbols=ALL_SYMBOLS\n")
    other = OfficialSession(gw.port, "DEMO.SYNTH", TRADES, key=OTHER_KEY)
    try:
        other.start()
        assert other.wait_for(lambda r: len(data_records(r)) >= 5)

        _reload(gw, _keys((OTHER_KEY, "")), "config reloaded")

        for c in (victim, waiting):
            _, records = split_records(_stream_to_eof(c))
            c.close()
            assert error_texts(records)[-1:] == [(API_KEY_DEACTIVATED, "API key revoked")]
            assert records[-1][1] == 0x15, "the ErrorMsg is the last record"
        seen = len(other.records)
        assert other.wait_for(lambda r: len(r) >= seen + 20), "the other key's session stalled"
        assert other.error is None
        assert not [r for r in other.records if int(r.rtype) == 0x15]
    finally:
        assert other.stop() is None
    log = gw.log()
    assert "config reloaded keys=1 added=0 revoked=1 sessions_ended=2" in log
    assert "reason=api key revoked" in log
    assert KEY not in log
    # The revoked key no longer logs in; the other one still does.
    c = RawClient(gw.port)
    assert c.handshake().startswith("success=0")
    c.close()
    c = RawClient(gw.port)
    assert c.handshake(key=OTHER_KEY).startswith("success=1")
    c.close()


def test_a_bad_file_is_refused_naming_the_field_and_the_running_config_kept(
    gw: GatewayProcess,
) -> None:
    bystander = _streaming(gw.port)
    bad = "[limits]\nmax_symbol = 5\n" + _keys((OTHER_KEY, ""))
    _reload(gw, bad, "config reload refused")
    assert "limits.max_symbol: unknown field (did you mean max_symbols?)" in gw.log()
    _reload(gw, "port = 99999\n" + _keys((OTHER_KEY, "")), "config reload refused")
    assert "port: Expected int <= 65535" in gw.log()
    assert "config reloaded" not in gw.log()
    # Both keys still work, and the session that was streaming still is.
    for key in (KEY, OTHER_KEY):
        c = RawClient(gw.port)
        assert c.handshake(key=key).startswith("success=1"), key
        c.close()
    got = b""
    deadline = time.monotonic() + 10
    while len(got) < 4096 and time.monotonic() < deadline:
        got += bystander.recv_some(5)
    assert len(got) >= 4096
    bystander.close()


def test_lost_dataset_session_limit_and_key_file_on_reload(tmp_path: Path) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text(f"{OTHER_KEY}\n")
    key_file.chmod(0o600)
    both = 'datasets = ["DEMO.SYNTH", "DEMO.B"]\nmax_sessions = 5'
    gw = start_gateway(
        "--api-key-file",
        str(key_file),
        feeds={**FEEDS, "DEMO.B": "synthetic:?rate=2000&seed=3"},
        keys=[],
        config=_keys((KEY, both)),
    )
    try:
        on_b = RawClient(gw.port)
        assert on_b.handshake(dataset="DEMO.B").startswith("success=1")
        on_b.send(b"schema=trades|stype_in=raw_symbol|symbols=ALL_SYMBOLS\nstart_session\n")
        on_b.buf = on_b.recv_some(10)
        assert on_b.buf[:3] == b"DBN"
        on_synth = _streaming(gw.port)

        # DEMO.B taken away, one session at most; a key added to the key file.
        key_file.write_text(f"{OTHER_KEY}\n{THIRD_KEY}\n")
        one = 'datasets = ["DEMO.SYNTH"]\nmax_sessions = 1'
        _reload(gw, _keys((KEY, one)), "config reloaded")

        _, records = split_records(_stream_to_eof(on_b))
        on_b.close()
        assert error_texts(records)[-1:] == [
            (API_KEY_DEACTIVATED, "API key is no longer entitled to dataset DEMO.B")
        ]
        # The DEMO.SYNTH session is untouched; a second one is over the new limit.
        got = on_synth.recv_some(5)
        assert got
        c = RawClient(gw.port)
        reply = c.handshake()
        c.close()
        assert reply.startswith("success=0|error=Connection limit exceeded"), reply
        # Keys from --api-key-file survive the reload, and the file was read again.
        for key in (OTHER_KEY, THIRD_KEY):
            c = RawClient(gw.port)
            assert c.handshake(key=key).startswith("success=1"), key
            c.close()
        on_synth.close()
        assert "reason=dataset revoked" in gw.log()
    finally:
        rc = gw.stop()
        tail = gw.log()[-4000:]
        gw.cleanup()
    assert rc == 0, tail


def test_changes_other_than_keys_and_limits_are_logged_as_needing_a_restart(
    gw: GatewayProcess,
) -> None:
    text = "zstd_level = 5\n[limits]\nmax_symbols = 7\n" + _keys((KEY, ""), (OTHER_KEY, ""))
    _reload(gw, text, "config reloaded")
    assert "changes need a restart and are not applied fields=zstd_level" in gw.log()
    # The new limit applies to a new session.
    c = RawClient(gw.port)
    assert c.handshake().startswith("success=1")
    symbols = ",".join(f"S{i}" for i in range(8))
    c.send(f"schema=trades|stype_in=raw_symbol|symbols={symbols}\n".encode())
    _, records = split_records(_stream_to_eof(c))
    c.close()
    assert any("at most 7" in text for _, text in error_texts(records)), error_texts(records)


def test_the_strobe_follows_a_reload_that_revokes_its_key(tmp_path: Path) -> None:
    """``serve --strobe`` logs in with the first key; revoked, it moves to the new first key
    instead of failing until a restart."""
    from tests.integration.helpers import metric, metric_samples

    gw = start_gateway(
        "--metrics-port",
        "0",
        "--strobe",
        "--strobe-interval",
        "0.2",
        "--strobe-history",
        str(tmp_path / "probe.sqlite"),
        feeds=FEEDS,
        keys=[KEY, OTHER_KEY],
    )

    def count(result: str) -> float:
        return metric(metric_samples(gw.metrics_port), "gateway_probe_strobes_total", result=result)

    try:
        _poll(lambda: count("success") >= 1, "a first successful strobe")
        _reload(gw, _keys((OTHER_KEY, "")), "config reloaded")
        after = count("success")
        _poll(lambda: count("success") >= after + 3, "strobes succeeding after the reload")
        # at most the one strobe in flight at the reload, whose session was ended
        assert count("failure") <= 1, gw.log()[-3000:]
    finally:
        rc = gw.stop()
        tail = gw.log()[-4000:]
        gw.cleanup()
    assert rc == 0, tail
