"""Byte-counting stream parsers: numpy over whole receive buffers, no per-record objects.

Each system delivers fixed-length frames (a record plus the system's framing) with the odd
control message in between (a DBN gateway record, a NATS ``PING``, a ZMTP command). The
fast path views the buffer as rows of one frame length, checks a few signature bytes per
row with numpy, and hands the longest run of data frames to a ``RecordSink`` as strided
views; anything else goes to a slow path that parses exactly one message.

``RecordSink`` verifies what it gets: a global sequence number must increase by one per
record, or (filtered) every instrument's sequence must, and instruments must be ones the
subscriber asked for. It also turns embedded send stamps into latency samples.
"""

from __future__ import annotations

import array
import bisect
import struct
from typing import Final

import numpy as np
import numpy.typing as npt
import zstandard

from bench.records import (
    FIRST_ID,
    INSTRUMENTS,
    OFF_INSTRUMENT,
    OFF_SEQUENCE,
    OFF_TS_RECV,
    REC_LEN,
)

__all__ = [
    "DbnParser",
    "FrameParser",
    "NatsParser",
    "ParseError",
    "RawParser",
    "RecordSink",
    "RecvClock",
    "RedisParser",
    "ZmtpParser",
    "ZstdLayer",
    "resp_parse",
]

Buffer = bytes | bytearray
U8 = npt.NDArray[np.uint8]

RTYPE_MBP1: Final = 0x01
RTYPE_ERROR: Final = 0x15
RTYPE_SYMBOL_MAPPING: Final = 0x16
RTYPE_SYSTEM: Final = 0x17
SYSTEM_HEARTBEAT: Final = 0
SYSTEM_ACK: Final = 1
SYSTEM_SLOW: Final = 2
MAX_ERRORS: Final = 5
#: at most this many records: verify in plain Python (numpy calls cost more)
SMALL: Final = 24
_U32: Final = struct.Struct("<I").unpack_from
_U64: Final = struct.Struct("<Q").unpack_from


class ParseError(Exception):
    """The stream is not what the system should send: the connection is counted as failed."""


