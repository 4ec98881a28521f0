"""DBN on the wire (``gateway/dbn/``): chunk index, gather, ts_out, Metadata, gateway
records and the stream decoder, checked against databento_dbn and the real samples."""

from __future__ import annotations

import struct
from collections import Counter

import databento_dbn as d
import numpy as np
import pytest

from gateway import dbn
from gateway.errors import DbnError

from .conftest import (
    LIVE_SAMPLE,
    NOW_NS,
    SAMPLE_FILES,
    decode,
    header,
    mbo,
    mixed_records,
    ohlcv,
    random_pieces,
    reference_select,
    sample_bytes,
    sample_decoded,
    sample_records,
    split_records,
    status,
    trade,
)

U64_MAX = 2**64 - 1


def trades(n: int, ids: tuple[int, ...] = (11, 22, 33)) -> list[bytes]:
    return [trade(ids[i % len(ids)], NOW_NS + i, sequence=i, price=1_000 + i) for i in range(n)]


def shuffled_mixed(seed: int = 0) -> list[bytes]:
    recs = mixed_records()
    order = np.random.default_rng(seed).permutation(len(recs))
    return [recs[i] for i in order]


def check_index(index: dbn.ChunkIndex, records: list[bytes]) -> None:
    heads = [header(r) for r in records]
    assert index.count == len(records)
    assert index.nbytes == sum(len(r) for r in records)
    assert bytes(index.data) == b"".join(records)
    assert index.lengths.tolist() == [h[0] for h in heads]
    assert index.rtypes.tolist() == [h[1] for h in heads]
    assert index.instrument_ids.tolist() == [h[3] for h in heads]
    assert index.ts_events.tolist() == [h[4] for h in heads]
    offsets = np.cumsum([0] + [len(r) for r in records])[:-1]
    assert index.offsets.tolist() == offsets.tolist()
    assert index.rtype_set == frozenset(h[1] for h in heads)


# --- index_records -------------------------------------------------------------------------


def test_index_uniform_chunk():
    recs = trades(10)
    index, used = dbn.index_records(b"".join(recs))
    assert used == 480
    assert index.record_len == 48
    check_index(index, recs)
    assert index.rows is not None and index.rows.shape == (10, 48)


@pytest.mark.parametrize(
    "schema", ["mbo", "mbp-1", "mbp-10", "status", "definition", "statistics", "ohlcv-1s", "bbo-1s"]
)
def test_index_real_uniform_chunks(schema):
    recs = list(sample_records("GLBX.MDP3", schema)) * 3
    index, used = dbn.index_records(b"".join(recs))
    assert used == sum(len(r) for r in recs)
    check_index(index, recs)


@pytest.mark.parametrize("seed", range(5))
def test_index_mixed_chunk(seed):
    recs = shuffled_mixed(seed)
    assert len({len(r) for r in recs}) >= 6
    index, used = dbn.index_records(b"".join(recs))
    assert used == sum(len(r) for r in recs)
    check_index(index, recs)


def test_index_uniform_then_other_length():
    recs = trades(4) + [mbo(9)] + trades(2)
    index, used = dbn.index_records(b"".join(recs))
    assert used == sum(len(r) for r in recs)
    check_index(index, recs)


def test_index_accepts_memoryview():
    recs = shuffled_mixed(1)
    blob = bytearray(b"".join(recs))
    index, used = dbn.index_records(memoryview(blob))
    assert used == len(blob)
    check_index(index, recs)


@pytest.mark.parametrize("cut", [1, 2, 15, 16, 47])
def test_index_uniform_with_partial_trailing_record(cut):
    recs = trades(6)
    tail = trade(99)[:cut]
    index, used = dbn.index_records(b"".join(recs) + tail)
    assert used == 6 * 48
    check_index(index, recs)


@pytest.mark.parametrize("cut", [1, 16, 79])
def test_index_uniform_with_partial_record_of_other_length(cut):
    recs = trades(6)
    tail = sample_records("GLBX.MDP3", "mbp-1")[0][:cut]
    index, used = dbn.index_records(b"".join(recs) + tail)
    assert used == 6 * 48
    check_index(index, recs)


