"""make test-swarm: the image, the stack and the relay edges on a real one-node Docker Swarm.

Needs root, dockerd (Debian's docker.io), the docker CLI with ``stack config`` and debootstrap;
skips saying which is missing, or why the private daemon cannot start. Not part of
``make test`` (tests/swarm is outside pytest's testpaths); ``make test-swarm`` runs it.

What it does, each wait polling with a deadline:

1. A private dockerd (tests/swarm/dockerd.py: own data/exec roots, socket, pidfile, no
   iptables, no bridge), a one-node swarm on 127.0.0.1, the image built the way a user without
   a registry builds it (deploy/docker/build-image.sh: a debootstrap base, then the wheel).
2. ``docker stack deploy --resolve-image never -c deploy/swarm/stack.yml -c
   tests/swarm/stack.test.yml``: the real stack plus a second edge service ``edge2`` from the
   same definition (one node runs one task of the global ``edge``), the primary's client and
   metrics ports published for the test, Prometheus at 0 replicas (no registry to pull it
   from). Host ports are picked free and passed through the stack's ${...} variables.
3. The containers run as uid 10001, become healthy (HEALTHCHECK on /healthz), and hold the
   keys only as /run/secrets files (mode 0400, owned by the gateway user), not in their
   environment or command line.
4. A publisher on the host writes numbered trades into the primary's ingest port. The official
   ``databento`` client through each edge, and the project's ResumingClient through ``edge``,
   get every record in order.
5. ``docker kill`` of the edge task: Swarm starts a new one, which resumes from its journal
   and the primary; the ResumingClient reconnects with backoff and resumes without a gap or
   a duplicate (the official client on that edge is cut, as official clients are). Then a
   rolling update of the edge (``docker service update --force``): the old task drains on
   SIGTERM and exits 0 well inside its stop_grace_period, and the ResumingClient resumes on
   the new task.
6. ``docker kill`` of the primary task: Swarm starts a new one on the same journal volume; the
   publisher reconnects; both edges resume from the primary's journal. At the end the stream
   through edge2 (official client, connected throughout) and the ResumingClient's are exactly
   what the primary's journal holds (a start=0 replay read from the primary directly): nothing
   missed, nothing twice, no gap reported, gateway_relay_gaps_total 0 on both edges.
7. ``docker stack rm``, ``docker swarm leave --force``, the daemon stopped and its traces
   removed: nothing is left behind (checked).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from tests.integration.helpers import OfficialSession, data_records, http_get, metric_samples
from tests.support.prometheus import metric, parse_samples
from tests.support.waiting import poll_until
from tests.swarm.dockerd import (
    PrivateDockerd,
    Unavailable,
    free_port,
    free_udp_port_below,
    preflight,
)

pytestmark = pytest.mark.timeout(900)

ROOT = Path(__file__).resolve().parents[2]
STACK = ROOT / "deploy" / "swarm" / "stack.yml"
OVERRIDE = ROOT / "tests" / "swarm" / "stack.test.yml"
NAME = "lsgtest"
IMAGE = "dbn-gateway:swarm-test"
#: Prometheus from Debian's package (deploy/docker/prometheus.Dockerfile): no registry here
PROMETHEUS_IMAGE = "local/prometheus:debian"
DATASET = "GLBX.MDP3"
EDGE_KEY = "db-SWARMEDGE00000000000000000000"
CLIENT_KEY = "db-SWARMCLIENT000000000000000000"
PROBE_KEY = "db-SWARMPROBE0000000000000000000"
SYMBOLS = {"AAA": 11, "BBB": 12, "CCC": 13}
TRADE_RTYPE = 0x00
SYSTEM_RTYPE = 0x17


def _phase(what: str, since: float) -> float:
    now = time.monotonic()
    print(f"[swarm] {what}: {now - since:.1f} s", flush=True)
    return now


# --- the stack ----------------------------------------------------------------------------


@dataclass
class Ports:
    edge: int = field(default_factory=free_port)
    edge2: int = field(default_factory=free_port)
    ingest: int = field(default_factory=free_port)
    primary: int = field(default_factory=free_port)
    primary_metrics: int = field(default_factory=free_port)
    edge_metrics: int = field(default_factory=free_port)
    edge2_metrics: int = field(default_factory=free_port)
    prometheus: int = field(default_factory=free_port)
    swarm: int = field(default_factory=free_port)
    data_path: int = field(default_factory=free_udp_port_below)

    def env(self) -> dict[str, str]:
        return {
            "GATEWAY_IMAGE": IMAGE,
            "GATEWAY_CLIENT_PORT": str(self.edge),
            "GATEWAY_INGEST_PORT": str(self.ingest),
            "PROMETHEUS_PORT": str(self.prometheus),
            # this machine's root may not raise the hard limit (no CAP_SYS_RESOURCE)
            "GATEWAY_NOFILE": str(resource.getrlimit(resource.RLIMIT_NOFILE)[1]),
            "PROMETHEUS_IMAGE": PROMETHEUS_IMAGE,
            "PROMETHEUS_REPLICAS": "1",
            "SWARM_TEST_EDGE2_PORT": str(self.edge2),
            "SWARM_TEST_PRIMARY_PORT": str(self.primary),
            "SWARM_TEST_PRIMARY_METRICS_PORT": str(self.primary_metrics),
            "SWARM_TEST_EDGE_METRICS_PORT": str(self.edge_metrics),
            "SWARM_TEST_EDGE2_METRICS_PORT": str(self.edge2_metrics),
        }


@dataclass
class Stack:
    dockerd: PrivateDockerd
    ports: Ports

    def container(self, service: str) -> str | None:
        """The running container of ``service`` (one task each here), or None."""
        out = self.dockerd.docker(
            "ps", "-q", "--filter", f"label=com.docker.swarm.service.name={NAME}_{service}"
        ).split()
        return out[0] if len(out) == 1 else None

    def inspect(self, container: str) -> dict[str, Any]:
        doc: list[dict[str, Any]] = json.loads(self.dockerd.docker("inspect", container))
        return doc[0]

    def health(self, container: str) -> str:
        state = self.inspect(container)["State"]
        return str(state.get("Health", {}).get("Status", "none"))

    def diagnostics(self) -> str:
        """Task states and log tails, for a failure message."""
        parts = [self.dockerd.run("service", "ls", check=False)[1]]
        for svc in ("primary", "edge", "edge2", "probe"):
            _, ps = self.dockerd.run(
                "service",
                "ps",
                "--no-trunc",
                "--format",
                "{{.Name}} {{.CurrentState}} {{.Error}}",
                f"{NAME}_{svc}",
                check=False,
            )
            _, logs = self.dockerd.run(
                "service", "logs", "--tail", "15", f"{NAME}_{svc}", check=False
            )
            parts += [f"--- {svc}: {ps}", logs[-3000:]]
        return "\n".join(parts)

    def wait_ready(
        self, services: dict[str, int], previous: dict[str, str], timeout: float
    ) -> dict[str, str]:
        """Each service has a running container (not the one in ``previous``), healthy, its
        /healthz (primary) or /readyz (edges) on its metrics port answers 200, and an edge's
        relay is connected upstream (gateway_relay_upstream_up 1: /readyz alone also says
        ready during the feed's start-up grace, feed_grace_s)."""

        def ready() -> dict[str, str] | None:
            found = {}
            for svc, port in services.items():
                cid = self.container(svc)
                if cid is None or cid == previous.get(svc):
                    return None
                path = "/healthz" if svc == "primary" else "/readyz"
                try:
                    status, _ = http_get(port, path, timeout=2.0)
                except OSError:
                    return None
                if status != 200 or self.health(cid) != "healthy":
                    return None
                if svc != "primary" and _upstream_up(port) != 1:
                    return None
                found[svc] = cid
            return found

        try:
            return poll_until(ready, timeout, 0.5, f"{sorted(services)} running and healthy")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.diagnostics()}") from None


