"""The ``relay`` scenario: fan-out from an edge gateway fed by a primary gateway, beside
its physical analogue and beside the gateway serving the same sessions directly.

An *edge* is a gateway whose feed is ``lsg://PRIMARY?schemas=mbp-1&key_file=F``: it is a
client of the *primary* (a gateway fed by the bench's publisher through its
``ingest://…?backpressure=1`` port) and serves the bench's subscribers itself. Every record
makes one more hop than with the primary alone, and on one machine that hop shares the
cores with everything else, so serving the sessions directly is not the comparison for
throughput. Parts (one case each, interleaved ``repeats`` times so that a drift of the
machine touches every part alike):

* ``raw-2hop`` (system ``raw``): the raw sender (the raw limit's epoll sender with one peer)
  → a *bare relay* process (``bare_relay_main``: one epoll loop that reads the sender's
  socket and writes every chunk it read to N receivers, pausing the sender while a receiver
  has over ``HIGH_WATER`` queued: what relaying costs at the least) → N raw receivers: the
  two-hop limit.
* ``edge`` (system ``gateway``): publisher → primary → edge → the same N receivers (DBN
  sessions of everything, ``slow_reader_behavior=warn``), for the same time; the edge's
  feed has ``backpressure=1`` (lossless, like the primary's ingest and the bare relay). Throughput =
  delivered records ÷ (last record at the last subscriber − first at any), as in ``fanout``.
  Target: edge ≥ 80 % of ``raw-2hop`` (ratio of the medians).
* ``direct-latency``: the ``latency`` scenario's case (gateway fed by the publisher, N
  sessions, ``rate`` records/s, every write stamped with ``time.perf_counter_ns()`` in the
  records' ``ts_recv``, the probe — the session that connected last, served last — stamps
  its receive time).
* ``edge-latency``: the same publisher, rate, sessions and probe, through primary → edge.
  The stamps travel in the records, so the latency is publisher write → probe's recv across
  both gateways. Targets: the medians' p50 and p99 differences (edge − direct) at most
  100 µs and 1 ms.

``--quick`` (only with ``--scenarios relay``: the default quick run leaves it out) runs
N = 3, one repeat, short: a correctness run.
"""

from __future__ import annotations

import dataclasses
import select
import socket
import subprocess
import time
import urllib.request
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from bench.peers import GatewayServer, startup_fields
from bench.procs import MachineCpu, cpu_seconds, raise_nofile, rss_kib
from bench.publishers import PublishJob, PublishReport
from bench.records import API_KEY, DATASET, REC_LEN
from bench.subscribers import ConnSpec, ReadyReport

if TYPE_CHECKING:
    from bench.scenarios import Harness, Plan, _Child

__all__ = [
    "HIGH_WATER",
    "RELAY_PARTS",
    "EdgeServer",
    "RelayBench",
    "RelayPlan",
    "bare_relay_main",
    "relay_cases",
    "relay_plan",
]

#: the parts, in the order each repeat runs them: (part, system)
RELAY_PARTS: Final = (
    ("raw-2hop", "raw"),
    ("edge", "gateway"),
    ("direct-latency", "gateway"),
    ("edge-latency", "gateway"),
)
#: the bare relay stops reading its upstream while a receiver has this much queued, and
#: reads again once every receiver is under LOW_WATER (the gateway's write_high_water /
#: write_low_water defaults)
HIGH_WATER: Final = 1 << 20
LOW_WATER: Final = 256 << 10
#: the bare relay's largest read from its upstream
READ_MAX: Final = 1 << 20
#: relay counters scraped from the edge's /metrics after each case
RELAY_METRICS: Final = (
    "gateway_relay_upstream_up",
    "gateway_relay_reconnects_total",
    "gateway_relay_gaps_total",
    "gateway_relay_records_deduplicated_total",
    "gateway_feed_records_in_total",
)


