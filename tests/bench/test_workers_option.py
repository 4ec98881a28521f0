"""``--workers`` and the ``workers`` scenario of the bench, without running a benchmark:
argument parsing, the cases built, the gateway's command line and start-up line, the
process-tree CPU, the summary/target/outputs, and the py-spy summariser."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from bench.__main__ import parse_args
from bench.peers import (
    GatewayServer,
    parse_workers_line,
    process_tree,
    tree_cpu_seconds,
)
from bench.procs import cpu_seconds, cpuinfo_counts, machine_info
from bench.pyspy_top import parse_lines
from bench.scenarios import (
    DEFAULT_SCENARIOS,
    SCALING_PARTS,
    Harness,
    build_cases,
    make_plan,
    parse_worker_counts,
    pyspy_command,
)
from bench.workers_report import scaling_rows, workers_targets, write_workers_outputs


def test_workers_flag_parses_counts_and_adds_the_scenario() -> None:
    args = parse_args(["--workers", "1,2,4,8"])
    assert args.worker_counts == (1, 2, 4, 8)
    assert args.scenarios.split(",")[-1] == "workers"
    plain = parse_args([])
    assert plain.worker_counts == (1,)
    assert plain.scenarios.split(",") == list(DEFAULT_SCENARIOS)
    assert "workers" not in plain.scenarios.split(",")
    # explicit scenarios are kept as given
    assert parse_args(["--workers", "2", "--scenarios", "fanout"]).scenarios == "fanout"


@pytest.mark.parametrize("bad", ["0", "two", "1,-2", ","])
def test_workers_flag_rejects_bad_counts(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args(["--workers", bad])
    assert exc.value.code == 2
    assert "--workers" in capsys.readouterr().err


def test_parse_worker_counts_keeps_order_and_drops_repeats() -> None:
    assert parse_worker_counts("2, 1,2,8") == (2, 1, 8)
    with pytest.raises(ValueError, match="'x'"):
        parse_worker_counts("1,x")


def _labels(cases: list[Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(c.scenario, c.system, c.params) for c in cases]


def test_build_cases_runs_gateway_cases_at_each_count_and_peers_once(tmp_path: Path) -> None:
    h = Harness(tmp_path, make_plan(True), {})
    cases = build_cases(h, ["fanout"], ["gateway", "raw"], (1, 2))
    n_count = len(make_plan(True).fanout_n)
    gateway = [c for c in cases if c.system == "gateway"]
    raw = [c for c in cases if c.system == "raw"]
    assert len(raw) == n_count and all("workers" not in c.params for c in raw)
    assert sorted(c.params["workers"] for c in gateway) == sorted([1, 2] * n_count)
    # without --workers nothing changes: no workers param
    assert all("workers" not in c.params for c in build_cases(h, ["fanout"], ["gateway"]))


def test_build_cases_workers_scenario_interleaves_counts_with_one_first(tmp_path: Path) -> None:
    h = Harness(tmp_path, make_plan(True), {})
    cases = build_cases(h, ["workers"], ["gateway"], (4, 2), repeats=2)
    assert {c.scenario for c in cases} == {"workers"}
    keys = [(c.params["repeat"], c.params["part"], c.params["workers"]) for c in cases]
    assert keys == [(r, p, w) for r in range(2) for p in SCALING_PARTS for w in (1, 4, 2)]
    assert build_cases(h, ["workers"], ["nats"], (1, 2)) == []


def test_gateway_command_line_names_workers_only_above_one(tmp_path: Path) -> None:
    cfg = tmp_path / "g.toml"
    assert "--workers" not in GatewayServer(tmp_path).command(cfg)
    assert GatewayServer(tmp_path, workers=4).command(cfg)[-2:] == ["--workers", "4"]
    with pytest.raises(ValueError, match="workers"):
        GatewayServer(tmp_path, workers=0)


def test_parse_workers_line() -> None:
    assert parse_workers_line("workers 2 pids=11,12\n", 2) == [11, 12]
    with pytest.raises(ValueError, match="3 workers"):
        parse_workers_line("workers 3 pids=11,12", 3)
    with pytest.raises(ValueError, match="asked for 4"):
        parse_workers_line("workers 2 pids=11,12", 4)
    with pytest.raises(ValueError, match="not a 'workers N"):
        parse_workers_line("listening host=x port=1")


def _fake_tree(tmp_path: Path, body: str) -> Path:
    """A checkout whose ``python -m gateway`` is ``body`` (argv as the bench passes it)."""
    pkg = tmp_path / "tree" / "gateway"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "__main__.py").write_text(textwrap.dedent(body))
    return pkg.parent


def test_gateway_without_workers_support_fails_clearly(tmp_path: Path) -> None:
    tree = _fake_tree(
        tmp_path,
        """
        import sys
        print("usage: gateway serve: error: unrecognized arguments: --workers 2", file=sys.stderr)
        sys.exit(2)
        """,
    )
    server = GatewayServer(tmp_path, workers=2, tree=tree)
    with pytest.raises(RuntimeError, match=r"with --workers 2: .*unrecognized arguments"):
        server.start()
    assert server.proc is not None and server.proc.poll() is not None


def test_gateway_that_reports_no_workers_line_fails_clearly(tmp_path: Path) -> None:
    tree = _fake_tree(
        tmp_path,
        """
        import sys, time
        print("ingest dataset=X port=7001", flush=True)
        print("listening host=127.0.0.1 port=7002 metrics_port=7003", flush=True)
        time.sleep(30)
        """,
    )
    server = GatewayServer(tmp_path, workers=2, tree=tree)
    with pytest.raises(RuntimeError, match="no 'workers N pids=...' line"):
        server.start()
    assert server.proc is not None and server.proc.poll() is not None  # stopped


def test_gateway_workers_line_gives_the_process_tree(tmp_path: Path) -> None:
    tree = _fake_tree(
        tmp_path,
        """
        import subprocess, sys, time
        kids = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
                for _ in range(2)]
        print("ingest dataset=X port=7001", flush=True)
        print("workers 2 pids=" + ",".join(str(k.pid) for k in kids), flush=True)
        print("listening host=127.0.0.1 port=7002 metrics_port=7003", flush=True)
        try:
            time.sleep(30)
        finally:
            for k in kids:
                k.kill()
        """,
    )
    server = GatewayServer(tmp_path, workers=2, tree=tree).start()
    try:
        assert (server.ingest_port, server.port, server.metrics_port) == (7001, 7002, 7003)
        assert len(server.worker_pids) == 2
        assert set(server.worker_pids) <= set(server.process_tree())
        assert server.process_tree()[0] == server.pid
        assert server.cpu_seconds() >= cpu_seconds(server.pid)
        assert server.rss_kib() > 0
        assert list(server.cpu_by_process()) == ["supervisor", "w0", "w1"]
    finally:
        server.stop()
        for pid in server.worker_pids:  # the fake's children, by pid, if SIGTERM left them
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass


def test_tree_cpu_counts_live_children(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert child.pid in process_tree(os.getpid())
        assert tree_cpu_seconds(os.getpid()) >= cpu_seconds(os.getpid())
    finally:
        child.kill()
        child.wait(10)


def test_machine_info_names_the_cpus(tmp_path: Path) -> None:
    info = machine_info()
    assert info["usable_cpus"] == len(os.sched_getaffinity(0))
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nphysical id\t: 0\ncore id\t: 0\n\n"
        "processor\t: 1\nphysical id\t: 0\ncore id\t: 0\n\n"
        "processor\t: 2\nphysical id\t: 0\ncore id\t: 1\n\n"
    )
    assert cpuinfo_counts(str(cpuinfo)) == {"logical_cpus": 3, "physical_cores": 2}


def test_pyspy_command_follows_workers(tmp_path: Path) -> None:
    out = tmp_path / "p.txt"
    one = pyspy_command("py-spy", 5, out, rate=500, fmt="raw", subprocesses=False)
    assert one[:4] == ["py-spy", "record", "--pid", "5"]
    assert "--subprocesses" not in one and ["--format", "raw"] == one[7:9]
    many = pyspy_command("py-spy", 5, out, rate=500, fmt="raw", subprocesses=True)
    assert many[-1] == "--subprocesses"


def _row(part: str, workers: int, rps: float, cpu: float, rep: int = 0) -> dict[str, Any]:
    return {
        "scenario": "workers",
        "system": "gateway",
        "n": 1000,
        "params": {"part": part, "workers": workers, "repeat": rep},
        "status": "ok",
        "loss_free": True,
        "throughput_rps": rps,
        "server_cpu_s_per_m": cpu,
        "machine_busy": 0.9,
    }


def _results() -> list[dict[str, Any]]:
    out = []
    for rep, (a, b) in enumerate([(1.0, 1.1), (1.2, 1.3), (0.9, 1.0)]):
        out.append(_row("fanout-cpu", 1, 30e6, 0.040 * a, rep))
        out.append(_row("fanout-cpu", 2, 31e6, 0.040 * b, rep))
        out[-1]["server_cpu_by_process_s"] = {"supervisor": 0.5, "w0": 0.7, "w1": 0.8}
        out.append(_row("filtered", 1, 1.8e6 * a, 0.5, rep))
        out.append(_row("filtered", 2, 3.0e6 * a, 0.5, rep))
    out.append(
        {
            "scenario": "workers",
            "system": "gateway",
            "n": 1000,
            "params": {"part": "zstd-distinct", "workers": 2, "repeat": 0},
            "status": "error",
            "reason": "RuntimeError: gateway exited while starting",
        }
    )
    out.append({"scenario": "fanout", "system": "gateway", "n": 3, "params": {}, "status": "ok"})
    return out


def test_scaling_rows_take_medians_and_ratios() -> None:
    rows = {(r["part"], r["workers"]): r for r in scaling_rows(_results())}
    fan1, fan2 = rows[("fanout-cpu", 1)], rows[("fanout-cpu", 2)]
    assert fan1["median_cpu_s_per_m"] == pytest.approx(0.040)
    assert fan2["median_cpu_s_per_m"] == pytest.approx(0.044)
    assert fan2["cpu_ratio"] == pytest.approx(1.1)
    assert fan2["median_supervisor_share"] == pytest.approx(0.25)
    assert fan1["median_supervisor_share"] is None
    assert rows[("filtered", 2)]["rps_ratio"] == pytest.approx(3.0 / 1.8, abs=1e-3)
    assert rows[("filtered", 1)]["runs"] == 3 and rows[("filtered", 1)]["loss_free"]
    broken = rows[("zstd-distinct", 2)]
    assert broken["ok_runs"] == 0 and "exited" in broken["errors"][0]
    assert broken["median_rps"] is None and broken["rps_ratio"] is None
    (target,) = workers_targets(_results())
    assert target["status"] == "met" and target["ratio"] == pytest.approx(1.1)
    assert workers_targets([r for r in _results() if r["scenario"] != "workers"]) == []


def test_workers_outputs_json_markdown_and_plot(tmp_path: Path) -> None:
    doc = {
        "meta": {"run_id": "t", "machine": machine_info(), "versions": {"python": "3"}},
        "results": _results(),
    }
    written = write_workers_outputs(tmp_path, doc, "caption")
    assert written["plot"] == "workers_scaling.png"
    assert (tmp_path / "workers_scaling.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "workers.json").read_text())
    assert saved["machine"]["usable_cpus"] >= 1 and len(saved["rows"]) == 5
    text = (tmp_path / "WORKERS.md").read_text()
    assert "## workers:" in text and "Machine:" in text and "| filtered | 1,000 | 2 |" in text
    assert "| 25% |" in text  # the supervisor's share of fan-out CPU at 2 workers
    assert write_workers_outputs(tmp_path / "none", {"meta": {}, "results": []}, "") == {}


def test_pyspy_top_self_and_inclusive() -> None:
    prof = parse_lines(
        [
            "process 1:python;main (/r/gateway/cli.py:3);f (/r/gateway/a.py:10) 6",
            "main (/r/gateway/cli.py:3);g (/r/gateway/b.py:20);f (/r/gateway/a.py:11) 4",
            "garbage",
        ]
    )
    assert prof.samples == 10
    assert prof.self_counts["f (gateway/a.py:10)"] == 6
    assert prof.inclusive["f (gateway/a.py)"] == 10 and prof.inclusive["g (gateway/b.py)"] == 4
    table = prof.table(5)
    assert (
        "g (gateway/b.py)" in table and "main (gateway/cli.py)" not in table.split("inclusive")[1]
    )
    assert parse_lines(["main (x.py:1) 3"], under="nothing").samples == 0


def test_zstd_per_session_is_skipped_with_workers(tmp_path: Path) -> None:
    h = Harness(tmp_path, make_plan(True), {})
    cases = build_cases(h, ["zstd"], ["gateway"], (1, 2))
    per_session = [c for c in cases if c.params["mode"] == "zstd-per-session"]
    assert sorted(c.params["workers"] for c in per_session) == [1] * len(make_plan(True).zstd_n) + [
        2
    ] * len(make_plan(True).zstd_n)
    for c in per_session:
        if c.params["workers"] == 2:
            res = c.run()  # nothing started: the case says why it is not run
            assert res["status"] == "skipped" and "one process" in res["reason"]


def test_tables_show_gateway_workers_as_their_own_system() -> None:
    from bench.report import SYSTEM_COLORS, SYSTEM_NAMES, _systems, by_workers

    results = [
        {"scenario": "fanout", "system": "gateway", "n": 1, "params": {"workers": 1}},
        {"scenario": "fanout", "system": "gateway", "n": 1, "params": {"workers": 4}},
        {"scenario": "fanout", "system": "nats", "n": 1, "params": {}},
        {"scenario": "fanout", "system": "raw", "n": 1, "params": {}},
        {"scenario": "workers", "system": "gateway", "n": 1, "params": {"workers": 2}},
    ]
    shown = by_workers(results)
    assert [r["system"] for r in shown] == ["gateway", "gateway-w4", "nats", "raw", "gateway"]
    assert shown[1]["params"] == {} and results[1]["params"] == {"workers": 4}  # a copy
    assert _systems(shown, "fanout") == ["raw", "gateway", "gateway-w4", "nats"]
    assert SYSTEM_NAMES["gateway-w4"] == "gateway, 4 workers"
    assert SYSTEM_COLORS["gateway-w4"].startswith("#")
    with pytest.raises(KeyError):
        SYSTEM_NAMES["gateway-wx"]
