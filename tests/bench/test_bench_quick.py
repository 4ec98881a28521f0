"""``make bench-quick`` as a correctness test: every scenario runs (tiny N, short), the
gateway loses nothing, and results.json has the expected shape. No timing assertions.

It installs nothing (``--no-install``): a peer (nats-server, redis-server) that ``make
test-deps`` could not install is reported as skipped, with the reason."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCENARIOS = {"fanout", "filtered", "zstd", "latency", "idle", "connect", "replay"}


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench-quick")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--no-install", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert (out / "results.json").exists(), done.stderr[-4000:]
    doc = json.loads((out / "results.json").read_text())
    doc["_returncode"] = done.returncode
    doc["_stderr"] = done.stderr[-4000:]
    doc["_out"] = out
    return doc


@pytest.mark.timeout(300)
def test_quick_run_covers_every_scenario(quick_results: dict) -> None:
    ran = {r["scenario"] for r in quick_results["results"] if r["system"] == "gateway"}
    assert ran == SCENARIOS, quick_results["_stderr"]
    assert quick_results["_returncode"] == 0, quick_results["_stderr"]
    out: Path = quick_results["_out"]
    text = (out / "RESULTS.md").read_text()
    for scenario in SCENARIOS:
        assert f"## {scenario}" in text
    assert "## Targets" in text and "Machine:" in text
    assert quick_results["meta"]["quick"] is True
    assert {"python", "uvloop"} <= set(quick_results["meta"]["versions"])


@pytest.mark.timeout(300)
def test_quick_run_gateway_has_zero_loss(quick_results: dict) -> None:
    gateway = [r for r in quick_results["results"] if r["system"] == "gateway"]
    assert gateway
    for r in gateway:
        where = f"{r['scenario']} N={r['n']} {r.get('params')}"
        assert r["status"] == "ok", f"{where}: {r.get('reason')}"
        assert r["loss_free"], f"{where}: {r.get('notes')}"
        assert r["lost"] == 0 and r["gaps"] == 0 and r["extra"] == 0, where
        assert r["unexpected"] == 0 and r["failed_sessions"] == 0, where
        assert r["delivered"] == r["expected"] > 0, where
    assert quick_results["loss"]["gateway"]["lost"] == 0


@pytest.mark.timeout(300)
def test_quick_run_reports_skipped_or_measured_peers(quick_results: dict) -> None:
    peers = {p["name"]: p for p in quick_results["peers"]}
    assert {"nats", "redis", "zmq"} <= set(peers)
    for r in quick_results["results"]:
        peer = peers.get(r["system"])
        if peer is not None and not peer["available"]:
            assert r["status"] == "skipped" and r["reason"], r
    for peer in peers.values():  # a skipped peer says what is missing and how to get it
        if not peer["available"] and peer["name"] in ("nats", "redis"):
            assert "not installed" in peer["reason"] and "make test-deps" in peer["reason"]
    targets = quick_results["targets"]
    assert targets and all(t["status"] in ("met", "missed", "n/a") for t in targets)


@pytest.mark.timeout(300)
def test_quick_run_measures_every_replay_part(quick_results: dict) -> None:
    parts = {
        r["params"]["part"]: r
        for r in quick_results["results"]
        if r["scenario"] == "replay" and r["system"] == "gateway"
    }
    assert set(parts) == {"sendfile", "filtered", "beside-live", "fanout-journal"}
    sendfile = parts["sendfile"]
    # the whole journal came back in order, from a gateway and from the raw sender alike
    assert sendfile["raw_records"] == [sendfile["journal_records"]]
    assert sendfile["replay_median_bps"] > 0 and sendfile["raw_median_bps"] > 0
    assert sendfile["ratio"] > 0
    assert parts["filtered"]["scanned_median_per_s"] > 0
    beside = parts["beside-live"]
    assert beside["live_p99_us_alone"] and beside["live_p99_us_beside"]
    (step,) = beside["steps"]
    assert step["replay_step_bytes"] == beside["chosen_step_bytes"] == 1 << 20
    assert step["replay_bytes_total"] >= beside["replays"] * (2 << 20)
    assert step["replay_bytes_per_s"] == beside["replay_bytes_per_s"] > 0
    fanout = parts["fanout-journal"]
    assert fanout["median_rps_on"] > 0 and fanout["median_rps_off"] > 0
    text = (quick_results["_out"] / "RESULTS.md").read_text()
    assert "## replay: intraday replay from the journal" in text
    # the journals are gone once the run is over
    assert not list((quick_results["_out"] / "work").glob("*journal*"))
