"""The composition root: config -> feeds, fan-out, listeners, metrics; start and stop.

Why one module: ``Gateway`` is the single-process gateway whole -- its start, readiness,
snapshot, reload and shutdown read the same fields -- and a ``--workers N`` worker process
(``gateway.workers.worker``) is this class with another ``start``; ``run`` is the one entry
(``workers`` > 1 hands over to ``gateway.workers.supervisor``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from operator import attrgetter
from typing import Any

import msgspec

from gateway import __version__, transport
from gateway.aio import cancel_and_wait
from gateway.auth import Authenticator, KeyEntry
from gateway.books.feed_books import MBO_LEN, RTYPE_MBO, FeedBooks
from gateway.config import Config, worker_count
from gateway.errors import ConfigError, FeedError, GatewayError
from gateway.fanout import FanOut
from gateway.feeds import Feed, Source, build_source, parse_feed_uri
from gateway.feeds.readiness import FeedReadiness
from gateway.journal import JournalStore
from gateway.journal_setup import attach_feed, open_store
from gateway.metrics import Metrics
from gateway.ops.collector import GatewayCollector
from gateway.ops.http import StatusServer
from gateway.ops.logs import print_error, setup_logging
from gateway.ops.probe import Prober, start_strobe
from gateway.ops.snapshot import (
    ConnectionFacts,
    GatewayInfo,
    GatewaySnapshot,
    Totals,
    feed_snapshot,
    replay_snapshot,
    sessions_snapshot,
)
from gateway.replay.budget import ReplayBudget
from gateway.server import (
    HANDOVER_TEXT,
    SHUTDOWN_TEXT,
    ServerState,
    connection_factory,
    refuse_queued,
    reset,
)
from gateway.zstd_baseline import PerSessionZstdFanOut

__all__ = ["Gateway", "run"]

#: what the snapshot counts connections by: (feed, key, metadata sent)
_CONNECTION_KIND = attrgetter("feed", "key", "metadata_sent")

log = logging.getLogger("gateway")

#: how often connections are ticked (bytes out exported, write buffers sampled, slow-reader
#: checks between chunks), the event-loop lag measured and the feeds' up/down times noted
TICK_S = 0.5


class Gateway:
    def __init__(self, cfg: Config, loop_name: str = "") -> None:
        self.cfg = cfg
        self.loop_name = loop_name
        self.metrics = Metrics()
        self.feeds: dict[str, Feed] = {}
        self.sources: dict[str, Source] = {}
        self.state = ServerState(
            version=__version__,
            authenticator=Authenticator(key_entries(cfg)),
            feeds=self.feeds,
            metrics=self.metrics,
            limits=cfg.limits,
            slow=cfg.slow_reader,
            default_heartbeat_s=cfg.default_heartbeat_s,
        )
        if (
            cfg.transport.sndbuf is not None
            or cfg.transport.rcvbuf is not None
            or (cfg.transport.busy_poll_us is not None)
        ):
            self.state.tune_socket = transport.SocketTuner(cfg)
        self.state.zstd_per_session = cfg.zstd_mode == "per_session"
        self.state.zstd_level = cfg.zstd_level
        self.state.max_replays = cfg.journal.max_replays
        self.state.replay_step_bytes = cfg.journal.replay_step_bytes
        if cfg.journal.replay_bytes_per_s:
            self.state.replay_budget = ReplayBudget(cfg.journal.replay_bytes_per_s)
        #: the open journal (``[journal] dir``), or None
        self.journal: JournalStore | None = None
        self.server: asyncio.Server | None = None
        self.port = 0
        self.metrics_port = 0
        self._ticker: asyncio.Task[None] | None = None
        self._http: StatusServer | None = None
        self.started_at = time.time()
        #: whether the feeds are up or within ``feed_grace_s`` (noted every tick)
        self.readiness = FeedReadiness(self.feeds, cfg.feed_grace_s)
        #: the in-gateway probe (serve --strobe)
        self.strobe: Prober | None = None
        # /metrics reads the feeds' and sessions' totals when scraped, via snapshot()
        self.collector = GatewayCollector(
            self.snapshot, per_key=cfg.metrics_per_key, created=self.started_at
        )
        self.metrics.registry.register(self.collector)
        #: RLIMIT_NOFILE (soft, hard) after raising the soft limit at start
        self.fd_limit: tuple[int, int] = (0, 0)
        #: called once listening (after the "listening" line), e.g. --print-connect-help
        self.on_listening: Callable[[Gateway], None] | None = None
        #: SIGHUP: reads the config again (config file, key files, CLI overrides)
        self.reloader: Callable[[], Config] | None = None

    async def start(self) -> None:
        cfg = self.cfg
        self.fd_limit = transport.raise_fd_limit()
        self._open_journal()  # before any feed: a locked directory stops the start here
        for dataset, uri in cfg.feeds.items():
            spec = parse_feed_uri(dataset, uri)
            fanout_cls = PerSessionZstdFanOut if self.state.zstd_per_session else FanOut
            feed = Feed(
                dataset,
                fanout=fanout_cls(zstd_level=cfg.zstd_level),
                backpressure=spec.backpressure,
            )
            self.feeds[dataset] = feed
            self._attach_journal(feed)
            self._attach_books(feed)
            source = build_source(spec, feed, reuse_port=cfg.transport.reuse_port_for(spec.port))
            try:
                await source.start()
            except (OSError, GatewayError) as exc:
                raise FeedError(f"feed {dataset} ({uri}) could not start: {exc}") from exc
            self.sources[dataset] = source
            port = getattr(source, "port", None)
            if spec.kind == "ingest":
                print(f"ingest dataset={dataset} port={port}", flush=True)
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            connection_factory(self.state),
            cfg.host,
            cfg.port,
            backlog=4096,
            reuse_port=cfg.transport.reuse_port_for(cfg.port) or None,
        )
        self.port = self.server.sockets[0].getsockname()[1]
        sharing = transport.other_listeners(self.server.sockets)
        if sharing:
            log.warning(
                "port %d is shared with %d other listener(s) (SO_REUSEPORT): new connections "
                "are spread over them until they stop (hand-over: stop the old gateway now)",
                self.port,
                sharing,
            )
        sockopts = transport.tune_listeners(self.server.sockets, cfg)
        sockopts.update(transport.pin_loop_thread(cfg, loop))
        report = transport.startup_report(cfg, _loop_name(), self.server.sockets)
        report.socket_options = sockopts
        transport.apply_report(report, cfg, self.metrics)
        if cfg.metrics_port is not None:
            self._http = StatusServer(self, registry=self.metrics.registry)
            self.metrics_port = await self._http.start(
                cfg.metrics_host,
                cfg.metrics_port,
                reuse_port=cfg.transport.reuse_port_for(cfg.metrics_port),
            )
        self._fit_connections_under_fd_limit()
        self.metrics.info.info({"version": __version__, "loop": _loop_name()})
        self.metrics.start_time.set(self.started_at)
        self.readiness.note()
        self._ticker = loop.create_task(self._tick())
        if cfg.strobe.enabled:
            self.strobe = await start_strobe(self)
        transport.notify_service_manager(f"READY=1\nMAINPID={os.getpid()}")
        log.info(
            "gateway %s listening on %s:%d (loop=%s, datasets=%s)",
            __version__,
            cfg.host,
            self.port,
            _loop_name(),
            ",".join(self.feeds) or "none",
        )
        print(
            f"listening host={cfg.host} port={self.port} metrics_port={self.metrics_port}",
            flush=True,
        )
        if self.on_listening is not None:
            self.on_listening(self)

    def _open_journal(self) -> None:
        """Open the journal (``[journal] dir``) before any feed: a locked directory stops
        the start here, with a ConfigError naming it."""
        store = open_store(self.cfg.journal)
        if store is not None:
            self.journal = self.state.journal = store
            self.state.journal_enabled = True

    def _attach_books(self, feed: Feed) -> None:
        settings = self.cfg.books
        if not settings.enabled:
            return
        try:
            books = FeedBooks(
                feed.dataset,
                feed.fanout,
                derive=settings.derive,
                max_orders=settings.max_orders,
                max_snapshot_records=settings.max_snapshot_records,
                require_clear=settings.snapshot_requires_clear,
            )
        except ImportError as exc:
            # the native engine is built by `make install` (pip install -e .): without it the
            # gateway serves every feed as before, and says why snapshots are refused
            log.error("feed %s: order books unavailable: %s", feed.dataset, exc)
            feed.no_books_reason = "order books are unavailable on this gateway"
            return
        feed.attach_books(books)
        journal = feed.journal
        if journal is not None and journal.last_seq:
            # the books as the feed left them: what this dataset's journal retains (books
            # are whole from the R records it holds on; see books.snapshot_requires_clear)
            started = time.perf_counter()
            applied = books.rebuild(journal.records_of(RTYPE_MBO, MBO_LEN))
            if applied:
                c = books.counters
                log.info(
                    "feed %s: order books rebuilt from the journal: %d MBO records, %d books "
                    "(%d whole), %d resting orders, %.2f s",
                    feed.dataset,
                    applied,
                    c.books,
                    books.whole_books(),
                    c.orders,
                    time.perf_counter() - started,
                )

    def _attach_journal(self, feed: Feed) -> None:
        if self.journal is not None:
            attach_feed(self.journal, feed)

    def _fit_connections_under_fd_limit(self) -> None:
        """Keep ``max_connections`` below the descriptor limit, so that a connection over it
        is accepted and refused with a reason instead of failing in accept() (uvloop: a bare
        EOF, asyncio: a hang, neither logged)."""
        soft, hard = self.fd_limit
        in_use = transport.open_fds()
        lim = self.state.limits
        budget = transport.connection_budget(lim.max_connections, soft, in_use)
        if budget < 1:
            raise ConfigError(
                f"limits.max_connections: RLIMIT_NOFILE={soft} leaves no descriptors for "
                f"client connections ({in_use} in use, {transport.FD_RESERVE} kept in "
                "reserve); raise it (LimitNOFILE= in the systemd unit, ulimit -n)"
            )
        if budget < lim.max_connections:
            log.warning(
                "limits.max_connections=%d does not fit under RLIMIT_NOFILE=%d (%d descriptors "
                "in use, %d kept in reserve): serving at most max_connections=%d; raise the "
                "limit (LimitNOFILE=, ulimit -n) to serve more",
                lim.max_connections,
                soft,
                in_use,
                transport.FD_RESERVE,
                budget,
            )
            self.state.limits = msgspec.structs.replace(lim, max_connections=budget)
        log.info(
            "descriptors nofile=%d hard=%d in_use=%d max_connections=%d",
            soft,
            hard,
            in_use,
            self.state.limits.max_connections,
        )

    def ready(self) -> tuple[bool, dict[str, str]]:
        """Listening, and every feed connected or still within ``feed_grace_s`` of going
        down (or of the start); the detail says which, per dataset."""
        feeds_ok, detail = self.readiness.check()
        listening = self.server is not None and self.server.is_serving()
        return listening and self.state.accepting and feeds_ok, detail

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        metrics = self.metrics
        expected = loop.time() + TICK_S
        while True:
            await asyncio.sleep(TICK_S)
            now = loop.time()
            metrics.loop_lag.observe(max(0.0, now - expected))
            expected = now + TICK_S
            for conn in list(self.state.connections):
                conn.tick(now)
            self.readiness.note()
            if self.journal is not None:
                try:
                    self.journal.maintain()  # retention, interval fsync
                except Exception:  # pragma: no cover - the ticker must go on
                    log.exception("journal maintenance failed")

    def snapshot(self) -> GatewaySnapshot:
        """The gateway's figures now: what /metrics, /status and /status.json report."""
        now, mono = time.time(), time.monotonic()
        ready, detail = self.ready()
        sessions, per_key = sessions_snapshot(
            self._connection_facts(),
            (k.key_id for k in self.state.authenticator.entries),
        )
        return GatewaySnapshot(
            taken_at=now,
            gateway=GatewayInfo(
                version=__version__,
                started_at=self.started_at,
                uptime_s=round(now - self.started_at, 3),
                ready=ready,
                accepting=self.state.accepting,
                port=self.port,
                loop=self.loop_name,
            ),
            sessions=sessions,
            feeds=[
                feed_snapshot(feed, detail.get(ds, ""), now, mono)
                for ds, feed in self.feeds.items()
            ],
            connections_unauthenticated=self.state.unauthenticated,
            key_sessions=per_key,
            bytes_out=self._bytes_out(),
            replays=replay_snapshot(self.state.replays_active, self.state.replay_bytes),
        )

    def _connection_facts(self) -> Counter[ConnectionFacts]:
        """How many connections there are of each kind: the one place that reads client
        connections for the snapshot (counted in C: tens of thousands cost milliseconds)."""
        kinds = Counter(map(_CONNECTION_KIND, self.state.connections))
        out: Counter[ConnectionFacts] = Counter()
        for (feed, key, streaming), n in kinds.items():
            facts = ConnectionFacts(
                dataset=feed.dataset if feed is not None else None,
                key_id=key.key_id if key is not None else None,
                streaming=bool(streaming),
            )
            out[facts] += n
        return out

    def totals(self) -> Totals:
        """Records and bytes in and out so far (no connection is looked at)."""
        feeds = self.feeds.values()
        return Totals(
            records_in=sum(f.stats.records_in for f in feeds),
            bytes_in=sum(f.stats.bytes_in for f in feeds),
            records_out=sum(f.fanout.records_out for f in feeds),
            bytes_out=float(sum(self.state.bytes_out.values())),
        )

    def _bytes_out(self) -> dict[str, float]:
        """Bytes written to sessions by "dataset/compression" (the server's running total,
        which each connection adds to every tick and at its end)."""
        return {f"{ds}/{comp}": float(n) for (ds, comp), n in self.state.bytes_out.items()}

    async def shutdown(self) -> None:
        """Stop accepting (closing the listeners first, so that reconnecting clients land on
        a successor bound to the same port), end every session with an ErrorMsg after what
        is queued for it, stop feeds, wait for the sessions to go (``shutdown_grace_s``)."""
        state = self.state
        state.accepting = False
        transport.notify_service_manager("STOPPING=1")
        handover = self._stop_listening()
        for conn in list(state.connections):
            conn.shutdown(handover)
        if self.strobe is not None:
            await self.strobe.stop()
        for source in self.sources.values():
            try:
                await source.stop()
            except Exception:  # pragma: no cover - best effort on the way out
                log.exception("stopping a feed failed")
        deadline = time.monotonic() + self.cfg.shutdown_grace_s
        while state.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(state.connections):
            if conn.transport is not None:
                reset(conn.transport)  # could not drain in time: a reset, not a clean EOF
        await asyncio.sleep(0)
        await cancel_and_wait(self._ticker)
        self.close_journal()
        if self._http is not None:
            await self._http.stop()
        if self.server is not None:
            await self.server.wait_closed()
        for ds, feed in self.feeds.items():
            st = feed.stats
            log.info(
                "feed %s totals records_in=%d chunks_in=%d bytes_in=%d records_per_chunk=%.1f",
                ds,
                st.records_in,
                st.chunks_in,
                st.bytes_in,
                st.records_in / st.chunks_in if st.chunks_in else 0.0,
            )
        log.info("gateway stopped")

    def close_journal(self) -> None:
        """Seal the journal (a final fsync as configured) and unlock it; idempotent."""
        store, self.journal = self.journal, None
        if store is not None:
            for feed in self.feeds.values():
                feed.journal = None
            self.state.journal_enabled, self.state.journal = False, None
            store.close()

    def _stop_listening(self) -> bool:
        """Close the client listeners, all at once (no await: nothing else runs meanwhile);
        returns whether another listener is bound to the same address and port -- with
        SO_REUSEPORT, a successor, which then receives every new connection.

        Connections already waiting in a listener's accept queue would be reset when it
        closes: they are accepted and refused with a reason instead, unless a successor is
        there and the kernel migrates them to it (``net.ipv4.tcp_migrate_req = 1``)."""
        server = self.server
        if server is None or not server.is_serving():
            return False
        sockets = list(server.sockets)
        # --workers N: the other workers' listeners on the port are siblings, not successors
        successor = transport.other_listeners(sockets) > self.state.siblings
        text = HANDOVER_TEXT if successor else SHUTDOWN_TEXT
        queued = 0
        if not (successor and transport.migrates_accept_queue()):
            for sock in sockets:
                queued += transport.drain_accept_queue(
                    sock, lambda conn: refuse_queued(self.state, conn, text)
                )
        server.close()
        log.info(
            "listener closed port=%d successor=%d sessions=%d refused_from_queue=%d",
            self.port,
            int(successor),
            len(self.state.connections),
            queued,
        )
        return successor

    def reload(self) -> bool:
        """SIGHUP: read the config again and apply its API keys and ``[limits]``.

        Sessions of a revoked key, or of a key that lost their dataset, end with an ErrorMsg
        (code 2) and a clean close; everyone else is untouched. Limits apply to sessions
        and connections that start from now on. Other changes are logged as needing a
        restart. A config that does not validate is refused (the log names the field) and
        the running one kept."""
        if self.reloader is None:
            log.warning("config reload: no config to read again; nothing changed")
            return False
        try:
            new = self.reloader()
        except GatewayError as exc:
            log.error("config reload refused: %s; keeping the running config", exc)
            return False
        old = self.cfg
        restart = _changed_fields(
            msgspec.to_builtins(old), msgspec.to_builtins(new), skip=("api_keys", "limits")
        )
        if restart:
            log.warning(
                "config reload: changes need a restart and are not applied fields=%s",
                ",".join(restart),
            )
        added, revoked = self.state.authenticator.replace(key_entries(new))
        gone = set(revoked)
        ended = 0
        for conn in list(self.state.connections):
            key, feed = conn.key, conn.feed
            if key is None or conn.closing:
                continue
            if key in gone:
                conn.revoke("API key revoked", "api key revoked")
            elif feed is not None and not key.allows(feed.dataset):
                conn.revoke(
                    f"API key is no longer entitled to dataset {feed.dataset}",
                    "dataset revoked",
                )
            else:
                continue
            ended += 1
        self.state.limits = new.limits
        if self.server is not None:  # start() fits it otherwise
            self._fit_connections_under_fd_limit()
        old.api_keys, old.limits = new.api_keys, new.limits
        strobe = self.strobe
        if strobe is not None and new.api_keys:
            # The strobe logs in as strobe.key or the first key: follow the reloaded list.
            strobe_key = old.strobe.key or new.api_keys[0].key
            if strobe_key != strobe.target.key:
                strobe.target = dataclasses.replace(strobe.target, key=strobe_key)
        log.info(
            "config reloaded keys=%d added=%d revoked=%d sessions_ended=%d",
            len(new.api_keys),
            len(added),
            len(revoked),
            ended,
        )
        return True

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        # Before start(): a signal right after the "listening" line still shuts down cleanly.
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        await self.start()
        await stop.wait()
        log.info("signal received: shutting down")
        await self.shutdown()


