"""One gateway to the outside with ``--workers N``: the workers' figures added up.

Each worker sends the supervisor, every tick, its ``GatewaySnapshot`` and
:func:`families_of` its own ``Metrics`` registry: every family and sample as plain msgspec
Structs (:class:`Family`, :class:`Sample`). Workers register no ``GatewayCollector``; the
families one would make are left out of :func:`families_of` anyway, since the supervisor
makes them once, from the merged snapshot.

The supervisor serves ONE /metrics from a registry of its own (:func:`merged_registry`)
holding one :class:`MergedCollector`: at each scrape it reads the supervisor's own registry
(its process metrics, info, transport, journal and replay objects, the probe), merges the
workers' latest families into it (:func:`merge_families`) and adds a ``GatewayCollector``
over the merged snapshot (:func:`merge_snapshots`). prometheus-client's
``generate_latest`` writes the exposition; nothing here formats text.

How samples merge (the same sample name and labels in several processes):

* summed -- counters, gauges, and histograms bucket by bucket (``_bucket``/``_count``/
  ``_sum`` samples are summed like any other; every process has the same buckets, the
  code being the same);
* the smallest -- ``*_created`` (when a counter or histogram started counting),
  ``*_start_time_seconds`` (the gateway's and the processes' start),
  ``process_max_fds``, and ``gateway_bypass_active`` (1 only when the preload library is
  loaded in every process);
* Info and StateSet families -- the supervisor's, or the first worker's when the
  supervisor has none (a worker's ``gateway_transport`` info where the supervisor has
  none, for example).

Workers that died: their counters would drop out of the sums (Prometheus would read a
counter reset), so the supervisor keeps their last report in a :class:`Retired` and adds
its counters -- never its gauges -- to both merges.

The merged snapshot: each feed's input side (records and bytes in, connected, detail,
pauses, lag, journal) is the supervisor's; its output side (records out, fan-out groups
and variants, zstd work, sessions joined) the sum over workers, as are sessions,
connections, sessions per key, bytes out and replays. ``gateway.ready`` is the supervisor's
and every worker's (and, given ``expected``, that many workers reported).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import msgspec
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

from gateway.ops.collector import GatewayCollector
from gateway.ops.snapshot import (
    FeedSnapshot,
    GatewaySnapshot,
    ReplaySnapshot,
    SessionCounts,
    SessionsSnapshot,
)

__all__ = [
    "GATEWAY_FAMILIES",
    "Family",
    "MergedCollector",
    "Retired",
    "Sample",
    "decode_families",
    "families_of",
    "merge_families",
    "merge_snapshots",
    "merged_registry",
    "to_metrics",
]

#: the families ``GatewayCollector`` makes (from the merged snapshot, never merged)
GATEWAY_FAMILIES = frozenset(m.name for m in GatewayCollector(lambda: _never()).describe())
#: families taken from one process (the supervisor's first), never added up
_ONE_OF = frozenset({"info", "stateset"})
#: samples whose merge is the smallest value (by exact name; suffixes below)
_MIN_NAMES = frozenset({"process_max_fds", "gateway_bypass_active"})
_MIN_SUFFIXES = ("_created", "_start_time_seconds")


def _never() -> GatewaySnapshot:
    raise AssertionError("describe() takes no snapshot")


class Sample(msgspec.Struct, array_like=True, frozen=True):
    """One sample: its full name (``_total``, ``_bucket``... included), labels, value."""

    name: str
    labels: dict[str, str]
    value: float


class Family(msgspec.Struct, array_like=True):
    """One metric family as prometheus-client collects it (``Metric``), serialisable."""

    name: str
    type: str
    documentation: str
    unit: str = ""
    samples: list[Sample] = []


def families_of(registry: CollectorRegistry) -> list[Family]:
    """Every family of ``registry`` (``GatewayCollector``'s left out), as plain Structs:
    what a worker puts in its ``Stats`` message."""
    return [
        Family(
            name=m.name,
            type=m.type,
            documentation=m.documentation,
            unit=m.unit,
            samples=[Sample(s.name, dict(s.labels), float(s.value)) for s in m.samples],
        )
        for m in registry.collect()
        if m.name not in GATEWAY_FAMILIES
    ]


def decode_families(raw: Any) -> list[Family]:
    """Families from their decoded msgpack/JSON form (lists), e.g. a ``list[Any]`` field."""
    return msgspec.convert(raw, list[Family])


def merge_families(own: Sequence[Family], workers: Iterable[Sequence[Family]]) -> list[Family]:
    """The supervisor's families with every worker's merged in (the rules in the module
    docstring); families and samples in first-seen order, the supervisor's first."""
    merged: dict[str, tuple[Family, dict[tuple[str, tuple[tuple[str, str], ...]], Sample]]] = {}
    for fams in (own, *workers):
        for fam in fams:
            if fam.name in GATEWAY_FAMILIES:
                continue
            entry = merged.get(fam.name)
            if entry is None:
                head = Family(fam.name, fam.type, fam.documentation, fam.unit)
                merged[fam.name] = entry = (head, {})
            elif fam.type in _ONE_OF or entry[0].type in _ONE_OF:
                continue  # the first process's (the supervisor's when it has one)
            samples = entry[1]
            for s in fam.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                cur = samples.get(key)
                if cur is None:
                    samples[key] = s
                elif s.name in _MIN_NAMES or s.name.endswith(_MIN_SUFFIXES):
                    if s.value < cur.value:
                        samples[key] = s
                else:
                    samples[key] = Sample(s.name, s.labels, cur.value + s.value)
    out: list[Family] = []
    for head, samples in merged.values():
        head.samples = list(samples.values())
        out.append(head)
    return out


def to_metrics(families: Iterable[Family]) -> Iterator[Metric]:
    """prometheus-client ``Metric`` objects (what a collector yields) from families."""
    for fam in families:
        metric = Metric(fam.name, fam.documentation, fam.type, fam.unit)
        for s in fam.samples:
            metric.add_sample(s.name, s.labels, s.value)
        yield metric


def merge_snapshots(
    own: GatewaySnapshot,
    workers: Sequence[GatewaySnapshot],
    *,
    expected: int | None = None,
    retired: Retired | None = None,
) -> GatewaySnapshot:
    """The whole gateway's snapshot: the supervisor's (``own``: feeds' input side, journal,
    gateway info) with the workers' output side, sessions and connections added up.
    ``expected``: how many workers should have reported (fewer: not ready); ``retired``:
    what dead workers counted (added to the counters, so they never go down)."""
    gw = own.gateway
    everyone_ready = all(w.gateway.ready for w in workers)
    if expected is not None and len(workers) < expected:
        everyone_ready = False
    gateway = msgspec.structs.replace(
        gw,
        ready=gw.ready and everyone_ready,
        accepting=gw.accepting and bool(workers) and all(w.gateway.accepting for w in workers),
        port=gw.port or next((w.gateway.port for w in workers if w.gateway.port), 0),
    )
    parts = [w.feeds for w in workers]
    if retired is not None:
        parts.append(retired.feeds)
    feeds = [_merge_feed(f, parts) for f in own.feeds]
    key_sessions = dict(own.key_sessions)
    bytes_out: dict[str, float] = {}
    replays = ReplaySnapshot(active=0, bytes=dict.fromkeys(own.replays.bytes, 0))
    if retired is not None:
        _add_into(bytes_out, retired.bytes_out)
        _add_into(replays.bytes, retired.replay_bytes)
    for w in workers:
        _add_into(key_sessions, w.key_sessions)
        _add_into(bytes_out, w.bytes_out)
        replays.active += w.replays.active
        _add_into(replays.bytes, w.replays.bytes)
    return GatewaySnapshot(
        taken_at=own.taken_at,
        gateway=gateway,
        sessions=_merge_sessions([w.sessions for w in workers]),
        feeds=feeds,
        connections_unauthenticated=sum(w.connections_unauthenticated for w in workers),
        key_sessions=key_sessions,
        bytes_out=bytes_out,
        replays=replays,
    )


#: a feed's output side: summed over workers
_FEED_SUMS = (
    "records_out",
    "fanout_groups",
    "variant_builds",
    "variant_writes",
    "zstd_bytes_before",
    "zstd_bytes_after",
    "zstd_frames_built",
    "zstd_frames_written",
    "zstd_compress_seconds",
    "sessions",
)


def _merge_feed(own: FeedSnapshot, workers: Sequence[list[FeedSnapshot]]) -> FeedSnapshot:
    theirs = [f for feeds in workers for f in feeds if f.dataset == own.dataset]
    sums: dict[str, Any] = {name: sum(getattr(f, name) for f in theirs) for name in _FEED_SUMS}
    return msgspec.structs.replace(own, **sums)


#: a feed's counters (they only grow): what a dead worker's last snapshot leaves behind
_FEED_COUNTERS = tuple(name for name in _FEED_SUMS if name not in ("fanout_groups", "sessions"))
#: the sample name suffixes of counters and histograms that only grow (``_created`` not)
_GROWING = ("_total", "_bucket", "_count", "_sum")


class Retired:
    """What workers that died had counted, so the gateway's counters never go down.

    A worker's counters (records and bytes out, refusals, CPU seconds, histograms...) live
    in its process; when it dies its share would drop out of every sum and Prometheus
    would read a counter reset. The supervisor gives :meth:`add` the dead worker's last
    families and snapshot; :meth:`families` then joins the workers' families at each
    scrape and ``merge_snapshots(..., retired=)`` adds :attr:`feeds`, :attr:`bytes_out` and
    :attr:`replay_bytes`. Gauges (sessions, connections, memory) are not kept: they left
    with the process.
    """

    def __init__(self) -> None:
        self._families: list[Family] = []
        #: per dataset: the dead workers' feed counters (sessions and groups 0)
        self.feeds: list[FeedSnapshot] = []
        self.bytes_out: dict[str, float] = {}
        self.replay_bytes: dict[str, int] = {}

    def add(self, families: Sequence[Family] | None, snapshot: GatewaySnapshot | None) -> None:
        """Keep the counters of a worker that died (its last report; either may be None)."""
        if families:
            growing = [
                Family(
                    f.name,
                    f.type,
                    f.documentation,
                    f.unit,
                    [s for s in f.samples if s.name.endswith(_GROWING)],
                )
                for f in families
                if f.type in ("counter", "histogram", "summary") and f.name not in GATEWAY_FAMILIES
            ]
            self._families = merge_families(self._families, [growing])
        if snapshot is not None:
            _add_into(self.bytes_out, snapshot.bytes_out)
            _add_into(self.replay_bytes, snapshot.replays.bytes)
            mine = {f.dataset: f for f in self.feeds}
            for feed in snapshot.feeds:
                kept = mine.get(feed.dataset)
                if kept is None:
                    kept = msgspec.structs.replace(feed, sessions=0, fanout_groups=0)
                    self.feeds.append(kept)
                    continue
                for name in _FEED_COUNTERS:
                    setattr(kept, name, getattr(kept, name) + getattr(feed, name))

    def families(self) -> list[Family]:
        """The dead workers' counter and histogram families (one more "worker")."""
        return self._families


def _merge_sessions(parts: Sequence[SessionsSnapshot]) -> SessionsSnapshot:
    by_dataset: dict[str, SessionCounts] = {}
    for part in parts:
        for ds, counts in part.by_dataset.items():
            mine = by_dataset.setdefault(ds, SessionCounts())
            mine.streaming += counts.streaming
            mine.authenticated += counts.authenticated
    return SessionsSnapshot(
        total=sum(p.total for p in parts),
        by_dataset=by_dataset,
        connections_open=sum(p.connections_open for p in parts),
        unauthenticated=sum(p.unauthenticated for p in parts),
    )


def _add_into(into: dict[str, Any], more: dict[str, Any]) -> None:
    for k, v in more.items():
        into[k] = into.get(k, 0) + v


class MergedCollector:
    """The supervisor's /metrics: its own registry's families merged with the workers'
    latest, plus ``GatewayCollector`` over the merged snapshot.

    ``own`` must not be the registry this collector is registered on (it reads ``own``
    at each scrape): use :func:`merged_registry`. ``workers()`` returns each live
    worker's latest families; ``snapshot()`` the merged snapshot (the supervisor's
    ``snapshot()``, which /status reads too).
    """

    def __init__(
        self,
        own: CollectorRegistry,
        workers: Callable[[], Iterable[Sequence[Family]]],
        snapshot: Callable[[], GatewaySnapshot],
        *,
        per_key: bool = False,
        created: float | None = None,
    ) -> None:
        self._own = own
        self._workers = workers
        self._gateway = GatewayCollector(snapshot, per_key=per_key, created=created)

    def describe(self) -> Iterator[Metric]:
        return self._gateway.describe()

    def collect(self) -> Iterator[Metric]:
        yield from to_metrics(merge_families(families_of(self._own), self._workers()))
        yield from self._gateway.collect()


def merged_registry(
    own: CollectorRegistry,
    workers: Callable[[], Iterable[Sequence[Family]]],
    snapshot: Callable[[], GatewaySnapshot],
    *,
    per_key: bool = False,
    created: float | None = None,
) -> CollectorRegistry:
    """The registry the supervisor's /metrics serves (``StatusServer(..., registry=)``):
    one :class:`MergedCollector` over ``own`` (the supervisor's ``Metrics().registry``,
    with no ``GatewayCollector`` of its own) and the workers."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(MergedCollector(own, workers, snapshot, per_key=per_key, created=created))
    return registry
