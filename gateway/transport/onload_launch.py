"""``deploy/launch-onload.sh``: launch the gateway under AMD Solarflare Onload.

Host checks, then exec (same pid, so systemd keeps tracking it) of ::

    onload --profile=PROFILE PYTHON -m gateway serve --transport onload \\
        --transport-profile PROFILE ARGS

with ``GATEWAY_TRANSPORT_LAUNCHED=onload``, so the gateway does not relaunch itself: it only
verifies from inside that libonload is mapped and answers, and fails start-up if not. The
argv and environment come from :func:`gateway.transport.launch.compose_launch`, the
environment file is read by :func:`~gateway.transport.launch.read_env_file`: the same code as
``gateway serve --transport onload``. Run as
``PYTHON -m gateway.transport.onload_launch [launcher options] [gateway serve options...]``
(the shell script does exactly that, with the gateway's own interpreter)::

  --dry-run        run the checks, print the exact argv and environment, exec nothing
                   (exit 0, or 1 when a check failed)
  --profile=NAME   Onload profile (default latency; also GATEWAY_ONLOAD_PROFILE)
  --env-file=FILE  KEY=VALUE lines (EF_* overrides) put in the environment before the wrapper
                   runs, so they win over the profile. Under systemd use EnvironmentFile=.
  --python=PATH    the gateway's interpreter (default /opt/gateway/venv/bin/python;
                   also GATEWAY_PYTHON)
  --wrapper=PATH   the onload wrapper (default: onload on PATH; also ONLOAD_WRAPPER)
  --wait-driver=SECONDS
                   wait up to SECONDS for the onload driver (/sys/module/onload and
                   /dev/onload) before checking it, saying so once; for a driver that loads
                   late in boot (default 0: check at once)

The first argument that is none of these, and everything after it, goes to ``gateway
serve``. Checks (a failure stops the launch, exit 1): the wrapper and interpreter exist; the
onload driver is loaded (/sys/module/onload) and /dev/onload, /dev/onload_epoll exist --
skipped, like the wrapper's own check, with ONLOAD_DRIVERCHECK=false; the env file parses.
Warnings: no huge pages reserved, a memlock limit, an API key on the command line (``ps``
shows it: use ``--api-key-file`` or the config file; ``--dry-run`` prints it as ``***``).
A bad ``--wait-driver`` exits 2.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from gateway.errors import ConfigError
from gateway.transport.launch import compose_launch, read_env_file, redact
from gateway.transport.vendors import parse_kind

__all__ = ["LaunchOptions", "main", "parse_options"]

PROG = "launch-onload"
DEFAULT_PYTHON = "/opt/gateway/venv/bin/python"
DRIVER = "/sys/module/onload"
DEVICES = ("/dev/onload", "/dev/onload_epoll")
#: the variables a dry run prints (the rest of the environment is inherited as is)
_SHOWN_ENV = re.compile(r"^(EF_|ONLOAD_|LD_PRELOAD=|GATEWAY_)")


@dataclass
class LaunchOptions:
    dry_run: bool = False
    profile: str = "latency"
    env_file: str = ""
    python: str = DEFAULT_PYTHON
    wrapper: str = "onload"
    wait_driver: str = "0"
    #: the `gateway serve` options
    rest: list[str] = field(default_factory=list)


def parse_options(argv: Sequence[str], environ: Mapping[str, str]) -> LaunchOptions:
    """The launcher's own options up to the first other argument; the rest is for serve."""
    opts = LaunchOptions(
        profile=environ.get("GATEWAY_ONLOAD_PROFILE", "latency"),
        python=environ.get("GATEWAY_PYTHON", DEFAULT_PYTHON),
        wrapper=environ.get("ONLOAD_WRAPPER", "onload"),
    )
    values = {
        "--profile=": "profile",
        "--env-file=": "env_file",
        "--python=": "python",
        "--wrapper=": "wrapper",
        "--wait-driver=": "wait_driver",
    }
    args = list(argv)
    while args:
        arg = args[0]
        if arg == "--dry-run":
            opts.dry_run = True
        else:
            option = next((o for o in values if arg.startswith(o)), None)
            if option is None:
                break
            setattr(opts, values[option], arg[len(option) :])
        args.pop(0)
    opts.rest = args
    return opts


class _Checks:
    """The check lines on stderr: ``ok`` only in a dry run, warnings, failures."""

    def __init__(self, dry_run: bool) -> None:
        self.dry_run = dry_run
        self.failed = False

    def ok(self, text: str) -> None:
        if self.dry_run:
            _say(f"ok: {text}")

    def warn(self, text: str) -> None:
        _say(f"warning: {text}")

    def fail(self, text: str) -> None:
        _say(f"FAIL: {text}")
        self.failed = True


def _say(text: str) -> None:
    print(f"{PROG}: {text}", file=sys.stderr, flush=True)


