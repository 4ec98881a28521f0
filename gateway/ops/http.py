"""The operator HTTP port: /metrics, /healthz, /readyz, /status, /status.json.

A small stdlib-asyncio responder, no framework. ``/status`` is a server-rendered HTML page
(``gateway.ops.page``) of the same document that ``/status.json`` returns
(``gateway.ops.status``), so the page and scripts always agree on the numbers.

The same server runs inside the gateway (``StatusServer(gateway, registry=...)``: gateway,
feeds, sessions, throughput, and the strobe when ``--strobe`` is on) and inside a
stand-alone ``gateway probe`` (``StatusServer(None, registry=..., prober=...)``: the probe
only). It sees the gateway only through :class:`StatusSource`: a snapshot and readiness.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, Protocol

import msgspec
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from gateway.aio import cancel_and_wait
from gateway.ops.page import render_html
from gateway.ops.snapshot import GatewaySnapshot, Totals
from gateway.ops.status import SAMPLE_S, Sample, ThroughputSampler, document

__all__ = ["ProbeSource", "StatusServer", "StatusSource"]

log = logging.getLogger("gateway.status")


class ProbeSource(Protocol):
    def status(self) -> dict[str, Any]:
        """The probe's part of /status.json."""
        ...


class StatusSource(Protocol):
    """What the status port needs of a gateway."""

    def snapshot(self) -> GatewaySnapshot: ...

    def totals(self) -> Totals:
        """The cheap part of the snapshot (sampled every second)."""
        ...

    def ready(self) -> tuple[bool, dict[str, str]]: ...

    @property
    def strobe(self) -> ProbeSource | None: ...


class StatusServer:
    def __init__(
        self,
        gateway: StatusSource | None,
        *,
        registry: CollectorRegistry | None = None,
        prober: ProbeSource | None = None,
    ) -> None:
        if registry is None:
            raise ValueError("StatusServer needs a registry to serve /metrics")
        self.gateway = gateway
        self.registry = registry
        self._prober = prober
        self.sampler = ThroughputSampler()
        self._server: asyncio.Server | None = None
        self._sampling: asyncio.Task[None] | None = None

    @property
    def prober(self) -> ProbeSource | None:
        if self._prober is not None:
            return self._prober
        return self.gateway.strobe if self.gateway is not None else None

    async def start(self, host: str, port: int, reuse_port: bool = False) -> int:
        self._server = await asyncio.start_server(
            self._handle, host, port, reuse_port=reuse_port or None
        )
        if self.gateway is not None:
            self._sampling = asyncio.get_running_loop().create_task(self._sample_forever())
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        await cancel_and_wait(self._sampling)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    # --- HTTP ------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
        except (
            TimeoutError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ConnectionError,
        ):
            writer.close()
            return
        line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = line.split()
        method, path = (parts[0], parts[1]) if len(parts) >= 2 else ("", "")
        path = path.split("?", 1)[0]
        try:
            status, ctype, body = self.route(method, path)
        except Exception:  # pragma: no cover - a bug in a page must not kill the server
            log.exception("status page failed: %s", path)
            status, ctype, body = "500 Internal Server Error", "text/plain", b"internal error\n"
        writer.write(
            f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            "Cache-Control: no-store\r\nConnection: close\r\n\r\n".encode()
            + (b"" if method == "HEAD" else body)
        )
        try:
            await writer.drain()
        except ConnectionError:
            pass
        writer.close()

    def route(self, method: str, path: str) -> tuple[str, str, bytes]:
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", "text/plain", b"method not allowed\n"
        gw = self.gateway
        if path == "/metrics":
            return "200 OK", CONTENT_TYPE_LATEST, generate_latest(self.registry)
        if path == "/healthz":
            return "200 OK", "text/plain", b"ok\n"
        if path == "/readyz":
            if gw is None:
                return "200 OK", "application/json", b'{"ready": true}'
            ok, detail = gw.ready()
            doc: dict[str, Any] = {"ready": ok, "feeds": detail}
            workers = getattr(gw, "workers_status", None)  # --workers N only
            if workers is not None:
                doc["workers"] = msgspec.to_builtins(workers())
            body = json.dumps(doc).encode()
            return ("200 OK" if ok else "503 Service Unavailable"), "application/json", body
        if path == "/status.json":
            body = json.dumps(self.document(), indent=1).encode()
            return "200 OK", "application/json", body
        if path in ("/status", "/status/", "/"):
            return "200 OK", "text/html; charset=utf-8", render_html(self.document()).encode()
        return "404 Not Found", "text/plain", b"not found\n"

    # --- numbers -----------------------------------------------------------------------

    async def _sample_forever(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(SAMPLE_S)

    def sample(self) -> None:
        if self.gateway is not None:
            self.sampler.add(Sample.of(self.gateway.totals(), time.monotonic()))

    def document(self) -> dict[str, Any]:
        """Everything /status shows, as plain data (also /status.json)."""
        gw = self.gateway
        snap = gw.snapshot() if gw is not None else None
        now = snap.taken_at if snap is not None else time.time()
        throughput = self.sampler.throughput(now) if snap is not None else None
        prober = self.prober
        return document(snap, throughput, prober.status() if prober is not None else None, now)
