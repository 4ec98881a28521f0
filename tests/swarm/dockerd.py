"""A private Docker daemon for make test-swarm: its own data root, exec root, pidfile, config
file, trust key and unix socket, all under one temporary directory, and no effect on the host
network beyond what it must create.

It runs with ``--bridge=none --iptables=false --ip-forward=false``: no docker0, no iptables
rules, no change to net.ipv4.ip_forward. The image build runs its steps in the host's network
(``docker build --network host``), and a one-node swarm needs no forwarding: host-mode
published ports go through Docker's userland proxy, and the services talk over the overlay
network's bridge inside its own namespace. Containers cannot reach the site's DNS server then,
so the daemon names the host's address on the swarm's bridge as theirs, where
:class:`NxdomainServer` answers NXDOMAIN (a name Swarm's DNS does not know fails at once, as
with a real server, instead of after the resolver's 10 s). What it leaves on the host is removed by
:meth:`PrivateDockerd.stop`: the swarm's ``docker_gwbridge`` link (when there was none
before), ``/run/docker`` (when there was none before), mounts under the temporary directory,
and the directory itself.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from tests.support.waiting import poll_until

__all__ = ["PrivateDockerd", "Unavailable", "free_port", "free_udp_port_below", "preflight"]

#: the swarm's docker_gwbridge network (made before ``swarm init``), and the host's address on
#: it; preflight checks that no route of the host overlaps it
GWBRIDGE_SUBNET = "172.31.254.0/24"
GWBRIDGE_GATEWAY = "172.31.254.1"

#: the docker CLI that has `stack config` (28.x, /usr/local/bin) first; dockerd from Debian
PATH = "/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin"


class Unavailable(Exception):
    """This machine cannot run the swarm test (the test skips with this reason)."""


def _which(tool: str) -> str | None:
    return shutil.which(tool, path=PATH)


def _other_dockerd() -> str | None:
    """The pid of a dockerd this test did not start, or None."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text().strip()
        except OSError:
            continue
        if comm == "dockerd":
            return entry.name
    return None


def preflight() -> None:
    """Raise Unavailable naming what is missing: root, the programs, a free host."""
    if os.geteuid() != 0:
        raise Unavailable("needs root (a private dockerd and debootstrap); run as root")
    missing = [t for t in ("dockerd", "docker", "debootstrap") if _which(t) is None]
    if missing:
        raise Unavailable(
            f"missing {', '.join(missing)} (make test-deps installs docker.io, iptables and "
            "debootstrap from Debian when run as root)"
        )
    pid = _other_dockerd()
    if pid is not None:
        raise Unavailable(f"another dockerd runs on this host (pid {pid}); not disturbing it")
    if Path("/sys/class/net/docker_gwbridge").exists():
        raise Unavailable("a docker_gwbridge link exists (another swarm on this host)")
    subnet = ipaddress.ip_network(GWBRIDGE_SUBNET)
    routes = subprocess.run(["ip", "-4", "route", "show"], capture_output=True, text=True).stdout
    for line in routes.splitlines():
        dest = line.split()[0]
        if dest != "default" and ipaddress.ip_network(dest, strict=False).overlaps(subnet):
            raise Unavailable(f"this host routes {dest}, which overlaps the test's {subnet}")


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_udp_port_below(limit: int = 49151) -> int:
    """A free UDP port in 20000..limit (Swarm's data-path port must be below 49152, where
    the kernel's ephemeral range usually starts)."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randint(20000, limit)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:
                sock.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    raise Unavailable(f"no free UDP port below {limit} for the swarm's data path")


class NxdomainServer:
    """The containers' DNS server in the test: answers NXDOMAIN to every query, as a site's
    DNS server answers for a Swarm-internal name (``primary`` while its task restarts).
    Swarm's DNS (127.0.0.11 in each container) answers service names itself and forwards
    the rest here; without an answer from anywhere, the container's resolver would wait its
    10 s timeout for each unknown name, and Docker 20.10's embedded resolver does not answer
    when forwarding fails."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((address, 53))
        self.sock.settimeout(0.2)
        self.answered = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                query, peer = self.sock.recvfrom(4096)
            except (TimeoutError, OSError):
                continue
            reply = nxdomain(query)
            if reply is not None:
                with contextlib.suppress(OSError):
                    self.sock.sendto(reply, peer)
                    self.answered += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5.0)
        self.sock.close()


