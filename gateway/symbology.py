"""Symbology of one dataset: raw symbol <-> instrument_id, and where a feed learns it.

A feed learns mappings from its source's Metadata header (``mappings_in_metadata``), and
from the SymbolMappingMsg and InstrumentDefMsg records inside its chunks
(``mappings_in_chunk``); gateway-only records (System/Error/SymbolMapping) are then taken out
of the data (``without_gateway_records``), since every session gets its own.

``SymbolDirectory`` holds the current mapping both ways and an append-only log of every
change, which a reader follows with a cursor: an entry is current while ``latest`` still
points at it. Nothing here knows about sessions, sockets or the event loop.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from gateway import dbn
from gateway.dbn import GATEWAY_RTYPES, RTYPE_DEF, RTYPE_SYMBOL_MAPPING, ChunkIndex

__all__ = [
    "SYMBOLOGY_RTYPES",
    "SymbolDirectory",
    "mappings_in_chunk",
    "mappings_in_metadata",
    "without_gateway_records",
]

#: rtypes that carry symbology (and so may teach the directory something)
SYMBOLOGY_RTYPES = frozenset(GATEWAY_RTYPES | {RTYPE_DEF})
_SYMBOLOGY_ARRAY = np.array(sorted(SYMBOLOGY_RTYPES), dtype=np.uint8)
_STRIP_ARRAY = np.array(sorted(GATEWAY_RTYPES), dtype=np.uint8)


class SymbolDirectory:
    """raw_symbol <-> instrument_id for one dataset, as learnt from the feed.

    ``log`` lists every mapping learnt that was new or changed, in order; ``latest[symbol]``
    is the position of the symbol's current entry (a remapped symbol's older entries stay
    in the log, no longer current).
    """

    def __init__(self) -> None:
        self.by_symbol: dict[str, int] = {}
        self.by_id: dict[int, str] = {}
        self.log: list[tuple[str, int]] = []
        self.latest: dict[str, int] = {}

    def learn(self, symbol: str, instrument_id: int) -> bool:
        """Record a mapping (``symbol`` stripped); True if it is new or changed."""
        symbol = symbol.strip()
        if not symbol or self.by_symbol.get(symbol) == instrument_id:
            return False
        old = self.by_symbol.get(symbol)
        if old is not None and self.by_id.get(old) == symbol:
            del self.by_id[old]
        self.by_symbol[symbol] = instrument_id
        self.by_id[instrument_id] = symbol
        self.latest[symbol] = len(self.log)
        self.log.append((symbol, instrument_id))
        return True

    def learn_many(self, pairs: Iterable[tuple[str, int]]) -> list[tuple[str, int]]:
        """Record mappings in order; the ones that were new or changed (symbols stripped)."""
        changed: list[tuple[str, int]] = []
        for symbol, iid in pairs:
            if self.learn(symbol, iid):
                changed.append(self.log[-1])
        return changed

    def __len__(self) -> int:
        return len(self.by_symbol)


def mappings_in_chunk(index: ChunkIndex) -> list[tuple[str, int]]:
    """(raw symbol, instrument_id) of every InstrumentDefMsg and SymbolMappingMsg in the
    chunk, in record order (a SymbolMappingMsg gives its output symbol)."""
    hits = np.flatnonzero(np.isin(index.rtypes, _SYMBOLOGY_ARRAY))
    learned: list[tuple[str, int]] = []
    data = index.data
    for i in hits.tolist():
        off = int(index.offsets[i])
        rec = data[off : off + int(index.lengths[i])]
        rtype = int(index.rtypes[i])
        iid = int(index.instrument_ids[i])
        if rtype == RTYPE_DEF:
            symbol = dbn.symbol_from_definition(rec)
            if symbol:
                learned.append((symbol, iid))
        elif rtype == RTYPE_SYMBOL_MAPPING:
            _, out_symbol = dbn.symbols_from_mapping(rec)
            if out_symbol:
                learned.append((out_symbol, iid))
    return learned


def without_gateway_records(index: ChunkIndex) -> ChunkIndex:
    """The chunk without its System/Error/SymbolMapping records (``index`` itself when it
    has none)."""
    strip = np.isin(index.rtypes, _STRIP_ARRAY)
    if not strip.any():
        return index
    kept = index.select(~strip)
    new_index, _ = dbn.index_records(kept)
    return new_index


def mappings_in_metadata(metadata: object) -> list[tuple[str, int]]:
    """(raw symbol, instrument_id) from a decoded Metadata's ``mappings``: each symbol's
    last interval, when it maps to a numeric instrument id."""
    decoded = getattr(metadata, "mappings", None) or {}
    learned: list[tuple[str, int]] = []
    for symbol, intervals in decoded.items():
        if not intervals:
            continue
        target = str(intervals[-1].get("symbol", ""))
        if target.isdigit():
            learned.append((str(symbol), int(target)))
    return learned
