"""The native order books (gateway/books/native.py, C via cffi) against the pure-Python
reference (gateway/books/reference.py): on the real MBO samples and on hypothesis-generated
streams split into chunks at arbitrary record boundaries, the books (orders in snapshot
order, levels), the stats and the snapshots must be equal at every chunk end; the derived
trades / mbp-1 / mbp-10 records must be bytes-equal to the derive reference's and to records
built with databento_dbn's own classes; any bytes at all must never crash the engine.

The samples hold a few records of one venue each, with no shared starting book: they check
record shapes and the rules on real flags and sides, not a whole session."""

from __future__ import annotations

import random
import shutil
import struct
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import databento_dbn as d
import pytest
import zstandard
from hypothesis import given, settings, strategies as st

from gateway.books.native import (
    WANT_MBP1,
    WANT_MBP10,
    WANT_TRADES,
    Derived,
    NativeBooks,
)
from gateway.books.reference import F_LAST, F_SNAPSHOT, F_TOB, UNDEF_PRICE, Books

try:
    from gateway.books import derive_reference
except ImportError:  # pragma: no cover - DERIVE's module lands separately
    derive_reference = None  # type: ignore[assignment]

F_BAD_TS_RECV = 0x08
ALL = WANT_MBP1 | WANT_MBP10 | WANT_TRADES
DATA = Path(__file__).parents[1] / "data" / "dbn"
SAMPLES = [
    DATA / "GLBX.MDP3" / "test_data.mbo.dbn.zst",
    DATA / "IFEU.IMPACT" / "test_data.mbo.dbn.zst",
]
_MBO = struct.Struct("<BBHIQQqIBBccQiI")
# the stubs type enum members as str (and MBP1Msg's levels as a list): typed loosely here
Action: Any = d.Action
Side: Any = d.Side
ACTIONS: dict[str, Any] = {
    "A": Action.ADD,
    "C": d.Action.CANCEL,
    "M": d.Action.MODIFY,
    "R": d.Action.CLEAR,
    "T": Action.TRADE,
    "F": d.Action.FILL,
    "N": d.Action.NONE,
}
SIDES: dict[str, Any] = {"B": Side.BID, "A": Side.ASK, "N": d.Side.NONE}


def mbo(
    action: str,
    order_id: int = 0,
    price: int = 0,
    size: int = 0,
    side: str = "B",
    flags: int = F_LAST,
    instrument_id: int = 7,
    publisher_id: int = 1,
    ts: int = 1,
    sequence: int = 0,
) -> bytes:
    """A DBN v3 MboMsg (56 bytes); packed here for speed, checked against databento_dbn
    in test_record_packing_matches_databento_dbn."""
    return _MBO.pack(
        14,
        0xA0,
        publisher_id,
        instrument_id,
        ts,
        order_id,
        price,
        size,
        flags,
        0,
        action.encode(),
        side.encode(),
        ts + 5,
        -3,
        sequence,
    )


