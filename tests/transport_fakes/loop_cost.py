"""Bounded micro-benchmark: what the event-loop choice costs on plain sockets (issue 7, item 2).

One lossless ingest feed of MBP-1 records (80 B) fanned out to N raw subscribers, all records to
all, over loopback. The gateway runs as a real process in one of three modes:

* ``uvloop``            the default on plain sockets (uvloop 0.23 batches epoll_ctl via io_uring)
* ``uvloop-no-io_uring`` uvloop with ``io_uring_setup`` blocked by the gateway's own seccomp filter
                        (a bypass launch with --loop uvloop: libuv falls back to libc epoll_ctl)
* ``asyncio``           the stdlib loop (what --loop auto runs under a bypass transport)

Throughput = records delivered to all subscribers / (publisher start -> last byte at the last
subscriber). Subscribers live in one separate process (epoll + recv_into, byte counting).
Efficiency = records delivered / CPU time the gateway process used meanwhile (all its threads,
/proc/PID/task/*/schedstat): far less sensitive than wall-clock throughput to other work on a
shared machine, so it is the figure to compare loops with.

    .venv/bin/python -m tests.transport_fakes.loop_cost --sessions 10,100 --runs 7
    .venv/bin/python -m tests.transport_fakes.loop_cost --runs 7 --paced 1000 --paced-records 2000

``--paced``: small writes instead (one record per publisher write, at a fixed rate), where
per-event loop overhead dominates; reports gateway CPU µs per record per session.

Not part of the test suite (no timed assertions in tests); prints one line per run and medians.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gateway import control

KEY = "db-BENCHKEY000000000000000000000"
ROOT = Path(__file__).resolve().parents[2]
RECORD = 80
MODES = ("uvloop", "uvloop-no-io_uring", "asyncio")
_NO_IO_URING = (
    "import sys; from gateway import transport; transport.block_io_uring(); "
    "from gateway.cli import main; sys.argv[0] = 'gateway'; raise SystemExit(main())"
)


def _payload(records: int) -> bytes:
    from gateway.dbn import encode_publisher_metadata
    from gateway.feeds.synthetic import SyntheticGenerator, SyntheticOptions

    gen = SyntheticGenerator(SyntheticOptions(instruments=50, seed=11, schemas=("mbp-1",)))
    t0 = time.time_ns()
    chunks: list[bytes] = []
    made = 0
    while made < records:
        part = b"".join(gen.make(min(10_000, records - made), t0 + made, 1_000_000))
        chunks.append(part)
        made += len(part) // RECORD
    return encode_publisher_metadata("BENCH.MBP", t0, dict(gen.instruments)) + b"".join(chunks)


def _start_gateway(mode: str, config: Path) -> tuple[subprocess.Popen[str], int, int]:
    loop = "asyncio" if mode == "asyncio" else "uvloop"
    head = (
        [sys.executable, "-c", _NO_IO_URING]
        if mode == "uvloop-no-io_uring"
        else [
            sys.executable,
            "-m",
            "gateway",
        ]
    )
    cmd = [
        *head,
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--loop",
        loop,
        "--config",
        str(config),
        "--log-level",
        "error",
        "--feed",
        "BENCH.MBP=ingest://127.0.0.1:0?backpressure=1",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout is not None
    ingest = 0
    for line in proc.stdout:
        m = re.match(r"ingest dataset=\S+ port=(\d+)", line)
        if m:
            ingest = int(m.group(1))
        m = re.match(r"listening host=\S+ port=(\d+)", line)
        if m:
            return proc, int(m.group(1)), ingest
    proc.kill()
    raise RuntimeError(f"gateway ({mode}) did not start: rc={proc.wait()}")


def _cpu_ns(pid: int) -> int:
    """CPU time of every thread of a process, ns (schedstat: exact, unlike utime ticks)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
        except (OSError, ValueError):
            pass
    return total


def _io_uring_fds(pid: int) -> int:
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            n += "io_uring" in os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            pass
    return n


# --- subscriber process --------------------------------------------------------------------


def _line(sock: socket.socket, buf: bytearray) -> str:
    while b"\n" not in buf:
        data = sock.recv(4096)
        if not data:
            raise EOFError("gateway closed during the handshake")
        buf += data
    line, _, rest = bytes(buf).partition(b"\n")
    buf[:] = rest
    return line.decode()


