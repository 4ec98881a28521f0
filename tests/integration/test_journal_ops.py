"""The journal as an operator sees it (a real gateway process, ``--journal-dir``): files grow
while sessions receive, one gateway per directory (the lock), and a write error that stops
journaling without touching live fan-out."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.helpers import (
    KEY,
    RawClient,
    gateway,
    poll_until,
    start_gateway,
)

DATASET = "JRNL.OPS"
#: trades only: one rt file per segment, growing at about 48 bytes a record
FEED = {DATASET: "synthetic:?rate=4000&instruments=8&schemas=trades"}


@pytest.fixture
def journal_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="gateway-journal-") as tmp:
        yield Path(tmp)


def _journal_bytes(root: Path) -> int:
    """Bytes in the dataset's files under the journal directory (not the lock)."""
    base = root / DATASET
    if not base.is_dir():
        return 0
    return sum(p.stat().st_size for p in base.rglob("*") if p.is_file())


def _live_session(port: int) -> RawClient:
    client = RawClient(port)
    assert client.handshake(dataset=DATASET).startswith("success=1")
    client.subscribe("trades", "ALL_SYMBOLS")
    client.start()
    return client


def _receives(client: RawClient, nbytes: int) -> None:
    """``client`` reads at least ``nbytes`` more bytes of its stream (bounded in time)."""
    got = 0

    def more() -> bool:
        nonlocal got
        got += len(client.recv_some(2.0))
        return got >= nbytes

    poll_until(more, timeout=10.0, interval=0.0, what=f"{nbytes} more bytes of live data")


def test_journal_files_grow_while_a_live_session_receives(journal_dir: Path) -> None:
    with gateway("--journal-dir", str(journal_dir), feeds=FEED) as gw:
        client = _live_session(gw.port)
        try:
            _receives(client, 4096)
            first = poll_until(lambda: _journal_bytes(journal_dir), 10.0, 0.05, "journal bytes")
            _receives(client, 4096)
            poll_until(
                lambda: _journal_bytes(journal_dir) > first, 10.0, 0.05, "the journal to grow"
            )
        finally:
            client.close()
        assert (journal_dir / "LOCK").is_file()
        log = gw.log()
        assert f"journal dir={journal_dir}" in log
    # a clean stop leaves the journal unlocked: the next gateway opens it and says what it has
    with gateway("--journal-dir", str(journal_dir), feeds=FEED) as again:
        line = next(x for x in again.log().splitlines() if "journal dir=" in x)
        assert f"{DATASET}:1-" in line


def test_a_second_gateway_on_the_same_journal_exits_naming_the_lock(journal_dir: Path) -> None:
    with gateway("--journal-dir", str(journal_dir), feeds=FEED) as gw:
        with pytest.raises(RuntimeError) as failed:
            start_gateway("--journal-dir", str(journal_dir), feeds=FEED, timeout=15.0)
        text = str(failed.value)
        assert "rc=2" in text
        assert "lock" in text.lower() and str(journal_dir) in text
        assert "listening" not in text
        # the first one is untouched: still serving, still journaling
        client = _live_session(gw.port)
        try:
            _receives(client, 1024)
        finally:
            client.close()


def _fsize_limited_python(tmp: Path, limit_bytes: int) -> str:
    """A wrapper that starts Python with RLIMIT_FSIZE set (``ulimit -f``, 512-byte blocks):
    a journal file that reaches the limit gets EFBIG (CPython ignores SIGXFSZ); the small
    files (the log) are written as usual."""
    wrapper = tmp / "python-fsize"
    wrapper.write_text(f'#!/bin/sh\nulimit -f {limit_bytes // 512}\nexec {sys.executable} "$@"\n')
    wrapper.chmod(0o700)
    return str(wrapper)


def test_a_journal_write_error_leaves_live_sessions_and_the_gateway_serving(
    journal_dir: Path,
) -> None:
    with tempfile.TemporaryDirectory(prefix="gateway-fsize-") as tmp:
        python = _fsize_limited_python(Path(tmp), 96 * 1024)
        with gateway("--journal-dir", str(journal_dir), feeds=FEED, python=python) as gw:
            client = _live_session(gw.port)
            try:
                poll_until(lambda: "disabled" in gw.log(), 15.0, 0.05, "the journal to be disabled")
                # the session that was receiving goes on receiving
                _receives(client, 8192)
                # and the gateway serves new sessions
                other = _live_session(gw.port)
                try:
                    _receives(other, 4096)
                finally:
                    other.close()
            finally:
                client.close()
            errors = [line for line in gw.log().splitlines() if "ERROR" in line]
            assert len(errors) == 1, errors
            assert f"journal {DATASET} disabled" in errors[0]
            assert "Traceback" not in gw.log()
            # the journal stopped where the error was: nothing more is written
            size = _journal_bytes(journal_dir)
            assert size <= 2 * 96 * 1024 + 65536


def test_a_journal_dir_that_cannot_be_made_is_a_clear_start_error() -> None:
    with tempfile.TemporaryDirectory(prefix="gateway-journal-") as tmp:
        blocker = Path(tmp) / "a-file"
        blocker.write_text("not a directory\n")
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "gateway",
                "serve",
                "--port",
                "0",
                "--api-key",
                KEY,
                "--feed",
                f"{DATASET}=synthetic:",
                "--journal-dir",
                str(blocker / "journal"),
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            cwd=Path(__file__).resolve().parents[2],
            env=dict(os.environ),
        )
        assert out.returncode == 2, out.stderr
        assert "journal" in out.stderr and "listening" not in out.stdout
