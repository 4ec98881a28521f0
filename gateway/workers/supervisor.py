"""The supervisor of ``gateway serve --workers N``: one process owning the feeds' sources,
the journal, the ingest listeners, the status/metrics port and the strobe; it writes every
published chunk once into a shared ring per dataset and keeps N worker processes
(``gateway.workers.worker``) serving the client port.

Start: the journal is opened (and locked), the client port reserved (a socket bound with
SO_REUSEPORT, never listening: port 0 is resolved here, and the port stays ours while
workers restart), the rings created, the feeds built and their sources started, then the
workers spawned, each with a control socketpair and an eventfd; once every worker is Ready
the supervisor prints the ``ingest …`` lines, ``workers N pids=…`` and ``listening …``.

A worker starts in two steps: ``Init`` (config, slot, rings; no feed state) -> the worker
imports and builds its state, then says ``Prepared`` -> only then is its slot made live in
every ring, at the head, with each feed's snapshot and journal seq as of there (one loop
step), sent in ``Start`` -> the worker restores, reads, listens and says ``Ready``. A worker
that is booting (imports take a second or two) therefore never holds the writer: a busy
feed does not pause every worker's sessions while a crashed one comes back.

Faults: each worker is watched through a pidfd; one that dies (even by SIGKILL) is logged,
its ring slot and shared-limits row cleared, and it is restarted after a backoff (doubling
while restarts keep dying young). A worker whose loop is stuck while the ring is full is
killed and restarted. SIGTERM/SIGINT drain every worker (each as ``Gateway.shutdown``),
then the sources stop, the journal closes and the rings are unlinked. SIGHUP reads the
config again and forwards it to every worker.

The supervisor is the gateway's ``StatusSource`` (``snapshot``/``totals``/``ready``/
``strobe``): /metrics, /status, /readyz and the probe see one gateway.

Why one module: start, restart, the status answers and shutdown all read and write the
same table of worker slots (process, pidfd, control channel, readiness, last figures).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import msgspec
from prometheus_client import Counter as PromCounter

from gateway import __version__, transport
from gateway.aio import cancel_and_wait
from gateway.config import Config, worker_count, workers_settings
from gateway.errors import FeedError, GatewayError
from gateway.feeds import Feed, Source, build_source, parse_feed_uri
from gateway.feeds.readiness import FeedReadiness
from gateway.journal import DatasetJournal, JournalStore
from gateway.journal_setup import attach_feed, open_store
from gateway.metrics import Metrics
from gateway.ops.http import StatusServer
from gateway.ops.logs import print_error, setup_logging
from gateway.ops.probe import Prober, start_strobe
from gateway.ops.snapshot import (
    GatewayInfo,
    GatewaySnapshot,
    ReplaySnapshot,
    SessionsSnapshot,
    Totals,
    WorkersInfo,
    feed_snapshot,
)
from gateway.workers.aggregate import Family, Retired, merge_snapshots, merged_registry
from gateway.workers.control import (
    Blocked,
    ControlChannel,
    FeedStart,
    Init,
    Message,
    Prepared,
    Ready,
    Reload,
    Start,
    Stats,
    describe,
    open_channel,
)
from gateway.workers.limits import SharedLimits
from gateway.workers.ring import CHUNK, Ring, RingWriter, remove_stale
from gateway.workers.sink import RingSink, Waker

__all__ = ["Supervisor", "WorkerProc", "remove_stale_dirs", "run", "start_seq"]

log = logging.getLogger("gateway.workers")

#: how often the supervisor checks its workers and notes its feeds' states
TICK_S = 0.5
#: how long every worker has to say Ready at start-up
START_TIMEOUT_S = 60.0
#: a restarted worker that dies sooner than this doubles the next backoff
YOUNG_S = 10.0
#: the longest backoff between restarts
MAX_BACKOFF_S = 5.0
#: after shutdown_grace_s, how much longer draining workers get before SIGKILL
KILL_AFTER_S = 5.0
#: the supervisor's private temporary directory: ``lsg-sup-<pid>-<random>``
PRIVATE_PREFIX = "lsg-sup-"


@dataclass
class WorkerProc:
    """One worker slot and the process serving it now (if any)."""

    slot: int
    name: str
    proc: subprocess.Popen[bytes] | None = None
    pidfd: int = -1
    #: written by the ring sink when a ring has new entries; kept across restarts
    eventfd: int = -1
    channel: ControlChannel | None = None
    ready: bool = False
    report: str = ""
    stats: Stats | None = None
    #: its metric families from the last Stats
    families: list[Family] | None = None
    #: SIGKILLed as stuck (reaped and restarted as any death)
    killed: bool = False
    #: monotonic time of the last spawn
    started: float = 0.0
    backoff: float = 0.0
    restarts: int = 0
    restart: asyncio.TimerHandle | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None


class Supervisor:
    """The parent of the workers; the gateway as /metrics, /status and /readyz see it."""

    def __init__(self, cfg: Config, loop_name: str = "") -> None:
        self.cfg = cfg
        self.loop_name = loop_name
        self.settings = workers_settings(cfg)
        self.count = worker_count(cfg)
        self.metrics = Metrics()
        self.feeds: dict[str, Feed] = {}
        self.sources: dict[str, Source] = {}
        self.journal: JournalStore | None = None
        self.port = 0
        self.metrics_port = 0
        self.started_at = time.time()
        self.strobe: Prober | None = None
        self.workers = [WorkerProc(slot=i, name=f"w{i}") for i in range(self.count)]
        self.supervisor_cpus, self.worker_cpus = transport.place_workers(
            cfg.transport.cpu_affinity, self.count
        )
        #: before the supervisor pins itself: what every worker may use
        self.allowed_cpus = sorted(os.sched_getaffinity(0))
        self.stopping = False
        self.serving = False
        self.on_listening: Callable[[Any], None] | None = None
        self.reloader: Callable[[], Config] | None = None
        self._reserved: socket.socket | None = None
        #: the supervisor's private temporary directory (0700): the shared limits file
        self._private_dir: str | None = None
        self._http: StatusServer | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._ingest_lines: list[str] = []
        #: whether the feeds are up or within ``feed_grace_s`` (noted every tick)
        self.readiness = FeedReadiness(self.feeds, cfg.feed_grace_s)
        self._start_failed: asyncio.Future[str] | None = None
        self.restarts_total = PromCounter(
            "gateway_worker_restarts",
            "Worker processes restarted after they died (or were killed as stuck)",
            ["worker"],
            registry=self.metrics.registry,
        )
        #: what /metrics serves: the supervisor's registry merged with every worker's
        #: families, and the gateway's figures over the merged snapshot
        self.registry = merged_registry(
            self.metrics.registry,
            self._worker_families,
            self.snapshot,
            per_key=cfg.metrics_per_key,
            created=self.started_at,
        )
        self.rings: dict[str, Ring] = {}
        self.writers: dict[str, RingWriter] = {}
        self.sinks: dict[str, RingSink] = {}
        self.waker = Waker()
        #: the counters of workers that died (the gateway's counters never go down)
        self.retired = Retired()
        self.limits: SharedLimits | None = None

    # --- start ---------------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        transport.raise_fd_limit()
        store = open_store(cfg.journal)  # before any feed: a locked directory stops here
        if store is not None:
            self.journal = store
        self._reserve_port()
        for name in remove_stale():  # left by a supervisor that was killed
            log.info("removed stale shared ring %s", name)
        remove_stale_dirs()
        self._private_dir = tempfile.mkdtemp(prefix=f"{PRIVATE_PREFIX}{os.getpid()}-")
        self.limits = SharedLimits.create(self.count, self._private_dir)
        for dataset, uri in cfg.feeds.items():
            spec = parse_feed_uri(dataset, uri)
            ring = self.rings[dataset] = Ring.create(self.settings.ring_bytes, self.count)
            writer = self.writers[dataset] = RingWriter(ring)
            sink = self.sinks[dataset] = RingSink(
                writer, wake=self.waker.wake, registry=self.metrics.registry
            )
            feed = Feed(dataset, fanout=sink, backpressure=spec.backpressure)
            sink.attach(feed)
            self.feeds[dataset] = feed
            if self.journal is not None:
                attach_feed(self.journal, feed)
            source = build_source(spec, feed, reuse_port=cfg.transport.reuse_port_for(spec.port))
            try:
                await source.start()
            except (OSError, GatewayError) as exc:
                raise FeedError(f"feed {dataset} ({uri}) could not start: {exc}") from exc
            self.sources[dataset] = source
            if spec.kind == "ingest":
                self._ingest_lines.append(
                    f"ingest dataset={dataset} port={getattr(source, 'port', None)}"
                )
        placed = msgspec.structs.replace(
            cfg,
            transport=msgspec.structs.replace(cfg.transport, cpu_affinity=self.supervisor_cpus),
        )
        sockopts = transport.pin_loop_thread(placed, loop)
        report = transport.startup_report(cfg, self.loop_name, [])
        report.socket_options = sockopts
        transport.apply_report(report, cfg, self.metrics)
        self._start_failed = loop.create_future()
        for w in self.workers:
            await self._spawn(w)
        await self._wait_ready()
        self._start_failed = None
        assert self._reserved is not None
        sharing = transport.other_listeners([self._reserved]) - self.count
        if sharing > 0:
            log.warning(
                "port %d is shared with %d other listener(s) (SO_REUSEPORT): new connections "
                "are spread over them until they stop (hand-over: stop the old gateway now)",
                self.port,
                sharing,
            )
        if cfg.metrics_port is not None:
            self._http = StatusServer(self, registry=self.registry)
            self.metrics_port = await self._http.start(
                cfg.metrics_host,
                cfg.metrics_port,
                reuse_port=cfg.transport.reuse_port_for(cfg.metrics_port),
            )
        self.metrics.info.info({"version": __version__, "loop": self.loop_name})
        self.metrics.start_time.set(self.started_at)
        self.serving = True
        self.readiness.note()
        self._ticker = loop.create_task(self._tick())
        if cfg.strobe.enabled:
            self.strobe = await start_strobe(cast(Any, self))
        transport.notify_service_manager(f"READY=1\nMAINPID={os.getpid()}")
        log.info(
            "gateway %s listening on %s:%d (loop=%s, datasets=%s, workers=%d)",
            __version__,
            cfg.host,
            self.port,
            self.loop_name,
            ",".join(self.feeds) or "none",
            self.count,
        )
        for line in self._ingest_lines:
            print(line, flush=True)
        pids = ",".join(str(w.pid) for w in self.workers)
        print(f"workers {self.count} pids={pids}", flush=True)
        print(
            f"listening host={cfg.host} port={self.port} metrics_port={self.metrics_port}",
            flush=True,
        )
        if self.on_listening is not None:
            self.on_listening(self)

    def _reserve_port(self) -> None:
        """Bind (never listen) a SO_REUSEPORT socket to the client address: port 0 is
        chosen here, and the port stays this gateway's while workers come and go."""
        cfg = self.cfg
        infos = socket.getaddrinfo(
            cfg.host or None, cfg.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        family, kind, proto, _, addr = infos[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
        except OSError:
            sock.close()
            raise
        self._reserved = sock
        self.port = sock.getsockname()[1]

    async def _wait_ready(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT_S
        failed = self._start_failed
        assert failed is not None
        while not all(w.ready for w in self.workers):
            if failed.done():
                raise GatewayError(failed.result())
            if loop.time() > deadline:
                slow = ",".join(w.name for w in self.workers if not w.ready)
                raise GatewayError(f"workers {slow} not ready after {START_TIMEOUT_S:.0f} s")
            await asyncio.wait([failed], timeout=0.05)

    # --- workers -------------------------------------------------------------------------

    def _go_live(self, w: WorkerProc) -> dict[str, FeedStart]:
        """Make the slot live in every ring at its head and say what each feed knows up
        to there (in one loop step: nothing is written in between)."""
        out: dict[str, FeedStart] = {}
        for ds, writer in self.writers.items():
            head = writer.head
            writer.set_live(w.slot, True, at=head)
            sink = self.sinks[ds]
            out[ds] = FeedStart(
                snapshot=sink.snapshot(),
                start_pos=head,
                journal_seq=start_seq(sink, self.feeds[ds].journal),
            )
        self.waker.add(w.slot, w.eventfd)
        return out

    def _worker_families(self) -> list[list[Family]]:
        live = [w.families for w in self.workers if w.families is not None and w.alive]
        return [*live, self.retired.families()]

    async def _spawn(self, w: WorkerProc) -> None:
        loop = asyncio.get_running_loop()
        w.restart = None
        if w.eventfd < 0:
            w.eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
        try:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "gateway.workers.worker",
                    "--control-fd",
                    str(child.fileno()),
                ],
                pass_fds=(child.fileno(), w.eventfd),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                env=env,
            )
        except OSError:
            parent.close()
            raise
        finally:
            child.close()
        w.proc, w.ready, w.stats, w.families, w.report = proc, False, None, None, ""
        w.started, w.killed = time.monotonic(), False
        if self.limits is not None:
            self.limits.clear_worker(w.slot)
        init = Init(
            config=self.cfg,
            slot=w.slot,
            name=w.name,
            workers=self.count,
            supervisor_pid=os.getpid(),
            port=self.port,
            loop=self.loop_name,
            eventfd=w.eventfd,
            rings={ds: ring.name for ds, ring in self.rings.items()},
            limits_path=self.limits.path if self.limits is not None else "",
            cpus=self.worker_cpus[w.slot],
            allowed_cpus=self.allowed_cpus,
        )
        try:
            w.pidfd = os.pidfd_open(proc.pid)
            loop.add_reader(w.pidfd, self._reap, w)
            w.channel = await open_channel(
                parent,
                functools.partial(self._on_message, w),
                functools.partial(self._on_channel_closed, w),
            )
        except OSError:
            parent.close()
            proc.kill()
            raise
        w.channel.send(init)
        log.info("worker %s started pid=%d", w.name, proc.pid)

    def _on_message(self, w: WorkerProc, msg: Message) -> None:
        if isinstance(msg, Stats):
            w.stats, w.families = msg, msg.families
        elif isinstance(msg, Blocked):
            feed = self.feeds.get(msg.dataset)
            if feed is not None:
                feed.remote_blocked(w.slot, msg.blocked)
        elif isinstance(msg, Prepared):
            # its slot goes live only now: while it booted it held nothing in the rings
            if w.channel is not None and w.alive and not self.stopping:
                w.channel.send(Start(feeds=self._go_live(w)))
        elif isinstance(msg, Ready):
            w.ready, w.report = True, msg.report
            log.info("worker %s pid=%d ready transport %s", w.name, msg.pid, msg.report)
        else:
            log.warning("worker %s sent an unexpected %s message", w.name, describe(msg))

    def _on_channel_closed(self, w: WorkerProc, exc: Exception | None) -> None:
        w.channel = None

    def _reap(self, w: WorkerProc) -> None:
        """The worker's pidfd is readable: it exited. Clear what it held; restart it."""
        loop = asyncio.get_running_loop()
        loop.remove_reader(w.pidfd)
        os.close(w.pidfd)
        w.pidfd = -1
        proc = w.proc
        assert proc is not None
        rc = proc.wait()
        how = f"signal {-rc}" if rc < 0 else f"code {rc}"
        if w.channel is not None:
            w.channel.close()
            w.channel = None
        self.retired.add(w.families, w.stats.snapshot if w.stats is not None else None)
        was_ready, w.ready, w.stats, w.families = w.ready, False, None, None
        self.waker.remove(w.slot)
        for writer in self.writers.values():
            writer.set_live(w.slot, False)
        if self.limits is not None:
            self.limits.clear_worker(w.slot)
        for sink in self.sinks.values():
            if sink.pending:
                sink.drain()  # the space it held is free now
        for feed in self.feeds.values():
            feed.remote_blocked(w.slot, False)
        if self.stopping:
            log.info("worker %s pid=%d exited (%s)", w.name, proc.pid, how)
            return
        failed = self._start_failed
        if failed is not None and not was_ready:
            if not failed.done():
                failed.set_result(
                    f"worker {w.name} exited during start-up ({how}); see its error above"
                )
            return
        base = self.settings.restart_backoff_s
        young = time.monotonic() - w.started < YOUNG_S
        w.backoff = min(MAX_BACKOFF_S, max(base, w.backoff * 2)) if young else base
        w.restarts += 1
        self.restarts_total.labels(w.name).inc()
        log.warning(
            "worker %s pid=%d exited (%s); restarting in %.1f s",
            w.name,
            proc.pid,
            how,
            w.backoff,
        )
        w.restart = loop.call_later(w.backoff, self._respawn, w)

    def _respawn(self, w: WorkerProc) -> None:
        if self.stopping:
            return
        task = asyncio.get_running_loop().create_task(self._spawn(w))
        task.add_done_callback(functools.partial(self._spawned, w))

    def _spawned(self, w: WorkerProc, task: asyncio.Task[None]) -> None:
        exc = None if task.cancelled() else task.exception()
        if exc is not None and not self.stopping:
            log.error("worker %s could not be restarted: %s; trying again", w.name, exc)
            w.backoff = min(MAX_BACKOFF_S, max(self.settings.restart_backoff_s, w.backoff * 2))
            w.restart = asyncio.get_running_loop().call_later(w.backoff, self._respawn, w)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            self.readiness.note()
            self._kill_stuck()
            if self.journal is not None:
                try:
                    self.journal.maintain()
                except Exception:  # pragma: no cover - the ticker must go on
                    log.exception("journal maintenance failed")

    def _kill_stuck(self) -> None:
        """A worker holding a full ring whose loop has not ticked for ``worker_stall_s``
        is killed (SIGKILL): the only way the writer gets past it. Reaped and restarted
        as any death."""
        stall = self.settings.worker_stall_s
        for ds, writer in self.writers.items():
            for slot in writer.holders():
                w = self.workers[slot]
                age = writer.heartbeat_age_s(slot)
                if age <= stall or not w.alive or w.killed or w.proc is None:
                    continue
                log.warning(
                    "worker %s pid=%d stuck: no heartbeat for %.1f s while the ring of %s "
                    "is full; killing it (SIGKILL)",
                    w.name,
                    w.pid,
                    age,
                    ds,
                )
                w.killed = True
                w.proc.kill()

    # --- StatusSource --------------------------------------------------------------------

    def workers_status(self) -> WorkersInfo:
        """Workers up (Ready and alive) of how many, and the names of those down (dead,
        restarting or still starting)."""
        down = [w.name for w in self.workers if not (w.ready and w.alive)]
        return WorkersInfo(up=self.count - len(down), of=self.count, down=down)

    def ready(self) -> tuple[bool, dict[str, str]]:
        """Started, not stopping, at least one worker Ready and alive (SO_REUSEPORT: the
        kernel hands new connections only to live listeners, so one worker restarting
        does not stop the gateway serving), and every feed connected or within
        ``feed_grace_s`` (as the single-process gateway). ``workers_status`` says which
        workers are down."""
        feeds_ok, detail = self.readiness.check()
        workers_ok = any(w.ready and w.alive for w in self.workers)
        return self.serving and not self.stopping and workers_ok and feeds_ok, detail

    def snapshot(self) -> GatewaySnapshot:
        """The whole gateway: the feeds' input side and the journal from here, sessions
        and output summed over the workers' last reports (``aggregate.merge_snapshots``)."""
        now, mono = time.time(), time.monotonic()
        ready, detail = self.ready()
        own = GatewaySnapshot(
            taken_at=now,
            gateway=GatewayInfo(
                version=__version__,
                started_at=self.started_at,
                uptime_s=round(now - self.started_at, 3),
                ready=ready,
                accepting=self.serving and not self.stopping,
                port=self.port,
                loop=self.loop_name,
            ),
            sessions=SessionsSnapshot(
                total=0, by_dataset={}, connections_open=0, unauthenticated=0
            ),
            feeds=[
                feed_snapshot(feed, detail.get(ds, ""), now, mono)
                for ds, feed in self.feeds.items()
            ],
            connections_unauthenticated=0,
            key_sessions={k.name or f"key-{k.key[-5:]}": 0 for k in self.cfg.api_keys},
            bytes_out={},
            replays=ReplaySnapshot(),
        )
        parts = [w.stats.snapshot for w in self.workers if w.stats is not None and w.alive]
        merged = merge_snapshots(own, parts, retired=self.retired)
        # ready as /readyz says (one worker restarting does not make the gateway unready)
        info = msgspec.structs.replace(merged.gateway, ready=ready, workers=self.workers_status())
        return msgspec.structs.replace(merged, gateway=info)

    def totals(self) -> Totals:
        feeds = self.feeds.values()
        parts = [w.stats.snapshot for w in self.workers if w.stats is not None and w.alive]
        gone = self.retired
        return Totals(
            records_in=sum(f.stats.records_in for f in feeds),
            bytes_in=sum(f.stats.bytes_in for f in feeds),
            records_out=sum(f.records_out for p in parts for f in p.feeds)
            + sum(f.records_out for f in gone.feeds),
            bytes_out=float(sum(sum(p.bytes_out.values()) for p in parts))
            + sum(gone.bytes_out.values()),
        )

    # --- reload and shutdown -------------------------------------------------------------

    def reload(self) -> bool:
        """SIGHUP: read the config again and send it to every worker, which applies its
        API keys and ``[limits]`` as the single-process gateway does (and logs what
        needs a restart). A config that does not validate is refused here."""
        if self.reloader is None:
            log.warning("config reload: no config to read again; nothing changed")
            return False
        try:
            new = self.reloader()
        except GatewayError as exc:
            log.error("config reload refused: %s; keeping the running config", exc)
            return False
        sent = sum(
            1 for w in self.workers if w.channel is not None and w.channel.send(Reload(config=new))
        )
        self.cfg.api_keys, self.cfg.limits = new.api_keys, new.limits
        strobe = self.strobe
        if strobe is not None and new.api_keys:
            strobe_key = self.cfg.strobe.key or new.api_keys[0].key
            if strobe_key != strobe.target.key:
                strobe.target = dataclasses.replace(strobe.target, key=strobe_key)
        log.info("config reloaded keys=%d forwarded_to_workers=%d", len(new.api_keys), sent)
        return True

    async def shutdown(self) -> None:
        """SIGTERM every worker (each drains its sessions within shutdown_grace_s), wait
        for them (then SIGKILL), stop the sources, close the journal, release the port."""
        self.stopping = True
        transport.notify_service_manager("STOPPING=1")
        if self.strobe is not None:
            await self.strobe.stop()
        await self._stop_workers(self.cfg.shutdown_grace_s + KILL_AFTER_S)
        for source in self.sources.values():
            try:
                await source.stop()
            except Exception:  # pragma: no cover - best effort on the way out
                log.exception("stopping a feed failed")
        await cancel_and_wait(self._ticker)
        self.close()
        if self._http is not None:
            await self._http.stop()
        log.info("gateway stopped")

    async def _stop_workers(self, wait_s: float) -> None:
        for w in self.workers:
            if w.restart is not None:
                w.restart.cancel()
                w.restart = None
            if w.alive and w.proc is not None:
                try:
                    w.proc.send_signal(signal.SIGTERM)
                except ProcessLookupError:  # pragma: no cover - reaped meanwhile
                    pass
        deadline = time.monotonic() + wait_s
        while any(w.alive for w in self.workers) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for w in self.workers:
            if w.alive and w.proc is not None:
                log.warning("worker %s pid=%d did not stop in time: SIGKILL", w.name, w.pid)
                w.proc.kill()
        deadline = time.monotonic() + KILL_AFTER_S
        while any(w.alive for w in self.workers) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    def close(self) -> None:
        """Release what the supervisor holds (idempotent): workers still running are
        killed, the journal sealed and unlocked, the port reservation and eventfds closed."""
        for w in self.workers:
            if w.alive and w.proc is not None:
                w.proc.kill()
                w.proc.wait(5)
            if w.eventfd >= 0:
                os.close(w.eventfd)
                w.eventfd = -1
        store, self.journal = self.journal, None
        if store is not None:
            for feed in self.feeds.values():
                feed.journal = None
            store.close()
        for sink in self.sinks.values():
            sink.close()
        for ring in self.rings.values():
            ring.unlink()
            ring.close()
        self.rings.clear()
        if self.limits is not None:
            self.limits.unlink()
            self.limits = None
        if self._private_dir is not None:
            shutil.rmtree(self._private_dir, ignore_errors=True)
            self._private_dir = None
        if self._reserved is not None:
            self._reserved.close()
            self._reserved = None

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        try:
            await self.start()
        except BaseException:
            self.stopping = True
            await self._stop_workers(KILL_AFTER_S)
            for source in self.sources.values():
                try:
                    await source.stop()
                except Exception:  # pragma: no cover - best effort on the way out
                    log.exception("stopping a feed failed")
            raise
        await stop.wait()
        log.info("signal received: shutting down %d workers", self.count)
        await self.shutdown()


def start_seq(sink: RingSink, journal: DatasetJournal | None) -> int:
    """The journal seq of the last chunk before the ring's head (-1: no journal): the
    journal's newest, unless chunks journaled already are still pending in ``sink`` (the
    ring was full): those reach a worker starting at the head after it, so its position is
    the seq before the first of them (a replay handed over there would repeat them)."""
    if journal is None:
        return -1
    queued = next((seq for kind, _, seq, _ in sink.pending if kind == CHUNK and seq), 0)
    return queued - 1 if queued else journal.last_seq


def remove_stale_dirs() -> list[str]:
    """Remove this user's supervisor directories (``lsg-<pid>-*`` in the temporary
    directory) whose supervisor is gone (killed: it could not clean up); their paths."""
    removed = []
    root = tempfile.gettempdir()
    uid = os.getuid()
    for name in os.listdir(root):
        if not name.startswith(PRIVATE_PREFIX):
            continue
        pid = name[len(PRIVATE_PREFIX) :].split("-", 1)[0]
        path = os.path.join(root, name)
        try:
            if not pid.isdigit() or os.lstat(path).st_uid != uid:
                continue
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        except OSError:
            continue
    return removed


def run(
    cfg: Config,
    on_listening: Callable[[Any], None] | None = None,
    reload: Callable[[], Config] | None = None,
) -> int:
    """``gateway serve`` with ``workers`` > 1: the exit status (0, or 2 on a start-up
    error, printed)."""
    setup_logging(cfg.log_format, cfg.log_level)
    sup: Supervisor | None = None
    try:
        loop_name = transport.choose_loop(cfg)
        sup = Supervisor(cfg, loop_name=loop_name)
        sup.on_listening = on_listening
        sup.reloader = reload
        transport.run_loop(sup.serve(), loop_name)
    except GatewayError as exc:
        print_error(str(exc), cfg.log_format)
        return 2
    except OSError as exc:
        print_error(f"cannot listen: {exc}", cfg.log_format)
        return 2
    finally:
        if sup is not None:
            sup.close()
    return 0
