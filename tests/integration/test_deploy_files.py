"""The deploy files agree with each other and pass their own tools: promtool (config, rules,
rule tests, and ``check metrics`` on a live gateway's /metrics), ``systemd-analyze verify`` on
every unit, shellcheck on every shell script; ``make test-deps`` installs those tools where it
can and never fails; ``make run ARGS=...`` passes options through.

A test whose tool is missing skips and names it (``make test-deps`` installs it as root)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.integration.helpers import ROOT, gateway, http_get, poll_until

DEPLOY = ROOT / "deploy"
MONITORING = DEPLOY / "monitoring"
TEST_DEPS = ROOT / ".ci" / "test-deps"
UNITS = sorted(p.name for p in DEPLOY.glob("*.service"))


def _tool(name: str, package: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (Debian package {package}; `make test-deps`)")
    return found


def _run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # type: ignore[call-overload, no-any-return]
        cmd, capture_output=True, text=True, timeout=60, check=False, **kwargs
    )


# --- the files agree -----------------------------------------------------------------------


def test_prometheus_scrapes_the_metrics_port_of_the_example_config() -> None:
    config = tomllib.loads((DEPLOY / "gateway.toml").read_text())
    port = config["metrics_port"]
    prom = (MONITORING / "prometheus.yml").read_text()
    gateway_job = prom.split("job_name: gateway\n", 1)[1].split("job_name:", 1)[0]
    targets = re.findall(r'^\s*-\s*"([^"]+)"', gateway_job, re.M)
    assert targets and all(t.endswith(f":{port}") for t in targets), targets
    # 9100 is node_exporter's port: nothing under deploy/ may point the gateway at it
    for path in DEPLOY.rglob("*"):
        if path.is_file():
            assert ":9100" not in path.read_text(errors="replace"), path.relative_to(ROOT)


def _alert_rules() -> dict[str, str]:
    """alert name -> its block of alerts.yml."""
    text = (MONITORING / "alerts.yml").read_text()
    blocks = re.split(r"\n(?=[ \t]*- alert: )", text)[1:]
    return {re.search(r"- alert: (\w+)", b).group(1): b for b in blocks}  # type: ignore[union-attr]


def test_a_dead_standalone_probe_raises_an_alert() -> None:
    rules = _alert_rules()
    dead = [
        name
        for name, block in rules.items()
        if re.search(r'expr:\s*up\{job="gateway-probe"\}\s*==\s*0\s*$', block, re.M)
    ]
    assert dead, 'no alert on up{job="gateway-probe"} == 0'
    assert re.search(r"^\s*for:\s*\d+[smh]\s*$", rules[dead[0]], re.M), "the alert has no for:"


def test_every_alert_rule_has_a_rule_test_where_it_fires() -> None:
    rules = _alert_rules()
    assert len(rules) >= 13
    tests = (MONITORING / "alerts.test.yml").read_text()
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in re.split(r"\n\s*- eval_time: ", tests)[1:]:
        name = re.search(r"alertname: (\w+)", case).group(1)  # type: ignore[union-attr]
        (firing if "exp_labels" in case else quiet).add(name)
    assert not set(rules) - firing, f"no firing test case: {sorted(set(rules) - firing)}"
    assert not set(rules) - quiet, f"no quiet test case: {sorted(set(rules) - quiet)}"
    assert not (firing | quiet) - set(rules), "test cases for rules that do not exist"


# --- promtool -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["check", "config", "prometheus.yml"],
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts.test.yml"],
    ],
    ids=["check-config", "check-rules", "test-rules"],
)
def test_promtool(args: list[str]) -> None:
    promtool = _tool("promtool", "prometheus")
    out = _run([promtool, *args], cwd=MONITORING)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout + out.stderr


def test_promtool_check_metrics_on_a_live_gateway(tmp_path: Path) -> None:
    promtool = _tool("promtool", "prometheus")
    with gateway(
        "--metrics-port",
        "0",
        "--strobe",
        "--strobe-history",
        str(tmp_path / "h.sqlite"),
        feeds={"DEMO.SYNTH": "synthetic:?rate=200"},
    ) as gw:
        # every family the alerts use, the probe's included, once the first strobe is in

        def scraped() -> str:
            code, text = http_get(gw.metrics_port, "/metrics")
            assert code == 200
            done = re.search(r"^gateway_probe_last_strobe_timestamp_seconds [1-9]", text, re.M)
            return text if done else ""

        text = poll_until(scraped, 20, 0.1, "the first strobe on /metrics")
    out = _run([promtool, "check", "metrics"], input=text)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    # and the check does catch a bad exposition (so the pass above means something)
    bad = _run([promtool, "check", "metrics"], input="# TYPE foo counter\nfoo 1\n")
    assert bad.returncode != 0


# --- systemd units --------------------------------------------------------------------------


def _verifiable_copy(unit: str, tmp_path: Path) -> Path:
    """A copy of deploy/UNIT to verify: a template as its instance gateway@blue.service, and
    /opt/gateway/... pointed at stub executables in tmp_path (verify checks ExecStart= exists)."""
    opt = tmp_path / "opt" / "gateway"
    for stub in (opt / "venv" / "bin" / "python", opt / "deploy" / "launch-onload.sh"):
        stub.parent.mkdir(parents=True, exist_ok=True)
        stub.write_text("#!/bin/sh\n")
        stub.chmod(0o755)
    name = unit.replace("@.service", "@blue.service")
    text = (DEPLOY / unit).read_text().replace("/opt/gateway/", f"{opt}/")
    units = tmp_path / "units"
    units.mkdir(exist_ok=True)
    (units / name).write_text(text)
    return units / name


@pytest.mark.parametrize("unit", UNITS)
def test_systemd_analyze_verify(unit: str, tmp_path: Path) -> None:
    assert {"gateway.service", "gateway-onload.service", "gateway@.service"} <= set(UNITS)
    analyze = _tool("systemd-analyze", "systemd")
    copy = _verifiable_copy(unit, tmp_path)
    out = _run([analyze, "verify", "--man=no", str(copy)], cwd=copy.parent)
    # unknown keys and bad values are only warnings (exit 0): any line about our unit fails
    ours = [
        line
        for line in (out.stdout + out.stderr).splitlines()
        if copy.name in line or str(tmp_path) in line
    ]
    assert out.returncode == 0 and not ours, out.stdout + out.stderr


def test_onload_unit_waits_for_a_late_driver_instead_of_being_skipped() -> None:
    text = (DEPLOY / "gateway-onload.service").read_text()
    directives = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    assert not any(line.startswith("Condition") for line in directives), "silently skipped"
    exec_start = text.split("\nExecStart=", 1)[1].split("\n\n", 1)[0]
    assert "--wait-driver=" in exec_start
    assert "systemd-modules-load.service" in text


def test_launch_script_says_it_waits_for_the_driver_and_fails_clearly(tmp_path: Path) -> None:
    if Path("/sys/module/onload").exists():
        pytest.skip("this host has the onload driver loaded")
    # the launcher runs on the gateway's interpreter: this one
    env = {**os.environ, "ONLOAD_WRAPPER": "/bin/true", "GATEWAY_PYTHON": sys.executable}
    out = _run(
        [
            "sh",
            str(DEPLOY / "launch-onload.sh"),
            "--dry-run",
            "--wait-driver=1",
            f"--python={sys.executable}",
        ],
        env=env,
    )
    assert out.returncode == 1
    assert "waiting up to 1 s for the onload driver" in out.stderr
    assert "the onload driver did not load within 1 s" in out.stderr
    bad = _run(["sh", str(DEPLOY / "launch-onload.sh"), "--wait-driver=soon"], env=env)
    assert bad.returncode == 2 and "--wait-driver expects a whole number" in bad.stderr


# --- shell scripts --------------------------------------------------------------------------


def _shell_scripts() -> list[Path]:
    found = []
    for folder in (DEPLOY, ROOT / ".ci"):
        for path in sorted(folder.rglob("*")):
            if path.is_file() and path.read_bytes()[:64].split(b"\n")[0].startswith(b"#!"):
                first = path.read_bytes().split(b"\n", 1)[0]
                if re.search(rb"\b(sh|bash|dash)\b", first):
                    found.append(path)
    return found


@pytest.mark.parametrize("script", _shell_scripts(), ids=lambda p: str(p.relative_to(ROOT)))
def test_shellcheck(script: Path) -> None:
    shellcheck = _tool("shellcheck", "shellcheck")
    out = _run([shellcheck, "--norc", str(script)], cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_shell_scripts_are_found() -> None:
    names = {str(p.relative_to(ROOT)) for p in _shell_scripts()}
    assert {"deploy/launch-onload.sh", ".ci/run", ".ci/test-deps"} <= names


# --- make test-deps -------------------------------------------------------------------------


def _stub(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


def _test_deps(tmp_path: Path, present: list[str], uid: int, apt: str | None) -> tuple[str, str]:
    """Run .ci/test-deps with a PATH of stubs only: the tools in ``present``, ``id -u`` saying
    ``uid``, and (unless None) an apt-get that logs its arguments and runs ``apt``."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for tool in present:
        _stub(stubs, tool, "exit 0")
    _stub(stubs, "id", f"echo {uid}")
    calls = tmp_path / "apt-calls"
    if apt is not None:
        _stub(stubs, "apt-get", f'echo "$*" >> "{calls}"\n{apt}')
    sh = shutil.which("sh") or "/bin/sh"
    out = _run(
        [sh, str(TEST_DEPS)],
        env={"PATH": str(stubs), "TEST_DEPS_SBIN": "", "HOME": str(tmp_path)},
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout + out.stderr  # never fails the build
    return out.stdout + out.stderr, calls.read_text() if calls.exists() else ""


ALL_TOOLS = [
    "chromium",
    "nats-server",
    "redis-server",
    "promtool",
    "shellcheck",
    "dockerd",
    "iptables",
    "debootstrap",
    "systemd-analyze",
]


def test_test_deps_only_checks_when_everything_is_there(tmp_path: Path) -> None:
    text, calls = _test_deps(tmp_path, ALL_TOOLS, 0, "exit 0")
    assert calls == ""  # no apt-get at all
    assert "every tool the tests use is installed" in text


def test_test_deps_installs_what_is_missing_with_one_update(tmp_path: Path) -> None:
    # the stub apt-get "installs" by creating the tools in its own folder
    present = ["chromium", "promtool", "systemd-analyze", "dockerd", "iptables", "debootstrap"]
    chmod = shutil.which("chmod") or "/bin/chmod"
    make = 'case "$1" in install) for t in nats-server redis-server shellcheck; do ' + (
        f'printf "#!/bin/sh\\n" > "{tmp_path}/bin/$t"; {chmod} +x "{tmp_path}/bin/$t"; done;; esac'
    )
    text, calls = _test_deps(tmp_path, present, 0, make)
    lines = calls.splitlines()
    assert lines[0] == "update -qq" and lines.count("update -qq") == 1
    assert lines[1].split()[-3:] == ["nats-server", "redis-server", "shellcheck"]
    assert "--no-install-recommends" in lines[1]
    assert text.rstrip().endswith("every tool the tests use is installed")


def test_test_deps_reports_what_it_could_not_install(tmp_path: Path) -> None:
    text, calls = _test_deps(tmp_path, ["chromium"], 0, "exit 100")
    assert calls.splitlines()[0] == "update -qq"
    assert "apt-get update failed" in text
    assert "not installed: nats-server redis-server prometheus shellcheck systemd" in text
    assert "will be skipped" in text


def test_test_deps_as_a_user_installs_nothing_and_says_how(tmp_path: Path) -> None:
    text, calls = _test_deps(tmp_path, ALL_TOOLS[:-1], 1000, "exit 0")
    assert calls == ""
    assert "not root" in text and "apt-get install systemd" in text


def test_test_deps_without_apt_get(tmp_path: Path) -> None:
    text, _ = _test_deps(tmp_path, ALL_TOOLS[1:], 0, None)
    assert "no apt-get" in text and "chromium" in text


# --- make run ARGS=... ----------------------------------------------------------------------


def test_make_run_passes_args_to_gateway_serve() -> None:
    make = _tool("make", "make")
    out = _run([make, "-n", "-s", "run", "ARGS=--metrics-port 9313 --log-level debug"], cwd=ROOT)
    assert out.returncode == 0, out.stderr
    joined = re.sub(r"\\\n\s*", " ", out.stdout)  # the recipe's continuation lines
    serve = [line for line in joined.splitlines() if "-m gateway serve" in line]
    assert serve, out.stdout
    assert serve[-1].rstrip().endswith("--print-connect-help --metrics-port 9313 --log-level debug")