def _upstream_up(port: int) -> float | None:
    """An edge's gateway_relay_upstream_up, or None when its metrics do not answer."""
    try:
        status, text = http_get(port, "/metrics", timeout=2.0)
    except OSError:
        return None
    if status != 200:
        return None
    return metric(parse_samples(text), "gateway_relay_upstream_up", dataset=DATASET)


def _build_image(dockerd: PrivateDockerd) -> None:
    ca_dir = os.environ.get("SWARM_TEST_CA_DIR", "/usr/local/share/ca-certificates")
    argv = [str(ROOT / "deploy" / "docker" / "build-image.sh"), "-t", IMAGE]
    if any(Path(ca_dir).glob("*.crt")):
        argv += ["--ca-dir", ca_dir]
    log = dockerd.dir / "build.log"
    with open(log, "wb") as out:
        rc = subprocess.run(
            argv, stdout=out, stderr=subprocess.STDOUT, env=dockerd.env, timeout=600
        ).returncode
    if rc != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise AssertionError(f"image build failed (rc {rc}):\n{tail}")
    size = int(dockerd.docker("image", "inspect", "--format", "{{.Size}}", IMAGE).strip())
    print(f"[swarm] image {IMAGE}: {size / 1e6:.0f} MB", flush=True)
    docker_dir = ROOT / "deploy" / "docker"
    env = {"DOCKER_BUILDKIT": "0"} if dockerd.run("buildx", "version", check=False)[0] else {}
    dockerd.docker(
        "build",
        "--network",
        "host",
        "-f",
        str(docker_dir / "prometheus.Dockerfile"),
        "-t",
        PROMETHEUS_IMAGE,
        str(docker_dir),
        timeout=600,
        env=env,
    )


