"""File feeds that fail and come back (a real gateway process): a looping file that goes
away for a moment is retried and served again, an empty or truncated file is reported with a
clear reason, and sessions never see the server's file paths."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import databento_dbn as dbn

from gateway.dbn import encode_publisher_metadata
from gateway.feeds.synthetic import SyntheticGenerator, SyntheticOptions
from tests.integration.helpers import OfficialSession, data_records, gateway, http_get, poll_until


def _dbn_file(n: int, seed: int) -> tuple[bytes, list[bytes]]:
    """(a whole DBN v3 file: Metadata + n trades, the records)."""
    gen = SyntheticGenerator(SyntheticOptions(instruments=4, seed=seed, schemas=("trades",)))
    blob = b"".join(gen.make(n, time.time_ns(), 1_000_000))
    meta = encode_publisher_metadata("FILE.L", time.time_ns(), dict(gen.instruments))
    return meta + blob, [blob[i : i + 48] for i in range(0, len(blob), 48)]


def _system_texts(records: list[object]) -> list[str]:
    return [
        r.msg
        for r in records
        if isinstance(r, dbn.SystemMsg) and r.code != dbn.SystemCode.SUBSCRIPTION_ACK
    ]


def _ready_feeds(metrics_port: int) -> tuple[int, dict[str, str]]:
    code, body = http_get(metrics_port, "/readyz")
    return code, json.loads(body)["feeds"]


def test_looping_file_that_goes_away_is_retried_and_served_again() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="gw-file-feed-"))
    path = tmp / "loop-feed.dbn"
    away = tmp / "elsewhere.dbn"
    content, recs = _dbn_file(20, seed=11)
    path.write_bytes(content)
    failed = "Feed FILE.L: file replay failed: file not found; retrying"
    try:
        with gateway(
            "--metrics-port",
            "0",
            config="feed_grace_s = 0\n",
            feeds={"FILE.L": f"file:{path}?pace=max&loop=1"},
        ) as gw:
            s = OfficialSession(gw.port, "FILE.L", [{"schema": "trades", "symbols": "ALL_SYMBOLS"}])
            s.start()
            assert s.wait_for(lambda r: len(data_records(r)) >= 3 * len(recs))
            path.rename(away)
            assert s.wait_for(lambda r: failed in _system_texts(r))
            code, feeds = _ready_feeds(gw.metrics_port)
            assert code == 503
            assert feeds["FILE.L"] == "down: file replay failed: file not found; retrying"
            seen = len(data_records(s.records))
            away.rename(path)
            assert s.wait_for(
                lambda r: (
                    _system_texts(r)[_system_texts(r).index(failed) :][-1:]
                    == ["Feed FILE.L: replaying"]
                )
            ), _system_texts(s.records)
            assert s.wait_for(lambda r: len(data_records(r)) >= seen + 3 * len(recs))
            assert poll_until(lambda: _ready_feeds(gw.metrics_port)[0] == 200)
            assert s.stop() is None
            log = gw.log()
    finally:
        shutil.rmtree(tmp)
    # whole passes of the file, nothing lost or repeated inside a pass
    data = [bytes(r) for r in data_records(s.records)]
    assert data == [recs[i % len(recs)] for i in range(len(data))]
    # sessions are told the reason, never where the file lives
    texts = _system_texts(s.records)
    assert failed in texts and texts[-1] == "Feed FILE.L: replaying"
    for secret in (str(tmp), "loop-feed", "elsewhere", ".dbn", "Errno"):
        assert not any(secret in t for t in texts), (secret, texts)
    # the operator gets the path and the OS error
    assert f"file {path} failed: [Errno 2]" in log and "retrying in 0.5 s" in log


def test_empty_and_truncated_files_are_reported_with_their_reason() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="gw-file-feed-"))
    content, _ = _dbn_file(5, seed=12)
    (tmp / "empty.dbn").write_bytes(b"")
    (tmp / "short.dbn").write_bytes(content[:40])  # inside the Metadata header
    try:
        started = time.monotonic()
        with gateway(
            "--metrics-port",
            "0",
            config="feed_grace_s = 0\n",
            feeds={
                "FILE.E": f"file:{tmp / 'empty.dbn'}?loop=1",
                "FILE.T": f"file:{tmp / 'short.dbn'}?pace=max",
            },
        ) as gw:
            want = {
                "FILE.E": "down: file replay failed: the file is empty; retrying",
                "FILE.T": "down: file replay failed: truncated Metadata header",
            }
            assert poll_until(lambda: _ready_feeds(gw.metrics_port) == (503, want)), _ready_feeds(
                gw.metrics_port
            )
            # the empty looping file is retried with backoff (0.5 s, 1 s, ...), not spun on
            assert poll_until(lambda: gw.log().count("empty.dbn is empty") >= 3)
            assert time.monotonic() - started >= 1.4
            log = gw.log()
    finally:
        shutil.rmtree(tmp)
    assert "truncated record" not in log
    assert f"file {tmp / 'short.dbn'} failed: {tmp / 'short.dbn'} ends inside its Metadata" in log
