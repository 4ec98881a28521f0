"""Bad feed options on the command line: a config error naming the option (exit 2, one
line on stderr), never a traceback and never a feed that dies after start-up."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.integration.helpers import KEY, ROOT


def _serve(feed: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "gateway", "serve", "--api-key", KEY, "--port", "0"]
    return subprocess.run(
        [*cmd, "--feed", f"X={feed}"], cwd=ROOT, capture_output=True, text=True, timeout=30
    )


@pytest.mark.parametrize(
    ("feed", "named"),
    [
        ("ingest://127.0.0.1:99999", "ingest port"),
        ("ingest://127.0.0.1:0?idle_timeout_s=0", "idle_timeout_s"),
        ("ingest://127.0.0.1:0?idle_timeout_s=nan", "idle_timeout_s"),
        ("ingest://127.0.0.1:0?allow=10.0.0.300/8", "allow"),
        ("synthetic:?rate=nan", "rate"),
        ("synthetic:?rate=1e12", "rate"),
        ("synthetic:?seed=-1", "seed"),
    ],
)
def test_bad_feed_option_exits_2_naming_it(feed: str, named: str) -> None:
    done = _serve(feed)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith("gateway: error: feeds.X: ")
    assert named in done.stderr and "unknown option" not in done.stderr


def test_a_directory_is_called_a_directory() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="gw-feed-dir-"))
    try:
        done = _serve(f"file:{tmp}")
    finally:
        shutil.rmtree(tmp)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert f"{tmp} is a directory" in done.stderr and "does not exist" not in done.stderr
