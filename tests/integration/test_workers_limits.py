"""``--workers 2`` is one gateway to the outside: a key's ``max_sessions`` holds across the
workers (the refusal is the single-process line whatever worker the connection lands on,
a session ending on one worker frees a place on the other, and a reload keeps the counts),
and the supervisor's one /metrics reports the sum over the workers."""

from __future__ import annotations

import re
import signal
import socket
import time

import pytest

from gateway.dbn import encode_publisher_metadata
from tests.integration.helpers import (
    KEY,
    RawClient,
    metric,
    metric_samples,
    poll_until,
    socket_owner,
    start_gateway,
    synthetic_trades,
)
from tests.support.wire import split_records

DATASET = "T.FEED"
FEEDS = {DATASET: "ingest://127.0.0.1:0"}
#: 1 MiB rings, a short drain: small and quick
CONFIG = "shutdown_grace_s = 2.0\n[workers]\nring_bytes = 1048576\n"
#: the single-process gateway's line for the 4th session of a max_sessions = 3 key
REFUSAL = "success=0|error=Connection limit exceeded: this API key already has 3 of 3 sessions"
GATEWAY_RTYPES = {0x15, 0x16, 0x17}  # ErrorMsg, SymbolMappingMsg, SystemMsg


def _connect(port: int, pids: list[int]) -> tuple[RawClient, int]:
    """A connection and the worker that accepted it."""
    client = RawClient(port)
    local = client.sock.getsockname()[1]
    return client, poll_until(lambda: socket_owner(port, local, pids), 5, 0.01, "its worker")


class _Stream:
    """A started ALL_SYMBOLS trades session; counts the bytes of its DBN stream."""

    def __init__(self, client: RawClient) -> None:
        self.client = client
        client.subscribe("trades", "ALL_SYMBOLS")
        client.start()
        self.data = client.buf  # whatever followed the success line
        client.buf = b""

    def pump(self) -> None:
        self.client.sock.settimeout(0.01)
        try:
            chunk = self.client.sock.recv(1 << 20)
        except TimeoutError:
            return
        assert chunk, "the session ended"
        self.data += chunk

    def records(self) -> list[bytes]:
        if len(self.data) < 8 or len(self.data) < 8 + int.from_bytes(self.data[4:8], "little"):
            return []
        _, records = split_records(self.data[: self._whole()])
        return [r for r in records if r[1] not in GATEWAY_RTYPES]

    def _whole(self) -> int:
        off = 8 + int.from_bytes(self.data[4:8], "little")
        while off < len(self.data) and off + self.data[off] * 4 <= len(self.data):
            off += self.data[off] * 4
        return off