def key_entries(cfg: Config) -> list[KeyEntry]:
    return [
        KeyEntry(
            key=k.key,
            key_id=k.name or f"key-{k.key[-5:]}",
            datasets=None if "*" in k.datasets else frozenset(k.datasets),
            max_sessions=k.max_sessions,
        )
        for k in cfg.api_keys
    ]


def _changed_fields(old: Any, new: Any, skip: tuple[str, ...] = (), at: str = "") -> list[str]:
    """Dotted names of the fields that differ between two configs as plain data."""
    if isinstance(old, dict) and isinstance(new, dict) and at != "feeds":
        out: list[str] = []
        for name in sorted(old.keys() | new.keys()):
            if name in skip:
                continue
            path = f"{at}.{name}" if at else name
            out += _changed_fields(old.get(name), new.get(name), at=path)
        return out
    return [] if old == new else [at]


def _loop_name() -> str:
    loop = asyncio.get_running_loop()
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


def run(
    cfg: Config,
    on_listening: Callable[[Gateway], None] | None = None,
    reload: Callable[[], Config] | None = None,
) -> int:
    if worker_count(cfg) > 1:  # --workers N: a supervisor and N worker processes
        from gateway.workers.supervisor import run as run_workers

        return run_workers(cfg, on_listening=on_listening, reload=reload)
    setup_logging(cfg.log_format, cfg.log_level)
    try:
        loop_name = transport.choose_loop(cfg)
        gateway = Gateway(cfg, loop_name=loop_name)
        gateway.on_listening = on_listening
        gateway.reloader = reload
        try:
            transport.run_loop(gateway.serve(), loop_name)
        finally:
            gateway.close_journal()  # a start that failed half-way leaves it unlocked
    except GatewayError as exc:
        print_error(str(exc), cfg.log_format)
        return 2
    except OSError as exc:
        print_error(f"cannot listen: {exc}", cfg.log_format)
        return 2
    return 0
