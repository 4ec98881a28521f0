"""Socket-level fuzz: hundreds of hostile connections at once against a real gateway process.

300 connections, 40 at a time, each one of the hostile actions of ``tests/soak/soak.py``
(random bytes, truncated and oversize lines, a valid handshake followed by garbage, resets
in the middle of a write, half-closed sockets, drip-fed lines, ...), every connection with
its own RNG seeded from ``GATEWAY_FUZZ_SEED`` so a failure reproduces. Each must get the
answer the gateway promises (an error line or ErrorMsg and a close, never a hang). Meanwhile
a healthy session streams beside them and must see every record in order; afterwards the
gateway's fd count is back to its baseline, broken publishers on the ingest port are dropped,
and a normal session receives exactly the bytes a publisher sent.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import time
from collections import Counter

from gateway.client import LiveClient
from gateway.dbn import RTYPE_SYMBOL_MAPPING, RTYPE_SYSTEM, encode_publisher_metadata
from gateway.feeds.synthetic import SyntheticGenerator, SyntheticOptions
from tests.integration.helpers import KEY, apoll_until, gateway, metric, metric_samples
from tests.soak.soak import (
    HOSTILE_ACTIONS,
    Env,
    SoakSession,
    fd_count,
    hostile_once,
    reference_plan,
)

SEED = int(os.environ.get("GATEWAY_FUZZ_SEED", "20261126"))
CONNECTIONS = 300
CONCURRENCY = 40
CONFIG = """
[limits]
handshake_timeout_s = 2.0
"""


async def _fuzz(port: int) -> list[tuple[int, str, str, bool]]:
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(i: int) -> tuple[int, str, str, bool]:
        async with gate:
            rng = random.Random(f"{SEED}:{i}")
            action = HOSTILE_ACTIONS[i % len(HOSTILE_ACTIONS)]
            return (i, *await hostile_once(port, rng, key=KEY, dataset="FUZZ", action=action))

    return await asyncio.gather(*(one(i) for i in range(CONNECTIONS)))


def _publisher_closed(port: int, payload: bytes, half_close: bool) -> bool:
    """A broken publisher: the gateway must drop it (EOF or reset within 5 s)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        try:
            sock.sendall(payload)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
            while sock.recv(65536):
                pass
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False
    return True


async def _byte_exact_session(gw_port: int, ingest_port: int) -> None:
    gen = SyntheticGenerator(SyntheticOptions(instruments=20, seed=SEED % 1000, schemas=("mbp-1",)))
    t0 = time.time_ns()
    blob = b"".join(b"".join(gen.make(500, t0 + k * 1000, 1000)) for k in range(10))
    symbols = dict(gen.instruments)
    client = await LiveClient.connect("127.0.0.1", gw_port, KEY, "FUZZ.ING")
    pub: socket.socket | None = None
    try:
        await client.subscribe("mbp-1", "ALL_SYMBOLS")
        meta = await client.start()
        assert str(meta.dataset) == "FUZZ.ING" and meta.schema is None and not meta.ts_out
        pub = socket.create_connection(("127.0.0.1", ingest_port), timeout=5)
        await asyncio.to_thread(
            pub.sendall, encode_publisher_metadata("FUZZ.ING", t0, symbols) + blob
        )
        order: list[tuple[str, bytes]] = []
        data = bytearray()

        async def read() -> None:
            async for batch in client.batches():
                for rtype, _, rec in batch.records():
                    if rtype in (RTYPE_SYSTEM, RTYPE_SYMBOL_MAPPING, 0x15):
                        order.append(("gateway", bytes(rec)))
                    else:
                        order.append(("data", b""))
                        data.extend(rec)
                if len(data) >= len(blob):
                    return

        await asyncio.wait_for(read(), 15)
    finally:
        if pub is not None:
            pub.close()
        await client.close()
    # exactly the published bytes, record for record
    assert bytes(data) == blob
    # before them: the ack, one mapping per published symbol, the feed coming up; nothing after
    first_data = next(i for i, (kind, _) in enumerate(order) if kind == "data")
    head = [rec for _, rec in order[:first_data]]
    assert all(kind == "data" for kind, _ in order[first_data:])
    assert head[0][1] == RTYPE_SYSTEM and head[0][319] == 1
    assert head[0][16:319].split(b"\0")[0] == b"Subscription request 1 for mbp-1 data succeeded"
    mapped = {int.from_bytes(r[4:8], "little") for r in head if r[1] == RTYPE_SYMBOL_MAPPING}
    assert mapped == set(symbols.values())
    notices = [r[16:319].split(b"\0")[0] for r in head if r[1] == RTYPE_SYSTEM and r[319] == 255]
    assert notices == [b"Feed FUZZ.ING: publisher connected"]  # no address: it is logged
    assert len(head) == 1 + len(symbols) + 1


