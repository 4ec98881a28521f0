"""Socket and thread tuning: SO_SNDBUF, SO_RCVBUF, SO_BUSY_POLL (read back), SO_REUSEPORT
on the listeners, and the event-loop thread's CPUs."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from gateway.errors import ConfigError

if TYPE_CHECKING:
    from gateway.config import Config

__all__ = ["SO_BUSY_POLL", "SocketTuner", "pin_loop_thread", "place_workers", "tune_listeners"]

log = logging.getLogger("gateway.transport")
SO_BUSY_POLL = getattr(socket, "SO_BUSY_POLL", 46)


class SocketTuner:
    """Applies ``transport.sndbuf/rcvbuf/busy_poll_us`` to sockets, warning once per option
    (not once per connection) when the kernel refuses one."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        #: options whose refusal was already logged
        self.warned: set[str] = set()

    def __call__(self, sock: Any) -> dict[str, Any]:
        return self.tune(sock)

    def tune(self, sock: Any, strict: bool = False) -> dict[str, Any]:
        """Apply the options to a socket (listening or accepted, a real socket or a loop's
        transport socket); returns the values read back. ``strict``: raise a ConfigError
        naming the option when the kernel refuses (the listeners at start-up); otherwise log
        it once and go on (per accepted connection)."""
        t = self.cfg.transport
        applied: dict[str, Any] = {}
        for name, level, opt, value in (
            ("sndbuf", socket.SOL_SOCKET, socket.SO_SNDBUF, t.sndbuf),
            ("rcvbuf", socket.SOL_SOCKET, socket.SO_RCVBUF, t.rcvbuf),
            ("busy_poll", socket.SOL_SOCKET, SO_BUSY_POLL, t.busy_poll_us),
        ):
            if value is None:
                continue
            try:
                sock.setsockopt(level, opt, value)
                applied[name] = sock.getsockopt(level, opt)
            except OSError as exc:
                field_name = "busy_poll_us" if name == "busy_poll" else name
                hint = " (raising it needs CAP_NET_ADMIN)" if name == "busy_poll" else ""
                msg = f"transport.{field_name}={value}: setsockopt failed: {exc.strerror}{hint}"
                if strict:
                    raise ConfigError(msg) from None
                if name not in self.warned:
                    self.warned.add(name)
                    log.warning("%s", msg)
        return applied


def tune_listeners(sockets: Sequence[Any], cfg: Config) -> dict[str, Any]:
    """Tune every listening socket (accepted sockets inherit these on Linux; the per-connection
    hook applies them again for stacks that do not); report what the first one has."""
    tuner = SocketTuner(cfg)
    out: dict[str, Any] = {"sndbuf": "auto", "rcvbuf": "auto", "busy_poll": "off"}
    for i, sock in enumerate(sockets):
        applied = tuner.tune(sock, strict=True)
        if i == 0:
            out.update(applied)
            out["reuse_port"] = int(
                bool(sock.getsockopt(socket.SOL_SOCKET, getattr(socket, "SO_REUSEPORT", 15)))
            )
    if cfg.transport.busy_poll_us == 0:
        out["busy_poll"] = "off"
    return out


def pin_loop_thread(cfg: Config, loop: Any = None) -> dict[str, str]:
    """Pin the calling (event-loop) thread to ``transport.cpu_affinity``; helper threads of the
    loop's default executor are kept on the other CPUs this process may use."""
    cpus = cfg.transport.cpu_affinity
    allowed = os.sched_getaffinity(0)
    if not cpus:
        return {"cpus": "all"}
    bad = sorted(set(cpus) - allowed)
    if bad:
        raise ConfigError(
            f"transport.cpu_affinity: CPU {','.join(map(str, bad))} is not available to this "
            f"process (allowed: {','.join(map(str, sorted(allowed)))})"
        )
    os.sched_setaffinity(0, cpus)  # pid 0 = the calling thread only
    others = allowed - set(cpus)
    out = {"cpus": _cpulist(set(cpus))}
    if others and loop is not None:
        loop.set_default_executor(
            ThreadPoolExecutor(
                thread_name_prefix="gateway-helper",
                initializer=os.sched_setaffinity,
                initargs=(0, others),
            )
        )
        out["helper_cpus"] = _cpulist(others)
    return out


def _cpulist(cpus: Iterable[int]) -> str:
    return "+".join(str(c) for c in sorted(cpus))  # no commas: the report line uses them


def place_workers(
    cpus: Sequence[int] | None, workers: int
) -> tuple[list[int] | None, list[list[int] | None]]:
    """``transport.cpu_affinity`` with ``--workers N``: (the supervisor's CPUs, each worker's
    CPUs). The supervisor (feeds, journal, ring writer) gets the first CPU, worker ``i`` the
    CPU ``cpus[1 + i % (len(cpus) - 1)]``; one CPU given: all of them on it. No CPUs given:
    None (every process may run anywhere)."""
    if not cpus:
        return None, [None] * workers
    first, rest = cpus[0], list(cpus[1:]) or [cpus[0]]
    return [first], [[rest[i % len(rest)]] for i in range(workers)]
