"""Resume checkpoints: the opt-in records that make a reconnect exact.

A session that asks for them (auth field ``lsg_checkpoints=1``, which the official clients
never send) gets, now and then, a SystemMsg with code 255 (UNSET) and the text
``lsg-checkpoint seq=<N> epoch=<E>``. It means: every record of journal chunks up to ``N``
that this session selects was sent before this record. A client that counts the data
records it got after its last checkpoint can resume with ``lsg_resume_after=N`` (and
``lsg_epoch=E``) and drop that many records of the replay: nothing missed, nothing twice.
Other sessions never see one.

``E`` names the journal (``DatasetJournal.epoch``): a journal directory replaced, or one
that starts again empty (every segment gone), numbers its chunks from 1 again, and a
position N of the old one could exist in the new one with other records behind it. A
resume whose epoch is not the journal's is refused like a position the journal never held
(``bad_resume``), so a reconnect there is a reported gap, never a silent one.

The client's side of it lives here too, free of I/O so it can be tested record by
record: ``ResumeCursor`` (the checkpoint ``seq`` P, the count ``n`` of data records handed
over after it, taking checkpoints out of what the user sees and dropping the records a
resumed stream sends again), ``Gap`` (what a resume that could not be exact reports) and
``Backoff`` (jittered exponential delays between reconnect attempts).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Final

import numpy as np

from gateway.dbn.encode import encode_system
from gateway.dbn.index import ChunkIndex, index_records
from gateway.dbn.records import GATEWAY_RTYPES, RTYPE_SYSTEM, SystemCode

__all__ = [
    "CHECKPOINT_PREFIX",
    "Backoff",
    "Gap",
    "ResumeCursor",
    "encode_checkpoint",
    "parse_checkpoint",
    "parse_checkpoint_fields",
]

CHECKPOINT_PREFIX: Final = b"lsg-checkpoint seq="
_MSG_AT: Final = 16
_CODE_AT: Final = 319


def encode_checkpoint(ts_event: int, seq: int, epoch: str = "") -> bytes:
    """The checkpoint record for journal position ``seq`` of the journal ``epoch``."""
    text = f"lsg-checkpoint seq={seq}" + (f" epoch={epoch}" if epoch else "")
    return encode_system(ts_event, text, SystemCode.UNSET)


def parse_checkpoint_fields(record: bytes | memoryview) -> tuple[int, str | None] | None:
    """(position, journal epoch or None) of a checkpoint record; None for any other."""
    if len(record) < 320 or record[1] != RTYPE_SYSTEM or record[_CODE_AT] != SystemCode.UNSET:
        return None
    text = bytes(record[_MSG_AT : _MSG_AT + 96]).split(b"\0", 1)[0]
    if not text.startswith(CHECKPOINT_PREFIX):
        return None
    digits, _, rest = text[len(CHECKPOINT_PREFIX) :].partition(b" ")
    if not digits.isdigit():
        return None
    epoch = (
        rest[len(b"epoch=") :].decode("ascii", "replace") if rest.startswith(b"epoch=") else None
    )
    return int(digits), epoch or None


def parse_checkpoint(record: bytes | memoryview) -> int | None:
    """The journal position a checkpoint record carries, or None for any other record."""
    fields = parse_checkpoint_fields(record)
    return None if fields is None else fields[0]


_GATEWAY_RTYPES: Final = np.array(sorted(GATEWAY_RTYPES), dtype=np.uint8)


@dataclass(frozen=True)
class Gap:
    """Records a resume could not recover: reported to ``on_gap`` and kept in ``gaps``.

    ``reason``: ``no_checkpoint`` (the connection dropped before the first checkpoint and
    the subscriptions had no ``start`` to replay from), ``aged_out`` (the gateway's journal
    no longer holds the position), ``unavailable`` (the gateway has no journal or
    replay is off), ``bad_resume`` (the gateway's journal never held the position: it was
    replaced). ``after_seq``: the last checkpoint (None before the first one);
    ``last_ts_event``: ts_event of the last data record handed over before the gap (None if
    there was none); ``resumed_start``: the ``start`` of the Metadata of the session that
    carried on live (the gap ends there at the latest); ``message``: the gateway's text or
    the client's explanation.
    """

    reason: str
    after_seq: int | None
    last_ts_event: int | None
    resumed_start: int | None
    message: str


class ResumeCursor:
    """Where a resuming client stands in the stream (sans-I/O).

    ``seq`` is the last checkpoint P (None before the first); ``count`` the data records
    handed to the user after it (since the session started while ``seq`` is None). After
    a reconnect that replays from P (or from the original ``start``), ``begin_resume()``
    arms ``skip``: that many data records of the new stream are ones the user already has,
    and ``feed`` drops them. A checkpoint P' met while still skipping means the user holds
    ``skip`` records beyond P', so then ``count = skip``. Gateway records (SystemMsg,
    ErrorMsg, SymbolMappingMsg) are never counted nor dropped; checkpoint records are
    always taken out.
    """

    def __init__(self) -> None:
        self.seq: int | None = None
        #: the epoch of the journal ``seq`` belongs to (None: the gateway sent none)
        self.epoch: str | None = None
        self.count = 0
        self.skip = 0
        self.last_ts_event: int | None = None
        self.checkpoints = 0
        self.dropped = 0

    def begin_resume(self) -> None:
        """A stream that repeats the ``count`` records after ``seq`` starts now."""
        self.skip = self.count

    def reset(self) -> None:
        """A stream that carries on live, with no link to what came before (a gap)."""
        self.seq = None
        self.epoch = None
        self.count = 0
        self.skip = 0

    def feed(self, index: ChunkIndex) -> ChunkIndex | None:
        """The records of ``index`` the user should see (None when none are left)."""
        if index.count == 0:
            return index
        rtset = index.rtype_set  # cached on the index, used again downstream
        if self.skip == 0 and not rtset & GATEWAY_RTYPES:
            # only data records (the usual batch): count them, nothing to take out
            self.count += index.count
            self.last_ts_event = int(index.ts_events[-1])
            return index
        rtypes = index.rtypes
        data = ~np.isin(rtypes, _GATEWAY_RTYPES)
        marks = self._checkpoints(index)
        if not marks and self.skip == 0:
            ndata = int(np.count_nonzero(data))
            if ndata:
                self.count += ndata
                last = int(np.flatnonzero(data)[-1])
                self.last_ts_event = int(index.ts_events[last])
            return index
        keep = np.ones(index.count, dtype=np.bool_)
        start = 0
        for pos, seq, epoch in [*marks, (index.count, None, None)]:
            positions = np.flatnonzero(data[start:pos]) + start
            drop = min(self.skip, len(positions))
            keep[positions[:drop]] = False
            self.skip -= drop
            self.dropped += drop
            self.count += len(positions) - drop
            if len(positions) > drop:
                self.last_ts_event = int(index.ts_events[positions[-1]])
            if seq is not None:
                keep[pos] = False
                self.seq = seq
                self.epoch = epoch
                self.count = self.skip
                self.checkpoints += 1
            start = pos + 1
        if bool(keep.all()):
            return index
        if not bool(keep.any()):
            return None
        return index_records(index.select(keep))[0]

    @staticmethod
    def _checkpoints(index: ChunkIndex) -> list[tuple[int, int, str | None]]:
        out = []
        view = index.data
        for pos in np.flatnonzero(index.rtypes == RTYPE_SYSTEM).tolist():
            off = int(index.offsets[pos])
            fields = parse_checkpoint_fields(view[off : off + int(index.lengths[pos])])
            if fields is not None:
                out.append((pos, fields[0], fields[1]))
        return out


@dataclass(frozen=True)
class Backoff:
    """Delays between reconnect attempts: ``initial_s`` doubling (``factor``) up to
    ``max_s``, each drawn uniformly from [d/2, d] so that clients cut off together do not
    come back together. Give up after ``max_attempts`` attempts or ``max_elapsed_s``
    seconds since the connection was lost (None: no such limit)."""

    initial_s: float = 0.1
    max_s: float = 5.0
    factor: float = 2.0
    max_attempts: int | None = None
    max_elapsed_s: float | None = 60.0

    def __post_init__(self) -> None:
        if not 0 < self.initial_s <= self.max_s:
            raise ValueError("backoff needs 0 < initial_s <= max_s")
        if self.factor < 1:
            raise ValueError("backoff factor must be at least 1")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError("backoff max_attempts must be at least 1")

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """The wait before attempt ``attempt`` (0 = the first retry)."""
        base = min(self.max_s, self.initial_s * self.factor ** min(attempt, 64))
        return (rng or random).uniform(base / 2, base)

    def exhausted(self, attempts: int, elapsed_s: float) -> bool:
        """Whether to give up after ``attempts`` failed attempts, ``elapsed_s`` in."""
        if self.max_attempts is not None and attempts >= self.max_attempts:
            return True
        return self.max_elapsed_s is not None and elapsed_s >= self.max_elapsed_s
