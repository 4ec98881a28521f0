"""Listening sockets, socket options, event-loop choice, kernel-bypass launch and detection.

Kernel-bypass stacks (AMD Solarflare Onload, NVIDIA VMA, Cisco ExaSock) accelerate an
unmodified program by preloading a library at launch, usually through a wrapper (``onload
--profile=latency cmd``). The gateway makes that a first-class launch mode, one job per module:

* :mod:`~gateway.transport.vendors` — the transport kinds, each vendor's wrapper, library,
  variables and profiles, and the checks on ``transport.kind`` / ``transport.profile``.
* :mod:`~gateway.transport.launch` — the environment file, the launch plan and
  ``maybe_relaunch(cfg, argv)``, first thing in ``gateway serve``: exec (same pid) the
  vendor's wrapper or this interpreter with ``LD_PRELOAD``, once.
  :mod:`~gateway.transport.onload_launch` is ``deploy/launch-onload.sh``: host checks, then
  the same exec composed by the same code (not imported here: it is run with ``-m``).
* :mod:`~gateway.transport.iouring` — under any preload, ``io_uring_setup`` is made to fail
  with ENOSYS by a seccomp filter (and that is verified).
* :mod:`~gateway.transport.loop` — ``choose_loop(cfg)`` ("uvloop" or "asyncio"; the stdlib
  loop under a bypass library) and ``run_loop(coro, name)``, the runner of ``serve`` and
  ``probe``.
* :mod:`~gateway.transport.sockets` — SO_SNDBUF, SO_RCVBUF, SO_BUSY_POLL, SO_REUSEPORT (read
  back) and the loop thread's CPUs.
* :mod:`~gateway.transport.detect` and :mod:`~gateway.transport.report` — after the listeners
  exist: is the library mapped (/proc/self/maps), does the vendor's presence symbol answer,
  any io_uring descriptors; one structured log line, Prometheus metrics, and the policy (a
  requested bypass that is not loaded fails start-up unless ``bypass_required = false``).
* :mod:`~gateway.transport.handover` — the descriptor limit and connection budget, listeners
  sharing a port, draining an accept queue, systemd notifications.

Everything logs as ``gateway.transport``. This package re-exports the names the rest of the
gateway uses (``from gateway import transport; transport.choose_loop(cfg)``).
"""

from __future__ import annotations

from gateway.transport.detect import io_uring_fds, mapped_libraries
from gateway.transport.handover import (
    FD_RESERVE,
    connection_budget,
    drain_accept_queue,
    migrates_accept_queue,
    notify_service_manager,
    open_fds,
    other_listeners,
    raise_fd_limit,
)
from gateway.transport.iouring import IO_URING, IoUringGuard, block_io_uring
from gateway.transport.launch import (
    LaunchPlan,
    compose_launch,
    maybe_relaunch,
    plan_launch,
    read_env_file,
)
from gateway.transport.loop import choose_loop, installed_loop, run_loop
from gateway.transport.report import TransportReport, apply_report, startup_report
from gateway.transport.sockets import (
    SO_BUSY_POLL,
    SocketTuner,
    pin_loop_thread,
    place_workers,
    tune_listeners,
)
from gateway.transport.vendors import LAUNCH_MARKER, VENDORS, TransportError, Vendor

__all__ = [
    "FD_RESERVE",
    "IO_URING",
    "LAUNCH_MARKER",
    "SO_BUSY_POLL",
    "VENDORS",
    "IoUringGuard",
    "LaunchPlan",
    "SocketTuner",
    "TransportError",
    "TransportReport",
    "Vendor",
    "apply_report",
    "block_io_uring",
    "choose_loop",
    "compose_launch",
    "connection_budget",
    "drain_accept_queue",
    "installed_loop",
    "io_uring_fds",
    "mapped_libraries",
    "maybe_relaunch",
    "migrates_accept_queue",
    "notify_service_manager",
    "open_fds",
    "other_listeners",
    "pin_loop_thread",
    "place_workers",
    "plan_launch",
    "raise_fd_limit",
    "read_env_file",
    "run_loop",
    "startup_report",
    "tune_listeners",
]
