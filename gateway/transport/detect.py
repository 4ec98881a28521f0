"""What is really loaded, seen from inside the process: the files mapped into it
(``/proc/PID/maps``), each vendor's in-process presence API, which listening sockets Onload
accelerates (``onload_fd_stat``) and the io_uring descriptors a process holds. Nothing here
loads or changes anything."""

from __future__ import annotations

import ctypes
import os
import socket
from collections.abc import Sequence
from typing import Any

from gateway.transport.vendors import VENDORS, Kind

__all__ = [
    "accelerated",
    "bypass_mapped",
    "find_library",
    "io_uring_fds",
    "mapped_libraries",
    "vendor_symbols",
]

_SO_VMA_GET_API = 2800  # libvma src/vma/vma_extra.h


def mapped_libraries(pid: int | str = "self") -> list[str]:
    """Paths of the files mapped into a process (``/proc/PID/maps``), in first-seen order."""
    seen: dict[str, None] = {}
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) == 6 and parts[5].startswith("/"):
                    seen.setdefault(parts[5].rstrip("\n"), None)
    except OSError:
        return []
    return list(seen)


def find_library(kind: Kind, maps: Sequence[str]) -> str:
    """The mapped path of the transport's library, or ''."""
    want = kind.library if kind.name == "preload" else ""
    if want and "/" in want:
        real = os.path.realpath(want)
        try:
            st = os.stat(want)
            ident: tuple[int, int] | None = (st.st_dev, st.st_ino)
        except OSError:
            ident = None
        for path in maps:
            if path == real:
                return path
            if ident is not None:
                try:
                    st = os.stat(path)
                except OSError:
                    continue
                if (st.st_dev, st.st_ino) == ident:
                    return path
        return ""
    for path in maps:
        base = os.path.basename(path)
        if any(base.startswith(p) for p in kind.vendor.patterns):
            return path
    return ""


def bypass_mapped(maps: Sequence[str] | None = None) -> bool:
    """A known bypass library is mapped (started under a wrapper, /etc/ld.so.preload, ...)."""
    found = mapped_libraries() if maps is None else maps
    return any(find_library(Kind(v.name, v), found) for v in VENDORS.values())


def vendor_symbols() -> dict[str, bool]:
    """Ask each vendor's in-process presence API (never loads anything)."""
    out: dict[str, bool] = {}
    me = ctypes.CDLL(None, use_errno=True)  # dlopen(NULL): the program and its preloads
    fn = getattr(me, "onload_is_present", None)
    if fn is not None:
        fn.restype = ctypes.c_int
        out["onload"] = bool(fn())
    fn = getattr(me, "exasock_loaded", None)
    if fn is not None:
        fn.restype = ctypes.c_int
        out["exasock"] = bool(fn())
    api = ctypes.c_void_p()
    size = ctypes.c_uint32(ctypes.sizeof(api))
    rc = me.getsockopt(
        -1, socket.SOL_SOCKET, _SO_VMA_GET_API, ctypes.byref(api), ctypes.byref(size)
    )
    if rc == 0 and api.value:
        out["vma"] = True
    return out


class _OnloadStat(ctypes.Structure):
    _fields_ = [
        ("stack_id", ctypes.c_int32),
        ("stack_name", ctypes.c_void_p),
        ("endpoint_id", ctypes.c_int32),
        ("endpoint_state", ctypes.c_int32),
    ]


def accelerated(sockets: Sequence[Any]) -> tuple[int, int] | None:
    """(accelerated, total) listening sockets via ``onload_fd_stat``; None when unknown."""
    me = ctypes.CDLL(None)
    fn = getattr(me, "onload_fd_stat", None)
    if fn is None or not sockets:
        return None
    fn.restype = ctypes.c_int
    free = me.free
    free.argtypes = [ctypes.c_void_p]
    count = 0
    for sock in sockets:
        st = _OnloadStat()
        if fn(sock.fileno(), ctypes.byref(st)) == 1:
            count += 1
        if st.stack_name:
            free(st.stack_name)
    return count, len(sockets)


def io_uring_fds(pid: int | str = "self") -> int:
    """``anon_inode:[io_uring]`` descriptors of a process."""
    count = 0
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return 0
    for name in names:
        try:
            if "io_uring" in os.readlink(f"/proc/{pid}/fd/{name}"):
                count += 1
        except OSError:
            continue
    return count
