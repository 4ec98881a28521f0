"""Fan-out (``gateway/fanout.py``; docs/ARCHITECTURE.md): one variant per distinct output
spec, the same object for every member of a group."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import zstandard

from gateway import dbn, fanout as fanout_mod
from gateway.fanout import FanOut, OutputSpec, Payload, make_selection

from .conftest import NOW_NS, decode, mbo, ohlcv, reference_select, split_records, trade

STAMP = 1_800_000_000_000_000_000
TRADES = 0x00
MBO = 0xA0
OHLCV_1S = 0x20


class Recorder:
    """A Subscriber that keeps every payload object it was handed."""

    def __init__(self, name: str = "") -> None:
        self.name = name
        self.got: list[tuple[Payload, int]] = []

    def deliver(self, data: Payload, records: int) -> None:
        self.got.append((data, records))

    @property
    def data(self) -> list[bytes]:
        return [bytes(x) for x, _ in self.got]

    def __repr__(self) -> str:
        return f"Recorder({self.name})"


def trades_chunk(n: int = 30, ids: tuple[int, ...] = (1, 2, 3, 4, 5)) -> list[bytes]:
    return [trade(ids[i % len(ids)], NOW_NS + i, sequence=i) for i in range(n)]


def mixed_chunk() -> list[bytes]:
    out = []
    for i in range(24):
        iid = 1 + i % 4
        out.append((trade, mbo, ohlcv)[i % 3](iid, NOW_NS + i))
    return out


def index_of(recs: list[bytes]) -> dbn.ChunkIndex:
    index, used = dbn.index_records(b"".join(recs))
    assert used == sum(map(len, recs))
    return index


def wanted(recs: list[bytes], sel: dict[int, set[int] | None]) -> list[bytes]:
    out = []
    for r in recs:
        rtype, iid = r[1], struct.unpack_from("<I", r, 4)[0]
        if rtype in sel and ((ids := sel[rtype]) is None or iid in ids):
            out.append(r)
    return out


def new_fanout() -> FanOut:
    return FanOut(clock_ns=lambda: STAMP)


def spec(sel: dict[int, set[int] | None], ts_out: bool = False, zstd: bool = False):
    return OutputSpec(make_selection(sel), ts_out=ts_out, zstd=zstd)


def unstamp(data: bytes) -> list[bytes]:
    out = []
    for rec in split_records(data):
        assert struct.unpack("<Q", rec[-8:])[0] == STAMP
        out.append(bytes([rec[0] - 2]) + rec[1:-8])
    return out


# --- selections ----------------------------------------------------------------------------


def test_make_selection_drops_empty_id_sets():
    assert make_selection({TRADES: set(), MBO: None, OHLCV_1S: {3, 1}}) == frozenset(
        {(MBO, None), (OHLCV_1S, frozenset({1, 3}))}
    )
    assert make_selection({}) == frozenset()


def test_all_selection_gets_the_chunk_object_itself():
    fo = new_fanout()
    a, b = Recorder("a"), Recorder("b")
    fo.place(a, spec({TRADES: None}))
    fo.place(b, spec({TRADES: None, MBO: None}))
    index = index_of(trades_chunk())
    fo.publish(index)
    assert len(a.got) == len(b.got) == 1
    assert a.got[0][0] is index.data
    assert b.got[0][0] is index.data
    assert a.got[0][1] == b.got[0][1] == 30


def test_all_selection_of_every_rtype_in_a_mixed_chunk_is_zero_copy():
    fo = new_fanout()
    a = Recorder()
    fo.place(a, spec({TRADES: None, MBO: None, OHLCV_1S: None}))
    index = index_of(mixed_chunk())
    fo.publish(index)
    assert a.got == [(index.data, 24)]


def test_filter_that_matches_everything_is_zero_copy():
    fo = new_fanout()
    a = Recorder()
    fo.place(a, spec({TRADES: {1, 2, 3, 4, 5, 99}}))
    index = index_of(trades_chunk())
    fo.publish(index)
    assert a.got[0][0] is index.data


@pytest.mark.parametrize(
    "sel",
    [
        {TRADES: {2, 4}},
        {TRADES: {4}},
        {MBO: None},
        {TRADES: None, MBO: {3}},
        {OHLCV_1S: {1, 2}, MBO: {2, 4}},
        {TRADES: {1}, MBO: {1}, OHLCV_1S: {1}},
    ],
)
def test_filtered_group_gets_matching_records_in_order(sel):
    recs = mixed_chunk()
    fo = new_fanout()
    a, b = Recorder("a"), Recorder("b")
    fo.place(a, spec(sel))
    fo.place(b, spec(sel))
    assert len(fo.groups) == 1
    fo.publish(index_of(recs))
    expected = wanted(recs, sel)
    assert expected and len(expected) < len(recs)
    assert a.data == [b"".join(expected)]
    assert a.got[0][1] == len(expected)
    assert a.got[0][0] is b.got[0][0]  # one object for the whole group


def test_filtered_uniform_chunk_matches_reference_mask():
    recs = trades_chunk(200, ids=tuple(range(1, 41)))
    rng = np.random.default_rng(3)
    fo = new_fanout()
    members = {}
    for k in range(8):
        ids = {int(i) for i in rng.choice(np.arange(1, 41), size=k + 1, replace=False)}
        members[k] = (Recorder(str(k)), ids)
        fo.place(members[k][0], spec({TRADES: ids}))
    fo.publish(index_of(recs))
    for member, ids in members.values():
        mask = [struct.unpack_from("<I", r, 4)[0] in ids for r in recs]
        assert member.data == [reference_select(recs, mask)]


def test_no_matching_records_no_delivery():
    fo = new_fanout()
    a, b = Recorder(), Recorder()
    fo.place(a, spec({TRADES: {77}}))
    fo.place(b, spec({MBO: None}))
    fo.publish(index_of(trades_chunk()))
    assert a.got == [] and b.got == []
    assert fo.records_out == 0


def test_empty_index_is_not_published():
    fo = new_fanout()
    a = Recorder()
    fo.place(a, spec({TRADES: None}))
    index, _ = dbn.index_records(b"")
    fo.publish(index)
    assert a.got == []


# --- ts_out and zstd -----------------------------------------------------------------------


@pytest.mark.parametrize("sel", [{TRADES: None}, {TRADES: {1, 3}}])
def test_ts_out_groups_get_stamped_copies(sel):
    recs = trades_chunk()
    index = index_of(recs)
    fo = new_fanout()
    plain, a, b = Recorder(), Recorder(), Recorder()
    fo.place(plain, spec(sel))
    fo.place(a, spec(sel, ts_out=True))
    fo.place(b, spec(sel, ts_out=True))
    fo.publish(index)
    expected = wanted(recs, sel)
    assert a.got[0][0] is b.got[0][0]
    assert a.got[0][0] is not index.data
    assert a.got[0][1] == len(expected)
    assert unstamp(a.data[0]) == expected
    decoded = decode(a.data[0], ts_out=True)
    assert [r.ts_out for r in decoded] == [STAMP] * len(expected)
    assert plain.data == [b"".join(expected)]  # the plain group is not stamped
    assert bytes(index.data) == b"".join(recs)


@pytest.mark.parametrize("ts_out", [False, True])
@pytest.mark.parametrize("sel", [{TRADES: None, MBO: None, OHLCV_1S: None}, {MBO: {2, 4}}])
def test_zstd_groups_share_one_frame(sel, ts_out):
    recs = mixed_chunk()
    fo = new_fanout()
    a, b, c = Recorder(), Recorder(), Recorder()
    for m in (a, b, c):
        fo.place(m, spec(sel, ts_out=ts_out, zstd=True))
    fo.publish(index_of(recs))
    frame = a.got[0][0]
    assert b.got[0][0] is frame and c.got[0][0] is frame
    assert bytes(frame[:4]) == b"\x28\xb5\x2f\xfd"
    plain = zstandard.ZstdDecompressor().decompress(bytes(frame))
    expected = wanted(recs, sel)
    if ts_out:
        assert unstamp(plain) == expected
    else:
        assert plain == b"".join(expected)
    assert a.got[0][1] == len(expected)
    assert fo.frames_built == 1
    assert fo.frames_written == 3


def test_frames_concatenate_into_one_decodable_stream():
    fo = new_fanout()
    a = Recorder()
    fo.place(a, spec({TRADES: {2}}, zstd=True))
    chunks = [trades_chunk(10), trades_chunk(7), trades_chunk(12)]
    for recs in chunks:
        fo.publish(index_of(recs))
    stream = b"".join(a.data)
    reader = zstandard.ZstdDecompressor().stream_reader(stream, read_across_frames=True)
    plain = reader.read()
    assert plain == b"".join(b"".join(wanted(recs, {TRADES: {2}})) for recs in chunks)


def test_same_selection_shares_the_gather(monkeypatch):
    sel = {TRADES: {1, 2}, MBO: {3}}
    recs = mixed_chunk()
    index = index_of(recs)
    selects = []
    real_select = index.select

    def counting_select(mask):
        selects.append(int(mask.sum()))
        return real_select(mask)

    index.select = counting_select  # type: ignore[method-assign]
    stamps = []
    real_stamp = fanout_mod.stamp_ts_out

    def counting_stamp(*args):
        stamps.append(args)
        return real_stamp(*args)

    monkeypatch.setattr(fanout_mod, "stamp_ts_out", counting_stamp)
    fo = new_fanout()
    members = {}
    for ts_out in (False, True):
        for zstd in (False, True):
            members[ts_out, zstd] = m1, m2 = Recorder(), Recorder()
            fo.place(m1, spec(sel, ts_out, zstd))
            fo.place(m2, spec(sel, ts_out, zstd))
    assert len(fo.groups) == 4
    fo.publish(index)
    assert len(selects) == 1  # one gather for the four groups
    assert len(stamps) == 1  # one stamped copy for both ts_out groups
    assert fo.frames_built == 2  # one frame per ts_out value
    assert sum(g.builds for g in fo.groups.values()) == 4
    expected = wanted(recs, sel)
    assert members[False, False][0].data == [b"".join(expected)]
    assert unstamp(members[True, False][0].data[0]) == expected
    assert members[True, True][0].got[0][0] is members[True, True][1].got[0][0]
    assert members[True, False][0].got[0][0] is not members[False, False][0].got[0][0]
    # a second chunk builds its own variants
    fo.publish(index_of(mixed_chunk()))
    assert fo.frames_built == 4


def test_counters():
    recs = trades_chunk(20)
    fo = new_fanout()
    a, b, c = Recorder(), Recorder(), Recorder()
    fo.place(a, spec({TRADES: None}))
    fo.place(b, spec({TRADES: None}))
    fo.place(c, spec({TRADES: {1}}))
    fo.publish(index_of(recs))
    n1 = len(wanted(recs, {TRADES: {1}}))
    assert fo.records_out == 20 * 2 + n1
    # (bytes out are counted per session by the adapter: FanOut.bytes_out is gone)
    assert sum(len(piece) for m in (a, b, c) for piece in m.data) == 48 * (20 * 2 + n1)
    assert fo.member_count == 3
    assert sorted(g.writes for g in fo.groups.values()) == [1, 2]


# --- membership ----------------------------------------------------------------------------


def test_place_moves_members_and_empty_groups_disappear():
    fo = new_fanout()
    a, b = Recorder("a"), Recorder("b")
    s1, s2 = spec({TRADES: {1}}), spec({TRADES: {2}})
    fo.place(a, s1)
    fo.place(b, s1)
    assert set(fo.groups) == {s1}
    assert list(fo.groups[s1].members) == [a, b]
    fo.place(a, s2)
    assert set(fo.groups) == {s1, s2}
    assert list(fo.groups[s1].members) == [b]
    assert list(fo.groups[s2].members) == [a]
    assert fo.spec_of(a) == s2
    fo.place(b, s2)
    assert set(fo.groups) == {s2}
    assert fo.member_count == 2
    recs = trades_chunk(10)
    fo.publish(index_of(recs))
    assert a.data == b.data == [b"".join(wanted(recs, {TRADES: {2}}))]


def test_equal_specs_built_separately_share_a_group():
    fo = new_fanout()
    a, b = Recorder(), Recorder()
    fo.place(a, OutputSpec(make_selection({TRADES: {1, 2}, MBO: None}), True, False))
    fo.place(b, OutputSpec(make_selection({MBO: None, TRADES: {2, 1}}), True, False))
    assert len(fo.groups) == 1


def test_place_twice_is_idempotent():
    fo = new_fanout()
    a = Recorder()
    fo.place(a, spec({TRADES: None}))
    fo.place(a, spec({TRADES: None}))
    fo.publish(index_of(trades_chunk(5)))
    assert len(a.got) == 1
    assert fo.member_count == 1


def test_remove_and_empty_selection():
    fo = new_fanout()
    a, b = Recorder(), Recorder()
    fo.place(a, spec({TRADES: None}))
    fo.place(b, spec({TRADES: {1}}))
    fo.remove(b)
    assert len(fo.groups) == 1 and fo.spec_of(b) is None
    fo.place(a, spec({TRADES: set()}))  # nothing wanted: out of every group
    assert fo.groups == {} and fo.member_count == 0
    fo.remove(a)  # harmless
    fo.publish(index_of(trades_chunk(5)))
    assert a.got == [] and b.got == []


def test_member_leaving_during_delivery_does_not_disturb_others():
    fo = new_fanout()
    s = spec({TRADES: None})

    class Leaver(Recorder):
        def deliver(self, data, records):
            super().deliver(data, records)
            fo.remove(self)

    a, b, c = Recorder("a"), Leaver("b"), Recorder("c")
    for m in (a, b, c):
        fo.place(m, s)
    fo.publish(index_of(trades_chunk(5)))
    assert len(a.got) == len(b.got) == len(c.got) == 1
    fo.publish(index_of(trades_chunk(5)))
    assert len(a.got) == len(c.got) == 2 and len(b.got) == 1


class _FakeTransport:
    def __init__(self) -> None:
        self.writes: list[object] = []

    def write(self, data: object) -> None:
        self.writes.append(data)

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return False


def test_the_same_frame_object_reaches_every_session_transport():
    """Through the real session adapters: one frame object, written to every socket."""
    from gateway.auth import Authenticator
    from gateway.metrics import Metrics
    from gateway.server import ClientConnection, ServerState

    state = ServerState(version="t", authenticator=Authenticator([]), feeds={}, metrics=Metrics())
    fo = new_fanout()
    conns = []
    for _ in range(3):
        conn = ClientConnection(state)
        conn.transport = _FakeTransport()  # type: ignore[assignment]
        conn.zstd = True
        fo.place(conn, spec({TRADES: None}, zstd=True))
        conns.append(conn)
    fo.publish(index_of(trades_chunk(20)))
    first = conns[0].transport.writes[0]
    assert all(c.transport.writes == [first] for c in conns)
    assert all(c.transport.writes[0] is first for c in conns)
    assert zstandard.ZstdDecompressor().decompress(first) == b"".join(trades_chunk(20))


@pytest.mark.parametrize("seed", range(12))
def test_bulk_split_of_filter_selections_matches_the_per_group_path(seed, monkeypatch):
    """Many filter-only groups are served by one vectorised split; every member must get
    exactly what the per-group path gives it (same bytes, same counts, stamps and frames)."""
    rng = np.random.default_rng(seed)
    ids = list(range(1, 40))
    recs = [trade(int(rng.choice(ids)), sequence=k) for k in range(int(rng.integers(1, 300)))]
    specs = []
    for _ in range(int(rng.integers(4, 12))):
        chosen = {int(x) for x in rng.choice(ids, size=int(rng.integers(1, 8)), replace=False)}
        specs.append(
            spec(
                {TRADES: chosen, MBO: {1, 2}} if rng.random() < 0.2 else {TRADES: chosen},
                ts_out=bool(rng.random() < 0.3),
                zstd=bool(rng.random() < 0.3),
            )
        )
    specs.append(spec({TRADES: None}))  # a whole-chunk group beside them

    def run(bulk_min: int) -> list[list[tuple[bytes, int]]]:
        monkeypatch.setattr(fanout_mod, "_BULK_MIN_SELECTIONS", bulk_min)
        fo = new_fanout()
        members = [Recorder() for _ in specs]
        for m, sp in zip(members, specs, strict=True):
            fo.place(m, sp)
        fo.publish(index_of(recs))
        out = []
        for m in members:
            got = []
            for data, n in m.got:
                raw = bytes(data)
                if raw[:4] == b"\x28\xb5\x2f\xfd":
                    raw = zstandard.ZstdDecompressor().decompress(raw)
                got.append((raw, n))
            out.append(got)
        return out

    bulk, per_group = run(1), run(10**9)
    for sp, a, b in zip(specs, bulk, per_group, strict=True):
        if sp.ts_out:  # stamps differ by send time: compare the records without them
            a = [(unstamp(x), n) for x, n in a]
            b = [(unstamp(x), n) for x, n in b]
        assert a == b