@pytest.mark.parametrize("cut", [1, 16, 100, 519])
def test_index_mixed_with_partial_trailing_record(cut):
    recs = shuffled_mixed(2)
    tail = sample_records("GLBX.MDP3", "definition")[0][:cut]
    index, used = dbn.index_records(b"".join(recs) + tail)
    assert used == sum(len(r) for r in recs)
    check_index(index, recs)


@pytest.mark.parametrize("data", [b"", trade(1)[:1], trade(1)[:47], mbo(1)[:20]])
def test_index_nothing_whole(data):
    index, used = dbn.index_records(data)
    assert used == 0
    assert index.count == 0
    assert index.nbytes == 0


@pytest.mark.parametrize("length_byte", [0, 1, 3])
def test_index_short_record_length_raises(length_byte):
    bad = bytes([length_byte]) + trade(1)[1:]
    with pytest.raises(DbnError):
        dbn.index_records(bad)
    # After good records, the good ones are indexed and the bad one is left unconsumed.
    for good in (b"".join(trades(3)), b"".join(shuffled_mixed(3))):
        index, used = dbn.index_records(good + bad + trade(2))
        assert used == len(good) and bytes(index.data) == good


@pytest.mark.parametrize("length_byte", [0, 1, 3])
def test_stream_decoder_returns_good_records_then_reports_the_bad_one(length_byte):
    bad = bytes([length_byte]) + trade(1)[1:]
    good = b"".join(trades(3))
    decoder = dbn.DbnStreamDecoder()
    chunks = decoder.feed(dbn.encode_metadata("X", 1, False) + good + bad)
    assert [bytes(c.data) for c in chunks] == [good]
    assert isinstance(decoder.error, DbnError) and "shorter than its header" in str(decoder.error)


# --- ChunkIndex.select ---------------------------------------------------------------------


def masks(n: int, rng: np.random.Generator) -> list[np.ndarray]:
    out = [np.zeros(n, bool), np.ones(n, bool), np.arange(n) % 2 == 0, np.arange(n) % 3 != 0]
    one = np.zeros(n, bool)
    one[n - 1] = True
    out.append(one)
    out += [rng.random(n) < p for p in (0.1, 0.5, 0.9) for _ in range(10)]
    return out


def test_select_uniform_matches_reference():
    recs = trades(50)
    index, _ = dbn.index_records(b"".join(recs))
    for mask in masks(len(recs), np.random.default_rng(1)):
        assert index.select(mask) == reference_select(recs, mask)


@pytest.mark.parametrize("seed", range(3))
def test_select_mixed_matches_reference(seed):
    recs = shuffled_mixed(seed)
    index, _ = dbn.index_records(b"".join(recs))
    assert index.rows is None
    for mask in masks(len(recs), np.random.default_rng(seed)):
        got = index.select(mask)
        assert bytes(got) == reference_select(recs, mask)


def test_select_by_header_fields():
    recs = shuffled_mixed(4)
    index, _ = dbn.index_records(b"".join(recs))
    mask = index.rtypes == 0x16  # the live sample's SymbolMappingMsg records
    got = split_records(index.select(mask))
    assert got == [r for r in recs if r[1] == 0x16]
    assert len(got) > 10


# --- ts_out --------------------------------------------------------------------------------


def check_stamped(stamped: bytes, originals: list[bytes], ts_out: int) -> None:
    parts = split_records(stamped)
    assert len(parts) == len(originals)
    for got, orig in zip(parts, originals, strict=True):
        assert len(got) == len(orig) + 8
        assert got[0] == orig[0] + 2  # header length raised by 2 words
        assert got[1 : len(orig)] == orig[1:]
        assert struct.unpack("<Q", got[-8:])[0] == ts_out
    decoded = decode(stamped, ts_out=True)
    assert len(decoded) == len(originals)
    for rec, orig in zip(decoded, originals, strict=True):
        assert rec.ts_out == ts_out
        assert rec.instrument_id == header(orig)[3]
        assert rec.ts_event == header(orig)[4]


@pytest.mark.parametrize("mixed", [False, True])
def test_stamp_ts_out_whole_chunk(mixed):
    recs = shuffled_mixed(5) if mixed else trades(20)
    index, _ = dbn.index_records(b"".join(recs))
    stamped = dbn.stamp_ts_out(index, None, NOW_NS + 777)
    check_stamped(stamped, recs, NOW_NS + 777)
    assert bytes(index.data) == b"".join(recs)  # the chunk itself is untouched


