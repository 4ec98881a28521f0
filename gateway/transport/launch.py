"""Putting the gateway under a kernel-bypass transport: the environment file, the launch plan
and the exec.

``maybe_relaunch(cfg, argv)`` runs first thing in ``gateway serve``: when a bypass transport
is requested and this process is not yet running under it, it execs (same pid) either the
vendor's wrapper or this interpreter with ``LD_PRELOAD`` set: ``onload --profile=latency
<python> -m gateway serve …`` (never a ``--`` after the wrapper options: the real ``onload``
rejects it). Profile values go in the vendor's own variable names; the environment file wins
over the profile, as with the real wrapper. A marker variable stops the child from
relaunching again. ``deploy/launch-onload.sh`` composes its exec with the same
:func:`compose_launch` (see :mod:`gateway.transport.onload_launch`).
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.errors import ConfigError
from gateway.transport.detect import find_library, mapped_libraries
from gateway.transport.vendors import (
    LAUNCH_MARKER,
    Kind,
    TransportError,
    check_profile,
    parse_kind,
    profile_name,
)

if TYPE_CHECKING:
    from gateway.config import Config

__all__ = [
    "LaunchPlan",
    "compose_launch",
    "maybe_relaunch",
    "plan_launch",
    "read_env_file",
    "redact",
]


def read_env_file(path: str, where: str = "transport.env_file") -> dict[str, str]:
    """KEY=VALUE lines (systemd EnvironmentFile style): blank lines and lines starting with
    ``#`` or ``;`` are ignored, ``export`` is allowed, one level of matching quotes is removed.
    Errors start with ``where`` (the config field, or the launcher's flag)."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {path}: {exc.strerror}") from None
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
            raise ConfigError(f"{where}: {path}:{no}: expected KEY=VALUE, got {raw!r}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        out[key] = value
    return out


@dataclass(frozen=True)
class LaunchPlan:
    """What ``maybe_relaunch`` execs: ``argv[0]`` is looked up on ``env['PATH']``."""

    argv: list[str]
    env: dict[str, str]
    #: the variables this launch sets or changes (for the dry-run print and the log)
    changed: dict[str, str]
    style: str  # "wrapper" or "preload"


def compose_launch(
    kind: Kind,
    profile: str | None,
    environ: Mapping[str, str],
    extra: Mapping[str, str],
    gateway_args: Sequence[str],
    *,
    python: str | None = None,
    wrapper: str | None = None,
) -> LaunchPlan:
    """The exec of ``[wrapper [--profile=P]] python -m gateway ARGS`` under ``kind``: the
    environment file's values (``extra``) over ``environ``, the profile's values where
    neither sets them (only when no wrapper imports the profile), ``LD_PRELOAD`` for a
    launch without a wrapper, and the marker. ``python`` defaults to this interpreter,
    ``wrapper`` to the vendor's (looked up on PATH at exec)."""
    v = kind.vendor
    changed: dict[str, str] = {}
    if profile is not None and not (v.wrapper and v.profile_option):
        # we import the profile ourselves; like the wrapper's onload_set, never over a variable
        # that is already set (the environment file and the caller's environment win)
        for name in profile.split(","):
            for key, value in v.profiles[name].items():
                if key not in environ and key not in extra:
                    changed[key] = value
    changed.update(extra)
    head: list[str] = []
    if v.wrapper is not None:
        head = [wrapper or v.wrapper]
        if profile is not None and v.profile_option:
            head.append(f"{v.profile_option}{profile}")
        style = "wrapper"
    else:
        preload = environ.get("LD_PRELOAD", "")
        parts = preload.replace(" ", ":").split(":") if preload else []
        if kind.library not in parts:
            changed["LD_PRELOAD"] = ":".join([kind.library, *[p for p in parts if p]])
        style = "preload"
    changed[LAUNCH_MARKER] = kind.name
    env = {**environ, **changed}
    argv = [*head, python or sys.executable, "-m", "gateway", *gateway_args]
    return LaunchPlan(argv, env, changed, style)


def plan_launch(
    cfg: Config,
    argv: Sequence[str],
    environ: Mapping[str, str] | None = None,
    maps: Iterable[str] | None = None,
) -> LaunchPlan | None:
    """The exec that puts this gateway under its bypass transport, or None when no exec is
    needed: plain transport, already relaunched (marker), or the library already mapped (the
    process was started under the wrapper by systemd, a container entry point, ...)."""
    kind = parse_kind(cfg.transport.kind)
    if not kind.requested:
        return None
    env = dict(os.environ if environ is None else environ)
    if LAUNCH_MARKER in env:
        return None
    if find_library(kind, mapped_libraries() if maps is None else list(maps)):
        return None
    profile = profile_name(cfg, kind)
    check_profile(kind, profile)
    extra = read_env_file(cfg.transport.env_file) if cfg.transport.env_file else {}
    v = kind.vendor
    if v.wrapper is not None and shutil.which(v.wrapper, path=env.get("PATH", os.defpath)) is None:
        raise TransportError(
            f"transport {kind.name}: the {v.wrapper!r} wrapper is not on PATH "
            f"({env.get('PATH', '')}). Install {v.name}, put its wrapper on PATH, or "
            f"preload the library directly with --transport preload:/path/to/{v.library}"
        )
    return compose_launch(kind, profile, env, extra, list(argv[1:]))


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
        f"{' '.join(redact(plan.argv))}",
        file=sys.stderr,
        flush=True,
    )
    try:
        os.execvpe(plan.argv[0], plan.argv, plan.env)
    except OSError as exc:
        raise ConfigError(
            f"transport {cfg.transport.kind}: cannot exec {plan.argv[0]}: {exc.strerror}"
        ) from None


def redact(argv: Sequence[str]) -> list[str]:
    """``argv`` with the value of every ``--api-key`` shown as ``***``."""
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
