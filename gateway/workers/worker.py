"""One worker process of ``gateway serve --workers N``: today's fan-out for its own sessions.

Started by the supervisor as ``python -m gateway.workers.worker --control-fd N``. It first
asks the kernel to SIGTERM it when the supervisor dies (``PR_SET_PDEATHSIG``), reads its
:class:`~gateway.workers.control.Init` from the control socket, checks the supervisor is
still its parent, builds its state (limits, rings mapped, feeds, journal follower, loop) and
says :class:`~gateway.workers.control.Prepared`; the supervisor then makes its ring slot live
and answers :class:`~gateway.workers.control.Start` (each feed as of there), and the worker
restores its feeds, reads the rings, listens and says Ready. It runs a
:class:`WorkerGateway`: the single-process ``Gateway``
with its feeds fed from the shared rings instead of sources, its listener bound to the
client port with ``SO_REUSEPORT`` beside its siblings, and no sources, status port, strobe
or journal writer of its own (the supervisor has those). It drains and exits on SIGTERM,
on SIGINT, and when the control socket reaches EOF (the supervisor is gone).
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import functools
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any

import msgspec

from gateway import __version__, transport
from gateway.aio import cancel_and_wait
from gateway.app import TICK_S, Gateway
from gateway.config import Config
from gateway.errors import GatewayError
from gateway.fanout import FanOut
from gateway.feeds import Feed, parse_feed_uri
from gateway.journal.follower import FollowerStore, attach_follower, open_follower
from gateway.ops.logs import print_error, setup_logging
from gateway.workers.aggregate import families_of
from gateway.workers.conn import WorkerConnection
from gateway.workers.control import (
    Blocked,
    ControlChannel,
    ControlError,
    Init,
    Message,
    Prepared,
    Ready,
    Reload,
    Start,
    Stats,
    describe,
    open_channel,
    recv_message,
)
from gateway.workers.feeder import RingFeeder
from gateway.workers.limits import SharedLimits
from gateway.workers.pins import PinTracker
from gateway.workers.ring import Ring, RingReader

__all__ = ["StoppedEarly", "WorkerGateway", "follow", "main", "set_parent_death_signal"]

log = logging.getLogger("gateway.workers")

#: prctl(2) option: the signal this process gets when its parent thread exits
PR_SET_PDEATHSIG = 1
#: how long a worker waits for its Init (and its Start) before giving up
INIT_TIMEOUT_S = 30.0


def set_parent_death_signal(sig: int = signal.SIGTERM) -> bool:
    """``prctl(PR_SET_PDEATHSIG, sig)``: the kernel sends ``sig`` to this process when its
    parent exits (even by SIGKILL). False where it is not available."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


class StoppedEarly(Exception):
    """SIGTERM (or the supervisor gone) before the worker had its Start."""


