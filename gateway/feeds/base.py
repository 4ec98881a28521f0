"""Per-dataset feed state: the symbol directory, the sessions' interests, the fan-out.

Sources (synthetic, file, ingest) push two things into a Feed: chunks of whole DBN v3
records (``publish``) and symbology (``on_metadata`` / records carrying it). The Feed
learns raw symbol <-> instrument_id from Metadata mappings, SymbolMappingMsg and
InstrumentDefMsg records, strips gateway-only records from the data, answers each new
subscription with its ack / mappings / resolution errors, and turns every session's
subscriptions into a fan-out selection. It never knows about sockets.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from gateway import dbn
from gateway.control import ALL_SYMBOLS
from gateway.dbn import (
    GATEWAY_RTYPES,
    RTYPE_DEF,
    RTYPE_SYMBOL_MAPPING,
    STYPE_INSTRUMENT_ID,
    STYPE_RAW_SYMBOL,
    ChunkIndex,
    ErrorCode,
    SystemCode,
)
from gateway.fanout import FanOut, OutputSpec, Payload, make_selection
from gateway.session import Subscription

__all__ = ["Feed", "FeedMember", "FeedStats", "SymbolDirectory"]

log = logging.getLogger("gateway.feed")

_SYMBOLOGY_RTYPES = np.array(sorted(GATEWAY_RTYPES | {RTYPE_DEF}), dtype=np.uint8)
_STRIP_RTYPES = np.array(sorted(GATEWAY_RTYPES), dtype=np.uint8)


class FeedMember(Protocol):
    """What a Feed needs from a streaming session (implemented by the adapter)."""

    ts_out: bool
    zstd: bool

    def deliver(self, data: Payload, records: int) -> None: ...

    def send_gateway_records(self, records: list[bytes]) -> None: ...


class SymbolDirectory:
    """raw_symbol <-> instrument_id for one dataset, as learnt from the feed."""

    def __init__(self) -> None:
        self.by_symbol: dict[str, int] = {}
        self.by_id: dict[int, str] = {}

    def learn(self, symbol: str, instrument_id: int) -> bool:
        """Record a mapping; True if it is new or changed."""
        symbol = symbol.strip()
        if not symbol or self.by_symbol.get(symbol) == instrument_id:
            return False
        old = self.by_symbol.get(symbol)
        if old is not None and self.by_id.get(old) == symbol:
            del self.by_id[old]
        self.by_symbol[symbol] = instrument_id
        self.by_id[instrument_id] = symbol
        return True

    def __len__(self) -> int:
        return len(self.by_symbol)


@dataclass
class _Interest:
    """One streaming session's subscriptions, resolved against the directory."""

    subscriptions: list[Subscription] = field(default_factory=list)
    #: (stype_in, stype_in_symbol, instrument_id) already announced with a SymbolMappingMsg
    announced: set[tuple[int, str, int]] = field(default_factory=set)


@dataclass
class FeedStats:
    records_in: int = 0
    bytes_in: int = 0
    chunks_in: int = 0
    last_ts_event: int = 0
    last_record_at: float = 0.0


