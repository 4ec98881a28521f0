"""Listening sockets, socket options, event-loop choice, kernel-bypass launch and detection.

Kernel-bypass stacks (AMD Solarflare Onload, NVIDIA VMA, Cisco ExaSock) accelerate an unmodified
program by preloading a library at launch, usually through a wrapper (``onload
--profile=latency cmd``). The gateway makes that a first-class launch mode:

* ``maybe_relaunch(cfg, argv)`` — first thing in ``gateway serve``: when a bypass transport is
  requested and this process is not yet running under it, exec (same pid) either the vendor's
  wrapper or this interpreter with ``LD_PRELOAD`` set: ``onload --profile=latency <python> -m
  gateway serve …`` (never a ``--`` after the wrapper options: the real ``onload`` rejects it).
  Profile values go in the vendor's own variable names; the environment file wins over the
  profile, as with the real wrapper. A marker variable stops the child from relaunching again.
* ``choose_loop(cfg)`` — "uvloop" or "asyncio". While any preload is active, ``io_uring_setup``
  is made to fail with ENOSYS by a seccomp filter (and that is verified): uvloop 0.23 (libuv
  1.52) would otherwise batch ``epoll_ctl`` through an io_uring that no preload library can see
  (libuv then falls back to libc ``epoll_ctl``, which the preload intercepts); and ``--loop
  auto`` runs the stdlib asyncio loop, whose epoll calls all go through libc.
* ``tune_socket(sock, cfg)`` / ``tune_listeners(socks, cfg)`` / ``pin_loop_thread(cfg)`` —
  SO_SNDBUF, SO_RCVBUF, SO_BUSY_POLL, SO_REUSEPORT (read back) and the loop thread's CPUs.
* ``startup_report(cfg, loop, listeners)`` / ``apply_report(report, cfg, metrics)`` — after the
  listeners exist: is the library mapped (/proc/self/maps), does the vendor's presence symbol
  answer, any io_uring descriptors; one structured log line, Prometheus metrics, and the policy
  (a requested bypass that is not loaded fails start-up unless ``bypass_required = false``).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import platform
import shutil
import socket
import struct
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.config import Config
from gateway.errors import ConfigError, GatewayError
from gateway.metrics import Metrics

__all__ = [
    "LAUNCH_MARKER",
    "VENDORS",
    "LaunchPlan",
    "TransportError",
    "TransportReport",
    "Vendor",
    "apply_report",
    "block_io_uring",
    "choose_loop",
    "connection_budget",
    "drain_accept_queue",
    "io_uring_fds",
    "mapped_libraries",
    "notify_service_manager",
    "maybe_relaunch",
    "migrates_accept_queue",
    "open_fds",
    "other_listeners",
    "pin_loop_thread",
    "plan_launch",
    "raise_fd_limit",
    "read_env_file",
    "startup_report",
    "tune_listeners",
    "tune_socket",
]

log = logging.getLogger("gateway.transport")

#: set in the relaunched process's environment: "this process is the launch, do not relaunch"
LAUNCH_MARKER = "GATEWAY_TRANSPORT_LAUNCHED"
SO_BUSY_POLL = getattr(socket, "SO_BUSY_POLL", 46)
_SO_VMA_GET_API = 2800  # libvma src/vma/vma_extra.h


class TransportError(GatewayError):
    """A requested transport could not be set up (not loaded, io_uring in use, ...)."""


# --- vendors and profiles ------------------------------------------------------------------


@dataclass(frozen=True)
class Vendor:
    name: str
    #: the vendor's launch wrapper (found on PATH); None: launch with LD_PRELOAD ourselves
    wrapper: str | None
    #: the library for an LD_PRELOAD launch (a bare soname is searched by ld.so)
    library: str
    #: basenames that identify the library in /proc/self/maps (prefix match)
    patterns: tuple[str, ...]
    #: environment variables worth reporting (the vendor's own names)
    env_prefixes: tuple[str, ...]
    #: profile name -> values in the vendor's variable names, for launches we configure ourselves
    profiles: Mapping[str, Mapping[str, str]]
    default_profile: str | None
    #: the wrapper imports profiles itself with this option (onload: --profile=NAME)
    profile_option: str | None = None
    #: profiles only the wrapper can import (shipped .opf files we do not duplicate)
    wrapper_profiles: tuple[str, ...] = ()
    #: prefixes of shipped wrapper profile names (families such as nginx-*)
    wrapper_profile_prefixes: tuple[str, ...] = ()
    #: where the wrapper looks for NAME.opf (besides NAME as a path)
    profile_dirs: tuple[str, ...] = ()


# Onload profiles, OO scripts/onload_profiles/*.opf (see shared/ONLOAD.md §2). Only used when
# libonload is preloaded without the wrapper (preload:/…/libonload.so); through the wrapper the
# installed .opf files apply.
_ONLOAD_PROFILES: dict[str, dict[str, str]] = {
    "latency": {
        "EF_POLL_USEC": "100000",
        "EF_TCP_FASTSTART_INIT": "0",
        "EF_TCP_FASTSTART_IDLE": "0",
    },
    "cloud": {"EF_HIGH_THROUGHPUT_MODE": "1", "EF_CTPIO": "0", "EF_PIO": "0", "EF_UDP": "0"},
    "redis-performance": {
        "EF_POLL_USEC": "100000",
        "EF_UL_EPOLL": "2",
        "EF_EPOLL_MT_SAFE": "1",
        "EF_RXQ_SIZE": "4096",
        "EF_HIGH_THROUGHPUT_MODE": "1",
        "EF_CTPIO": "0",
        "EF_PIO": "0",
    },
    "zeromq": {"EF_POLL_FAST_USEC": "0", "EF_POLL_NONBLOCK_FAST_USEC": "0"},
}

VENDORS: dict[str, Vendor] = {
    "onload": Vendor(
        name="onload",
        wrapper="onload",
        library="libonload.so",
        patterns=("libonload.so",),
        env_prefixes=("EF_", "ONLOAD_"),
        profiles=_ONLOAD_PROFILES,
        default_profile="latency",
        profile_option="--profile=",
        wrapper_profiles=("latency-best", "safe", "node-js"),
        wrapper_profile_prefixes=("haproxy-", "nginx-", "nettyio-"),
        profile_dirs=(
            str(Path("~/.openonload/profiles").expanduser()),
            "/usr/libexec/onload/profiles",
        ),
    ),
    # libvma README: VMA_SPEC presets; no wrapper, LD_PRELOAD=libvma.so
    "vma": Vendor(
        name="vma",
        wrapper=None,
        library="libvma.so",
        patterns=("libvma.so", "libvma-debug.so", "libxlio.so"),
        env_prefixes=("VMA_", "XLIO_"),
        profiles={
            "latency": {"VMA_SPEC": "latency"},
            "multi_ring_latency": {"VMA_SPEC": "multi_ring_latency"},
        },
        default_profile="latency",
    ),
    # exanic-software scripts/exasock: flags map to these variables
    "exasock": Vendor(
        name="exasock",
        wrapper="exasock",
        library="libexasock_preload.so",
        patterns=("libexasock_preload",),
        env_prefixes=("EXASOCK_",),
        profiles={"quiet": {"EXASOCK_NOWARN": "1"}, "trace": {"EXASOCK_TRACE": "1"}},
        default_profile=None,
    ),
}
_GENERIC = Vendor("preload", None, "", (), (), {}, None)


@dataclass(frozen=True)
class _Kind:
    name: str  # plain | onload | vma | exasock | preload
    vendor: Vendor
    library: str = ""  # preload:PATH: the path (absolute when it names a directory)

    @property
    def requested(self) -> bool:
        return self.name != "plain"


def _parse_kind(kind: str) -> _Kind:
    if kind == "plain":
        return _Kind("plain", _GENERIC)
    if kind in VENDORS:
        return _Kind(kind, VENDORS[kind], VENDORS[kind].library)
    if kind.startswith("preload:"):
        path = kind[len("preload:") :]
        if not path:
            raise ConfigError("transport.kind: preload:PATH needs the library path")
        if "/" in path:
            path = os.path.abspath(path)
        base = os.path.basename(path)
        vendor = next(
            (v for v in VENDORS.values() if any(base.startswith(p) for p in v.patterns)), _GENERIC
        )
        # the vendor's profiles apply, but never its wrapper: this is the env-only launch
        vendor = Vendor(
            vendor.name, None, path, (base,), vendor.env_prefixes, vendor.profiles,
            vendor.default_profile,
        )  # fmt: skip
        return _Kind("preload", vendor, path)
    raise ConfigError(
        f"transport.kind: {kind!r} is not a transport: use plain, onload, vma, exasock "
        "or preload:PATH"
    )


def _profile_name(cfg: Config, kind: _Kind) -> str | None:
    name = cfg.transport.profile
    if name is None:
        return kind.vendor.default_profile
    return None if name in ("", "none") else name


def _check_profile(kind: _Kind, profile: str | None) -> None:
    """Refuse a profile the launch cannot apply, before anything is exec'd."""
    if profile is None:
        return
    v = kind.vendor
    if kind.name == "plain":
        return
    for name in profile.split(","):
        if name in v.profiles:
            continue
        if v.wrapper is not None and v.profile_option is not None:
            if name in v.wrapper_profiles or name.startswith(v.wrapper_profile_prefixes):
                continue
            if os.path.exists(name) or any(
                os.path.exists(os.path.join(d, f"{name}.opf")) for d in v.profile_dirs
            ):
                continue
            if name == "throughput":
                raise ConfigError(
                    "transport.profile: Onload ships 'throughput' only as a profile fragment "
                    "(throughput.opf-fragment); `onload --profile=throughput` fails. Use "
                    "latency, or a site profile that imports the fragment"
                )
        known = sorted({*v.profiles, *(v.wrapper_profiles if v.wrapper is not None else ())}) or [
            "none"
        ]
        where = (
            f" or a NAME.opf in {' or '.join(v.profile_dirs)}"
            if v.profile_dirs and v.wrapper
            else ""
        )
        raise ConfigError(
            f"transport.profile: {name!r} is not a profile that this {v.name} launch can apply "
            f"(known: {', '.join(known)}{where})"
        )


