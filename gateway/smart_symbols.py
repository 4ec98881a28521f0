"""Parent and continuous symbols ("smart" symbols) and what they resolve to. Sans-I/O.

Symbols are normalised as the official Python client sends them: trimmed, upper-cased, and
for the three-part form the roll rule lower-cased (``es.fut`` -> ``ES.FUT``, ``ES.N.0`` ->
``ES.n.0``). A raw-protocol client may send any case; the gateway applies the same rule, so
``es.c.0`` and ``ES.c.0`` are one subscription and map as ``ES.c.0``.

``SmartResolver`` learns from the feed's reference records, one chunk at a time, with numpy
(no Python loop per record): InstrumentDefMsg (rtype 0x13, DBN v3, 520 bytes) and StatMsg
(rtype 0x18, 80 bytes) — open interest (stat_type 9) and cleared volume (stat_type 6).

Rules (Databento publishes the idea, not the algorithm; these are ours):

* **root**: an instrument's product is its definition's ``asset`` (the CME product code:
  ``ES`` for the futures, ``E1A`` for a weekly option series), or its ``underlying`` when
  ``asset`` is empty. Roots compare exactly, upper case.
* ``ROOT.FUT``: instrument_class F (future) or S (future spread); ``ROOT.OPT``: C, P (options),
  T (option spread) or M (mixed spread: it has option legs). A definition with no class falls
  back on ``security_type`` (``FUT`` -> F; ``OOF``/``OPT`` -> an option).
* An instrument is **listed** from its definition on, until a definition with
  ``security_update_action`` D deletes it; it is **expired** once ``expiration`` is at or
  before the resolution time (UNDEF_TIMESTAMP never expires). Parents hold the listed,
  unexpired instruments; continuous symbols rank only listed, unexpired outright futures (F).
* ``ROOT.c.N``: the outright futures with an expiration, nearest first; ties by
  instrument_id.
* ``ROOT.n.N`` / ``ROOT.v.N``: by the latest open interest / cleared volume, highest first;
  ties by nearer expiration, then instrument_id. "The previous close" is the most recent UTC
  day any of the root's futures has that statistic for (the day of ``ts_ref``, or of
  ``ts_event`` when ``ts_ref`` is UNDEF); a future whose latest figure is older, or that has
  none, or whose figure was deleted (update_action 2), is not ranked: the gateway cannot
  know it. A figure replaces the stored one unless it is older (by ``ts_ref``/``ts_event``,
  then ``ts_recv``).
* Rank N beyond the ranked futures: the symbol does not resolve (yet).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from gateway.dbn import RTYPE_DEF, RTYPE_SYMBOL_MAPPING, STYPE_RAW_SYMBOL, ChunkIndex

__all__ = [
    "CONTINUOUS_RULES",
    "DEF_DTYPE",
    "PARENT_KINDS",
    "STAT_DTYPE",
    "STAT_CLEARED_VOLUME",
    "STAT_OPEN_INTEREST",
    "STYPE_CONTINUOUS",
    "STYPE_PARENT",
    "ReferenceUpdate",
    "SmartResolver",
    "SmartSymbol",
    "SmartSymbolError",
    "encode_mappings",
    "normalize",
    "parse_smart",
]

#: SType numbers on the wire (SymbolMappingMsg ``stype_in``)
STYPE_CONTINUOUS: Final = 3
STYPE_PARENT: Final = 4
RTYPE_STAT: Final = 0x18
STAT_CLEARED_VOLUME: Final = 6
STAT_OPEN_INTEREST: Final = 9
_STAT_DELETE: Final = 2
UNDEF_TIMESTAMP: Final = 2**64 - 1
_UNDEF_QUANTITY: Final = 2**63 - 1
_DAY_NS: Final = 86_400 * 10**9

PARENT_KINDS: Final = ("FUT", "OPT")
CONTINUOUS_RULES: Final = ("c", "n", "v")
_MAX_ROOT = 20  # the widest field a root is compared with (``underlying``, char[21])
_MAX_RANK_DIGITS = 6

# DBN v3 InstrumentDefMsg (520 bytes), the fields used here, at their offsets (checked
# against databento_dbn in tests/unit/test_smart_symbols.py).
DEF_DTYPE: Final = np.dtype(
    {
        "names": [
            "rtype",
            "instrument_id",
            "ts_recv",
            "expiration",
            "raw_symbol",
            "group",
            "asset",
            "security_type",
            "underlying",
            "instrument_class",
            "security_update_action",
        ],
        "formats": ["u1", "<u4", "<u8", "<u8", "S71", "S21", "S11", "S7", "S21", "S1", "S1"],
        "offsets": [1, 4, 16, 40, 238, 309, 335, 353, 391, 487, 493],
        "itemsize": 520,
    }
)
# DBN v3 StatMsg (80 bytes)
STAT_DTYPE: Final = np.dtype(
    {
        "names": [
            "instrument_id",
            "ts_event",
            "ts_recv",
            "ts_ref",
            "quantity",
            "stat_type",
            "update_action",
        ],
        "formats": ["<u4", "<u8", "<u8", "<u8", "<i8", "<u2", "u1"],
        "offsets": [4, 8, 16, 24, 40, 56, 60],
        "itemsize": 80,
    }
)
# SymbolMappingMsg v3 (176 bytes)
_MAPPING_DTYPE: Final = np.dtype(
    {
        "names": [
            "length",
            "rtype",
            "instrument_id",
            "ts_event",
            "stype_in",
            "stype_in_symbol",
            "stype_out",
            "stype_out_symbol",
            "start_ts",
            "end_ts",
        ],
        "formats": ["u1", "u1", "<u4", "<u8", "u1", "S71", "u1", "S71", "<u8", "<u8"],
        "offsets": [0, 1, 4, 8, 16, 17, 88, 89, 160, 168],
        "itemsize": 176,
    }
)

_KIND_NONE, _KIND_FUT, _KIND_OPT = 0, 1, 2
_FUT_CLASSES = np.array([b"F", b"S"], dtype="S1")
_OPT_CLASSES = np.array([b"C", b"P", b"T", b"M"], dtype="S1")
_FUT_TYPES = np.array([b"FUT"], dtype="S7")
_OPT_TYPES = np.array([b"OOF", b"OPT"], dtype="S7")


class SmartSymbolError(ValueError):
    """A symbol that is not a valid parent or continuous symbol."""


@dataclass(frozen=True)
class SmartSymbol:
    """A parsed smart symbol: ``text`` normalised, ``kind`` FUT/OPT (parent) or c/n/v
    (continuous), ``rank`` (continuous only, else -1)."""

    text: str
    root: str
    kind: str
    rank: int = -1

    @property
    def stype(self) -> int:
        return STYPE_CONTINUOUS if self.rank >= 0 else STYPE_PARENT


def normalize(symbol: str) -> str:
    """As the official Python client: trim, upper-case, lower-case a three-part symbol's
    middle part (its roll rule)."""
    parts = symbol.strip().upper().split(".")
    if len(parts) == 3:
        parts[1] = parts[1].lower()
    return ".".join(parts)


def parse_smart(symbol: str, stype_in: str) -> SmartSymbol:
    """Parse a ``parent`` (``ROOT.FUT``, ``ROOT.OPT``) or ``continuous`` (``ROOT.c.N``,
    ``ROOT.n.N``, ``ROOT.v.N``) symbol, normalised first; SmartSymbolError when it is not
    one."""
    text = normalize(symbol)
    parts = text.split(".")
    root = parts[0]
    if not root or len(root) > _MAX_ROOT or not all(p for p in parts):
        raise SmartSymbolError(f"{text!r:.40} is not a valid {stype_in} symbol")
    if not root.isascii() or not root.isprintable() or " " in root:
        raise SmartSymbolError(f"{text!r:.40} is not a valid {stype_in} symbol")
    if stype_in == "parent":
        if len(parts) != 2 or parts[1] not in PARENT_KINDS:
            raise SmartSymbolError(
                f"{text!r:.40} is not a valid parent symbol: use ROOT.FUT or ROOT.OPT"
            )
        return SmartSymbol(text, root, parts[1])
    if stype_in == "continuous":
        if (
            len(parts) != 3
            or parts[1] not in CONTINUOUS_RULES
            or not (parts[2].isascii() and parts[2].isdigit())
            or len(parts[2]) > _MAX_RANK_DIGITS
        ):
            raise SmartSymbolError(
                f"{text!r:.40} is not a valid continuous symbol: use ROOT.c.N, ROOT.n.N or ROOT.v.N"
            )
        return SmartSymbol(text, root, parts[1], int(parts[2]))
    raise SmartSymbolError(f"stype_in {stype_in!r:.20} has no smart symbols")


def encode_mappings(
    ts_event: int, stype_in: int, stype_in_symbol: str, found: Sequence[tuple[int, str]]
) -> list[bytes]:
    """One SymbolMappingMsg per (instrument_id, raw symbol) in ``found``, built in one numpy
    pass (the same bytes as ``dbn.encode_symbol_mapping``: stype_out raw_symbol,
    publisher 0, ``start_ts`` = ``ts_event``, ``end_ts`` UNDEF)."""
    n = len(found)
    if n == 0:
        return []
    out = np.zeros(n, dtype=_MAPPING_DTYPE)
    out["length"] = _MAPPING_DTYPE.itemsize // 4
    out["rtype"] = RTYPE_SYMBOL_MAPPING
    out["instrument_id"] = [iid for iid, _ in found]
    out["ts_event"] = ts_event
    out["stype_in"] = stype_in
    out["stype_in_symbol"] = stype_in_symbol[:70].encode("ascii", "replace")
    out["stype_out"] = STYPE_RAW_SYMBOL
    out["stype_out_symbol"] = [raw[:70].encode("ascii", "replace") for _, raw in found]
    out["start_ts"] = ts_event
    out["end_ts"] = UNDEF_TIMESTAMP
    blob = out.tobytes()
    size = _MAPPING_DTYPE.itemsize
    return [blob[i : i + size] for i in range(0, len(blob), size)]


def _gather(index: ChunkIndex, rtype: int, size: int, dtype: np.dtype) -> npt.NDArray[np.void]:
    """The chunk's records of ``rtype`` (exactly ``size`` bytes), as a structured array."""
    mask = (index.rtypes == rtype) & (index.lengths == size)
    if not mask.any():
        return np.zeros(0, dtype=dtype)
    if index.rows is not None and index.record_len == size and bool(mask.all()):
        rows = index.rows
    else:
        # every window of ``size`` bytes, as a view; taking the records' rows copies them
        windows = np.lib.stride_tricks.sliding_window_view(
            np.frombuffer(index.data, dtype=np.uint8), size
        )
        rows = windows[index.offsets[mask]]
    out: npt.NDArray[np.void] = rows.view(dtype).reshape(len(rows))
    return out


