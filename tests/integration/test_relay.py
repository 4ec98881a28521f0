"""The relay feed (``lsg://``) between real gateway processes: a primary with an ingest feed
and a journal, an edge relaying it, clients on the edge.

(a) Exact across faults: the primary killed with SIGKILL and restarted on its journal, then
    the edge killed with SIGKILL and restarted on its own journal. The project's resuming
    client on the edge ends up with exactly the records the primary journaled, byte for byte
    and in order (a ``start=0`` replay on the last primary is the reference); the edge
    reports no gap and dropped the records the primary sent again.
(b) A gap is never silent: a primary without a journal sends no checkpoints and cannot
    replay, so after its restart the edge carries on live, tells its sessions (a SystemMsg
    ``Feed D: gap: ...``) and counts it (``gateway_relay_gaps_total{reason="no_checkpoint"}``).
(c) While the upstream is down the edge keeps its sessions (heartbeats), ``/readyz`` says
    503 naming the feed after ``feed_grace_s``, and the official client reads on once the
    upstream is back. The key never shows: not in the log, ``/metrics``, ``/status.json``
    or the command line.
(d) An edge with ``--workers 2`` relays a zstd upstream to the official client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gateway.client import LiveClient
from gateway.dbn import RTYPE_SYSTEM
from gateway.feeds.relay import CURSOR_FILE
from tests.integration.helpers import (
    KEY,
    GatewayProcess,
    OfficialSession,
    apoll_until,
    data_records,
    http_get,
    metric_samples,
    start_gateway,
)
from tests.integration.test_client_resume import Publisher, Sink, _connect, journal_dir
from tests.support.prometheus import metric

DATASET = "ING.R"
RECONNECTS = "gateway_relay_reconnects_total"
SMALL_BUFFERS = """
[slow_reader]
write_high_water = 65536
write_low_water = 16384

[transport]
sndbuf = 65536
"""


@contextlib.contextmanager
def key_file(tmp: Path) -> Iterator[Path]:
    path = tmp / "upstream.key"
    path.write_text(KEY + "\n")
    path.chmod(0o600)
    yield path


@contextlib.asynccontextmanager
async def processes() -> AsyncIterator[list[GatewayProcess]]:
    started: list[GatewayProcess] = []
    try:
        yield started
    finally:
        for gw in started:
            gw.stop()
            gw.cleanup()


async def _primary(started: list[GatewayProcess], jdir: Path | None, *args: str) -> GatewayProcess:
    extra = ("--journal-dir", str(jdir)) if jdir is not None else ()
    gw = await asyncio.to_thread(
        start_gateway, *extra, *args, feeds={DATASET: "ingest://127.0.0.1:0"}
    )
    started.append(gw)
    return gw


def _relay_uri(upstream: int, key: Path, extra: str = "") -> str:
    return f"lsg://127.0.0.1:{upstream}?schemas=trades&key_file={key}&heartbeat_interval_s=5{extra}"


async def _edge(
    started: list[GatewayProcess],
    upstream: int,
    key: Path,
    *args: str,
    config: str = "",
    extra: str = "",
) -> GatewayProcess:
    gw = await asyncio.to_thread(
        start_gateway,
        "--metrics-port",
        "0",
        *args,
        feeds={DATASET: _relay_uri(upstream, key, extra)},
        config=config,
    )
    started.append(gw)
    return gw


def _relay_status(gw: GatewayProcess) -> dict[str, Any]:
    doc = json.loads(http_get(gw.metrics_port, "/status.json")[1])
    feed = next(f for f in doc["feeds"] if f["dataset"] == DATASET)
    relay: dict[str, Any] = feed["relay"]
    return relay


async def _upstream_up(edge: GatewayProcess, timeout: float = 15.0) -> None:
    await apoll_until(
        lambda: _edge_metric(edge, "gateway_relay_upstream_up") == 1,
        timeout,
        0.02,
        "the edge connected upstream",
    )


def _saved_seq(journal: Path) -> int:
    """The upstream checkpoint in the edge's saved relay position (-1: none saved yet)."""
    path = journal / DATASET / CURSOR_FILE
    try:
        seq = json.loads(path.read_text())["seq"]
    except (OSError, ValueError, KeyError):
        return -1
    return int(seq)