# --- environment file ------------------------------------------------------------------------


def read_env_file(path: str) -> dict[str, str]:
    """KEY=VALUE lines (systemd EnvironmentFile style): blank lines and lines starting with
    ``#`` or ``;`` are ignored, ``export`` is allowed, one level of matching quotes is removed."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"transport.env_file: cannot read {path}: {exc.strerror}") from None
    out: dict[str, str] = {}
    for no, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if (
            not sep
            or not key
            or not (key[0].isalpha() or key[0] == "_")
            or not all(c.isalnum() or c == "_" for c in key)
        ):
            raise ConfigError(f"transport.env_file: {path}:{no}: expected KEY=VALUE, got {raw!r}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        out[key] = value
    return out


# --- launch ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LaunchPlan:
    """What ``maybe_relaunch`` execs: ``argv[0]`` is looked up on ``env['PATH']``."""

    argv: list[str]
    env: dict[str, str]
    #: the variables this launch sets or changes (for the dry-run print and the log)
    changed: dict[str, str]
    style: str  # "wrapper" or "preload"


def plan_launch(
    cfg: Config,
    argv: Sequence[str],
    environ: Mapping[str, str] | None = None,
    maps: Iterable[str] | None = None,
) -> LaunchPlan | None:
    """The exec that puts this gateway under its bypass transport, or None when no exec is
    needed: plain transport, already relaunched (marker), or the library already mapped (the
    process was started under the wrapper by systemd, a container entry point, ...)."""
    kind = _parse_kind(cfg.transport.kind)
    if not kind.requested:
        return None
    env = dict(os.environ if environ is None else environ)
    if LAUNCH_MARKER in env:
        return None
    if _find_library(kind, mapped_libraries() if maps is None else list(maps)):
        return None
    profile = _profile_name(cfg, kind)
    _check_profile(kind, profile)
    extra = read_env_file(cfg.transport.env_file) if cfg.transport.env_file else {}
    v = kind.vendor
    changed: dict[str, str] = {}
    if profile is not None and not (v.wrapper and v.profile_option):
        # we import the profile ourselves; like the wrapper's onload_set, never over a variable
        # that is already set (the environment file and the caller's environment win)
        for name in profile.split(","):
            for key, value in v.profiles[name].items():
                if key not in env and key not in extra:
                    changed[key] = value
    changed.update(extra)
    head: list[str] = []
    if v.wrapper is not None:
        wrapper = shutil.which(v.wrapper, path=env.get("PATH", os.defpath))
        if wrapper is None:
            raise TransportError(
                f"transport {kind.name}: the {v.wrapper!r} wrapper is not on PATH "
                f"({env.get('PATH', '')}). Install {v.name}, put its wrapper on PATH, or "
                f"preload the library directly with --transport preload:/path/to/{v.library}"
            )
        head = [v.wrapper]
        if profile is not None and v.profile_option:
            head.append(f"{v.profile_option}{profile}")
        style = "wrapper"
    else:
        preload = env.get("LD_PRELOAD", "")
        parts = preload.replace(" ", ":").split(":") if preload else []
        if kind.library not in parts:
            changed["LD_PRELOAD"] = ":".join([kind.library, *[p for p in parts if p]])
        style = "preload"
    changed[LAUNCH_MARKER] = kind.name
    env.update(changed)
    gateway_args = list(argv[1:])
    return LaunchPlan([*head, sys.executable, "-m", "gateway", *gateway_args], env, changed, style)


def maybe_relaunch(cfg: Config, argv: Sequence[str]) -> None:
    """Exec this gateway again under its bypass transport (once), or return to run as is."""
    try:
        plan = plan_launch(cfg, argv)
    except TransportError as exc:
        if cfg.transport.bypass_required:
            raise ConfigError(str(exc)) from None
        print(f"gateway: warning: {exc}; running on plain sockets", file=sys.stderr, flush=True)
        return
    if plan is None:
        return
    shown = " ".join(f"{k}={v}" for k, v in plan.changed.items() if k != LAUNCH_MARKER)
    print(
        f"gateway: transport={cfg.transport.kind}: exec {shown + ' ' if shown else ''}"
        f"{' '.join(_redact(plan.argv))}",
        file=sys.stderr,
        flush=True,
    )
    try:
        os.execvpe(plan.argv[0], plan.argv, plan.env)
    except OSError as exc:
        raise ConfigError(
            f"transport {cfg.transport.kind}: cannot exec {plan.argv[0]}: {exc.strerror}"
        ) from None


def _redact(argv: Sequence[str]) -> list[str]:
    out: list[str] = []
    hide = False
    for arg in argv:
        if hide:
            out.append("***")
            hide = False
        elif arg == "--api-key":
            out.append(arg)
            hide = True
        elif arg.startswith("--api-key="):
            out.append("--api-key=***")
        else:
            out.append(arg)
    return out


# --- io_uring ------------------------------------------------------------------------------

_SYS_IO_URING_SETUP = 425  # the same number on every architecture since Linux 5.1
_X32_BIT = 0x40000000
_ARCH = {  # platform.machine() -> (AUDIT_ARCH_*, __NR_seccomp)
    "x86_64": (0xC000003E, 317),
    "aarch64": (0xC00000B7, 277),
}
_io_uring_state = "available"


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


def block_io_uring() -> str:
    """Make ``io_uring_setup`` fail with ENOSYS in this process (all threads) and its children,
    then verify it. Returns the state for the report: ``blocked:seccomp``, ``blocked:host``
    (already unavailable) or ``unblockable:<why>``."""
    global _io_uring_state
    if _io_uring_state.startswith("blocked"):
        return _io_uring_state
    before = _io_uring_probe()
    if before in (errno.ENOSYS, errno.EPERM):
        _io_uring_state = "blocked:host"
        return _io_uring_state
    arch = _ARCH.get(platform.machine())
    if arch is None:
        _io_uring_state = f"unblockable:no seccomp filter for {platform.machine()}"
        return _io_uring_state
    audit_arch, nr_seccomp = arch
    ld_abs, jeq_k, ret_k = 0x20, 0x15, 0x06
    allow, deny = 0x7FFF0000, 0x00050000 | errno.ENOSYS  # SECCOMP_RET_ALLOW, RET_ERRNO|ENOSYS
    prog = [
        (ld_abs, 0, 0, 4),  # A = seccomp_data.arch
        (jeq_k, 0, 3, audit_arch),  # other arch -> allow
        (ld_abs, 0, 0, 0),  # A = seccomp_data.nr
        (jeq_k, 2, 0, _SYS_IO_URING_SETUP),  # -> deny
        (jeq_k, 1, 0, _X32_BIT | _SYS_IO_URING_SETUP),  # x32 ABI -> deny
        (ret_k, 0, 0, allow),
        (ret_k, 0, 0, deny),
    ]
    code = ctypes.create_string_buffer(b"".join(struct.pack("=HBBI", *i) for i in prog))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(prog), ctypes.cast(code, ctypes.c_void_p))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        _io_uring_state = f"unblockable:no_new_privs: {os.strerror(ctypes.get_errno())}"
        return _io_uring_state
    # seccomp(SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC, &prog): every thread
    rc, err = _syscall(nr_seccomp, 1, 1, ctypes.addressof(fprog))
    if rc != 0:
        why = os.strerror(err) if rc < 0 else f"thread {rc} could not be synchronised"
        _io_uring_state = f"unblockable:seccomp: {why}"
        return _io_uring_state
    after = _io_uring_probe()
    if after != errno.ENOSYS:  # pragma: no cover - the kernel ignored a filter it accepted
        _io_uring_state = f"unblockable:filter installed but io_uring_setup gave errno {after}"
        return _io_uring_state
    _io_uring_state = "blocked:seccomp"
    return _io_uring_state


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


# --- loop choice -------------------------------------------------------------------------


def _bypass_active(kind: _Kind) -> bool:
    """A bypass transport is requested, or a known bypass library is mapped anyway (started
    under a wrapper, /etc/ld.so.preload, ...)."""
    if kind.requested:
        return True
    maps = mapped_libraries()
    return any(_find_library(_Kind(v.name, v), maps) for v in VENDORS.values())


def choose_loop(cfg: Config) -> str:
    """The event loop for this process.

    Plain sockets: ``auto`` is uvloop when installed. While any preload library is active
    (``LD_PRELOAD`` set, or a bypass transport or library), ``io_uring_setup`` is blocked and
    verified (:func:`block_io_uring`) whatever the loop, and uvloop is refused if it cannot be.
    Under a bypass transport or library, ``auto`` also picks the stdlib asyncio loop, whose
    epoll calls all go through libc; an explicit ``uvloop`` is honoured (libuv then falls back
    to libc epoll_ctl, which the preload sees).
    The stdlib loop cost nothing measurable in the fan-out benchmark
    (tests/transport_fakes/loop_cost.py; figures in README: Kernel bypass)."""
    kind = _parse_kind(cfg.transport.kind)
    name = "asyncio"
    if cfg.loop != "asyncio":
        try:
            import uvloop  # noqa: F401

            name = "uvloop"
        except ImportError:
            if cfg.loop == "uvloop":
                raise ConfigError("loop=uvloop but uvloop is not installed") from None
    bypass = _bypass_active(kind)
    if bypass or os.environ.get("LD_PRELOAD", "").strip():
        state = block_io_uring()
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


# --- socket options ------------------------------------------------------------------------


def tune_socket(sock: Any, cfg: Config, strict: bool = False) -> dict[str, Any]:
    """Apply SO_SNDBUF / SO_RCVBUF / SO_BUSY_POLL to a socket (listening or accepted, a real
    socket or a loop's transport socket); returns the values read back. ``strict``: raise a
    ConfigError naming the option when the kernel refuses (used on the listeners at start-up);
    otherwise log it once and go on (per accepted connection)."""
    t = cfg.transport
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
            if name not in _warned:
                _warned.add(name)
                log.warning("%s", msg)
    return applied


_warned: set[str] = set()


def tune_listeners(sockets: Sequence[Any], cfg: Config) -> dict[str, Any]:
    """Tune every listening socket (accepted sockets inherit these on Linux; the per-connection
    hook applies them again for stacks that do not); report what the first one has."""
    t = cfg.transport
    out: dict[str, Any] = {"sndbuf": "auto", "rcvbuf": "auto", "busy_poll": "off"}
    for i, sock in enumerate(sockets):
        applied = tune_socket(sock, cfg, strict=True)
        if i == 0:
            out.update(applied)
            out["reuse_port"] = int(
                bool(sock.getsockopt(socket.SOL_SOCKET, getattr(socket, "SO_REUSEPORT", 15)))
            )
    if t.busy_poll_us == 0:
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


# --- descriptors and hand-over -------------------------------------------------------------

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


# --- detection -----------------------------------------------------------------------------


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


def _find_library(kind: _Kind, maps: Sequence[str]) -> str:
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


def _vendor_symbols() -> dict[str, bool]:
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


def _accelerated(sockets: Sequence[Any]) -> tuple[int, int] | None:
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


# --- the report ----------------------------------------------------------------------------


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


def startup_report(cfg: Config, loop: str, listeners: Sequence[Any] = ()) -> TransportReport:
    """Detect, from inside the process, what the transport really is (after the listeners
    exist: a bypass stack is created with the first socket)."""
    kind = _parse_kind(cfg.transport.kind)
    maps = mapped_libraries()
    symbols = _vendor_symbols()
    path = _find_library(kind, maps) if kind.requested else ""
    vendor = kind.vendor.name if kind.requested else "none"
    if kind.name == "preload" and vendor == "preload":
        vendor = next((name for name, ok in symbols.items() if ok), "preload")
    if not kind.requested:  # plain, but maybe started under a preload anyway: say so
        for v in VENDORS.values():
            found = _find_library(_Kind(v.name, v), maps)
            if found and symbols.get(v.name):
                vendor, path = v.name, found
                break
    loaded = bool(path) and (symbols.get(vendor, False) if vendor in VENDORS else True)
    detail = ""
    if kind.requested and not loaded:
        detail = _why_not_loaded(kind, path, vendor)
    prefixes = VENDORS[vendor].env_prefixes if vendor in VENDORS else kind.vendor.env_prefixes
    env = {k: v for k, v in os.environ.items() if k.startswith(prefixes) or k == "LD_PRELOAD"}
    accel = _accelerated(listeners) if loaded else None
    return TransportReport(
        transport=kind.name,
        vendor=vendor,
        requested=kind.requested,
        loaded=loaded,
        library=path or (kind.library if kind.requested else ""),
        profile=(_profile_name(cfg, kind) or "") if kind.requested else "",
        loop=loop,
        io_uring=_io_uring_state,
        io_uring_fds=io_uring_fds(),
        accelerated=f"{accel[0]}/{accel[1]}" if accel else "",
        env=env,
        detail=detail,
    )


def _why_not_loaded(kind: _Kind, path: str, vendor: str) -> str:
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
        accelerated = int(report.accelerated.split("/")[0])
        metrics.listeners_accelerated.labels(report.vendor).set(accelerated)
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
