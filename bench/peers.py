"""The servers under test: the gateway itself and the peers it is compared with.

Each server runs as its own process on loopback, started fresh for every case, with its
RLIMIT_NOFILE raised (``preexec_fn``) and its stderr kept next to the results. Peers are
configured not to drop: NATS with a 1 GB ``max_pending`` and a long write deadline, Redis
with ``client-output-buffer-limit pubsub 0 0 0`` and no persistence; ZeroMQ needs no
server (the publisher's XPUB socket is it) and the raw limit is the raw sender itself.

``ensure_peers`` finds ``nats-server`` and ``redis-server``. ``make test-deps`` installs
them (as root, from Debian's registry) for ``make test`` and ``make bench-quick``, which never
install anything themselves: a missing peer is skipped with the reason recorded for the results
table. Only a full ``make bench`` (without ``--no-install``), run as root, apt-gets a missing
peer itself.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

from bench.procs import cpu_seconds, free_port, raise_nofile, rss_kib, stop_process
from bench.records import API_KEY, DATASET

__all__ = [
    "GatewayServer",
    "NatsServer",
    "PeerStatus",
    "RedisServer",
    "Server",
    "ensure_peers",
    "versions",
]

REPO: Final = Path(__file__).resolve().parent.parent
PEER_BINARIES: Final = {"nats": "nats-server", "redis": "redis-server"}
APT_PACKAGES: Final = {"nats": "nats-server", "redis": "redis-server"}


@dataclass
class PeerStatus:
    name: str
    available: bool
    version: str = ""
    reason: str = ""
    path: str = ""


def _which(binary: str) -> str:
    found = shutil.which(binary)
    if found:
        return found
    for folder in ("/usr/sbin", "/usr/bin", "/usr/local/bin", "/usr/local/sbin"):
        path = os.path.join(folder, binary)
        if os.access(path, os.X_OK):
            return path
    return ""


def _version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else ""


def ensure_peers(wanted: list[str], install: bool, log: IO[str]) -> dict[str, PeerStatus]:
    """Status of every peer in ``wanted``; installs missing Debian packages if allowed."""
    status: dict[str, PeerStatus] = {}
    missing = [p for p in wanted if p in PEER_BINARIES and not _which(PEER_BINARIES[p])]
    if missing and install and os.geteuid() == 0 and shutil.which("apt-get"):
        packages = [APT_PACKAGES[p] for p in missing]
        print(f"installing {' '.join(packages)} with apt-get ...", file=log, flush=True)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        cmd = ["apt-get", "install", "-y", "--no-install-recommends", *packages]
        done = subprocess.run(
            cmd, env=env, capture_output=True, text=True, check=False, timeout=600
        )
        if done.returncode != 0:
            subprocess.run(
                ["apt-get", "update"], env=env, capture_output=True, check=False, timeout=600
            )
            done = subprocess.run(
                cmd, env=env, capture_output=True, text=True, check=False, timeout=600
            )
        if done.returncode != 0:
            print(f"apt-get failed: {done.stderr.strip()[-500:]}", file=log, flush=True)
    for peer in wanted:
        if peer in PEER_BINARIES:
            path = _which(PEER_BINARIES[peer])
            if not path:
                why = (
                    f"{PEER_BINARIES[peer]} is not installed (run the full bench as root to let "
                    f"it apt-get {APT_PACKAGES[peer]}, or `make test-deps` as root)"
                    if install
                    else f"{PEER_BINARIES[peer]} is not installed (`make test-deps` as root "
                    f"installs it: Debian package {APT_PACKAGES[peer]}); this run installs nothing"
                )
                status[peer] = PeerStatus(peer, False, reason=why)
                continue
            text = _version([path, "--version"])
            found = re.search(r"v=?(\d+\.\d+\.\d+)", text)
            version = f"{PEER_BINARIES[peer]} {found.group(1)}" if found else text
            status[peer] = PeerStatus(peer, True, version=version, path=path)
        elif peer == "zmq":
            try:
                import zmq
            except ImportError:
                status[peer] = PeerStatus(
                    peer, False, reason="pyzmq is not installed (pip install pyzmq)"
                )
                continue
            status[peer] = PeerStatus(
                peer, True, version=f"pyzmq {zmq.__version__} / libzmq {zmq.zmq_version()}"
            )
        else:
            status[peer] = PeerStatus(peer, True)
    return status


def versions() -> dict[str, str]:
    import numpy
    import uvloop
    import zstandard

    out = {
        "python": sys.version.split()[0],
        "uvloop": str(getattr(uvloop, "__version__", "?")),
        "numpy": numpy.__version__,
        "zstandard": zstandard.__version__,
    }
    try:
        from gateway import __version__ as gw_version

        out["gateway"] = gw_version
    except ImportError:
        pass
    return out


@dataclass
class Server:
    """A server process under test (None for zmq/raw, whose publisher is the server)."""

    name: str
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0
    logs: list[Path] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            if self.proc.stdout is not None:
                self.proc.stdout.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with status {proc.returncode} while starting")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"server did not listen on port {port} within {timeout:g} s")


class GatewayServer(Server):
    """``python -m gateway serve`` with a config file that admits enough sessions.

    ``workers`` > 1 starts it with ``--workers N`` (a supervisor and N worker processes
    sharing the client port); 1 is today's single process, started exactly as before
    (no ``--workers`` on its command line). A multi-worker gateway prints
    ``workers N pids=P1,P2,…`` before ``listening …``: ``worker_pids`` keeps them, and
    ``cpu_seconds()`` / ``rss_kib()`` cover the whole process tree.
    """

    ingest_port: int = 0
    metrics_port: int = 0

    def __init__(
        self,
        workdir: Path,
        *,
        max_sessions: int = 30_000,
        extra_config: dict[str, Any] | None = None,
        workers: int = 1,
        tree: Path | None = None,
    ) -> None:
        super().__init__("gateway")
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workdir = workdir
        self.max_sessions = max_sessions
        #: more config keys (a scenario mode may need a gateway option): a dict value is a
        #: table (``{"journal": {"dir": ...}}`` -> ``[journal]``)
        self.extra_config = extra_config or {}
        self.workers = workers
        #: the checkout whose gateway runs (another one: a worktree of an older commit, for
        #: before/after figures with this environment's Python); default this one
        self.tree = tree or REPO
        #: the worker processes' pids, from the ``workers N pids=…`` line (empty for N=1)
        self.worker_pids: list[int] = []

    def command(self, cfg: Path) -> list[str]:
        """The gateway's command line (``--workers N`` only when N > 1)."""
        cmd = [sys.executable, "-m", "gateway", "serve", "--config", str(cfg)]
        if self.workers > 1:
            cmd += ["--workers", str(self.workers)]
        return cmd

    def process_tree(self) -> list[int]:
        """The supervisor, the workers it reported and any other live child of it."""
        if self.proc is None:
            return []
        return process_tree(self.proc.pid, self.worker_pids)

    def cpu_seconds(self) -> float:
        """CPU seconds of the whole gateway: every process of the tree, plus children the
        supervisor has reaped (a restarted worker's CPU is not lost)."""
        if self.proc is None:
            return 0.0
        return tree_cpu_seconds(self.proc.pid, self.worker_pids)

    def cpu_by_process(self) -> dict[str, float]:
        """CPU seconds per process: ``supervisor`` (with the children it reaped) and each
        worker it reported, by its place in the ``workers N pids=`` line (``w0``, ``w1``…)."""
        if self.proc is None:
            return {}
        out = {"supervisor": cpu_seconds(self.proc.pid, with_children=True)}
        for i, pid in enumerate(self.worker_pids):
            out[f"w{i}"] = cpu_seconds(pid)
        return out

    def rss_kib(self) -> int:
        """VmRSS summed over the tree (shared pages, e.g. the ring, count once per process)."""
        return sum(rss_kib(pid) for pid in self.process_tree())

    def stop(self) -> None:
        """SIGTERM the supervisor (it drains its workers: up to shutdown_grace_s and more),
        then make sure no worker it reported is left: a worker still alive after a few
        seconds is SIGKILLed by its pid (checked to still be a gateway process)."""
        if self.proc is None:
            return
        workers = self.process_tree()[1:] if self.workers > 1 else []
        stop_process(self.proc, grace_s=5.0 if self.workers <= 1 else 15.0)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        deadline = time.monotonic() + 5
        while workers and time.monotonic() < deadline:
            workers = [pid for pid in workers if _is_gateway(pid)]
            if workers:
                time.sleep(0.05)
        for pid in workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass

    def start(self) -> GatewayServer:
        cfg = self.workdir / "gateway.toml"
        items = self.extra_config.items()
        extra = "".join(f"{k} = {json.dumps(v)}\n" for k, v in items if not isinstance(v, dict))
        tables = "".join(
            f"[{k}]\n" + "".join(f"{tk} = {json.dumps(tv)}\n" for tk, tv in v.items())
            for k, v in items
            if isinstance(v, dict)
        )
        cfg.write_text(
            'host = "127.0.0.1"\nport = 0\nmetrics_port = 0\nloop = "uvloop"\n'
            f'log_level = "warning"\n{extra}'
            f'[[api_keys]]\nkey = "{API_KEY}"\nmax_sessions = {self.max_sessions}\n'
            f"[limits]\nmax_connections = {self.max_sessions + 1000}\n{tables}"
            f'[feeds]\n"{DATASET}" = "ingest://127.0.0.1:0?backpressure=1"\n'
        )
        log = self.workdir / "gateway.stderr.log"
        self.logs.append(log)
        start_of_log = log.stat().st_size if log.exists() else 0
        with open(log, "ab") as err:
            env = None if self.tree == REPO else dict(os.environ, PYTHONPATH=str(self.tree))
            self.proc = subprocess.Popen(
                self.command(cfg),
                cwd=self.tree,
                env=env,
                stdout=subprocess.PIPE,
                stderr=err,
                preexec_fn=raise_nofile,
            )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 20 + 5 * self.workers
        try:
            while time.monotonic() < deadline:
                line = self.proc.stdout.readline().decode()
                if not line:
                    raise RuntimeError(
                        f"gateway exited while starting (see {log})"
                        + self._why_not_workers(log, start_of_log)
                    )
                if line.startswith("ingest "):
                    self.ingest_port = int(startup_fields(line)["port"])
                elif line.startswith("workers "):
                    self.worker_pids = parse_workers_line(line, self.workers)
                elif line.startswith("listening "):
                    fields = startup_fields(line)
                    self.port = int(fields["port"])
                    self.metrics_port = int(fields.get("metrics_port", 0))
                    break
            if not self.port or not self.ingest_port:
                raise RuntimeError("gateway did not report its ports")
            if self.workers > 1 and not self.worker_pids:
                raise RuntimeError(
                    f"gateway started with --workers {self.workers} printed no "
                    "'workers N pids=...' line before 'listening': it is not running "
                    "worker processes (is --workers implemented in this checkout?)"
                )
        except BaseException:
            self.stop()
            raise
        return self

    def _why_not_workers(self, log: Path, start: int) -> str:
        """For N > 1: the gateway's own complaint (e.g. an unknown ``--workers``)."""
        if self.workers <= 1:
            return ""
        try:
            with open(log, "rb") as f:
                f.seek(start)
                tail = f.read().decode(errors="replace").strip().splitlines()
        except OSError:
            tail = []
        last = tail[-1] if tail else ""
        return (
            f"; with --workers {self.workers}: {last[:300]}"
            if last
            else f"; --workers {self.workers} may not be implemented in this checkout"
        )

    def wait_feed_up(self, timeout: float = 10.0) -> None:
        """Until /readyz says the feed is up (the publisher's Metadata was processed)."""
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.metrics_port}/readyz"
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    body = json.loads(resp.read())
            except OSError as exc:
                body = getattr(exc, "read", lambda: b"{}")()
                try:
                    body = json.loads(body or b"{}")
                except ValueError:
                    body = {}
            if str(body.get("feeds", {}).get(DATASET, "")).startswith("up"):
                return
            time.sleep(0.02)
        raise RuntimeError("gateway feed did not come up after the publisher connected")