@dataclass(frozen=True)
class RelayPlan:
    n: int
    repeats: int
    #: seconds of publishing per throughput case
    duration_s: float
    rate: int
    latency_duration_s: float
    #: the edge's relay feed with ``backpressure=1``: lossless toward its sessions (it
    #: stops reading the primary while one is over its high-water mark), as the primary's
    #: ``ingest://…?backpressure=1`` and the bare relay are; the pressure reaches the
    #: publisher through the primary's lossless ingest
    edge_backpressure: bool = True
    #: pace the edge throughput case's publisher on the subscribers' progress so that at
    #: most this many bytes per subscriber are in flight, and at most the harness's
    #: FLIGHT_BUDGET across all of them (0: no pacing). Only needed for an edge without
    #: ``backpressure=1`` (a live relay never waits for its sessions, and buffers what they
    #: cannot take up to the slow-reader hard cap, 32 MiB, then cuts them): 16 MiB then
    edge_window_bytes: int = 0
    schemas: str = "mbp-1"
    #: the bare relay's largest read from the raw sender, and how much it queues for one
    #: receiver before it stops reading the sender (it reads again under a quarter of it)
    raw_read_max: int = READ_MAX
    raw_high_water: int = HIGH_WATER
    #: seconds to wait for the edge's relay feed to come up
    edge_up_timeout_s: float = 30.0


def relay_plan(plan: Plan, repeats: int | None = None) -> RelayPlan:
    if plan.quick:
        return RelayPlan(
            n=3,
            repeats=repeats or 1,
            duration_s=plan.duration_s,
            rate=50_000,
            latency_duration_s=plan.latency_duration_s,
        )
    return RelayPlan(
        n=100,
        repeats=repeats or 3,
        duration_s=plan.duration_s,
        rate=50_000,
        latency_duration_s=plan.latency_duration_s,
    )


# --- the bare relay: the physical analogue ----------------------------------------------


def bare_relay_main(
    ctrl: Connection,
    upstream_port: int,
    receivers: int,
    read_max: int = READ_MAX,
    high_water: int = HIGH_WATER,
) -> None:
    """A process that relays bytes: it listens (reports ``("listening", port)``),
    connects to ``upstream_port``, accepts ``receivers`` connections, then reads the
    upstream and writes every chunk it read to every receiver, in order, lossless: a
    receiver that cannot take a chunk whole keeps the rest queued (memoryviews of the
    chunk: no copies), and the upstream is not read while any receiver has over
    HIGH_WATER queued. It keeps its sockets open until told ``("exit",)``, then reports
    ``("done", counters)``."""
    raise_nofile()
    low_water = high_water * LOW_WATER // HIGH_WATER
    stats = {"chunks": 0, "bytes_in": 0, "sends": 0, "pauses": 0, "receivers_failed": 0}
    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(4096)
    lsock.setblocking(False)
    ctrl.send(("listening", lsock.getsockname()[1]))
    up = socket.create_connection(("127.0.0.1", upstream_port), timeout=30)
    up.setblocking(False)
    up_fd = up.fileno()
    ctrl_fd = ctrl.fileno()
    l_fd = lsock.fileno()
    ep = select.epoll()
    ep.register(ctrl_fd, select.EPOLLIN)
    ep.register(l_fd, select.EPOLLIN)
    outs: list[socket.socket] = []
    slot: dict[int, int] = {}  # receiver fd -> its index in outs / queues / queued
    queues: list[deque[memoryview]] = []
    queued: list[int] = []
    over: set[int] = set()
    reading = False
    running = True
    eof = False
    EPOLLOUT = select.EPOLLOUT

    def drop(i: int) -> None:
        s = outs[i]
        if s.fileno() < 0:
            return
        stats["receivers_failed"] += 1
        try:
            ep.unregister(s.fileno())
        except (OSError, ValueError):
            pass
        s.close()
        queues[i].clear()
        queued[i] = 0
        over.discard(i)

    try:
        while running:
            for fd, events in ep.poll(0.1):
                if fd == up_fd:
                    try:
                        data = up.recv(read_max)
                    except BlockingIOError:
                        continue
                    if not data:
                        eof = True
                        ep.unregister(up_fd)
                        reading = False
                        continue
                    stats["chunks"] += 1
                    stats["bytes_in"] += len(data)
                    mv = memoryview(data)
                    size = len(mv)
                    for i, s in enumerate(outs):
                        q = queues[i]
                        if q:
                            q.append(mv)
                            queued[i] += size
                        else:
                            try:
                                sent = s.send(mv)
                                stats["sends"] += 1
                            except BlockingIOError:
                                sent = 0
                            except OSError:
                                drop(i)
                                continue
                            if sent == size:
                                continue
                            q.append(mv[sent:])
                            queued[i] += size - sent
                            ep.modify(s.fileno(), EPOLLOUT)
                        if queued[i] > high_water:
                            over.add(i)
                    if over and reading:
                        ep.modify(up_fd, 0)
                        reading = False
                        stats["pauses"] += 1
                elif fd == ctrl_fd:
                    if ctrl.poll() and ctrl.recv()[0] == "exit":
                        running = False
                elif fd == l_fd:
                    while len(outs) < receivers:
                        try:
                            s, _ = lsock.accept()
                        except BlockingIOError:
                            break
                        s.setblocking(False)
                        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                        slot[s.fileno()] = len(outs)
                        outs.append(s)
                        queues.append(deque())
                        queued.append(0)
                        ep.register(s.fileno(), 0)
                    if len(outs) >= receivers and not reading and not eof:
                        ep.unregister(l_fd)
                        ep.register(up_fd, select.EPOLLIN)
                        reading = True
                else:
                    i = slot[fd]
                    if events & (select.EPOLLHUP | select.EPOLLERR):
                        drop(i)  # a receiver that went away
                        continue
                    q = queues[i]
                    s = outs[i]
                    while q:
                        head = q[0]
                        try:
                            sent = s.send(head)
                            stats["sends"] += 1
                        except BlockingIOError:
                            break
                        except OSError:
                            drop(i)
                            break
                        queued[i] -= sent
                        if sent < len(head):
                            q[0] = head[sent:]
                            break
                        q.popleft()
                    if not q and s.fileno() >= 0:
                        ep.modify(fd, 0)
                    if i in over and queued[i] <= low_water:
                        over.discard(i)
                        if not over and not reading and not eof:
                            ep.modify(up_fd, select.EPOLLIN)
                            reading = True
    finally:
        stats["receivers"] = len(outs)
        try:
            ctrl.send(("done", stats))
        except OSError:
            pass
        for s in outs:
            s.close()
        up.close()
        lsock.close()
        ep.close()


