"""The uptime probe: uses the gateway like a customer and records the result.

One *strobe* is what a customer does, over the real TCP port, with the project's own
client (``gateway.client.LiveClient``), each step timed and each failure named:

    connect       TCP connect
    auth          greeting, CRAM challenge, authentication reply
    subscribe     the subscription line; refused if the gateway answers it with an ErrorMsg
                  (unknown symbol, invalid subscription)
    start         start_session and the DBN Metadata header
    first_record  the first market record (not a gateway System/Error/SymbolMapping record);
                  its ts_event gives the feed's freshness

It runs as its own process (``gateway probe``, ``gateway.ops.probe_cli``: one strobe with
``--once``, else one every ``--interval`` seconds with its own /metrics and /status on
``--metrics-port``) or as a task inside the gateway (``gateway serve --strobe``,
:func:`start_strobe`: its metrics go to the gateway's registry and its figures to the
gateway's /status). Every result is appended to an SQLite history (``gateway.ops.history``)
so uptime over 1 h, 24 h, 7 d and 30 d survives restarts.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway import __version__
from gateway.client import LiveClient
from gateway.dbn import GATEWAY_RTYPES, KNOWN_RTYPES, RTYPE_ERROR, SCHEMAS, ErrorCode
from gateway.errors import ConfigError, GatewayError
from gateway.metrics import PROBE_STEPS, ProbeMetrics
from gateway.ops.history import WINDOWS, History, HistorySummary, StrobeRecord, default_history_path

if TYPE_CHECKING:
    from gateway.app import Gateway

__all__ = [
    "PROBE_STEPS",
    "ProbeTarget",
    "Prober",
    "StepFailed",
    "open_history",
    "start_strobe",
    "strobe",
]

log = logging.getLogger("gateway.probe")

CLIENT_NAME = f"gateway-probe/{__version__}"
#: ErrorMsg codes that mean "your subscription was refused"
_SUBSCRIPTION_ERRORS = frozenset(
    {ErrorCode.SYMBOL_RESOLUTION_FAILED, ErrorCode.INVALID_SUBSCRIPTION}
)


@dataclass(frozen=True)
class ProbeTarget:
    host: str
    port: int
    key: str
    dataset: str
    symbol: str = "ALL_SYMBOLS"
    schema: str = "trades"
    #: limit for each step
    timeout_s: float = 10.0

    @property
    def name(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}/{self.dataset}"

    def validate(self) -> ProbeTarget:
        if not 0 < self.port <= 65535:
            raise ConfigError(f"port: {self.port} is not a TCP port")
        if len(self.key) != 32 or not self.key.isascii() or not self.key.isprintable():
            raise ConfigError("key: API keys are 32 printable ASCII characters")
        if not self.dataset:
            raise ConfigError("dataset: required")
        if self.schema not in SCHEMAS:
            raise ConfigError(f"schema: {self.schema!r} is not a DBN schema")
        if not self.symbol or "|" in self.symbol or "," in self.symbol:
            raise ConfigError("symbol: one symbol (or ALL_SYMBOLS)")
        if self.timeout_s <= 0:
            raise ConfigError("timeout: must be > 0")
        return self


class StepFailed(GatewayError):
    """A strobe step failed; ``step`` is its name."""

    def __init__(self, step: str, message: str) -> None:
        super().__init__(message)
        self.step = step


def _describe(exc: BaseException, timeout_s: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"timed out after {timeout_s:g} s"
    text = str(exc).strip()
    if isinstance(exc, (GatewayError, ValueError)) and text:
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def strobe(target: ProbeTarget) -> StrobeRecord:
    """One customer-like session; never raises (a failure is a record naming its step)."""
    started = time.time()
    t0 = time.perf_counter()
    lat: dict[str, float] = {}
    step = "connect"
    writer: asyncio.StreamWriter | None = None
    freshness: float | None = None
    error = ""
    limit = target.timeout_s
    try:
        async with asyncio.timeout(limit):
            reader, writer = await asyncio.open_connection(
                target.host, target.port, limit=256 * 1024
            )
        lat["connect"] = time.perf_counter() - t0

        step = "auth"
        client = LiveClient(
            reader, writer, compression="none", ts_out=False, heartbeat_interval_s=None
        )
        t = time.perf_counter()
        async with asyncio.timeout(limit):
            await client.authenticate(target.key, target.dataset, client_name=CLIENT_NAME)
        lat["auth"] = time.perf_counter() - t

        step = "subscribe"
        async with asyncio.timeout(limit):
            await client.subscribe(target.schema, [target.symbol])

        step = "start"
        t = time.perf_counter()
        await client.start(timeout=limit)

        step = "first_record"
        async with asyncio.timeout(limit):
            freshness = await _first_record(client)
        lat["first_record"] = time.perf_counter() - t
    except StepFailed as exc:
        step, error = exc.step, str(exc)
    except Exception as exc:  # reported in the record, never raised
        error = _describe(exc, limit)
    else:
        step = "ok"
    finally:
        if writer is not None:
            writer.close()
            try:
                async with asyncio.timeout(2.0):
                    await writer.wait_closed()
            except (OSError, TimeoutError):
                pass
    total = time.perf_counter() - t0
    return StrobeRecord(
        ts=started,
        ok=step == "ok",
        step=step,
        error=error,
        target=target.name,
        connect_s=lat.get("connect"),
        auth_s=lat.get("auth"),
        first_record_s=lat.get("first_record"),
        total_s=total,
        freshness_s=freshness,
    )


async def _first_record(client: LiveClient) -> float:
    """Seconds between the first market record's ts_event and now."""
    batches = client.batches()
    try:
        async for batch in batches:
            for rtype, _, rec in batch.records():
                if rtype == RTYPE_ERROR:
                    text = bytes(rec[16:318]).split(b"\0", 1)[0].decode("utf-8", "replace")
                    code = rec[318] if len(rec) > 318 else 0
                    if code in _SUBSCRIPTION_ERRORS:
                        raise StepFailed("subscribe", f"subscription refused: {text}")
                    raise StepFailed("first_record", f"gateway error: {text}")
                if rtype in GATEWAY_RTYPES:
                    continue  # subscription ack, symbol mappings, heartbeats
                if rtype not in KNOWN_RTYPES:
                    raise StepFailed(
                        "first_record", f"not a DBN record: unknown rtype 0x{rtype:02x}"
                    )
                ts_event = int.from_bytes(rec[8:16], "little")
                return max(0.0, (time.time_ns() - ts_event) / 1e9)
    finally:
        await batches.aclose()
    raise StepFailed("first_record", "gateway closed the stream before the first record")


