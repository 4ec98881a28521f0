"""Record validation: the smallest valid size of each rtype per DBN version and
``first_invalid``, the vectorised check every feed chunk passes before anyone sees it."""

from __future__ import annotations

import functools
from typing import Final

import numpy as np
import numpy.typing as npt

from gateway.dbn.index import ChunkIndex
from gateway.dbn.records import (
    DBN_VERSION,
    RTYPE_DEF,
    RTYPE_ERROR,
    RTYPE_STATUS,
    RTYPE_SYMBOL_MAPPING,
    RTYPE_SYSTEM,
)

#: The smallest valid size in bytes of each rtype's record, per DBN version. A record
#: shorter than its rtype's struct makes every official client panic on it ("Malformed
#: ... record"), so a feed record is checked against this before anyone sees it; longer
#: records are allowed (later versions append fields; ts_out adds 8 bytes). v1 and v2
#: differ from v3 in InstrumentDefMsg, StatMsg and the gateway records. 0x11 is the
#: deprecated OHLCV rtype, read as an OHLCVMsg.
_V3_SIZES: Final = {
    0x00: 48,  # trades
    0x01: 80,  # mbp-1 / tbbo
    0x0A: 368,  # mbp-10
    0x11: 56,
    RTYPE_STATUS: 40,
    RTYPE_DEF: 520,
    0x14: 112,  # imbalance
    RTYPE_ERROR: 320,
    RTYPE_SYMBOL_MAPPING: 176,
    RTYPE_SYSTEM: 320,
    0x18: 80,  # statistics
    0x20: 56,
    0x21: 56,
    0x22: 56,
    0x23: 56,
    0x24: 56,  # ohlcv-*
    0xA0: 56,  # mbo
    0xB1: 80,  # cmbp-1
    0xC0: 80,
    0xC1: 80,
    0xC2: 80,
    0xC3: 80,
    0xC4: 80,  # cbbo, tcbbo, bbo
}
_OLD_SIZES: Final = {
    1: {RTYPE_DEF: 360, 0x18: 64, RTYPE_ERROR: 80, RTYPE_SYMBOL_MAPPING: 80, RTYPE_SYSTEM: 80},
    2: {RTYPE_DEF: 400, 0x18: 64},
}


def _size_table(version: int) -> npt.NDArray[np.int64]:
    """rtype -> minimum record size in bytes (0: an rtype this version does not have)."""
    table = np.zeros(256, dtype=np.int64)
    for rtype, size in {**_V3_SIZES, **_OLD_SIZES.get(version, {})}.items():
        table[rtype] = size
    return table


MIN_RECORD_SIZE: Final = {version: _size_table(version) for version in (1, 2, 3)}


def first_invalid(index: ChunkIndex, version: int = DBN_VERSION) -> tuple[int, str] | None:
    """The position of the first record of ``index`` whose rtype is unknown to DBN
    ``version`` or whose length is shorter than its rtype's struct, with the reason; None
    when every record is valid. Vectorised: a uniform chunk costs one table lookup per
    distinct rtype (the rtype set is cached on the index and reused by the fan-out)."""
    if index.count == 0:
        return None
    table = MIN_RECORD_SIZE[version]
    if index.record_len and _uniform_ok(index.rtype_set, index.record_len, version):
        return None
    need = table[index.rtypes]
    bad = np.flatnonzero((need == 0) | (index.lengths < need))
    if bad.size == 0:
        return None
    i = int(bad[0])
    rtype = int(index.rtypes[i])
    if need[i] == 0:
        return i, f"unknown rtype 0x{rtype:02X}"
    return i, (
        f"rtype 0x{rtype:02X} record of {int(index.lengths[i])} bytes, shorter than "
        f"the {int(need[i])} bytes DBN v{version} requires"
    )


@functools.lru_cache(maxsize=1024)
def _uniform_ok(rtypes: frozenset[int], record_len: int, version: int) -> bool:
    """Every record of these rtypes may be ``record_len`` bytes long (cached: real feeds
    repeat a handful of (rtype set, length) pairs)."""
    table = MIN_RECORD_SIZE[version]
    return all(0 < table[r] <= record_len for r in rtypes)
