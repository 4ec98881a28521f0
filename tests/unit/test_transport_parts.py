"""The transport package's seams, without a gateway process: the loop runner shared by
``serve`` and ``probe``, the socket tuner's warn-once, the io_uring guard, and the Onload
launcher behind deploy/launch-onload.sh (options, checks, the env file through the same
parser as ``gateway serve --env-file``)."""

from __future__ import annotations

import asyncio
import errno
import logging
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from gateway.config import Config, TransportConfig
from gateway.errors import ConfigError
from gateway.transport import SocketTuner, run_loop
from gateway.transport.iouring import IoUringGuard
from gateway.transport.onload_launch import main as launch_onload, parse_options


async def _loop_type() -> str:
    await asyncio.sleep(0)
    return type(asyncio.get_running_loop()).__module__


def test_run_loop_runs_on_the_named_loop() -> None:
    assert run_loop(_loop_type(), "asyncio").startswith("asyncio")
    pytest.importorskip("uvloop")
    assert run_loop(_loop_type(), "uvloop").startswith("uvloop")
    assert run_loop(_loop_type(), "auto").startswith("uvloop")


def test_run_loop_refuses_a_missing_uvloop_and_closes_the_coroutine(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop -> ImportError
    coro = _loop_type()
    assert isinstance(coro, types.CoroutineType)  # an async def's: it has cr_frame
    with pytest.raises(ConfigError, match="loop=uvloop but uvloop is not installed"):
        run_loop(coro, "uvloop")
    assert coro.cr_frame is None  # closed: no "never awaited" warning
    assert run_loop(_loop_type(), "auto").startswith("asyncio")


class _RefusingSocket:
    def setsockopt(self, *args: Any) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    def getsockopt(self, *args: Any) -> int:
        return 0


def test_socket_tuner_warns_once_per_option_and_strict_names_the_field(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cfg = Config(transport=TransportConfig(sndbuf=4096, busy_poll_us=50))
    tuner = SocketTuner(cfg)
    with caplog.at_level(logging.WARNING, logger="gateway.transport"):
        for _ in range(3):
            assert tuner(_RefusingSocket()) == {}
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "transport.sndbuf=4096: setsockopt failed: Operation not permitted",
        "transport.busy_poll_us=50: setsockopt failed: Operation not permitted (raising it "
        "needs CAP_NET_ADMIN)",
    ]
    with pytest.raises(ConfigError, match=r"^transport\.sndbuf=4096: setsockopt failed"):
        tuner.tune(_RefusingSocket(), strict=True)


def test_io_uring_guard_blocks_and_verifies_in_a_child_process() -> None:
    """A seccomp filter cannot be removed, so the guard runs in a child: blocked (by us or
    already by the host), the same state again on a second call, and io_uring_setup fails."""
    assert IoUringGuard().state == "available"
    code = (
        "from gateway.transport import IO_URING, block_io_uring\n"
        "from gateway.transport.iouring import _io_uring_probe\n"
        "first = block_io_uring(); print(first, IO_URING.state, block_io_uring(), "
        "_io_uring_probe())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    first, state, again, err = out.stdout.split()
    assert first == state == again and first in ("blocked:seccomp", "blocked:host"), out
    assert int(err) in (errno.ENOSYS, errno.EPERM)


def test_launcher_options_stop_at_the_first_serve_option() -> None:
    env = {"GATEWAY_ONLOAD_PROFILE": "cloud", "ONLOAD_WRAPPER": "/x/onload"}
    opts = parse_options(["--dry-run", "--python=/p", "--config", "--dry-run"], env)
    assert opts.dry_run and opts.python == "/p" and opts.profile == "cloud"
    assert opts.wrapper == "/x/onload" and opts.rest == ["--config", "--dry-run"]


def test_launcher_dry_run_reads_the_env_file_like_serve(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.env"
    bad.write_text("EF_POLL_USEC=1\nEF POLL=2\n")
    env = {"ONLOAD_DRIVERCHECK": "false", "PATH": "/bin:/usr/bin"}
    argv = ["--dry-run", f"--env-file={bad}", f"--python={sys.executable}", "--wrapper=true"]
    assert launch_onload([*argv, "--api-key", "secret"], env) == 1
    out, err = capsys.readouterr()
    assert f"launch-onload: FAIL: --env-file: {bad}:2: expected KEY=VALUE" in err
    assert "a real launch would not start" in err and "--api-key puts the key" in err
    assert out.splitlines()[:2] == ["argv[0]=true", "argv[1]=--profile=latency"]
    assert "argv[11]=***" in out and "secret" not in out
    good = tmp_path / "good.env"
    good.write_text("export EF_NAME='gw a'\n")
    assert launch_onload([*argv[:1], f"--env-file={good}", *argv[2:]], env) == 0
    out = capsys.readouterr().out
    assert "env: EF_NAME=gw a" in out and "env: GATEWAY_TRANSPORT_LAUNCHED=onload" in out
