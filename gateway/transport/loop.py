"""The event loop: which one (uvloop or the stdlib asyncio loop) and running a coroutine on it.

:func:`run_loop` is the one runner of ``gateway serve`` (after :func:`choose_loop`) and
``gateway probe`` (``--loop`` as given)."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from gateway.errors import ConfigError
from gateway.transport.detect import bypass_mapped
from gateway.transport.iouring import IO_URING
from gateway.transport.vendors import parse_kind

if TYPE_CHECKING:
    from gateway.config import Config

__all__ = ["choose_loop", "installed_loop", "run_loop"]

log = logging.getLogger("gateway.transport")
T = TypeVar("T")


def installed_loop(requested: str) -> str:
    """``uvloop`` or ``asyncio`` for ``--loop auto|uvloop|asyncio``: auto is uvloop when it is
    installed; an explicit uvloop that is not installed is a ConfigError."""
    if requested == "asyncio":
        return "asyncio"
    try:
        import uvloop  # noqa: F401
    except ImportError:
        if requested == "uvloop":
            raise ConfigError("loop=uvloop but uvloop is not installed") from None
        return "asyncio"
    return "uvloop"


def choose_loop(cfg: Config) -> str:
    """The event loop for this process.

    Plain sockets: ``auto`` is uvloop when installed. While any preload library is active
    (``LD_PRELOAD`` set, or a bypass transport or library), ``io_uring_setup`` is blocked and
    verified (:class:`~gateway.transport.iouring.IoUringGuard`) whatever the loop, and uvloop
    is refused if it cannot be. Under a bypass transport or library, ``auto`` also picks the
    stdlib asyncio loop, whose epoll calls all go through libc; an explicit ``uvloop`` is
    honoured (libuv then falls back to libc epoll_ctl, which the preload sees).
    What each choice costs on plain sockets is measured by
    ``python -m tests.transport_fakes.loop_cost`` (uvloop, uvloop without io_uring, asyncio)."""
    kind = parse_kind(cfg.transport.kind)
    name = installed_loop(cfg.loop)
    bypass = kind.requested or bypass_mapped()
    if bypass or os.environ.get("LD_PRELOAD", "").strip():
        state = IO_URING.block()
        if bypass and cfg.loop == "auto":
            name = "asyncio"
            log.info("loop=auto under a kernel-bypass library: the stdlib asyncio loop")
        if not state.startswith("blocked") and name == "uvloop":
            raise ConfigError(
                f"loop=uvloop: a preload library is active but io_uring cannot be blocked "
                f"({state}); uvloop would register sockets through io_uring behind the "
                "preload's back. Use --loop asyncio (or auto)"
            )
    return name


def run_loop(main: Coroutine[Any, Any, T], loop: str = "auto") -> T:
    """Run ``main`` to completion on a new event loop: ``uvloop``, ``asyncio`` or ``auto``
    (:func:`installed_loop`). ``main`` is closed, never awaited, when the loop is refused."""
    try:
        name = installed_loop(loop)
    except ConfigError:
        main.close()
        raise
    if name == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)