def _save_logs(dockerd: PrivateDockerd) -> None:
    """Each service's log into $SWARM_TEST_LOGS/<service>.log, when that is set (CI)."""
    folder = os.environ.get("SWARM_TEST_LOGS")
    if not folder:
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    for svc in ("primary", "edge", "edge2", "probe", "prometheus"):
        _, text = dockerd.run("service", "logs", "--no-task-ids", f"{NAME}_{svc}", check=False)
        (Path(folder) / f"{svc}.log").write_text(text)


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    try:
        preflight()
    except Unavailable as exc:
        pytest.skip(f"swarm test: {exc}")
    dockerd = PrivateDockerd()
    t0 = time.monotonic()
    try:
        dockerd.start()
    except Unavailable as exc:
        leftovers = dockerd.stop()
        pytest.skip(f"swarm test: {exc}" + (f" (cleanup: {leftovers})" if leftovers else ""))
    problems: list[str] = []
    try:
        t = _phase("dockerd up", t0)
        _build_image(dockerd)
        t = _phase("base + image built", t)
        ports = Ports()
        with dockerd.swarm(ports.swarm, ports.data_path) as node:
            dockerd.docker(
                "node",
                "update",
                "--label-add",
                "gateway.feed=true",
                "--label-add",
                "gateway.edge=true",
                node,
            )
            for name, key in (
                ("gateway_edge_upstream_key", EDGE_KEY),
                ("gateway_client_api_keys", CLIENT_KEY),
                ("gateway_probe_key", PROBE_KEY),
            ):
                path = dockerd.dir / name
                path.write_text(key + "\n")
                path.chmod(0o600)
                dockerd.docker("secret", "create", name, str(path))
                path.unlink()
            st = Stack(dockerd, ports)
            try:
                dockerd.docker(
                    "stack",
                    "deploy",
                    "--resolve-image",
                    "never",
                    "-c",
                    str(STACK),
                    "-c",
                    str(OVERRIDE),
                    NAME,
                    env=ports.env(),
                )
                yield st
            finally:
                t = time.monotonic()
                _save_logs(dockerd)
                _phase("logs saved", t)
                last = [""]
                dockerd.run("stack", "rm", NAME, check=False)

                def gone() -> bool:
                    left = dockerd.docker(
                        "ps",
                        "-a",
                        "--format",
                        "{{.Names}}",
                        "--filter",
                        f"label=com.docker.stack.namespace={NAME}",
                    )
                    if left.split():
                        last[0] = left.split()[0].split(".")[0]
                    nets = dockerd.docker("network", "ls", "-q", "--filter", f"name={NAME}_")
                    return not left.split() and not nets.split()

                try:
                    poll_until(gone, 90.0, 0.5, "the stack's containers and network to go")
                except AssertionError as exc:
                    problems.append(str(exc))
                _phase(f"stack removed (the last container to go: {last[0]})", t)
    finally:
        t = time.monotonic()
        problems += dockerd.stop()
        _phase("swarm left, dockerd stopped, cleaned up", t)
    assert not problems, f"left behind: {problems}"


