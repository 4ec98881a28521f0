"""Record validation (issue 11): no record that would make an official client panic ever
leaves the stream decoder, whatever a publisher or a file sends."""

from __future__ import annotations

from typing import Any

import databento_dbn as d
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from gateway import dbn
from gateway.errors import DbnError

from .conftest import NOW_NS, trade

SIZES = {
    d.TradeMsg: 48,
    d.MBP1Msg: 80,
    d.MBOMsg: 56,
    d.MBP10Msg: 368,
    d.OHLCVMsg: 56,
    d.StatusMsg: 40,
    d.InstrumentDefMsg: 520,
    d.ImbalanceMsg: 112,
    d.StatMsg: 80,
    d.CMBP1Msg: 80,
    d.BBOMsg: 80,
    d.CBBOMsg: 80,
    d.ErrorMsg: 320,
    d.SystemMsg: 320,
    d.SymbolMappingMsg: 176,
}


def meta(version: int = 3) -> bytes:
    return bytes(
        d.Metadata(
            dataset="GLBX.MDP3",
            start=NOW_NS,
            stype_in=None,
            stype_out=d.SType.INSTRUMENT_ID,  # type: ignore[arg-type]  # stubs type enum members as str
            schema=None,
            version=version,
        ).encode()
    )


def mbp1(instrument_id: int, length_words: int | None = None) -> bytes:
    rec = bytearray(
        bytes(
            d.MBP1Msg(
                publisher_id=1,
                instrument_id=instrument_id,
                ts_event=NOW_NS,
                price=100,
                size=1,
                action=d.Action.ADD,  # type: ignore[arg-type]  # stubs type enum members as str
                side=d.Side.BID,  # type: ignore[arg-type]  # stubs type enum members as str
                depth=0,
                ts_recv=NOW_NS,
                sequence=1,
            )
        )
    )
    if length_words is not None:
        rec[0] = length_words
        rec = rec[: length_words * 4]
    return bytes(rec)


def official_decode(stream: bytes) -> list[Any]:
    """What an official client does with the bytes (raises PanicException on a bad one)."""
    dec = d.DBNDecoder()
    dec.write(stream)
    return list(dec.decode())[1:]


def test_size_table_matches_databento_dbn():
    table = dbn.MIN_RECORD_SIZE[3]
    for cls, size in SIZES.items():
        assert cls.size_hint == size
    for rtype in (0x00, 0x01, 0xA0, 0x0A, 0x13, 0x18, 0x16):
        assert table[rtype] > 0
    assert table[0x99] == 0
    assert dbn.MIN_RECORD_SIZE[1][0x13] == d.v1.InstrumentDefMsg.size_hint
    assert dbn.MIN_RECORD_SIZE[2][0x13] == d.v2.InstrumentDefMsg.size_hint
    assert dbn.MIN_RECORD_SIZE[1][0x18] == d.v1.StatMsg.size_hint
    assert dbn.MIN_RECORD_SIZE[1][0x15] == d.v1.ErrorMsg.size_hint


def test_short_mbp1_record_would_kill_an_official_client():
    """The premise: what a subscriber's decoder does with the record we must refuse."""
    with pytest.raises(BaseException) as info:
        official_decode(meta() + mbp1(1) + mbp1(2, length_words=12))
    assert type(info.value).__name__ == "PanicException"


@pytest.mark.parametrize("uniform", [True, False])
def test_short_record_after_good_ones_keeps_them_and_ends_the_stream(uniform):
    good = [mbp1(i) for i in range(5)] if uniform else [mbp1(1), trade(2), mbp1(3)]
    bad = mbp1(9, length_words=12)
    decoder = dbn.DbnStreamDecoder()
    chunks = decoder.feed(meta() + b"".join(good) + bad + mbp1(10))
    out = b"".join(bytes(c.data) for c in chunks)
    assert out == b"".join(good)
    assert isinstance(decoder.error, DbnError)
    assert "shorter than the 80 bytes" in str(decoder.error)
    assert "0x01" in str(decoder.error)
    official_decode(meta() + out)  # what is forwarded decodes
    with pytest.raises(DbnError):
        decoder.feed(mbp1(11))