def nxdomain(query: bytes) -> bytes | None:
    """The NXDOMAIN reply to a DNS query (its question echoed), or None for a malformed one."""
    if len(query) < 12 or query[2] & 0x80:  # too short, or itself a response
        return None
    qdcount = int.from_bytes(query[4:6], "big")
    pos = 12
    for _ in range(qdcount):
        while pos < len(query) and query[pos] != 0:
            if query[pos] & 0xC0:  # no compression pointers in a question we can read
                return None
            pos += 1 + query[pos]
        pos += 1 + 4  # the root label, QTYPE, QCLASS
        if pos > len(query):
            return None
    flags = 0x8000 | (query[2] & 0x79) << 8 | 0x0080 | 3  # QR, opcode+RD kept, RA, NXDOMAIN
    header = query[:2] + flags.to_bytes(2, "big") + query[4:6] + bytes(6)
    return header + query[12:pos]


class PrivateDockerd:
    """``with PrivateDockerd() as d: d.docker("info")`` — started, then stopped and cleaned up
    whatever happens (the ``with`` block's exit, or :meth:`stop` from a fixture)."""

    def __init__(self, start_timeout: float = 30.0) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="lsg-swarm-"))
        self.sock = self.dir / "docker.sock"
        self.log_path = self.dir / "dockerd.log"
        self.env = {
            **os.environ,
            "PATH": PATH,
            "DOCKER_HOST": f"unix://{self.sock}",
            # the CLI's own config (contexts, auth) from here, not from ~/.docker
            "DOCKER_CONFIG": str(self.dir / "cli"),
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self._had_gwbridge = Path("/sys/class/net/docker_gwbridge").exists()
        self._had_run_docker = Path("/run/docker").exists()
        self._start_timeout = start_timeout

    # -- start / stop ------------------------------------------------------------------

    def start(self) -> None:
        conf = self.dir / "daemon.json"
        # no host config (/etc/docker/daemon.json): only what is set here
        conf.write_text(
            json.dumps(
                {
                    # its own trust key (20.10 writes /etc/docker/key.json otherwise)
                    "deprecated-key-path": str(self.dir / "key.json"),
                    # the containers' upstream DNS server: this host on the swarm's bridge, where
                    # NxdomainServer answers (with no forwarding, no real server is reachable)
                    "dns": [GWBRIDGE_GATEWAY],
                }
            )
        )
        (self.dir / "cli").mkdir()
        argv = [
            _which("dockerd") or "dockerd",
            "--config-file",
            str(conf),
            "--data-root",
            str(self.dir / "data"),
            "--exec-root",
            str(self.dir / "exec"),
            "--pidfile",
            str(self.dir / "dockerd.pid"),
            "--host",
            f"unix://{self.sock}",
            "--bridge=none",
            "--iptables=false",
            "--ip-forward=false",
            "--log-level=warn",
        ]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )

        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise Unavailable(
                    f"dockerd exited at start (rc {self.proc.returncode}): {self.log_tail()}"
                )
            return self.run("version", "--format", "{{.Server.Version}}", check=False)[0] == 0

        try:
            poll_until(up, self._start_timeout, 0.1, "the private dockerd to answer")
        except AssertionError:
            raise Unavailable(f"dockerd did not start: {self.log_tail()}") from None

    def stop(self) -> list[str]:
        """Stop the daemon (SIGTERM, then SIGKILL) and remove what it left; returns what
        could not be removed (empty: nothing left behind)."""
        problems: list[str] = []
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                problems.append("dockerd ignored SIGTERM for 30 s: killed")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        # containerd and shims it started are in its session: none may outlive it
        for pid in self._session_pids(proc.pid if proc is not None else None):
            problems.append(f"process {pid} of the daemon's session outlived it: killed")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for mnt in self._mounts():
            if subprocess.run(["umount", "-l", mnt], capture_output=True).returncode != 0:
                problems.append(f"cannot unmount {mnt}")
        if not self._had_gwbridge and Path("/sys/class/net/docker_gwbridge").exists():
            subprocess.run(["ip", "link", "delete", "docker_gwbridge"], capture_output=True)
        if not self._had_run_docker and Path("/run/docker").exists():
            shutil.rmtree("/run/docker", ignore_errors=True)
        shutil.rmtree(self.dir, ignore_errors=True)
        if self.dir.exists():
            problems.append(f"cannot remove {self.dir}")
        if Path("/sys/class/net/docker_gwbridge").exists() and not self._had_gwbridge:
            problems.append("docker_gwbridge is still there")
        return problems

    def _session_pids(self, sid: int | None) -> list[int]:
        if sid is None:
            return []
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[3]) == sid:  # field 6 of stat: the session id
                found.append(int(entry.name))
        return found

    def _mounts(self) -> list[str]:
        prefix = str(self.dir) + "/"
        mounts = []
        for line in Path("/proc/mounts").read_text().splitlines():
            point = line.split()[1].replace("\\040", " ")
            if point.startswith(prefix):
                mounts.append(point)
        return sorted(mounts, key=len, reverse=True)  # innermost first

    def __enter__(self) -> PrivateDockerd:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- using it ----------------------------------------------------------------------

    def _exec(
        self, args: tuple[str, ...], timeout: float, env: dict[str, str] | None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [_which("docker") or "docker", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**self.env, **(env or {})},
        )

    def run(
        self,
        *args: str,
        check: bool = True,
        timeout: float = 120.0,
        env: dict[str, str] | None = None,
    ) -> tuple[int, str]:
        """``docker ARGS`` against this daemon: (exit status, stdout and stderr together)."""
        proc = self._exec(args, timeout, env)
        out = proc.stdout + proc.stderr
        if check and proc.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)} failed (rc {proc.returncode}): {out}")
        return proc.returncode, out

    def docker(self, *args: str, timeout: float = 120.0, env: dict[str, str] | None = None) -> str:
        """``docker ARGS``' standard output (not its warnings on stderr); AssertionError with
        both when it fails."""
        proc = self._exec(args, timeout, env)
        if proc.returncode != 0:
            raise AssertionError(
                f"docker {' '.join(args)} failed (rc {proc.returncode}): {proc.stdout}{proc.stderr}"
            )
        return proc.stdout

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    @contextlib.contextmanager
    def swarm(self, listen_port: int, data_path_port: int) -> Iterator[str]:
        """A one-node swarm on 127.0.0.1 (its node id), left with --force at the end. Its
        docker_gwbridge is made first, on GWBRIDGE_SUBNET (the daemon's DNS address is on it)."""
        self.docker(
            "network",
            "create",
            "--subnet",
            GWBRIDGE_SUBNET,
            "--gateway",
            GWBRIDGE_GATEWAY,
            "--opt",
            "com.docker.network.bridge.name=docker_gwbridge",
            "--opt",
            "com.docker.network.bridge.enable_icc=false",
            "--opt",
            "com.docker.network.bridge.enable_ip_masquerade=false",
            "docker_gwbridge",
        )
        dns = NxdomainServer(GWBRIDGE_GATEWAY)
        try:
            self.docker(
                "swarm",
                "init",
                "--advertise-addr",
                f"127.0.0.1:{listen_port}",
                "--listen-addr",
                f"127.0.0.1:{listen_port}",
                "--data-path-port",
                str(data_path_port),
            )
            try:
                yield self.docker("info", "--format", "{{.Swarm.NodeID}}").strip()
            finally:
                self.run("swarm", "leave", "--force", check=False, timeout=60)
        finally:
            dns.stop()
