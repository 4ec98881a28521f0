"""The start-up report: what the transport really is, detected from inside the process after
the listeners exist (a bypass stack is created with the first socket); one structured log
line, Prometheus metrics, and the policy (a requested bypass that is not loaded, or an io_uring
open under a preload, fails start-up unless ``bypass_required = false``)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gateway.transport.detect import (
    accelerated,
    find_library,
    io_uring_fds,
    mapped_libraries,
    vendor_symbols,
)
from gateway.transport.iouring import IO_URING
from gateway.transport.launch import read_env_file
from gateway.transport.vendors import (
    LAUNCH_MARKER,
    VENDORS,
    Kind,
    TransportError,
    parse_kind,
    profile_name,
)

if TYPE_CHECKING:
    from gateway.config import Config
    from gateway.metrics import Metrics

__all__ = ["TransportReport", "apply_report", "startup_report"]

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
    io_uring: str = "available"
    io_uring_fds: int = 0
    #: "accelerated/total" listening sockets (onload_fd_stat), or "" when unknown
    accelerated: str = ""
    env: dict[str, str] = field(default_factory=dict)
    socket_options: dict[str, Any] = field(default_factory=dict)
    #: why a requested bypass is not loaded (empty when it is)
    detail: str = ""

    def line(self) -> str:
        env = ",".join(f"{k}:{v}" for k, v in sorted(self.env.items()))
        opts = ",".join(f"{k}:{v}" for k, v in self.socket_options.items())
        return (
            f"transport={self.transport} vendor={self.vendor} requested={int(self.requested)}"
            f" loaded={int(self.loaded)} lib={self.library or '-'}"
            f" profile={self.profile or '-'} loop={self.loop} io_uring={self.io_uring}"
            f" io_uring_fds={self.io_uring_fds} accelerated={self.accelerated or '-'}"
            f" env={{{env}}} sockopts={{{opts}}}"
        )


def startup_report(
    cfg: Config, loop: str, listeners: Sequence[Any] = (), io_uring: str | None = None
) -> TransportReport:
    """Detect, from inside the process, what the transport really is (after the listeners
    exist: a bypass stack is created with the first socket). ``io_uring``: the state to
    report (default: this process's :data:`~gateway.transport.iouring.IO_URING` guard)."""
    kind = parse_kind(cfg.transport.kind)
    maps = mapped_libraries()
    symbols = vendor_symbols()
    path = find_library(kind, maps) if kind.requested else ""
    vendor = kind.vendor.name if kind.requested else "none"
    if kind.name == "preload" and vendor == "preload":
        vendor = next((name for name, ok in symbols.items() if ok), "preload")
    if not kind.requested:  # plain, but maybe started under a preload anyway: say so
        for v in VENDORS.values():
            found = find_library(Kind(v.name, v), maps)
            if found and symbols.get(v.name):
                vendor, path = v.name, found
                break
    loaded = bool(path) and (symbols.get(vendor, False) if vendor in VENDORS else True)
    detail = ""
    if kind.requested and not loaded:
        detail = _why_not_loaded(kind, path, vendor)
    prefixes = VENDORS[vendor].env_prefixes if vendor in VENDORS else kind.vendor.env_prefixes
    env = {k: v for k, v in os.environ.items() if k.startswith(prefixes) or k == "LD_PRELOAD"}
    accel = accelerated(listeners) if loaded else None
    return TransportReport(
        transport=kind.name,
        vendor=vendor,
        requested=kind.requested,
        loaded=loaded,
        library=path or (kind.library if kind.requested else ""),
        profile=(profile_name(cfg, kind) or "") if kind.requested else "",
        loop=loop,
        io_uring=IO_URING.state if io_uring is None else io_uring,
        io_uring_fds=io_uring_fds(),
        accelerated=f"{accel[0]}/{accel[1]}" if accel else "",
        env=env,
        detail=detail,
    )


def _why_not_loaded(kind: Kind, path: str, vendor: str) -> str:
    lib = kind.library or kind.vendor.library
    if path:
        return f"{path} is mapped but its {vendor} presence check does not answer"
    why = f"{lib} is not mapped in this process"
    if "/" in lib and not os.path.exists(lib):
        why += f" ({lib} does not exist)"
    elif LAUNCH_MARKER not in os.environ:
        why += " (this process was not launched under it)"
    preload = os.environ.get("LD_PRELOAD", "")
    if preload:
        why += (
            f"; LD_PRELOAD={preload}: ld.so only warns about a library it cannot preload "
            "(see its ERROR line above)"
        )
    return why


def apply_report(report: TransportReport, cfg: Config, metrics: Metrics) -> None:
    """Log the start-up line, export it, and apply the policy for a bypass not in effect."""
    log.info("transport %s", report.line())
    metrics.transport.info(
        {
            "transport": report.transport,
            "vendor": report.vendor,
            "requested": str(int(report.requested)),
            "loaded": str(int(report.loaded)),
            "library": report.library or "none",
            "profile": report.profile or "none",
            "loop": report.loop,
            "io_uring": report.io_uring,
        }
    )
    metrics.bypass_active.labels(report.vendor).set(1 if report.loaded else 0)
    metrics.io_uring_fds.set(report.io_uring_fds)
    if report.accelerated:
        count = int(report.accelerated.split("/")[0])
        metrics.listeners_accelerated.labels(report.vendor).set(count)
    t = cfg.transport
    if not report.requested and (t.profile or t.env_file):
        log.warning("transport=plain: transport.profile and transport.env_file are ignored")
    elif t.env_file:
        stale = sorted(k for k, v in read_env_file(t.env_file).items() if os.environ.get(k) != v)
        if stale:  # e.g. started under the wrapper by something else: the file came too late
            log.warning(
                "transport.env_file %s is not in effect for %s: this process was launched "
                "without it (give it to the launcher: EnvironmentFile=, launch-onload.sh "
                "--env-file)",
                t.env_file,
                ",".join(stale),
            )
    if report.loaded and report.accelerated.startswith("0/"):
        log.warning(
            "%s is loaded but accelerates none of the listening sockets: is the listen address "
            "on one of its interfaces? (loopback is never accelerated by default)",
            report.vendor,
        )
    problems = []
    if report.requested and not report.loaded:
        problems.append(f"transport {report.transport} was requested but is not loaded: "
                        f"{report.detail}")  # fmt: skip
    if (report.requested or report.loaded) and report.io_uring_fds:
        problems.append(
            f"{report.io_uring_fds} io_uring descriptor(s) are open under a preload: socket "
            "registrations through them bypass the preload library"
        )
    for problem in problems:
        if t.bypass_required:
            raise TransportError(
                f"{problem}. Fix the launch, or start with --bypass-required=false to run "
                "anyway on whatever the process has"
            )
        log.warning("%s (bypass_required=false: serving anyway)", problem)
