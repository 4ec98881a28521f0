"""The records every system carries, and how each system frames them on the wire.

Every system moves the same 80-byte DBN MBP-1 records (realistic content from the gateway's
synthetic generator). The harness owns three fields of each record:

* ``instrument_id`` (header): 1000..1999, from a fixed pseudo-random schedule;
* ``sequence``: a global sequence number (fan-out, latency) or a per-instrument one
  (filtered), so each subscriber checks completeness and order on its own;
* ``ts_recv``: in latency runs, ``time.perf_counter_ns()`` taken just before the write
  (0 in records that must not be sampled).

A *layout* wraps each record in a system's own framing (NATS ``PUB``, a Redis ``PUBLISH``
command, ...). Records of one run always have the same frame length, so both sides move
whole numpy arrays, never per-record Python objects.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from gateway.feeds.synthetic import MBP1_DTYPE, SyntheticGenerator, SyntheticOptions

__all__ = [
    "API_KEY",
    "BATCH",
    "DATASET",
    "FIRST_ID",
    "INSTRUMENTS",
    "MBP1_DTYPE",
    "OFF_INSTRUMENT",
    "OFF_SEQUENCE",
    "OFF_TS_RECV",
    "REC_LEN",
    "TILE",
    "Layout",
    "Schedule",
    "metadata_bytes",
    "nats_subject",
    "redis_channel",
    "symbol_of",
    "zmq_topic",
]

API_KEY: Final = "db-BENCH000000000000000000000000"
DATASET: Final = "BENCH.FEED"
REC_LEN: Final = 80
#: records per publisher write (800 x 80 B = 64,000 B, as the anchors did)
BATCH: Final = 800
#: records in one lap of the schedule (a multiple of BATCH)
TILE: Final = 64_000
INSTRUMENTS: Final = 1000
FIRST_ID: Final = 1000
RTYPE_MBP1: Final = 0x01


def _offset(name: str) -> int:
    fields = MBP1_DTYPE.fields
    assert fields is not None
    return int(fields[name][1])


OFF_INSTRUMENT: Final = _offset("instrument_id")
OFF_SEQUENCE: Final = _offset("sequence")
OFF_TS_RECV: Final = _offset("ts_recv")
assert MBP1_DTYPE.itemsize == REC_LEN and TILE % BATCH == 0


def symbol_of(instrument_id: int) -> str:
    return f"S{instrument_id}"


def nats_subject(instrument_id: int | None) -> str:
    """One subject for the whole feed (fan-out) or one per instrument (filtered)."""
    return "md" if instrument_id is None else f"md.{instrument_id}"


redis_channel = nats_subject


def zmq_topic(instrument_id: int | None) -> bytes:
    """ZeroMQ prefix-matches topics against the message, and a DBN record starts with its
    header: the first 8 bytes (length, rtype, publisher_id, instrument_id) are the topic."""
    if instrument_id is None:
        return b""
    head = np.zeros(1, dtype=MBP1_DTYPE)
    head["length"] = REC_LEN // 4
    head["rtype"] = RTYPE_MBP1
    head["publisher_id"] = 1
    head["instrument_id"] = instrument_id
    return head.tobytes()[:8]


def metadata_bytes(start_ns: int, with_mappings: bool) -> bytes:
    """The publisher's DBN v3 Metadata; with raw symbol -> instrument_id mappings for the
    filtered scenario (``S1000`` -> 1000 ...)."""
    import databento_dbn as _dbn

    dbn: Any = _dbn  # the stubs' enum types trip mypy; these are the real enums

    from gateway.dbn import encode_metadata

    if not with_mappings:
        return encode_metadata(DATASET, start_ns, False)
    start, end = _dt.date(2020, 1, 1), _dt.date(2100, 1, 1)
    mappings = [
        SimpleNamespace(
            raw_symbol=symbol_of(iid),
            intervals=[SimpleNamespace(start_date=start, end_date=end, symbol=str(iid))],
        )
        for iid in range(FIRST_ID, FIRST_ID + INSTRUMENTS)
    ]
    meta = dbn.Metadata(
        dataset=DATASET,
        start=start_ns,
        stype_in=dbn.SType.RAW_SYMBOL,
        stype_out=dbn.SType.INSTRUMENT_ID,
        schema=dbn.Schema.MBP_1,
        symbols=[m.raw_symbol for m in mappings],
        mappings=mappings,
    )
    return bytes(meta.encode())


class Schedule:
    """Which instrument each record of the stream belongs to, lap after lap of TILE records.

    Instruments are uniform over the universe; ``rank`` is each record's index among the
    records of the same instrument within the lap, so the per-instrument sequence number of
    global record ``g`` is ``lap * counts[id] + rank[g % TILE]``.
    """

    def __init__(self, seed: int = 11) -> None:
        rng = np.random.default_rng(seed)
        self.index = rng.integers(0, INSTRUMENTS, size=TILE).astype(np.int64)
        self.ids = (self.index + FIRST_ID).astype(np.uint32)
        self.counts = np.bincount(self.index, minlength=INSTRUMENTS).astype(np.int64)
        order = np.argsort(self.index, kind="stable")
        sorted_idx = self.index[order]
        starts = np.r_[0, np.flatnonzero(np.diff(sorted_idx)) + 1]
        group_start = np.repeat(starts, np.diff(np.r_[starts, TILE]))
        rank = np.empty(TILE, dtype=np.int64)
        rank[order] = np.arange(TILE) - group_start
        self.rank = rank

    def published_per_instrument(self, records: int) -> npt.NDArray[np.int64]:
        """Records per instrument index among the first ``records`` of the stream."""
        laps, rest = divmod(records, TILE)
        return laps * self.counts + np.bincount(self.index[:rest], minlength=INSTRUMENTS)

    def sequences(self, start: int, count: int, per_instrument: bool) -> npt.NDArray[np.uint32]:
        """Sequence numbers of records [start, start + count) (never crossing a lap)."""
        lap, pos = divmod(start, TILE)
        assert pos + count <= TILE
        if per_instrument:
            seq = lap * self.counts[self.index[pos : pos + count]] + self.rank[pos : pos + count]
        else:
            seq = np.arange(start, start + count, dtype=np.int64)
        return (seq & 0xFFFFFFFF).astype(np.uint32)


def template_records(schedule: Schedule) -> npt.NDArray[np.void]:
    """One lap of realistic MBP-1 records (prices, sizes, sides from the synthetic feed)
    with the schedule's instrument ids; sequence and ts_recv are set per write."""
    gen = SyntheticGenerator(SyntheticOptions(instruments=INSTRUMENTS, seed=3, schemas=("mbp-1",)))
    chunks = gen.make(TILE, 1_700_000_000_000_000_000, 1_000_000_000)
    recs = np.frombuffer(b"".join(chunks), dtype=MBP1_DTYPE).copy()
    assert len(recs) == TILE
    recs["instrument_id"] = schedule.ids
    recs["sequence"] = 0
    recs["ts_recv"] = 0
    return recs


