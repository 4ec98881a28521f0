"""``DbnStreamDecoder``: a DBN byte stream (file or ingest publisher) split into
the Metadata and checked whole-record chunks, v1/v2 upgraded to v3; and
``metadata_mappings``, the symbol mappings read straight from a v3 header."""

from __future__ import annotations

import struct
from typing import Any, Final, cast

import databento_dbn as dbn
import numpy as np

from gateway.dbn.index import ChunkIndex, index_records
from gateway.dbn.records import DBN_VERSION, HEADER_LEN, PRELUDE_LEN
from gateway.dbn.validate import first_invalid
from gateway.errors import DbnError

_UPGRADE_TO_V3: Any = dbn.VersionUpgradePolicy.UPGRADE_TO_V3


_FIXED_METADATA_V3: Final = 16 + 2 + 8 + 8 + 8 + 1 + 1 + 1 + 2 + 53  # to schema_def_len


def metadata_mappings(header: bytes | memoryview) -> list[tuple[str, int]] | None:
    """(raw symbol, instrument_id) of each mapping's last interval, read straight from a
    DBN v3 Metadata header (prelude included): tens of ns a mapping, where decoding them
    into Python objects through databento_dbn costs microseconds (a 40,000-symbol header
    held the event loop for 0.4 s). None when the header is not one this reads (the
    caller then uses the decoded Metadata)."""
    buf = memoryview(header)
    try:
        if bytes(buf[:3]) != b"DBN" or buf[3] != DBN_VERSION:
            return None
        body = buf[PRELUDE_LEN:]
        (cstr,) = struct.unpack_from("<H", body, 16 + 2 + 24 + 3)
        (schema_def,) = struct.unpack_from("<I", body, _FIXED_METADATA_V3)
        off = _FIXED_METADATA_V3 + 4 + schema_def
        for _ in range(3):  # symbols, partial, not_found
            (count,) = struct.unpack_from("<I", body, off)
            off += 4 + count * cstr
        (count,) = struct.unpack_from("<I", body, off)
        off += 4
        fast = _one_interval_mappings(body, off, count, cstr)
        if fast is not None:
            return fast
        out: list[tuple[str, int]] = []
        unpack_u32 = struct.Struct("<I").unpack_from
        for _ in range(count):
            raw = bytes(body[off : off + cstr])
            off += cstr
            (intervals,) = unpack_u32(body, off)
            off += 4
            target = b""
            for _ in range(intervals):
                target = bytes(body[off + 8 : off + 8 + cstr])
                off += 8 + cstr
            if off > len(body):
                return None
            symbol = raw.split(b"\0", 1)[0].decode("ascii", "replace").strip()
            iid = target.split(b"\0", 1)[0]
            if intervals and iid.isdigit():
                out.append((symbol, int(iid)))
        return out
    except (struct.error, IndexError):
        return None


def _one_interval_mappings(
    body: memoryview, off: int, count: int, cstr: int
) -> list[tuple[str, int]] | None:
    """The common layout, every mapping with exactly one interval, as one numpy view."""
    size = cstr + 4 + 8 + cstr
    if count == 0 or len(body) - off != count * size:
        return None
    rows = np.frombuffer(body, dtype=np.uint8, count=count * size, offset=off)
    rows = rows.reshape(count, size)
    if not bool((rows[:, cstr : cstr + 4].view("<u4") == 1).all()):
        return None
    raws = rows[:, :cstr].copy().view(f"S{cstr}").reshape(count)
    targets = rows[:, cstr + 12 :].copy().view(f"S{cstr}").reshape(count)
    if not bool(np.char.isdigit(targets).all()):
        return None
    ids = targets.astype(np.uint64)
    if bool((ids > 0xFFFFFFFF).any()):
        return None
    names = [r.decode("ascii", "replace").strip() for r in raws.tolist()]
    return list(zip(names, ids.tolist(), strict=True))


def _is_panic(exc: BaseException) -> bool:
    """A Rust panic inside databento_dbn surfaces as pyo3's PanicException, which derives
    from BaseException (so ``except Exception`` misses it)."""
    return type(exc).__name__ == "PanicException"


