"""Metrics after a scripted session (read with prometheus-client's own parser), health and
readiness, /status.json, the structured logs, the deploy files, and the status page in a
real headless browser."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import select
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gateway.client import ClientError, LiveClient
from gateway.dbn import GATEWAY_RTYPES, encode_publisher_metadata
from gateway.feeds.synthetic import SyntheticGenerator, SyntheticOptions
from gateway.ops.history import History, StrobeRecord
from tests.integration.helpers import (
    KEY,
    OTHER_KEY,
    ROOT,
    apoll_until,
    gateway,
    http_get,
    metric,
    metric_samples,
)
from tests.support.waiting import poll_until

DEPLOY = ROOT / "deploy" / "monitoring"
GATEWAY_RECORD_TYPES = np.array(sorted(GATEWAY_RTYPES), dtype=np.uint8)
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _mbp1_records(n: int, seed: int) -> tuple[dict[str, int], bytes]:
    gen = SyntheticGenerator(SyntheticOptions(instruments=20, seed=seed, schemas=("mbp-1",)))
    t0 = time.time_ns()
    blob = b"".join(b"".join(gen.make(1000, t0 + k, 1000)) for k in range(n // 1000))
    return dict(gen.instruments), blob


async def _samples(port: int) -> Samples:
    return await asyncio.to_thread(metric_samples, port)


async def _status(port: int) -> dict[str, Any]:
    code, body = await asyncio.to_thread(http_get, port, "/status.json")
    assert code == 200
    data: dict[str, Any] = json.loads(body)
    return data


class Counting:
    """Reads a session, counting market records (not the gateway's own)."""

    def __init__(self, client: LiveClient) -> None:
        self.client = client
        self.records = 0
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        async for batch in self.client.batches():
            idx = batch.index
            self.records += int(np.count_nonzero(~np.isin(idx.rtypes, GATEWAY_RECORD_TYPES)))


# --- metrics after a scripted session ------------------------------------------------------


async def test_counters_move_by_the_expected_amounts_after_a_scripted_session() -> None:
    symbols, blob = _mbp1_records(30_000, seed=5)
    n = len(blob) // 80
    with gateway(
        "--metrics-port", "0", "--log-format", "json", feeds={"OBS.FEED": "ingest://127.0.0.1:0"}
    ) as gw:
        before = await _samples(gw.metrics_port)
        # 1. a wrong key
        with pytest.raises(ClientError, match="Authentication failed"):
            await LiveClient.connect("127.0.0.1", gw.port, OTHER_KEY, "OBS.FEED")
        # 2. two sessions: plain and zstd, same subscription
        plain = await LiveClient.connect("127.0.0.1", gw.port, KEY, "OBS.FEED")
        zst = await LiveClient.connect("127.0.0.1", gw.port, KEY, "OBS.FEED", compression="zstd")
        for c in (plain, zst):
            await c.subscribe("mbp-1", "ALL_SYMBOLS")
            await c.start()
        readers = [Counting(plain), Counting(zst)]

        def streaming() -> Samples | None:
            m = metric_samples(gw.metrics_port)
            both = all(
                metric(
                    m,
                    "gateway_sessions",
                    dataset="OBS.FEED",
                    compression=comp,
                    ts_out="0",
                    state="streaming",
                )
                == 1
                for comp in ("none", "zstd")
            )
            grouped = metric(m, "gateway_fanout_groups", dataset="OBS.FEED") == 2
            return m if both and grouped else None

        mid = await apoll_until(streaming, 15, 0.05, "both sessions streaming in /metrics")
        assert metric(mid, "gateway_fanout_groups", dataset="OBS.FEED") == 2
        assert metric(mid, "gateway_connections_open") == 2
        # 3. a publisher sends n records; both sessions get every one
        pub = socket.create_connection(("127.0.0.1", gw.ingest_ports["OBS.FEED"]))
        try:
            meta = encode_publisher_metadata("OBS.FEED", time.time_ns(), symbols, "mbp-1")
            await asyncio.to_thread(pub.sendall, meta + blob)
            await apoll_until(lambda: all(r.records >= n for r in readers), what="n records each")
            received = {"none": plain.bytes_received, "zstd": zst.bytes_received}
            # /metrics reads the totals when scraped, so the waits above may all end within
            # one tick (every 0.5 s: the loop-lag and session-buffer samples): let one pass
            # while both sessions are open
            lag_count = metric(
                await _samples(gw.metrics_port), "gateway_event_loop_lag_seconds_count"
            )
            await apoll_until(
                lambda: (
                    metric(metric_samples(gw.metrics_port), "gateway_event_loop_lag_seconds_count")
                    > lag_count
                ),
                5,
                0.05,
                "a tick with both sessions open",
            )
            for c in (plain, zst):
                await c.close()
            for r in readers:
                await asyncio.wait_for(r.task, 5)
            # nothing more than the n records arrived (the readers have ended)
            assert [r.records for r in readers] == [n, n]

            def ended() -> Samples | None:
                # a snapshot once the exporter has caught up with both sessions' ends
                m = metric_samples(gw.metrics_port)
                done = (
                    metric(m, "gateway_sessions") == 0
                    and metric(m, "gateway_disconnects_total")
                    - metric(before, "gateway_disconnects_total")
                    >= 2
                    and metric(m, "gateway_records_out_total", dataset="OBS.FEED")
                    - metric(before, "gateway_records_out_total", dataset="OBS.FEED")
                    >= 2 * n
                )
                return m if done else None

            after = await apoll_until(ended, 15, 0.05, "both session ends in /metrics")
        finally:
            pub.close()

    def moved(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert moved("gateway_connections_total", result="accepted") == 3
    assert moved("gateway_connections_total", result="rejected") == 0
    assert moved("gateway_auth_failures_total") == 1
    assert moved("gateway_auth_failures_total", reason="bad_key") == 1
    assert moved("gateway_disconnects_total") == 2
    assert moved("gateway_disconnects_total", reason="client_closed") == 2
    assert moved("gateway_feed_records_in_total", dataset="OBS.FEED") == n
    assert moved("gateway_feed_bytes_in_total", dataset="OBS.FEED") == len(blob)
    assert moved("gateway_records_out_total", dataset="OBS.FEED") == 2 * n
    # every byte each session was sent, after compression, as its client counted it
    for comp, got in received.items():
        assert moved("gateway_bytes_out_total", dataset="OBS.FEED", compression=comp) == got
    assert moved("gateway_records_skipped_total") == 0
    assert moved("gateway_slow_reader_events_total") == 0
    # per chunk: the zstd group builds one frame; both groups write their variant once
    builds = moved("gateway_fanout_variant_builds_total")
    assert builds > 0 and moved("gateway_fanout_variant_writes_total") == 2 * builds
    assert metric(after, "gateway_sessions") == 0
    assert metric(after, "gateway_connections_open") == 0
    assert metric(after, "gateway_feed_up", dataset="OBS.FEED") == 1
    assert 0 <= metric(after, "gateway_feed_last_record_age_seconds", dataset="OBS.FEED") < 10
    assert metric(after, "gateway_feed_lag_seconds", dataset="OBS.FEED") > 0
    assert metric(after, "gateway_feed_paused", dataset="OBS.FEED") == 0
    assert moved("gateway_feed_events_total", dataset="OBS.FEED", event="up") == 1
    assert moved("gateway_event_loop_lag_seconds_count") > 0
    assert moved("gateway_session_buffered_bytes_count") > 0
    assert metric(after, "gateway_info", version="0.1.0") == 1
    # Bounded labels: nothing per session, peer or key unless metrics_per_key is on.
    label_names = {k for (_, labels) in after for k, _ in labels}
    assert not label_names & {"key_id", "key", "peer", "session", "session_id", "client"}
    assert metric(after, "gateway_key_sessions") == 0

    # One structured line per session start and end, with the numbers the client saw.
    lines = [json.loads(line) for line in gw.log().splitlines() if line.startswith("{")]
    starts = [r for r in lines if r.get("event") == "session start"]
    ends = [r for r in lines if r.get("event") == "session end"]
    assert len(starts) == 2 and len(ends) == 2
    for end in ends:
        comp = end["compression"]
        assert end["dataset"] == "OBS.FEED" and end["key_id"] == "key-00000"
        assert end["ts_out"] == 0 and end["subscriptions"] == 1
        assert end["records"] == n and end["bytes"] == received[comp]
        assert end["reason"] == "client closed" and end["duration_s"] > 0
        assert re.fullmatch(r"127\.0\.0\.1:\d+", end["peer"])
    refused = [r for r in lines if r.get("event") == "auth refused"]
    assert len(refused) == 1 and refused[0]["reason"] == "bad_key"
    text = gw.log()
    assert KEY not in text and OTHER_KEY not in text  # keys are never logged


async def test_per_key_series_only_when_enabled() -> None:
    with gateway(
        "--metrics-port",
        "0",
        config="metrics_per_key = true\n",
        feeds={"DEMO.SYNTH": "synthetic:?rate=200"},
    ) as gw:
        client = await LiveClient.connect("127.0.0.1", gw.port, KEY, "DEMO.SYNTH")
        try:
            await client.subscribe("trades", "ALL_SYMBOLS")
            await client.start()
            await apoll_until(
                lambda: (
                    metric(
                        metric_samples(gw.metrics_port), "gateway_key_sessions", key_id="key-00000"
                    )
                    == 1
                ),
                what="gateway_key_sessions{key_id=key-00000} == 1",
            )
        finally:
            await client.close()
        await apoll_until(
            lambda: metric(metric_samples(gw.metrics_port), "gateway_key_sessions") == 0,
            5,
            what="gateway_key_sessions == 0",
        )


# --- health, readiness, status.json ------------------------------------------------------


async def test_healthz_readyz_and_status_json_follow_the_feed() -> None:
    symbols, blob = _mbp1_records(2_000, seed=9)
    with gateway(
        "--metrics-port",
        "0",
        config="feed_grace_s = 1.0\n",
        feeds={"R.FEED": "ingest://127.0.0.1:0"},
    ) as gw:
        port = gw.metrics_port
        assert await asyncio.to_thread(http_get, port, "/healthz") == (200, "ok\n")
        # within the grace period: ready, and it says so
        code, body = await asyncio.to_thread(http_get, port, "/readyz")
        assert code == 200, body
        assert "grace" in json.loads(body)["feeds"]["R.FEED"]
        # the 1 s grace period ends: not ready
        code, body = await apoll_until(
            lambda: (r := http_get(port, "/readyz"))[0] == 503 and r, 10, 0.05, "/readyz 503"
        )
        ready = json.loads(body)
        assert ready["ready"] is False and ready["feeds"]["R.FEED"].startswith("down: waiting")
        status = await _status(port)
        assert status["state"] == "down" and "gateway not ready" in status["reasons"]
        assert status["gateway"]["ready"] is False
        await apoll_until(
            lambda: metric(metric_samples(port), "gateway_ready") == 0, what="gateway_ready 0"
        )

        pub = socket.create_connection(("127.0.0.1", gw.ingest_ports["R.FEED"]))
        try:
            pub.sendall(encode_publisher_metadata("R.FEED", time.time_ns(), symbols) + blob)
            await apoll_until(lambda: http_get(port, "/readyz")[0] == 200, 5, what="/readyz 200")
            client = await LiveClient.connect("127.0.0.1", gw.port, KEY, "R.FEED")
            await client.subscribe("mbp-1", "ALL_SYMBOLS")
            await client.start()
            reader = Counting(client)
            pub.sendall(blob)
            await apoll_until(lambda: reader.records >= len(blob) // 80, 10, what="the records")

            def flowing() -> dict[str, Any] | None:  # throughput sampled with the records in
                code, body = http_get(port, "/status.json")
                assert code == 200, body
                st: dict[str, Any] = json.loads(body)
                tp = st["throughput"]["windows"]["1m"]
                rates = (tp["records_in_per_s"], tp["records_out_per_s"], tp["bytes_in_per_s"])
                return st if min(rates) > 0 else None

            status = await apoll_until(flowing, 10, 0.05, "throughput in /status.json")
            await client.close()
        finally:
            pub.close()
        assert status["state"] == "operational", status["reasons"]
        assert status["sessions"]["total"] == 1
        assert status["sessions"]["by_dataset"] == {"R.FEED": {"streaming": 1, "authenticated": 0}}
        (feed,) = status["feeds"]
        assert feed["dataset"] == "R.FEED" and feed["connected"] and not feed["paused"]
        assert feed["records_in"] == 2 * (len(blob) // 80)
        assert feed["bytes_in"] == 2 * len(blob)
        assert feed["lag_s"] is not None and feed["last_record_age_s"] < 10
        tp = status["throughput"]["windows"]["1m"]
        assert tp["records_in_per_s"] > 0 and tp["records_out_per_s"] > 0
        assert tp["bytes_in_per_s"] > 0
        assert status["probe"] is None  # no --strobe
        code, page = await asyncio.to_thread(http_get, port, "/status")
        assert code == 200 and "R.FEED" in page and "<!doctype html>" in page
        assert (await asyncio.to_thread(http_get, port, "/nope"))[0] == 404


async def test_status_shows_a_paused_lossless_feed() -> None:
    symbols, blob = _mbp1_records(200_000, seed=11)
    config = "[slow_reader]\nstall_timeout_s = 30.0\n"
    with gateway(
        "--metrics-port",
        "0",
        config=config,
        feeds={"P.FEED": "ingest://127.0.0.1:0?backpressure=1"},
    ) as gw:
        # a session that never reads, with a small receive buffer: the feed must pause
        client = await LiveClient.connect("127.0.0.1", gw.port, KEY, "P.FEED", rcvbuf=16384)
        await client.subscribe("mbp-1", "ALL_SYMBOLS")
        await client.start()
        pub = socket.create_connection(("127.0.0.1", gw.ingest_ports["P.FEED"]))
        pub.setblocking(False)
        payload = memoryview(encode_publisher_metadata("P.FEED", time.time_ns(), symbols) + blob)
        stop = threading.Event()

        def pump() -> None:  # publish as fast as the gateway takes it
            view = payload
            while view and not stop.is_set():
                try:
                    view = view[pub.send(view[:65536]) :]
                except BlockingIOError:
                    select.select([], [pub], [], 0.1)
                except OSError:
                    return

        pumping = threading.Thread(target=pump, daemon=True)
        pumping.start()
        try:

            def paused() -> dict[str, Any] | None:
                code, body = http_get(gw.metrics_port, "/status.json")
                assert code == 200, body
                st: dict[str, Any] = json.loads(body)
                return st if st["feeds"][0]["paused"] else None

            status = await apoll_until(paused, 10, 0.1, "the feed paused in /status.json")
            assert status["state"] == "degraded"
            assert "feed P.FEED paused for a slow session" in status["reasons"]
            assert status["feeds"][0]["pauses"] >= 1
            code, page = await asyncio.to_thread(http_get, gw.metrics_port, "/status")
            assert '<span class="badge warn">paused</span>' in page
            await apoll_until(
                lambda: metric(metric_samples(gw.metrics_port), "gateway_feed_paused") == 1,
                what="gateway_feed_paused 1",
            )
        finally:
            stop.set()
            pumping.join(5)
            pub.close()
            await client.close()


# --- deploy files ---------------------------------------------------------------------


def _exposed_names(samples_text: str) -> set[str]:
    """Every series name a scrape can hold, by family type (a labelled family may have no
    child yet, so its samples alone would miss it)."""
    from prometheus_client.parser import text_string_to_metric_families

    names: set[str] = set()
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "info": ("_info",),
        "gauge": ("",),
    }
    for family in text_string_to_metric_families(samples_text):
        for suffix in suffixes.get(family.type, ("",)):
            names.add(family.name + suffix)
    return names


async def test_deploy_files_use_the_exported_metric_names(tmp_path: Path) -> None:
    prom = (DEPLOY / "prometheus.yml").read_text()
    alerts = (DEPLOY / "alerts.yml").read_text()
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    with gateway(
        "--metrics-port",
        "0",
        "--strobe",
        "--strobe-history",
        str(tmp_path / "h.sqlite"),
        feeds={"DEMO.SYNTH": "synthetic:?rate=200"},
    ) as gw:
        used = set(re.findall(r"\bgateway_[a-z0-9_]+", alerts + "\n".join(exprs)))
        assert len(used) >= 25

        def missing() -> set[str]:
            code, text = http_get(gw.metrics_port, "/metrics")
            assert code == 200
            return used - _exposed_names(text)

        # the probe's families are complete once its first strobe is in (and stopping the
        # gateway then does not cut a strobe short)
        await apoll_until(
            lambda: metric(metric_samples(gw.metrics_port), "gateway_probe_strobes_total") > 0,
            15,
            0.05,
            "the first strobe",
        )
        assert not missing(), f"not exported: {sorted(missing())}"
    for needed in (
        "GatewayDown",
        "GatewayProbeDown",
        "GatewayProbeFailing",
        "GatewayFeedStale",
        "GatewaySlowReaderDisconnects",
        "GatewayAuthFailureSpike",
    ):
        assert f"alert: {needed}" in alerts
    assert "alerts.yml" in prom and "job_name: gateway" in prom
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip(
            "promtool is not installed (Debian package prometheus; `make test-deps`): "
            "the dashboard's PromQL is not checked"
        )
    # (the config, the rules and their rule tests: tests/integration/test_deploy_files.py)
    # The dashboard's queries as recording rules: promtool parses every one of them.
    rules = tmp_path / "dashboard-rules.yml"
    body = "groups:\n  - name: dashboard\n    rules:\n"
    for i, expr in enumerate(exprs):
        expr = expr.replace("$__rate_interval", "5m").replace("$instance", ".*")
        body += f"      - record: dashboard:q{i}\n        expr: {json.dumps(expr)}\n"
    rules.write_text(body)
    out = subprocess.run(
        [promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and f"{len(exprs)} rules found" in out.stdout, out.stdout


# --- the status page in a real browser --------------------------------------------------


def _chromium() -> str:
    """The browser, or a skip saying how to get it: tests never install software."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.skip("chromium is not installed (Debian package chromium; `make test-deps`)")
    return found


class Browser:
    """Headless Chromium driven over the DevTools protocol (aiohttp's websocket client)."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.events: list[dict[str, Any]] = []
        self._next = 0
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            data = json.loads(msg.data)
            fut = self._waiting.pop(data.get("id", -1), None)
            if fut is not None:
                fut.set_result(data)
            else:
                self.events.append(data)

    async def call(self, method: str, session: str | None = None, **params: Any) -> Any:
        self._next += 1
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[self._next] = fut
        msg: dict[str, Any] = {"id": self._next, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        await self.ws.send_str(json.dumps(msg))
        reply = await asyncio.wait_for(fut, 30)
        assert "error" not in reply, reply
        return reply.get("result", {})

    async def open(self, url: str, width: int, height: int, mobile: bool) -> Page:
        target = await self.call("Target.createTarget", url="about:blank")
        attached = await self.call(
            "Target.attachToTarget", targetId=target["targetId"], flatten=True
        )
        page = Page(self, attached["sessionId"])
        for domain in ("Page", "Runtime", "Log"):
            await page.call(f"{domain}.enable")
        await page.call(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=2 if mobile else 1,
            mobile=mobile,
        )
        mark = len(self.events)
        await page.call("Page.navigate", url=url)
        deadline = time.monotonic() + 20
        while not any(
            e.get("method") == "Page.loadEventFired" and e.get("sessionId") == page.session
            for e in self.events[mark:]
        ):
            assert time.monotonic() < deadline, "the page did not load"
            await asyncio.sleep(0.05)
        # one turn of the page's own event loop: whatever its scripts log as they finish
        # loading is reported before this reply
        await page.call(
            "Runtime.evaluate", expression="new Promise(r => setTimeout(r, 0))", awaitPromise=True
        )
        return page

    def problems(self, session: str) -> list[str]:
        """Console errors, uncaught exceptions and error log entries of one page."""
        out = []
        for e in self.events:
            if e.get("sessionId") != session:
                continue
            method, params = e.get("method"), e.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                out.append("console: " + json.dumps(params.get("args"))[:300])
            elif method == "Runtime.exceptionThrown":
                details = params.get("exceptionDetails", {})
                text = details.get("exception", {}).get("description") or details.get("text")
                out.append(f"exception: {text}"[:300])
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                out.append("log: " + params["entry"].get("text", "")[:300])
        return out


class Page:
    def __init__(self, browser: Browser, session: str) -> None:
        self.browser = browser
        self.session = session

    async def call(self, method: str, **params: Any) -> Any:
        return await self.browser.call(method, self.session, **params)

    async def js(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    async def screenshot(self) -> bytes:
        shot = await self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        return base64.b64decode(shot["data"])


@contextlib.asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    import aiohttp

    exe = _chromium()
    profile = tempfile.mkdtemp(prefix="gateway-chromium-")
    proc = subprocess.Popen(
        [
            exe,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--remote-debugging-port=0",
            f"--user-data-dir={profile}",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        active = Path(profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (active.exists() and len(active.read_text().split()) >= 2):
            assert proc.poll() is None, f"chromium exited with {proc.returncode}"
            assert time.monotonic() < deadline, "chromium did not open its DevTools port"
            await asyncio.sleep(0.05)
        port, path = active.read_text().split()[:2]
        async with (
            aiohttp.ClientSession() as http,
            http.ws_connect(f"ws://127.0.0.1:{port}{path}", max_msg_size=0) as ws,
        ):
            browser = Browser(ws)
            try:
                yield browser
            finally:
                with contextlib.suppress(Exception):
                    await browser.call("Browser.close")
                browser._reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await browser._reader
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        shutil.rmtree(profile, ignore_errors=True)


def _seed_history(path: Path, now: float, target: str) -> None:
    """30 days of strobes of ``target`` every 10 minutes (mid-slot, far from window edges), a
    few failed."""
    failed = {2: "first_record", 40: "auth", 41: "auth", 700: "connect", 3000: "first_record"}
    rng = np.random.default_rng(3)
    history = History(path)
    try:
        for k in range(30 * 144 - 1, -1, -1):
            ts = now - k * 600 - 300
            step = failed.get(k, "ok")
            ok = step == "ok"
            connect, auth = rng.gamma(2, 0.0003), rng.gamma(2, 0.0004)
            first = rng.gamma(3, 0.004)
            history.record(
                StrobeRecord(
                    ts=ts,
                    ok=ok,
                    step=step,
                    error="" if ok else "timed out after 10 s",
                    target=target,
                    connect_s=connect,
                    auth_s=auth if ok or step != "auth" else None,
                    first_record_s=first if ok else None,
                    total_s=connect + auth + first + 0.001,
                    freshness_s=rng.gamma(2, 0.003) if ok else None,
                )
            )
    finally:
        history.close()


@pytest.mark.timeout(300)
async def test_status_page_in_a_headless_browser(tmp_path: Path) -> None:
    history = tmp_path / "probe.sqlite"
    # the gateway strobes itself as 127.0.0.1:PORT/DEMO.SYNTH: seed that target's history
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _seed_history(history, time.time(), f"127.0.0.1:{port}/DEMO.SYNTH")
    async with chromium() as browser:
        # a page with a console error and one with an exception: the check catches both
        bad = await browser.open(
            "data:text/html,<p>x</p><script>console.error('boom');undefinedFn()</script>",
            800,
            600,
            mobile=False,
        )
        caught = browser.problems(bad.session)
        assert any("boom" in p for p in caught) and any("undefinedFn" in p for p in caught)

        with gateway(
            "--metrics-port",
            "0",
            "--strobe",
            "--strobe-interval",
            "3600",
            "--strobe-history",
            str(history),
            "--port",
            str(port),
            feeds={"DEMO.SYNTH": "synthetic:?rate=2000"},
        ) as gw:
            assert gw.port == port
            url = f"http://127.0.0.1:{gw.metrics_port}/status"

            def strobed() -> dict[str, Any] | None:
                code, body = http_get(gw.metrics_port, "/status.json")
                assert code == 200, body
                st: dict[str, Any] = json.loads(body)
                return st if st["probe"]["last"] is not None else None

            status = await apoll_until(strobed, 15, 0.1, "the gateway's first strobe")
            # 4,320 seeded strobes (5 failed) and the gateway's own first one (fine)
            uptime = status["probe"]["uptime"]
            assert uptime["1h"] == {"ratio": 6 / 7, "strobes": 7, "failures": 1}
            assert uptime["24h"]["strobes"] == 145 and uptime["24h"]["failures"] == 3
            assert uptime["7d"]["failures"] == 4 and uptime["30d"]["failures"] == 5
            assert uptime["30d"]["strobes"] == 4321
            clients = [
                await LiveClient.connect("127.0.0.1", gw.port, KEY, "DEMO.SYNTH", compression=c)
                for c in ("none", "zstd")
            ]
            try:
                for c in clients:
                    await c.subscribe("trades", "ALL_SYMBOLS")
                    await c.start()
                readers = [Counting(c) for c in clients]

                def charted() -> bool:  # a few throughput samples with records, for the chart
                    code, body = http_get(gw.metrics_port, "/status.json")
                    series = json.loads(body)["throughput"]["series"] if code == 200 else []
                    moving = [p for p in series if p[1] > 0 and p[2] > 0]
                    return len(moving) >= 3 and all(r.records > 0 for r in readers)

                await apoll_until(charted, 20, 0.1, "three throughput samples with records")
                desktop = await browser.open(url, 1280, 900, mobile=False)
                phone = await browser.open(url, 390, 844, mobile=True)
                assert all(r.records > 0 for r in readers)
                await _check_pages(browser, [desktop, phone], uptime)
                shot = await desktop.screenshot()
                await phone.screenshot()
            finally:
                for c in clients:
                    await c.close()
    assert shot[:8] == b"\x89PNG\r\n\x1a\n" and len(shot) > 20_000
    (tmp_path / "status.png").write_bytes(shot)
    target = os.environ.get("GATEWAY_STATUS_SCREENSHOT")
    if target:  # refresh docs/status.png: GATEWAY_STATUS_SCREENSHOT=docs/status.png
        Path(target).write_bytes(shot)


async def _check_pages(browser: Browser, pages: list[Page], uptime: dict[str, Any]) -> None:
    for page in pages:
        assert browser.problems(page.session) == []
        shown = await page.js(
            "Object.fromEntries([...document.querySelectorAll('[data-window]')]"
            ".map(e => [e.dataset.window, e.textContent.trim()]))"
        )
        assert shown == {label: f"{uptime[label]['ratio'] * 100:.2f}%" for label in uptime}
        assert shown["1h"] == "85.71%" and shown["30d"] == "99.88%"
        text = await page.js("document.body.innerText")
        for needle in ("Uptime", "Last 30 days", "Probe", "Sessions", "Throughput", "Feeds"):
            assert needle in text
        assert "DEMO.SYNTH" in text and "Degraded" in text
        assert await page.js("document.querySelector('#sessions .value').textContent") == "2"
        assert await page.js("document.querySelectorAll('svg.spark polyline').length") == 2
        # nothing wider than the screen (no sideways scrolling on a phone)
        assert await page.js("document.documentElement.scrollWidth <= window.innerWidth"), (
            await page.js("[document.documentElement.scrollWidth, window.innerWidth]")
        )


# --- the journal ----------------------------------------------------------------------


async def test_metrics_and_status_show_the_journal(tmp_path: Path) -> None:
    """A gateway with --journal-dir: per dataset journal figures on /metrics (the write
    histogram included), and on /status.json and the page how far back it replays."""
    with gateway(
        "--metrics-port",
        "0",
        "--journal-dir",
        str(tmp_path / "journal"),
        feeds={"J.SYNTH": "synthetic:?rate=2000"},
    ) as gw:
        port = gw.metrics_port

        def journaled() -> Samples | None:
            s = metric_samples(port)
            return (
                s if metric(s, "gateway_journal_write_seconds_count", dataset="J.SYNTH") else None
            )

        samples = await asyncio.to_thread(
            poll_until, journaled, 10, 0.05, "the first journal write on /metrics"
        )
        status = await _status(port)
        code, page = await asyncio.to_thread(http_get, port, "/status")
    assert metric(samples, "gateway_journal_enabled", dataset="J.SYNTH") == 1
    assert metric(samples, "gateway_journal_bytes", dataset="J.SYNTH") > 0
    assert metric(samples, "gateway_journal_segments", dataset="J.SYNTH") >= 1
    assert metric(samples, "gateway_journal_retention_seconds", dataset="J.SYNTH") == 86400
    oldest = metric(samples, "gateway_journal_oldest_timestamp_seconds", dataset="J.SYNTH")
    newest = metric(samples, "gateway_journal_newest_timestamp_seconds", dataset="J.SYNTH")
    assert time.time() - 60 < oldest <= newest < time.time() + 60
    assert metric(samples, "gateway_journal_write_errors_total", dataset="J.SYNTH") == 0
    assert metric(samples, "gateway_journal_write_seconds_bucket", le="+Inf") >= 1
    for reason in ("retention", "max_bytes"):
        assert (
            "gateway_journal_segments_deleted_total",
            (("dataset", "J.SYNTH"), ("reason", reason)),
        ) in samples
    assert ("gateway_replays_active", ()) in samples
    (feed,) = status["feeds"]
    journal = feed["journal"]
    assert journal["state"] == "on" and journal["oldest_ts"] is not None
    assert str(tmp_path) not in json.dumps(status)  # never a path
    assert code == 200 and "replay back to " in page and str(tmp_path) not in page
