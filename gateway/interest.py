"""One streaming session's interest in a dataset: its subscriptions resolved against the
symbol directory, the selection they make, and the work still owed to it.

The work is a queue of jobs, each measured in units so that the subscription index
(gateway/subscriptions.py) can run it in bounded slices: records to write (an ack,
coalesced resolution errors), named symbols to resolve, the directory's log to announce
to an ALL_SYMBOLS subscription, an ALL_SYMBOLS subscription to activate, a symbol learnt
later to announce, instruments a parent or continuous symbol resolved to (gateway/
smart_symbols.py) to map. Plain data and pure functions: no I/O, no clock.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from gateway import dbn
from gateway.dbn import STYPE_INSTRUMENT_ID, STYPE_RAW_SYMBOL, ErrorCode
from gateway.smart_symbols import STYPE_CONTINUOUS, STYPE_PARENT, SmartSymbol

__all__ = [
    "Activate",
    "Announce",
    "CatchUp",
    "Emit",
    "Interest",
    "Job",
    "Resolve",
    "SmartMap",
    "SubscriptionLike",
    "resolution_errors",
    "smart_stype",
    "stype_of",
]


class SubscriptionLike(Protocol):
    """One validated subscription (``session.Subscription`` is one)."""

    @property
    def schema(self) -> str: ...

    @property
    def stype_in(self) -> str: ...

    @property
    def symbols(self) -> tuple[str, ...]: ...

    @property
    def sub_id(self) -> int | None: ...

    @property
    def all_symbols(self) -> bool: ...


def stype_of(sub: SubscriptionLike) -> int:
    """The stype of ``sub``'s raw or instrument-id symbols and of its ALL_SYMBOLS (parent
    and continuous subscriptions follow ALL_SYMBOLS as instrument_id, as before)."""
    return STYPE_RAW_SYMBOL if sub.stype_in == "raw_symbol" else STYPE_INSTRUMENT_ID


def smart_stype(sub: SubscriptionLike) -> int | None:
    """STYPE_PARENT / STYPE_CONTINUOUS for a parent / continuous subscription, else None."""
    if sub.stype_in == "parent":
        return STYPE_PARENT
    if sub.stype_in == "continuous":
        return STYPE_CONTINUOUS
    return None


@dataclass
class Emit:
    """Gateway records to write, in order (an ack, coalesced errors): one unit each."""

    records: list[bytes]


@dataclass
class Resolve:
    """Resolve a subscription's named symbols, ``pos`` onwards: one unit per symbol."""

    sub: SubscriptionLike
    stype: int
    pos: int = 0
    unresolved: list[str] = field(default_factory=list)


@dataclass
class CatchUp:
    """Announce the directory's log to an ALL_SYMBOLS session: one unit per log entry."""

    stype: int


@dataclass
class Activate:
    """An ALL_SYMBOLS subscription's mappings are out: start its records."""

    schema: str


@dataclass
class Announce:
    """A symbol a session named was learnt (or remapped)."""

    stype: int
    symbol: str
    instrument_id: int


@dataclass
class SmartMap:
    """Instruments a parent or continuous symbol resolved to since it was subscribed (a new
    listing, or a continuous symbol that did not resolve at first): map and select them.
    One unit per instrument."""

    stype: int
    symbol: str
    found: list[tuple[int, str]]


Job = Emit | Resolve | CatchUp | Activate | Announce | SmartMap


