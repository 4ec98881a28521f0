"""One stalled reader beside 50 healthy ones: the healthy ones get everything in order,
the stalled one is handled by its policy, and the gateway's memory stays bounded."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gateway.client import LiveClient
from tests.integration.helpers import (
    KEY,
    apoll_until,
    error_texts,
    gateway,
    metric,
    metric_samples,
)
from tests.integration.test_lossless import Reader

HEALTHY = 50
HARD_CAP = 1024 * 1024
CONFIG = f"""
[slow_reader]
behind_bytes = 262144
resume_bytes = 65536
hard_cap_bytes = {HARD_CAP}

[transport]
sndbuf = 65536  # a small kernel buffer: what a stalled reader holds stays in the gateway
"""


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _sequences(data: bytes | bytearray) -> np.ndarray:
    """The running sequence of a trades + mbp-1 stream (u32 at offset 44 of both)."""
    out = []
    view = memoryview(bytes(data))
    off = 0
    lengths = np.frombuffer(view, dtype=np.uint8)
    while off < len(view):
        size = int(lengths[off]) * 4
        out.append(int.from_bytes(view[off + 44 : off + 48], "little"))
        off += size
    return np.array(out, dtype=np.int64)


async def _settled(
    port: int, behavior: str, stalled: Reader
) -> tuple[dict[Any, float], list[bytes]] | None:
    """(metrics, the stalled reader's gateway records) once they agree, else None. The scrape
    runs in a thread: a busy gateway can take seconds to answer, and the readers must not
    stop meanwhile."""
    m = await asyncio.to_thread(metric_samples, port)
    records = list(stalled.gateway_records)
    if behavior == "warn":
        cut = metric(m, "gateway_slow_reader_events_total", event="disconnect") >= 1
        told = any(text.startswith("slow reader: more than") for _, text in error_texts(records))
        # (a reader task that died ends the wait too: the assertions below say how)
        return (m, records) if cut and (told or stalled.task.done()) else None
    skipped = metric(m, "gateway_records_skipped_total")
    told_n = sum(int(text.split()[1]) for code, text in error_texts(records) if code == 7)
    return (m, records) if skipped > 0 and told_n == skipped else None


@pytest.mark.parametrize("behavior", ["skip", "warn"])
async def test_stalled_reader_beside_fifty_healthy(behavior: str) -> None:
    feeds = {"DEMO.SYNTH": "synthetic:?rate=4000&instruments=40"}
    with gateway("--metrics-port", "0", config=CONFIG, feeds=feeds) as gw:
        healthy: list[LiveClient] = []
        try:
            for _ in range(HEALTHY):
                c = await LiveClient.connect(
                    "127.0.0.1", gw.port, KEY, "DEMO.SYNTH", slow_reader_behavior="warn"
                )
                await c.subscribe("trades", "ALL_SYMBOLS")
                await c.subscribe("mbp-1", "ALL_SYMBOLS")
                await c.start()
                healthy.append(c)
            stalled_client = await LiveClient.connect(
                "127.0.0.1",
                gw.port,
                KEY,
                "DEMO.SYNTH",
                rcvbuf=16 * 1024,
                slow_reader_behavior=behavior,
            )
            await stalled_client.subscribe("mbp-1", "ALL_SYMBOLS")
            await stalled_client.start()
            readers = [Reader(c) for c in healthy]
            stalled = Reader(stalled_client)
            stalled.reading.clear()
            await apoll_until(
                lambda: all(len(r.data) > 0 for r in readers), 30, what="every healthy reader fed"
            )
            baseline = _rss_kib(gw.proc.pid)
            peak = baseline
            deadline = time.monotonic() + 12
            while time.monotonic() < deadline:
                await asyncio.sleep(0.2)
                peak = max(peak, _rss_kib(gw.proc.pid))
                if behavior != "warn":
                    continue  # skip: stay stalled the whole time
                # in a thread: the healthy readers must keep reading while a busy gateway answers
                m = await asyncio.to_thread(metric_samples, gw.metrics_port)
                if metric(m, "gateway_slow_reader_events_total", event="disconnect") >= 1:
                    break
            stalled.reading.set()
            await apoll_until(lambda: stalled.ended or len(stalled.data) > 0, 10)
            # The healthy sessions have shown what they had to; closing them leaves the test's
            # loop (and the gateway) free for the stalled one to catch up.
            for c in healthy:
                await c.close()
            healthy.clear()
            # Snapshot at a quiescent point: skips are counted as they happen and told when
            # the reader catches up, so wait until every skip counted so far has been told
            # (skip), or until the session was cut (warn).
            m, stalled_records = await apoll_until(
                lambda: _settled(gw.metrics_port, behavior, stalled),
                30,
                0.1,
                what="skips told / stalled session cut",
            )
        finally:
            for c in healthy:
                await c.close()
            await stalled_client.close()
    # Memory: bounded by the stalled session's hard cap plus a fixed allowance.
    assert (peak - baseline) * 1024 < HARD_CAP + 24 * 1024 * 1024, (baseline, peak)
    for r in readers:
        seqs = _sequences(r.data)
        assert len(seqs) > 1000 and (np.diff(seqs) == 1).all()  # everything, in order
        assert not error_texts(r.gateway_records)
    notices = error_texts(stalled_records)
    if behavior == "skip":
        skipped = metric(m, "gateway_records_skipped_total")
        assert skipped > 0
        # One notice per time it fell behind (once, or again if it lagged after resuming);
        # together they tell exactly how many records it missed.
        told = [int(text.split()[1]) for code, text in notices if code == 7]
        assert notices and all(code == 7 for code, _ in notices)
        assert all(
            text == f"Skipped {n} records after slow reading"
            for (_, text), n in zip(notices, told, strict=True)
        )
        assert sum(told) == skipped
        assert metric(m, "gateway_slow_reader_events_total", policy="skip", event="skipped") >= 1
    else:
        warnings = [r for r in stalled_records if r[1] == 0x17 and r[319] == 2]
        assert warnings  # SLOW_READER_WARNING while behind
        assert stalled.ended, stalled.task.exception() if stalled.task.done() else "still open"
        assert notices[-1][1].startswith(f"slow reader: more than {HARD_CAP} bytes buffered")
        assert metric(m, "gateway_slow_reader_events_total", policy="warn", event="disconnect") == 1
