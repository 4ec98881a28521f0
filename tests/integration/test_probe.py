"""The uptime probe against a live gateway, a stopped one and lying ones (fake servers
that break the protocol at each step), and its history across restarts."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import socket
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import databento_dbn as d
import pytest

from gateway.dbn import encode_error, encode_metadata, encode_system
from gateway.ops.probe import ProbeTarget, strobe
from tests.conftest import TEST_LOOP
from tests.integration.helpers import (
    KEY,
    OTHER_KEY,
    ROOT,
    gateway,
    http_get,
    metric,
    metric_samples,
)

SYNTH = {"DEMO.SYNTH": "synthetic:?rate=2000"}

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def _free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _probe_cmd(port: int, *extra: str, key: str = KEY, dataset: str = "DEMO.SYNTH") -> list[str]:
    return [
        sys.executable,
        "-m",
        "gateway",
        "probe",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--key",
        key,
        "--dataset",
        dataset,
        "--loop",
        TEST_LOOP,
        *extra,
    ]


async def _run_cli(*args: str, timeout: float = 30.0) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *args, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


# --- fake gateways ------------------------------------------------------------------------


def _trade(ts_event: int) -> bytes:
    return bytes(
        d.TradeMsg(
            publisher_id=1,
            instrument_id=1001,
            ts_event=ts_event,
            price=100_000_000_000,
            size=1,
            action=d.Action.TRADE,  # type: ignore[arg-type]  # stubs type enum members as str
            side=d.Side.NONE,  # type: ignore[arg-type]  # stubs type enum members as str
            depth=0,
            ts_recv=ts_event,
        )
    )


async def _handshake(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, greeting: bytes
) -> bool:
    """Greeting + challenge, read the auth line, accept it, wait for start_session."""
    writer.write(greeting + b"cram=abcdefghijklmnopqrstuvwxyzABCDEF\n")
    auth = await reader.readline()
    if not auth.startswith(b"auth="):
        return False
    writer.write(b"success=1|session_id=42\n")
    while True:
        line = await reader.readline()
        if not line:
            return False
        if line.startswith(b"start_session"):
            return True


async def _after_start(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, payload: bytes, hold: bool
) -> None:
    if not await _handshake(reader, writer, b"lsg_version=9.9.9\n"):
        return
    writer.write(payload)
    await writer.drain()
    if hold:
        await reader.read()  # keep the connection open until the client goes


def _meta() -> bytes:
    return encode_metadata("DEMO.SYNTH", time.time_ns(), False)


def _ack() -> bytes:
    return encode_system(time.time_ns(), "Subscription request 1 for trades data succeeded", 1)


async def honest(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    await _after_start(r, w, _meta() + _ack() + _trade(time.time_ns() - 250_000_000), True)


async def silent(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    await r.read()  # accepts the connection and says nothing


async def wrong_greeting(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    w.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    await w.drain()
    await r.read()


async def garbage_greeting(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    w.write(bytes(range(256)) + b"\n")
    await w.drain()
    await r.read()


async def refuses_auth(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    w.write(b"lsg_version=9.9.9\ncram=abc\n")
    await r.readline()
    w.write(b"success=0|error=Authentication failed.\n")
    await w.drain()


async def refuses_subscription(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    error = encode_error(time.time_ns(), "Failed to resolve symbol: NOPE", 4)
    await _after_start(r, w, _meta() + _ack() + error, True)


async def garbage_instead_of_metadata(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    await _after_start(r, w, b"<html>this is not DBN</html>\n" * 10, True)


async def closes_after_start(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    await _after_start(r, w, b"", False)


async def no_record(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    await _after_start(r, w, _meta() + _ack(), True)


async def heartbeats_only(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    if not await _handshake(r, w, b"lsg_version=9.9.9\n"):
        return
    w.write(_meta() + _ack())
    with contextlib.suppress(ConnectionError):
        for _ in range(50):
            w.write(encode_system(time.time_ns(), "Heartbeat", 0))
            await w.drain()
            await asyncio.sleep(0.05)


async def garbage_records(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    junk = bytes([4, 0x99]) + bytes(14)  # a 16-byte "record" of an rtype nobody knows
    await _after_start(r, w, _meta() + _ack() + junk, True)


async def closes_after_metadata(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    await _after_start(r, w, _meta() + _ack(), False)


async def gateway_error(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    error = encode_error(time.time_ns(), "Internal error", 6)
    await _after_start(r, w, _meta() + _ack() + error, True)


@contextlib.asynccontextmanager
async def fake_gateway(handler: Handler) -> AsyncIterator[int]:
    async def guarded(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            await handler(r, w)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            w.close()

    server = await asyncio.start_server(guarded, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        # connections still open are the probe's; it has closed them before we get here
        await asyncio.wait_for(server.wait_closed(), 5)


def _target(port: int, **kw: object) -> ProbeTarget:
    params: dict[str, object] = {
        "host": "127.0.0.1",
        "port": port,
        "key": KEY,
        "dataset": "DEMO.SYNTH",
        "timeout_s": 1.0,
    }
    params.update(kw)
    return ProbeTarget(**params).validate()  # type: ignore[arg-type]


# --- the probe's steps, one failure each ---------------------------------------------------


async def test_honest_fake_gateway_passes() -> None:
    """The fake gateway speaks the protocol: the failures below are the lies, not the fake."""
    async with fake_gateway(honest) as port:
        rec = await strobe(_target(port))
    assert rec.ok and rec.step == "ok", rec
    assert rec.error == ""
    for value in (rec.connect_s, rec.auth_s, rec.first_record_s, rec.total_s):
        assert value is not None and 0 < value < 1
    # the record was stamped 250 ms in the past
    assert rec.freshness_s is not None and 0.25 <= rec.freshness_s < 1.25


@pytest.mark.parametrize(
    ("handler", "step", "error"),
    [
        (silent, "auth", "timed out after 1 s"),
        (wrong_greeting, "auth", "unexpected greeting"),
        (garbage_greeting, "auth", ""),
        (refuses_auth, "auth", "Authentication failed."),
        (refuses_subscription, "subscribe", "Failed to resolve symbol: NOPE"),
        (garbage_instead_of_metadata, "start", "does not start with a DBN Metadata header"),
        (closes_after_start, "start", "closed the connection before the Metadata"),
        (no_record, "first_record", "timed out after 1 s"),
        (heartbeats_only, "first_record", "timed out after 1 s"),
        (garbage_records, "first_record", "unknown rtype 0x99"),
        (closes_after_metadata, "first_record", "closed the stream before the first record"),
        (gateway_error, "first_record", "gateway error: Internal error"),
    ],
    ids=lambda v: getattr(v, "__name__", None),
)
async def test_lying_gateway_failure_names_the_step(
    handler: Handler, step: str, error: str
) -> None:
    async with fake_gateway(handler) as port:
        rec = await strobe(_target(port))
    assert not rec.ok
    assert rec.step == step, rec
    assert error in rec.error, rec.error
    assert rec.connect_s is not None  # it got as far as a TCP connection
    assert (rec.auth_s is None) == (step == "auth")
    assert rec.first_record_s is None and rec.freshness_s is None


async def test_stopped_gateway_fails_at_connect() -> None:
    rec = await strobe(_target(_free_port()))
    assert not rec.ok and rec.step == "connect"
    assert "refused" in rec.error.lower() or "connect" in rec.error.lower(), rec.error
    assert rec.connect_s is None


async def test_probe_against_a_live_gateway() -> None:
    with gateway(feeds=SYNTH) as gw:
        ok = await strobe(_target(gw.port, timeout_s=10.0))
        bad_key = await strobe(_target(gw.port, key=OTHER_KEY))
        bad_dataset = await strobe(_target(gw.port, dataset="NOPE.DATASET"))
        bad_symbol = await strobe(_target(gw.port, symbol="NOSUCHSYMBOL", timeout_s=5.0))
    assert ok.ok, ok
    assert ok.freshness_s is not None and ok.freshness_s < 5  # the synthetic feed is live
    assert (bad_key.step, bad_key.error) == (
        "auth",
        "authentication failed: Authentication failed.",
    )
    assert bad_dataset.step == "auth" and "NOPE.DATASET" in bad_dataset.error
    assert bad_symbol.step == "subscribe" and "NOSUCHSYMBOL" in bad_symbol.error


# --- the command line ---------------------------------------------------------------------


async def test_cli_once_success_failure_and_history_survive_restarts(tmp_path: Path) -> None:
    history = tmp_path / "probe.sqlite"
    with gateway(feeds=SYNTH) as gw:
        rc, out, err = await _run_cli(*_probe_cmd(gw.port, "--once", "--history", str(history)))
        assert rc == 0, (out, err)
        assert out.startswith(f"probe ok 127.0.0.1:{gw.port}/DEMO.SYNTH: connect "), out
        rc, out, err = await _run_cli(
            *_probe_cmd(gw.port, "--once", "--json", "--history", str(history))
        )
        assert rc == 0, (out, err)
        result = json.loads(out)
        assert result["ok"] is True and result["step"] == "ok"
        assert all(result[k] > 0 for k in ("connect_s", "auth_s", "first_record_s", "total_s"))

        # a stopped gateway, and a lying one: non-zero, with the name of the failing step
        rc, out, err = await _run_cli(
            *_probe_cmd(_free_port(), "--once", "--history", str(history))
        )
        assert rc == 1 and "probe failed at step connect" in out, (out, err)
        async with fake_gateway(refuses_auth) as lying:
            rc, out, err = await _run_cli(
                *_probe_cmd(lying, "--once", "--timeout", "2", "--history", str(history))
            )
        assert rc == 1 and "probe failed at step auth" in out and "Authentication failed" in out
        # the live gateway refusing a key: a failure of the same target as the first two
        rc, out, err = await _run_cli(
            *_probe_cmd(gw.port, "--once", "--history", str(history), key=OTHER_KEY)
        )
        assert rc == 1 and "probe failed at step auth" in out, (out, err)

        # Five results so far, kept in the file by five processes (read it without our code).
        with contextlib.closing(sqlite3.connect(history)) as db:
            rows = db.execute("SELECT ok, step, target FROM strobes ORDER BY ts").fetchall()
        own = f"127.0.0.1:{gw.port}/DEMO.SYNTH"
        assert [r[:2] for r in rows] == [
            (1, "ok"),
            (1, "ok"),
            (0, "connect"),
            (0, "auth"),
            (0, "auth"),
        ]
        assert [r[2] == own for r in rows] == [True, True, False, False, True]

        # A long-running probe started later reports uptime over its target's strobes (the
        # three above and its own), not over the stopped and the lying gateways'.
        proc = await asyncio.create_subprocess_exec(
            *_probe_cmd(
                gw.port, "--interval", "3600", "--metrics-port", "0", "--history", str(history)
            ),
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            assert proc.stdout is not None
            line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
            assert line.startswith("probe metrics_port="), line
            mport = int(line.strip().split("=")[1])
            status = await _wait_status(mport, lambda s: s["probe"]["last"] is not None)
            probe = status["probe"]
            assert probe["strobes_total"] == 4
            assert probe["uptime"]["1h"] == {"ratio": 0.75, "strobes": 4, "failures": 1}
            assert probe["uptime"]["30d"] == {"ratio": 0.75, "strobes": 4, "failures": 1}
            assert probe["failures_by_step_24h"] == {"auth": 1}
            assert probe["other_targets"] == {"targets": 2, "strobes": 2}
            assert [r["target"] for r in probe["recent"]] == [own] * 4
            assert status["state"] == "degraded"  # last strobe fine, failures this hour
            m = await asyncio.to_thread(metric_samples, mport)
            assert metric(m, "gateway_probe_uptime_ratio", window="24h") == pytest.approx(0.75)
            assert metric(m, "gateway_probe_up") == 1
            assert metric(m, "gateway_probe_strobes_total", result="success") == 1
            assert metric(m, "gateway_probe_latency_seconds_count", step="first_record") == 1
            code, page = await asyncio.to_thread(http_get, mport, "/status")
            assert code == 200 and "75.00%" in page and "Gateway probe status" in page
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
            rc = await asyncio.wait_for(proc.wait(), 15)
        assert rc == 0


async def _wait_status(port: int, pred: Callable[[dict], bool], timeout: float = 15) -> dict:  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout
    while True:
        code, body = await asyncio.to_thread(http_get, port, "/status.json")
        assert code == 200
        data = json.loads(body)
        if pred(data):
            return data  # type: ignore[no-any-return]
        assert time.monotonic() < deadline, data
        await asyncio.sleep(0.1)


async def test_cli_rejects_bad_arguments() -> None:
    rc, out, err = await _run_cli(*_probe_cmd(13000, "--once", key="short"))
    assert rc == 2 and "key: API keys are 32 printable ASCII characters" in err
    rc, out, err = await _run_cli(*_probe_cmd(13000, "--once", "--schema", "nope"))
    assert rc == 2 and "schema: 'nope' is not a DBN schema" in err


# --- inside the gateway: serve --strobe ----------------------------------------------------


async def test_strobe_inside_the_gateway_and_its_history_across_restarts(tmp_path: Path) -> None:
    history = tmp_path / "strobe.sqlite"
    # the same port both times: the history is kept per target (host:port/dataset)
    port = str(_free_port())
    args = ("--port", port, "--metrics-port", "0", "--strobe", "--strobe-history", str(history))
    with gateway(*args, "--strobe-interval", "0.2", feeds=SYNTH) as gw:
        data = await _wait_status(
            gw.metrics_port, lambda s: (s["probe"]["uptime"]["1h"]["strobes"] or 0) >= 3
        )
        assert data["probe"]["target"] == f"127.0.0.1:{gw.port}/DEMO.SYNTH"
        assert data["probe"]["uptime"]["1h"]["ratio"] == 1.0
        assert data["state"] == "operational", data["reasons"]
        m = await asyncio.to_thread(metric_samples, gw.metrics_port)
        assert metric(m, "gateway_probe_up") == 1
        assert metric(m, "gateway_probe_strobes_total", result="success") >= 3
        assert metric(m, "gateway_probe_failures_total") == 0
        assert metric(m, "gateway_probe_uptime_ratio", window="1h") == 1.0
        # the strobe is a real customer session: the gateway counted it
        assert metric(m, "gateway_connections_total", result="accepted") >= 3
    with contextlib.closing(sqlite3.connect(history)) as db:
        (kept,) = db.execute("SELECT COUNT(*) FROM strobes WHERE ok = 1").fetchone()
    assert kept >= 3
    with gateway(*args, "--strobe-interval", "3600", feeds=SYNTH) as gw:
        data = await _wait_status(gw.metrics_port, lambda s: s["probe"]["last"] is not None)
        assert data["probe"]["strobes_total"] == kept + 1
        assert data["probe"]["uptime"]["1h"] == {
            "ratio": 1.0,
            "strobes": kept + 1,
            "failures": 0,
        }


async def test_a_new_gateway_shows_only_its_own_strobes(tmp_path: Path) -> None:
    """The report: "Degraded, 57.14 %, connect: 3" on a 35-second-old gateway whose own
    strobes all passed, because its history file held another target's failures."""
    history = tmp_path / "strobe.sqlite"
    stopped = _free_port()
    for _ in range(3):  # a probe of something else, earlier, into the same file
        rc, out, err = await _run_cli(*_probe_cmd(stopped, "--once", "--history", str(history)))
        assert rc == 1 and "probe failed at step connect" in out, (out, err)
    args = ("--metrics-port", "0", "--strobe", "--strobe-history", str(history))
    with gateway(*args, "--strobe-interval", "0.3", feeds=SYNTH) as gw:
        data = await _wait_status(
            gw.metrics_port,
            lambda s: (
                s["probe"]["uptime"]["1h"]["strobes"] >= 4 and len(s["throughput"]["series"]) >= 3
            ),
            timeout=30,
        )
        code, page = await asyncio.to_thread(http_get, gw.metrics_port, "/status")
        m = await asyncio.to_thread(metric_samples, gw.metrics_port)
    probe = data["probe"]
    assert data["state"] == "operational", data["reasons"]
    strobes = probe["uptime"]["1h"]["strobes"]
    for window in ("1h", "24h", "7d", "30d"):
        assert probe["uptime"][window] == {"ratio": 1.0, "strobes": strobes, "failures": 0}
    assert probe["failures_by_step_24h"] == {}
    assert probe["strobes_total"] == strobes
    assert probe["other_targets"] == {"targets": 1, "strobes": 3}
    assert {r["target"] for r in probe["recent"]} == {f"127.0.0.1:{gw.port}/DEMO.SYNTH"}
    assert metric(m, "gateway_probe_uptime_ratio", window="24h") == 1.0
    # the windows are far longer than the data, and say so
    covers = probe["window_covers_s"]
    assert 0 < covers["1h"] == covers["30d"] < 60, covers
    assert probe["latency_samples"]["1h"]["total"] == strobes
    # the throughput series is on the wall clock (as the page's time axis)
    assert abs(data["throughput"]["series"][-1][0] - data["generated_at"]) < 5

    assert code == 200
    assert "Operational" in page and "connect: 3" not in page and "100.00%" in page
    assert page.count("(data covers ") >= 4
    assert "also holds 3 strobe(s) of 1 other target(s)" in page
    assert len(re.findall(r'data-samples="total">\d+<', page)) == 2
    # the page was read a little later than the JSON: it may show a strobe or two more
    squares = re.findall(
        r'<span class="s-(ok|bad)"[^>]*title="(\d{4}-\d\d-\d\d [\d:]{8}) UTC: ', page
    )
    assert 4 <= len(squares) <= 20 and {ok for ok, _ in squares} == {"ok"}, squares
    axis = page.split('<div class="axis"', 1)[1].split("</div>", 1)[0]
    assert re.findall(r">(\d\d:\d\d:\d\d)<", axis), axis