@dataclass
class BareRelay:
    """The bare relay as a child process of the harness."""

    upstream_port: int
    receivers: int
    read_max: int = READ_MAX
    high_water: int = HIGH_WATER
    proc: Any = None
    conn: Connection | None = None
    port: int = 0
    stats: dict[str, int] = dataclasses.field(default_factory=dict)

    def start(self) -> BareRelay:
        from bench.scenarios import CTX

        parent, child = CTX.Pipe()
        self.proc = CTX.Process(
            target=bare_relay_main,
            args=(child, self.upstream_port, self.receivers, self.read_max, self.high_water),
            daemon=True,
        )
        self.proc.start()
        child.close()
        self.conn = parent
        if not parent.poll(30):
            self.stop()
            raise RuntimeError("the bare relay did not start listening within 30 s")
        msg = parent.recv()
        self.port = int(msg[1])
        return self

    @property
    def pid(self) -> int:
        return int(self.proc.pid) if self.proc is not None else 0

    def stop(self) -> None:
        if self.proc is None or self.conn is None:
            return
        try:
            self.conn.send(("exit",))
            if self.conn.poll(10):
                msg = self.conn.recv()
                if msg[0] == "done":
                    self.stats = msg[1]
        except (OSError, EOFError):
            pass
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.terminate()  # only this child, by its PID
            self.proc.join(5)
        self.conn.close()
        self.conn = None


# --- the edge gateway -------------------------------------------------------------------


class EdgeServer(GatewayServer):
    """``gateway serve`` whose one feed (named as the bench's dataset) is a relay of the
    primary at ``upstream_port``: ``lsg://127.0.0.1:PORT?schemas=…&key_file=F``, the
    bench's API key in F. Its clients get the same config as the primary's (the bench's
    key, 30k sessions)."""

    def __init__(
        self,
        workdir: Path,
        upstream_port: int,
        schemas: str = "mbp-1",
        backpressure: bool = True,
    ) -> None:
        super().__init__(workdir)
        self.upstream_port = upstream_port
        self.schemas = schemas
        self.backpressure = backpressure

    def feed_uri(self, key_file: Path) -> str:
        uri = f"lsg://127.0.0.1:{self.upstream_port}?schemas={self.schemas}&key_file={key_file}"
        return uri + ("&backpressure=1" if self.backpressure else "")

    def start(self) -> EdgeServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        key_file = self.workdir / "upstream.key"
        key_file.write_text(API_KEY + "\n")
        key_file.chmod(0o600)
        cfg = self.workdir / "gateway.toml"
        cfg.write_text(
            'host = "127.0.0.1"\nport = 0\nmetrics_port = 0\nloop = "uvloop"\n'
            'log_level = "warning"\n'
            f'[[api_keys]]\nkey = "{API_KEY}"\nmax_sessions = {self.max_sessions}\n'
            f"[limits]\nmax_connections = {self.max_sessions + 1000}\n"
            f'[feeds]\n"{DATASET}" = "{self.feed_uri(key_file)}"\n'
        )
        log = self.workdir / "gateway.stderr.log"
        self.logs.append(log)
        with open(log, "ab") as err:
            self.proc = subprocess.Popen(
                self.command(cfg),
                cwd=self.tree,
                stdout=subprocess.PIPE,
                stderr=err,
                preexec_fn=raise_nofile,
            )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 20
        try:
            while time.monotonic() < deadline:
                line = self.proc.stdout.readline().decode()
                if not line:
                    tail = log.read_text(errors="replace").strip().splitlines()[-1:]
                    raise RuntimeError(
                        f"edge gateway exited while starting (see {log})"
                        + (f": {tail[0][:300]}" if tail else "")
                    )
                if line.startswith("listening "):
                    fields = startup_fields(line)
                    self.port = int(fields["port"])
                    self.metrics_port = int(fields.get("metrics_port", 0))
                    break
            if not self.port:
                raise RuntimeError("edge gateway did not report its port")
        except BaseException:
            self.stop()
            raise
        return self

    def scrape(self) -> dict[str, float]:
        """The relay feed's counters from /metrics (non-zero samples)."""
        if not self.metrics_port:
            return {}
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                text = resp.read().decode()
        except OSError:
            return {}
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith(RELAY_METRICS):
                name, _, value = line.rpartition(" ")
                try:
                    if float(value):
                        out[name] = float(value)
                except ValueError:
                    continue
        return out