def _edge_metric(gw: GatewayProcess, name: str, **labels: str) -> float:
    return metric(metric_samples(gw.metrics_port), name, dataset=DATASET, **labels)


async def test_edge_is_exact_across_primary_kill9_and_edge_kill9(tmp_path: Path) -> None:
    with journal_dir() as pj, journal_dir() as ej, key_file(tmp_path) as key:
        async with processes() as started:
            primary = await _primary(started, pj)
            pport = primary.port
            edge = await _edge(started, pport, key, "--journal-dir", str(ej))
            eport = edge.port
            await _upstream_up(edge, 15.0)
            sink = Sink(await _connect(eport, DATASET))
            pub = Publisher(primary.ingest_ports[DATASET], 0)
            try:
                # 1. the primary dies with SIGKILL and comes back on its journal, once the
                # edge holds a checkpoint of the primary's (before one, a resume cannot be
                # exact: that case is the no_checkpoint gap below)
                await sink.past_a_checkpoint(300)
                await apoll_until(
                    lambda: _relay_status(edge)["checkpoint"] is not None,
                    15.0,
                    0.02,
                    "a checkpoint from the primary at the edge",
                )
                primary.proc.kill()
                await asyncio.to_thread(primary.proc.wait, 10)
                pub.stop()
                primary = await _primary(started, pj, "--port", str(pport))
                pub = Publisher(primary.ingest_ports[DATASET], pub.next)
                try:
                    await apoll_until(
                        lambda: _edge_metric(edge, RECONNECTS, mode="resume") >= 1,
                        30.0,
                        0.05,
                        "the edge resumed from the restarted primary",
                    )
                except AssertionError as exc:
                    raise AssertionError(
                        f"{exc}\n--- edge log ---\n{edge.log()[-6000:]}"
                        f"\n--- primary log ---\n{primary.log()[-4000:]}"
                    ) from None
                # 2. the edge dies with SIGKILL and comes back on its journal, once it has
                # saved a position on the restarted primary
                await sink.past_a_checkpoint(sink.count + 300)
                await apoll_until(
                    lambda: _saved_seq(ej) >= 0, 15.0, 0.02, "the edge saved its position"
                )
                edge.proc.kill()
                await asyncio.to_thread(edge.proc.wait, 10)
                edge = await _edge(
                    started, pport, key, "--journal-dir", str(ej), "--port", str(eport)
                )
                await apoll_until(lambda: pub.sent >= 600, 15.0, 0.01, "records after that")
            finally:
                pub.stop()
            last = pub.next
            await apoll_until(
                lambda: sink.count and sink.sequences()[-1] == last - 1,
                30.0,
                0.01,
                "every record of the last publisher through the edge",
            )
            await sink.close()
            ref = Sink(await _connect(pport, DATASET, start=0))
            await apoll_until(lambda: ref.count >= sink.count, 15.0, 0.01, "the replay")
            await asyncio.sleep(0)  # nothing more is coming: the publisher is gone
            await ref.close()
            relayed = _edge_metric(edge, "gateway_relay_gaps_total", reason="aged_out")
            restored = "resuming upstream 1 after checkpoint" in edge.log()
        assert sink.client.gaps == []
        assert sink.client.reconnects >= 1  # the edge's kill -9
        assert relayed == 0
        assert restored, "the restarted edge did not resume from its saved position"
        # byte for byte what the primary journaled, in order: no gap, no duplicate
        assert sink.count == ref.count
        assert bytes(sink.data) == bytes(ref.data)
        seqs = sink.sequences()
        assert len(np.unique(seqs)) == len(seqs)
        assert np.all(np.diff(seqs) > 0)


