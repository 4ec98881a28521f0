"""zstd sessions with the official client: shared frames, sessions joining a busy feed at
different times (between frames), with and without ts_out, and the per-session baseline."""

from __future__ import annotations

import time

import databento_dbn as dbn
import numpy as np
import pytest

from tests.integration.helpers import (
    OfficialSession,
    data_records,
    gateway,
    metric,
    metric_samples,
    poll_until,
)

SUBS = [
    {"schema": "trades", "symbols": "ALL_SYMBOLS"},
    {"schema": "mbp-1", "symbols": "ALL_SYMBOLS"},
]


def _check_complete(session: OfficialSession, ts_out: bool) -> None:
    recs = session.records
    assert session.metadata is not None and session.metadata.ts_out is ts_out
    assert isinstance(recs[0], dbn.SystemMsg)  # the first ack, right after the Metadata
    data = data_records(recs)
    assert len(data) > 500
    seqs = np.array([r.sequence for r in data], dtype=np.int64)
    # trades and mbp-1 chunks carry one running sequence: every record arrived, in order.
    assert (np.diff(seqs) == 1).all()
    if ts_out:
        assert all(r.ts_out > 0 for r in recs)


@pytest.mark.slow_e2e  # framing and counting, not the event loop: run once
@pytest.mark.parametrize("mode", ["shared", "per_session"])
def test_many_zstd_sessions_join_a_busy_feed_at_different_times(mode: str) -> None:
    with gateway(
        "--metrics-port",
        "0",
        config=f'zstd_mode = "{mode}"\n',
        feeds={"DEMO.SYNTH": "synthetic:?rate=20000"},
    ) as gw:
        sessions: list[tuple[OfficialSession, bool]] = []
        for i in range(10):
            ts_out = i % 2 == 1
            s = OfficialSession(
                gw.port, "DEMO.SYNTH", SUBS, compression=dbn.Compression.ZSTD, ts_out=ts_out
            )
            s.start()
            sessions.append((s, ts_out))
            time.sleep(0.07)  # join between frames of a feed publishing every 10 ms
        for s, _ in sessions:
            assert s.wait_for(lambda r: len(data_records(r)) > 2000, timeout=30)
        # Metrics are exported on the gateway's tick: the first export after every session
        # is streaming (the compressed byte count moves) is the start of the window.
        before = metric(metric_samples(gw.metrics_port), "gateway_zstd_bytes_before_total")
        first = poll_until(
            lambda: (
                (m := metric_samples(gw.metrics_port))
                and metric(m, "gateway_zstd_bytes_before_total") > before
                and m
            ),
            what="a metrics export with all ten sessions streaming",
        )
        time.sleep(1.5)  # deliberate: the window measured, every session in a group of five
        samples = metric_samples(gw.metrics_port)
        for s, _ in sessions:
            assert s.stop() is None
    for s, ts_out in sessions:
        _check_complete(s, ts_out)
    built = metric(samples, "gateway_zstd_frames_built_total") - metric(
        first, "gateway_zstd_frames_built_total"
    )
    written = metric(samples, "gateway_zstd_frames_written_total") - metric(
        first, "gateway_zstd_frames_written_total"
    )
    compressed_in = metric(samples, "gateway_zstd_bytes_before_total")
    compressed_out = metric(samples, "gateway_zstd_bytes_after_total")
    assert compressed_in > compressed_out > 0
    if mode == "shared":
        # Two shared specs (ts_out or not), five sessions each: each frame built once is
        # written five times.
        assert built > 0 and written == 5 * built
    else:
        assert built == 0 and written == 0
