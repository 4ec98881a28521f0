"""One stalled reader beside 50 healthy ones: the healthy ones get everything in order,
the stalled one is handled by its policy, and the gateway's memory stays bounded."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest

from gateway.client import LiveClient
from tests.integration.helpers import KEY, error_texts, gateway, metric, metric_samples
from tests.integration.test_lossless import Reader, _wait

HEALTHY = 50
HARD_CAP = 2 * 1024 * 1024
CONFIG = f"""
[slow_reader]
behind_bytes = 524288
resume_bytes = 131072
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


@pytest.mark.parametrize("behavior", ["skip", "warn"])
async def test_stalled_reader_beside_fifty_healthy(behavior: str) -> None:
    feeds = {"DEMO.SYNTH": "synthetic:?rate=8000&instruments=40"}
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
            await asyncio.sleep(1.0)
            baseline = _rss_kib(gw.proc.pid)
            peak = baseline
            deadline = time.monotonic() + 12
            while time.monotonic() < deadline:
                await asyncio.sleep(0.2)
                peak = max(peak, _rss_kib(gw.proc.pid))
                m = metric_samples(gw.metrics_port)
                if (
                    behavior == "warn"
                    and metric(m, "gateway_slow_reader_events_total", event="disconnect") >= 1
                ):
                    break
            stalled.reading.set()
            assert await _wait(lambda: stalled.ended or len(stalled.data) > 0, 10)
            await asyncio.sleep(1.0)
            m = metric_samples(gw.metrics_port)
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
    notices = error_texts(stalled.gateway_records)
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
        warnings = [r for r in stalled.gateway_records if r[1] == 0x17 and r[319] == 2]
        assert warnings  # SLOW_READER_WARNING while behind
        assert stalled.ended
        assert notices[-1][1].startswith(f"slow reader: more than {HARD_CAP} bytes buffered")
        assert metric(m, "gateway_slow_reader_events_total", policy="warn", event="disconnect") == 1
