"""The harness's verification must catch loss: the byte-counting parsers, in memory."""

from __future__ import annotations

import numpy as np
import zstandard

from bench.parsers import (
    DbnParser,
    NatsParser,
    RecordSink,
    RecvClock,
    RedisParser,
    ZmtpParser,
    ZstdLayer,
)
from bench.records import FIRST_ID, INSTRUMENTS, Schedule, layout_for
from gateway.dbn import SystemCode, encode_metadata, encode_system


def _records(count: int, per_instrument: bool = False) -> tuple[bytes, np.ndarray]:
    schedule = Schedule()
    frames = layout_for("gateway", per_instrument).build(schedule)
    frames["rec"]["sequence"] = schedule.sequences(0, len(frames), per_instrument)
    recs = frames["rec"][:count]
    return recs.tobytes(), recs


def _parse(
    parser: DbnParser | NatsParser | RedisParser | ZmtpParser, data: bytes, now: int = 1
) -> int:
    buf = bytearray(data)
    return parser.parse(buf, np.frombuffer(buf, dtype=np.uint8), 0, len(buf), now)


def test_dbn_stream_counts_records_and_skips_gateway_records() -> None:
    data, _ = _records(5000)
    ack = encode_system(
        1, "Subscription request 1 for mbp-1 data succeeded", SystemCode.SUBSCRIPTION_ACK
    )
    heartbeat = encode_system(2, "Heartbeat", SystemCode.HEARTBEAT)
    stream = encode_metadata("BENCH.FEED", 1, False) + ack + data[: 80 * 10] + heartbeat
    stream += data[80 * 10 :]
    parser = DbnParser(RecordSink(False, None))
    used = _parse(parser, stream[:-7])  # a partial record stays for the next read
    assert used == len(stream) - 80
    assert parser.acks == 1 and parser.heartbeats == 1
    assert parser.sink.records == 4999 and parser.sink.gaps == 0


def test_a_missing_record_is_a_sequence_break() -> None:
    data, _ = _records(3000)
    for cut in (5, 2000):  # the plain-Python path and the numpy path
        lossy = data[: 80 * cut] + data[80 * (cut + 1) :]
        sink = RecordSink(False, None)
        parser = DbnParser(sink)
        parser.metadata = True
        _parse(parser, lossy[: 80 * 10])
        _parse(parser, lossy[80 * 10 :])
        assert sink.records == 2999
        assert sink.gaps >= 1 and sink.notes


def test_per_instrument_sequences_and_foreign_instruments() -> None:
    data, recs = _records(6400, per_instrument=True)
    wanted = np.zeros(INSTRUMENTS, dtype=np.bool_)
    wanted[recs["instrument_id"][:3200] - FIRST_ID] = True
    sink = RecordSink(True, wanted)
    parser = DbnParser(sink)
    parser.metadata = True
    _parse(parser, data[: 80 * 3200])
    assert sink.gaps == 0 and sink.unexpected == 0
    # Drop the first later record of one instrument: its next one is a break.
    later = recs[3200:]
    iid = int(later["instrument_id"][0])
    drop = 3200 + int(np.flatnonzero(later["instrument_id"] == iid)[0])
    lossy = data[80 * 3200 : 80 * drop] + data[80 * (drop + 1) :]
    _parse(parser, lossy)
    assert sink.gaps >= 1 or sink.unexpected > 0
    missing = RecordSink(True, np.zeros(INSTRUMENTS, dtype=np.bool_))
    p2 = DbnParser(missing)
    p2.metadata = True
    _parse(p2, data[:800])
    assert missing.unexpected == 10


def test_latency_from_the_receive_clock() -> None:
    data, recs = _records(100)
    buf = bytearray(data)
    arr = np.ndarray((100,), dtype="<u8", buffer=buf, offset=32, strides=(80,))
    arr[:] = 1_000
    clock = RecvClock()
    clock.mark(80 * 50, 5_000)  # the first 50 records arrived at t=5000
    clock.mark(80 * 100, 9_000)  # the rest at t=9000
    sink = RecordSink(False, None, latency_every=1)
    parser = DbnParser(sink)
    parser.metadata = True
    parser.parse(buf, np.frombuffer(buf, dtype=np.uint8), 0, len(buf), clock)
    lat = np.concatenate(sink.latency)
    assert sorted(set(lat.tolist())) == [4_000, 8_000]
    assert sink.first_ns == 5_000 and sink.last_ns == 9_000


def test_nats_frames_and_ping() -> None:
    data, _ = _records(20)
    msgs = b"".join(b"MSG md 1 80\r\n" + data[i * 80 : (i + 1) * 80] + b"\r\n" for i in range(20))
    parser = NatsParser(RecordSink(False, None))
    stream = b"PING\r\n" + msgs[:950] + b"PING\r\n" + msgs[950:]
    assert _parse(parser, stream) == len(stream)
    assert parser.sink.records == 20 and parser.sink.gaps == 0
    assert parser.reply == b"PONG\r\nPONG\r\n"


def test_redis_and_zmtp_frames() -> None:
    data, _ = _records(20)
    head = b"*3\r\n$7\r\nmessage\r\n$2\r\nmd\r\n$80\r\n"
    resp = b"*3\r\n$9\r\nsubscribe\r\n$2\r\nmd\r\n:1\r\n" + b"".join(
        head + data[i * 80 : (i + 1) * 80] + b"\r\n" for i in range(20)
    )
    redis = RedisParser(RecordSink(False, None))
    assert _parse(redis, resp) == len(resp)
    assert redis.subscribed == 1 and redis.sink.records == 20 and redis.sink.gaps == 0
    zmtp = ZmtpParser(RecordSink(False, None))
    frames = b"".join(b"\x00\x50" + data[i * 80 : (i + 1) * 80] for i in range(20))
    assert _parse(zmtp, frames) == len(frames)
    assert zmtp.sink.records == 20 and zmtp.sink.gaps == 0


def test_zstd_layer_reads_independent_frames() -> None:
    data, _ = _records(300)
    cctx = zstandard.ZstdCompressor(level=3)
    wire = cctx.compress(data[:8000]) + cctx.compress(data[8000:])
    layer = ZstdLayer()
    plain = layer.feed(wire[:100]) + layer.feed(wire[100:])
    assert plain == data
    assert layer.frames == 2 and layer.wire_bytes == len(wire)
