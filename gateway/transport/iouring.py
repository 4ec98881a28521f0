"""Keeping io_uring away from a preload library: a seccomp filter that makes
``io_uring_setup`` fail with ENOSYS, installed and then verified.

uvloop 0.23 (libuv 1.52) batches ``epoll_ctl`` through an io_uring that no preload library
can see; with ``io_uring_setup`` failing, libuv falls back to libc ``epoll_ctl``, which the
preload intercepts. The filter is a seven-instruction classic BPF program: other
architectures and every other system call are allowed; ``io_uring_setup`` (and its x32
number) returns ENOSYS.

A seccomp filter belongs to the process (all threads, and its children) and cannot be
removed, so its state is kept once per process, in :data:`IO_URING` (an
:class:`IoUringGuard`), which the loop choice sets and the start-up report reads.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct

__all__ = ["IO_URING", "IoUringGuard", "block_io_uring"]

_SYS_IO_URING_SETUP = 425  # the same number on every architecture since Linux 5.1
_X32_BIT = 0x40000000
_ARCH = {  # platform.machine() -> (AUDIT_ARCH_*, __NR_seccomp)
    "x86_64": (0xC000003E, 317),
    "aarch64": (0xC00000B7, 277),
}
_PR_SET_NO_NEW_PRIVS = 38
_SECCOMP_SET_MODE_FILTER = 1
_SECCOMP_FILTER_FLAG_TSYNC = 1
_BPF_LD_ABS, _BPF_JEQ_K, _BPF_RET_K = 0x20, 0x15, 0x06
_RET_ALLOW = 0x7FFF0000  # SECCOMP_RET_ALLOW
_RET_ENOSYS = 0x00050000 | errno.ENOSYS  # SECCOMP_RET_ERRNO | ENOSYS


def _syscall(*args: int | None) -> tuple[int, int]:
    libc = ctypes.CDLL(None, use_errno=True)
    fn = libc.syscall
    fn.restype = ctypes.c_long
    ctypes.set_errno(0)
    rc = fn(*[ctypes.c_long(a) if isinstance(a, int) else ctypes.c_void_p(a) for a in args])
    return int(rc), ctypes.get_errno()


def _io_uring_probe() -> int:
    """errno of ``io_uring_setup(0, NULL)``: EFAULT/EINVAL = available (creates nothing),
    ENOSYS = blocked (seccomp, or a kernel without io_uring), EPERM = disabled by sysctl."""
    rc, err = _syscall(_SYS_IO_URING_SETUP, 0, None)
    if rc >= 0:  # pragma: no cover - cannot succeed with a NULL params pointer
        os.close(rc)
        return 0
    return err


def _filter(audit_arch: int) -> bytes:
    """The BPF program (struct sock_filter[]): deny io_uring_setup on ``audit_arch``."""
    prog = [
        (_BPF_LD_ABS, 0, 0, 4),  # A = seccomp_data.arch
        (_BPF_JEQ_K, 0, 3, audit_arch),  # other arch -> allow
        (_BPF_LD_ABS, 0, 0, 0),  # A = seccomp_data.nr
        (_BPF_JEQ_K, 2, 0, _SYS_IO_URING_SETUP),  # -> deny
        (_BPF_JEQ_K, 1, 0, _X32_BIT | _SYS_IO_URING_SETUP),  # x32 ABI -> deny
        (_BPF_RET_K, 0, 0, _RET_ALLOW),
        (_BPF_RET_K, 0, 0, _RET_ENOSYS),
    ]
    return b"".join(struct.pack("=HBBI", *insn) for insn in prog)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class IoUringGuard:
    """Whether this process can open an io_uring, and the filter that stops it.

    ``state`` is what the start-up report shows: ``available`` until :meth:`block` ran, then
    ``blocked:seccomp`` (our filter), ``blocked:host`` (already unavailable: a unit's
    ``SystemCallFilter=``, a sysctl, an old kernel) or ``unblockable:<why>``."""

    def __init__(self) -> None:
        self.state = "available"

    def block(self) -> str:
        """Make ``io_uring_setup`` fail with ENOSYS in this process (all threads) and its
        children, then verify it; returns (and keeps) the new state. Once blocked, again is
        a no-op."""
        if not self.state.startswith("blocked"):
            self.state = self._install()
        return self.state

    @staticmethod
    def _install() -> str:
        if _io_uring_probe() in (errno.ENOSYS, errno.EPERM):
            return "blocked:host"
        arch = _ARCH.get(platform.machine())
        if arch is None:
            return f"unblockable:no seccomp filter for {platform.machine()}"
        audit_arch, nr_seccomp = arch
        code = _filter(audit_arch)
        buf = ctypes.create_string_buffer(code)
        fprog = _SockFprog(len(code) // 8, ctypes.cast(buf, ctypes.c_void_p))
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            return f"unblockable:no_new_privs: {os.strerror(ctypes.get_errno())}"
        # seccomp(SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC, &prog): every thread
        rc, err = _syscall(
            nr_seccomp,
            _SECCOMP_SET_MODE_FILTER,
            _SECCOMP_FILTER_FLAG_TSYNC,
            ctypes.addressof(fprog),
        )
        if rc != 0:
            why = os.strerror(err) if rc < 0 else f"thread {rc} could not be synchronised"
            return f"unblockable:seccomp: {why}"
        after = _io_uring_probe()
        if after != errno.ENOSYS:  # pragma: no cover - the kernel ignored a filter it accepted
            return f"unblockable:filter installed but io_uring_setup gave errno {after}"
        return "blocked:seccomp"


#: this process's guard (a seccomp filter is per process and permanent: one state)
IO_URING = IoUringGuard()


def block_io_uring() -> str:
    """:meth:`IoUringGuard.block` on this process's guard."""
    return IO_URING.block()