def _subscribe(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    buf = bytearray()
    _line(sock, buf)
    challenge = _line(sock, buf)[len("cram=") :]
    auth = control.cram_response(challenge, KEY)
    sock.sendall(control.encode_auth(auth, "BENCH.MBP", client="loop_cost"))
    assert _line(sock, buf).startswith("success=1"), "auth failed"
    sub = control.encode_subscription("mbp-1", control.ALL_SYMBOLS, snapshot=None, is_last=None)
    sock.sendall(sub + control.START_SESSION)
    return sock


def subscribers_main(port: int, sessions: int, sentinel_hex: str, records: int) -> None:
    sentinel = bytes.fromhex(sentinel_hex)
    socks = [_subscribe(port) for _ in range(sessions)]
    ep = select.epoll()
    tails: dict[int, bytes] = {}
    counts: dict[int, int] = {}
    for s in socks:
        s.setblocking(False)
        ep.register(s.fileno(), select.EPOLLIN)
        tails[s.fileno()] = b""
        counts[s.fileno()] = 0
    print("ready", flush=True)
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    pending = set(tails)
    by_fd = {s.fileno(): s for s in socks}
    deadline = time.monotonic() + 120
    while pending and time.monotonic() < deadline:
        for fd, _ in ep.poll(1.0):
            try:
                n = by_fd[fd].recv_into(buf)
            except BlockingIOError:
                continue
            if n == 0:
                raise SystemExit(f"gateway closed a session after {counts[fd]} bytes")
            counts[fd] += n
            tail = (tails[fd] + bytes(view[max(0, n - RECORD) : n]))[-RECORD:]
            tails[fd] = tail
            if tail == sentinel and fd in pending:
                pending.discard(fd)
    done = time.monotonic_ns()
    short = [c for c in counts.values() if c < records * RECORD]
    print(json.dumps({"done_ns": done, "pending": len(pending), "short": len(short)}), flush=True)
    for s in socks:
        s.close()


# --- driver --------------------------------------------------------------------------------


def run_case(
    mode: str, sessions: int, payload: bytes, records: int, config: Path, pace: float = 0.0
) -> dict[str, float]:
    gw, port, ingest = _start_gateway(mode, config)
    try:
        subs = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.transport_fakes.loop_cost",
                "--subscriber",
                f"{port},{sessions},{payload[-RECORD:].hex()},{records}",
            ],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        assert subs.stdout is not None
        assert subs.stdout.readline().strip() == "ready", "subscribers did not start"
        time.sleep(0.3)  # every session is streaming before the first record
        io_uring = _io_uring_fds(gw.pid)
        pub = socket.create_connection(("127.0.0.1", ingest))
        pub.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        cpu0 = _cpu_ns(gw.pid)
        start = time.monotonic_ns()
        if pace:  # one record per write, `pace` writes per second: per-event costs dominate
            body = len(payload) - records * RECORD
            pub.sendall(payload[:body])
            t0 = time.monotonic()
            for i in range(records):
                delay = t0 + i / pace - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                pub.sendall(payload[body + i * RECORD : body + (i + 1) * RECORD])
        else:
            pub.sendall(payload)
        result = json.loads(subs.stdout.readline())
        cpu = (_cpu_ns(gw.pid) - cpu0) / 1e9
        subs.wait(30)
        pub.close()
        if result["pending"] or result["short"]:
            raise RuntimeError(f"{mode} N={sessions}: incomplete delivery {result}")
        seconds = (result["done_ns"] - start) / 1e9
        return {
            "mrec_s": records * sessions / seconds / 1e6,
            "mrec_cpu_s": records * sessions / cpu / 1e6,
            "cpu_us_per_write": cpu * 1e6 / (records * sessions),
            "io_uring_fds": io_uring,
        }
    finally:
        gw.send_signal(signal.SIGTERM)
        try:
            gw.wait(15)
        except subprocess.TimeoutExpired:
            gw.kill()
            gw.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sessions", default="10,100", help="comma list of N (default 10,100)")
    ap.add_argument(
        "--delivered",
        type=int,
        default=10_000_000,
        help="records delivered per run, all sessions together (default 10M)",
    )
    ap.add_argument("--runs", type=int, default=3, help="runs per case (default 3)")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument(
        "--paced",
        type=float,
        default=0.0,
        metavar="WRITES_S",
        help="instead: the publisher writes one record at a time, WRITES_S per second, "
        "--paced-records in all; reports gateway CPU µs per record per session",
    )
    ap.add_argument("--paced-records", type=int, default=3000)
    ap.add_argument("--subscriber", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.subscriber:
        port, n, sentinel, records = args.subscriber.split(",")
        subscribers_main(int(port), int(n), sentinel, int(records))
        return
    modes = [m for m in args.modes.split(",") if m]
    sizes = [int(n) for n in args.sessions.split(",")]
    counts = {n: args.paced_records if args.paced else args.delivered // n for n in sizes}
    payloads = {n: _payload(counts[n]) for n in sizes}
    config = Path(tempfile.mkstemp(prefix="loop-cost-", suffix=".toml")[1])
    config.write_text(f'[[api_keys]]\nkey = "{KEY}"\nmax_sessions = {max(sizes) + 10}\n')
    results: dict[tuple[str, int], list[float]] = {}
    per_cpu: dict[tuple[str, int], list[float]] = {}
    try:
        for run in range(args.runs):
            for n in sizes:
                for mode in modes:  # interleaved: drift in machine load hits every mode alike
                    r = run_case(mode, n, payloads[n], counts[n], config, args.paced)
                    results.setdefault((mode, n), []).append(r["mrec_s"])
                    per_cpu.setdefault((mode, n), []).append(
                        r["cpu_us_per_write"] if args.paced else r["mrec_cpu_s"]
                    )
                    print(
                        f"run={run + 1} N={n} mode={mode} io_uring_fds={r['io_uring_fds']:.0f} "
                        f"mrec_s={r['mrec_s']:.2f} mrec_per_gateway_cpu_s={r['mrec_cpu_s']:.2f} "
                        f"cpu_us_per_write={r['cpu_us_per_write']:.2f}",
                        flush=True,
                    )
    finally:
        config.unlink()
    tables = [("million records delivered per gateway CPU-second", per_cpu)]
    if args.paced:
        tables = [("gateway CPU µs per record per session (lower is better)", per_cpu)]
    else:
        tables.insert(0, ("million records/s delivered (wall clock)", results))
    for title, table in tables:
        print(f"\nmedian {title} (every run):")
        for n in sizes:
            base = statistics.median(table[(modes[0], n)])
            for mode in modes:
                vals = table[(mode, n)]
                med = statistics.median(vals)
                print(
                    f"  N={n:<4} {mode:<19} {med:6.1f}  ratio vs {modes[0]}: {med / base:4.2f}  "
                    f"({', '.join(f'{v:.1f}' for v in vals)})"
                )


if __name__ == "__main__":
    main()
