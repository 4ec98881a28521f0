"""``lsg://HOST:PORT[,HOST2:PORT2...]?schemas=...`` — this gateway as a Live client of another.

The relay feed subscribes upstream like any client (CRAM, subscriptions, ``start_session``)
and re-serves what arrives to its own sessions exactly as a local feed would: the records go
into the dataset's ``Feed`` chunk by chunk (the same fan-out, the same zero-copy path), and
symbology is learnt from the upstream's SymbolMappingMsgs (the Feed takes them out of the
data, as it does a publisher's).

Options (every bad value is a ConfigError naming it; parsed in ``relay_options``):

- ``schemas=mbo,trades`` (required): what to subscribe to. tbbo and mbp-1 share rtype 0x01
  in DBN v3, so a session could not be given one without the other: one relay feed carries
  at most one of them (relay the other under another local name, with ``dataset=``).
- ``dataset=D``: the upstream's dataset (default: this feed's own name).
- ``symbols=A,B`` (default ``ALL_SYMBOLS``) and ``stype_in`` (default ``raw_symbol``).
- ``compression=zstd``: the upstream compresses (its frames are decoded across reads).
- ``key_env=NAME`` (default ``DATABENTO_API_KEY``, the official clients' convention) or
  ``key_file=PATH`` (a Docker secret under ``/run/secrets/``, read again at every
  connection, so a rotated key is picked up). The key is never in the URI, the logs,
  ``/status.json``, ``/metrics`` or the process title.
- ``heartbeat_interval_s=N`` (default 5): the upstream is declared lost after N + 10 s of
  silence.
- ``failover_after_s=S`` (default 10): with several upstreams, how long the one the
  position came from is retried alone before the others are tried in order.
- ``backpressure=1``: lossless toward this gateway's sessions, as for ``ingest://``: while
  one is over its write-buffer high-water mark the relay stops reading its upstream (which
  then sees a slow reader: it warns, and if it cuts the relay, the relay resumes exactly).

How it stays exact (``gateway.client_resume.ResumingClient``, the project's own client):
the upstream session asks for checkpoints and ``slow_reader_behavior=warn``; on any loss
(socket error, heartbeat timeout, the upstream cutting it, an upstream restart) it
reconnects with jittered backoff and resumes with ``lsg_resume_after`` and the exact count,
so sessions see no gap and no duplicate where the upstream's journal reaches back. Where it
does not (REPLAY_DATA_AGED_OUT, replay refused, a new journal, a failover to another
upstream), it carries on live and every session of the dataset is sent a SystemMsg
``Feed D: gap: ...``, counted in ``gateway_relay_gaps_total`` — never a silent gap.

With a journal (``--journal-dir``) the position is also saved next to the dataset's journal
(``relay-cursor.json``) whenever everything received has been journaled, so an edge that is
restarted (kill -9, a Swarm task replaced) resumes from its upstream where its own journal
ends: the records journaled after the last save are counted from the journal itself.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Final

import numpy as np

from gateway import dbn
from gateway.checkpoint import Backoff, Gap
from gateway.client import INVALID_DATA, ClientError
from gateway.client_resume import ResumingClient
from gateway.dbn import RTYPE_ERROR, RTYPE_SYSTEM, ChunkIndex, SystemCode
from gateway.feeds.base import Feed
from gateway.feeds.relay_options import RelayOptions, read_key

__all__ = ["CursorFile", "RelaySource", "RelayStats"]

log = logging.getLogger("gateway.feed")

CURSOR_FILE: Final = "relay-cursor.json"
#: how often the position is saved (when everything received is journaled)
SAVE_EVERY_S: Final = 0.5
#: after a refused key, how long before the next try (a rotated key is read again)
REFUSED_RETRY_S: Final = 5.0
_NOT_RELAYED: Final = np.array([RTYPE_SYSTEM, RTYPE_ERROR], dtype=np.uint8)
_HEARTBEAT_CODE_AT: Final = 319


@dataclass
class RelayStats:
    """What ``/metrics`` and ``/status.json`` show of a relay feed (see ops/snapshot.py)."""

    upstreams: int
    #: 1-based position of the upstream in use (0 while none)
    upstream_index: int = 0
    up: bool = False
    reconnects: dict[str, int] = field(default_factory=lambda: {"resume": 0, "live": 0})
    gaps: dict[str, int] = field(default_factory=dict)
    deduplicated: int = 0
    #: the upstream's last checkpoint (its journal position; None: none yet)
    checkpoint: int | None = None
    #: the last outage: loss of the upstream to the first byte of the resumed stream
    resume_s: float = 0.0
    #: monotonic time of the last data or heartbeat from the upstream (0: none yet)
    last_heard: float = 0.0


class CursorFile:
    """The relay's upstream position, saved next to the dataset's journal.

    ``{"upstream": "host:port", "dataset": D, "seq": P, "epoch": E, "count": n,
    "journal_seq": S}``: after upstream checkpoint P of its journal E, n data records were
    handed to the feed, and this gateway's journal held them all at its seq S. Written by
    rename, so a reader sees one whole version.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._last: tuple[object, ...] | None = None

    def load(self) -> dict[str, object] | None:
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("relay position %s unreadable (%s): starting live", self.path, exc)
            return None
        if not isinstance(raw, dict):
            return None
        ok = (
            isinstance(raw.get("upstream"), str)
            and isinstance(raw.get("dataset"), str)
            and all(isinstance(raw.get(k), int) and raw[k] >= 0 for k in ("count", "journal_seq"))
            and isinstance(raw.get("seq"), int)
            and isinstance(raw.get("epoch", ""), str)
        )
        if not ok:
            log.warning("relay position %s malformed: starting live", self.path)
            return None
        return raw

    def save(
        self, upstream: str, dataset: str, seq: int, epoch: str, count: int, journal_seq: int
    ) -> None:
        state = (upstream, dataset, seq, epoch, count, journal_seq)
        if state == self._last:
            return
        tmp = self.path.with_suffix(".tmp")
        body = {
            "upstream": upstream,
            "dataset": dataset,
            "seq": seq,
            "epoch": epoch,
            "count": count,
            "journal_seq": journal_seq,
        }
        tmp.write_text(json.dumps(body), encoding="utf-8")
        os.replace(tmp, self.path)
        self._last = state