def _last_per_id(ids: npt.NDArray[np.uint32]) -> npt.NDArray[np.int64]:
    """Positions of the last occurrence of each id, in increasing position order."""
    _, first_in_reversed = np.unique(ids[::-1], return_index=True)
    return np.sort(len(ids) - 1 - first_in_reversed).astype(np.int64)


@dataclass
class ReferenceUpdate:
    """What one chunk taught the resolver: the roots whose instruments or statistics
    changed, and the rows that joined a parent (new listings, or a changed root/class)."""

    roots: set[str]
    listed: npt.NDArray[np.int64]


class _Column:
    """A growable numpy column."""

    __slots__ = ("data",)

    def __init__(self, dtype: npt.DTypeLike, fill: object = 0) -> None:
        self.data = np.full(64, fill, dtype=dtype)


class SmartResolver:
    """Instruments and their statistics, learnt from definitions and statistics records;
    resolves parent and continuous symbols (rules in the module docstring).

    State is a table with one row per instrument id seen (in a definition or a statistic),
    kept in numpy columns, and a sorted index of the ids."""

    def __init__(self) -> None:
        self.size = 0
        self._keys = np.zeros(0, dtype=np.uint32)  # sorted instrument ids
        self._key_rows = np.zeros(0, dtype=np.int64)
        self._cols: dict[str, _Column] = {
            "iid": _Column(np.uint32),
            "listed": _Column(np.bool_, False),
            "kind": _Column(np.uint8),
            "cls": _Column("S1", b""),
            "root": _Column("S21", b""),
            "raw": _Column("S71", b""),
            "expiration": _Column(np.uint64, UNDEF_TIMESTAMP),
            "def_ts": _Column(np.uint64),
            "oi": _Column(np.int64),
            "oi_when": _Column(np.uint64),
            "oi_recv": _Column(np.uint64),
            "oi_known": _Column(np.bool_, False),
            "vol": _Column(np.int64),
            "vol_when": _Column(np.uint64),
            "vol_recv": _Column(np.uint64),
            "vol_known": _Column(np.bool_, False),
        }
        self._fills = {
            "iid": 0,
            "listed": False,
            "kind": 0,
            "cls": b"",
            "root": b"",
            "raw": b"",
            "expiration": UNDEF_TIMESTAMP,
            "def_ts": 0,
            "oi": 0,
            "oi_when": 0,
            "oi_recv": 0,
            "oi_known": False,
            "vol": 0,
            "vol_when": 0,
            "vol_recv": 0,
            "vol_known": False,
        }
        self._by_root: dict[bytes, npt.NDArray[np.int64]] | None = None
        #: definitions and statistics records taken in (observability, tests)
        self.definitions_seen = 0
        self.statistics_seen = 0

    def col(self, name: str) -> npt.NDArray[np.generic]:
        """Column ``name`` over the rows in use."""
        return self._cols[name].data[: self.size]

    def __len__(self) -> int:
        """Instruments listed now."""
        return int(self.col("listed").sum())

    # --- learning ---------------------------------------------------------------------

    def learn(self, index: ChunkIndex) -> ReferenceUpdate:
        """Take in a chunk's definitions and statistics (other records are skipped)."""
        roots: set[str] = set()
        listed = np.zeros(0, dtype=np.int64)
        rtypes = index.rtype_set
        if RTYPE_DEF in rtypes:
            defs = _gather(index, RTYPE_DEF, 520, DEF_DTYPE)
            if len(defs):
                listed = self._learn_definitions(defs, roots)
        if RTYPE_STAT in rtypes:
            stats = _gather(index, RTYPE_STAT, 80, STAT_DTYPE)
            if len(stats):
                self._learn_statistics(stats, roots)
        return ReferenceUpdate(roots, listed)

    def _rows_for(self, ids: npt.NDArray[np.uint32]) -> npt.NDArray[np.int64]:
        """Table rows of ``ids`` (unique), adding rows for ids not seen before."""
        keys = self._keys
        rows = np.full(len(ids), -1, dtype=np.int64)
        found = np.zeros(len(ids), dtype=bool)
        if len(keys):
            pos = np.minimum(np.searchsorted(keys, ids), len(keys) - 1)
            found = keys[pos] == ids
            rows[found] = self._key_rows[pos[found]]
        new = ~found
        n_new = int(new.sum())
        if n_new:
            start = self.size
            self._grow(start + n_new)
            new_rows = np.arange(start, start + n_new, dtype=np.int64)
            rows[new] = new_rows
            new_ids = ids[new]
            self._cols["iid"].data[start : start + n_new] = new_ids
            order = np.argsort(new_ids, kind="stable")
            at = np.searchsorted(keys, new_ids[order])
            self._keys = np.insert(keys, at, new_ids[order])
            self._key_rows = np.insert(self._key_rows, at, new_rows[order])
        return rows

    def _grow(self, size: int) -> None:
        for name, column in self._cols.items():
            if len(column.data) < size:
                grown = max(size, 2 * len(column.data))
                bigger = np.full(grown, self._fills[name], column.data.dtype)
                bigger[: len(column.data)] = column.data
                column.data = bigger
        self.size = size

    def _learn_definitions(
        self, defs: npt.NDArray[np.void], roots: set[str]
    ) -> npt.NDArray[np.int64]:
        self.definitions_seen += len(defs)
        defs = defs[_last_per_id(defs["instrument_id"])]
        rows = self._rows_for(defs["instrument_id"])
        cols = self._cols
        asset = np.char.upper(np.char.strip(defs["asset"]))
        underlying = np.char.upper(np.char.strip(defs["underlying"]))
        root = np.where(asset == b"", underlying.astype("S21"), asset.astype("S21"))
        cls = defs["instrument_class"]
        stype = np.char.strip(defs["security_type"]).astype("S7")
        kind = np.zeros(len(defs), dtype=np.uint8)
        kind[np.isin(cls, _FUT_CLASSES) | ((cls == b"") & np.isin(stype, _FUT_TYPES))] = _KIND_FUT
        kind[np.isin(cls, _OPT_CLASSES) | ((cls == b"") & np.isin(stype, _OPT_TYPES))] = _KIND_OPT
        cls = np.where((cls == b"") & (kind == _KIND_FUT), b"F", cls).astype("S1")
        deleted = defs["security_update_action"] == b"D"
        # a definition older than the one held changes nothing
        newer = defs["ts_recv"] >= cols["def_ts"].data[rows]
        defs, rows, root, kind, cls, deleted = (
            defs[newer],
            rows[newer],
            root[newer],
            kind[newer],
            cls[newer],
            deleted[newer],
        )
        if not len(rows):
            return np.zeros(0, dtype=np.int64)
        was_listed = cols["listed"].data[rows]
        same_parent = (cols["root"].data[rows] == root) & (cols["kind"].data[rows] == kind)
        listed_now = ~deleted
        joined = listed_now & (kind != _KIND_NONE) & ~(was_listed & same_parent)
        touched = np.concatenate([root, cols["root"].data[rows][was_listed]])
        cols["listed"].data[rows] = listed_now
        cols["kind"].data[rows] = kind
        cols["cls"].data[rows] = cls
        cols["root"].data[rows] = root
        cols["raw"].data[rows] = np.char.strip(defs["raw_symbol"])
        cols["expiration"].data[rows] = defs["expiration"]
        cols["def_ts"].data[rows] = defs["ts_recv"]
        self._by_root = None
        roots.update(r.decode("ascii", "replace") for r in np.unique(touched) if r)
        joined_rows: npt.NDArray[np.int64] = rows[joined]
        return joined_rows

    def _learn_statistics(self, stats: npt.NDArray[np.void], roots: set[str]) -> None:
        self.statistics_seen += len(stats)
        for stat_type, name in ((STAT_OPEN_INTEREST, "oi"), (STAT_CLEARED_VOLUME, "vol")):
            mine = stats[stats["stat_type"] == stat_type]
            if not len(mine):
                continue
            when = np.where(mine["ts_ref"] == UNDEF_TIMESTAMP, mine["ts_event"], mine["ts_ref"])
            # per instrument, the newest figure of the chunk (by when, ts_recv, position)
            order = np.lexsort((np.arange(len(mine)), mine["ts_recv"], when, mine["instrument_id"]))
            mine, when = mine[order], when[order]
            ids = mine["instrument_id"]
            last = np.flatnonzero(np.append(ids[1:] != ids[:-1], True))
            mine, when = mine[last], when[last]
            rows = self._rows_for(mine["instrument_id"])
            cols = self._cols
            held_when = cols[f"{name}_when"].data[rows]
            held_recv = cols[f"{name}_recv"].data[rows]
            newer = (when > held_when) | ((when == held_when) & (mine["ts_recv"] >= held_recv))
            mine, when, rows = mine[newer], when[newer], rows[newer]
            if not len(rows):
                continue
            qty = mine["quantity"]
            known = (mine["update_action"] != _STAT_DELETE) & (qty != _UNDEF_QUANTITY)
            cols[name].data[rows] = np.where(known, qty, 0)
            cols[f"{name}_when"].data[rows] = when
            cols[f"{name}_recv"].data[rows] = mine["ts_recv"]
            cols[f"{name}_known"].data[rows] = known
            touched = cols["root"].data[rows]
            roots.update(r.decode("ascii", "replace") for r in np.unique(touched) if r)

    # --- resolving --------------------------------------------------------------------

    def _root_rows(self, root: str) -> npt.NDArray[np.int64]:
        if self._by_root is None:
            roots = self.col("root")
            order = np.argsort(roots, kind="stable").astype(np.int64)
            ordered = roots[order]
            uniq, starts = np.unique(ordered, return_index=True)
            parts = np.split(order, starts[1:]) if len(order) else []
            self._by_root = dict(zip(uniq.tolist(), parts, strict=True))
        return self._by_root.get(root.encode("ascii", "replace"), np.zeros(0, dtype=np.int64))

    def _live(self, rows: npt.NDArray[np.int64], now_ns: int) -> npt.NDArray[np.int64]:
        """The listed, unexpired rows among ``rows``."""
        exp = self._cols["expiration"].data[rows]
        ok = self._cols["listed"].data[rows] & ((exp == UNDEF_TIMESTAMP) | (exp > now_ns))
        live: npt.NDArray[np.int64] = rows[ok]
        return live

    def _pairs(self, rows: Iterable[int]) -> list[tuple[int, str]]:
        iid = self._cols["iid"].data
        raw = self._cols["raw"].data
        return [(int(iid[r]), raw[r].decode("ascii", "replace")) for r in rows]

    def parent(self, root: str, kind: str, now_ns: int) -> list[tuple[int, str]]:
        """(instrument_id, raw symbol) of ``ROOT.FUT`` / ``ROOT.OPT`` now, by expiration then
        instrument_id."""
        code = _KIND_FUT if kind == "FUT" else _KIND_OPT
        rows = self._root_rows(root)
        rows = self._live(rows[self._cols["kind"].data[rows] == code], now_ns)
        order = np.lexsort((self._cols["iid"].data[rows], self._cols["expiration"].data[rows]))
        return self._pairs(rows[order].tolist())

    def listed_in(
        self, rows: npt.NDArray[np.int64], root: str, kind: str, now_ns: int
    ) -> list[tuple[int, str]]:
        """Those of ``rows`` (an update's ``listed``) that belong to ``ROOT.kind`` now."""
        code = _KIND_FUT if kind == "FUT" else _KIND_OPT
        cols = self._cols
        mine = rows[
            (cols["root"].data[rows] == root.encode("ascii", "replace"))
            & (cols["kind"].data[rows] == code)
        ]
        return self._pairs(self._live(mine, now_ns).tolist())

    def continuous(self, root: str, rule: str, rank: int, now_ns: int) -> tuple[int, str] | None:
        """(instrument_id, raw symbol) of ``ROOT.rule.rank`` now; None when it does not
        resolve (too few futures ranked)."""
        cols = self._cols
        rows = self._root_rows(root)
        rows = self._live(rows[cols["cls"].data[rows] == b"F"], now_ns)
        exp = cols["expiration"].data[rows]
        iid = cols["iid"].data[rows]
        if rule == "c":
            keep = exp != UNDEF_TIMESTAMP
            rows, exp, iid = rows[keep], exp[keep], iid[keep]
            order = np.lexsort((iid, exp))
        else:
            name = "oi" if rule == "n" else "vol"
            known = cols[f"{name}_known"].data[rows]
            day = cols[f"{name}_when"].data[rows] // _DAY_NS
            if not known.any():
                return None
            keep = known & (day == day[known].max())
            rows, exp, iid = rows[keep], exp[keep], iid[keep]
            value = cols[name].data[rows]
            order = np.lexsort((iid, exp, -value))
        if rank >= len(order):
            return None
        return self._pairs([int(rows[order[rank]])])[0]

    def resolve(self, symbol: SmartSymbol, now_ns: int) -> list[tuple[int, str]]:
        """What ``symbol`` maps to now: a parent's instruments, or a continuous symbol's
        one instrument (empty when it does not resolve)."""
        if symbol.rank < 0:
            return self.parent(symbol.root, symbol.kind, now_ns)
        found = self.continuous(symbol.root, symbol.kind, symbol.rank, now_ns)
        return [] if found is None else [found]
