"""API keys off the command line (serve --api-key-file, probe --key-file and
DATABENTO_API_KEY), and --print-connect-help: printed once listening, with the bound port,
never with a key other than the public demo key."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

from tests.conftest import TEST_LOOP
from tests.integration.helpers import (
    KEY,
    OTHER_KEY,
    ROOT,
    GatewayProcess,
    OfficialSession,
    RawClient,
    data_records,
    gateway,
    poll_until,
)

SYNTH = {"DEMO.SYNTH": "synthetic:?rate=2000"}
DEMO_KEY = "db-DEMO0000000000000000000000000"  # the Makefile's DEMO_KEY
FILE_KEY = "db-FILEKEY0000000000000000000001"
FILE_KEY_2 = "db-FILEKEY0000000000000000000002"


def _key_file(path: Path, *keys: str) -> Path:
    path.write_text(
        "# gateway API keys, one per line\n\n" + "".join(f"  {k}  \n# a comment\n" for k in keys)
    )
    path.chmod(0o600)
    return path


def _cmdline(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes()


def _wait_for_help(gw: GatewayProcess, timeout: float = 15.0) -> str:
    """stdout once the connect help (which ends with "Stop with Ctrl-C.") is complete."""

    def complete() -> str:
        text = "".join(gw.lines)
        assert "Stop with Ctrl-C." in text or gw.proc.poll() is None, f"exited: {text!r}"
        return text if "Stop with Ctrl-C." in text else ""

    return poll_until(complete, timeout, what="the connect help on stdout")


def _env_without_key(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DATABENTO_API_KEY"}
    env.update(extra)
    return env


def _probe(port: int, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "gateway", "probe", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--dataset", "DEMO.SYNTH", "--loop", TEST_LOOP, "--once", "--no-history", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


# --- serve --api-key-file -------------------------------------------------------------------


def test_serve_reads_keys_from_a_file_and_they_are_not_in_its_command_line(
    tmp_path: Path,
) -> None:
    keys = _key_file(tmp_path / "api-keys", FILE_KEY, FILE_KEY_2)
    with gateway("--api-key-file", str(keys), feeds=SYNTH, keys=[]) as gw:
        cmdline = _cmdline(gw.proc.pid)
        assert b"--api-key-file\0" + str(keys).encode() in cmdline
        for key in (FILE_KEY, FILE_KEY_2):
            assert key.encode() not in cmdline
        # the official client logs in with the second key of the file
        s = OfficialSession(
            gw.port, "DEMO.SYNTH", [{"schema": "trades", "symbols": "ALL_SYMBOLS"}], key=FILE_KEY_2
        )
        s.start()
        assert s.wait_for(lambda recs: len(data_records(recs)) > 10)
        assert s.stop() is None
        # a key that is not in the file (nor anywhere else) is refused
        bad = OfficialSession(gw.port, "DEMO.SYNTH", [{"schema": "trades", "symbols": "AAPL"}])
        assert bad.subscribed.wait(20)
        assert bad.error is not None and "Authentication failed" in str(bad.error)
    log = gw.log()
    assert FILE_KEY not in log and FILE_KEY_2 not in log
    assert "other users can read" not in log  # mode 600: no warning


def test_serve_key_file_errors_name_the_flag_and_line_never_the_key(tmp_path: Path) -> None:
    def serve(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "gateway", "serve", "--port", "0", *args]
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=30)

    bad = tmp_path / "bad-keys"
    secret = "db-SECRET-but-too-long-0000000000000"
    bad.write_text(f"# comment\n{FILE_KEY}\n\n{secret}\n")
    res = serve("--api-key-file", str(bad))
    assert res.returncode == 2
    assert f"--api-key-file {bad} line 4: not an API key: must be 32 printable" in res.stderr
    assert secret not in res.stderr + res.stdout and FILE_KEY not in res.stderr

    dup = _key_file(tmp_path / "dup", FILE_KEY)
    res = serve("--api-key-file", str(dup), "--api-key-file", str(dup))
    assert res.returncode == 2
    assert f"--api-key-file {dup} line 3: duplicate key" in res.stderr
    assert FILE_KEY not in res.stderr

    res = serve("--api-key-file", str(tmp_path / "missing"))
    assert res.returncode == 2
    assert f"--api-key-file {tmp_path / 'missing'}: cannot read: No such file" in res.stderr

    empty = tmp_path / "empty"
    empty.write_text("# nothing here\n\n")
    res = serve("--api-key-file", str(empty))
    assert res.returncode == 2 and f"--api-key-file {empty}: no API key in the file" in res.stderr

    res = serve()
    assert res.returncode == 2 and "api_keys: no API key configured" in res.stderr
    assert "--api-key-file FILE" in res.stderr


def test_serve_warns_about_a_key_file_others_can_read(tmp_path: Path) -> None:
    keys = _key_file(tmp_path / "api-keys", FILE_KEY)
    keys.chmod(0o644)
    with gateway("--api-key-file", str(keys), feeds=SYNTH, keys=[]) as gw:
        c = RawClient(gw.port)
        assert c.handshake(key=FILE_KEY).startswith("success=1")
        c.close()
    assert f"--api-key-file {keys}: other users can read this key file" in gw.log()


# --- probe --key-file and DATABENTO_API_KEY ------------------------------------------------


def test_probe_takes_its_key_from_the_environment_or_a_key_file(tmp_path: Path) -> None:
    probe_key = _key_file(tmp_path / "probe-key", FILE_KEY)
    with gateway(feeds=SYNTH, keys=[KEY, FILE_KEY]) as gw:
        # DATABENTO_API_KEY, as the official clients
        res = _probe(gw.port, env=_env_without_key(DATABENTO_API_KEY=KEY))
        assert res.returncode == 0, res.stdout + res.stderr
        assert res.stdout.startswith("probe ok "), res.stdout
        # --key-file
        res = _probe(gw.port, "--key-file", str(probe_key), env=_env_without_key())
        assert res.returncode == 0, res.stdout + res.stderr
        # precedence: --key-file over the environment (which holds a key the gateway refuses)
        res = _probe(
            gw.port, "--key-file", str(probe_key), env=_env_without_key(DATABENTO_API_KEY=OTHER_KEY)
        )
        assert res.returncode == 0, res.stdout + res.stderr
        # precedence: --key over --key-file and the environment
        res = _probe(
            gw.port,
            "--key",
            OTHER_KEY,
            "--key-file",
            str(probe_key),
            env=_env_without_key(DATABENTO_API_KEY=KEY),
        )
        assert res.returncode == 1 and "probe failed at step auth" in res.stdout, res.stdout
        # the environment alone, with a key the gateway refuses: it was the one used
        res = _probe(gw.port, env=_env_without_key(DATABENTO_API_KEY=OTHER_KEY))
        assert res.returncode == 1 and "probe failed at step auth" in res.stdout
    for key in (KEY, FILE_KEY, OTHER_KEY):
        assert key not in gw.log()


def test_probe_key_errors_name_the_source_never_the_key(tmp_path: Path) -> None:
    res = _probe(13000, env=_env_without_key())
    assert res.returncode == 2
    assert "key: no API key given; use --key-file FILE or set DATABENTO_API_KEY" in res.stderr

    res = _probe(13000, env=_env_without_key(DATABENTO_API_KEY="db-short"))
    assert res.returncode == 2
    assert "DATABENTO_API_KEY: API keys are 32 printable ASCII characters" in res.stderr
    assert "db-short" not in res.stderr

    two = _key_file(tmp_path / "two", FILE_KEY, FILE_KEY_2)
    res = _probe(13000, "--key-file", str(two), env=_env_without_key())
    assert res.returncode == 2
    assert f"--key-file {two} line 5: more than one key" in res.stderr
    assert FILE_KEY not in res.stderr and FILE_KEY_2 not in res.stderr

    bad = tmp_path / "bad"
    bad.write_text("not-a-key\n")
    res = _probe(13000, "--key-file", str(bad), env=_env_without_key())
    assert res.returncode == 2
    assert f"--key-file {bad} line 1: not an API key" in res.stderr
    assert "not-a-key" not in res.stderr


# --- --print-connect-help -------------------------------------------------------------------


def test_connect_help_prints_the_bound_port_and_the_demo_key(tmp_path: Path) -> None:
    keys = _key_file(tmp_path / "demo-key", DEMO_KEY)
    with gateway("--api-key-file", str(keys), "--print-connect-help", feeds=SYNTH, keys=[]) as gw:
        out = _wait_for_help(gw)
        m = re.search(r"serving DEMO\.SYNTH on 127\.0\.0\.1:(\d+)\.", out)
        assert m is not None, out
        assert int(m.group(1)) == gw.port != 0
        assert f'gateway="127.0.0.1", port={gw.port})' in out
        assert f'db.Live(key="{DEMO_KEY}"' in out and "(demo key: for local use only)" in out
        # printed after the listening line, and what it says works
        assert out.index("listening host=") < out.index("Connect with the official client")
        c = RawClient(int(m.group(1)))
        assert c.handshake(key=DEMO_KEY).startswith("success=1")
        c.close()


def test_connect_help_never_prints_a_real_key(tmp_path: Path) -> None:
    keys = _key_file(tmp_path / "api-keys", FILE_KEY)
    # FILE_KEY from the file, KEY from the config file
    with gateway("--api-key-file", str(keys), "--print-connect-help", feeds=SYNTH) as gw:
        out = _wait_for_help(gw)
    assert FILE_KEY not in out and KEY not in out
    assert 'db.Live(key="<your API key>"' in out
    assert "API key: one of the keys you configured (not printed)" in out
    assert f"127.0.0.1:{gw.port}." in out


def test_port_in_use_exits_2_naming_the_port_without_connect_help(tmp_path: Path) -> None:
    keys = _key_file(tmp_path / "demo-key", DEMO_KEY)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cmd = [sys.executable, "-m", "gateway", "serve", "--host", "127.0.0.1"]
        cmd += ["--port", str(port), "--loop", TEST_LOOP, "--feed", "DEMO.SYNTH=synthetic:"]
        cmd += ["--api-key-file", str(keys), "--print-connect-help"]
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert res.returncode == 2, res.stdout + res.stderr
    assert str(port) in res.stderr and "address already in use" in res.stderr.lower()
    assert "Connect with the official client" not in res.stdout
    assert DEMO_KEY not in res.stdout and "listening host=" not in res.stdout
