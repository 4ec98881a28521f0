"""What a transport is: the kinds (``plain``, ``onload``, ``vma``, ``exasock``,
``preload:PATH``), each vendor's wrapper, library, variables and profiles, and the checks on
``transport.kind`` and ``transport.profile`` that run before anything is exec'd."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.errors import ConfigError, GatewayError

if TYPE_CHECKING:
    from gateway.config import Config

__all__ = [
    "GENERIC",
    "LAUNCH_MARKER",
    "VENDORS",
    "Kind",
    "TransportError",
    "Vendor",
    "check_profile",
    "parse_kind",
    "profile_name",
]

#: set in the relaunched process's environment: "this process is the launch, do not relaunch"
LAUNCH_MARKER = "GATEWAY_TRANSPORT_LAUNCHED"


class TransportError(GatewayError):
    """A requested transport could not be set up (not loaded, io_uring in use, ...)."""


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


# The values of Onload's shipped profiles (scripts/onload_profiles/*.opf in the Onload
# sources). Only used when libonload is preloaded without the wrapper
# (preload:/…/libonload.so); through the wrapper the installed .opf files apply.
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
#: the vendor of ``plain`` and of a ``preload:PATH`` library no vendor claims
GENERIC = Vendor("preload", None, "", (), (), {}, None)


@dataclass(frozen=True)
class Kind:
    """A parsed ``transport.kind``."""

    name: str  # plain | onload | vma | exasock | preload
    vendor: Vendor
    library: str = ""  # preload:PATH: the path (absolute when it names a directory)

    @property
    def requested(self) -> bool:
        return self.name != "plain"


def parse_kind(kind: str) -> Kind:
    if kind == "plain":
        return Kind("plain", GENERIC)
    if kind in VENDORS:
        return Kind(kind, VENDORS[kind], VENDORS[kind].library)
    if kind.startswith("preload:"):
        path = kind[len("preload:") :]
        if not path:
            raise ConfigError("transport.kind: preload:PATH needs the library path")
        if "/" in path:
            path = os.path.abspath(path)
        base = os.path.basename(path)
        vendor = next(
            (v for v in VENDORS.values() if any(base.startswith(p) for p in v.patterns)), GENERIC
        )
        # the vendor's profiles apply, but never its wrapper: this is the env-only launch
        vendor = Vendor(
            vendor.name, None, path, (base,), vendor.env_prefixes, vendor.profiles,
            vendor.default_profile,
        )  # fmt: skip
        return Kind("preload", vendor, path)
    raise ConfigError(
        f"transport.kind: {kind!r} is not a transport: use plain, onload, vma, exasock "
        "or preload:PATH"
    )


def profile_name(cfg: Config, kind: Kind) -> str | None:
    """The profile in effect: the configured one, else the vendor's default; None for none."""
    name = cfg.transport.profile
    if name is None:
        return kind.vendor.default_profile
    return None if name in ("", "none") else name


def check_profile(kind: Kind, profile: str | None) -> None:
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