def _is_char_device(path: str) -> bool:
    try:
        return stat.S_ISCHR(os.stat(path).st_mode)
    except OSError:
        return False


def _driver_present() -> bool:
    return os.path.isdir(DRIVER) and all(_is_char_device(d) for d in DEVICES)


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _memlock() -> str:
    """The memlock limit as /proc/self/limits states it (``unlimited`` or bytes)."""
    for line in _read("/proc/self/limits").splitlines():
        if line.startswith("Max locked memory"):
            parts = line.split()
            return parts[3] if len(parts) > 3 else ""
    return ""


def _host_checks(opts: LaunchOptions, environ: Mapping[str, str], checks: _Checks) -> None:
    driver_check = environ.get("ONLOAD_DRIVERCHECK", "true") != "false"
    wait = int(opts.wait_driver)
    if driver_check and wait > 0 and not _driver_present():
        _say(f"waiting up to {wait} s for the onload driver ({DRIVER}, {', '.join(DEVICES)})")
        waited = 0
        while not _driver_present() and waited < wait:
            time.sleep(1)  # a driver loading late in boot: checked once a second
            waited += 1
        if _driver_present():
            checks.ok(f"onload driver appeared after {waited} s")
        else:
            checks.fail(f"the onload driver did not load within {wait} s")
    if driver_check:
        if os.path.isdir(DRIVER):
            checks.ok("onload driver loaded")
        else:
            checks.fail(
                f"the onload driver is not loaded ({DRIVER} missing: modprobe onload, or "
                "onload_tool reload)"
            )
        for dev in DEVICES:
            if _is_char_device(dev):
                checks.ok(dev)
            else:
                checks.fail(
                    f"{dev} is missing (driver not loaded, or not passed into this container)"
                )
    try:
        hugepages = int(_read("/proc/sys/vm/nr_hugepages").strip() or 0)
    except ValueError:
        hugepages = 0
    if hugepages > 0:
        checks.ok(f"vm.nr_hugepages={hugepages}")
    else:
        checks.warn(
            "no huge pages reserved (vm.nr_hugepages=0): Onload falls back to small pages "
            "unless EF_USE_HUGE_PAGES=2"
        )
    memlock = _memlock()
    if memlock == "unlimited":
        checks.ok("memlock unlimited")
    else:
        checks.warn(
            f"memlock limit is {memlock or 'unknown'} bytes (LimitMEMLOCK=infinity in the unit)"
        )


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    env = dict(os.environ if environ is None else environ)
    opts = parse_options(sys.argv[1:] if argv is None else argv, env)
    checks = _Checks(opts.dry_run)
    wrapper_path = shutil.which(opts.wrapper, path=env.get("PATH", os.defpath))
    if wrapper_path is not None:
        checks.ok(f"wrapper {wrapper_path}")
    else:
        checks.fail(
            f"the onload wrapper '{opts.wrapper}' is not on PATH (install Onload, or "
            "--wrapper=PATH)"
        )
    if os.access(opts.python, os.X_OK):
        checks.ok(f"python {opts.python}")
    else:
        checks.fail(f"no executable interpreter at {opts.python} (--python=PATH)")
    if not opts.wait_driver.isascii() or not opts.wait_driver.isdigit():
        _say(f"--wait-driver expects a whole number of seconds, got '{opts.wait_driver}'")
        return 2
    _host_checks(opts, env, checks)
    if any(a == "--api-key" or a.startswith("--api-key=") for a in opts.rest):
        checks.warn(
            "--api-key puts the key on the command line (visible in ps): use --api-key-file "
            "FILE or the config file's [[api_keys]]"
        )
    extra: dict[str, str] = {}
    if opts.env_file:
        try:
            extra = read_env_file(opts.env_file, "--env-file")
        except ConfigError as exc:
            checks.fail(str(exc))
    if checks.failed and not opts.dry_run:
        _say("not starting (see above; --dry-run shows the command)")
        return 1
    serve = ["serve", "--transport", "onload", "--transport-profile", opts.profile, *opts.rest]
    plan = compose_launch(
        parse_kind("onload"), opts.profile, env, extra, serve, python=opts.python,
        wrapper=opts.wrapper,
    )  # fmt: skip
    if opts.dry_run:
        shown = redact(plan.argv)
        for i, arg in enumerate(shown):
            print(f"argv[{i}]={arg}")
        print(f"exec: {' '.join(shown)}")
        for line in sorted(f"{k}={v}" for k, v in plan.env.items()):
            if _SHOWN_ENV.match(line):
                print(f"env: {line}")
        print("(plus the rest of the inherited environment)", flush=True)
        if checks.failed:
            _say("dry run: checks failed, a real launch would not start")
            return 1
        return 0
    try:
        os.execvpe(plan.argv[0], plan.argv, plan.env)
    except OSError as exc:
        _say(f"cannot exec {plan.argv[0]}: {exc.strerror}")
    return 127


if __name__ == "__main__":
    raise SystemExit(main())