def test_chunk_of_only_short_records_raises():
    decoder = dbn.DbnStreamDecoder()
    decoder.feed(meta())
    with pytest.raises(DbnError, match="shorter than the 80 bytes"):
        decoder.feed(mbp1(1, length_words=12) * 4)
    assert decoder.error is not None


def test_short_record_split_across_reads():
    decoder = dbn.DbnStreamDecoder()
    stream = meta() + mbp1(1) + mbp1(2, length_words=14) + mbp1(3)
    got: list[bytes] = []
    with pytest.raises(DbnError):
        for i in range(0, len(stream), 7):
            got += [bytes(c.data) for c in decoder.feed(stream[i : i + 7])]
    assert b"".join(got) == mbp1(1)


@pytest.mark.parametrize("version", [1, 2])
def test_old_version_short_record_never_panics(version):
    """DBN v1/v2 records are size-checked against their own version before the upgrade,
    so databento_dbn never panics and the records before the bad one are kept."""
    good = trade(1) + trade(2)
    decoder = dbn.DbnStreamDecoder()
    chunks = decoder.feed(meta(version) + good + mbp1(3, length_words=12) + trade(4))
    assert b"".join(bytes(c.data) for c in chunks) == good
    assert isinstance(decoder.error, DbnError)
    assert f"DBN v{version}" in str(decoder.error)


def old_definition(version: int, size: int) -> bytes:
    """A zero-filled InstrumentDefMsg of DBN v1/v2 (360/400 bytes), or a short one."""
    rec = bytearray(size)
    rec[0] = size // 4
    rec[1] = 0x13
    rec[4] = 5  # instrument_id
    return bytes(rec)


@pytest.mark.parametrize(("version", "size"), [(1, 360), (2, 400)])
def test_old_version_definition_checked_against_its_own_size(version, size):
    decoder = dbn.DbnStreamDecoder()
    chunks = decoder.feed(meta(version) + old_definition(version, size))
    assert decoder.error is None
    assert [len(bytes(c.data)) for c in chunks] == [520]
    decoder = dbn.DbnStreamDecoder()
    with pytest.raises(DbnError, match=f"{size} bytes DBN v{version}"):
        decoder.feed(meta(version) + old_definition(version, 300))


RTYPES = sorted({int(r) for r in np.flatnonzero(dbn.MIN_RECORD_SIZE[3])} | {0x02, 0x99, 0xFF})


@st.composite
def hostile_records(draw: st.DrawFn) -> bytes:
    """A record header with any known or unknown rtype and any length byte, and any body."""
    rtype = draw(st.sampled_from(RTYPES))
    words = draw(st.integers(min_value=0, max_value=140))
    body = draw(st.binary(min_size=max(0, words * 4 - 2), max_size=max(0, words * 4 - 2)))
    return bytes([words, rtype]) + body


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    version=st.sampled_from([1, 2, 3]),
    records=st.lists(hostile_records(), min_size=1, max_size=8),
    cut=st.integers(min_value=1, max_value=97),
)
def test_nothing_the_decoder_returns_can_panic_a_client(version, records, cut):
    """Any byte stream: the decoder raises only DbnError, never a Rust panic, and every
    byte it returns decodes with databento_dbn as a v3 client would."""
    stream = meta(version) + b"".join(records)
    decoder = dbn.DbnStreamDecoder()
    out = bytearray()
    try:
        for i in range(0, len(stream), cut):
            for chunk in decoder.feed(stream[i : i + cut]):
                out += chunk.data
    except DbnError:
        pass
    decoded = official_decode(meta() + bytes(out))
    assert sum(len(bytes(r)) for r in decoded) == len(out)
