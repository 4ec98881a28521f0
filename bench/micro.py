"""``python -m bench.micro``: the per-chunk hot path in one process, no sockets.

Times what the gateway does for every chunk a feed hands it — index the records, then
``Feed.publish`` → ``FanOut.publish`` → one ``deliver`` per session — for a few session
mixes, with sessions that only count what they are handed. It isolates the Python cost of
the fan-out from the kernel's, so a change to the data path can be compared before and
after on a noisy machine: each case is repeated and the median reported.

    python -m bench.micro                 # every case, 7 repeats
    python -m bench.micro --repeat 15 --json out.json
    python -m bench.micro --books         # + MBO chunks with the order books off vs on

``--books`` adds MBO cases (a realistic MBO stream from ``bench.books``, 1,000 records a
chunk): 1,000 sessions of mbo with the feed's books off and on (one native call per
chunk), and with derived mbp-1 and trades subscribers too; and reruns the MBP-1 cases with
books on (an MBO-less chunk costs the books a set lookup).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import databento_dbn as d

from gateway import dbn
from gateway.books.feed_books import FeedBooks
from gateway.fanout import FanOut, OutputSpec, make_selection
from gateway.feeds import Feed

RECORDS_PER_CHUNK = 800
INSTRUMENTS = 100
CHUNKS = 200
MBP1 = 0x01


class Counter:
    """A session that only counts: the fan-out's own cost, not a transport's."""

    __slots__ = ("records", "ts_out", "zstd")

    def __init__(self) -> None:
        self.records = 0
        self.ts_out = False
        self.zstd = False

    def deliver(self, data: object, records: int) -> None:
        self.records += records

    def send_gateway_records(self, records: list[bytes]) -> None:
        pass


def chunk_bytes(seq0: int) -> bytes:
    out = bytearray()
    for i in range(RECORDS_PER_CHUNK):
        seq = seq0 + i
        out += bytes(
            d.MBP1Msg(
                publisher_id=1,
                instrument_id=1 + seq % INSTRUMENTS,
                ts_event=1_700_000_000_000_000_000 + seq,
                price=100_000_000_000 + seq % 97,
                size=1 + seq % 5,
                action=d.Action("T"),
                side=d.Side("A"),
                depth=0,
                ts_recv=1_700_000_000_000_000_100 + seq,
                sequence=seq,
            )
        )
    return bytes(out)


@dataclass
class Case:
    name: str
    sessions: int
    #: session number -> (selection {rtype: ids or None}, ts_out, zstd)
    spec_of: Callable[[int], tuple[dict[int, set[int] | None], bool, bool]]


def _all(_: int) -> tuple[dict[int, set[int] | None], bool, bool]:
    return {MBP1: None}, False, False


def _one_instrument(i: int) -> tuple[dict[int, set[int] | None], bool, bool]:
    return {MBP1: {1 + i % INSTRUMENTS}}, False, False


def _ten_instruments(i: int) -> tuple[dict[int, set[int] | None], bool, bool]:
    return {MBP1: {1 + (i + k) % INSTRUMENTS for k in range(10)}}, False, False


def _ts_out(_: int) -> tuple[dict[int, set[int] | None], bool, bool]:
    return {MBP1: None}, True, False


def _zstd(_: int) -> tuple[dict[int, set[int] | None], bool, bool]:
    return {MBP1: None}, False, True


CASES = [
    Case("plain, 1000 sessions", 1000, _all),
    Case("filtered 1 of 100, 1000 sessions", 1000, _one_instrument),
    Case("filtered 10 of 100, 1000 sessions", 1000, _ten_instruments),
    Case("ts_out, 1000 sessions", 1000, _ts_out),
    Case("zstd shared, 1000 sessions", 1000, _zstd),
]


def run_index(chunks: list[bytes]) -> float:
    """Seconds to index every chunk (the decoder's per-chunk work)."""
    start = time.perf_counter()
    for raw in chunks:
        dbn.index_records(raw)
    return time.perf_counter() - start


MBO = 0xA0
MBO_RECORDS_PER_CHUNK = 1000


def _mbo_all(_: int) -> tuple[dict[int, set[int] | None], bool, bool]:
    return {MBO: None}, False, False


def _mbo_and_derived(i: int) -> tuple[dict[int, set[int] | None], bool, bool]:
    rtype = (MBO, MBP1, 0x00)[i % 3]
    selection: dict[int, set[int] | None] = {rtype: None}
    return selection, False, False


MBO_CASES = [
    Case("mbo, 1000 sessions", 1000, _mbo_all),
    Case("mbo + derived mbp-1 + trades, 999 sessions", 999, _mbo_and_derived),
]


def mbo_chunks() -> list[bytes]:
    from bench.books import generate

    data = generate(CHUNKS * MBO_RECORDS_PER_CHUNK, instruments=INSTRUMENTS)
    size = 56 * MBO_RECORDS_PER_CHUNK
    return [data[i : i + size] for i in range(0, len(data), size)]


def run_case(case: Case, chunks: list[bytes], books: bool = False) -> float:
    """Seconds to publish every chunk through a Feed to the case's sessions."""
    feed = Feed("BENCH.MICRO", fanout=FanOut(clock_ns=time.time_ns))
    if books:
        feed.attach_books(FeedBooks(feed.dataset, feed.fanout))
    members = [Counter() for _ in range(case.sessions)]
    for i, m in enumerate(members):
        sel, ts_out, zstd = case.spec_of(i)
        m.ts_out, m.zstd = ts_out, zstd
        feed.fanout.place(m, OutputSpec(make_selection(sel), ts_out=ts_out, zstd=zstd))
    indexes = [dbn.index_records(raw)[0] for raw in chunks]
    feed.publish(indexes[0])  # warm the plan and caches outside the timing
    start = time.perf_counter()
    for index in indexes:
        feed.publish(index)
    elapsed = time.perf_counter() - start
    if not sum(m.records for m in members):
        raise RuntimeError(f"{case.name}: no session got a record")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.micro", description=__doc__.split("\n")[0])
    p.add_argument("--repeat", type=int, default=7, help="runs per case; the median is shown")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--books", action="store_true", help="add the order-book cases")
    args = p.parse_args(argv)
    chunks = [chunk_bytes(i * RECORDS_PER_CHUNK) for i in range(CHUNKS)]
    records = CHUNKS * RECORDS_PER_CHUNK
    results: dict[str, dict[str, float]] = {}

    def report(name: str, runs: list[float]) -> None:
        med = statistics.median(runs)
        results[name] = {
            "us_per_chunk": med / CHUNKS * 1e6,
            "records_per_s": records / med,
            "runs": len(runs),
        }
        print(
            f"{name:38s} {med / CHUNKS * 1e6:9.1f} us/chunk  {records / med / 1e6:7.2f} M rec/s"
            f"  (median of {len(runs)})",
            flush=True,
        )

    report("index 800-record chunks", [run_index(chunks) for _ in range(args.repeat)])
    for case in CASES:
        report(case.name, [run_case(case, chunks) for _ in range(args.repeat)])
    if args.books:

        def alternated(case: Case, data: list[bytes], label: str) -> None:
            off: list[float] = []
            on: list[float] = []
            for _ in range(args.repeat):  # alternated: the machine's noise hits both alike
                off.append(run_case(case, data))
                on.append(run_case(case, data, True))
            report(f"{case.name}, books off", off)
            report(f"{case.name}, books on", on)
            ratio = statistics.median(on) / statistics.median(off)
            results[f"{label} books on / off"] = {"ratio": ratio}
            print(f"{label + ' books on / off (time)':38s} {ratio:9.3f}", flush=True)

        alternated(CASES[0], chunks, "mbp-1")
        mbo = mbo_chunks()
        alternated(MBO_CASES[0], mbo, "mbo")
        derived = MBO_CASES[1]
        report(
            f"{derived.name}, books on",
            [run_case(derived, mbo, True) for _ in range(args.repeat)],
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