async def test_fuzz_then_the_gateway_serves_normally() -> None:
    feeds = {"FUZZ": "synthetic:?rate=5000&instruments=50", "FUZZ.ING": "ingest://127.0.0.1:0"}
    with gateway("--metrics-port", "0", feeds=feeds, config=CONFIG) as gw:
        pid = gw.proc.pid
        watcher = SoakSession(reference_plan(), Env(port=gw.port, key=KEY, dataset="FUZZ"))
        watching = asyncio.get_running_loop().create_task(watcher.run())
        try:
            assert await asyncio.wait_for(asyncio.shield(watcher.started), 10)
            await apoll_until(lambda: watcher.tracker.data_records > 0, 10, what="watcher fed")
            baseline = fd_count(pid)
            before = watcher.tracker.data_records

            started = time.monotonic()
            results = await _fuzz(gw.port)
            took = time.monotonic() - started
            bad = [r for r in results if not r[3]]
            summary = Counter(action for _, action, _, _ in results)
            outcomes = Counter(f"{a}: {o.split(' ')[0][:30]}" for _, a, o, _ in results)
            print(f"{CONNECTIONS} hostile connections in {took:.1f} s, seed {SEED}")
            print("\n".join(f"  {k} x{v}" for k, v in sorted(outcomes.items())))
            assert not bad, f"GATEWAY_FUZZ_SEED={SEED}: " + "; ".join(
                f"#{i} {action}: {outcome}" for i, action, outcome, _ in bad[:10]
            )
            assert set(summary) == set(HOSTILE_ACTIONS)
            # every hostile connection is gone: no fd is left behind
            assert await apoll_until(lambda: fd_count(pid) <= baseline, 15), (
                f"fds: {fd_count(pid)} after the fuzz, {baseline} before"
            )
            assert fd_count(pid) == baseline

            # broken publishers on the ingest port are dropped, and the next one is served
            ingest = gw.ingest_ports["FUZZ.ING"]
            rng = random.Random(SEED)
            good_meta = encode_publisher_metadata("FUZZ.ING", time.time_ns(), {"AAPL": 1000})
            broken = [
                (rng.randbytes(2048), False),
                (b"DBN\x09" + rng.randbytes(200), False),
                (encode_publisher_metadata("OTHER", time.time_ns(), {"AAPL": 1000}), False),
                (good_meta + b"\x14\x01" + rng.randbytes(20), True),  # cut mid-record
            ]
            for payload, half in broken:
                assert await asyncio.to_thread(_publisher_closed, ingest, payload, half)
            await asyncio.sleep(0.3)

            await _byte_exact_session(gw.port, ingest)
            assert await apoll_until(lambda: fd_count(pid) <= baseline, 10)
            assert fd_count(pid) == baseline

            # the healthy session beside it all: still streaming, every record in order
            assert await apoll_until(lambda: watcher.tracker.data_records > before + 5000, 10)
        finally:
            watcher.env.stop.set()
            await asyncio.wait_for(watching, 30)
        t = watcher.tracker
        assert watcher.failure is None and watcher.eof
        assert t.n_violations == 0, t.violations
        assert not t.errors and not t.skip_notices
        m = metric_samples(gw.metrics_port)
        assert metric(m, "gateway_connections_total", result="accepted") >= CONNECTIONS
        assert metric(m, "gateway_records_skipped_total") == 0
        log = gw.log()
        for pattern in ("Traceback", "Exception in callback", "exception was never retrieved"):
            assert pattern not in log, log[log.index(pattern) - 300 :][:3000]
        assert t.last - t.first + 1 == t.data_records  # contiguous from its first record on