class Feed:
    def __init__(
        self,
        dataset: str,
        *,
        fanout: FanOut | None = None,
        clock_ns: Callable[[], int] = time.time_ns,
        backpressure: bool = False,
    ) -> None:
        self.dataset = dataset
        self.directory = SymbolDirectory()
        self.fanout = fanout or FanOut(clock_ns=clock_ns)
        self.stats = FeedStats()
        self.connected = False
        self.state_detail = "starting"
        #: state changes, counted as they happen (a flap shorter than a metrics tick counts)
        self.ups = 0
        self.downs = 0
        self.backpressure = backpressure
        self._clock_ns = clock_ns
        self._interests: dict[FeedMember, _Interest] = {}
        self._blocked: set[FeedMember] = set()
        #: called with True when a lossless feed must stop reading its source, False to resume
        self.flow_listeners: list[Callable[[bool], None]] = []
        self.paused_since: float | None = None
        self.paused_total_s = 0.0
        self.pauses = 0
        #: rtype 0x01 means mbp-1 unless the feed's Metadata declares tbbo
        self.schema_rtype: dict[str, int] = dict(dbn.SCHEMA_RTYPE)
        self.schema_rtype["tbbo"] = -1

    # --- sessions -------------------------------------------------------------------

    @property
    def members(self) -> list[FeedMember]:
        return list(self._interests)

    def join(self, member: FeedMember) -> None:
        self._interests.setdefault(member, _Interest())

    def leave(self, member: FeedMember) -> None:
        self._interests.pop(member, None)
        self.fanout.remove(member)
        self.member_blocked(member, False)

    def member_blocked(self, member: FeedMember, blocked: bool) -> None:
        """A session's transport went over (or back under) its write-buffer high-water mark.
        A lossless feed stops reading its source while any session is over it."""
        if blocked:
            self._blocked.add(member)
        else:
            self._blocked.discard(member)
        if not self.backpressure:
            return
        if self._blocked and self.paused_since is None:
            self.paused_since = time.monotonic()
            self.pauses += 1
            for listener in self.flow_listeners:
                listener(True)
        elif not self._blocked and self.paused_since is not None:
            self.paused_total_s += time.monotonic() - self.paused_since
            self.paused_since = None
            for listener in self.flow_listeners:
                listener(False)

    @property
    def paused(self) -> bool:
        return self.paused_since is not None

    def subscribe(self, member: FeedMember, sub: Subscription) -> list[bytes]:
        """Register ``sub`` for ``member``; the gateway records that answer it, in order:
        SUBSCRIPTION_ACK, one SymbolMappingMsg per resolved instrument, one ErrorMsg
        SYMBOL_RESOLUTION_FAILED per unresolved symbol (is_last on the final one)."""
        interest = self._interests.setdefault(member, _Interest())
        interest.subscriptions.append(sub)
        now = self._clock_ns()
        ident = f" {sub.sub_id}" if sub.sub_id is not None else ""
        records = [
            dbn.encode_system(
                now,
                f"Subscription request{ident} for {sub.schema} data succeeded",
                SystemCode.SUBSCRIPTION_ACK,
            )
        ]
        unresolved: list[str] = []
        stype = STYPE_RAW_SYMBOL if sub.stype_in == "raw_symbol" else STYPE_INSTRUMENT_ID
        if sub.all_symbols:
            for symbol, iid in list(self.directory.by_symbol.items()):
                records += self._announce(interest, stype, iid, symbol, now)
        for symbol in sub.symbols:
            if symbol == ALL_SYMBOLS:
                continue
            if stype == STYPE_RAW_SYMBOL:
                found = self.directory.by_symbol.get(symbol)
                if found is None:
                    unresolved.append(symbol)
                else:
                    records += self._announce(interest, stype, found, symbol, now)
            else:
                iid = int(symbol)
                raw = self.directory.by_id.get(iid)
                if raw is not None:
                    records += self._announce(interest, stype, iid, raw, now)
        for i, symbol in enumerate(unresolved):
            records.append(
                dbn.encode_error(
                    now,
                    f"Failed to resolve symbol: {symbol}",
                    ErrorCode.SYMBOL_RESOLUTION_FAILED,
                    is_last=i == len(unresolved) - 1,
                )
            )
        self._regroup(member, interest)
        return records

    def _announce(
        self, interest: _Interest, stype: int, iid: int, raw: str, now: int
    ) -> list[bytes]:
        stype_symbol = raw if stype == STYPE_RAW_SYMBOL else str(iid)
        key = (stype, stype_symbol, iid)
        if key in interest.announced:
            return []
        interest.announced.add(key)
        return [dbn.encode_symbol_mapping(now, iid, stype, stype_symbol, raw, now)]

    def _selection_of(self, interest: _Interest) -> dict[int, set[int] | None]:
        wanted: dict[int, set[int] | None] = {}
        for sub in interest.subscriptions:
            rtype = self.schema_rtype.get(sub.schema, -1)
            if rtype < 0:
                continue
            if sub.all_symbols:
                wanted[rtype] = None
                continue
            if rtype in wanted and wanted[rtype] is None:
                continue
            ids = wanted.setdefault(rtype, set())
            assert ids is not None
            for symbol in sub.symbols:
                if sub.stype_in == "instrument_id":
                    ids.add(int(symbol))
                else:
                    iid = self.directory.by_symbol.get(symbol)
                    if iid is not None:
                        ids.add(iid)
        return wanted

    def _regroup(self, member: FeedMember, interest: _Interest) -> None:
        spec = OutputSpec(make_selection(self._selection_of(interest)), member.ts_out, member.zstd)
        self.fanout.place(member, spec)

    # --- symbology ----------------------------------------------------------------------

    def on_metadata(self, metadata: object) -> None:
        """Learn the feed's schema (tbbo vs mbp-1) and its symbol mappings."""
        schema = getattr(metadata, "schema", None)
        name = str(getattr(schema, "value", schema) or "") if schema is not None else ""
        tbbo = name == "tbbo"
        if (self.schema_rtype["tbbo"] == 0x01) != tbbo:
            self.schema_rtype["tbbo"] = 0x01 if tbbo else -1
            self.schema_rtype["mbp-1"] = -1 if tbbo else 0x01
            for member, interest in list(self._interests.items()):
                self._regroup(member, interest)
        mappings = getattr(metadata, "mappings", None) or {}
        learned: list[tuple[str, int]] = []
        for symbol, intervals in mappings.items():
            if not intervals:
                continue
            target = str(intervals[-1].get("symbol", ""))
            if target.isdigit():
                learned.append((str(symbol), int(target)))
        self.learn_many(learned)

    def learn_many(self, pairs: list[tuple[str, int]]) -> None:
        changed = [(s, i) for s, i in pairs if self.directory.learn(s, i)]
        if not changed or not self._interests:
            return
        now = self._clock_ns()
        for member, interest in list(self._interests.items()):
            records: list[bytes] = []
            for symbol, iid in changed:
                for sub in interest.subscriptions:
                    stype = (
                        STYPE_RAW_SYMBOL if sub.stype_in == "raw_symbol" else STYPE_INSTRUMENT_ID
                    )
                    if sub.all_symbols or (
                        symbol in sub.symbols
                        if stype == STYPE_RAW_SYMBOL
                        else str(iid) in sub.symbols
                    ):
                        records += self._announce(interest, stype, iid, symbol, now)
            if records:
                member.send_gateway_records(records)
                self._regroup(member, interest)

    # --- data -----------------------------------------------------------------------------

    def publish(self, index: ChunkIndex) -> None:
        """Fan one chunk of whole records out to every session that wants part of it."""
        if index.count == 0:
            return
        stats = self.stats
        stats.records_in += index.count
        stats.bytes_in += index.nbytes
        stats.chunks_in += 1
        stats.last_ts_event = int(index.ts_events[-1])
        stats.last_record_at = time.time()
        present = index.rtype_set
        if present & (GATEWAY_RTYPES | {RTYPE_DEF}):
            index = self._take_symbology(index)
            if index.count == 0:
                return
        self.fanout.publish(index)

    def _take_symbology(self, index: ChunkIndex) -> ChunkIndex:
        hits = np.flatnonzero(np.isin(index.rtypes, _SYMBOLOGY_RTYPES))
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
        self.learn_many(learned)
        strip = np.isin(index.rtypes, _STRIP_RTYPES)
        if not strip.any():
            return index
        kept = index.select(~strip)
        new_index, _ = dbn.index_records(kept)
        return new_index

    # --- feed health ----------------------------------------------------------------------

    def set_state(self, connected: bool, detail: str, notify: bool = True) -> None:
        """Record a feed state change; tell every streaming session with a SystemMsg."""
        changed = connected != self.connected or detail != self.state_detail
        if connected != self.connected:
            if connected:
                self.ups += 1
            else:
                self.downs += 1
        self.connected = connected
        self.state_detail = detail
        if changed:
            (log.info if connected else log.warning)(
                "feed %s %s: %s", self.dataset, "up" if connected else "down", detail
            )
        if changed and notify and self._interests:
            msg = dbn.encode_system(
                self._clock_ns(), f"Feed {self.dataset}: {detail}"[:300], SystemCode.UNSET
            )
            for member in list(self._interests):
                member.send_gateway_records([msg])