def split(data: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(data):
        n = data[pos] * 4
        out.append(data[pos : pos + n])
        pos += n
    return out


def sample_records(path: Path) -> list[bytes]:
    raw = zstandard.ZstdDecompressor().decompressobj().decompress(path.read_bytes())
    assert raw[:3] == b"DBN"
    body = raw[8 + int.from_bytes(raw[4:8], "little") :]
    return split(body)


def ref_orders(ref: Books, key: tuple[int, int]) -> list[tuple[int, str, int, int, int, int]]:
    book = ref.books.get(key)
    if book is None:
        return []
    return [(o.order_id, o.side, o.price, o.size, o.ts_event, o.sequence) for o in book.orders()]


def ref_snapshot(ref: Books, instrument_ids: Sequence[int] | None, ts_recv: int) -> bytes:
    """What a snapshot must hold, built with databento_dbn from the reference books."""
    out = []
    base = F_SNAPSHOT | F_BAD_TS_RECV
    for iid, pub in sorted(ref.books):
        if instrument_ids is not None and iid not in instrument_ids:
            continue
        orders = list(ref.books[(iid, pub)].orders())
        recs = [(ts_recv, 0, UNDEF_PRICE, 0, "R", "N", 0, 0)]
        for o in orders:  # a top-of-book order is repeated with F_TOB
            tob = F_TOB if o.tob else 0
            recs.append((o.ts_event, o.order_id, o.price, o.size, "A", o.side, o.sequence, tob))
        for i, (ts, oid, px, size, action, side, seq, tob) in enumerate(recs):
            flags = base | tob | (F_LAST if i == len(recs) - 1 else 0)
            msg = d.MBOMsg(
                pub,
                iid,
                ts,
                oid,
                px,
                size,
                ACTIONS[action],
                SIDES[side],
                ts_recv,  # type: ignore[arg-type]
                flags=flags,
                channel_id=0,
                ts_in_delta=0,
                sequence=seq,
            )
            out.append(bytes(msg))
    return b"".join(out)


def assert_same_books(native: NativeBooks, ref: Books) -> None:
    stats = native.stats()
    assert stats.books == len(ref.books)
    assert stats.orders == ref.orders_held
    assert stats.unknown_cancels == sum(b.unknown_cancels for b in ref.books.values())
    assert stats.levels == sum(len(b.bids) + len(b.asks) for b in ref.books.values())
    for key, book in ref.books.items():
        assert native.orders(*key) == ref_orders(ref, key), key
        for side in "BA":
            assert native.levels(*key, side, 1000) == book.levels(side, 1000), (key, side)


def chunks(records: list[bytes], cuts: Sequence[int]) -> Iterator[list[bytes]]:
    start = 0
    for cut in sorted({c % (len(records) + 1) for c in cuts}) + [len(records)]:
        yield records[start:cut]
        start = cut


# --- layouts ---------------------------------------------------------------------------


def test_record_packing_matches_databento_dbn() -> None:
    ours = mbo("A", 11, 100, 3, "B", F_LAST | F_TOB, 7, 2, ts=9, sequence=4)
    theirs = d.MBOMsg(
        2,
        7,
        9,
        11,
        100,
        3,
        Action.ADD,
        Side.BID,
        14,
        flags=F_LAST | F_TOB,
        channel_id=0,
        ts_in_delta=-3,
        sequence=4,
    )
    assert ours == bytes(theirs)


def test_derived_records_parse_as_databento_dbn_records() -> None:
    books = NativeBooks()
    stream = [
        mbo("A", 1, 100, 5, "B", sequence=1),
        mbo("A", 2, 99, 4, "B", sequence=2),
        mbo("A", 3, 102, 7, "A", sequence=3),
        mbo("T", 0, 102, 2, "B", sequence=4, ts=50),
    ]
    out = books.apply(b"".join(stream), ALL)
    assert (out.trades_count, out.mbp1_count, out.mbp10_count) == (1, 3, 4)
    trade = d.TradeMsg(
        1,
        7,
        50,
        102,
        2,
        Action.TRADE,
        Side.BID,
        0,
        55,
        flags=F_LAST,
        ts_in_delta=-3,
        sequence=4,
    )
    assert out.trades == bytes(trade)
    empty = (UNDEF_PRICE, UNDEF_PRICE, 0, 0, 0, 0)
    top: Any = d.BidAskPair(100, 102, 5, 7, 1, 1)
    mbp1_t = d.MBP1Msg(
        1,
        7,
        50,
        102,
        2,
        Action.TRADE,
        Side.BID,
        0,
        55,
        flags=F_LAST,
        ts_in_delta=-3,
        sequence=4,
        levels=top,
    )
    assert split(out.mbp1)[-1] == bytes(mbp1_t)
    second = d.BidAskPair(99, UNDEF_PRICE, 4, 0, 1, 0)
    mbp10_t = d.MBP10Msg(
        1,
        7,
        50,
        102,
        2,
        Action.TRADE,
        Side.BID,
        0,
        55,
        flags=F_LAST,
        ts_in_delta=-3,
        sequence=4,
        levels=[top, second] + [d.BidAskPair(*empty)] * 8,
    )
    assert split(out.mbp10)[-1] == bytes(mbp10_t)
    # the add at 99 is below the top: no mbp-1 record, an mbp-10 one at depth 1
    mbp10 = split(out.mbp10)
    assert len(split(out.mbp1)) == 3 and len(mbp10) == 4
    assert mbp10[1][31] == 1 and mbp10[1][29:30] == b"B"
    books.close()


# --- the real samples --------------------------------------------------------------------


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.parent.name)
def test_real_samples_equal_the_reference(path: Path) -> None:
    records = sample_records(path)
    assert any(r[1] == 0xA0 for r in records)
    native, ref = NativeBooks(), Books()
    rng = random.Random(3)
    deriver = derive_reference.Deriver(["trades", "mbp-1", "mbp-10"]) if derive_reference else None
    for chunk in chunks(records, [rng.randrange(len(records) + 1) for _ in range(4)]):
        out = native.apply(b"".join(chunk), ALL)
        assert out.error is None
        ref.apply_records(chunk)
        assert_same_books(native, ref)
        if deriver is not None:
            assert_derived_equal(out, chunk, deriver)
    mbo_count = sum(1 for r in records if r[1] == 0xA0 and len(r) == 56)
    assert native.stats().records_applied == mbo_count
    assert native.snapshot(None, 123) == (
        ref_snapshot(ref, None, 123),
        len(split(ref_snapshot(ref, None, 123))),
    )