@pytest.mark.parametrize("mixed", [False, True])
def test_stamp_ts_out_with_mask(mixed):
    recs = shuffled_mixed(6) if mixed else trades(20)
    index, _ = dbn.index_records(b"".join(recs))
    rng = np.random.default_rng(6)
    for _ in range(5):
        mask = rng.random(len(recs)) < 0.4
        stamped = dbn.stamp_ts_out(index, mask, 42)
        check_stamped(stamped, [r for r, m in zip(recs, mask, strict=True) if m], 42)


def test_stamped_stream_decodes_behind_ts_out_metadata():
    recs = shuffled_mixed(7)
    index, _ = dbn.index_records(b"".join(recs))
    gateway_recs = [dbn.encode_system(NOW_NS, "Heartbeat", dbn.SystemCode.HEARTBEAT)]
    stream = (
        dbn.encode_metadata("GLBX.MDP3", NOW_NS, True)
        + dbn.stamp_ts_out(index, None, 123)
        + dbn.stamp_records(gateway_recs, 456)
    )
    dec = d.DBNDecoder()
    dec.write(stream)
    items = dec.decode()
    assert items[0].ts_out is True
    assert [r.ts_out for r in items[1:]] == [123] * len(recs) + [456]
    assert isinstance(items[-1], d.SystemMsg) and items[-1].msg == "Heartbeat"


def test_stamp_records():
    recs = [
        dbn.encode_system(1, "a", 1),
        dbn.encode_error(2, "b", 4),
        dbn.encode_symbol_mapping(3, 5, 1, "ESZ4", "ESZ4", 3),
    ]
    check_stamped(dbn.stamp_records(recs, 999), recs, 999)


# --- Metadata ------------------------------------------------------------------------------


@pytest.mark.parametrize("ts_out", [False, True])
def test_encode_metadata_live_values(ts_out):
    raw = dbn.encode_metadata("GLBX.MDP3", NOW_NS, ts_out)
    assert len(raw) == 128
    # the DBN v3 Metadata layout, byte by byte
    assert raw[0:3] == b"DBN"
    assert raw[3] == 3
    assert struct.unpack_from("<I", raw, 4)[0] == 120
    assert raw[8:24] == b"GLBX.MDP3".ljust(16, b"\0")
    assert struct.unpack_from("<H", raw, 24)[0] == 0xFFFF
    assert struct.unpack_from("<Q", raw, 26)[0] == NOW_NS
    assert struct.unpack_from("<Q", raw, 34)[0] == U64_MAX
    assert struct.unpack_from("<Q", raw, 42)[0] == 0
    assert raw[50] == 0xFF
    assert raw[51] == 0
    assert raw[52] == int(ts_out)
    assert struct.unpack_from("<H", raw, 53)[0] == 71
    assert raw[55:108] == bytes(53)
    assert struct.unpack_from("<5I", raw, 108) == (0, 0, 0, 0, 0)
    meta = d.Metadata.decode(raw)
    assert meta.version == 3
    assert meta.dataset == "GLBX.MDP3"
    assert meta.schema is None
    assert meta.stype_in is None
    assert meta.stype_out == d.SType.INSTRUMENT_ID
    assert meta.start == NOW_NS
    assert meta.ts_out is ts_out
    assert meta.symbols == [] and meta.partial == [] and meta.not_found == []
    assert meta.mappings == {}


def test_encode_metadata_only_start_differs():
    a = dbn.encode_metadata("XNAS.ITCH", 1, False)
    b = dbn.encode_metadata("XNAS.ITCH", 2, False)
    assert a[:26] == b[:26] and a[34:] == b[34:] and a != b


# --- gateway records -----------------------------------------------------------------------


@pytest.mark.parametrize("code", [0, 1, 2, 3, 4, 255])
def test_encode_system(code):
    raw = dbn.encode_system(NOW_NS, "Subscription request 3 for trades data succeeded", code)
    assert len(raw) == 320
    assert header(raw) == (320, 0x17, 0, 0, NOW_NS)
    assert raw[319] == code
    (rec,) = decode(raw)
    assert isinstance(rec, d.SystemMsg)
    assert rec.msg == "Subscription request 3 for trades data succeeded"
    assert int(rec.code) == code
    assert rec.ts_event == NOW_NS


