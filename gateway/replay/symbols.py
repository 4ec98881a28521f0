"""The symbology of one replay: what a replaying session is told, and what it selects.

It mirrors what the subscription index sends live (gateway/subscriptions.py), but at the
journal's point in time instead of the directory's: as of the replay's start, an
ALL_SYMBOLS subscription gets a SymbolMappingMsg for every mapping of its stype, named raw
symbols get theirs (the unresolved ones in coalesced SYMBOL_RESOLUTION_FAILED ErrorMsgs),
named instrument ids get theirs when known (and select the id either way). Every mapping
change the journal recorded later is applied where it happened (before its chunk): the
sessions that follow the symbol are told, and the selections that name it move.

Each (stype, symbol) is announced once per instrument it maps to; ``announced`` is handed
to the live subscription index at the hand-over so that nothing is announced twice. Plain
data and pure functions: no I/O (the clock is passed in).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from gateway import dbn
from gateway.control import ALL_SYMBOLS
from gateway.dbn import STYPE_INSTRUMENT_ID, STYPE_RAW_SYMBOL
from gateway.interest import resolution_errors

__all__ = ["ReplaySub", "ReplaySymbols"]


@dataclass
class ReplaySub:
    """One subscription of a replaying session, as the planner needs it."""

    schema: str
    #: the rtype its schema is carried as (negative: never carried by this feed)
    rtype: int
    stype: int
    symbols: tuple[str, ...]
    all_symbols: bool
    #: chunks with seq > begin are replayed for it
    begin: int
    #: the filter: records with filter ts >= start (None: every record of those chunks)
    start: int | None
    #: the instruments selected now (None: every one)
    ids: npt.NDArray[np.uint32] | None = None
    raw: frozenset[str] = field(default_factory=frozenset)
    iids: frozenset[int] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        named = [s for s in self.symbols if s != ALL_SYMBOLS]
        if self.stype == STYPE_RAW_SYMBOL:
            self.raw = frozenset(named)
        else:
            self.iids = frozenset(int(s) for s in named if s.isdigit())


class ReplaySymbols:
    """Mappings as of a point of the journal, moved forward change by change."""

    def __init__(self, mappings: Mapping[str, int], subs: list[ReplaySub], *, now_ns: int) -> None:
        # What ``_learn`` of each mapping in order would leave, in two bulk passes.
        self.by_symbol: dict[str, int] = dict(mappings)
        self.by_id: dict[int, str] = {iid: symbol for symbol, iid in self.by_symbol.items()}
        self.subs = subs
        self.now_ns = now_ns
        #: (stype, stype_in symbol) -> the instrument announced for it
        self.announced: dict[tuple[int, str], int] = {}
        self.all_stypes = {s.stype for s in subs if s.all_symbols}
        self.named_raw: dict[str, list[ReplaySub]] = {}
        self.named_iid: dict[int, list[ReplaySub]] = {}
        for sub in subs:
            for symbol in sub.raw:
                self.named_raw.setdefault(symbol, []).append(sub)
            for iid in sub.iids:
                self.named_iid.setdefault(iid, []).append(sub)
        for sub in subs:
            self._select(sub)

    # --- as of the start ------------------------------------------------------------------

    def opening(self, sub: ReplaySub) -> list[bytes]:
        """The records that answer ``sub`` as of the start (after its ack), as live would:
        its mappings, then its unresolved symbols."""
        return list(self.opening_iter(sub))

    def opening_iter(self, sub: ReplaySub) -> Iterator[bytes]:
        """``opening``, one record at a time (the planner writes it in slices: 100,000
        mappings cost about half a second to encode)."""
        out: list[bytes] = []
        if sub.all_symbols:
            for symbol, iid in list(self.by_symbol.items()):
                self._announce(sub.stype, symbol, iid, out)
                if out:
                    yield out.pop()
        unresolved: list[str] = []
        for symbol in sub.symbols:
            if symbol == ALL_SYMBOLS:
                continue
            if sub.stype == STYPE_RAW_SYMBOL:
                found = self.by_symbol.get(symbol)
                if found is None:
                    unresolved.append(symbol)
                elif sub.stype not in self.all_stypes:
                    self._announce(sub.stype, symbol, found, out)
            elif symbol.isdigit():
                known = self.by_id.get(int(symbol))
                if known is not None and sub.stype not in self.all_stypes:
                    self._announce(sub.stype, known, int(symbol), out)
            if out:
                yield out.pop()
        if unresolved:
            yield from resolution_errors(self.now_ns, unresolved)

    # --- later changes --------------------------------------------------------------------

    def apply(self, changes: Iterable[tuple[str, int]]) -> tuple[list[bytes], list[ReplaySub]]:
        """Apply mapping changes in order: the SymbolMappingMsgs to send before the chunk
        they precede, and the subscriptions whose selection moved (``ids`` updated)."""
        out: list[bytes] = []
        moved: dict[int, ReplaySub] = {}
        for symbol, iid in changes:
            if not self._learn(symbol, iid):
                continue
            named = self.named_raw.get(symbol)
            if named or STYPE_RAW_SYMBOL in self.all_stypes:
                self._announce(STYPE_RAW_SYMBOL, symbol, iid, out)
            for sub in named or ():
                moved[id(sub)] = sub
            if STYPE_INSTRUMENT_ID in self.all_stypes or iid in self.named_iid:
                self._announce(STYPE_INSTRUMENT_ID, symbol, iid, out)
        for sub in moved.values():
            self._select(sub)
        return out, list(moved.values())

    # --- internals ------------------------------------------------------------------------

    def _learn(self, symbol: str, iid: int) -> bool:
        old = self.by_symbol.get(symbol)
        if old == iid:
            return False
        if old is not None and self.by_id.get(old) == symbol:
            del self.by_id[old]
        self.by_symbol[symbol] = iid
        self.by_id[iid] = symbol
        return True

    def _announce(self, stype: int, raw: str, iid: int, out: list[bytes]) -> None:
        key = raw if stype == STYPE_RAW_SYMBOL else str(iid)
        if self.announced.get((stype, key)) == iid:
            return
        self.announced[(stype, key)] = iid
        now = self.now_ns
        out.append(dbn.encode_symbol_mapping(now, iid, stype, key, raw, now))

    def _select(self, sub: ReplaySub) -> None:
        if sub.all_symbols:
            sub.ids = None
            return
        ids = set(sub.iids)
        for symbol in sub.raw:
            iid = self.by_symbol.get(symbol)
            if iid is not None:
                ids.add(iid)
        sub.ids = np.array(sorted(ids), dtype=np.uint32)