class WorkerGateway(Gateway):
    """The single-process Gateway, as a worker: feeds without sources (fed from the rings),
    a listener sharing the client port, its figures pushed to the supervisor every tick."""

    def __init__(self, cfg: Config, init: Init, control: socket.socket) -> None:
        super().__init__(cfg, loop_name=init.loop)
        # The supervisor serves the one /metrics (its collector merges every worker's
        # snapshot): a worker's registry holds only its own counters and histograms.
        self.metrics.registry.unregister(self.collector)
        self.init = init
        self.name = init.name
        self.state.worker_slot = init.slot
        self.state.siblings = max(0, init.workers - 1)
        self._control_sock: socket.socket | None = control
        self.channel: ControlChannel | None = None
        self._stop = asyncio.Event()
        self._stats_task: asyncio.Task[None] | None = None
        self._next_config: Config | None = None
        self.reloader = self._reloaded_config
        self.rings: list[Ring] = []
        self.feeder: RingFeeder | None = None
        self.shared_limits: SharedLimits | None = None
        #: the supervisor's Start (answer to Prepared); an error when it went away first
        self._started: asyncio.Future[Start] | None = None

    # --- start ---------------------------------------------------------------------------

    async def start(self) -> None:
        cfg, init = self.cfg, self.init
        loop = asyncio.get_running_loop()
        self.fd_limit = transport.raise_fd_limit()
        state = self.state
        if init.limits_path:
            self.shared_limits = SharedLimits.attach(init.limits_path, init.slot)
            state.shared_limits = self.shared_limits
            self.shared_limits.bind(state)
        state.pins = PinTracker.for_loop(loop)
        follower = open_follower(cfg.journal)
        if follower is not None:
            self.journal = state.journal = follower
            state.journal_enabled = True
        rings: dict[str, Ring] = {}
        lossless: dict[str, bool] = {}
        for dataset, uri in cfg.feeds.items():
            spec = parse_feed_uri(dataset, uri)
            feed = Feed(
                dataset, fanout=FanOut(zstd_level=cfg.zstd_level), backpressure=spec.backpressure
            )
            feed.no_books_reason = (
                "order books (snapshot=1, schemas derived from MBO) are not supported yet "
                "with --workers: run a single process"
            )
            self.feeds[dataset] = feed
            lossless[dataset] = spec.backpressure
            ring = rings[dataset] = Ring.attach(init.rings[dataset], creator=init.supervisor_pid)
            self.rings.append(ring)
        # Ready to read: only now does the supervisor make this worker's slot live (while
        # it booted, its slot held nothing) and say where each feed starts.
        start = await self._await_start()
        readers = {
            ds: RingReader(ring, init.slot, start=start.feeds[ds].start_pos)
            for ds, ring in rings.items()
        }
        if follower is not None:
            follow(follower, self.feeds, start)
        self.feeder = RingFeeder(
            self.feeds,
            readers,
            state.pins,
            lossless,
            self.notify_blocked,
            efd=init.eventfd if init.eventfd >= 0 else None,
            registry=self.metrics.registry,
            lossless_pin_s=self.cfg.slow_reader.stall_timeout_s,
        )
        for dataset, fs in start.feeds.items():
            self.feeder.restore(dataset, fs.snapshot)
        self.feeder.start()  # reading at once: the slot is live, the writer waits for it
        self.server = await loop.create_server(
            functools.partial(WorkerConnection, state),
            cfg.host,
            init.port,
            backlog=4096,
            reuse_port=True,
        )
        self.port = self.server.sockets[0].getsockname()[1]
        sockopts = transport.tune_listeners(self.server.sockets, cfg)
        if init.cpus and init.allowed_cpus:  # undo the supervisor's pinning, inherited
            os.sched_setaffinity(0, init.allowed_cpus)
        placed = msgspec.structs.replace(
            cfg, transport=msgspec.structs.replace(cfg.transport, cpu_affinity=init.cpus)
        )
        sockopts.update(transport.pin_loop_thread(placed, loop))
        report = transport.startup_report(cfg, self.loop_name, self.server.sockets)
        report.socket_options = sockopts
        transport.apply_report(report, cfg, self.metrics)
        self._fit_connections_under_fd_limit()
        self.metrics.info.info({"version": __version__, "loop": self.loop_name})
        self.metrics.start_time.set(self.started_at)
        self.readiness.note()
        self._ticker = loop.create_task(self._tick())
        self._stats_task = loop.create_task(self._push_stats())
        self._send(Ready(pid=os.getpid(), report=report.line()))
        log.info(
            "worker %s listening on %s:%d pid=%d (loop=%s, datasets=%s)",
            self.name,
            cfg.host,
            self.port,
            os.getpid(),
            self.loop_name,
            ",".join(self.feeds) or "none",
        )

    async def _await_start(self) -> Start:
        """Say Prepared and wait for the supervisor's Start (StoppedEarly: SIGTERM or the
        supervisor gone first; GatewayError: no answer in time)."""
        loop = asyncio.get_running_loop()
        started: asyncio.Future[Start] = loop.create_future()
        self._started = started
        self._send(Prepared(pid=os.getpid()))
        stopping = loop.create_task(self._stop.wait())
        waiting: list[asyncio.Future[Any]] = [started, stopping]
        try:
            await asyncio.wait(
                waiting,
                timeout=INIT_TIMEOUT_S,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            await cancel_and_wait(stopping)
        if started.done():
            return started.result()
        if self._stop.is_set():
            raise StoppedEarly
        raise GatewayError(f"no start message after {INIT_TIMEOUT_S:.0f} s")

    # --- the control channel -------------------------------------------------------------

    def _send(self, msg: Message) -> None:
        if self.channel is not None:
            self.channel.send(msg)

    def _on_message(self, msg: Message) -> None:
        if isinstance(msg, Start):
            if self._started is not None and not self._started.done():
                self._started.set_result(msg)
            else:
                log.warning("control: a second start message ignored")
        elif isinstance(msg, Reload):
            self._next_config = msg.config
            self.reload()
        else:
            log.warning("control: unexpected %s message ignored", describe(msg))

    def _on_control_closed(self, exc: Exception | None) -> None:
        if not self._stop.is_set():
            log.warning("control channel closed (the supervisor is gone): shutting down")
        self._stop.set()

    def _reloaded_config(self) -> Config:
        cfg, self._next_config = self._next_config, None
        if cfg is None:
            raise GatewayError("no config received")
        return cfg

    def notify_blocked(self, dataset: str, blocked: bool) -> None:
        """A lossless feed here has a session over its high-water mark (or is clear)."""
        self._send(Blocked(dataset=dataset, blocked=blocked))

    async def _push_stats(self) -> None:
        """Every tick: the feeder's heartbeat and releases, the figures to the supervisor."""
        while True:
            await asyncio.sleep(TICK_S)
            if self.feeder is not None:
                self.feeder.tick()
            try:
                self._send(
                    Stats(snapshot=self.snapshot(), families=families_of(self.metrics.registry))
                )
            except Exception:  # pragma: no cover - the figures must not stop the worker
                log.exception("could not send stats")

    # --- run -----------------------------------------------------------------------------

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._stop.set)
        # SIGHUP goes to the supervisor, which forwards the config it read (Reload)
        loop.add_signal_handler(signal.SIGHUP, lambda: None)
        sock, self._control_sock = self._control_sock, None
        assert sock is not None
        self.channel = await open_channel(sock, self._on_message, self._on_control_closed)
        try:
            await self.start()
        except StoppedEarly:
            log.info("worker %s: stopped before it started", self.name)
        else:
            await self._stop.wait()
            log.info("worker %s: shutting down", self.name)
            await self.shutdown()
        await cancel_and_wait(self._stats_task)
        if self.feeder is not None:
            self.feeder.stop()
        if self.channel is not None:
            self.channel.close()
        if self.shared_limits is not None:
            self.shared_limits.close()
        for ring in self.rings:
            ring.close()