class RelaySource:
    kind = "relay"

    def __init__(
        self,
        feed: Feed,
        opts: RelayOptions,
        *,
        backoff: Backoff | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.feed = feed
        self.opts = opts
        self.backoff = backoff or Backoff(initial_s=0.1, max_s=5.0, max_elapsed_s=None)
        self._clock = clock
        self.stats = RelayStats(upstreams=len(opts.upstreams))
        feed.relay = self.stats
        self.client: ResumingClient | None = None
        self._task: asyncio.Task[None] | None = None
        self._saver: asyncio.Task[None] | None = None
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._lost_at: float | None = None
        self._cursor_file: CursorFile | None = None
        self._stopping = False
        self._ever_connected = False
        feed.flow_listeners.append(self._on_flow)

    # --- life cycle -------------------------------------------------------------------

    async def start(self) -> None:
        feed, opts = self.feed, self.opts
        read_key(feed.dataset, opts)  # a missing key stops the start here, named
        # The feed carries exactly these schemas (tbbo or mbp-1 decided here, not by
        # the upstream's Metadata, which says nothing when it mixes schemas).
        feed.on_metadata(SimpleNamespace(schema=",".join(opts.schemas)), mappings=[])
        client = self.client = ResumingClient(
            opts.upstreams[0][0],
            opts.upstreams[0][1],
            lambda: read_key(feed.dataset, opts),
            opts.dataset,
            compression=opts.compression,
            heartbeat_interval_s=opts.heartbeat_interval_s,
            client_name=f"lsg-relay/{feed.dataset}",
            backoff=self.backoff,
            alternates=opts.upstreams[1:],
            failover_after_s=opts.failover_after_s,
            on_gap=self._on_gap,
            on_lost=self._on_lost,
            on_connected=self._on_connected,
        )
        for schema in opts.schemas:
            await client.subscribe(schema, list(opts.symbols), stype_in=opts.stype_in)
        self._restore(client)
        feed.set_state(False, "connecting to the upstream", notify=False)
        self._task = asyncio.create_task(self._run(), name=f"relay-{feed.dataset}")
        self._saver = asyncio.create_task(self._save_loop(), name=f"relay-save-{feed.dataset}")

    async def stop(self) -> None:
        self._stopping = True
        for task in (self._task, self._saver):
            if task is not None:
                task.cancel()
        for task in (self._task, self._saver):
            if task is not None:
                try:
                    await task
                except (asyncio.CancelledError, Exception):  # noqa: BLE001 - stopping
                    pass
        if self.client is not None:
            await self.client.close()
        self._save()

    # --- the saved position -------------------------------------------------------------

    def _upstream_name(self, index: int) -> str:
        host, port = self.opts.upstreams[index]
        return f"{host}:{port}"

    def _restore(self, client: ResumingClient) -> None:
        journal = self.feed.journal
        if journal is None:
            return
        self._cursor_file = CursorFile(journal.directory / CURSOR_FILE)
        saved = self._cursor_file.load()
        if saved is None:
            return
        names = [self._upstream_name(i) for i in range(len(self.opts.upstreams))]
        if saved["dataset"] != self.opts.dataset or saved["upstream"] not in names:
            log.warning(
                "feed %s: the saved relay position is for another upstream or dataset: "
                "starting live",
                self.feed.dataset,
            )
            return
        seq, count, at = saved["seq"], saved["count"], saved["journal_seq"]
        assert isinstance(seq, int) and isinstance(count, int) and isinstance(at, int)
        if seq < 0:
            return  # saved before the first checkpoint: nothing to resume from
        extra = journal.records_after(at)
        epoch = str(saved.get("epoch") or "") or None
        client.restore(seq, count + extra, names.index(str(saved["upstream"])), epoch)
        log.info(
            "feed %s: resuming upstream %s after checkpoint %d (+%d records; %d journaled "
            "after the last save)",
            self.feed.dataset,
            names.index(str(saved["upstream"])) + 1,
            seq,
            count + extra,
            extra,
        )

    def _save(self) -> None:
        cf, client, journal = self._cursor_file, self.client, self.feed.journal
        if cf is None or client is None or journal is None or not journal.enabled:
            return
        if not self.feed.settled or client.cursor_upstream is None:
            return  # chunks received but not journaled yet: the next turn
        cursor = client.cursor
        try:
            cf.save(
                self._upstream_name(client.cursor_upstream),
                self.opts.dataset,
                -1 if cursor.seq is None else cursor.seq,
                cursor.epoch or "",
                cursor.count,
                journal.last_seq,
            )
        except OSError as exc:
            log.warning("feed %s: cannot save the relay position: %s", self.feed.dataset, exc)

    async def _save_loop(self) -> None:
        while True:
            await asyncio.sleep(SAVE_EVERY_S)
            client = self.client
            if client is not None:  # a batch of only a checkpoint never reaches _relay
                self.stats.checkpoint = client.cursor.seq
                self.stats.deduplicated = client.cursor.dropped
            self._save()

    # --- the stream ---------------------------------------------------------------------

    def _on_flow(self, paused: bool) -> None:
        if paused:
            self._flowing.clear()
        else:
            self._flowing.set()

    async def _run(self) -> None:
        client = self.client
        assert client is not None
        feed = self.feed
        first = True
        while not self._stopping:
            try:
                if first:
                    await client.connect_retrying()
                    first = False
                async for batch in client.batches():
                    self._relay(batch.index)
                    if not self._flowing.is_set():
                        await self._flowing.wait()
                return  # closed
            except ClientError as exc:
                # the upstream refused the key or the session (a wrong dataset): keep trying,
                # slowly (its reason is in the log, not told to sessions)
                log.error("feed %s: upstream refused the relay: %s", feed.dataset, exc)
                feed.set_state(False, "upstream refused the relay's session; retrying")
                self.stats.up = False
                await asyncio.sleep(REFUSED_RETRY_S)
                if not first:
                    try:
                        await client.reconnect("the upstream refused the relay")
                    except ClientError as again:
                        log.error("feed %s: %s", feed.dataset, again)
                        continue

    def _relay(self, index: ChunkIndex) -> None:
        stats = self.stats
        now = self._clock()
        stats.last_heard = now
        if self._lost_at is not None:
            stats.resume_s = now - self._lost_at
            self._lost_at = None
        client = self.client
        if client is not None:
            stats.deduplicated = client.cursor.dropped
            stats.checkpoint = client.cursor.seq
        rtset = index.rtype_set
        if RTYPE_SYSTEM in rtset or RTYPE_ERROR in rtset:
            index = self._upstream_notices(index)
            if index.count == 0:
                return
        self.feed.publish(index)

    def _upstream_notices(self, index: ChunkIndex) -> ChunkIndex:
        """Take the upstream session's own System/Error records out: heartbeats and
        checkpoints are the link's, not data. Its other notices are logged."""
        rtypes = index.rtypes
        drop = np.isin(rtypes, _NOT_RELAYED)
        data = index.data
        for pos in np.flatnonzero(drop).tolist():
            off = int(index.offsets[pos])
            rec = data[off : off + int(index.lengths[pos])]
            rtype = int(rtypes[pos])
            if rtype == RTYPE_SYSTEM and len(rec) > _HEARTBEAT_CODE_AT:
                if rec[_HEARTBEAT_CODE_AT] == SystemCode.HEARTBEAT:
                    continue
            text = bytes(rec[16:318]).split(b"\0", 1)[0].decode("utf-8", "replace")
            log.info("feed %s: upstream says: %s", self.feed.dataset, text[:200])
        if not drop.any():
            return index
        return dbn.index_records(index.select(~drop))[0]

    # --- what the client reports ---------------------------------------------------------

    def _on_lost(self, why: str) -> None:
        if why.startswith(INVALID_DATA):
            # counted like a publisher's bad DBN; the resume starts after the last whole
            # valid batch, so a broken upstream is retried, never skipped past
            self.feed.invalid_inputs += 1
        if self._stopping or not self._ever_connected:
            return  # the first connection: the state already says "connecting"
        if self.stats.up:
            self._lost_at = self._clock()
        self.stats.up = False
        self.stats.upstream_index = 0
        self.feed.set_state(False, "upstream lost; reconnecting")
        log.warning("feed %s: upstream lost: %s", self.feed.dataset, why)

    def _on_connected(self, mode: str, upstream: int) -> None:
        stats = self.stats
        self._ever_connected = True
        stats.up = True
        stats.upstream_index = upstream + 1
        stats.last_heard = self._clock()
        if mode in stats.reconnects and self.client is not None and self.client.reconnects:
            stats.reconnects[mode] += 1
        n = len(self.opts.upstreams)
        log.info(
            "feed %s: relay upstream %d/%d connected (%s)", self.feed.dataset, upstream + 1, n, mode
        )
        what = "upstream connected" if n == 1 else f"upstream {upstream + 1} of {n} connected"
        self.feed.set_state(True, what)

    def _on_gap(self, gap: Gap) -> None:
        stats = self.stats
        stats.gaps[gap.reason] = stats.gaps.get(gap.reason, 0) + 1
        since = f" after ts_event {gap.last_ts_event}" if gap.last_ts_event else ""
        text = (
            f"gap: the upstream could not resume exactly ({gap.reason}); records{since} "
            "up to the live stream that follows may be missing"
        )
        log.error("feed %s: %s: %s", self.feed.dataset, text, gap.message)
        feed = self.feed
        # a state change tells every session of the dataset (workers too) with a SystemMsg
        feed.set_state(feed.connected, text)