# --- generated streams ---------------------------------------------------------------------

record_st = st.tuples(
    st.sampled_from("AAAAACCCMMMRTFN"),
    st.integers(0, 8),  # order id (0: what top-of-book venues send)
    st.one_of(st.integers(97, 103), st.just(UNDEF_PRICE)),
    st.integers(0, 9),  # size
    st.sampled_from("BBAAN"),
    st.sampled_from([F_LAST, F_LAST, F_LAST, 0, F_LAST | F_TOB]),
    st.sampled_from([(7, 1), (7, 1), (7, 2), (8, 1)]),  # (instrument, publisher)
)
# a top-of-book venue's quote: an F_TOB add per side, both order_id 0 (F_LAST on the second);
# UNDEF_PRICE (size 0): no depth on that side
_tob_px = st.one_of(st.integers(97, 103), st.just(UNDEF_PRICE))
tob_pair_st = st.tuples(
    _tob_px, st.integers(0, 9), _tob_px, st.integers(0, 9), st.sampled_from([(7, 1), (8, 1)])
).map(
    lambda q: [
        ("A", 0, q[0], 0 if q[0] == UNDEF_PRICE else q[1], "B", F_TOB, q[4]),
        ("A", 0, q[2], 0 if q[2] == UNDEF_PRICE else q[3], "A", F_TOB | F_LAST, q[4]),
    ]
)
# quotes mixed with regular records (ids 0..8 colliding with the quotes' 0)
tob_stream_st = st.lists(st.one_of(tob_pair_st, record_st.map(lambda r: [r])), max_size=60).map(
    lambda parts: [r for part in parts for r in part]
)


def build(stream: list[tuple[str, int, int, int, str, int, tuple[int, int]]]) -> list[bytes]:
    return [
        mbo(a, oid, px, size, side, flags, iid, pub, ts=10 * i, sequence=i)
        for i, (a, oid, px, size, side, flags, (iid, pub)) in enumerate(stream)
    ]


def assert_derived_equal(out: Derived, chunk: list[bytes], deriver: object | None = None) -> None:
    assert derive_reference is not None
    want = (
        deriver if deriver is not None else derive_reference.Deriver(["trades", "mbp-1", "mbp-10"])
    )
    exp: dict[str, list[bytes]] = {"trades": [], "mbp-1": [], "mbp-10": []}
    for rec in chunk:
        for schema, recs in want.feed(rec).items():  # type: ignore[attr-defined]
            exp[schema].extend(recs)
    assert split(out.trades) == exp["trades"]
    assert split(out.mbp1) == exp["mbp-1"]
    assert split(out.mbp10) == exp["mbp-10"]
    assert (out.trades_count, out.mbp1_count, out.mbp10_count) == tuple(
        len(exp[s]) for s in ("trades", "mbp-1", "mbp-10")
    )


