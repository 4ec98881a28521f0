"""``python -m bench.books``: how fast the native order books build (M MBO records/s, one core).

A realistic stream is generated first (deterministic per seed, not timed): ``--instruments``
books, each with a mid price that walks a tick now and then; adds rest a few ticks either
side of the mid, cancels (most whole, some partial) and modifies (a size decrease keeping
priority, or a move to another price) name resting orders, and a trade is the venue's
``T`` + ``F`` + ``C`` triple against the best queue. Every record carries ``F_LAST`` at the
end of its event and a venue sequence. The stream is cut into chunks of about ``--chunk-kib``
at record boundaries, the way the feed hands chunks to the books.

Each ``want`` case builds the books from empty over the whole stream ``--repeats`` times (a
fresh engine each time) and reports the median, min and max rate; the rate counts every MBO
record applied, over the wall time of the ``apply`` calls (one C call per chunk, outputs
copied into bytes included).

    python -m bench.books                       1M records, 100 instruments, medians of 5
    python -m bench.books --json out.json       also write the figures
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import struct
import sys
import time
from pathlib import Path
from typing import Final

from bench.procs import machine_info
from gateway.books.native import WANT_MBP1, WANT_MBP10, WANT_TRADES, NativeBooks

_MBO: Final = struct.Struct("<BBHIQQqIBBccQiI")
F_LAST: Final = 0x80
TICK: Final = 10_000_000  # 0.01 in DBN's 1e-9 fixed-point prices
TARGET_MRPS: Final = 2.0  # issue 17: >= 2 M records/s per core into the books (want=0)

CASES: Final[tuple[tuple[str, int], ...]] = (
    ("books only (want=0)", 0),
    ("+ mbp-1 + trades", WANT_MBP1 | WANT_TRADES),
    ("+ mbp-1 + mbp-10 + trades", WANT_MBP1 | WANT_MBP10 | WANT_TRADES),
)


class _Instrument:
    def __init__(self, iid: int, mid: int) -> None:
        self.iid = iid
        self.mid = mid
        #: resting orders: id -> (side, price, size)
        self.orders: dict[int, tuple[str, int, int]] = {}
        self.ids: list[int] = []  # resting ids, for a random pick


def generate(records: int, instruments: int = 100, seed: int = 1) -> bytes:
    """About ``records`` MBO records of a plausible order flow (see the module docstring)."""
    rng = random.Random(seed)
    books = [_Instrument(1000 + i, (100 + i) * 100 * TICK) for i in range(instruments)]
    out: list[bytes] = []
    seq = 0
    ts = 1_700_000_000_000_000_000
    next_id = 1

    def emit(
        ins: _Instrument, action: str, oid: int, side: str, px: int, size: int, last: bool
    ) -> None:
        nonlocal seq
        seq += 1
        out.append(
            _MBO.pack(
                14,
                0xA0,
                1,
                ins.iid,
                ts,
                oid,
                px,
                size,
                F_LAST if last else 0,
                0,
                action.encode(),
                side.encode(),
                ts + 2_000,
                1_500,
                seq,
            )  # fmt: skip
        )

    def forget(ins: _Instrument, oid: int) -> None:
        del ins.orders[oid]
        i = ins.ids.index(oid) if len(ins.ids) < 64 else None
        if i is not None:
            ins.ids[i] = ins.ids[-1]
            ins.ids.pop()
        else:
            ins.ids.remove(oid)

    while len(out) < records:
        ts += rng.randrange(200, 20_000)
        ins = books[min(int(rng.expovariate(1 / (instruments / 4))), instruments - 1)]
        if rng.random() < 0.01:
            ins.mid += TICK * rng.choice((-1, 1))
        n = len(ins.orders)
        r = rng.random()
        if n < 20 or r < 0.46 - max(0, n - 300) / 1000:
            side = rng.choice("BA")
            off = TICK * (1 + min(int(rng.expovariate(0.35)), 40))
            px = ins.mid - off if side == "B" else ins.mid + off
            size = rng.choice((1, 1, 2, 5, 10, 25, 100))
            oid = next_id
            next_id += 1
            ins.orders[oid] = (side, px, size)
            ins.ids.append(oid)
            emit(ins, "A", oid, side, px, size, True)
        elif r < 0.84:
            oid = rng.choice(ins.ids)
            side, px, size = ins.orders[oid]
            if size > 1 and rng.random() < 0.15:
                cut = rng.randrange(1, size)
                ins.orders[oid] = (side, px, size - cut)
                emit(ins, "C", oid, side, px, cut, True)
            else:
                forget(ins, oid)
                emit(ins, "C", oid, side, px, size, True)
        elif r < 0.95:
            oid = rng.choice(ins.ids)
            side, px, size = ins.orders[oid]
            if size > 1 and rng.random() < 0.5:
                size -= rng.randrange(1, size)  # decrease: keeps priority
            else:
                px += TICK * rng.choice((-2, -1, 1, 2))
                px = min(px, ins.mid - TICK) if side == "B" else max(px, ins.mid + TICK)
            ins.orders[oid] = (side, px, size)
            emit(ins, "M", oid, side, px, size, True)
        else:  # a trade against the best queue: T, then F + C for the resting order
            side = rng.choice("BA")
            resting = [(o[1], oid) for oid, o in ins.orders.items() if o[0] == side]
            if not resting:
                continue
            px, oid = max(resting) if side == "B" else min(resting)
            size = ins.orders[oid][2]
            qty = min(size, rng.choice((1, 1, 2, 5)))
            aggressor = "A" if side == "B" else "B"
            emit(ins, "T", 0, aggressor, px, qty, False)
            emit(ins, "F", oid, side, px, qty, False)
            if qty == size:
                forget(ins, oid)
            else:
                ins.orders[oid] = (side, px, size - qty)
            emit(ins, "C", oid, side, px, qty, True)
    return b"".join(out)


def chunked(data: bytes, chunk_bytes: int) -> list[bytes]:
    step = max(56, chunk_bytes // 56 * 56)  # whole 56-byte records
    return [data[i : i + step] for i in range(0, len(data), step)]


def measure(chunks: list[bytes], want: int) -> tuple[float, int, int]:
    """(seconds, records applied, derived records built) for one build from empty."""
    books = NativeBooks()
    derived = 0
    started = time.perf_counter()
    for chunk in chunks:
        out = books.apply(chunk, want)
        derived += out.mbp1_count + out.mbp10_count + out.trades_count
    elapsed = time.perf_counter() - started
    applied = books.stats().records_applied
    books.close()
    return elapsed, applied, derived


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.books", description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--instruments", type=int, default=100)
    ap.add_argument("--chunk-kib", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args(argv)
    if args.records <= 0 or args.instruments <= 0 or args.repeats <= 0 or args.chunk_kib <= 0:
        ap.error("--records, --instruments, --repeats and --chunk-kib must be positive")

    t0 = time.perf_counter()
    data = generate(args.records, args.instruments, args.seed)
    chunks = chunked(data, args.chunk_kib * 1024)
    n = len(data) // 56
    print(
        f"stream: {n:,} MBO records, {args.instruments} instruments, {len(chunks)} chunks of "
        f"<= {args.chunk_kib} KiB (generated in {time.perf_counter() - t0:.1f} s)"
    )
    results = []
    print(f"{'case':<28} {'median M rec/s':>15} {'min':>7} {'max':>7} {'derived/run':>12}")
    for name, want in CASES:
        rates, derived = [], 0
        for _ in range(args.repeats):
            seconds, applied, derived = measure(chunks, want)
            assert applied == n, (applied, n)
            rates.append(applied / seconds / 1e6)
        med = statistics.median(rates)
        print(f"{name:<28} {med:>15.2f} {min(rates):>7.2f} {max(rates):>7.2f} {derived:>12,}")
        results.append(
            {
                "case": name,
                "want": want,
                "median_mrps": round(med, 3),
                "min_mrps": round(min(rates), 3),
                "max_mrps": round(max(rates), 3),
                "rates_mrps": [round(r, 3) for r in rates],
                "derived_records": derived,
            }
        )
    books_only = results[0]["median_mrps"]
    assert isinstance(books_only, float)
    met = books_only >= TARGET_MRPS
    print(f"target >= {TARGET_MRPS} M records/s/core (want=0): {'met' if met else 'MISSED'}")
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "bench": "books",
                    "records": n,
                    "instruments": args.instruments,
                    "chunks": len(chunks),
                    "chunk_kib": args.chunk_kib,
                    "repeats": args.repeats,
                    "seed": args.seed,
                    "target_mrps": TARGET_MRPS,
                    "target_met": met,
                    "results": results,
                    "machine": machine_info(),
                },
                indent=2,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