@pytest.mark.parametrize(
    ("journals", "reason"), [("none", "no_checkpoint"), ("replaced", "bad_resume")]
)
async def test_a_gap_is_told_to_sessions_and_counted(
    tmp_path: Path, journals: str, reason: str
) -> None:
    first = second = None
    if journals == "replaced":  # the primary comes back on a new, empty journal
        first, second = tmp_path / "j1", tmp_path / "j2"
    with key_file(tmp_path) as key:
        async with processes() as started:
            primary = await _primary(started, first)
            pport = primary.port
            edge = await _edge(started, pport, key)
            await _upstream_up(edge, 15.0)
            live = await LiveClient.connect("127.0.0.1", edge.port, KEY, DATASET)
            await live.subscribe("trades", "ALL_SYMBOLS")
            await live.start()
            session = SystemTexts(live)
            pub = Publisher(primary.ingest_ports[DATASET], 0)
            try:
                # the relay's checkpoints come with the records; then the primary dies
                await apoll_until(lambda: pub.sent >= 400, 15.0, 0.01, "records published")
                if first is not None:
                    await apoll_until(
                        lambda: _relay_status(edge)["checkpoint"] is not None,
                        15.0,
                        0.02,
                        "a checkpoint from the primary",
                    )
                primary.proc.kill()
                await asyncio.to_thread(primary.proc.wait, 10)
                pub.stop()
                primary = await _primary(started, second, "--port", str(pport))
                pub = Publisher(primary.ingest_ports[DATASET], pub.next)
                await apoll_until(
                    lambda: _edge_metric(edge, "gateway_relay_gaps_total", reason=reason) == 1,
                    30.0,
                    0.05,
                    "the gap counted",
                )
                await apoll_until(
                    lambda: any("gap:" in t for t in session.texts),
                    15.0,
                    0.02,
                    "the gap told to the session",
                )
            finally:
                pub.stop()
                await session.close()
            resumed = _edge_metric(edge, "gateway_relay_reconnects_total", mode="live")
            up = _edge_metric(edge, "gateway_relay_upstream_up")
        gap = next(t for t in session.texts if "gap:" in t)
        assert gap.startswith(f"Feed {DATASET}: gap:"), gap
        assert f"({reason})" in gap
        assert "127.0.0.1" not in gap and str(pport) not in gap  # no internals
        assert resumed == 1 and up == 1


async def test_upstream_down_keeps_sessions_and_fails_readyz_then_recovers(
    tmp_path: Path,
) -> None:
    with journal_dir() as pj, key_file(tmp_path) as key:
        async with processes() as started:
            primary = await _primary(started, pj)
            pport = primary.port
            edge = await _edge(started, pport, key, config="feed_grace_s = 1\n")
            await _upstream_up(edge, 15.0)
            official = OfficialSession(
                edge.port,
                DATASET,
                [{"schema": "trades", "symbols": "ALL_SYMBOLS"}],
                heartbeat_interval_s=5,
            )
            pub = Publisher(primary.ingest_ports[DATASET], 0)
            try:
                await asyncio.to_thread(official.start)
                assert await asyncio.to_thread(
                    official.wait_for, lambda recs: len(data_records(recs)) >= 100
                )
                primary.proc.kill()
                await asyncio.to_thread(primary.proc.wait, 10)
                pub.stop()
                await apoll_until(
                    lambda: http_get(edge.metrics_port, "/readyz")[0] == 503,
                    15.0,
                    0.05,
                    "/readyz 503 while the upstream is down",
                )
                status, body = http_get(edge.metrics_port, "/readyz")
                assert DATASET in body
                # the session stays: it gets the edge's heartbeats meanwhile
                before = len(official.records)
                assert await asyncio.to_thread(
                    official.wait_for,
                    lambda recs: any(
                        type(r).__name__ == "SystemMsg" and r.is_heartbeat() for r in recs[before:]
                    ),
                    15.0,
                )
                _, page = http_get(edge.metrics_port, "/status.json")
                doc = json.loads(page)
                feed = next(f for f in doc["feeds"] if f["dataset"] == DATASET)
                assert feed["connected"] is False and feed["relay"]["up"] is False
                primary = await _primary(started, pj, "--port", str(pport))
                pub = Publisher(primary.ingest_ports[DATASET], pub.next)
                await apoll_until(
                    lambda: http_get(edge.metrics_port, "/readyz")[0] == 200,
                    30.0,
                    0.05,
                    "/readyz 200 once the upstream is back",
                )
                mark = pub.next
                assert await asyncio.to_thread(
                    official.wait_for,
                    lambda recs: any(
                        getattr(r, "sequence", -1) >= mark + 40 for r in data_records(recs)
                    ),
                    20.0,
                ), "the official client did not read on after the upstream came back"
            finally:
                pub.stop()
                error = official.stop()
            assert error is None or "closed" in str(error).lower()
            metrics_text = http_get(edge.metrics_port, "/metrics")[1]
            status_text = http_get(edge.metrics_port, "/status.json")[1]
            page_text = http_get(edge.metrics_port, "/status")[1]
            cmdline = Path(f"/proc/{edge.proc.pid}/cmdline").read_bytes()
            log = edge.log()
        for where, text in (
            ("log", log),
            ("/metrics", metrics_text),
            ("/status.json", status_text),
            ("/status", page_text),
            ("cmdline", cmdline.decode(errors="replace")),
        ):
            assert KEY not in text, f"the upstream key shows in {where}"
        seqs = [r.sequence for r in data_records(official.records)]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


