"""Event-loop stalls from ordinary requests (issue 11): how long an unrelated session
waits while another session's symbology work runs.

    python -m bench.stall [--tree PATH] [--quick]

A gateway serves a steady synthetic feed (BYST, 2,000 records/s) to a bystander session
and, beside it, the scenarios the issue describes:

* ``unknown-then-metadata``: a session subscribes to N unknown symbols on an ingest feed,
  then a publisher's Metadata maps all of them (N = 20,000 and 40,000);
* ``all-symbols-flood``: one session sends 400 ``ALL_SYMBOLS`` subscriptions on a
  100,000-instrument feed;
* ``mbo-flood`` / ``snapshot-flood`` / ``derived-flood`` (``--books``): 100 sessions at
  once subscribe to ``mbo`` ``ALL_SYMBOLS`` of 2,000 filled books (20k MBO records/s)
  without and with ``snapshot=1``, or to six schemas derived from it; the first is the
  baseline the snapshots add to.

For each, the bystander's largest gap between two reads while the scenario runs is the
stall every other session saw (its normal gap, the feed's tick, is printed beside it).
``--tree`` runs the gateway from another checkout (e.g. a worktree of an older commit)
with this environment's Python: before/after figures on one machine in one run.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from gateway import control
from gateway.dbn import encode_publisher_metadata

KEY = "db-STALLBENCH00000000000000000000"[:32]
#: ALL_SYMBOLS trades with only the keys the gateway needs (no snapshot, id, is_last)
_ALL_TRADES = control.encode_subscription(
    "trades", control.ALL_SYMBOLS, snapshot=None, is_last=None
)


class Reader(threading.Thread):
    """Reads a socket until closed; keeps the arrival time of every read."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.times: list[float] = []
        self.bytes = 0

    def run(self) -> None:
        self.sock.settimeout(None)
        while True:
            try:
                data = self.sock.recv(1 << 20)
            except OSError:
                return
            if not data:
                return
            self.times.append(time.monotonic())
            self.bytes += len(data)

    def max_gap(self, start: float, end: float) -> float:
        ts = [t for t in self.times if start <= t <= end]
        gaps = [b - a for a, b in zip(ts, ts[1:], strict=False)]
        if ts:
            gaps.append(ts[0] - start)
        return max(gaps, default=end - start)

    def typical_gap(self, start: float, end: float) -> float:
        ts = [t for t in self.times if start <= t <= end]
        gaps = sorted(b - a for a, b in zip(ts, ts[1:], strict=False))
        return gaps[len(gaps) // 2] if gaps else float("nan")


def handshake(port: int, dataset: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    buf = b""
    while buf.count(b"\n") < 2:
        buf += sock.recv(4096)
    challenge = buf.split(b"cram=", 1)[1].split(b"\n", 1)[0].decode()
    sock.sendall(control.encode_auth(control.cram_response(challenge, KEY), dataset, ts_out=None))
    reply = b""
    while not reply.endswith(b"\n"):
        reply += sock.recv(1)
    assert reply.startswith(b"success=1"), reply
    return sock


def start_gateway(
    tree: Path, feeds: dict[str, str]
) -> tuple[subprocess.Popen[str], int, dict[str, int]]:
    config = tree / ".stall-bench.toml"
    config.write_text(
        "[limits]\nmax_symbols = 200000\ncontrol_burst = 5000\nmax_subscriptions = 1000\n"
        f'[[api_keys]]\nkey = "{KEY}"\nmax_sessions = 1000\n'
    )
    cmd = [sys.executable, "-m", "gateway", "serve", "--port", "0", "--config", str(config)]
    cmd += ["--log-level", "warning"]
    for ds, uri in feeds.items():
        cmd += ["--feed", f"{ds}={uri}"]
    env = dict(os.environ, PYTHONPATH=str(tree))
    proc = subprocess.Popen(
        cmd, cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    out = proc.stdout
    assert out is not None
    ingest: dict[str, int] = {}
    for line in out:
        if line.startswith("ingest dataset="):
            parts = dict(p.split("=", 1) for p in line.split() if "=" in p)
            ingest[parts["dataset"]] = int(parts["port"])
        if line.startswith("listening"):
            port = int(line.split("port=", 1)[1].split()[0])
            threading.Thread(target=lambda: [None for _ in out], daemon=True).start()
            config.unlink()
            return proc, port, ingest
    raise RuntimeError("gateway did not start")


def bystander(port: int) -> Reader:
    sock = handshake(port, "BYST")
    sock.sendall(_ALL_TRADES + control.START_SESSION)
    reader = Reader(sock)
    reader.start()
    return reader


def settle(reader: Reader, seconds: float = 1.0) -> tuple[float, float]:
    start = time.monotonic()
    time.sleep(seconds)
    return start, time.monotonic()


def unknown_then_metadata(tree: Path, n: int) -> tuple[float, float]:
    feeds = {"BYST": "synthetic:?rate=2000", "ING": "ingest://127.0.0.1:0"}
    proc, port, ingest = start_gateway(tree, feeds)
    try:
        by = bystander(port)
        quiet = settle(by)
        victim = handshake(port, "ING")
        names = [f"U{i:06d}" for i in range(n)]
        for i in range(0, n, 5000):
            last = int(i + 5000 >= n)
            part = ",".join(names[i : i + 5000])
            # id and is_last before symbols: a key order no client uses, parsed by key
            victim.sendall(
                control.encode_fields(
                    {"schema": "trades", "id": 1, "is_last": last, "symbols": part}
                )
            )
        victim.sendall(control.START_SESSION)
        drain = Reader(victim)
        drain.start()
        wait_quiet(drain)
        meta = encode_publisher_metadata(
            "ING", time.time_ns(), {s: 1000 + i for i, s in enumerate(names)}
        )
        pub = socket.create_connection(("127.0.0.1", ingest["ING"]))
        start = time.monotonic()
        pub.sendall(meta)
        wait_quiet(drain, after=drain.bytes + n * 176)
        end = time.monotonic() + 0.5
        time.sleep(0.5)
        pub.close()
        return by.typical_gap(*quiet), by.max_gap(start, end)
    finally:
        proc.terminate()
        proc.wait(30)


def all_symbols_flood(tree: Path, lines: int) -> tuple[float, float]:
    feeds = {"BYST": "synthetic:?rate=2000", "BIG": "synthetic:?instruments=100000&rate=10"}
    proc, port, _ = start_gateway(tree, feeds)
    try:
        by = bystander(port)
        quiet = settle(by)
        victim = handshake(port, "BIG")
        drain = Reader(victim)
        drain.start()
        start = time.monotonic()
        victim.sendall(_ALL_TRADES * lines + control.START_SESSION)
        wait_quiet(drain, after=100_000 * 176, limit=120)
        end = time.monotonic() + 0.5
        time.sleep(0.5)
        return by.typical_gap(*quiet), by.max_gap(start, end)
    finally:
        proc.terminate()
        proc.wait(30)


def snapshot_flood(
    tree: Path, sessions: int, kind: str = "snapshot", rate: int = 20_000
) -> tuple[float, float, int]:
    """``sessions`` sessions at once on an MBO feed of 2,000 instruments whose books have
    filled: each ``mbo`` ALL_SYMBOLS without (``kind`` mbo: the same load, no snapshot) or
    with ``snapshot=1`` (snapshot), or subscribing to six schemas derived from it
    (derived). Returns (normal gap, worst gap, bytes the flood's sessions read in the 3 s
    after)."""
    feeds = {
        "BYST": "synthetic:?rate=2000",
        "MBO": f"synthetic:?schemas=mbo&instruments=2000&rate={rate}",
    }
    proc, port, _ = start_gateway(tree, feeds)
    try:
        by = bystander(port)
        time.sleep(3.0)  # the books fill
        quiet = settle(by)
        snap = control.encode_subscription(
            "mbo", control.ALL_SYMBOLS, snapshot=kind == "snapshot", sub_id=1, is_last=True
        )
        derived = b"".join(
            control.encode_subscription(
                schema, control.ALL_SYMBOLS, snapshot=None, sub_id=n, is_last=True
            )
            for n, schema in enumerate(
                ("trades", "mbp-1", "mbp-10", "tbbo", "bbo-1s", "ohlcv-1s"), start=2
            )
        )
        socks = [handshake(port, "MBO") for _ in range(sessions)]
        readers = [Reader(s) for s in socks]
        for r in readers:
            r.start()
        start = time.monotonic()
        for sock in socks:
            sock.sendall((derived if kind == "derived" else snap) + control.START_SESSION)
        time.sleep(3.0)
        end = time.monotonic()
        got = sum(r.bytes for r in readers)
        for sock in socks:
            sock.close()
        return by.typical_gap(*quiet), by.max_gap(start, end), got
    finally:
        proc.terminate()
        proc.wait(30)


def wait_quiet(reader: Reader, after: int = 0, limit: float = 120.0) -> None:
    """Until ``after`` bytes arrived and nothing more for 0.3 s (bounded)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        last = reader.times[-1] if reader.times else 0.0
        if reader.bytes >= after and time.monotonic() - last > 0.3:
            return
        time.sleep(0.05)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--quick", action="store_true", help="the smaller sizes only")
    parser.add_argument(
        "--books",
        action="store_true",
        help="also: snapshot=1 and derived-schema sessions at once on an MBO feed",
    )
    args = parser.parse_args()
    sizes = [20_000] if args.quick else [20_000, 40_000]
    print(f"tree: {args.tree}  (median normal gap / largest gap while the scenario ran)")
    for n in sizes:
        normal, worst = unknown_then_metadata(args.tree, n)
        print(
            f"unknown-then-metadata n={n:>6}: normal {normal * 1e3:6.1f} ms, "
            f"worst {worst * 1e3:8.1f} ms",
            flush=True,
        )
    normal, worst = all_symbols_flood(args.tree, 400 if not args.quick else 100)
    print(
        f"all-symbols-flood lines={400 if not args.quick else 100}: normal "
        f"{normal * 1e3:6.1f} ms, worst {worst * 1e3:8.1f} ms",
        flush=True,
    )
    if args.books:
        n = 20 if args.quick else 100
        for kind in ("mbo", "snapshot", "derived"):
            normal, worst, got = snapshot_flood(args.tree, n, kind)
            print(
                f"{kind}-flood sessions={n}: normal {normal * 1e3:6.1f} ms, "
                f"worst {worst * 1e3:8.1f} ms ({got / 1e6:.1f} MB read by them in 3 s)",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