# --- publisher and readers ----------------------------------------------------------------


def _trades(first: int, n: int) -> bytes:
    import databento_dbn as d

    now = time.time_ns()
    return b"".join(
        bytes(
            d.TradeMsg(
                publisher_id=1,
                instrument_id=11 + seq % 3,
                ts_event=now,
                price=100_000_000_000 + seq,
                size=1,
                action=d.Action.TRADE,  # type: ignore[arg-type]
                side=d.Side.BID,  # type: ignore[arg-type]
                depth=0,
                ts_recv=now,
                sequence=seq,
            )
        )
        for seq in range(first, first + n)
    )


class Publisher:
    """Writes numbered trades (sequence 0, 1, 2, ...) into the primary's ingest port from the
    host, 20 every 10 ms, reconnecting (with a new Metadata) when the primary goes away.
    Records in flight when the primary is killed are lost: the primary's journal, not this
    count, is the reference."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.next = 0
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from gateway.dbn import encode_publisher_metadata

        while not self._stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
                    sock.sendall(encode_publisher_metadata(DATASET, time.time_ns(), SYMBOLS))
                    self.connections += 1
                    while not self._stop.is_set():
                        sock.sendall(_trades(self.next, 20))
                        self.next += 20
                        self._stop.wait(0.01)
            except OSError:
                self._stop.wait(0.2)  # the primary is restarting: try again

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10.0)


class ResumingReader:
    """The project's ResumingClient in a thread of its own: the trades' sequence numbers, and
    the texts of gap SystemMsgs."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.seqs: list[int] = []
        self.gap_texts: list[str] = []
        self.client: Any = None
        self.error: BaseException | None = None
        self.started = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_until_complete, args=(self._main(),), daemon=True
        )
        self._thread.start()

    async def _main(self) -> None:
        from gateway.checkpoint import Backoff
        from gateway.client_resume import ResumingClient

        try:
            self.client = await ResumingClient.connect(
                "127.0.0.1",
                self.port,
                CLIENT_KEY,
                DATASET,
                backoff=Backoff(initial_s=0.1, max_s=1.0, max_elapsed_s=90.0),
            )
            await self.client.subscribe("trades", "ALL_SYMBOLS")
            await self.client.start()
            self.started.set()
            async for batch in self.client.batches():
                for rtype, _, rec in batch.records():
                    if rtype == TRADE_RTYPE:
                        self.seqs.append(int.from_bytes(rec[44:48], "little"))
                    elif rtype == SYSTEM_RTYPE:
                        text = bytes(rec[16:319]).split(b"\0", 1)[0].decode("utf-8", "replace")
                        if "gap" in text:
                            self.gap_texts.append(text)
        except Exception as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
            self.started.set()

    def sequences(self) -> list[int]:
        return list(self.seqs)

    def close(self) -> None:
        if self.client is not None:
            fut = asyncio.run_coroutine_threadsafe(self.client.close(), self._loop)
            with contextlib.suppress(Exception):
                fut.result(10.0)
        self._thread.join(10.0)
        self._loop.close()


def _docker_time(text: str) -> float:
    """Seconds since the epoch of a Docker timestamp (RFC 3339, nanoseconds, Z)."""
    import datetime as dt

    head, _, frac = text.rstrip("Z").partition(".")
    stamp = dt.datetime.fromisoformat(head).replace(tzinfo=dt.UTC).timestamp()
    return stamp + (float("0." + frac[:6]) if frac else 0.0)


def _has(get: Callable[[], list[int]], n: int) -> bool:
    return len(get()) >= n


def _ends_at(get: Callable[[], list[int]], last: int) -> bool:
    seqs = get()
    return bool(seqs) and seqs[-1] == last


def _seqs(session: OfficialSession) -> list[int]:
    return [int(r.sequence) for r in data_records(list(session.records))]


def _gap_texts(session: OfficialSession) -> list[str]:
    return [
        str(r.msg)
        for r in list(session.records)
        if int(r.rtype) == SYSTEM_RTYPE and "gap" in str(r.msg)
    ]