class Interest:
    """One streaming session's subscriptions, resolved against the directory, and the
    work still owed to it (``jobs``). ``dirty``: the selection changed since the session
    was last placed in the fan-out."""

    __slots__ = (
        "subscriptions",
        "announced",
        "all_cursor",
        "all_schemas",
        "named",
        "key_schemas",
        "counts",
        "jobs",
        "catch_up_queued",
        "dirty",
        "smart",
        "smart_symbols",
        "smart_roots",
    )

    def __init__(self) -> None:
        self.subscriptions: list[SubscriptionLike] = []
        #: (stype, stype_in_symbol) -> instrument_id announced for a named symbol
        self.announced: dict[tuple[int, str], int] = {}
        #: stype -> position in the directory's log up to which ALL_SYMBOLS is announced
        self.all_cursor: dict[int, int] = {}
        #: schemas subscribed with ALL_SYMBOLS whose mappings have been sent
        self.all_schemas: set[str] = set()
        #: (stype, named symbol) -> the instrument it selects now
        self.named: dict[tuple[int, str], int] = {}
        #: (stype, named symbol) -> the schemas it was named for
        self.key_schemas: dict[tuple[int, str], set[str]] = {}
        #: schema -> instrument id -> how many named symbols select it (the selection)
        self.counts: dict[str, dict[int, int]] = {}
        self.jobs: deque[Job] = deque()
        self.catch_up_queued: set[int] = set()
        self.dirty = False
        #: (stype, parent/continuous symbol) -> the instruments it maps to (id -> raw symbol);
        #: a continuous symbol maps to one, for the session's life
        self.smart: dict[tuple[int, str], dict[int, str]] = {}
        #: (stype, parent/continuous symbol) -> the symbol parsed
        self.smart_symbols: dict[tuple[int, str], SmartSymbol] = {}
        #: root -> the (stype, symbol) keys subscribed on it
        self.smart_roots: dict[str, set[tuple[int, str]]] = {}

    def name(self, stype: int, key: str, schema: str) -> None:
        """``key`` is named for ``schema``: if it already resolved, select its instrument."""
        schemas = self.key_schemas.setdefault((stype, key), set())
        if schema in schemas:
            return
        schemas.add(schema)
        iid = self.named.get((stype, key))
        if iid is not None:
            self.count(schema, iid, 1)
        for iid in self.smart.get((stype, key), ()):
            self.count(schema, iid, 1)

    def count(self, schema: str, iid: int, delta: int) -> None:
        """One more (or one fewer) named symbol selects ``iid`` for ``schema``."""
        counts = self.counts.setdefault(schema, {})
        n = counts.get(iid, 0) + delta
        if n > 0:
            if iid not in counts:
                self.dirty = True
            counts[iid] = n
        elif iid in counts:
            del counts[iid]
            self.dirty = True

    def queue_catch_up(self, stype: int) -> None:
        """Queue a walk of the directory's log for ALL_SYMBOLS of ``stype`` (once)."""
        if stype not in self.catch_up_queued:
            self.catch_up_queued.add(stype)
            self.jobs.append(CatchUp(stype))

    def selection(self, schema_rtype: Mapping[str, int]) -> dict[int, set[int] | None]:
        """rtype -> the instruments selected (None: every one), for ``make_selection``;
        schemas the feed does not carry (rtype < 0) select nothing."""
        wanted: dict[int, set[int] | None] = {}
        for schema in self.all_schemas:
            rtype = schema_rtype.get(schema, -1)
            if rtype >= 0:
                wanted[rtype] = None
        for schema, counts in self.counts.items():
            rtype = schema_rtype.get(schema, -1)
            if rtype < 0 or not counts:
                continue
            have = wanted.get(rtype, set())
            if have is None:
                continue
            wanted[rtype] = have | counts.keys()
        return wanted


#: how many symbols one coalesced resolution ErrorMsg names at most (its text fits 301 bytes)
_ERROR_TEXT = 301
_MAX_SYMBOL_IN_ERROR = _ERROR_TEXT - len("Failed to resolve symbols: ")


def resolution_errors(now: int, symbols: list[str]) -> list[bytes]:
    """SYMBOL_RESOLUTION_FAILED ErrorMsgs for ``symbols``, coalesced: "Failed to resolve
    symbol: X" for one, else "Failed to resolve symbols: X, Y, Z" with as many as fit in
    one record's text (a symbol too long for one on its own is cut, with "..."); is_last
    on the final record only."""
    texts: list[str] = []
    names: list[str] = []
    size = 0
    for symbol in symbols:
        if len(symbol) > _MAX_SYMBOL_IN_ERROR:
            symbol = symbol[: _MAX_SYMBOL_IN_ERROR - 3] + "..."
        name = symbol
        if names and len("Failed to resolve symbols: ") + size + 2 + len(name) > _ERROR_TEXT:
            texts.append(_resolution_text(names))
            names, size = [], 0
        size += len(name) + (2 if names else 0)
        names.append(name)
    if names:
        texts.append(_resolution_text(names))
    return [
        dbn.encode_error(now, text, ErrorCode.SYMBOL_RESOLUTION_FAILED, is_last=i == len(texts) - 1)
        for i, text in enumerate(texts)
    ]


def _resolution_text(names: list[str]) -> str:
    if len(names) == 1:
        return f"Failed to resolve symbol: {names[0]}"
    return "Failed to resolve symbols: " + ", ".join(names)