async def test_an_edge_with_workers_relays_to_the_official_client(tmp_path: Path) -> None:
    with key_file(tmp_path) as key:
        async with processes() as started:
            primary = await _primary(started, None)
            # (and the upstream compresses: its zstd frames are decoded across reads)
            edge = await _edge(
                started, primary.port, key, "--workers", "2", extra="&compression=zstd"
            )
            await _upstream_up(edge, 20.0)
            official = OfficialSession(
                edge.port, DATASET, [{"schema": "trades", "symbols": "ALL_SYMBOLS"}]
            )
            pub = Publisher(primary.ingest_ports[DATASET], 0)
            try:
                await asyncio.to_thread(official.start)
                assert await asyncio.to_thread(
                    official.wait_for, lambda recs: len(data_records(recs)) >= 500, 20.0
                )
            finally:
                pub.stop()
                official.stop()
        seqs = [r.sequence for r in data_records(official.records)]
        assert np.all(np.diff(seqs) == 1), "records skipped or repeated through the workers"
        assert official.metadata is not None and official.metadata.dataset == DATASET


def test_relay_config_errors_name_the_option(tmp_path: Path) -> None:
    missing = tmp_path / "nothing-here"
    for uri, words in (
        ("lsg://127.0.0.1:1?schemas=tbbo,mbp-1", "share rtype"),
        ("lsg://127.0.0.1:1", "schemas="),
        (f"lsg://127.0.0.1:1?schemas=trades&key_file={missing}", "key_file"),
        ("lsg://127.0.0.1?schemas=trades", "HOST:PORT"),
        ("lsg://127.0.0.1:1?schemas=trades&bogus=1", "'bogus'"),
    ):
        env = dict(os.environ)
        env.pop("DATABENTO_API_KEY", None)
        try:
            gw = start_gateway(feeds={DATASET: uri}, env=env, timeout=20.0)
        except RuntimeError as exc:
            assert words in str(exc), (uri, str(exc)[-600:])
        else:
            gw.stop()
            gw.cleanup()
            raise AssertionError(f"{uri} started")


class SystemTexts:
    """A plain LiveClient session on the edge; keeps the SystemMsg texts it is sent."""

    def __init__(self, client: LiveClient) -> None:
        self.client = client
        self.texts: list[str] = []
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        with contextlib.suppress(Exception):
            async for batch in self.client.batches():
                for rtype, _, rec in batch.records():
                    if rtype == RTYPE_SYSTEM:
                        self.texts.append(
                            bytes(rec[16:318]).split(b"\0", 1)[0].decode("utf-8", "replace")
                        )

    async def close(self) -> None:
        await self.client.close()
        await asyncio.wait_for(self.task, 10.0)


async def test_failover_to_the_next_upstream_is_a_reported_gap(tmp_path: Path) -> None:
    with journal_dir() as ja, journal_dir() as jb, key_file(tmp_path) as key:
        async with processes() as started:
            a = await _primary(started, ja)
            b = await _primary(started, jb)
            uri = (
                f"lsg://127.0.0.1:{a.port},127.0.0.1:{b.port}?schemas=trades"
                f"&key_file={key}&failover_after_s=1"
            )
            edge = await asyncio.to_thread(
                start_gateway, "--metrics-port", "0", feeds={DATASET: uri}
            )
            started.append(edge)
            await apoll_until(
                lambda: _edge_metric(edge, "gateway_relay_upstream_index") == 1,
                15.0,
                0.02,
                "the edge on the first upstream",
            )
            live = await LiveClient.connect("127.0.0.1", edge.port, KEY, DATASET)
            await live.subscribe("trades", "ALL_SYMBOLS")
            await live.start()
            session = SystemTexts(live)
            pub_a = Publisher(a.ingest_ports[DATASET], 0)
            pub_b = Publisher(b.ingest_ports[DATASET], 1_000_000)
            try:
                await apoll_until(
                    lambda: _relay_status(edge)["checkpoint"] is not None,
                    15.0,
                    0.02,
                    "a checkpoint from the first upstream",
                )
                a.proc.kill()
                await asyncio.to_thread(a.proc.wait, 10)
                await apoll_until(
                    lambda: _edge_metric(edge, "gateway_relay_upstream_index") == 2,
                    30.0,
                    0.05,
                    "the edge on the second upstream",
                )
                await apoll_until(
                    lambda: any("(failover)" in t for t in session.texts),
                    15.0,
                    0.02,
                    "the failover told to the session",
                )
                gaps = _edge_metric(edge, "gateway_relay_gaps_total", reason="failover")
            finally:
                pub_a.stop()
                pub_b.stop()
                await session.close()
        assert gaps == 1