@pytest.mark.slow_e2e  # counting across processes and merging metrics: not a loop check
def test_key_limit_and_metrics_hold_across_two_workers() -> None:
    gw = start_gateway(
        "--workers", "2", "--metrics-port", "0", feeds=FEEDS, config=CONFIG, max_sessions=3
    )
    clients: list[RawClient] = []
    pub: socket.socket | None = None
    try:
        m = re.fullmatch(r"workers 2 pids=(\d+),(\d+)", gw.lines[1].strip())
        assert m, gw.lines
        pids = [int(m.group(1)), int(m.group(2))]
        ids, _ = synthetic_trades(1, 1)
        pub = socket.create_connection(("127.0.0.1", gw.ingest_ports[DATASET]), timeout=10)
        pub.sendall(encode_publisher_metadata(DATASET, time.time_ns(), ids, schema="trades"))
        poll_until(lambda: f"feed {DATASET} up" in gw.log(), 10, what="the feed up")

        # Three sessions of the key, on both workers: a connection on a worker that has
        # its share already is closed before it authenticates (bounded tries).
        streams: dict[int, list[_Stream]] = {pid: [] for pid in pids}
        for _ in range(60):
            if sum(map(len, streams.values())) == 3:
                break
            client, pid = _connect(gw.port, pids)
            clients.append(client)
            mine, theirs = len(streams[pid]), len(streams[_other(pids, pid)])
            if mine >= 2 or (mine == 1 and not theirs):
                client.close()
                continue
            assert client.handshake(KEY, DATASET).startswith("success=1")
            streams[pid].append(_Stream(client))
        assert sorted(map(len, streams.values())) == [1, 2], streams

        # The 4th session is refused with the single-process line on either worker.
        refused: dict[int, list[str]] = {pid: [] for pid in pids}
        for _ in range(60):
            if all(refused.values()):
                break
            client, pid = _connect(gw.port, pids)
            clients.append(client)
            refused[pid].append(client.handshake(KEY, DATASET))
            client.close()
        assert all(refused.values()), refused
        assert {line for lines in refused.values() for line in lines} == {REFUSAL}
        tries = sum(map(len, refused.values()))

        # /metrics is the sum over the workers.
        def streaming() -> bool:
            samples = metric_samples(gw.metrics_port)
            return metric(samples, "gateway_sessions", state="streaming") == 3

        poll_until(streaming, 10, 0.05, "the three sessions streaming")
        _, records = synthetic_trades(400, seed=7)
        pub.sendall(b"".join(records))
        everyone = [s for ss in streams.values() for s in ss]

        def delivered() -> bool:
            for s in everyone:
                s.pump()
            return all(len(s.records()) >= len(records) for s in everyone)

        try:
            poll_until(delivered, 15, 0.0, "every record to every session")
        except AssertionError as exc:
            got = [len(s.records()) for s in everyone]
            raise AssertionError(f"{exc}; records per session {got}\n{gw.log()[-3000:]}") from None
        for s in everyone:
            assert s.records() == records
        sent = sum(len(s.data) for s in everyone)
        want = {
            ("gateway_sessions", ()): 3,
            ("gateway_sessions", (("state", "streaming"),)): 3,
            ("gateway_connections_open", ()): 3,
            ("gateway_records_out_total", (("dataset", DATASET),)): 3 * len(records),
            ("gateway_bytes_out_total", (("dataset", DATASET),)): sent,
            ("gateway_limit_hits_total", (("limit", "sessions_per_key"),)): tries,
            ("gateway_auth_failures_total", (("reason", "session_limit"),)): tries,
            ("gateway_feed_records_in_total", (("dataset", DATASET),)): len(records),
        }

        def totals() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
            samples = metric_samples(gw.metrics_port)
            return {(n, lab): metric(samples, n, **dict(lab)) for n, lab in want}

        poll_until(lambda: totals() == want, 10, 0.05, f"/metrics totals {want}")

        # A session ending on one worker frees a place for the other worker.
        one = next(pid for pid in pids if len(streams[pid]) == 1)
        streams[one][0].client.close()
        other = _other(pids, one)

        def session_on_other() -> bool:
            client, pid = _connect(gw.port, pids)
            clients.append(client)
            if pid != other:
                client.close()
                return False
            line = client.handshake(KEY, DATASET)
            if line == REFUSAL:  # the worker has not seen the close yet
                client.close()
                return False
            assert line.startswith("success=1"), line
            return True

        poll_until(session_on_other, 10, 0.02, "a session on the other worker")

        # SIGHUP with a lower limit: the counts carry over (the other worker has all 3).
        assert gw.config_path is not None
        text = gw.config_path.read_text()
        gw.config_path.write_text(text.replace("max_sessions = 3", "max_sessions = 2"))
        gw.proc.send_signal(signal.SIGHUP)
        lowered = REFUSAL.replace("3 of 3", "3 of 2")

        def refused_on_emptied_worker() -> bool:
            client, pid = _connect(gw.port, pids)
            clients.append(client)
            line = client.handshake(KEY, DATASET)
            client.close()
            assert line in (REFUSAL, lowered), line
            return pid == one and line == lowered

        poll_until(refused_on_emptied_worker, 10, 0.02, "the lowered limit on the other worker")
        for c in clients:  # nothing left to drain: a quick stop
            c.close()
        assert gw.stop() == 0
    finally:
        for c in clients:
            c.close()
        if pub is not None:
            pub.close()
        gw.stop()
        gw.cleanup()


def _other(pids: list[int], pid: int) -> int:
    return pids[1] if pid == pids[0] else pids[0]