def follow(follower: FollowerStore, feeds: dict[str, Feed], start: Start) -> None:
    """Give each feed its follower journal, positioned at the supervisor's journal seq for
    the worker's start and its directory seeded with the mappings on file as of there (the
    ones after come through the ring)."""
    for dataset, feed in feeds.items():
        seq = start.feeds[dataset].journal_seq
        attach_follower(follower, feed, start_seq=seq if seq >= 0 else None)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="gateway-worker", description="A worker of gateway serve --workers N"
    )
    parser.add_argument("--control-fd", type=int, required=True, metavar="N")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    set_parent_death_signal(signal.SIGTERM)  # before anything else: no orphan, ever
    args = _parse_args(argv)
    try:
        sock = socket.socket(fileno=args.control_fd)
    except OSError as exc:
        print_error(f"worker: control fd {args.control_fd}: {exc}")
        return 2
    try:
        msg = recv_message(sock, timeout=INIT_TIMEOUT_S)
    except (OSError, ControlError) as exc:
        print_error(f"worker: no start-up message from the supervisor: {exc}")
        return 2
    if not isinstance(msg, Init):
        print_error("worker: the supervisor went away before the start-up message")
        return 2
    if os.getppid() != msg.supervisor_pid:  # it died before PR_SET_PDEATHSIG took hold
        print_error("worker: the supervisor is gone; exiting")
        return 2
    cfg = msg.config
    setup_logging(cfg.log_format, cfg.log_level, worker=msg.name)
    started = time.monotonic()
    try:
        loop_name = transport.choose_loop(cfg)  # blocks io_uring here too under a preload
        msg.loop = loop_name
        gateway = WorkerGateway(cfg, msg, sock)
        transport.run_loop(gateway.serve(), loop_name)
    except GatewayError as exc:
        log.error("worker %s could not run: %s", msg.name, exc)
        return 2
    except OSError as exc:
        log.error("worker %s cannot listen: %s", msg.name, exc)
        return 2
    log.info("worker %s stopped after %.1f s", msg.name, time.monotonic() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