@settings(max_examples=150, deadline=None)
@given(
    st.lists(record_st, max_size=150),
    st.lists(st.integers(0, 200), max_size=6),
    st.sampled_from([0, ALL, WANT_MBP1, WANT_MBP10 | WANT_TRADES]),
)
def test_generated_streams_equal_the_reference(stream, cuts, want) -> None:
    check_stream(stream, cuts, want)


@settings(max_examples=100, deadline=None)
@given(
    tob_stream_st,
    st.lists(st.integers(0, 200), max_size=4),
    st.sampled_from([0, ALL]),
)
def test_top_of_book_streams_equal_the_reference(stream, cuts, want) -> None:
    check_stream(stream, cuts, want)


def check_stream(
    stream: list[tuple[str, int, int, int, str, int, tuple[int, int]]],
    cuts: list[int],
    want: int,
) -> None:
    records = build(stream)
    native, ref = NativeBooks(), Books()
    deriver = derive_reference.Deriver(["trades", "mbp-1", "mbp-10"]) if derive_reference else None
    for chunk in chunks(records, cuts):
        out = native.apply(b"".join(chunk), want)
        assert out.error is None and out.consumed == 56 * len(chunk)
        ref.apply_records(chunk)
        assert_same_books(native, ref)
        if deriver is not None and want == ALL:
            assert_derived_equal(out, chunk, deriver)
        elif deriver is not None:
            for rec in chunk:
                deriver.feed(rec)
        if not want & WANT_MBP1:
            assert out.mbp1 == b"" and out.mbp1_count == 0
        if not want & WANT_TRADES:
            assert out.trades == b""
    for ids in (None, [7], [8, 9], []):
        data, count = native.snapshot(ids, 999)
        assert data == ref_snapshot(ref, ids, 999)
        assert count * 56 == len(data)
        # a snapshot rebuilds the same books
        again, rebuilt = NativeBooks(), Books()
        again.apply(data)
        rebuilt.apply_records(split(data))
        for key, book in rebuilt.books.items():
            assert again.orders(*key) == ref_orders(ref, key)
            for side in "BA":
                assert again.levels(*key, side, 100) == ref.books[key].levels(side, 100)
                assert book.levels(side, 100) == ref.books[key].levels(side, 100)
    native.close()


def test_mbp_side_and_depth_rules() -> None:
    books = NativeBooks()
    out = books.apply(
        b"".join(
            [
                mbo("A", 1, 100, 5, "B"),
                mbo("A", 2, 101, 5, "A"),
                mbo("A", 3, 99, 1, "B"),
            ]
        ),
        ALL,
    )
    assert [r[31] for r in split(out.mbp10)] == [0, 0, 1]
    # a modify moving an order across sides changes both tops: side N
    out = books.apply(mbo("M", 1, 101, 5, "A"), ALL)
    (rec,) = split(out.mbp1)
    assert rec[29:30] == b"N" and rec[31] == 0
    # R: side N, depth 0; R on an empty book: no record
    out = books.apply(mbo("R", side="N") + mbo("R", side="N"), ALL)
    assert out.mbp1_count == 1 and split(out.mbp1)[0][29:30] == b"N"
    # F_TOB adds replace one side each; UNDEF empties it
    out = books.apply(
        mbo("A", 9, 100, 3, "B", F_LAST | F_TOB) + mbo("A", 0, UNDEF_PRICE, 0, "A", F_LAST | F_TOB),
        ALL,
    )
    # a top-of-book level counts no order (its size counts)
    assert out.mbp1_count == 1 and books.levels(7, 1, "B", 5) == [(100, 3, 0)]
    assert books.levels(7, 1, "A", 5) == []
    bid = struct.unpack_from("<qqIIII", split(out.mbp1)[0], 48)
    assert bid == (100, UNDEF_PRICE, 3, 0, 0, 0)


