"""Start the gateway as a real process; drive the official client in threads."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.conftest import DBN_SAMPLES, TEST_LOOP
from tests.support import wire as _wire
from tests.support.prometheus import Samples, metric, parse_samples
from tests.support.waiting import apoll_until, poll_until
from tests.support.wire import error_texts, split_records

__all__ = [
    "DATA",
    "KEY",
    "OTHER_KEY",
    "ROOT",
    "GatewayProcess",
    "OfficialSession",
    "RawClient",
    "apoll_until",
    "data_records",
    "error_texts",
    "gateway",
    "http_get",
    "metric",
    "metric_at_least",
    "metric_samples",
    "poll_until",
    "split_records",
    "start_gateway",
    "synthetic_records",
    "synthetic_trades",
]

KEY = "db-TESTKEY0000000000000000000000"
OTHER_KEY = "db-OTHERKEY000000000000000000000"
ROOT = Path(__file__).resolve().parents[2]
DATA = DBN_SAMPLES  # the DBN sample files, inside the repository (tests/data/dbn)


@dataclass
class GatewayProcess:
    proc: subprocess.Popen[str]
    port: int
    metrics_port: int
    ingest_ports: dict[str, int]
    log_path: Path
    lines: list[str] = field(default_factory=list)
    config_path: Path | None = None

    saved_log: str | None = None

    def cleanup(self) -> None:
        """Remove the temporary config and log files (after stop()); log() still works."""
        if self.saved_log is None and self.log_path.exists():
            self.saved_log = self.log_path.read_text(errors="replace")
        for path in (self.config_path, self.log_path):
            if path is not None:
                path.unlink(missing_ok=True)

    def log(self) -> str:
        if self.saved_log is not None:
            return self.saved_log
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode


def start_gateway(
    *args: str,
    feeds: dict[str, str] | None = None,
    keys: list[str] | None = None,
    timeout: float = 20.0,
    env: dict[str, str] | None = None,
    python: str = sys.executable,
    max_sessions: int = 1000,
    config: str = "",
) -> GatewayProcess:
    cfg = Path(tempfile.mkstemp(prefix="gateway-", suffix=".toml")[1])
    # Extra config first: top-level keys must come before the first [table].
    cfg.write_text(
        config
        + "\n"
        + "".join(
            f'[[api_keys]]\nkey = "{key}"\nmax_sessions = {max_sessions}\n'
            for key in (keys if keys is not None else [KEY])
        )
    )
    cmd = [
        python,
        "-m",
        "gateway",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--loop",
        TEST_LOOP,
        "--config",
        str(cfg),
    ]
    for dataset, uri in (feeds or {}).items():
        cmd += ["--feed", f"{dataset}={uri}"]
    cmd += list(args)
    log = Path(tempfile.mkstemp(prefix="gateway-", suffix=".log")[1])
    full_env = dict(os.environ)
    full_env.update(env or {})
    with log.open("w") as err:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT, env=full_env
        )
    assert proc.stdout is not None
    ingest: dict[str, int] = {}
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        m = re.match(r"ingest dataset=(\S+) port=(\d+)", line)
        if m:
            ingest[m.group(1)] = int(m.group(2))
        m = re.match(r"listening host=\S+ port=(\d+) metrics_port=(\d+)", line)
        if m:
            # Keep draining stdout so the child never blocks on a full pipe.
            threading.Thread(target=_drain, args=(proc.stdout, lines), daemon=True).start()
            return GatewayProcess(
                proc, int(m.group(1)), int(m.group(2)), ingest, log, lines, config_path=cfg
            )
    proc.kill()
    proc.wait(5)
    proc.stdout.close()
    text = log.read_text()
    log.unlink(missing_ok=True)
    cfg.unlink(missing_ok=True)
    raise RuntimeError(f"gateway did not start: rc={proc.returncode}\n{text}")


def _drain(stream: Any, lines: list[str]) -> None:
    for line in stream:
        lines.append(line)


@contextlib.contextmanager
def gateway(*args: str, **kwargs: Any) -> Iterator[GatewayProcess]:
    gw = start_gateway(*args, **kwargs)
    try:
        yield gw
    finally:
        rc = gw.stop()
        tail = gw.log()[-4000:] if rc else ""
        gw.cleanup()
        assert rc == 0, f"gateway exited with {rc}\n{tail}"


# --- raw protocol helpers (for hostile and precise tests) -------------------------------


class RawClient(_wire.RawClient):
    """``tests.support.wire.RawClient`` whose handshake defaults to the suite's ``KEY``."""

    def handshake(self, key: str = KEY, dataset: str = "DEMO.SYNTH", extra: str = "") -> str:
        return super().handshake(key, dataset, extra)


