"""What a replay's planner hands its pump, in order: ``Chunk`` (bytes as they are),
``FileRange`` (whole records of a journal file, for ``os.sendfile``), ``Retire``
(descriptors no longer needed once what precedes is written); and ``Out``, one step's
items being gathered (gateway records and copies joined into one piece, one zstd frame,
flushed before each range; consecutive ranges of one file coalesced)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from gateway.dbn import stamp_records

if TYPE_CHECKING:
    from gateway.journal import Segment

__all__ = ["Chunk", "FastRun", "FileRange", "Item", "Out", "Retire"]


@dataclass(frozen=True)
class Chunk:
    """Bytes to write as they are (records, already ts_out-stamped / zstd-framed)."""

    data: bytes | memoryview
    records: int


@dataclass(frozen=True)
class FileRange:
    """``length`` bytes of ``fd`` from ``offset``: whole records, sent with sendfile."""

    fd: int
    offset: int
    length: int
    records: int


@dataclass(frozen=True)
class Retire:
    """These descriptors are no longer needed once what precedes this item is written."""

    fds: tuple[int, ...]


Item = Chunk | FileRange | Retire


class Out:
    """One step's items: gateway records and copies gathered into one piece (one zstd
    frame), flushed before each file range."""

    def __init__(
        self, ts_out: bool, compress: Callable[[bytes], bytes] | None, now_ns: int
    ) -> None:
        self.items: list[Item] = []
        self.ts_out = ts_out
        self.compress = compress
        self.now_ns = now_ns
        self._parts: list[bytes | memoryview] = []
        self._records = 0

    def gateway(self, records: list[bytes]) -> None:
        if records:
            self._parts.append(
                stamp_records(records, self.now_ns) if self.ts_out else b"".join(records)
            )

    def data(self, data: bytes | memoryview, records: int) -> None:
        if records:
            self._parts.append(data)
            self._records += records

    def item(self, item: Item) -> None:
        self.flush()
        last = self.items[-1] if self.items else None
        if (
            isinstance(item, FileRange)
            and isinstance(last, FileRange)
            and last.fd == item.fd
            and last.offset + last.length == item.offset
        ):
            self.items[-1] = FileRange(
                last.fd, last.offset, last.length + item.length, last.records + item.records
            )
        else:
            self.items.append(item)

    def flush(self) -> None:
        if not self._parts:
            return
        data: bytes | memoryview = (
            self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)
        )
        if self.compress is not None:
            data = self.compress(bytes(data))
        self.items.append(Chunk(data, self._records))
        self._parts = []
        self._records = 0


class FastRun:
    """A run of whole, contiguous parts of one rtype file (``plan.Replay._find_run``)."""

    __slots__ = ("counts", "cursor", "end", "ends", "offset", "pos", "rtype", "segment", "seqs")

    def __init__(
        self,
        *,
        segment: Segment,
        rtype: int,
        offset: int,
        seqs: npt.NDArray[np.int64],
        ends: npt.NDArray[np.int64],
        counts: npt.NDArray[np.int64],
        end: int,
        cursor: int,
    ) -> None:
        self.segment = segment
        self.rtype = rtype
        #: file offset of the run's first part; ``ends``/``counts``: cumulative per part
        self.offset = offset
        self.seqs = seqs
        self.ends = ends
        self.counts = counts
        #: the cursor once the whole run is sent
        self.end = end
        #: parts consumed, and the replay's cursor this run continues from
        self.pos = 0
        self.cursor = cursor
