"""The benchmark-only per-session zstd mode's fan-out: no shared frame, the raw variant
for every member; the production ``FanOut`` has no switch for it."""

from __future__ import annotations

from gateway import dbn
from gateway.fanout import FanOut, OutputSpec, Payload, make_selection
from gateway.zstd_baseline import PerSessionZstdFanOut

from .conftest import NOW_NS, trade

TRADES = 0x00


class Recorder:
    def __init__(self) -> None:
        self.got: list[tuple[Payload, int]] = []

    def deliver(self, data: Payload, records: int) -> None:
        self.got.append((data, records))


def test_zstd_members_get_the_raw_variant_and_no_frame_is_built() -> None:
    chunk = b"".join(trade(1 + i % 3, NOW_NS + i, sequence=i) for i in range(12))
    index, used = dbn.index_records(chunk)
    assert used == len(chunk)
    fo = PerSessionZstdFanOut()
    plain, zst, zst_ts = Recorder(), Recorder(), Recorder()
    everything = make_selection({TRADES: None})
    fo.place(plain, OutputSpec(everything))
    fo.place(zst, OutputSpec(everything, zstd=True))
    fo.place(zst_ts, OutputSpec(everything, ts_out=True, zstd=True))
    fo.publish(index)
    # the zstd member is handed what a plain member of its selection is: the chunk itself
    assert zst.got == [(index.data, 12)] and plain.got[0][0] is zst.got[0][0]
    assert bytes(zst_ts.got[0][0]) != chunk and zst_ts.got[0][1] == 12  # stamped, not framed
    assert fo.frames_built == fo.frames_written == 0 and fo.bytes_compressed_in == 0
    assert fo.records_out == 36 and fo.member_count == 3
    fo.remove(zst)
    assert fo.member_count == 2


def test_the_production_fanout_has_no_per_session_switch() -> None:
    fo = FanOut()
    assert not hasattr(fo, "shared_frames")
    for method in (FanOut.publish, FanOut._variant):
        assert "shared_frames" not in method.__code__.co_names
