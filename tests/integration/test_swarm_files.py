"""The container and Swarm files agree with each other and with the gateway (no daemon needed).

``docker stack config`` (docker CLI 28.x; Debian's 20.10 CLI has no ``stack config``: the
tests that need it skip and say so) validates and renders deploy/swarm/stack.yml; the rendered
YAML is read with tests/swarm/blockyaml.py (no YAML library in the test environment) and
checked for what matters: keys only as Docker secrets (never environment variables or
command-line values), host-mode ports, dnsrr, rolling updates one task at a time, stop
grace periods longer than the gateway's drain, health checks, and the ports, paths and key
files the configs name. The configs themselves go through the gateway's own parser. The real
deployment is make test-swarm (tests/swarm/test_swarm.py).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from gateway.config import parse_config, validate
from tests.swarm.blockyaml import loads

ROOT = Path(__file__).resolve().parents[2]
SWARM = ROOT / "deploy" / "swarm"
STACK = SWARM / "stack.yml"
OVERRIDE = ROOT / "tests" / "swarm" / "stack.test.yml"
DOCKERFILE = ROOT / "Dockerfile"
GATEWAY_UID = "10001"
#: a key as the official clients and the gateway know them: db- and 29 more characters
KEY_LIKE = re.compile(r"\bdb-[A-Za-z0-9]{29}\b")


def _docker() -> str:
    # the preinstalled 28.x CLI first (it has `stack config`), then Debian's
    for candidate in ("/usr/local/bin/docker", shutil.which("docker")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.skip("no docker CLI (docker stack config validates the stack file)")


@cache
def _render(*files: Path, **env: str) -> dict[str, Any]:
    docker = _docker()
    args = [docker, "stack", "config"]
    for f in files:
        args += ["-c", str(f)]
    out = subprocess.run(
        args, capture_output=True, text=True, timeout=30, env={**os.environ, **env}, cwd=ROOT
    )
    if out.returncode != 0 and re.search(
        r"unknown (command|flag)|not a docker command", out.stderr
    ):
        pytest.skip(f"this docker CLI has no `stack config` ({docker}: {out.stderr.strip()[:120]})")
    assert out.returncode == 0, f"docker stack config rejects {files}: {out.stderr}"
    doc: dict[str, Any] = loads(out.stdout)
    return doc


def stack() -> dict[str, Any]:
    return _render(STACK)


def services() -> dict[str, dict[str, Any]]:
    svcs: dict[str, dict[str, Any]] = stack()["services"]
    return svcs


def _toml(name: str) -> dict[str, Any]:
    return tomllib.loads((SWARM / name).read_text())


def _seconds(text: str) -> float:
    """A compose duration (``30s``, ``1m30s``) in seconds."""
    total = 0.0
    for value, unit in re.findall(r"([0-9.]+)(ms|h|m|s)", text):
        total += float(value) * {"h": 3600, "m": 60, "s": 1, "ms": 0.001}[unit]
    assert total > 0, f"not a duration: {text!r}"
    return total


def _argv(svc: dict[str, Any]) -> list[str]:
    return [str(a) for a in (svc.get("entrypoint") or []) + (svc.get("command") or [])]


def _flag_values(argv: list[str], flag: str) -> list[str]:
    """The values of ``flag`` (``--flag V`` and ``--flag=V``)."""
    found = []
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            found.append(argv[i + 1])
        elif arg.startswith(flag + "="):
            found.append(arg.split("=", 1)[1])
    return found


def _secret_targets(svc: dict[str, Any]) -> set[str]:
    return {f"/run/secrets/{s['target']}" for s in svc.get("secrets", [])}


# --- the stack file -----------------------------------------------------------------------


def test_docker_stack_config_validates_the_stack() -> None:
    doc = stack()
    assert {"primary", "edge", "probe", "prometheus"} <= set(doc["services"])
    # the published ports follow the variables the stack documents
    doc2 = _render(STACK, GATEWAY_CLIENT_PORT="23000", GATEWAY_INGEST_PORT="24000")
    edge_ports = [p["published"] for p in doc2["services"]["edge"]["ports"]]
    primary_ports = [p["published"] for p in doc2["services"]["primary"]["ports"]]
    assert edge_ports == [23000] and primary_ports == [24000]


def test_every_service_uses_dnsrr_and_host_mode_ports() -> None:
    # no IPVS on the kernels this was built on: no VIPs, no ingress routing mesh
    for name, svc in services().items():
        assert svc["deploy"]["endpoint_mode"] == "dnsrr", name
        for port in svc.get("ports", []):
            assert port["mode"] == "host", f"{name}: port {port} is not published in host mode"


def test_primary_is_pinned_to_the_feed_host_with_its_journal_on_a_volume() -> None:
    primary = services()["primary"]
    deploy = primary["deploy"]
    assert deploy["mode"] == "replicated" and deploy["replicas"] == 1
    assert "node.labels.gateway.feed == true" in deploy["placement"]["constraints"]
    config = _toml("primary.toml")
    journal = config["journal"]["dir"]
    mounts = {v["target"]: v for v in primary["volumes"]}
    assert any(
        journal.startswith(t.rstrip("/") + "/") and m["type"] == "volume" for t, m in mounts.items()
    ), f"journal {journal} is not on a volume: {mounts}"
    # the ingest port it listens on is the one published (on the feed host)
    (ingest,) = config["feeds"].values()
    assert urlsplit(ingest).scheme == "ingest"
    assert [p["target"] for p in primary["ports"]] == [urlsplit(ingest).port]


def test_edges_are_global_relays_of_the_primary() -> None:
    svcs = services()
    edge = svcs["edge"]
    assert edge["deploy"]["mode"] == "global"
    config = _toml("edge.toml")
    assert [p["target"] for p in edge["ports"]] == [config["port"]]
    ((dataset, uri),) = config["feeds"].items()
    parts = urlsplit(uri)
    assert parts.scheme == "lsg" and parts.hostname == "primary"
    assert parts.port == _toml("primary.toml")["port"]
    query = parse_qs(parts.query)
    # the relay's key: a Docker secret file mounted on the edge, never key_env
    assert "key_env" not in query
    assert query["key_file"][0] in _secret_targets(edge)
    # the primary accepts that same secret as its key file
    assert "/run/secrets/" + next(
        s["target"]
        for s in edge["secrets"]
        if f"/run/secrets/{s['target']}" == query["key_file"][0]
    ) in _flag_values(_argv(svcs["primary"]), "--api-key-file")
    # the edge journals (the relay's position lives beside its journal), on a volume
    journal = config["journal"]["dir"]
    assert any(
        journal.startswith(v["target"].rstrip("/") + "/") and v["type"] == "volume"
        for v in edge["volumes"]
    )
    assert dataset in _toml("primary.toml")["feeds"]


def test_rolling_updates_drain_one_task_at_a_time() -> None:
    svcs = services()
    for name, config in (("primary", "primary.toml"), ("edge", "edge.toml")):
        deploy = svcs[name]["deploy"]
        for key in ("update_config", "rollback_config"):
            assert deploy[key]["parallelism"] == 1, (name, key)
            # stop-first: the host port and the journal belong to the old task until it exits
            assert deploy[key]["order"] == "stop-first", (name, key)
        assert deploy["update_config"]["failure_action"] == "rollback", name
        drain = _toml(config).get("shutdown_grace_s", 5.0)
        grace = _seconds(svcs[name]["stop_grace_period"])
        assert grace >= drain + 5, f"{name}: stop_grace_period {grace} s vs drain {drain} s"
        assert svcs[name].get("stop_signal", "SIGTERM") in ("SIGTERM", "SIGINT"), name


def test_keys_are_docker_secrets_never_environment_or_arguments() -> None:
    doc = stack()
    for name, spec in doc["secrets"].items():
        assert spec.get("external") is True, f"secret {name} must be created outside the file"
    for name, svc in doc["services"].items():
        env = svc.get("environment") or {}
        for var, value in env.items():
            assert not re.search(r"KEY|SECRET|TOKEN|PASSWORD", var, re.I), f"{name}: env {var}"
            assert not KEY_LIKE.search(str(value)), f"{name}: a key in env {var}"
        argv = _argv(svc)
        assert not KEY_LIKE.search(" ".join(argv)), f"{name}: a key on its command line"
        for flag in ("--api-key", "--key"):
            assert not _flag_values(argv, flag), f"{name}: {flag} puts a key in ps"
        mounted = _secret_targets(svc)
        for flag in ("--api-key-file", "--key-file"):
            for path in _flag_values(argv, flag):
                assert path in mounted, f"{name}: {flag} {path} is not one of its secrets"
        for secret in svc.get("secrets", []):
            # readable by the gateway user only
            assert secret["uid"] == GATEWAY_UID and secret["mode"] == 0o400, (name, secret)
    assert _flag_values(_argv(doc["services"]["edge"]), "--api-key-file")
    assert _flag_values(_argv(doc["services"]["probe"]), "--key-file")


def test_configs_are_docker_configs_in_place_of_the_images_default() -> None:
    svcs = services()
    for name, file in (("primary", "primary.toml"), ("edge", "edge.toml")):
        targets = {c["target"]: c["source"] for c in svcs[name]["configs"]}
        source = targets["/etc/gateway/gateway.toml"]
        assert Path(stack()["configs"][source]["file"]).name == file
    for file in ("primary.toml", "edge.toml"):
        cfg = validate(parse_config((SWARM / file).read_bytes(), file))
        assert cfg.api_keys == [], f"{file}: keys belong in Docker secrets"
        assert cfg.metrics_host == "0.0.0.0" and cfg.host == "0.0.0.0"


def test_health_checks_and_the_metrics_ports_agree() -> None:
    svcs = services()
    dockerfile = DOCKERFILE.read_text()
    image_url = re.search(r"HEALTHCHECK_URL=(\S+)", dockerfile)
    assert image_url and "HEALTHCHECK " in dockerfile
    for name in ("primary", "edge"):
        test = svcs[name]["healthcheck"]["test"]
        assert test[0] == "CMD" and "gateway-healthcheck.py" in " ".join(test), name
        port = _toml(f"{name}.toml")["metrics_port"]
        assert urlsplit(image_url.group(1)).port == port, name
    probe = svcs["probe"]
    probe_port = int(_flag_values(_argv(probe), "--metrics-port")[0])
    assert urlsplit(probe["environment"]["HEALTHCHECK_URL"]).port == probe_port
    assert _flag_values(_argv(probe), "--host") == ["edge"]


def test_prometheus_finds_every_task_through_dns() -> None:
    prom = loads((SWARM / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in prom["scrape_configs"]}
    # the alert rules and the dashboard select on these job names
    assert set(jobs) == {"gateway", "gateway-probe"}
    found = {}
    for job in jobs.values():
        assert "static_configs" not in job
        for sd in job["dns_sd_configs"]:
            assert sd["type"] == "A"
            for name in sd["names"]:
                found[name] = sd["port"]
    metrics = _toml("primary.toml")["metrics_port"]
    assert (
        found["tasks.primary"] == metrics
        and found["tasks.edge"] == _toml("edge.toml")["metrics_port"]
    )
    probe_port = int(_flag_values(_argv(services()["probe"]), "--metrics-port")[0])
    assert found["tasks.probe"] == probe_port
    targets = {c["target"] for c in services()["prometheus"]["configs"]}
    assert {"/etc/prometheus/prometheus.yml", "/etc/prometheus/alerts.yml"} <= targets
    assert prom["rule_files"] == ["/etc/prometheus/alerts.yml"]


def test_the_swarm_tests_second_edge_is_the_edge() -> None:
    """tests/swarm/stack.test.yml's edge2 (make test-swarm reads through two edges on one
    node) is the stack's edge but for its published ports and its journal volume."""
    doc = _render(STACK, OVERRIDE)
    edge, edge2 = dict(doc["services"]["edge"]), dict(doc["services"]["edge2"])
    for svc in (edge, edge2):
        svc.pop("ports")
        (volume,) = svc.pop("volumes")
        assert volume["target"] == "/var/lib/gateway" and volume["type"] == "volume"
        for key in ("secrets", "configs"):  # merging two files may reorder these
            svc[key] = sorted(svc[key], key=lambda item: str(item["source"]))
    assert edge == edge2