def test_encode_system_heartbeat_text():
    (rec,) = decode(dbn.encode_system(5, "Heartbeat", dbn.SystemCode.HEARTBEAT))
    assert rec.msg == "Heartbeat"
    assert rec.code == d.SystemCode.HEARTBEAT


@pytest.mark.parametrize(
    ("code", "is_last"), [(4, False), (4, True), (5, True), (7, True), (1, True), (6, True)]
)
def test_encode_error(code, is_last):
    raw = dbn.encode_error(NOW_NS, "Failed to resolve symbol: BAD", code, is_last=is_last)
    assert len(raw) == 320
    assert header(raw) == (320, 0x15, 0, 0, NOW_NS)
    assert raw[318] == code
    assert raw[319] == int(is_last)
    (rec,) = decode(raw)
    assert isinstance(rec, d.ErrorMsg)
    assert rec.err == "Failed to resolve symbol: BAD"
    assert int(rec.code) == code
    assert bool(rec.is_last) is is_last


def test_long_texts_are_truncated_not_refused():
    (sys_rec,) = decode(dbn.encode_system(1, "s" * 1000, 1))
    (err_rec,) = decode(dbn.encode_error(1, "e" * 1000, 6))
    assert 250 < len(sys_rec.msg) <= 302 and set(sys_rec.msg) == {"s"}
    assert 250 < len(err_rec.err) <= 301 and set(err_rec.err) == {"e"}


@pytest.mark.parametrize("stype_in", [dbn.STYPE_RAW_SYMBOL, dbn.STYPE_INSTRUMENT_ID])
def test_encode_symbol_mapping(stype_in):
    in_symbol = "ESZ4" if stype_in == dbn.STYPE_RAW_SYMBOL else "183748"
    raw = dbn.encode_symbol_mapping(NOW_NS, 183748, stype_in, in_symbol, "ESZ4", NOW_NS - 5)
    assert len(raw) == 176
    assert header(raw) == (176, 0x16, 0, 183748, NOW_NS)
    (rec,) = decode(raw)
    assert isinstance(rec, d.SymbolMappingMsg)
    assert rec.instrument_id == 183748
    assert int(rec.stype_in) == stype_in
    assert rec.stype_in_symbol == in_symbol
    assert rec.stype_out == d.SType.RAW_SYMBOL
    assert rec.stype_out_symbol == "ESZ4"
    assert rec.start_ts == NOW_NS - 5
    assert rec.end_ts == U64_MAX
    assert dbn.symbols_from_mapping(raw) == (in_symbol, "ESZ4")


def test_symbol_helpers_on_real_records():
    seen: Counter[str] = Counter()
    for path in SAMPLE_FILES:
        dec = d.DBNDecoder()
        dec.write(sample_bytes(path))
        for rec in dec.decode()[1:]:
            if isinstance(rec, d.InstrumentDefMsg):
                assert dbn.symbol_from_definition(bytes(rec)) == rec.raw_symbol
                seen["definition"] += 1
            elif isinstance(rec, d.SymbolMappingMsg):
                assert dbn.symbols_from_mapping(bytes(rec)) == (
                    rec.stype_in_symbol,
                    rec.stype_out_symbol,
                )
                seen["mapping"] += 1
    # the samples hold both kinds: the test checked something
    assert seen["definition"] > 0 and seen["mapping"] > 0, seen


def test_header_at():
    recs = shuffled_mixed(8)
    blob = b"".join(recs)
    off = 0
    for rec in recs:
        assert dbn.header_at(blob, off) == header(rec)
        off += len(rec)


# --- DbnStreamDecoder ----------------------------------------------------------------------


def drain(decoder: dbn.DbnStreamDecoder, pieces: list[bytes]) -> list[dbn.ChunkIndex]:
    chunks = []
    for piece in pieces:
        chunks += decoder.feed(piece)
    return chunks