def _official(port: int, key: str = CLIENT_KEY, **sub: Any) -> OfficialSession:
    session = OfficialSession(
        port, DATASET, [dict(schema="trades", symbols="ALL_SYMBOLS", **sub)], key=key
    )
    session.start(timeout=20.0)
    assert session.metadata is not None, f"no Metadata from 127.0.0.1:{port}"
    return session


def _in_order_from_zero(seqs: list[int], what: str) -> None:
    assert seqs, f"{what}: no records"
    assert seqs == list(range(len(seqs))), (
        f"{what}: not every record in order: first break at "
        f"{next(i for i, s in enumerate(seqs) if s != i)} of {len(seqs)}"
    )


def _scraped(port: int) -> list[str] | None:
    """Prometheus's active targets as job/role, when they are exactly one up primary, one up
    edge (the ``edge`` service; edge2 is the test's own) and one up probe."""
    try:
        status, body = http_get(port, "/api/v1/targets?state=active", timeout=3.0)
    except OSError:
        return None
    if status != 200:
        return None
    found = sorted(
        f"{t['labels']['job']}/{t['labels'].get('role', '-')}/{t['health']}"
        for t in json.loads(body)["data"]["activeTargets"]
    )
    want = ["gateway-probe/-/up", "gateway/edge/up", "gateway/primary/up"]
    return found if found == want else None


def _relay_metric(port: int, name: str) -> float:
    return metric(metric_samples(port), name, dataset=DATASET)


# --- the test -----------------------------------------------------------------------------