# --- the image ----------------------------------------------------------------------------


def test_dockerfile_runs_the_gateway_as_a_user_under_an_init() -> None:
    text = DOCKERFILE.read_text()
    stages = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert len(stages) >= 2 and all(s == "${BASE}" for s in stages), stages
    assert re.search(r"^ARG BASE=local/debian:bookworm$", text, re.M)
    user = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert user and user[-1].split(":")[0] not in ("root", "0")
    entry = re.search(r"^ENTRYPOINT\s+(\[.*\])$", text, re.M)
    assert entry is not None
    argv = [a.strip().strip('"') for a in entry.group(1).strip("[]").split(",")]
    assert argv[0].endswith("tini") and argv[1] == "--"
    assert argv[2:] == ["gateway", "serve", "--config", "/etc/gateway/gateway.toml"]
    assert re.search(r'^CMD \["--api-key-file", "/run/secrets/', text, re.M)
    assert re.search(r"^HEALTHCHECK .*", text, re.M) and "STOPSIGNAL SIGTERM" in text
    # the image's own config parses
    default = ROOT / "deploy" / "docker" / "gateway.toml"
    cfg = validate(parse_config(default.read_bytes(), str(default)))
    assert cfg.journal.dir == "/var/lib/gateway/journal" and cfg.metrics_port == 9313


def test_dockerignore_lets_in_only_what_the_image_needs() -> None:
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert allowed == {"pyproject.toml", "setup.py", "README.md", "gateway", "deploy/docker"}
    copied = re.findall(r"^COPY\s+(?!--from)(.+)\s+\S+$", DOCKERFILE.read_text(), re.M)
    for sources in copied:
        for src in sources.split():
            assert any(src.rstrip("/") == a or src.startswith(a + "/") for a in allowed), src