async def test_a_lossless_edge_waits_for_its_slow_session(tmp_path: Path) -> None:
    """``backpressure=1``: while a session is over its high-water mark the edge stops reading
    its upstream; the session gets every record once it reads again."""
    with journal_dir() as pj, key_file(tmp_path) as key:
        async with processes() as started:
            primary = await _primary(started, pj)
            uri = _relay_uri(primary.port, key, "&backpressure=1")
            # small buffers, so the session is over its high-water mark in a moment
            edge = await asyncio.to_thread(
                start_gateway,
                "--metrics-port",
                "0",
                feeds={DATASET: uri},
                config=SMALL_BUFFERS,
            )
            started.append(edge)
            await _upstream_up(edge, 15.0)
            slow = await LiveClient.connect("127.0.0.1", edge.port, KEY, DATASET, rcvbuf=16 * 1024)
            await slow.subscribe("trades", "ALL_SYMBOLS")
            await slow.start()
            pub = Publisher(primary.ingest_ports[DATASET], 0)
            seqs: list[np.ndarray] = []
            try:
                # not reading: the edge pauses its upstream (counted as a lossless pause)
                await apoll_until(
                    lambda: _edge_metric(edge, "gateway_feed_paused") == 1,
                    30.0,
                    0.05,
                    "the edge paused for its slow session",
                )
                pub.stop()
                last = pub.next - 1
                got = 0

                async def read_all() -> None:
                    nonlocal got
                    async for batch in slow.batches():
                        idx = batch.index
                        keep = idx.rtypes == 0  # trades (rtype 0x00)
                        if keep.any():
                            rows = np.frombuffer(bytes(idx.select(keep)), dtype=np.uint8)
                            s = rows.reshape(-1, 48)[:, 44:48].copy().view("<u4").ravel()
                            seqs.append(s.astype(np.int64))
                            got += len(s)
                            if int(s[-1]) == last:
                                return

                await asyncio.wait_for(read_all(), 60.0)
            finally:
                pub.stop()
                await slow.close()
            pauses = _edge_metric(edge, "gateway_feed_pauses_total", cause="session_high_water")
        allseq = np.concatenate(seqs)
        assert allseq[0] == 0 and np.all(np.diff(allseq) == 1), "records skipped or repeated"
        assert pauses >= 1


async def test_a_refused_key_is_retried_and_a_rotated_key_file_is_read_again(
    tmp_path: Path,
) -> None:
    wrong = "db-WRONGKEY0000000000000000000000"[:32]
    async with processes() as started:
        primary = await _primary(started, None)
        key = tmp_path / "upstream.key"
        key.write_text(wrong + "\n")
        edge = await _edge(started, primary.port, key)
        await apoll_until(
            lambda: "upstream refused the relay" in edge.log(),
            15.0,
            0.05,
            "the upstream refusing the wrong key",
        )
        assert _edge_metric(edge, "gateway_relay_upstream_up") == 0
        status, body = http_get(edge.metrics_port, "/readyz")
        key.write_text(KEY + "\n")  # rotated in place, as a secret update would
        await apoll_until(
            lambda: _edge_metric(edge, "gateway_relay_upstream_up") == 1,
            20.0,
            0.05,
            "the edge connected with the new key",
        )
        log = edge.log()
    assert wrong not in log and KEY not in log
    assert "authentication failed" in log  # the upstream's reason, in the log only
    assert status in (200, 503) and wrong not in body
