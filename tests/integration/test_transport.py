"""Pluggable transport (issue 7): preload and onload-wrapper launches, in-process detection,
the not-loaded policy, io_uring under a preload, socket tuning, and deploy/launch-onload.sh.

No bypass NIC is needed: an interposer library built here with gcc stands in for libonload
(tests/transport_fakes/interposer.c, which counts the socket calls it wraps), and a fake
``onload`` wrapper with the real one's option handling goes first on PATH
(tests/transport_fakes/onload); each file's header says what it mimics.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import databento_dbn as dbn
import pytest

from gateway.cli import build_parser, config_from_args
from gateway.config import Config, TransportConfig, load_config, validate
from gateway.dbn import encode_publisher_metadata
from gateway.errors import ConfigError
from gateway.feeds.synthetic import SyntheticGenerator, SyntheticOptions
from gateway.transport import LAUNCH_MARKER, io_uring_fds, mapped_libraries, plan_launch
from tests.conftest import TEST_LOOP
from tests.integration.helpers import (
    KEY,
    ROOT,
    GatewayProcess,
    OfficialSession,
    RawClient,
    data_records,
    gateway,
    metric,
    metric_samples,
    poll_until,
)

FAKES = ROOT / "tests" / "transport_fakes"
LAUNCH = ROOT / "deploy" / "launch-onload.sh"


@dataclass(frozen=True)
class Fakes:
    root: Path
    preload: Path  # libfakebypass.so: counts calls, no vendor symbol
    onload: Path  # .../libonload.so: also exports onload_is_present / onload_fd_stat
    bin: Path  # holds the fake `onload` wrapper


@pytest.fixture(scope="module")
def fakes() -> Iterator[Fakes]:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed: the fake bypass library is built at test time")
    with tempfile.TemporaryDirectory(prefix="gw-fakes-") as tmp:
        root = Path(tmp)
        (root / "lib").mkdir()
        (root / "bin").mkdir()
        preload, onload = root / "libfakebypass.so", root / "lib" / "libonload.so"
        src = str(FAKES / "interposer.c")
        for out, extra in ((preload, []), (onload, ["-DAS_ONLOAD"])):
            cmd = [gcc, "-shared", "-fPIC", "-O2", "-Wall", *extra]
            subprocess.run([*cmd, "-o", str(out), src, "-ldl"], check=True, timeout=60)
        wrapper = root / "bin" / "onload"
        shutil.copy(FAKES / "onload", wrapper)
        wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        yield Fakes(root, preload, onload, root / "bin")


# --- helpers -----------------------------------------------------------------------------------


def transport_line(gw_log: str) -> dict[str, str]:
    """The fields of the gateway's start-up transport line."""
    for line in gw_log.splitlines():
        if "gateway.transport transport transport=" in line:
            text = line.split("gateway.transport transport ", 1)[1]
            return dict(re.findall(r"(\w+)=(\{[^}]*\}|\S+)", text))
    raise AssertionError(f"no transport line in the log:\n{gw_log[-3000:]}")