def test_stack_relays_every_record_through_edge_and_primary_restarts(stack: Stack) -> None:
    ports = stack.ports
    t = time.monotonic()
    services = {
        "primary": ports.primary_metrics,
        "edge": ports.edge_metrics,
        "edge2": ports.edge2_metrics,
    }
    cids = stack.wait_ready(services, {}, 120.0)
    t = _phase("stack deployed: primary, edge, edge2 healthy and edges ready", t)

    # the image's promises, as deployed
    for svc, cid in cids.items():
        doc = stack.inspect(cid)
        assert doc["Config"]["User"] == "gateway:gateway", svc
        top = stack.dockerd.docker("exec", cid, "id", "-u").strip()
        assert top == "10001", f"{svc} runs as uid {top}"
        env = json.dumps(doc["Config"]["Env"]) + json.dumps(doc["Args"])
        for key in (EDGE_KEY, CLIENT_KEY, PROBE_KEY):
            assert key not in env, f"{svc}: a key in its environment or command line"
        mode = stack.dockerd.docker(
            "exec", cid, "stat", "-c", "%u %a", "/run/secrets/edge_upstream_key"
        ).strip()
        assert mode == "10001 400", f"{svc}: /run/secrets/edge_upstream_key is {mode}"

    # 4. every record in order, through each edge (official client) and the resuming client
    official_edge = _official(ports.edge)
    official_edge2 = _official(ports.edge2)
    resuming = ResumingReader(ports.edge)
    assert resuming.started.wait(20.0) and resuming.error is None, resuming.error
    publisher = Publisher(ports.ingest)
    try:
        poll_until(lambda: publisher.next >= 2000, 30.0, 0.05, "2,000 records published")
        upto = publisher.next
        readers: list[tuple[str, Callable[[], list[int]]]] = [
            ("official client via edge", partial(_seqs, official_edge)),
            ("official client via edge2", partial(_seqs, official_edge2)),
            ("ResumingClient via edge", resuming.sequences),
        ]
        for what, get in readers:
            poll_until(partial(_has, get, upto), 30.0, 0.05, f"{upto} records, {what}")
            _in_order_from_zero(get(), what)
        t = _phase(f"{upto} records in order through each edge", t)

        # 5. an edge task killed: Swarm replaces it, the ResumingClient resumes exactly
        killed_at = publisher.next
        stack.dockerd.docker("kill", cids["edge"])
        new = stack.wait_ready({"edge": ports.edge_metrics}, {"edge": cids["edge"]}, 90.0)
        cids["edge"] = new["edge"]
        poll_until(
            lambda: len(resuming.seqs) >= killed_at + 1000,
            60.0,
            0.05,
            "the ResumingClient past the edge kill",
        )
        assert resuming.error is None, resuming.error
        _in_order_from_zero(list(resuming.seqs), "ResumingClient across the edge kill")
        assert resuming.client.reconnects >= 1 and resuming.client.gaps == []
        cut = official_edge.stop()
        _in_order_from_zero(_seqs(official_edge), "official client via the killed edge")
        t = _phase(
            f"edge killed and replaced; ResumingClient resumed (official client: {cut!r})", t
        )

        # 5b. a rolling update of the edge (docker service update --force, as an upgrade
        # does): the old task drains on SIGTERM and exits by itself well inside its
        # stop_grace_period; the new task on the same journal volume serves the
        # ResumingClient's resume
        old = cids["edge"]
        before = len(resuming.seqs)
        updated_at = time.time()
        stack.dockerd.docker("service", "update", "--force", "--detach", f"{NAME}_edge")
        new = stack.wait_ready({"edge": ports.edge_metrics}, {"edge": old}, 120.0)
        cids["edge"] = new["edge"]
        state = stack.inspect(old)["State"]
        assert state["Status"] == "exited" and state["ExitCode"] == 0, state
        stopped_in = _docker_time(state["FinishedAt"]) - updated_at
        assert stopped_in < 25.0, f"the old edge took {stopped_in:.1f} s to stop"
        poll_until(
            lambda: len(resuming.seqs) >= before + 1000,
            60.0,
            0.05,
            "the ResumingClient past the rolling update",
        )
        _in_order_from_zero(list(resuming.seqs), "ResumingClient across the rolling update")
        assert resuming.client.gaps == []
        t = _phase(
            f"edge updated (stop-first): the old task drained and exited 0 in {stopped_in:.1f} s; "
            "ResumingClient resumed",
            t,
        )

        # 6. the primary killed: Swarm restarts it on its journal volume; the edges resume
        connections = publisher.connections
        stack.dockerd.docker("kill", cids["primary"])
        stack.wait_ready({"primary": ports.primary_metrics}, {"primary": cids["primary"]}, 90.0)
        poll_until(
            lambda: publisher.connections > connections,
            60.0,
            0.1,
            "the publisher reconnected to the new primary",
        )
        after = publisher.next
        poll_until(lambda: publisher.next >= after + 1000, 30.0, 0.05, "1,000 more published")
    finally:
        publisher.stop()
    last = publisher.next - 1
    try:
        for what, get in readers[1:]:
            poll_until(
                partial(_ends_at, get, last), 60.0, 0.05, f"the last record ({last}), {what}"
            )
        t = _phase("primary killed and restarted; edges resumed", t)

        # the reference: everything the primary's journal holds, read from the primary itself
        # (the primary accepts the edges' key only)
        reference = _official(ports.primary, EDGE_KEY, start=0)
        poll_until(
            lambda: _seqs(reference) and _seqs(reference)[-1] == last,
            60.0,
            0.05,
            "the primary's journal replayed",
        )
        ref = _seqs(reference)
        reference.stop()
        lost = last + 1 - len(ref)
        assert len(set(ref)) == len(ref) and ref == sorted(ref), "the journal is out of order"
        assert _seqs(official_edge2) == ref, "edge2's stream differs from the primary's journal"
        assert list(resuming.seqs) == ref, "the ResumingClient's stream differs from the journal"
        assert resuming.client.gaps == [] and not resuming.gap_texts, resuming.gap_texts
        assert not _gap_texts(official_edge2), _gap_texts(official_edge2)
        for svc, port in (("edge", ports.edge_metrics), ("edge2", ports.edge2_metrics)):
            assert _relay_metric(port, "gateway_relay_gaps_total") == 0, svc
        assert (
            metric(
                metric_samples(ports.edge2_metrics),
                "gateway_relay_reconnects_total",
                dataset=DATASET,
                mode="resume",
            )
            >= 1
        )
        t = _phase(
            f"{len(ref)} records: edge2 and the ResumingClient equal the primary's journal "
            f"({lost} lost between the publisher and the killed primary)",
            t,
        )

        # 7. Prometheus found the primary, the edge and the probe through tasks.* DNS
        targets = poll_until(
            partial(_scraped, ports.prometheus),
            90.0,
            1.0,
            "Prometheus scraping tasks.primary, tasks.edge and tasks.probe (all up)",
        )
        _phase(f"Prometheus scrapes {targets} through DNS service discovery", t)
    finally:
        official_edge2.stop()
        resuming.close()