# --- the official client ------------------------------------------------------------------


class OfficialSession:
    """One databento.Live session in a background thread with our own timeouts."""

    def __init__(
        self,
        port: int,
        dataset: str,
        subscriptions: list[dict[str, Any]],
        key: str = KEY,
        **live_kwargs: Any,
    ) -> None:
        import databento as db

        self.records: list[Any] = []
        self.error: BaseException | None = None
        self.metadata: Any = None
        self.subscribed = threading.Event()
        self.client = db.Live(key=key, gateway="127.0.0.1", port=port, **live_kwargs)
        self.client.add_callback(self.records.append)
        self._dataset = dataset
        self._subs = subscriptions
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for sub in self._subs:
                self.client.subscribe(dataset=self._dataset, **sub)
            self.subscribed.set()
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            self.error = exc
            self.subscribed.set()

    def start(self, timeout: float = 15.0) -> None:
        assert self.subscribed.wait(timeout), "subscribe() did not return"
        if self.error is not None:
            raise self.error
        self.client.start()
        deadline = time.monotonic() + timeout
        while self.client.metadata is None and time.monotonic() < deadline:
            time.sleep(0.01)
        self.metadata = self.client.metadata

    def wait_for(self, predicate: Any, timeout: float = 15.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(list(self.records)):
                return True
            time.sleep(0.02)
        return False

    def stop(self, timeout: float = 10.0) -> BaseException | None:
        """Close the session; returns the exception the client raised on close, if any."""
        try:
            self.client.stop()
            self.client.block_for_close(timeout)
        except BaseException as exc:  # noqa: BLE001
            return exc
        return None


def data_records(records: list[Any]) -> list[Any]:
    """Records that are not gateway-generated (System/Error/SymbolMapping)."""
    return [r for r in records if int(r.rtype) not in (0x15, 0x16, 0x17)]


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        body = exc.read().decode()
        exc.close()
        return exc.code, body


def metric_samples(port: int) -> Samples:
    """Every sample of /metrics, parsed with prometheus-client's own parser."""
    status, text = http_get(port, "/metrics")
    assert status == 200
    return parse_samples(text)


def metric_at_least(
    port: int, name: str, want: float, timeout: float = 15.0, **labels: str
) -> float:
    """Poll /metrics until ``name`` (summed over ``labels``) reaches ``want``; its value."""

    def reached() -> tuple[float] | None:
        value = metric(metric_samples(port), name, **labels)
        return (value,) if value >= want else None

    return poll_until(reached, timeout, 0.05, f"{name}{labels or ''} >= {want}")[0]


def synthetic_records(schema: str, n: int, seed: int) -> tuple[dict[str, int], list[bytes]]:
    """(raw symbol -> instrument_id, ``n`` records of ``schema``) from the synthetic
    generator: what a test publisher sends to an ingest feed."""
    from gateway.feeds.synthetic import SyntheticGenerator, SyntheticOptions

    gen = SyntheticGenerator(SyntheticOptions(instruments=4, seed=seed, schemas=(schema,)))
    blob = b"".join(gen.make(n, time.time_ns(), 1_000_000))
    size = blob[0] * 4
    return dict(gen.instruments), [blob[i : i + size] for i in range(0, len(blob), size)]


def synthetic_trades(n: int, seed: int) -> tuple[dict[str, int], list[bytes]]:
    return synthetic_records("trades", n, seed)


def socket_owner(server_port: int, client_port: int, pids: list[int]) -> int | None:
    """The pid (of ``pids``) holding the server end of the connection from ``client_port``."""
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        parts = line.split()
        local, remote = parts[1].split(":"), parts[2].split(":")
        if int(local[1], 16) == server_port and int(remote[1], 16) == client_port:
            inode = parts[9]
    if inode is None or inode == "0":
        return None
    want = f"socket:[{inode}]"
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == want:
                    return pid
            except OSError:
                continue
    return None
