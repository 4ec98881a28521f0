"""Listening sockets, socket options, event-loop choice, kernel-bypass launch and detection.

This is the plain-sockets skeleton; the preload (onload / vma / exasock / preload:PATH)
launch and detection are built on the same entry points:

* ``maybe_relaunch(cfg, argv)`` — before anything else: exec under the vendor wrapper or
  with LD_PRELOAD when a bypass transport is requested and not yet applied.
* ``choose_loop(cfg)`` — "uvloop" or "asyncio".
* ``tune_socket(sock, cfg)`` — per listening / accepted socket.
* ``startup_report(cfg)`` / ``apply_report(report, cfg, metrics)`` — after the listeners
  exist: detect, log one structured line, export metrics, enforce the policy.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.config import Config
from gateway.errors import ConfigError
from gateway.metrics import Metrics

__all__ = [
    "TransportReport",
    "apply_report",
    "choose_loop",
    "maybe_relaunch",
    "startup_report",
    "tune_socket",
]

log = logging.getLogger("gateway.transport")


@dataclass
class TransportReport:
    transport: str
    vendor: str = "none"
    requested: bool = False
    loaded: bool = False
    library: str = ""
    profile: str = ""
    loop: str = ""
    io_uring_fds: int = 0
    env: dict[str, str] = field(default_factory=dict)
    socket_options: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        env = ",".join(f"{k}:{v}" for k, v in sorted(self.env.items()))
        opts = ",".join(f"{k}:{v}" for k, v in sorted(self.socket_options.items()))
        return (
            f"transport={self.transport} vendor={self.vendor} requested={int(self.requested)}"
            f" loaded={int(self.loaded)} lib={self.library or '-'} "
            f"profile={self.profile or '-'} loop={self.loop} io_uring_fds={self.io_uring_fds}"
            f" env={{{env}}} sockopts={{{opts}}}"
        )


def maybe_relaunch(cfg: Config, argv: Sequence[str]) -> None:
    kind = cfg.transport.kind
    if kind != "plain":
        raise ConfigError(f"transport.kind={kind} is not supported yet: use plain")


def choose_loop(cfg: Config) -> str:
    if cfg.loop == "asyncio":
        return "asyncio"
    try:
        import uvloop  # noqa: F401
    except ImportError:
        if cfg.loop == "uvloop":
            raise ConfigError("loop=uvloop but uvloop is not installed") from None
        return "asyncio"
    return "uvloop"


def tune_socket(sock: Any, cfg: Config) -> dict[str, Any]:
    """Apply the configured socket options; returns what was applied."""
    t = cfg.transport
    applied: dict[str, Any] = {}
    if t.sndbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, t.sndbuf)
        applied["sndbuf"] = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    if t.rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, t.rcvbuf)
        applied["rcvbuf"] = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    return applied


def startup_report(cfg: Config, loop: str) -> TransportReport:
    return TransportReport(transport=cfg.transport.kind, loop=loop, io_uring_fds=_io_uring_fds())


def apply_report(report: TransportReport, cfg: Config, metrics: Metrics) -> None:
    log.info("transport %s", report.line())
    metrics.transport.info(
        {
            "transport": report.transport,
            "vendor": report.vendor,
            "requested": str(int(report.requested)),
            "loaded": str(int(report.loaded)),
            "library": report.library,
            "profile": report.profile,
            "loop": report.loop,
        }
    )
    metrics.bypass_active.labels(report.vendor).set(1 if report.loaded else 0)


def _io_uring_fds(pid: int | str = "self") -> int:
    count = 0
    try:
        for name in os.listdir(f"/proc/{pid}/fd"):
            try:
                if "io_uring" in os.readlink(f"/proc/{pid}/fd/{name}"):
                    count += 1
            except OSError:
                continue
    except OSError:
        return 0
    return count