def test_top_of_book_rules() -> None:
    books = NativeBooks()
    # a regular order with id 0 on the bid side; then a quote: F_TOB adds, both id 0
    out = books.apply(
        mbo("A", 0, 99, 4, "B")
        + mbo("A", 0, 101, 7, "A", F_TOB)
        + mbo("A", 0, UNDEF_PRICE, 0, "B", F_TOB)
        + mbo("A", 0, 100, 5, "B", F_TOB | F_LAST),
        ALL,
    )
    # the ask-side TOB add left the bid order 0 alone; the bid-side one replaced the bids
    assert books.levels(7, 1, "B", 5) == [(100, 5, 0)]
    assert books.levels(7, 1, "A", 5) == [(101, 7, 0)]
    counts = [struct.unpack_from("<qqIIII", r, 48)[4:] for r in split(out.mbp1)]
    assert counts == [(1, 0), (1, 0), (0, 0), (0, 0)]
    # a cancel naming 0 finds no order (counted); a modify naming it is an add beside it
    books.apply(mbo("C", 0, 100, 5, "B") + mbo("M", 0, 100, 2, "B") + mbo("A", 3, 100, 1, "B"))
    assert books.stats().unknown_cancels == 1
    assert books.levels(7, 1, "B", 5) == [(100, 8, 2)]
    assert [o[:4] for o in books.orders(7, 1)] == [
        (0, "B", 100, 5),
        (0, "B", 100, 2),
        (3, "B", 100, 1),
        (0, "A", 101, 7),
    ]
    # a better regular bid: the snapshot still lists the side's TOB order first, flagged
    books.apply(mbo("A", 4, 102, 1, "B"))
    data, count = books.snapshot(None, 5)
    recs = [(r[38:40], r[16], int.from_bytes(r[24:32], "little"), r[36]) for r in split(data)]
    snap = F_SNAPSHOT | F_BAD_TS_RECV
    assert recs == [
        (b"RN", 0, UNDEF_PRICE, snap),
        (b"AB", 0, 100, snap | F_TOB),
        (b"AB", 4, 102, snap),
        (b"AB", 0, 100, snap),
        (b"AB", 3, 100, snap),
        (b"AA", 0, 101, snap | F_TOB | F_LAST),
    ]
    assert count == 6 and books.stats().orders == 5
    # replayed under the same rules, the snapshot rebuilds the same book
    again = NativeBooks()
    again.apply(data)
    assert again.orders(7, 1) == books.orders(7, 1)
    for side in "BA":
        assert again.levels(7, 1, side, 5) == books.levels(7, 1, side, 5)


# --- bad input -----------------------------------------------------------------------------


def test_truncated_and_zero_length_records_stop_the_walk() -> None:
    good = mbo("A", 1, 100, 5) + mbo("A", 2, 101, 5, "A")
    books = NativeBooks()
    out = books.apply(good + mbo("A", 3, 99, 1)[:40], ALL)
    assert out.consumed == 112 and out.error is not None and "past the end" in out.error
    assert books.stats().orders == 2
    out = books.apply(b"\x00" * 64)
    assert out.consumed == 0 and "shorter" in (out.error or "")
    out = books.apply(b"\x03" + b"\x00" * 11)  # 12 bytes: under a header
    assert out.error is not None
    out = books.apply(b"")
    assert out.error is None and out.consumed == 0
    assert books.stats().orders == 2


def test_other_records_are_skipped() -> None:
    books = NativeBooks()
    other = bytes(d.TradeMsg(1, 7, 1, 100, 1, Action.TRADE, Side.BID, 0, 1))
    mbo_with_ts_out = mbo("A", 5, 100, 1)[:0] + bytes([16]) + mbo("A", 5, 100, 1)[1:] + bytes(8)
    out = books.apply(other + mbo_with_ts_out + mbo("A", 1, 100, 5), ALL)
    assert out.error is None and out.consumed == 48 + 64 + 56
    assert books.stats().records_applied == 1 and books.orders(7, 1)[0][0] == 1


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600), st.sampled_from([0, ALL]))
def test_any_bytes_never_crash(data: bytes, want: int) -> None:
    books = NativeBooks()
    out = books.apply(data, want)
    assert 0 <= out.consumed <= len(data)
    assert (out.error is None) == (out.consumed == len(data))
    books.snapshot(None, 1)
    books.stats()


