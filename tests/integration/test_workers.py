"""``gateway serve --workers 2`` as real processes over real sockets: the start-up lines,
sessions spread over both workers and all complete and in order, a worker killed with
SIGKILL (its sessions end, the others go on, a new worker serves), the supervisor killed
with SIGKILL (no process left holding the port), the SIGTERM drain, and every worker
under a preload library."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest

from gateway.connection import SHUTDOWN_TEXT
from gateway.dbn import encode_publisher_metadata
from gateway.transport import mapped_libraries
from gateway.workers.ring import remove_stale
from gateway.workers.supervisor import remove_stale_dirs
from tests.integration.helpers import (
    KEY,
    OTHER_KEY,
    GatewayProcess,
    RawClient,
    error_texts,
    gateway,
    http_get,
    metric,
    metric_at_least,
    metric_samples,
    poll_until,
    socket_owner,
    start_gateway,
    synthetic_trades,
)
from tests.integration.test_transport import (  # noqa: F401 - the fakes fixture
    Fakes,
    check_byte_exact_fanout,
    fakes,
)

DATASET = "T.FEED"
FEEDS = {DATASET: "ingest://127.0.0.1:0"}
#: 1 MiB rings, a short drain: small and quick
CONFIG = "shutdown_grace_s = 2.0\n[workers]\nring_bytes = 1048576\n"
GATEWAY_RTYPES = {0x15, 0x16, 0x17}  # ErrorMsg, SymbolMappingMsg, SystemMsg


# --- helpers -------------------------------------------------------------------------------


class Session:
    """A raw ALL_SYMBOLS trades session; ``pump`` reads what has arrived."""

    def __init__(self, port: int) -> None:
        self.client = RawClient(port)
        assert "success=1" in self.client.handshake(KEY, DATASET)
        self.client.subscribe("trades", "ALL_SYMBOLS")
        self.client.start()
        self.local_port = self.client.sock.getsockname()[1]
        self.buf = b""
        self.header = False
        self.records: list[bytes] = []
        self.eof = False

    @property
    def data(self) -> list[bytes]:
        return [r for r in self.records if r[1] not in GATEWAY_RTYPES]

    def pump(self, limit: float = 0.05) -> None:
        if self.eof:
            return
        self.client.sock.settimeout(limit)
        try:
            chunk = self.client.sock.recv(1 << 20)
        except TimeoutError:
            return
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            self.eof = True
            return
        self.buf += chunk
        if not self.header:
            if len(self.buf) < 8 or len(self.buf) < 8 + int.from_bytes(self.buf[4:8], "little"):
                return
            assert self.buf[:3] == b"DBN"
            self.buf = self.buf[8 + int.from_bytes(self.buf[4:8], "little") :]
            self.header = True
        off = 0
        while len(self.buf) - off >= 1 and len(self.buf) - off >= self.buf[off] * 4 > 0:
            size = self.buf[off] * 4
            self.records.append(self.buf[off : off + size])
            off += size
        self.buf = self.buf[off:]

    def close(self) -> None:
        self.client.close()


def pump_until(sessions: list[Session], done: object, timeout: float, what: str) -> None:
    def check() -> bool:
        for s in sessions:
            s.pump(0.01)
        return all(done(s) for s in sessions)  # type: ignore[operator]

    poll_until(check, timeout, 0.0, what)


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def spread_sessions(
    gw: GatewayProcess, pids: list[int], per_worker: int
) -> dict[int, list[Session]]:
    """Open sessions until every worker in ``pids`` has ``per_worker`` (bounded tries)."""
    by_pid: dict[int, list[Session]] = {pid: [] for pid in pids}
    extra: list[Session] = []
    for _ in range(16 * per_worker * len(pids)):
        if all(len(v) >= per_worker for v in by_pid.values()):
            break
        s = Session(gw.port)
        find = functools.partial(socket_owner, gw.port, s.local_port, pids)
        owner = poll_until(find, 5, what="the session's worker")
        (by_pid[owner] if len(by_pid[owner]) < per_worker else extra).append(s)
    for s in extra:
        s.close()
    assert all(len(v) >= per_worker for v in by_pid.values()), {
        p: len(v) for p, v in by_pid.items()
    }
    return by_pid


def streaming(gw: GatewayProcess, n: int) -> bool:
    status, body = http_get(gw.metrics_port, "/status.json")
    return status == 200 and f'"streaming": {n}' in body


def publish(pub: socket.socket, n: int, seed: int) -> list[bytes]:
    _, records = synthetic_trades(n, seed)
    pub.sendall(b"".join(records))
    return records


def publisher(gw: GatewayProcess) -> tuple[socket.socket, dict[str, int]]:
    ids, _ = synthetic_trades(1, 1)
    pub = socket.create_connection(("127.0.0.1", gw.ingest_ports[DATASET]), timeout=10)
    pub.sendall(encode_publisher_metadata(DATASET, time.time_ns(), ids, schema="trades"))
    poll_until(lambda: f"feed {DATASET} up" in gw.log(), 10, what="the feed up")
    return pub, ids


# --- tests ---------------------------------------------------------------------------------


def test_sessions_spread_complete_in_order_survive_a_worker_kill_and_drain() -> None:
    gw = start_gateway("--workers", "2", "--metrics-port", "0", feeds=FEEDS, config=CONFIG)
    sessions: list[Session] = []
    try:
        # Start-up lines: ingest, then workers N pids=..., then listening.
        lines = [ln.strip() for ln in gw.lines]
        assert re.fullmatch(r"ingest dataset=T\.FEED port=\d+", lines[0]), lines
        m = re.fullmatch(r"workers 2 pids=(\d+),(\d+)", lines[1])
        assert m, lines
        assert lines[2].startswith("listening host=127.0.0.1 port="), lines
        pids = [int(m.group(1)), int(m.group(2))]
        assert sorted(children(gw.proc.pid)) == sorted(pids)
        for pid in pids:  # each worker logs as itself and reports its transport
            assert re.search(rf"worker w\d pid={pid} ready transport transport=plain", gw.log())
        assert re.search(r"INFO gateway\.\S+ worker=w0 ", gw.log())
        assert re.search(r"INFO gateway\.\S+ worker=w1 ", gw.log())

        pub, _ = publisher(gw)
        by_pid = spread_sessions(gw, pids, 2)
        sessions = [s for v in by_pid.values() for s in v]
        poll_until(lambda: streaming(gw, len(sessions)), 10, 0.05, "every session streaming")

        first = publish(pub, 2000, seed=3)
        pump_until(sessions, lambda s: len(s.data) >= len(first), 15, "every record")
        for s in sessions:
            assert s.data == first  # complete, in order, byte for byte
        out = "gateway_records_out_total"
        sent = metric_at_least(gw.metrics_port, out, len(sessions) * len(first), 10)

        # SIGKILL one worker while the feed keeps publishing (~4 MB/s, far more than the
        # 1 MiB ring holds while a worker boots): its sessions end, the other worker's go on,
        # and the restarted worker holds no ring space before it can read (its slot goes live
        # after it says Prepared), so the ring never fills and the source is never paused.
        victim, survivor = pids
        ring_full = "gateway_worker_ring_full_total"
        assert metric(metric_samples(gw.metrics_port), ring_full) == 0
        victim_name = re.findall(rf"worker (w\d) pid={victim} ready", gw.log())[0]
        kept = by_pid[survivor]
        stop = threading.Event()
        second: list[bytes] = []

        def keep_publishing() -> None:
            for seed in range(100, 400):  # bounded: 60 s at most
                second.extend(publish(pub, 4000, seed))
                if stop.wait(0.05):  # the feed's pace, not a wait for a condition
                    return

        sender = threading.Thread(target=keep_publishing)
        sender.start()
        readyz: list[tuple[int, str]] = []
        try:
            os.kill(victim, signal.SIGKILL)

            def restarted() -> list[int]:
                for s in [*kept, *by_pid[victim]]:
                    s.pump(0.005)
                readyz.append(http_get(gw.metrics_port, "/readyz"))
                pids_now = [p for p in children(gw.proc.pid) if p not in pids]
                ready = [p for p in pids_now if re.search(rf"pid={p} ready transport", gw.log())]
                return ready

            fresh = poll_until(restarted, 15, 0.0, "a new worker ready")[0]
        finally:
            stop.set()
            sender.join(10)
        pump_until(by_pid[victim], lambda s: s.eof, 10, "the killed worker's sessions to end")
        assert f"pid={victim} exited (signal 9); restarting" in gw.log()
        assert metric(metric_samples(gw.metrics_port), out) >= sent  # counters never go down
        pump_until(kept, lambda s: len(s.data) >= len(first) + len(second), 20, "the survivors")
        for s in kept:
            assert s.data == first + second and not s.eof
        assert len(second) >= 8000
        assert metric(metric_samples(gw.metrics_port), ring_full) == 0  # never paused
        # /readyz stayed ready (the survivor served), naming the worker that was down
        assert {code for code, _ in readyz} == {200}, readyz
        down = [json.loads(body)["workers"] for _, body in readyz]
        assert {"up": 1, "of": 2, "down": [victim_name]} in down, down
        status = json.loads(http_get(gw.metrics_port, "/status.json")[1])
        assert status["gateway"]["workers"] == {"up": 2, "of": 2, "down": []}
        added = spread_sessions(gw, [survivor, fresh], 1)
        live = kept + added[survivor] + added[fresh]
        sessions += added[survivor] + added[fresh]
        poll_until(lambda: streaming(gw, len(live)), 10, 0.05, "the new sessions streaming")
        third = publish(pub, 300, seed=5)
        pump_until(added[fresh], lambda s: len(s.data) >= len(third), 15, "the new worker")
        assert added[fresh][0].data == third

        # SIGHUP: the supervisor reads the config again and every worker applies it.
        assert gw.config_path is not None
        gw.config_path.write_text(
            gw.config_path.read_text() + f'[[api_keys]]\nkey = "{OTHER_KEY}"\n'
        )
        gw.proc.send_signal(signal.SIGHUP)
        poll_until(
            lambda: len(re.findall(r"worker=w\d config reloaded keys=2 added=1", gw.log())) == 2,
            10,
            0.05,
            "both workers reloaded",
        )
        assert "config reloaded keys=2 forwarded_to_workers=2" in gw.log()
        late = RawClient(gw.port)
        try:
            assert "success=1" in late.handshake(OTHER_KEY, DATASET)
        finally:
            late.close()

        # SIGTERM: every session gets the shutdown ErrorMsg, then EOF; everything exits 0.
        gw.proc.send_signal(signal.SIGTERM)
        pump_until(live, lambda s: s.eof, 15, "EOF after the drain")
        for s in live:
            assert SHUTDOWN_TEXT in [t for _, t in error_texts(s.records)], s.records[-2:]
            s.close()  # the gateway's lingering close ends when the client closes
        assert gw.proc.wait(15) == 0
        assert not [p for p in [*pids, fresh] if alive(p)]
        pub.close()
    finally:
        for s in sessions:
            s.close()
        gw.stop()
        gw.cleanup()


def test_a_stuck_worker_is_replaced_and_a_killed_supervisor_leaves_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = CONFIG + "worker_stall_s = 1.0\n"
    # lossless: the healthy worker never skips ahead, whatever the burst
    feeds = {DATASET: "ingest://127.0.0.1:0?backpressure=1"}
    with tempfile.TemporaryDirectory(prefix="gw-workers-") as tmp:
        gw = start_gateway(
            "--workers", "2", "--metrics-port", "0", feeds=feeds, config=config, env={"TMPDIR": tmp}
        )
        sessions: list[Session] = []
        try:
            pids = [int(p) for p in re.findall(r"\d+", gw.lines[1].split("pids=")[1])]
            assert len(pids) == 2 and all(alive(p) for p in pids)
            pub, _ = publisher(gw)
            by_pid = spread_sessions(gw, pids, 1)
            sessions = [s for v in by_pid.values() for s in v]
            poll_until(lambda: streaming(gw, 2), 10, 0.05, "both sessions streaming")
            # A worker that stops reading (SIGSTOP) holds the 1 MiB ring full: the supervisor
            # kills it after worker_stall_s and starts another; the other worker's session
            # gets every record (the publisher waited meanwhile).
            stuck, healthy = pids
            os.kill(stuck, signal.SIGSTOP)
            _, records = synthetic_trades(40_000, 6)  # 1.9 MB
            sender = threading.Thread(target=pub.sendall, args=(b"".join(records),))
            sender.start()
            pump_until(by_pid[healthy], lambda s: len(s.data) >= len(records), 20, "every record")
            sender.join(10)
            assert by_pid[healthy][0].data == records
            assert re.search(rf"worker w\d pid={stuck} stuck: no heartbeat for", gw.log())
            assert f"pid={stuck} exited (signal 9); restarting" in gw.log()
            fresh = poll_until(
                lambda: [p for p in children(gw.proc.pid) if p not in pids], 10, what="a new worker"
            )
            samples = metric_samples(gw.metrics_port)
            assert metric(samples, "gateway_worker_restarts_total") == 1
            for s in sessions:
                s.close()
            pub.close()

            # The supervisor killed: every worker exits, nothing holds the port.
            gw.proc.kill()
            gw.proc.wait(5)
            everyone = [*pids, *fresh]

            def port_free() -> bool:
                # no SO_REUSEPORT: fails while any listener of the gateway is bound to it
                # (SO_REUSEADDR only steps over the closed sessions' TIME_WAIT)
                with socket.socket() as probe:
                    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    try:
                        probe.bind(("127.0.0.1", gw.port))
                        probe.listen()
                    except OSError:
                        return False
                return True

            poll_until(port_free, 10, 0.05, "the client port free")
            poll_until(lambda: not any(alive(p) for p in everyone), 10, 0.05, "no worker left")
            # What it could not clean up, the next supervisor removes at its start.
            left = list(Path(tmp).glob(f"lsg-sup-{gw.proc.pid}-*"))
            assert len(left) == 1 and (left[0] / "limits").exists()
            monkeypatch.setattr(tempfile, "tempdir", tmp)
            assert remove_stale_dirs() == [str(left[0])]
            assert f"lsg-{gw.proc.pid}-0-" in " ".join(remove_stale())
        finally:
            for s in sessions:
                s.close()
            with contextlib.suppress(ProcessLookupError):
                os.kill(pids[0], signal.SIGCONT)
            gw.stop()
            gw.cleanup()
            for path in Path("/dev/shm").glob(f"lsg-{gw.proc.pid}-*"):
                path.unlink(missing_ok=True)


def test_every_worker_runs_under_the_preload_on_its_own_cpu(
    fakes: Fakes,  # noqa: F811
    tmp_path: Path,
) -> None:
    report = tmp_path / "counts"
    cpus = sorted(os.sched_getaffinity(0))[:3]
    # supervisor on the first CPU, worker i on cpus[1 + i % (len - 1)]; one CPU: all on it
    want = [cpus[1 + i % (len(cpus) - 1)] if len(cpus) > 1 else cpus[0] for i in range(2)]
    with gateway(
        "--workers",
        "2",
        "--transport",
        f"preload:{fakes.preload}",
        "--cpu-affinity",
        ",".join(map(str, cpus)),
        feeds={"ING.T": "ingest://127.0.0.1:0"},
        config=CONFIG,
        env={"FAKE_BYPASS_REPORT": str(report)},
    ) as gw:
        pids = children(gw.proc.pid)
        assert len(pids) == 2
        assert os.sched_getaffinity(gw.proc.pid) == {cpus[0]}
        for pid in pids:
            assert str(fakes.preload) in mapped_libraries(pid)
            line = re.search(rf"worker (w\d) pid={pid} ready transport (.*)", gw.log())
            assert line, gw.log()[-3000:]
            fields = dict(re.findall(r"(\w+)=(\{[^}]*\}|\S+)", line.group(2)))
            assert fields["transport"] == "preload" and fields["loaded"] == "1"
            assert fields["lib"] == str(fakes.preload)
            cpu = want[int(line.group(1)[1:])]
            assert f"cpus:{cpu}" in fields["sockopts"]
            assert os.sched_getaffinity(pid) == {cpu}
        check_byte_exact_fanout(gw)


def test_lossless_feed_waits_for_a_slow_session_on_either_worker() -> None:
    """``?backpressure=1`` with two workers: a session that stops reading makes the feed
    wait (under uvloop its socket still holds ring memory, so the ring fills and the source
    pauses; under the stdlib loop it goes over its high-water mark and its worker asks the
    supervisor to pause: either way counted); once it reads again every session on both
    workers has every record, in order, and nobody was cut or skipped."""
    feeds = {DATASET: "ingest://127.0.0.1:0?backpressure=1"}
    # small kernel buffers on both ends: a few MB are past all of them
    config = CONFIG + "[transport]\nsndbuf = 65536\n"
    with gateway("--workers", "2", "--metrics-port", "0", feeds=feeds, config=config) as gw:
        pids = [int(p) for p in re.findall(r"\d+", gw.lines[1].split("pids=")[1])]
        pub, _ = publisher(gw)
        by_pid = spread_sessions(gw, pids, 2)
        sessions = [s for v in by_pid.values() for s in v]
        try:
            poll_until(lambda: streaming(gw, 4), 10, 0.05, "four sessions streaming")
            slow = by_pid[pids[0]][0]  # not read until the feed has waited for it
            slow.client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            others = [s for s in sessions if s is not slow]
            _, records = synthetic_trades(80_000, 9)  # 3.8 MB
            sender = threading.Thread(target=pub.sendall, args=(b"".join(records),))
            sender.start()

            def waited() -> bool:
                for s in others:
                    s.pump(0.01)
                samples = metric_samples(gw.metrics_port)
                full = metric(samples, "gateway_worker_ring_full_total", dataset=DATASET)
                paused = metric(samples, "gateway_feed_pauses_total", dataset=DATASET)
                return full + paused >= 1

            poll_until(waited, 30, 0.0, "the lossless feed waiting for the slow session")
            pump_until(sessions, lambda s: len(s.data) >= len(records), 30, "every record")
            sender.join(10)
            assert not sender.is_alive()
            for s in sessions:
                assert s.data == records
                assert not s.eof
            samples = metric_samples(gw.metrics_port)
            assert metric(samples, "gateway_worker_ring_skips_total") == 0
            assert metric(samples, "gateway_records_skipped_total") == 0
            # (sessions spread_sessions closed are counted as the client's close or reset)
            cuts = ("ring_pin", "ring_behind", "ring_lapped", "lossless_stall", "slow_reader_cap")
            for reason in cuts:
                assert metric(samples, "gateway_disconnects_total", reason=reason) == 0
        finally:
            for s in sessions:
                s.close()
            pub.close()