@dataclass(frozen=True)
class Layout:
    """How one system frames a record: ``prefix(instrument) + record + suffix``."""

    name: str
    #: prefix per instrument index (all the same length), or one for all
    prefixes: tuple[bytes, ...]
    suffix: bytes = b""

    @property
    def prefix_len(self) -> int:
        return len(self.prefixes[0])

    @property
    def frame_len(self) -> int:
        return self.prefix_len + REC_LEN + len(self.suffix)

    def dtype(self) -> np.dtype[np.void]:
        fields: list[tuple[Any, ...]] = []
        if self.prefix_len:
            fields.append(("pre", np.uint8, (self.prefix_len,)))
        fields.append(("rec", MBP1_DTYPE))
        if self.suffix:
            fields.append(("post", np.uint8, (len(self.suffix),)))
        dtype: np.dtype[np.void] = np.dtype(fields)
        return dtype

    def build(self, schedule: Schedule) -> npt.NDArray[np.void]:
        """One lap of frames; the caller rewrites ``frames['rec']['sequence']`` per write."""
        frames = np.zeros(TILE, dtype=self.dtype())
        frames["rec"] = template_records(schedule)
        if self.prefix_len:
            table = np.frombuffer(b"".join(self.prefixes), dtype=np.uint8).reshape(
                len(self.prefixes), self.prefix_len
            )
            pick = schedule.index if len(self.prefixes) > 1 else np.zeros(TILE, np.int64)
            frames["pre"] = table[pick]
        if self.suffix:
            frames["post"] = np.frombuffer(self.suffix, dtype=np.uint8)
        return frames


def _per_instrument(fmt: str) -> tuple[bytes, ...]:
    return tuple(fmt.format(i=FIRST_ID + k).encode() for k in range(INSTRUMENTS))


def layout_for(system: str, per_instrument: bool) -> Layout:
    """The publisher-side framing of ``system`` (gateway ingest, raw and ZeroMQ: none)."""
    if system == "nats":
        if per_instrument:
            return Layout("nats", _per_instrument("PUB md.{i} 80\r\n"), b"\r\n")
        return Layout("nats", (b"PUB md 80\r\n",), b"\r\n")
    if system == "redis":
        if per_instrument:
            return Layout(
                "redis", _per_instrument("*3\r\n$7\r\nPUBLISH\r\n$7\r\nmd.{i}\r\n$80\r\n"), b"\r\n"
            )
        return Layout("redis", (b"*3\r\n$7\r\nPUBLISH\r\n$2\r\nmd\r\n$80\r\n",), b"\r\n")
    return Layout(system, (b"",))


def delivered_frame_len(system: str, per_instrument: bool) -> int:
    """Bytes one record takes on the subscriber's wire (progress estimates, reports)."""
    if system == "nats":  # MSG <subject> <sid> 80\r\n ... \r\n
        return len(b"MSG md.1000 100 80\r\n" if per_instrument else b"MSG md 1 80\r\n") + 82
    if system == "redis":  # *3 $7 message $n <channel> $80 ... \r\n
        chan = 7 if per_instrument else 2
        return len(f"*3\r\n$7\r\nmessage\r\n${chan}\r\n{'x' * chan}\r\n$80\r\n") + 82
    if system == "zmq":
        return REC_LEN + 2
    return REC_LEN