@settings(max_examples=100, deadline=None)
@given(
    st.lists(record_st, min_size=1, max_size=40),
    st.integers(0, 2000),
    st.binary(min_size=1, max_size=8),
)
def test_corrupted_streams_never_crash(stream, at, junk) -> None:
    data = bytearray(b"".join(build(stream)))
    at %= len(data)
    data[at : at + len(junk)] = junk
    books = NativeBooks()
    for i in range(0, len(data), 97):
        books.apply(bytes(data[i : i + 97]), ALL)
    books.apply(bytes(data), ALL)
    data_snap, count = books.snapshot(None, 5)
    assert len(data_snap) == 56 * count


def test_closed_engine_refuses() -> None:
    books = NativeBooks()
    books.close()
    books.close()
    with pytest.raises(ValueError):
        books.apply(b"")
    with pytest.raises(ValueError):
        NativeBooks().apply(b"", 8)


def test_memory_accounting_grows_and_orders_free() -> None:
    books = NativeBooks()
    base = books.stats().memory_bytes
    adds = (mbo("A", i, 100 + i % 300, 1, "B" if i % 2 else "A") for i in range(1, 5001))
    books.apply(b"".join(adds))
    s = books.stats()
    assert (s.orders, s.levels) == (5000, 300) and s.memory_bytes > base + 5000 * 48
    books.apply(mbo("R", side="N"))
    after = books.stats()
    assert (after.orders, after.levels) == (0, 0)
    assert after.memory_bytes < s.memory_bytes  # the emptied sides' level arrays shrank
    assert books.snapshot(None, 1)[1] == 1


def test_bench_order_flow_equals_the_reference() -> None:
    # the bench's realistic stream (bench/books.py): many instruments, 64 KiB-ish chunks
    from bench.books import chunked, generate

    data = generate(12_000, instruments=20, seed=5)
    native, ref = NativeBooks(), Books()
    deriver = derive_reference.Deriver(["trades", "mbp-1", "mbp-10"]) if derive_reference else None
    for chunk in chunked(data, 16 * 1024):
        out = native.apply(chunk, ALL)
        records = split(chunk)
        ref.apply_records(records)
        if deriver is not None:
            assert_derived_equal(out, records, deriver)
    assert_same_books(native, ref)
    assert native.stats().orders > 100
    assert native.snapshot([1000, 1003], 7)[0] == ref_snapshot(ref, [1000, 1003], 7)


NATIVE = Path(__file__).parents[2] / "gateway" / "books" / "_native"
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"]


def test_the_c_engine_under_address_and_undefined_behaviour_sanitizers(tmp_path: Path) -> None:
    """books.c with gateway/books/_native/fuzz_main.c under ASan+UBSan: small books with every
    action (ids and prices colliding), then big ones (hash, pool and level arrays growing)."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("no gcc")
    probe = tmp_path / "probe.c"
    probe.write_text("int main(void) { return 0; }\n")
    if subprocess.run([gcc, *SANITIZE, str(probe), "-o", str(tmp_path / "probe")],
                      capture_output=True).returncode != 0:  # fmt: skip
        pytest.skip("gcc cannot link the address/undefined sanitizers here")
    exe = tmp_path / "nb_fuzz"
    build = subprocess.run(
        [gcc, "-O1", "-g", "-std=c11", "-Wall", "-Wextra", "-Werror", *SANITIZE,
         str(NATIVE / "books.c"), str(NATIVE / "fuzz_main.c"), "-o", str(exe)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr
    for args in (["150000", "1"], ["150000", "2"], ["40000", "3", "50000", "3000"]):
        run = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=60)
        assert run.returncode == 0 and run.stdout.startswith("ok"), (args, run.stdout, run.stderr)
