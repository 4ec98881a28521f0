"""What one client connection reports: the ``gateway_sessions`` gauge by phase, bytes out
(into the server's running total, ``ServerState.bytes_out``), the write-buffer histogram,
the disconnect reason, and the session's start and end log lines.

The adapter (``connection.ClientConnection``) keeps its hot-path counters (records and
bytes written) itself; ``SessionAccount`` reads them when it exports or logs, never per
chunk.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.connection import ClientConnection
    from gateway.control import AuthRequest
    from gateway.metrics import Metrics

__all__ = ["SessionAccount"]

log = logging.getLogger("gateway.session")


class SessionAccount:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.started_at = 0.0
        #: why the connection ended: a label (the disconnect metric) and a text (the log)
        self.end_label = "client_closed"
        self.end_reason = "client closed"
        self._gauge: tuple[str, str, str, str] | None = None
        self._bytes_exported = 0
        self._bytes_at_last_tick = 0

    def ending(self, label: str, text: str) -> None:
        self.end_label, self.end_reason = label[:40], text

    def auth_refused(self, conn: ClientConnection, reason: str, key_id: str, dataset: str) -> None:
        """The client is told a generic reason; the log names the key and the dataset."""
        self.metrics.auth_failures.labels(reason).inc()
        log.info(
            "auth refused peer=%s reason=%s key_id=%s dataset=%r",
            *(conn.peer, reason, key_id, dataset[:40]),
        )

    def refused(self, conn: ClientConnection, kind: str, detail: str) -> None:
        """A connection ended before it authenticated."""
        log.info("session refused peer=%s reason=%s detail=%r", conn.peer, kind, detail[:120])

    def started(self, conn: ClientConnection, req: AuthRequest) -> None:
        """Authenticated: the start line, and the gauge in phase ``authenticated``."""
        self.started_at = time.time()
        self.phase(conn, "authenticated")
        log.info(
            "session start session_id=%d peer=%s dataset=%s key_id=%s compression=%s "
            "ts_out=%d client=%r",
            conn.session_id,
            conn.peer,
            req.dataset,
            conn.key.key_id if conn.key else "",
            req.compression,
            int(req.ts_out),
            req.client[:80],
        )

    def phase(self, conn: ClientConnection, phase: str | None) -> None:
        """Move the connection's gauge series to ``phase`` (None: out of the gauge)."""
        series = self.metrics.session_series
        if self._gauge is not None:
            series(self._gauge).dec()
            self._gauge = None
        if phase is not None and conn.feed is not None:
            compression = "zstd" if conn.zstd else "none"
            labels = (conn.feed.dataset, compression, "1" if conn.ts_out else "0", phase)
            series(labels).inc()
            self._gauge = labels

    def export_bytes(self, conn: ClientConnection) -> None:
        """Add the bytes written since the last call to the server's running total
        (``gateway_bytes_out_total`` at the next scrape)."""
        if conn.feed is None or conn.bytes_sent == self._bytes_exported:
            return
        totals = conn.state.bytes_out
        key = (conn.feed.dataset, "zstd" if conn.zstd else "none")
        totals[key] = totals.get(key, 0) + conn.bytes_sent - self._bytes_exported
        self._bytes_exported = conn.bytes_sent

    def observe_buffer(self, conn: ClientConnection, buffered: int) -> None:
        """The write-buffer histogram, for active sessions only (an idle one costs nothing)."""
        if buffered or conn.bytes_sent != self._bytes_at_last_tick:
            self.metrics.session_buffered.observe(buffered)
            self._bytes_at_last_tick = conn.bytes_sent

    def ended(self, conn: ClientConnection) -> None:
        """The session is gone: its end line and disconnect reason (authenticated only)."""
        self.phase(conn, None)
        if conn.key is None:
            return
        self.metrics.disconnects.labels(self.end_label).inc()
        session = conn.session
        log.info(
            "session end session_id=%d peer=%s dataset=%s key_id=%s compression=%s ts_out=%d "
            "subscriptions=%d records=%d bytes=%d skipped=%d duration_s=%.3f reason=%s",
            conn.session_id,
            conn.peer,
            conn.feed.dataset if conn.feed else "",
            conn.key.key_id,
            "zstd" if conn.zstd else "none",
            int(conn.ts_out),
            len(session.subscriptions) if session else 0,
            conn.records_sent,
            conn.bytes_sent,
            conn.slow.skipped_total,
            time.time() - self.started_at,
            self.end_reason,
        )