class Prober:
    """Strobes a target every ``interval_s``; exports metrics; keeps the history."""

    def __init__(
        self,
        target: ProbeTarget,
        *,
        interval_s: float,
        metrics: ProbeMetrics,
        history: History,
    ) -> None:
        self.target = target
        self.interval_s = interval_s
        self.metrics = metrics
        self.history = history
        self.summary = HistorySummary()
        self.last: StrobeRecord | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    async def load(self) -> None:
        """Read the figures the history already holds (before the first strobe)."""
        self.summary = await asyncio.to_thread(self.history.summary, self.target.name)
        if self.summary.other_strobes:
            log.info(
                "probe history %s also holds %d strobe(s) of %d other target(s); "
                "figures count only target=%s",
                self.history.path,
                self.summary.other_strobes,
                self.summary.other_targets,
                self.target.name,
            )
        self._export_uptime()

    async def run_once(self) -> StrobeRecord:
        rec = await strobe(self.target)
        summary = await asyncio.to_thread(self._store, rec)
        # no await from here on: the result, the figures and the metrics change together
        self._observe(rec)
        self.summary = summary
        self._export_uptime()
        return rec

    def start(self) -> asyncio.Task[None]:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self._task

    async def stop(self) -> None:
        # Python 3.11's wait_for can swallow a cancellation that lands as the awaited step
        # completes (the strobe then went on for ever and SIGTERM never ended the gateway):
        # the loop also checks a flag, and the cancel is repeated until the task is done.
        self._stopping = True
        task = self._task
        for _ in range(100):
            if task is None or task.done():
                break
            task.cancel()
            await asyncio.wait({task}, timeout=0.1)
        if task is not None and task.done() and not task.cancelled():
            task.exception()  # retrieved: a stopped strobe's error is not news
        self._task = None
        await asyncio.to_thread(self.history.close)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time()
        while not self._stopping:
            try:
                await self.run_once()
            except Exception:  # pragma: no cover - a bug must not stop the probe
                log.exception("probe: strobe failed unexpectedly")
            due += self.interval_s
            now = loop.time()
            if due < now:  # a strobe took longer than the interval: skip, don't bunch
                due = now + self.interval_s
            await asyncio.sleep(due - now)

    def _store(self, rec: StrobeRecord) -> HistorySummary:
        self.history.record(rec)
        return self.history.summary(self.target.name)

    def _observe(self, rec: StrobeRecord) -> None:
        m = self.metrics
        previous = self.last
        self.last = rec
        m.last_strobe.set(rec.ts)
        m.up.set(1 if rec.ok else 0)
        if rec.ok:
            m.strobes.labels("success").inc()
            m.last_success.set(rec.ts)
            for step, value in (
                ("connect", rec.connect_s),
                ("auth", rec.auth_s),
                ("first_record", rec.first_record_s),
                ("total", rec.total_s),
            ):
                if value is not None:
                    m.latency.labels(step).observe(value)
            if rec.freshness_s is not None:
                m.freshness.set(rec.freshness_s)
        else:
            m.strobes.labels("failure").inc()
            m.failures.labels(rec.step).inc()
        if not rec.ok and (previous is None or previous.ok or previous.step != rec.step):
            log.warning("probe failed target=%s step=%s error=%s", rec.target, rec.step, rec.error)
        elif rec.ok and previous is not None and not previous.ok:
            log.info("probe recovered target=%s total_s=%.4f", rec.target, rec.total_s or 0.0)
        else:
            log.debug("probe %s target=%s", rec.step, rec.target)

    def _export_uptime(self) -> None:
        for label, _ in WINDOWS:
            stats = self.summary.uptime.get(label)
            ratio = stats.ratio if stats is not None else None
            if ratio is not None:
                self.metrics.uptime.labels(label).set(ratio)

    def status(self) -> dict[str, Any]:
        """The probe's part of /status.json."""
        t = self.target
        return {
            "target": t.name,
            "dataset": t.dataset,
            "schema": t.schema,
            "symbol": t.symbol,
            "interval_s": self.interval_s,
            "history": self.history.path,
            "last": self.last.as_dict() if self.last is not None else None,
            **self.summary.as_dict(),
        }