def _is_gateway(pid: int) -> bool:
    """``pid`` is alive (not a zombie) and runs the gateway."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z" and b"gateway" in cmdline


def startup_fields(line: str) -> dict[str, str]:
    """``listening host=127.0.0.1 port=5 metrics_port=6`` -> {"host": …, "port": "5", …}."""
    return dict(t.split("=", 1) for t in line.split() if "=" in t)


def parse_workers_line(line: str, expected: int | None = None) -> list[int]:
    """The pids of ``workers N pids=P1,P2,…`` (the supervisor's start-up line).

    Raises ValueError when the line is malformed, or names another count of workers than
    ``expected`` (or than the pids it lists).
    """
    parts = line.split()
    if len(parts) < 3 or parts[0] != "workers" or not parts[1].isdigit():
        raise ValueError(f"not a 'workers N pids=...' line: {line.strip()!r}")
    n = int(parts[1])
    pids_text = startup_fields(line).get("pids", "")
    try:
        pids = [int(p) for p in pids_text.split(",") if p]
    except ValueError:
        raise ValueError(f"bad pids in {line.strip()!r}") from None
    if len(pids) != n or (expected is not None and n != expected):
        raise ValueError(
            f"{line.strip()!r}: {len(pids)} pids for {n} workers"
            + (f" (asked for {expected})" if expected is not None else "")
        )
    return pids


def children_of(pid: int) -> list[int]:
    """Live child pids of ``pid`` (from /proc/<pid>/task/*/children where the kernel has
    it, else by scanning /proc for a matching parent)."""
    found: list[int] = []
    tasks = Path(f"/proc/{pid}/task")
    readable = False
    try:
        for task in tasks.iterdir():
            try:
                found += [int(c) for c in (task / "children").read_text().split()]
                readable = True
            except OSError:
                continue
    except OSError:
        return []
    if readable:
        return sorted(set(found))
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return sorted(found)


def process_tree(root: int, known: list[int] | tuple[int, ...] = ()) -> list[int]:
    """``root``, the ``known`` pids still alive and every other live child of ``root``."""
    pids = [root]
    for pid in [*known, *children_of(root)]:
        if pid not in pids and Path(f"/proc/{pid}").exists():
            pids.append(pid)
    return pids


def tree_cpu_seconds(root: int, known: list[int] | tuple[int, ...] = ()) -> float:
    """utime+stime of ``root`` and its live children, plus the cutime+cstime of ``root``
    (children it has already reaped): a difference of two readings stays the CPU the
    tree used in between even when a worker died and was reaped meanwhile."""
    total = cpu_seconds(root, with_children=True)
    for pid in process_tree(root, known)[1:]:
        total += cpu_seconds(pid)
    return total


class NatsServer(Server):
    def __init__(self, workdir: Path, binary: str) -> None:
        super().__init__("nats")
        self.workdir = workdir
        self.binary = binary

    def start(self) -> NatsServer:
        self.port = free_port()
        cfg = self.workdir / "nats.conf"
        cfg.write_text(
            f"listen: 127.0.0.1:{self.port}\n"
            "max_pending: 1073741824\n"  # 1 GB per connection before 'slow consumer'
            'write_deadline: "60s"\n'
            "max_connections: 100000\n"
            "max_payload: 1048576\n"
            'ping_interval: "10m"\n'
        )
        log = self.workdir / "nats.log"
        self.logs.append(log)
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [self.binary, "-c", str(cfg)],
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=raise_nofile,
            )
        _wait_port(self.port, self.proc)
        return self


class RedisServer(Server):
    def __init__(self, workdir: Path, binary: str) -> None:
        super().__init__("redis")
        self.workdir = workdir
        self.binary = binary

    def start(self) -> RedisServer:
        self.port = free_port()
        log = self.workdir / "redis.log"
        self.logs.append(log)
        args = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "no",
            "--client-output-buffer-limit",
            "pubsub 0 0 0",
            "--client-output-buffer-limit",
            "normal 0 0 0",
            "--maxclients",
            "30000",
            "--tcp-backlog",
            "4096",
            "--daemonize",
            "no",
            "--dir",
            str(self.workdir),
            "--logfile",
            str(log),
        ]
        self.proc = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=raise_nofile
        )
        _wait_port(self.port, self.proc)
        return self