class DbnStreamDecoder:
    """Sans-I/O splitter of a DBN byte stream: prelude, Metadata, then whole-record chunks.

    ``feed(data)`` returns the Metadata once (``metadata``) and chunks of whole, valid v3
    records. Every record is checked against its rtype's size (``first_invalid``) before
    it is returned: the valid records before a bad one are returned, ``error`` is set, and
    the stream is over (every later ``feed`` raises it). When a call has no valid record
    to return, it raises ``DbnError`` at once. DBN v1/v2 streams are checked against their
    own version's sizes, then upgraded to v3 through databento_dbn (slow path, per record;
    fine for files, documented for ingest); a panic inside it is a ``DbnError`` too.
    """

    def __init__(self) -> None:
        self.metadata: dbn.Metadata | None = None
        self.mappings: list[tuple[str, int]] | None = None
        self.version = 0
        self._buffer = bytearray()
        self._upgrader: dbn.DBNDecoder | None = None
        self.records_in = 0
        self.bytes_in = 0
        #: set when bad bytes follow good records: the good ones were returned first
        self.error: DbnError | None = None

    def feed(self, data: bytes | memoryview) -> list[ChunkIndex]:
        if self.error is not None:
            raise self.error
        if self.metadata is None:
            self._buffer += data
            if not self._parse_metadata():
                return []
            data = bytes(self._buffer)
            self._buffer.clear()
        elif self._buffer:
            # Complete the partial record: one copy of the read, not two.
            data = bytes(self._buffer) + data
            self._buffer.clear()
        if not data:
            return []
        try:
            index, used = index_records(data)
        except DbnError as exc:
            raise self._fail(f"record at stream byte {self.bytes_in}: {exc}") from None
        problem: str | None = None
        if used < len(data):
            rest = memoryview(data)[used:]
            if rest[0] * 4 < HEADER_LEN:
                problem = (
                    f"record at stream byte {self.bytes_in + used} has length "
                    f"{rest[0] * 4} bytes, shorter than its header"
                )
            else:
                self._buffer += rest
        bad = first_invalid(index, self.version)
        if bad is not None:
            pos, reason = bad
            problem = f"record at stream byte {self.bytes_in + int(index.offsets[pos])}: {reason}"
            self._buffer.clear()
            index, used = index_records(index.data[: int(index.offsets[pos])])
        if problem is not None and index.count == 0:
            raise self._fail(problem)
        if self._upgrader is not None:
            chunks = self._upgrade(index)
        else:
            chunks = [index] if index.count else []
            self.records_in += index.count
        self.bytes_in += used
        if problem is not None:
            self.error = DbnError(problem)
        return chunks

    def _fail(self, problem: str) -> DbnError:
        self.error = DbnError(problem)
        self._buffer.clear()
        return self.error

    @property
    def pending(self) -> int:
        return len(self._buffer)

    def _parse_metadata(self) -> bool:
        buf = self._buffer
        if len(buf) < PRELUDE_LEN:
            if not b"DBN".startswith(bytes(buf[:3])):
                raise self._fail("stream does not start with the DBN magic bytes")
            return False
        if bytes(buf[:3]) != b"DBN":
            raise self._fail("stream does not start with the DBN magic bytes")
        version = buf[3]
        if not 1 <= version <= DBN_VERSION:
            raise self._fail(f"unsupported DBN version {version} (this gateway reads 1 to 3)")
        (length,) = struct.unpack_from("<I", buf, 4)
        if length > 64 * 1024 * 1024:
            raise self._fail(f"Metadata length {length} is implausibly large")
        if len(buf) < PRELUDE_LEN + length:
            return False
        header = bytes(buf[: PRELUDE_LEN + length])
        #: the symbol mappings of a v3 header, read without decoding (see metadata_mappings)
        self.mappings = metadata_mappings(header) if version == DBN_VERSION else None
        try:
            if version == DBN_VERSION:
                self.metadata = dbn.Metadata.decode(header)
            else:
                self._upgrader = dbn.DBNDecoder(upgrade_policy=_UPGRADE_TO_V3)
                self._upgrader.write(header)
                decoded = self._upgrader.decode()
                self.metadata = cast(dbn.Metadata, decoded[0])
        except (ValueError, RuntimeError, dbn.DBNError) as exc:
            raise self._fail(f"invalid DBN Metadata: {_one_line(exc)}") from None
        except BaseException as exc:
            if not _is_panic(exc):
                raise
            raise self._fail(f"invalid DBN Metadata: {_one_line(exc)}") from None
        if self.metadata is not None and self.metadata.ts_out:
            raise self._fail("feeds with ts_out records are not supported yet")
        self.version = version
        del buf[: PRELUDE_LEN + length]
        return True

    def _upgrade(self, index: ChunkIndex) -> list[ChunkIndex]:
        """v1/v2 records, already split and size-checked, upgraded to v3."""
        assert self._upgrader is not None
        if index.count == 0:
            return []
        try:
            self._upgrader.write(bytes(index.data))
            records = self._upgrader.decode()
            blob = b"".join(bytes(r) for r in records if not isinstance(r, dbn.Metadata))
        except (ValueError, RuntimeError, dbn.DBNError) as exc:
            raise self._fail(f"invalid DBN v{self.version} record: {_one_line(exc)}") from None
        except BaseException as exc:
            if not _is_panic(exc):
                raise
            raise self._fail(f"invalid DBN v{self.version} record: {_one_line(exc)}") from None
        if not blob:
            return []
        upgraded, _ = index_records(blob)
        bad = first_invalid(upgraded)
        if bad is not None:
            raise self._fail(f"DBN v{self.version} upgrade produced an invalid record: {bad[1]}")
        self.records_in += upgraded.count
        return [upgraded]


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