# --- inside the gateway (serve --strobe) ------------------------------------------------


async def start_strobe(gateway: Gateway) -> Prober:
    """Start strobing this gateway's own client port; metrics go to its registry."""
    cfg = gateway.cfg
    sc = cfg.strobe
    host = cfg.host
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    target = ProbeTarget(
        host=host,
        port=gateway.port,
        key=sc.key or cfg.api_keys[0].key,
        dataset=sc.dataset or next(iter(cfg.feeds)),
        symbol=sc.symbol,
        schema=sc.schema,
        timeout_s=sc.timeout_s,
    ).validate()
    path = sc.history or str(default_history_path())
    history = await asyncio.to_thread(open_history, path)
    prober = Prober(
        target,
        interval_s=sc.interval_s,
        metrics=ProbeMetrics(gateway.metrics.registry),
        history=history,
    )
    await prober.load()
    prober.start()
    log.info(
        "strobe every %gs target=%s schema=%s symbol=%s history=%s",
        sc.interval_s,
        target.name,
        target.schema,
        target.symbol,
        path,
    )
    return prober


def open_history(path: str | Path) -> History:
    try:
        return History(path)
    except (OSError, sqlite3.Error) as exc:
        raise ConfigError(f"probe history {path}: cannot open: {exc}") from None