class RecvClock:
    """When each byte of a buffer filled by several ``recv`` calls arrived: the buffer
    offset where each recv ended, and the time it returned."""

    __slots__ = ("ends", "times", "_ends", "_times")

    def __init__(self) -> None:
        self.ends: list[int] = []
        self.times: list[int] = []
        self._ends: npt.NDArray[np.int64] | None = None
        self._times: npt.NDArray[np.int64] | None = None

    def mark(self, end: int, now: int) -> None:
        self.ends.append(end)
        self.times.append(now)
        self._ends = None

    def clear(self) -> None:
        self.ends.clear()
        self.times.clear()
        self._ends = None

    def at1(self, offset: int) -> int:
        """Arrival time of the byte just before ``offset``."""
        i = bisect.bisect_left(self.ends, offset)
        return self.times[min(i, len(self.times) - 1)]

    def at(self, offsets: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        if self._ends is None:
            self._ends = np.asarray(self.ends, dtype=np.int64)
            self._times = np.asarray(self.times, dtype=np.int64)
        assert self._times is not None
        i = np.searchsorted(self._ends, offsets, side="left")
        np.minimum(i, len(self._times) - 1, out=i)
        return self._times[i]


Clock = int | RecvClock


class RecordSink:
    """Counts and verifies data records; collects latency samples."""

    def __init__(
        self,
        per_instrument: bool,
        wanted: npt.NDArray[np.bool_] | None,
        latency_every: int = 0,
    ) -> None:
        self.per_instrument = per_instrument
        self.wanted = wanted
        self.latency_every = latency_every
        self.records = 0
        self.gaps = 0
        self.unexpected = 0
        self.first_ns = 0
        self.last_ns = 0
        self.next_seq = 0
        # One buffer, two views: array.array for the plain-Python path, numpy for the rest.
        # Only per-instrument sinks use it: an 8 KB buffer for every connection was 6 % of
        # the subscribers' samples in a 1,000-session connect storm (bench.connect_profile).
        self._next_list = array.array("q", bytes(8 * INSTRUMENTS) if per_instrument else b"")
        self.next_inst = np.frombuffer(self._next_list, dtype=np.int64) if per_instrument else None
        self._wanted_list = wanted.tolist() if wanted is not None else None
        self.latency: list[npt.NDArray[np.int64]] = []
        self.notes: list[str] = []

    def _note(self, text: str) -> None:
        if len(self.notes) < MAX_ERRORS:
            self.notes.append(text)

    def take(self, buf: Buffer, offset: int, count: int, stride: int, clock: Clock) -> None:
        """``count`` records, the first at ``offset`` in ``buf``, ``stride`` bytes apart;
        ``clock`` says when each byte of ``buf`` was received."""
        end = offset + (count - 1) * stride + REC_LEN
        if isinstance(clock, int):
            first = last = clock
        else:
            first, last = clock.at1(offset + REC_LEN), clock.at1(end)
        if self.first_ns == 0:
            self.first_ns = first
        self.last_ns = last
        self.records += count
        if count <= SMALL:
            self._take_small(buf, offset, count, stride, clock)
            return
        seq = np.ndarray(
            (count,), dtype="<u4", buffer=buf, offset=offset + OFF_SEQUENCE, strides=(stride,)
        )
        if self.next_inst is None:
            self._check_global(seq)
        else:
            ids = np.ndarray(
                (count,), dtype="<u4", buffer=buf, offset=offset + OFF_INSTRUMENT, strides=(stride,)
            )
            self._check_instruments(ids, seq)
        if self.latency_every:
            ts = np.ndarray(
                (count,), dtype="<u8", buffer=buf, offset=offset + OFF_TS_RECV, strides=(stride,)
            )
            sel = ts != 0
            if self.latency_every > 1:
                sel &= (seq % self.latency_every) == 0
            if sel.any():
                stamps = ts[sel].astype(np.int64)
                if isinstance(clock, int):
                    self.latency.append(clock - stamps)
                else:
                    ends = offset + REC_LEN + stride * np.flatnonzero(sel)
                    self.latency.append(clock.at(ends) - stamps)

    def _take_small(self, buf: Buffer, offset: int, count: int, stride: int, clock: Clock) -> None:
        """The same checks in plain Python: cheaper than numpy calls for a few records."""
        offsets = range(offset, offset + count * stride, stride)
        seqs = [_U32(buf, o + OFF_SEQUENCE)[0] for o in offsets]
        if self.next_inst is None:
            nxt = self.next_seq
            for s in seqs:
                if s != nxt:
                    self.gaps += 1
                    self._note(f"sequence break: expected {nxt}, got {s}")
                nxt = (s + 1) & 0xFFFFFFFF
            self.next_seq = nxt
        else:
            self._check_small([_U32(buf, o + OFF_INSTRUMENT)[0] for o in offsets], seqs)
        if self.latency_every:
            every = self.latency_every
            at = (lambda _o: clock) if isinstance(clock, int) else clock.at1
            lat = [
                at(o + REC_LEN) - ts
                for o, s in zip(offsets, seqs, strict=True)
                if (ts := _U64(buf, o + OFF_TS_RECV)[0]) and s % every == 0
            ]
            if lat:
                self.latency.append(np.array(lat, dtype=np.int64))

    def _check_small(self, ids: list[int], seqs: list[int]) -> None:
        nxt = self._next_list
        wanted = self._wanted_list
        for iid, s in zip(ids, seqs, strict=True):
            i = iid - FIRST_ID
            if not 0 <= i < INSTRUMENTS or (wanted is not None and not wanted[i]):
                self.unexpected += 1
                self._note(f"a record of instrument {iid}, not subscribed to")
                continue
            if s != nxt[i]:
                self.gaps += 1
                self._note(f"instrument {iid}: expected sequence {nxt[i]}, got {s}")
            nxt[i] = s + 1

    def _check_global(self, seq: npt.NDArray[np.uint32]) -> None:
        first = int(seq[0])
        ok = first == self.next_seq
        if len(seq) > 1 and ok:
            ok = bool((np.diff(seq) == 1).all())
        if not ok:
            breaks = int(first != self.next_seq)
            if len(seq) > 1:
                breaks += int(np.count_nonzero(np.diff(seq) != 1))
            self.gaps += breaks
            self._note(
                f"sequence break: expected {self.next_seq}, got {first} "
                f"({breaks} break(s) in {len(seq)} records)"
            )
        self.next_seq = (int(seq[-1]) + 1) & 0xFFFFFFFF

    def _check_instruments(self, ids: npt.NDArray[np.uint32], seq: npt.NDArray[np.uint32]) -> None:
        nxt = self.next_inst
        assert nxt is not None
        idx = ids.astype(np.int64) - FIRST_ID
        valid = (idx >= 0) & (idx < INSTRUMENTS)
        if self.wanted is not None:
            valid[valid] &= self.wanted[idx[valid]]
        if not valid.all():
            bad = int(np.count_nonzero(~valid))
            self.unexpected += bad
            self._note(f"{bad} record(s) of instruments not subscribed to")
            idx = idx[valid]
            seq = seq[valid]
        count = len(idx)
        if count == 0:
            return
        order = np.argsort(idx, kind="stable")
        si = idx[order]
        ss = seq[order].astype(np.int64)
        change = np.empty(count, dtype=np.bool_)
        change[0] = True
        np.not_equal(si[1:], si[:-1], out=change[1:])
        starts = np.flatnonzero(change)
        bounds = np.append(starts, count)
        rank = np.arange(count) - np.repeat(starts, np.diff(bounds))
        bad_rows = ss != nxt[si] + rank
        if bad_rows.any():
            breaks = int(np.count_nonzero(bad_rows))
            self.gaps += breaks
            j = int(np.argmax(bad_rows))
            self._note(
                f"instrument {int(si[j]) + FIRST_ID}: expected sequence "
                f"{int(nxt[si[j]] + rank[j])}, got {int(ss[j])}"
            )
        ends = bounds[1:] - 1
        nxt[si[ends]] = ss[ends] + 1


class FrameParser:
    """Fixed-length frames of ``frame_len`` bytes whose record starts at ``payload_off``.

    ``checks`` are (offset in frame, byte) pairs every data frame has; a row that fails
    them goes to ``slow``. Subclasses learn the frame length from the first data frame
    when it depends on names (subjects, channels) chosen per connection.
    """

    def __init__(self, sink: RecordSink, frame_len: int = 0, payload_off: int = 0) -> None:
        self.sink = sink
        self.frame_len = frame_len
        self.payload_off = payload_off
        self.checks: list[tuple[int, int]] = []
        #: bytes the parser wants sent back (NATS PONG)
        self.reply = b""
        self.errors: list[str] = []
        self.control = 0

    def error(self, text: str) -> None:
        if len(self.errors) < MAX_ERRORS:
            self.errors.append(text)

    def set_frame(self, frame_len: int, payload_off: int) -> None:
        self.frame_len = frame_len
        self.payload_off = payload_off
        self.checks = self.frame_checks()

    def frame_checks(self) -> list[tuple[int, int]]:
        p = self.payload_off
        return [(p, 20), (p + 1, RTYPE_MBP1)]

    def parse(self, buf: Buffer, arr: U8, pos: int, end: int, now: Clock) -> int:
        """Consume whole messages in ``buf[pos:end]``; return where the partial tail starts."""
        sink = self.sink
        while pos < end:
            frame = self.frame_len
            if frame:
                avail = (end - pos) // frame
                if avail:
                    take = self._valid_rows(buf, arr, pos, avail)
                    if take:
                        sink.take(buf, pos + self.payload_off, take, frame, now)
                        pos += take * frame
                        if pos >= end:
                            break
                        # else: a control message, or a shorter one in the tail (PING)
            used = self.slow(buf, pos, end, now)
            if used == 0:
                break
            pos += used
        return pos

    def _valid_rows(self, buf: Buffer, arr: U8, pos: int, avail: int) -> int:
        """How many frames from ``pos`` on are data frames (all checks hold)."""
        frame = self.frame_len
        checks = self.checks
        if avail <= 4:
            for r in range(avail):
                base = pos + r * frame
                for off, val in checks:
                    if buf[base + off] != val:
                        return r
            return avail
        for off, val in checks:  # a control message fails on its first row: no numpy then
            if buf[pos + off] != val:
                return 0
        rows = arr[pos : pos + avail * frame].reshape(avail, frame)
        ok: npt.NDArray[np.bool_] | None = None
        for off, val in checks:
            hit = rows[:, off] == val
            ok = hit if ok is None else ok & hit
        assert ok is not None
        return avail if bool(ok.all()) else int(np.argmin(ok))

    def slow(self, buf: Buffer, pos: int, end: int, now: Clock) -> int:
        raise NotImplementedError


class DbnParser(FrameParser):
    """The gateway's stream: Metadata, then 80-byte MBP-1 records with gateway records
    (SystemMsg acks and heartbeats, SymbolMappingMsg, ErrorMsg) in between."""

    def __init__(self, sink: RecordSink) -> None:
        super().__init__(sink, 80, 0)
        self.checks = self.frame_checks()
        self.metadata = False
        self.acks = 0
        self.heartbeats = 0
        self.mappings = 0
        self.slow_warnings = 0
        self.system_other = 0
        self.gateway_errors: list[str] = []

    def slow(self, buf: Buffer, pos: int, end: int, now: Clock) -> int:
        if not self.metadata:
            if end - pos < 8:
                return 0
            if bytes(buf[pos : pos + 3]) != b"DBN":
                raise ParseError("stream does not start with a DBN Metadata header")
            length = int.from_bytes(buf[pos + 4 : pos + 8], "little")
            if end - pos < 8 + length:
                return 0
            self.metadata = True
            return 8 + length
        size = buf[pos] * 4
        if size < 16:
            raise ParseError(f"DBN record length {size} < 16")
        if end - pos < size:
            return 0
        rtype = buf[pos + 1]
        self.control += 1
        if rtype == RTYPE_MBP1 and size == 80:
            self.sink.take(buf, pos, 1, 80, now)
            self.control -= 1
        elif rtype == RTYPE_SYSTEM:
            code = buf[pos + size - 1]
            if code == SYSTEM_HEARTBEAT:
                self.heartbeats += 1
            elif code == SYSTEM_ACK:
                self.acks += 1
            elif code == SYSTEM_SLOW:
                self.slow_warnings += 1
            else:
                self.system_other += 1
        elif rtype == RTYPE_SYMBOL_MAPPING:
            self.mappings += 1
        elif rtype == RTYPE_ERROR:
            text = bytes(buf[pos + 16 : pos + size - 2]).split(b"\0", 1)[0]
            if len(self.gateway_errors) < MAX_ERRORS:
                self.gateway_errors.append(text.decode("ascii", "replace"))
        else:
            raise ParseError(f"unexpected DBN record rtype 0x{rtype:02x} length {size}")
        return size


class RawParser(FrameParser):
    """The raw limit: nothing but back-to-back 80-byte records."""

    def __init__(self, sink: RecordSink) -> None:
        super().__init__(sink, 80, 0)
        self.checks = self.frame_checks()

    def slow(self, buf: Buffer, pos: int, end: int, now: Clock) -> int:
        if end - pos < 80:
            return 0
        raise ParseError(f"raw stream: not a record at byte {pos}")


class NatsParser(FrameParser):
    """``MSG <subject> <sid> 80\\r\\n<record>\\r\\n`` frames; PING answered with PONG."""

    def frame_checks(self) -> list[tuple[int, int]]:
        f = self.frame_len
        return [
            (0, ord("M")),
            (1, ord("S")),
            (2, ord("G")),
            (f - 2, 13),
            (f - 1, 10),
            *super().frame_checks(),
        ]

    def slow(self, buf: Buffer, pos: int, end: int, now: Clock) -> int:
        nl = buf.find(b"\r\n", pos, end)
        if nl < 0:
            if end - pos > 4096:
                raise ParseError("NATS: control line longer than 4096 bytes")
            return 0
        line = bytes(buf[pos:nl])
        head = nl + 2 - pos
        if line.startswith(b"MSG "):
            size = int(line.rsplit(b" ", 1)[1])
            total = head + size + 2
            if end - pos < total:
                return 0
            if size == 80 and buf[pos + head] == 20:
                self.sink.take(buf, pos + head, 1, 80, now)
                if not self.frame_len:
                    self.set_frame(total, head)
            else:
                self.error(f"NATS: unexpected payload of {size} bytes")
            return total
        self.control += 1
        if line == b"PING":
            self.reply += b"PONG\r\n"
        elif line.startswith(b"-ERR"):
            self.error("NATS: " + line.decode("ascii", "replace"))
        return head


def resp_parse(buf: Buffer, pos: int, end: int) -> tuple[object, int] | None:
    """One RESP2 value at ``pos``: (value, end position) or None if incomplete."""
    nl = buf.find(b"\r\n", pos, end)
    if nl < 0:
        return None
    kind = buf[pos]
    text = bytes(buf[pos + 1 : nl])
    after = nl + 2
    if kind == ord("$"):
        size = int(text)
        if size < 0:
            return None, after
        if end - after < size + 2:
            return None
        return bytes(buf[after : after + size]), after + size + 2
    if kind == ord("*"):
        items: list[object] = []
        for _ in range(int(text)):
            got = resp_parse(buf, after, end)
            if got is None:
                return None
            items.append(got[0])
            after = got[1]
        return items, after
    if kind == ord(":"):
        return int(text), after
    if kind == ord("-"):
        return ParseError(text.decode("ascii", "replace")), after
    return text.decode("ascii", "replace"), after


class RedisParser(FrameParser):
    """RESP2 pub/sub pushes: ``*3 $7 message $n <channel> $80 <record>``."""

    def __init__(self, sink: RecordSink) -> None:
        super().__init__(sink)
        self.subscribed = 0

    def frame_checks(self) -> list[tuple[int, int]]:
        f = self.frame_len
        return [
            (0, ord("*")),
            (1, ord("3")),
            (5, ord("7")),
            (8, ord("m")),
            (f - 2, 13),
            (f - 1, 10),
            *super().frame_checks(),
        ]

    def slow(self, buf: Buffer, pos: int, end: int, now: Clock) -> int:
        got = resp_parse(buf, pos, end)
        if got is None:
            return 0
        value, after = got
        total = after - pos
        if isinstance(value, list) and len(value) == 3 and value[0] == b"message":
            payload = value[2]
            if isinstance(payload, bytes) and len(payload) == 80:
                self.sink.take(buf, after - 82, 1, 80, now)
                if not self.frame_len:
                    self.set_frame(total, total - 82)
            else:
                self.error("Redis: unexpected message payload")
        elif isinstance(value, list) and value and value[0] == b"subscribe":
            self.subscribed += 1
            self.control += 1
        elif isinstance(value, ParseError):
            self.error(f"Redis: {value}")
        else:
            self.control += 1
        return total


class ZmtpParser(FrameParser):
    """ZMTP 3 frames after the handshake: ``00 50 <record>`` (final, short, 80 bytes)."""

    def __init__(self, sink: RecordSink) -> None:
        super().__init__(sink, 82, 2)
        self.checks = self.frame_checks()

    def frame_checks(self) -> list[tuple[int, int]]:
        return [(0, 0), (1, 80), *super().frame_checks()]

    def slow(self, buf: Buffer, pos: int, end: int, now: Clock) -> int:
        got = zmtp_frame(buf, pos, end)
        if got is None:
            return 0
        flags, start, size = got
        if flags & 0x04:
            self.control += 1
        elif size == 80 and not flags & 0x01:
            self.sink.take(buf, start, 1, 80, now)
        else:
            self.error(f"ZMTP: unexpected frame flags={flags} size={size}")
        return start + size - pos


def zmtp_frame(buf: Buffer, pos: int, end: int) -> tuple[int, int, int] | None:
    """(flags, body start, body size) of the ZMTP frame at ``pos``, None if incomplete."""
    if end - pos < 2:
        return None
    flags = buf[pos]
    if flags & 0x02:
        if end - pos < 9:
            return None
        size = int.from_bytes(buf[pos + 1 : pos + 9], "big")
        start = pos + 9
    else:
        size = buf[pos + 1]
        start = pos + 2
    if end - start < size:
        return None
    return flags, start, size


class ZstdLayer:
    """The gateway's compressed stream: independent zstd frames back to back."""

    def __init__(self) -> None:
        self._dctx = zstandard.ZstdDecompressor()
        self._obj: zstandard.ZstdDecompressionObj | None = None
        self.frames = 0
        self.wire_bytes = 0
        self.plain_bytes = 0

    def feed(self, data: Buffer | memoryview) -> bytes:
        self.wire_bytes += len(data)
        out: list[bytes] = []
        while data:
            if self._obj is None:
                self._obj = self._dctx.decompressobj()
            piece = self._obj.decompress(data)
            if piece:
                out.append(piece)
            if not self._obj.eof:
                break
            data = self._obj.unused_data
            self._obj = None
            self.frames += 1
        plain = b"".join(out)
        self.plain_bytes += len(plain)
        return plain