@pytest.mark.parametrize("path", SAMPLE_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_stream_decoder_on_samples_in_random_pieces(path):
    stream = sample_bytes(path)
    meta, records = sample_decoded(path)
    for seed, max_piece in ((0, 7), (1, 64), (2, 1000)):
        decoder = dbn.DbnStreamDecoder()
        chunks = drain(decoder, random_pieces(stream, np.random.default_rng(seed), max_piece))
        got = [
            bytes(c.data[int(o) : int(o) + int(n)])
            for c in chunks
            for o, n in zip(c.offsets, c.lengths, strict=True)
        ]
        assert got == list(records)
        assert decoder.records_in == len(records)
        assert decoder.pending == 0
        assert decoder.version == 3
        assert decoder.metadata is not None
        assert decoder.metadata.dataset == meta.dataset
        assert decoder.metadata.schema == meta.schema
        assert decoder.metadata.mappings == meta.mappings


def test_stream_decoder_live_sample_one_byte_at_a_time():
    stream = sample_bytes(LIVE_SAMPLE)
    _, records = sample_decoded(LIVE_SAMPLE)
    decoder = dbn.DbnStreamDecoder()
    chunks = drain(decoder, [stream[i : i + 1] for i in range(len(stream))])
    assert b"".join(bytes(c.data) for c in chunks) == b"".join(records)
    assert sum(c.count for c in chunks) == len(records)


def test_stream_decoder_whole_stream_in_one_piece():
    stream = sample_bytes(LIVE_SAMPLE)
    _, records = sample_decoded(LIVE_SAMPLE)
    decoder = dbn.DbnStreamDecoder()
    chunks = decoder.feed(stream)
    assert len(chunks) == 1
    check_index(chunks[0], list(records))


def test_stream_decoder_metadata_split_from_records():
    meta = dbn.encode_metadata("GLBX.MDP3", NOW_NS, False)
    recs = trades(3) + [ohlcv(4), status(5)]
    decoder = dbn.DbnStreamDecoder()
    assert decoder.feed(meta[:50]) == []
    assert decoder.metadata is None
    assert decoder.feed(meta[50:]) == []
    assert decoder.metadata is not None and decoder.metadata.dataset == "GLBX.MDP3"
    chunks = decoder.feed(b"".join(recs)[:100])
    chunks += decoder.feed(b"".join(recs)[100:])
    assert b"".join(bytes(c.data) for c in chunks) == b"".join(recs)


@pytest.mark.parametrize(
    "prefix",
    [
        b"XYZ\x03",
        b"DBX",
        b"\x28\xb5\x2f\xfd\x00\x00\x00\x00",
        b"dbn\x03xxxx",
        b"D\x00",
        b'{"json": 1}\n',
    ],
)
def test_stream_decoder_bad_magic(prefix):
    with pytest.raises(DbnError):
        dbn.DbnStreamDecoder().feed(prefix + bytes(200))


@pytest.mark.parametrize("version", [0, 4, 9, 255])
def test_stream_decoder_unsupported_version(version):
    raw = bytearray(dbn.encode_metadata("GLBX.MDP3", 1, False))
    raw[3] = version
    with pytest.raises(DbnError):
        dbn.DbnStreamDecoder().feed(bytes(raw))


def test_stream_decoder_corrupt_metadata_body_is_dbn_error():
    raw = dbn.encode_metadata("GLBX.MDP3", 1, False)
    bad = raw[:8] + b"\xff" * (len(raw) - 8)
    with pytest.raises(DbnError):
        dbn.DbnStreamDecoder().feed(bad)


def test_stream_decoder_schema_definition_is_dbn_error():
    raw = bytearray(dbn.encode_metadata("GLBX.MDP3", 1, False))
    struct.pack_into("<I", raw, 108, 4)  # schema_definition_length must be 0
    with pytest.raises(DbnError):
        dbn.DbnStreamDecoder().feed(bytes(raw))


def test_stream_decoder_short_record_is_dbn_error():
    meta = dbn.encode_metadata("GLBX.MDP3", 1, False)
    decoder = dbn.DbnStreamDecoder()
    decoder.feed(meta + trade(1))
    with pytest.raises(DbnError):
        decoder.feed(bytes([2]) + bytes(47))


def test_stream_decoder_unknown_rtype_is_dbn_error():
    meta = dbn.encode_metadata("GLBX.MDP3", 1, False)
    rec = bytearray(trade(1))
    rec[1] = 0x99
    with pytest.raises(DbnError):
        dbn.DbnStreamDecoder().feed(meta + bytes(rec))


def old_stream(version: int) -> tuple[bytes, list[bytes], list]:
    """A DBN v1/v2 stream (Metadata + records of that version) and its v3 upgrade as
    databento_dbn computes it."""
    mod = d.v1 if version == 1 else d.v2
    meta = d.Metadata(
        dataset="GLBX.MDP3",
        start=NOW_NS,
        stype_in=d.SType.RAW_SYMBOL,  # type: ignore[arg-type]  # stubs type enum members as str
        stype_out=d.SType.INSTRUMENT_ID,  # type: ignore[arg-type]  # stubs type enum members as str
        schema=None,
        symbols=["ESZ4"],
        version=version,
    ).encode()
    stat = mod.StatMsg(
        publisher_id=1,
        instrument_id=7,
        ts_event=NOW_NS,
        ts_recv=NOW_NS + 1,
        ts_ref=0,
        price=12_345,
        quantity=67,
        stat_type=d.StatType.OPENING_PRICE,
    )
    system = mod.SystemMsg(ts_event=NOW_NS, msg="Heartbeat")
    recs = [trade(7, NOW_NS), bytes(stat), trade(8, NOW_NS + 2), bytes(system), trade(9)]
    assert len(bytes(stat)) == 64
    assert len(bytes(system)) == (80 if version == 1 else 320)
    stream = bytes(meta) + b"".join(recs)
    ref = d.DBNDecoder(upgrade_policy=d.VersionUpgradePolicy.UPGRADE_TO_V3)  # type: ignore[arg-type]  # stubs type enum members as str
    ref.write(stream)
    upgraded = ref.decode()[1:]
    return stream, recs, upgraded


@pytest.mark.parametrize("version", [1, 2])
def test_stream_decoder_upgrades_old_versions(version):
    stream, originals, upgraded = old_stream(version)
    assert stream[3] == version
    for seed in range(3):
        decoder = dbn.DbnStreamDecoder()
        chunks = drain(decoder, random_pieces(stream, np.random.default_rng(seed), 40))
        assert decoder.version == version
        assert decoder.metadata is not None and decoder.metadata.version == 3
        blob = b"".join(bytes(c.data) for c in chunks)
        assert blob == b"".join(bytes(r) for r in upgraded)
        got = decode(blob)  # decodes as plain v3
        assert [type(r).__name__ for r in got] == [
            "TradeMsg",
            "StatMsg",
            "TradeMsg",
            "SystemMsg",
            "TradeMsg",
        ]
        parts = split_records(blob)
        assert [len(p) for p in parts] == [48, 80, 48, 320, 48]
        assert parts[0] == originals[0] and parts[2] == originals[2]
        assert (got[1].price, got[1].quantity, got[1].instrument_id) == (12_345, 67, 7)
        assert got[3].msg == "Heartbeat"
        assert decoder.records_in == 5


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize(
    "bad",
    [bytes([12, 0x99]) + bytes(46), bytes([2]) + bytes(47)],
    ids=["unknown_rtype", "short_length"],
)
def test_stream_decoder_bad_record_in_old_version_is_dbn_error(version, bad):
    stream, _, upgraded = old_stream(version)
    decoder = dbn.DbnStreamDecoder()
    # The good records before the bad one are kept (upgraded), then the stream is over.
    chunks = decoder.feed(stream + bad)
    assert b"".join(bytes(c.data) for c in chunks) == b"".join(bytes(r) for r in upgraded)
    assert isinstance(decoder.error, DbnError)
    with pytest.raises(DbnError):
        decoder.feed(trade(1))


@pytest.mark.parametrize("seed", range(20))
def test_positions_of_matches_a_full_isin(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 400))
    universe = rng.choice(2**32 - 1, size=int(rng.integers(1, 60)), replace=False)
    ids_in_chunk = rng.choice(universe, size=n)
    records = [trade(int(i), sequence=k) for k, i in enumerate(ids_in_chunk)]
    index, _ = dbn.index_records(b"".join(records))
    for _ in range(10):
        wanted = np.unique(
            rng.choice(np.concatenate([universe, [0, 2**32 - 1]]), size=int(rng.integers(1, 12)))
        ).astype(np.uint32)
        expected = np.flatnonzero(np.isin(index.instrument_ids, wanted))
        got = index.positions_of(wanted)
        assert got.tolist() == expected.tolist()
        assert index.select(got) == index.select(np.isin(index.instrument_ids, wanted))