def counts(path: Path) -> dict[str, int]:
    text = path.read_text().split()
    return {k: int(v) for k, v in (item.split("=") for item in text)}


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def ingest_payload(n: int = 3000) -> tuple[dict[str, int], list[bytes], bytes]:
    """(symbol -> id, records, Metadata + records) for an ingest publisher: 48-byte trades."""
    gen = SyntheticGenerator(SyntheticOptions(instruments=6, seed=5, schemas=("trades",)))
    t0 = time.time_ns()
    blob = b"".join(b"".join(gen.make(n // 10, t0 + k * 1_000_000, 1_000_000)) for k in range(10))
    records = [blob[i : i + 48] for i in range(0, len(blob), 48)]
    ids = dict(gen.instruments)
    return ids, records, encode_publisher_metadata("ING.T", t0, ids) + blob


def check_byte_exact_fanout(gw: GatewayProcess) -> None:
    """Official clients (one filtered, one ALL_SYMBOLS) get the ingest stream byte for byte."""
    ids, records, payload = ingest_payload()
    names = list(ids)
    first = payload.index(records[0])
    with socket.create_connection(("127.0.0.1", gw.ingest_ports["ING.T"]), timeout=10) as pub:
        pub.sendall(payload[:first])  # the Metadata first: raw symbols resolve from it
        poll_until(lambda: "feed ING.T up" in gw.log(), 10, what="feed ING.T up")
        some = OfficialSession(
            gw.port, "ING.T", [{"schema": "trades", "symbols": names[:2], "stype_in": "raw_symbol"}]
        )
        every = OfficialSession(gw.port, "ING.T", [{"schema": "trades", "symbols": "ALL_SYMBOLS"}])
        for s in (some, every):
            s.start()
        assert some.wait_for(lambda r: any(isinstance(x, dbn.SymbolMappingMsg) for x in r))
        pub.sendall(payload[first:])
        want = [
            r for r in records if int.from_bytes(r[4:8], "little") in {ids[n] for n in names[:2]}
        ]
        assert some.wait_for(lambda r: len(data_records(r)) >= len(want))
        assert every.wait_for(lambda r: len(data_records(r)) >= len(records))
        time.sleep(0.1)  # deliberate: time for any record too many to arrive
    for s in (some, every):
        assert s.stop() is None
    assert [bytes(r) for r in data_records(some.records)] == want
    assert [bytes(r) for r in data_records(every.records)] == records


def run_gateway(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """A gateway that is expected to exit by itself (start-up refused)."""
    cmd = [sys.executable, "-m", "gateway", "serve", "--port", "0", "--loop", TEST_LOOP]
    return subprocess.run(
        [*cmd, "--api-key", KEY, *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


# --- preload:PATH --------------------------------------------------------------------------


def test_preload_launch_is_loaded_counts_calls_and_fans_out_byte_exact(
    fakes: Fakes, tmp_path: Path
) -> None:
    report = tmp_path / "counts"
    with gateway(
        "--transport",
        f"preload:{fakes.preload}",
        "--metrics-port",
        "0",
        feeds={"ING.T": "ingest://127.0.0.1:0"},
        env={"FAKE_BYPASS_REPORT": str(report)},
    ) as gw:
        pid = gw.proc.pid
        assert str(fakes.preload) in mapped_libraries(pid)
        assert environ_of(pid)[LAUNCH_MARKER] == "preload"
        assert io_uring_fds(pid) == 0
        line = transport_line(gw.log())
        assert line["transport"] == "preload" and line["vendor"] == "preload"
        assert line["requested"] == "1" and line["loaded"] == "1"
        assert line["lib"] == str(fakes.preload) and line["loop"] == TEST_LOOP
        assert line["io_uring"].startswith("blocked:") and line["io_uring_fds"] == "0"
        assert f"LD_PRELOAD:{fakes.preload}" in line["env"]
        check_byte_exact_fanout(gw)
        samples = metric_samples(gw.metrics_port)
        assert metric(samples, "gateway_bypass_active", vendor="preload") == 1
        assert metric(samples, "gateway_transport_info", loaded="1", transport="preload") == 1
        assert metric(samples, "gateway_io_uring_fds") == 0
    gw.log_path.unlink(missing_ok=True)
    c = counts(report.with_name(f"counts.{pid}"))
    # listeners + the metrics port; the ingest publisher and two client sessions
    assert c["socket"] >= 3 and c["accept4"] >= 3, c
    # every registration went through libc epoll_ctl, where a bypass library sees it
    assert c["epoll_ctl"] >= 6, c
    if TEST_LOOP == "uvloop":  # libuv writes with write/writev
        assert c["write"] + c["writev"] > 0, c
    else:  # asyncio's selector transports use send()
        assert c["send"] + c["sendmsg"] > 0, c


def test_missing_preload_library_fails_fast_with_a_clear_message() -> None:
    res = run_gateway("--transport", "preload:/nonexistent/libnope.so")
    assert res.returncode == 2, res.stderr
    assert "cannot be preloaded" in res.stderr  # ld.so's own warning: it only warns
    assert transport_line(res.stderr)["loaded"] == "0"
    assert "gateway: error: transport preload was requested but is not loaded" in res.stderr
    assert "/nonexistent/libnope.so does not exist" in res.stderr
    assert "--bypass-required=false" in res.stderr
    assert KEY not in res.stderr and "--api-key ***" in res.stderr


def test_missing_preload_library_only_warns_when_not_required() -> None:
    with gateway(
        "--transport", "preload:/nonexistent/libnope.so", "--bypass-required", "false"
    ) as gw:
        c = RawClient(gw.port)
        assert c.handshake().startswith("success=1")
        c.close()
        log = gw.log()
    gw.log_path.unlink(missing_ok=True)
    line = transport_line(log)
    assert line["requested"] == "1" and line["loaded"] == "0"
    assert "WARNING gateway.transport transport preload was requested but is not loaded" in log
    assert "serving anyway" in log


# --- onload through its wrapper ------------------------------------------------------------


def wrapper_log(path: Path) -> tuple[list[str], dict[str, str]]:
    argv, env = [], {}
    for line in path.read_text().splitlines():
        kind, _, value = line.partition("\t")
        if kind == "argv":
            argv.append(value)
        elif kind == "env" and "=" in value:
            k, _, v = value.partition("=")
            env[k] = v
    return argv, env


def onload_env(fakes: Fakes, log: Path, **extra: str) -> dict[str, str]:
    return {
        "PATH": f"{fakes.bin}{os.pathsep}{os.environ.get('PATH', os.defpath)}",
        "FAKE_ONLOAD_LIB": str(fakes.onload),
        "FAKE_ONLOAD_LOG": str(log),
        **extra,
    }


def test_onload_transport_execs_the_wrapper_and_is_detected(fakes: Fakes, tmp_path: Path) -> None:
    env_file = tmp_path / "onload.env"
    env_file.write_text(
        "# EF_* overrides\n\nEF_POLL_USEC=50000\nexport EF_NAME=gw-test\nEF_LOG='banner,conn'\n"
    )
    log = tmp_path / "wrapper.log"
    with gateway(
        "--transport",
        "onload",
        "--env-file",
        str(env_file),
        "--metrics-port",
        "0",
        feeds={"DEMO.SYNTH": "synthetic:?rate=2000"},
        env=onload_env(fakes, log),
    ) as gw:
        pid = gw.proc.pid
        argv, env = wrapper_log(log)
        assert isinstance(gw.proc.args, list)  # start_gateway hands Popen a list
        # exactly `onload --profile=latency <python> -m gateway …`: the same gateway argv, no --
        assert argv[0] == str(fakes.bin / "onload")
        assert argv[1:] == ["--profile=latency", *map(str, gw.proc.args)]
        assert gw.proc.args[:3] == [sys.executable, "-m", "gateway"] and "--" not in argv
        # the env file arrives unchanged and wins over the profile; the profile fills the rest
        for where in (env, environ_of(pid)):
            assert where["EF_POLL_USEC"] == "50000" and where["EF_NAME"] == "gw-test"
            assert where["EF_LOG"] == "banner,conn" and where["EF_TCP_FASTSTART_INIT"] == "0"
            assert where["LD_PRELOAD"] == str(fakes.onload)
            assert where[LAUNCH_MARKER] == "onload"
        assert str(fakes.onload) in mapped_libraries(pid)
        assert io_uring_fds(pid) == 0
        line = transport_line(gw.log())
        assert line["transport"] == "onload" and line["vendor"] == "onload"
        assert line["loaded"] == "1" and line["lib"] == str(fakes.onload)
        assert line["profile"] == "latency" and line["accelerated"] == "1/1"
        assert "EF_POLL_USEC:50000" in line["env"] and "EF_TCP_FASTSTART_INIT:0" in line["env"]
        assert "is not in effect" not in gw.log()
        s = OfficialSession(gw.port, "DEMO.SYNTH", [{"schema": "trades", "symbols": "AAPL"}])
        s.start()
        assert s.wait_for(lambda r: len(data_records(r)) > 5)
        assert s.stop() is None
        samples = metric_samples(gw.metrics_port)
        assert metric(samples, "gateway_bypass_active", vendor="onload") == 1
        assert metric(samples, "gateway_listeners_accelerated", vendor="onload") == 1
    gw.log_path.unlink(missing_ok=True)
    # the wrapper ran once: the relaunched child did not relaunch itself again
    assert wrapper_log(log)[0].count(str(fakes.bin / "onload")) == 1


def test_missing_onload_wrapper_is_a_clear_error(tmp_path: Path) -> None:
    res = run_gateway("--transport", "onload", env={"PATH": str(tmp_path)})
    assert res.returncode == 2
    assert "gateway: error: transport onload: the 'onload' wrapper is not on PATH" in res.stderr
    assert "--transport preload:/path/to/libonload.so" in res.stderr


@pytest.mark.parametrize(
    ("profile", "message"),
    [
        ("nope", "'nope' is not a profile that this onload launch can apply"),
        ("throughput", "only as a profile fragment"),
    ],
)
def test_an_unknown_profile_is_refused_before_exec(
    fakes: Fakes, tmp_path: Path, profile: str, message: str
) -> None:
    log = tmp_path / "wrapper.log"
    args = ("--transport", "onload", "--transport-profile", profile)
    res = run_gateway(*args, env=onload_env(fakes, log))
    assert res.returncode == 2 and message in res.stderr, res.stderr
    assert not log.exists()  # the wrapper never ran


def test_fake_wrapper_handles_options_like_the_real_one(fakes: Fakes, tmp_path: Path) -> None:
    """Guards the test double: `--` and unknown options exit 1, an unknown profile 3, a
    missing command 127; profile values never override a variable already set."""
    env = onload_env(fakes, tmp_path / "log", EF_POLL_USEC="7")
    wrapper = str(fakes.bin / "onload")

    def rc(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [wrapper, *args], env={**os.environ, **env}, capture_output=True, text=True, timeout=10
        )

    assert rc("--", "true").returncode == 1
    assert rc("--profile=latency", "--", "true").returncode == 1
    assert rc("--bogus", "true").returncode == 1
    assert rc("--profile=nope", "true").returncode == 3
    assert rc("--profile=latency", "no-such-command-here").returncode == 127
    out = rc("--profile=latency", "sh", "-c", 'echo "$EF_POLL_USEC $EF_TCP_FASTSTART_IDLE"')
    assert out.returncode == 0 and out.stdout.split() == ["7", "0"]


# --- launch plans (no exec) ----------------------------------------------------------------


def _cfg(kind: str, **kw: Any) -> Config:
    return Config(transport=TransportConfig(kind=kind, **kw))


ARGV = ["gateway", "serve", "--config", "/etc/gateway/gateway.toml"]


def test_launch_plans_for_each_vendor(tmp_path: Path) -> None:
    env_file = tmp_path / "vma.env"
    env_file.write_text("VMA_RX_POLL=0\n")
    base = {"PATH": str(tmp_path), "LD_PRELOAD": "libjemalloc.so.2", "VMA_SPEC": "keep"}
    # vma: no wrapper, LD_PRELOAD prepended; the caller's VMA_SPEC beats the profile's
    plan = plan_launch(_cfg("vma", env_file=str(env_file)), ARGV, base, maps=[])
    assert plan is not None and plan.style == "preload"
    assert plan.argv == [sys.executable, "-m", "gateway", *ARGV[1:]]
    assert plan.env["LD_PRELOAD"] == "libvma.so:libjemalloc.so.2"
    assert plan.env["VMA_SPEC"] == "keep" and plan.env["VMA_RX_POLL"] == "0"
    assert plan.env[LAUNCH_MARKER] == "vma"
    # preload:…/libonload.so is Onload without the wrapper: we import the profile ourselves
    lib = tmp_path / "libonload.so"
    plan = plan_launch(_cfg(f"preload:{lib}"), ARGV, {"PATH": ""}, maps=[])
    assert plan is not None and plan.argv[0] == sys.executable
    assert plan.changed == {
        "EF_POLL_USEC": "100000",
        "EF_TCP_FASTSTART_INIT": "0",
        "EF_TCP_FASTSTART_IDLE": "0",
        "LD_PRELOAD": str(lib),
        LAUNCH_MARKER: "preload",
    }
    # exasock: its wrapper, profile values as its variables
    exasock = tmp_path / "exasock"
    exasock.write_text('#!/bin/sh\nexec "$@"\n')
    exasock.chmod(0o755)
    plan = plan_launch(_cfg("exasock", profile="quiet"), ARGV, base, maps=[])
    assert plan is not None and plan.argv == ["exasock", sys.executable, "-m", "gateway", *ARGV[1:]]
    assert plan.changed["EXASOCK_NOWARN"] == "1"
    # onload with profile none: no --profile option at all
    onload = tmp_path / "onload"
    onload.write_text("#!/bin/sh\n")
    onload.chmod(0o755)
    plan = plan_launch(_cfg("onload", profile="none"), ARGV, base, maps=[])
    assert plan is not None and plan.argv[:2] == ["onload", sys.executable]


def test_no_relaunch_when_plain_marked_or_already_mapped() -> None:
    assert plan_launch(_cfg("plain"), ARGV, {}, maps=[]) is None
    assert plan_launch(_cfg("vma"), ARGV, {LAUNCH_MARKER: "vma"}, maps=[]) is None
    # started under the wrapper by systemd or a container entry point: nothing to do
    assert plan_launch(_cfg("onload"), ARGV, {}, maps=["/usr/lib64/libonload.so"]) is None


@pytest.mark.parametrize(
    ("kind", "kw", "message"),
    [
        ("onlaod", {}, "'onlaod' is not a transport"),
        ("preload:", {}, "preload:PATH needs the library path"),
        ("vma", {"profile": "nope"}, "'nope' is not a profile that this vma launch can"),
        ("preload:/x/libfoo.so", {"profile": "latency"}, "this preload launch can apply"),
        ("vma", {"env_file": "/nonexistent.env"}, "cannot read /nonexistent.env"),
    ],
)
def test_bad_transport_settings_name_the_field(kind: str, kw: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        plan_launch(_cfg(kind, **kw), ARGV, {"PATH": ""}, maps=[])


def test_env_file_syntax_errors_name_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.env"
    bad.write_text("EF_POLL_USEC=1\nEF POLL=2\n")
    with pytest.raises(ConfigError, match=re.escape(f"{bad}:2: expected KEY=VALUE")):
        plan_launch(_cfg("vma", env_file=str(bad)), ARGV, {"PATH": ""}, maps=[])


# --- plain sockets: tuning and the io_uring control ------------------------------------------


def _cap_net_admin() -> bool:
    """Raising SO_BUSY_POLL needs CAP_NET_ADMIN (bit 12 of the effective set)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> 12 & 1)
    return False


def test_plain_transport_reports_and_applies_socket_options() -> None:
    cpu = sorted(os.sched_getaffinity(0))[0]
    busy = ["--busy-poll-us", "50"] if _cap_net_admin() else []
    args = ["--sndbuf", "262144", "--rcvbuf", "131072", "--cpu-affinity", str(cpu), "--reuse-port"]
    with gateway(*args, *busy) as gw:
        line = transport_line(gw.log())
        status = Path(f"/proc/{gw.proc.pid}/task/{gw.proc.pid}/status").read_text()
        # a second process may bind the same port: SO_REUSEPORT really is on
        with gateway("--port", str(gw.port), "--reuse-port") as second:
            assert second.port == gw.port
            # (also lets it install its SIGTERM handler: app.serve does that after "listening")
            time.sleep(0.3)
        second.log_path.unlink(missing_ok=True)
        if TEST_LOOP == "uvloop":
            uring = io_uring_fds(gw.proc.pid)
    gw.log_path.unlink(missing_ok=True)
    assert line["transport"] == "plain" and line["vendor"] == "none"
    assert line["requested"] == "0" and line["loaded"] == "0" and line["io_uring"] == "available"
    opts = dict(item.split(":", 1) for item in line["sockopts"].strip("{}").split(","))
    assert int(opts["sndbuf"]) >= 262144 and int(opts["rcvbuf"]) >= 131072  # kernel doubles
    assert opts["reuse_port"] == "1" and opts["cpus"] == str(cpu)
    assert re.search(rf"Cpus_allowed_list:\s+{cpu}\n", status)  # the loop (main) thread
    if busy:
        assert opts["busy_poll"] == "50"
    if (
        TEST_LOOP == "uvloop"
        and Path("/proc/sys/kernel/io_uring_disabled").read_text().strip() == "0"
    ):
        # control for the preload tests: plain uvloop 0.23 does open an io_uring, and we see it
        assert uring >= 1 and line["io_uring_fds"] == str(uring)


def test_cpu_affinity_outside_the_allowed_set_is_refused() -> None:
    res = run_gateway("--cpu-affinity", "4095")
    assert res.returncode == 2
    assert "transport.cpu_affinity: CPU 4095 is not available to this process" in res.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--sndbuf", "0"), "transport.sndbuf: must be > 0 bytes"),
        (("--busy-poll-us", "-1"), "transport.busy_poll_us: must be >= 0"),
        (("--cpu-affinity", "-1"), "transport.cpu_affinity: expected CPU numbers"),
    ],
)
def test_bad_socket_options_are_refused(args: tuple[str, ...], message: str) -> None:
    ns = build_parser().parse_args(["serve", "--api-key", KEY, *args])
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_from_args(ns)


# --- deploy/ ---------------------------------------------------------------------------------


def test_launch_script_dry_run_prints_the_exact_argv_and_environment(
    fakes: Fakes, tmp_path: Path
) -> None:
    env_file = tmp_path / "onload.env"
    env_file.write_text('EF_POLL_USEC=20000\n# comment\nEF_NAME="gw a"\n')
    res = subprocess.run(
        ["sh", str(LAUNCH), "--dry-run", f"--env-file={env_file}", f"--python={sys.executable}"]
        + ["--config", "/etc/gateway/gateway.toml"],
        env={**os.environ, **onload_env(fakes, tmp_path / "log"), "ONLOAD_DRIVERCHECK": "false"},
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert res.returncode == 0, res.stderr
    argv = [m.group(1) for m in re.finditer(r"^argv\[\d+\]=(.*)$", res.stdout, re.M)]
    assert argv == [
        "onload",
        "--profile=latency",
        sys.executable,
        "-m",
        "gateway",
        "serve",
        "--transport",
        "onload",
        "--transport-profile",
        "latency",
        "--config",
        "/etc/gateway/gateway.toml",
    ]
    env = re.findall(r"^env: (.*)$", res.stdout, re.M)
    assert {"EF_POLL_USEC=20000", "EF_NAME=gw a", f"{LAUNCH_MARKER}=onload"} <= set(env)
    assert not (tmp_path / "log").exists()  # nothing was exec'd


def test_launch_script_refuses_a_host_without_the_driver(fakes: Fakes, tmp_path: Path) -> None:
    if Path("/sys/module/onload").exists():
        pytest.skip("this host has the onload driver loaded")
    res = subprocess.run(
        ["sh", str(LAUNCH), f"--python={sys.executable}"],
        env={**os.environ, **onload_env(fakes, tmp_path / "log")},
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert res.returncode == 1
    assert "the onload driver is not loaded" in res.stderr and "not starting" in res.stderr
    assert not (tmp_path / "log").exists()


def test_launch_script_starts_a_gateway_that_reports_loaded(fakes: Fakes, tmp_path: Path) -> None:
    """The systemd path: the script execs the wrapper; the gateway does not relaunch itself,
    it only checks from inside that libonload is mapped and answers. No --loop, as in the
    unit: under a bypass library `auto` is the stdlib loop, and io_uring is blocked anyway."""
    log = tmp_path / "wrapper.log"
    err = tmp_path / "gateway.log"
    late = tmp_path / "late.env"  # given to the gateway, not the launcher: too late to apply
    late.write_text("EF_POLL_USEC=1234\n")
    cmd = ["sh", str(LAUNCH), f"--python={sys.executable}", "--port", "0"]
    cmd += ["--api-key", KEY, "--host", "127.0.0.1", "--env-file", str(late)]
    env = {**os.environ, **onload_env(fakes, log), "ONLOAD_DRIVERCHECK": "false"}
    env["FAKE_ONLOAD_NOT_ACCELERATED"] = "1"  # as when listening on 127.0.0.1 under Onload
    with err.open("w") as stderr:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
    try:
        assert proc.stdout is not None
        port = 0
        for out in proc.stdout:
            m = re.match(r"listening host=\S+ port=(\d+)", out)
            if m:
                port = int(m.group(1))
                break
        assert port, err.read_text()
        c = RawClient(port)
        assert c.handshake().startswith("success=1")
        c.close()
        assert str(fakes.onload) in mapped_libraries(proc.pid)
    finally:
        proc.terminate()
        assert proc.wait(15) == 0
        if proc.stdout is not None:
            proc.stdout.close()
    line = transport_line(err.read_text())
    assert line["transport"] == "onload" and line["loaded"] == "1" and line["profile"] == "latency"
    assert line["loop"] == "asyncio" and line["io_uring"].startswith("blocked:")
    assert f"transport.env_file {late} is not in effect for EF_POLL_USEC" in err.read_text()
    assert line["accelerated"] == "0/1"
    assert "onload is loaded but accelerates none of the listening sockets" in err.read_text()
    assert "gateway: transport=onload: exec" not in err.read_text()  # no relaunch
    argv, _ = wrapper_log(log)
    assert argv[1:5] == ["--profile=latency", sys.executable, "-m", "gateway"]


def test_deploy_example_config_is_valid() -> None:
    cfg = validate(load_config(ROOT / "deploy" / "gateway.toml"))
    assert cfg.transport.kind == "plain" and cfg.transport.bypass_required
    for name in ("gateway.service", "gateway-onload.service", "onload.env", "README.md"):
        assert (ROOT / "deploy" / name).is_file(), name
    unit = (ROOT / "deploy" / "gateway-onload.service").read_text()
    for directive in (
        "EnvironmentFile=",
        "CPUAffinity=",
        "LimitMEMLOCK=infinity",
        "SystemCallFilter=~io_uring_setup",
        "SystemCallErrorNumber=ENOSYS",
        "launch-onload.sh",
    ):
        assert directive in unit, directive
