"""The replay bench's stream check, on streams built here: it must see every break, foreign
instrument, finished replay and ErrorMsg, wherever the receive buffers cut the records."""

from __future__ import annotations

import numpy as np

from bench.records import FIRST_ID, MBP1_DTYPE
from bench.replay import StreamCheck
from gateway.dbn import ErrorCode, SystemCode, encode_error, encode_system


def _mbp(seqs: list[int], iid: int = FIRST_ID) -> bytes:
    recs = np.zeros(len(seqs), dtype=MBP1_DTYPE)
    recs["length"] = 20
    recs["rtype"] = 0x01
    recs["instrument_id"] = iid
    recs["sequence"] = seqs
    return recs.tobytes()


def _feed(check: StreamCheck, stream: bytes, cut: int) -> int:
    """Feed ``stream`` in pieces of ``cut`` bytes as a reader would; bytes left unread."""
    buf = bytearray(len(stream))
    arr = np.frombuffer(buf, dtype=np.uint8)
    fill = pos = 0
    for off in range(0, len(stream), cut):
        piece = stream[off : off + cut]
        buf[fill : fill + len(piece)] = piece
        fill += len(piece)
        pos = check.walk(arr, pos, fill)
    return fill - pos


def test_a_clean_replay_is_counted_whole_at_any_cut() -> None:
    done = encode_system(1, "Finished mbp-1 replay", SystemCode.REPLAY_COMPLETED)
    stream = _mbp(list(range(0, 500))) + done + encode_system(2, "Heartbeat", SystemCode.HEARTBEAT)
    for cut in (1, 7, 80, 333, 4096):
        check = StreamCheck(seq_from=0)
        assert _feed(check, stream, cut) == 0
        assert check.summary() == {
            "records": 500,
            "first_run": 500,
            "breaks": 0,
            "foreign": 0,
            "finished": 1,
            "errors": [],
        }


def test_breaks_foreign_records_and_errors_are_seen() -> None:
    stream = (
        _mbp([5, 6, 7])
        + _mbp([9, 10])  # 8 is missing
        + _mbp([11], iid=FIRST_ID + 1)  # not subscribed
        + encode_error(3, "replay limit reached", ErrorCode.CONNECTION_LIMIT_EXCEEDED)
        + _mbp([11, 12])  # 11 twice
    )
    check = StreamCheck(seq_from=5, instruments=(FIRST_ID,))
    assert _feed(check, stream, 100) == 0
    s = check.summary()
    assert s["records"] == 8 and s["first_run"] == 3 and s["breaks"] == 2
    assert s["foreign"] == 1 and s["finished"] == 0
    assert s["errors"] == ["replay limit reached"]