# --- the scenario -----------------------------------------------------------------------


class RelayBench:
    def __init__(self, harness: Harness, plan: RelayPlan) -> None:
        self.h = harness
        self.plan = plan

    def _dir(self, name: str) -> Path:
        path = self.h.workdir / f"relay-{name}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    # parts

    def raw_two_hop(self) -> dict[str, Any]:
        res = self._chain("raw", self.plan.n, 0)
        return res

    def edge(self) -> dict[str, Any]:
        return self._chain("edge", self.plan.n, 0)

    def direct_latency(self) -> dict[str, Any]:
        plan = self.plan
        res = self.h.latency("gateway", plan.n, plan.rate, duration_s=plan.latency_duration_s)
        res["path"] = "publisher -> gateway -> subscribers"
        return res

    def edge_latency(self) -> dict[str, Any]:
        return self._chain("edge", self.plan.n, self.plan.rate)

    # one case through two hops

    def _chain(self, kind: str, n: int, rate: int) -> dict[str, Any]:
        """One streaming case through two servers: ``kind`` "raw" (raw sender → bare relay
        → raw receivers) or "edge" (publisher → primary → edge → DBN sessions); ``rate``
        records/s with stamps (a latency case) or 0 (throughput, for the plan's duration)."""
        from bench.scenarios import CTX, FLIGHT_BUDGET, _shut_down

        h = self.h
        plan = self.plan
        system = "raw" if kind == "raw" else "gateway"
        every = max(1, rate // 10_000) if rate else 0
        cfg = h.worker_config(system, n, latency_every=every)
        progress = CTX.RawArray("q", max(n, 1))
        specs = [ConnSpec(i, system, 0, probe=(i == n - 1)) for i in range(n)]
        duration = plan.latency_duration_s if rate else plan.duration_s
        pub: _Child | None = None
        workers: list[_Child] = []
        servers: list[Any] = []  # stopped last, in reverse
        measured: dict[str, Callable[[], float]] = {}
        rss: dict[str, Callable[[], int]] = {}
        edge: EdgeServer | None = None
        result: dict[str, Any] = {}
        try:
            if kind == "raw":
                job = PublishJob("raw", duration_s=duration, expect_peers=1)
                pub, up_port = h.start_publisher(job, progress)
                relay = BareRelay(up_port, n, plan.raw_read_max, plan.raw_high_water).start()
                servers.append(relay)
                port = relay.port
                measured["relay"] = lambda: cpu_seconds(relay.pid)
                measured["sender"] = lambda: cpu_seconds(pub.proc.pid) if pub else 0.0
                rss["relay"] = lambda: rss_kib(relay.pid)
                path = "raw sender -> bare relay -> receivers"
            else:
                primary = GatewayServer(self._dir("primary")).start()
                servers.append(primary)
                window = 0
                if not rate and plan.edge_window_bytes:
                    per_sub = min(plan.edge_window_bytes, FLIGHT_BUDGET // max(n, 1))
                    window = max(1, per_sub // REC_LEN)
                job = PublishJob(
                    "gateway",
                    port=primary.ingest_port,
                    duration_s=duration,
                    rate=float(rate),
                    warmup_s=min(0.5, duration * 0.2) if rate else 0.0,
                    expect_peers=n,
                    window=window,
                )
                pub, _ = h.start_publisher(job, progress)
                primary.wait_feed_up()
                edge = EdgeServer(
                    self._dir("edge"), primary.port, plan.schemas, plan.edge_backpressure
                ).start()
                servers.append(edge)
                edge.wait_feed_up(timeout=plan.edge_up_timeout_s)
                port = edge.port
                measured["edge"] = edge.cpu_seconds
                measured["primary"] = primary.cpu_seconds
                rss["edge"] = edge.rss_kib
                rss["primary"] = primary.rss_kib
                path = "publisher -> primary -> edge (lsg://) -> subscribers"
                result["window_records"] = window
                result["edge_feed"] = edge.feed_uri(Path("KEY_FILE"))
            specs = [dataclasses.replace(s, port=port) for s in specs]
            workers = h.start_workers(cfg, progress)
            first, last = specs[:-1], specs[-1:]
            ready = h.connect(workers, first, 64) if first else ReadyReport()
            more = h.connect(workers[:1], last, 1)
            ready.ready.update(more.ready)
            ready.failed.update(more.failed)
            h.check_ready(ready, progress)
            cpu0 = {k: f() for k, f in measured.items()}
            mach0 = MachineCpu.read()
            pub.send(("go",))
            budget = duration + (60 if rate else 120)
            report: PublishReport = pub.recv(budget, "the publisher to finish")[1]
            expected = h.expected_counts(specs, report.records, False)
            results = h.collect(workers, expected, 30 + n * 0.02)
            cpu1 = {k: f() for k, f in measured.items()}
            mach1 = MachineCpu.read()
            result.update(h.summarize(specs, expected, results, ready, report))
            delivered = result["delivered"]
            cpu = {k: round(cpu1[k] - cpu0[k], 3) for k in measured}
            server = "relay" if kind == "raw" else "edge"
            result.update(
                path=path,
                cpu_s=cpu,
                server_cpu_s=cpu[server],
                rss_kib={k: f() for k, f in rss.items()},
                machine_busy=round(mach1.since(mach0), 3),
                paced_s=round(report.paced_s, 3),
                publisher_error=report.error,
                publisher_notes=report.notes,
            )
            if delivered:
                result["server_cpu_s_per_m"] = round(cpu[server] / delivered * 1e6, 4)
                result["cpu_s_per_m"] = {k: round(v / delivered * 1e6, 4) for k, v in cpu.items()}
            if rate:
                result["rate"] = rate
                achieved = result.get("achieved_rate", 0)
                result["overloaded"] = bool(achieved and achieved < 0.95 * rate)
            if edge is not None:
                result["edge_metrics"] = edge.scrape()
                if edge.proc is not None and edge.proc.poll() is not None:
                    result["notes"].append(f"edge exited with {edge.proc.returncode}")
                    result["loss_free"] = False
        finally:
            _shut_down(workers, pub, _Servers(servers))
            for s in servers:
                if isinstance(s, BareRelay) and s.stats:
                    result["relay_stats"] = s.stats
        return result


@dataclass
class _Servers:
    """Stops several servers, the last started first (the edge before its primary)."""

    servers: list[Any]

    def stop(self) -> None:
        for s in reversed(self.servers):
            s.stop()


def relay_cases(
    h: Harness, systems: list[str], repeats: int | None = None
) -> list[tuple[str, int, dict[str, Any], Callable[[], dict[str, Any]]]]:
    """(system, n, params, run) for every case of the scenario: each part once per
    repeat, the parts interleaved. ``raw-2hop`` needs ``raw`` in ``systems``, the others
    ``gateway``."""
    plan = relay_plan(h.plan, repeats)
    rb = RelayBench(h, plan)
    runs: dict[str, Callable[[], dict[str, Any]]] = {
        "raw-2hop": rb.raw_two_hop,
        "edge": rb.edge,
        "direct-latency": rb.direct_latency,
        "edge-latency": rb.edge_latency,
    }
    out = []
    for rep in range(plan.repeats):
        for part, system in RELAY_PARTS:
            if system not in systems:
                continue
            params: dict[str, Any] = {"part": part, "repeat": rep}
            if part.endswith("latency"):
                params["rate"] = plan.rate
            out.append((system, plan.n, params, runs[part]))
    return out
