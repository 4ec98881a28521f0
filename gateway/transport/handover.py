"""The process around the listeners: the descriptor limit and the connection budget under
it, other listeners sharing a port (SO_REUSEPORT hand-over, read from ``/proc/net/tcp*``),
draining an accept queue before a listener closes, and telling systemd ``READY=1`` /
``STOPPING=1``."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "FD_RESERVE",
    "connection_budget",
    "drain_accept_queue",
    "migrates_accept_queue",
    "notify_service_manager",
    "open_fds",
    "other_listeners",
    "raise_fd_limit",
]

log = logging.getLogger("gateway.transport")

#: descriptors kept free beyond those open at start-up, for what is not a client connection:
#: metrics and status requests, ingest publishers (and the newcomers they refuse), file feeds
#: reopening, the strobe and its SQLite history, a refused client's own accept
FD_RESERVE = 64


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit (capped by ``fs.nr_open`` when the
    hard limit is unlimited); returns the (soft, hard) limits now in effect."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        try:
            target = int(Path("/proc/sys/fs/nr_open").read_text())
        except (OSError, ValueError):
            target = 1 << 20
    if soft != resource.RLIM_INFINITY and target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError) as exc:
            log.warning("could not raise RLIMIT_NOFILE from %d to %d: %s", soft, target, exc)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    unlimited = 1 << 62
    return (
        unlimited if soft == resource.RLIM_INFINITY else soft,
        unlimited if hard == resource.RLIM_INFINITY else hard,
    )


def open_fds() -> int:
    """How many descriptors this process has open (Linux; a guess elsewhere)."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # less the one listdir itself opened
    except OSError:
        return 16


def connection_budget(max_connections: int, fd_limit: int, in_use: int) -> int:
    """The most client connections that fit under ``fd_limit`` with ``in_use`` descriptors
    already open and :data:`FD_RESERVE` kept free (may be < 1: nothing fits)."""
    return min(max_connections, fd_limit - in_use - FD_RESERVE)


def _proc_listeners() -> list[tuple[int, str, int, int]]:
    """(family, address, port, inode) of every TCP socket in LISTEN state in this network
    namespace, from /proc/net/tcp and tcp6; [] where they cannot be read."""
    out: list[tuple[int, str, int, int]] = []
    for name, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        try:
            with open(f"/proc/net/{name}") as f:
                next(f, None)
                for line in f:
                    parts = line.split()
                    if len(parts) < 10 or parts[3] != "0A":
                        continue
                    hexaddr, _, hexport = parts[1].partition(":")
                    raw = bytes.fromhex(hexaddr)
                    # /proc prints each 32-bit word of the address in host (little-endian) order
                    raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                    out.append(
                        (family, socket.inet_ntop(family, raw), int(hexport, 16), int(parts[9]))
                    )
        except (OSError, ValueError):
            continue
    return out


def other_listeners(sockets: Sequence[Any]) -> int:
    """How many listening sockets of other processes (or other sockets of this one) are bound
    to exactly the address and port of one of ``sockets``: with SO_REUSEPORT, a successor (or
    predecessor) sharing the port in a hand-over. 0 where /proc cannot tell."""
    mine: set[int] = set()
    addrs: set[tuple[int, str, int]] = set()
    for sock in sockets:
        try:
            mine.add(os.fstat(sock.fileno()).st_ino)
            host, port = sock.getsockname()[:2]
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            addrs.add((family, socket.inet_ntop(family, socket.inet_pton(family, host)), port))
        except (OSError, ValueError):
            continue
    return sum(
        1
        for family, host, port, inode in _proc_listeners()
        if inode not in mine and (family, host, port) in addrs
    )


def migrates_accept_queue() -> bool:
    """``net.ipv4.tcp_migrate_req`` is on: when a SO_REUSEPORT listener closes, the kernel
    (Linux 5.14+) moves the connections waiting in its accept queue to another listener of
    the group instead of resetting them."""
    try:
        return Path("/proc/sys/net/ipv4/tcp_migrate_req").read_text().strip() == "1"
    except OSError:
        return False


def notify_service_manager(state: str) -> bool:
    """Tell systemd (``Type=notify``; ``$NOTIFY_SOCKET``) about this process: ``READY=1``
    once listening (with ``MAINPID=``, so that a successor started by ``ExecReload=`` becomes
    the unit's main process where ``NotifyAccess=all``), ``STOPPING=1`` on the way out.
    Returns whether a message was sent; without a service manager it does nothing."""
    path = os.environ.get("NOTIFY_SOCKET", "")
    if not path or path[0] not in "/@":
        return False
    address = "\0" + path[1:] if path[0] == "@" else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except OSError as exc:
        log.warning("could not notify the service manager (%s): %s", state.split("\n")[0], exc)
        return False
    return True


def drain_accept_queue(
    listener: Any, handle: Callable[[socket.socket], None], limit: int = 65536
) -> int:
    """Accept, without waiting, the connections queued on a listening socket that the event
    loop owns (through a duplicate of its descriptor), handing each to ``handle`` at once (one
    descriptor at a time). Called just before the listener is closed, so that they are
    answered instead of reset. Returns how many were taken."""
    count = 0
    try:
        dup = socket.socket(fileno=os.dup(listener.fileno()))
    except OSError:
        return count
    with dup:
        dup.setblocking(False)
        while count < limit:
            try:
                conn, _ = dup.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # EMFILE, ECONNABORTED, ...: leave the rest to the kernel
                log.warning("draining the accept queue stopped: %s", exc)
                break
            count += 1
            handle(conn)
    return count
