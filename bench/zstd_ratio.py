"""Compression ratio and CPU: shared independent frames vs one stream per session.

    python -m bench.zstd_ratio [--level 1] [--data tests/data/dbn]

Two inputs: the gateway's synthetic feed (trades + MBP-1, price walk, Zipf-skewed names) and
a realistic replay (every record of the real DBN samples, concatenated in file order, the
live capture included). Each is cut into chunks of 1, 10, 100 and 1000 records, as a feed
read would be, and compressed (a) as the gateway does, one independent frame per chunk, and
(b) as the naive design does, one streaming compressor with a block flush per chunk.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import zstandard

from gateway.dbn import DbnStreamDecoder
from gateway.feeds.file import read_blocks
from gateway.feeds.synthetic import SyntheticGenerator, SyntheticOptions

CHUNKS = (1, 10, 100, 1000)


def synthetic_records(n: int = 40_000) -> list[bytes]:
    gen = SyntheticGenerator(SyntheticOptions(instruments=200, seed=11))
    out: list[bytes] = []
    t0 = time.time_ns()
    k = 0
    while len(out) < n:
        for chunk in gen.make(1000, t0 + k * 1_000_000, 1_000_000):
            size = chunk[0] * 4
            out += [chunk[i : i + size] for i in range(0, len(chunk), size)]
        k += 1
    return out[:n]


def replay_records(root: Path) -> list[bytes]:
    out: list[bytes] = []
    for path in sorted(root.glob("*/*.dbn*")):
        decoder = DbnStreamDecoder()
        for block in read_blocks(path):
            for index in decoder.feed(block):
                data = bytes(index.data)
                out += [
                    data[int(o) : int(o + n)]
                    for o, n in zip(index.offsets, index.lengths, strict=True)
                ]
    return out


def measure(records: list[bytes], per_chunk: int, level: int) -> tuple[float, float, float, float]:
    chunks = [b"".join(records[i : i + per_chunk]) for i in range(0, len(records), per_chunk)]
    raw = sum(len(c) for c in chunks)
    cctx = zstandard.ZstdCompressor(level=level)
    started = time.process_time()
    frames = sum(len(cctx.compress(c)) for c in chunks)
    frame_cpu = time.process_time() - started
    stream = zstandard.ZstdCompressor(level=level).compressobj()
    started = time.process_time()
    streamed = 0
    for c in chunks:
        streamed += len(stream.compress(c)) + len(stream.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK))
    stream_cpu = time.process_time() - started
    mb = raw / 1e6
    return raw / frames, frame_cpu / mb * 1e3, raw / streamed, stream_cpu / mb * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.zstd_ratio", description=__doc__)
    parser.add_argument("--level", type=int, default=1)
    parser.add_argument(
        "--data", type=Path, default=Path(__file__).resolve().parents[1] / "tests" / "data" / "dbn"
    )
    args = parser.parse_args()
    inputs = {"synthetic feed": synthetic_records()}
    replay = replay_records(args.data)
    if replay:
        # Small (a few hundred records) and never repeated: repeating them would let a
        # stream match whole earlier copies and report a ratio no live feed has.
        inputs["real samples (replay)"] = replay
    print(f"zstd level {args.level}; ratio = raw / compressed; CPU in ms per MB of input\n")
    print(
        "| input | records per chunk | shared frames: ratio | CPU | per-session stream: ratio "
        "| CPU |"
    )
    print("|---|---|---|---|---|---|")
    for name, records in inputs.items():
        sizes = np.array([len(r) for r in records])
        for per_chunk in (c for c in CHUNKS if c <= len(records)):
            fr, fc, sr, sc = measure(records, per_chunk, args.level)
            print(
                f"| {name} ({len(records):,} records, mean {sizes.mean():.0f} B) | {per_chunk} "
                f"| {fr:.2f} | {fc:.1f} | {sr:.2f} | {sc:.1f} |"
            )


if __name__ == "__main__":
    main()
