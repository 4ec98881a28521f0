"""Who may connect: connection limits, the unauthenticated count, the per-IP rate.

A connection over a limit is refused at once with ``success=0|error=<text>`` (the only
answer a client parses before authentication), counted in
``gateway_connections_total{result="rejected"}`` and ``gateway_limit_hits_total`` (by its
``reason``) and logged at most once a second per reason. The limits are the ``[limits]``
section of the config (``LimitsConfig``) as it is; a reload replaces it.

With ``--workers N`` (``Admission.shared``, a ``gateway.workers.limits.SharedLimits``) the
connection counts are the whole gateway's: ``max_connections`` and ``max_unauthenticated``
are checked and counted in the shared file, with the same refusal lines; the per-IP rate
stays per worker, each allowing ``per_ip_rate / N`` a second and a burst of
``ceil(per_ip_burst / N)``. Without it (one process) nothing here looks at it but one
``None`` check per connection attempt.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gateway.config import LimitsConfig

if TYPE_CHECKING:
    from gateway.metrics import Metrics
    from gateway.workers.limits import SharedLimits

__all__ = ["Admission", "Refusal", "burst_per_worker", "peer_of_socket", "refuse_queued"]

log = logging.getLogger("gateway.session")

#: per-IP token buckets kept at most (then forgotten all at once: a flood of sources)
MAX_TRACKED_IPS = 100_000


@dataclass(frozen=True)
class Refusal:
    #: machine-readable (metrics label, log)
    reason: str
    #: what the client is told
    text: str


_MAX_CONNECTIONS = Refusal("max_connections", "too many connections to this gateway")
_MAX_UNAUTHENTICATED = Refusal("max_unauthenticated", "too many unauthenticated connections")


def burst_per_worker(burst: int, workers: int) -> int:
    """A worker's share of ``per_ip_burst`` with ``workers`` workers: divided, rounded up."""
    return -(-burst // max(1, workers))


@dataclass
class Admission:
    """Admission decisions for new connections, and the connections still to authenticate."""

    #: connections admitted that have not authenticated yet (released once, by discard)
    unauthenticated: set[object] = field(default_factory=set)
    #: with ``--workers N``: the gateway-wide counts (None: this process is the gateway)
    shared: SharedLimits | None = None
    _ip_tokens: dict[str, tuple[float, float]] = field(default_factory=dict)
    _rejections_logged: dict[str, tuple[float, int]] = field(default_factory=dict)

    def refusal(
        self, ip: str, now: float, *, accepting: bool, open_connections: int, limits: LimitsConfig
    ) -> Refusal | None:
        """Why a new connection from ``ip`` is refused, or None to admit it."""
        if not accepting:
            return Refusal("shutting_down", "gateway is shutting down")
        if open_connections >= limits.max_connections:
            return _MAX_CONNECTIONS
        shared = self.shared
        if shared is None:
            if len(self.unauthenticated) >= limits.max_unauthenticated:
                return _MAX_UNAUTHENTICATED
        else:
            reason = shared.try_open(limits.max_connections, limits.max_unauthenticated)
            if reason is not None:
                return _MAX_CONNECTIONS if reason == "max_connections" else _MAX_UNAUTHENTICATED
        if not self._admit_ip(ip, now, limits):
            if shared is not None:
                shared.undo_open()
            return Refusal("ip_rate", f"too many new connections per second from {ip}; wait 1 s")
        return None

    def refuse(self, metrics: Metrics, peer: str, refusal: Refusal) -> bytes:
        """Count and log a refusal; returns the line to answer it with."""
        metrics.connections.labels("rejected", refusal.reason).inc()
        self.log_rejection(peer, refusal.reason)
        if refusal.reason != "shutting_down":
            metrics.limit_hits.labels(refusal.reason).inc()
        return b"success=0|error=" + refusal.text.encode() + b"\n"

    def log_rejection(self, peer: str, reason: str) -> None:
        """A refused connection, logged at most once a second per reason (with a count)."""
        now = time.monotonic()
        last, suppressed = self._rejections_logged.get(reason, (0.0, 0))
        if now - last < 1.0:
            self._rejections_logged[reason] = (last, suppressed + 1)
            return
        self._rejections_logged[reason] = (now, 0)
        log.warning("connection refused peer=%s reason=%s suppressed=%d", peer, reason, suppressed)

    def _admit_ip(self, ip: str, now: float, lim: LimitsConfig) -> bool:
        if lim.per_ip_rate <= 0:
            return True
        if lim.exempt_loopback:
            try:
                if ipaddress.ip_address(ip).is_loopback:
                    return True
            except ValueError:
                pass
        rate, burst = lim.per_ip_rate, float(lim.per_ip_burst)
        if self.shared is not None:  # this worker's share of the gateway's rate
            workers = self.shared.workers
            rate, burst = rate / workers, float(burst_per_worker(lim.per_ip_burst, workers))
        tokens, at = self._ip_tokens.get(ip, (burst, now))
        tokens = min(burst, tokens + (now - at) * rate)
        if tokens < 1.0:
            self._ip_tokens[ip] = (tokens, now)
            return False
        self._ip_tokens[ip] = (tokens - 1.0, now)
        if len(self._ip_tokens) > MAX_TRACKED_IPS:
            self._ip_tokens.clear()
        return True


def refuse_queued(admission: Admission, metrics: Metrics, sock: socket.socket, text: str) -> None:
    """A connection taken from the accept queue as the listener closes: answered with
    ``success=0|error=<text>`` (counted and logged as a refusal), then closed."""
    peer = "?"
    try:
        peer = peer_of_socket(sock)
        sock.setblocking(False)
        sock.send(b"success=0|error=" + text.encode() + b"\n")
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    finally:
        sock.close()
    metrics.connections.labels("rejected", "shutting_down").inc()
    admission.log_rejection(peer, "shutting_down")


def peer_of_socket(sock: socket.socket) -> str:
    peer = sock.getpeername()
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
