"""A Live client that survives disconnects and resumes exactly: nothing missed, nothing twice.

    client = await ResumingClient.connect("127.0.0.1", 13000, key, "DEMO.SYNTH",
                                          on_gap=print)
    await client.subscribe("trades", ["AAPL", "MSFT"])      # start="..." to replay first
    await client.start()
    async for batch in client.batches():                    # or client.records()
        ...
    await client.close()

How it stays exact. It authenticates with ``lsg_checkpoints=1`` (the gateway then sends it
checkpoint records: ``gateway.checkpoint``) and ``slow_reader_behavior=warn`` (a gateway
that skipped records for a slow reader would break the count). It remembers every
subscription (schema, symbols, stype_in, start) and keeps a ``ResumeCursor``: the last
checkpoint seq P and the number n of data records handed over after it. Checkpoint
records never reach the user. When the connection is lost — a socket error, the
heartbeat timeout (interval + 10 s of silence), or an end the user did not ask for (an
ErrorMsg such as ``Gateway restarting; reconnect`` then a close, or a bare close) — it
reconnects with jittered exponential backoff (``Backoff``: 0.1 s doubling to 5 s, giving
up after ``max_elapsed_s``, 60 s by default, with a ClientError), authenticates, sends
every subscription again with ``lsg_resume_after=P`` (and no ``start``), starts the
session, drops the first n data records of the new stream and carries on.

Before the first checkpoint it resumes with the subscriptions' original ``start`` (the
new session replays the same records in the same order, so dropping by count is exact
again); subscriptions without ``start`` cannot be resumed then, and the client carries on
live and reports a ``Gap`` (reason ``no_checkpoint``). When the gateway refuses the
resume — ErrorMsg ``REPLAY_DATA_AGED_OUT`` (code 8), or replay not available (no journal)
or a position its journal never held (a new journal directory) — the client reconnects
live and reports a ``Gap`` (``aged_out``/``unavailable``/``bad_resume``). Gaps
go to the ``on_gap`` callback and the ``gaps`` list, never silently. A gateway answer of
"replay limit reached" is retried with backoff. ``close()`` ends it for good.

What the user sees: the same records as ``LiveClient.batches()`` minus the checkpoint
records and minus the repeats, plus whatever gateway records each session sends (the
ErrorMsg that ended a connection, SymbolMappingMsgs again after a resume, SystemMsgs).
``metadata`` is the first session's Metadata; ``reconnects`` counts the resumes.

Upstreams and a first connection that may wait (what the relay feed,
``gateway.feeds.relay``, builds on): ``alternates`` lists more (host, port) pairs tried in
order when the current one cannot be reached; a resume by position is only ever sent to
the gateway that gave the checkpoint (another one has its own journal, where the same
number means other records), which is retried alone for ``failover_after_s`` first. A
switch to another one carries on live and reports a ``Gap`` (reason ``failover``). A
client made with the constructor takes its subscriptions with ``subscribe`` while not
connected, may be given a saved position with ``restore``, and ``connect_retrying``
makes its first connection with the same backoff as a reconnect (a refused replay then
carries on live with a ``Gap`` instead of raising). ``key`` may be a callable, asked at
every connection (a key file read again). ``on_lost(why)`` and
``on_connected(mode, upstream)`` follow the connection.

Limits: every subscription must be made before ``start()`` (a later one could not be
replayed the same way: ``subscribe`` raises then); authentication refused on a reconnect
(a key removed) and a refused ``start`` on the very first connection are raised, not
retried.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final

import numpy as np

from gateway import control
from gateway.checkpoint import Backoff, Gap, ResumeCursor
from gateway.client import SYMBOL_CHUNK, ClientError, LiveClient, RecordBatch
from gateway.dbn import RTYPE_ERROR, ErrorCode

__all__ = ["Backoff", "Gap", "ResumingClient", "Subscription"]

log = logging.getLogger("gateway.client")

_FATAL_CODES: Final = frozenset({ErrorCode.AUTH_FAILED, ErrorCode.API_KEY_DEACTIVATED})
_AGED_OUT: Final = 8  # ErrorCode.REPLAY_DATA_AGED_OUT


@dataclass(frozen=True)
class Subscription:
    """One subscription as the user made it (replayed on every reconnect)."""

    schema: str
    symbols: tuple[str, ...]
    stype_in: str
    start: str | None
    sub_id: int

    def lines(
        self, *, resume_after: int | None, with_start: bool, epoch: str | None = None
    ) -> bytes:
        """Its control lines: ``lsg_resume_after`` (with the journal's ``lsg_epoch``; never
        with start), or the original ``start`` when ``with_start``, or neither (live)."""
        return control.encode_subscriptions(
            self.schema,
            list(self.symbols),
            stype_in=self.stype_in,
            sub_id=self.sub_id,
            chunk=SYMBOL_CHUNK,
            start=self.start if with_start and resume_after is None else None,
            resume_after=resume_after,
            epoch=epoch if resume_after is not None else None,
        )


class _Refused(Exception):
    """The gateway refused a replay (kind: aged_out | unavailable | busy)."""

    def __init__(self, kind: str, text: str) -> None:
        super().__init__(text)
        self.kind = kind
        self.text = text


def classify_error(code: int, text: str) -> str | None:
    """What a gateway ErrorMsg means for a resuming client: ``fatal`` (authentication),
    ``aged_out``, ``unavailable`` (replay not available), ``bad_resume`` (a position the
    gateway's journal never had: a new journal), ``busy`` (replay limit), or None."""
    low = text.lower()
    if code in _FATAL_CODES:
        return "fatal"
    if code == _AGED_OUT:
        return "aged_out"
    if "replay" in low and ("not available" in low or "unavailable" in low):
        return "unavailable"
    if "lsg_resume_after" in low:
        return "bad_resume"  # the gateway's journal does not hold the position (a new one)
    if "replay limit" in low:
        return "busy"
    return None


class ResumingClient:
    """See the module docstring. Build it with ``await ResumingClient.connect(...)``."""

    def __init__(
        self,
        host: str,
        port: int,
        key: str | Callable[[], str],
        dataset: str,
        *,
        ts_out: bool = False,
        compression: str = "none",
        heartbeat_interval_s: int | None = None,
        timeout: float = 10.0,
        client_name: str = "gateway-client",
        backoff: Backoff | None = None,
        on_gap: Callable[[Gap], None] | None = None,
        on_reconnect: Callable[[int, str], None] | None = None,
        rng: random.Random | None = None,
        alternates: Sequence[tuple[str, int]] = (),
        failover_after_s: float = 10.0,
        on_lost: Callable[[str], None] | None = None,
        on_connected: Callable[[str, int], None] | None = None,
    ) -> None:
        self.host, self.port, self.dataset = host, port, dataset
        self._key = key
        #: every upstream, in the order they are tried; ``upstream``: the one in use
        self.upstreams: list[tuple[str, int]] = [(host, port), *alternates]
        self.upstream = 0
        #: the upstream whose checkpoints ``cursor`` counts from (None: no position)
        self.cursor_upstream: int | None = None
        self.failover_after_s = failover_after_s
        self.on_lost = on_lost
        self.on_connected = on_connected
        self.ts_out = ts_out
        self.compression = compression
        self.heartbeat_interval_s = heartbeat_interval_s
        self.timeout = timeout
        self.client_name = client_name
        self.backoff = backoff or Backoff()
        self.on_gap = on_gap
        self.on_reconnect = on_reconnect
        self._rng = rng or random.Random()
        self.subscriptions: list[Subscription] = []
        self.cursor = ResumeCursor()
        self.gaps: list[Gap] = []
        self.reconnects = 0
        self.metadata: Any = None
        self.live: LiveClient | None = None
        self._sub_id = 0
        self._closing = False
        self._closed = asyncio.Event()
        self._first = True  # the current connection is the one connect() made
        self._resumed_with: str = "live"  # how the current connection was subscribed
        # reconnect attempts since records last flowed, and since when (backoff and its
        # limits span connections that end before anything arrives)
        self._streak = 0
        self._lost_at: float | None = None
        self._round = 0  # upstreams tried in order, after the failover wait

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        key: str | Callable[[], str],
        dataset: str,
        *,
        ts_out: bool = False,
        compression: str = "none",
        heartbeat_interval_s: int | None = None,
        timeout: float = 10.0,
        client_name: str = "gateway-client",
        backoff: Backoff | None = None,
        on_gap: Callable[[Gap], None] | None = None,
        on_reconnect: Callable[[int, str], None] | None = None,
        rng: random.Random | None = None,
    ) -> ResumingClient:
        """Connect and authenticate (errors here are raised, not retried). ``on_gap`` gets
        each ``Gap``; ``on_reconnect(reconnects, mode)`` each reconnect (mode ``resume``,
        ``start`` or ``live``); ``rng`` draws the backoff jitter."""
        client = cls(
            host,
            port,
            key,
            dataset,
            ts_out=ts_out,
            compression=compression,
            heartbeat_interval_s=heartbeat_interval_s,
            timeout=timeout,
            client_name=client_name,
            backoff=backoff,
            on_gap=on_gap,
            on_reconnect=on_reconnect,
            rng=rng,
        )
        client.live = await client._open()
        return client

    async def _open(self) -> LiveClient:
        host, port = self.upstreams[self.upstream]
        key = self._key() if callable(self._key) else self._key
        return await LiveClient.connect(
            host,
            port,
            key,
            self.dataset,
            ts_out=self.ts_out,
            compression=self.compression,
            heartbeat_interval_s=self.heartbeat_interval_s,
            slow_reader_behavior="warn",
            timeout=self.timeout,
            client_name=self.client_name,
            checkpoints=True,
        )

    @property
    def started(self) -> bool:
        return self.metadata is not None

    async def subscribe(
        self,
        schema: str,
        symbols: Sequence[str] | str,
        stype_in: str = "raw_symbol",
        start: int | str | None = None,
    ) -> int:
        """Subscribe (before ``start()``); ``start`` (UNIX ns or ISO 8601) replays from then.
        Not connected yet (``connect_retrying`` comes next): only remembered."""
        if self.started:
            raise ClientError("a resuming client takes every subscription before start()")
        items = (symbols,) if isinstance(symbols, str) else tuple(symbols)
        self._sub_id += 1
        sub = Subscription(
            schema, items, stype_in, None if start is None else str(start), self._sub_id
        )
        self.subscriptions.append(sub)
        if self.live is not None:
            self.live._writer.write(sub.lines(resume_after=None, with_start=True))
            await self.live._writer.drain()
        return sub.sub_id

    def restore(self, seq: int, count: int, upstream: int, epoch: str | None = None) -> None:
        """Start from a saved position (before ``connect_retrying``): ``count`` data
        records after checkpoint ``seq`` (of the journal ``epoch``) of upstream number
        ``upstream`` were already handed over."""
        if self.started:
            raise ClientError("restore() comes before the first connection")
        self.cursor.seq = seq
        self.cursor.epoch = epoch
        self.cursor.count = count
        self.cursor_upstream = upstream

    async def connect_retrying(self) -> Any:
        """The first connection of a client made with the constructor, retried with the
        backoff like a reconnect (resuming from ``restore``'s position, if any); returns
        the Metadata. ``ClientError`` only for a refused key."""
        if self.started or self.live is not None:
            raise ClientError("connect_retrying() is for a client that never connected")
        self._first = False  # a refused replay carries on live (a Gap), it does not raise
        await self._reconnect("starting", None, initial=True)
        return self.metadata

    async def reconnect(self, why: str) -> None:
        """Connect again now (after ``batches()`` raised for a refused key, say), with
        the same backoff, resuming where the cursor stands."""
        if self.live is not None:
            await self._drop(self.live)
        await self._reconnect(why, None)

    async def start(self, timeout: float = 10.0) -> Any:
        """Send start_session and return the first session's Metadata."""
        if self.live is None or self.started:
            raise ClientError("start() was already called")
        self.metadata = await self.live.start(timeout)
        self._resumed_with = "start" if self._any_start() else "live"
        return self.metadata

    def _any_start(self) -> bool:
        return any(sub.start is not None for sub in self.subscriptions)

    async def batches(self) -> AsyncGenerator[RecordBatch, None]:
        """Batches of whole records, across reconnects, until ``close()``."""
        if not self.started:
            raise ClientError("call start() first")
        while True:
            live = self.live
            assert live is not None
            refused: _Refused | None = None
            fatal: str | None = None
            why = "the gateway closed the connection"
            try:
                async for batch in live.batches():
                    self._streak, self._lost_at = 0, None
                    for code, text in _errors(batch):
                        kind = classify_error(code, text)
                        if kind == "fatal":
                            fatal = text
                        elif kind is not None and self._resumed_with != "live":
                            refused = _Refused(kind, text)
                        why = f"gateway error: {text}"
                    index = self.cursor.feed(batch.index)
                    if index is not None:
                        yield RecordBatch(index)
            except (ClientError, OSError) as exc:
                why = str(exc) or type(exc).__name__
            if self._closing:
                return
            if fatal is not None:
                await self._drop(live)
                raise ClientError(f"the gateway ended the session: {fatal}")
            if refused is not None and self._first:
                await self._drop(live)
                raise ClientError(f"the gateway refused the replay: {refused.text}")
            await self._drop(live)
            await self._reconnect(why, refused)
            if self._closing:
                return

    async def records(self) -> AsyncGenerator[tuple[int, int, memoryview], None]:
        """(rtype, instrument_id, record view) per record, across reconnects."""
        async for batch in self.batches():
            for item in batch.records():
                yield item

    async def _drop(self, live: LiveClient) -> None:
        try:
            await live.close()
        except Exception:  # noqa: BLE001 - the connection is gone either way
            pass

    def _plan(self, refused: _Refused | None) -> tuple[str, int | None]:
        """How to subscribe the next connection: (mode, resume_after)."""
        if refused is not None and refused.kind != "busy":
            return "live", None
        if self.cursor.seq is not None:
            if self.cursor_upstream not in (None, self.upstream):
                return "live", None  # another gateway's journal: a failover
            return "resume", self.cursor.seq
        if self._any_start():
            return "start", None
        return "live", None

    def _pick_upstream(self, attempt: int, elapsed: float) -> int:
        """Which upstream attempt ``attempt`` of an outage goes to: the one the position
        came from for ``failover_after_s``, then every one in order, round and round."""
        n = len(self.upstreams)
        home = self.cursor_upstream
        if n == 1 or (home is not None and elapsed < self.failover_after_s):
            return home or 0
        self._round += 1
        return (self._round - 1) % n

    async def _reconnect(self, why: str, refused: _Refused | None, initial: bool = False) -> None:
        if not initial:
            log.info("connection lost (%s); reconnecting", why)
        if self.on_lost is not None:
            self.on_lost(why)
        if self._lost_at is None:
            self._lost_at = time.monotonic()
        self._round = 0
        lost = self._lost_at
        attempt = self._streak
        last_error = why
        while True:
            if self.backoff.exhausted(attempt, time.monotonic() - lost) and attempt:
                raise ClientError(
                    f"could not reconnect after {attempt} attempts "
                    f"({time.monotonic() - lost:.1f} s): {last_error}"
                )
            if attempt or not initial:
                try:
                    delay = self.backoff.delay(attempt, self._rng)
                    await asyncio.wait_for(self._closed.wait(), delay)
                except TimeoutError:
                    pass
            if self._closing:
                return
            attempt += 1
            self.upstream = self._pick_upstream(attempt - 1, time.monotonic() - lost)
            mode, resume_after = self._plan(refused)
            live: LiveClient | None = None
            try:
                live = await self._open()
                for sub in self.subscriptions:
                    live._writer.write(
                        sub.lines(
                            resume_after=resume_after,
                            with_start=mode == "start",
                            epoch=self.cursor.epoch,
                        )
                    )
                metadata = await live.start(self.timeout)
            except ClientError as exc:
                if live is not None:
                    await self._drop(live)
                if "authentication failed" in str(exc):
                    raise
                last_error = str(exc)
                continue
            except (OSError, TimeoutError) as exc:
                if live is not None:
                    await self._drop(live)
                last_error = str(exc) or type(exc).__name__
                continue
            break
        if self._closing:  # close() came while this connection was being made
            await self._drop(live)
            return
        self._streak = attempt
        self.live = live
        self._first = False
        self._resumed_with = mode
        if initial:
            self.metadata = metadata
        else:
            self.reconnects += 1
        failover = self.cursor.seq is not None and self.cursor_upstream not in (
            None,
            self.upstream,
        )
        if mode == "live":
            if refused is not None:
                reason, text = refused.kind, refused.text
            elif failover:
                reason = "failover"
                text = (
                    f"switched to upstream {self.upstream + 1} of {len(self.upstreams)}, "
                    "whose journal positions are not the previous upstream's"
                )
            else:
                reason = "no_checkpoint"
                text = "the connection was lost before the first checkpoint"
            if not initial or failover or refused is not None:
                self._report(reason, text, metadata)
            self.cursor.reset()
        else:
            self.cursor.begin_resume()
        self.cursor_upstream = self.upstream
        log.info(
            "%s (%s) after %d attempt(s), after_seq=%s, dropping %d record(s)",
            "connected" if initial else "reconnected",
            mode,
            attempt,
            self.cursor.seq,
            self.cursor.skip,
        )
        if self.on_connected is not None:
            self.on_connected(mode, self.upstream)
        if self.on_reconnect is not None and not initial:
            self.on_reconnect(self.reconnects, mode)

    def _report(self, reason: str, text: str, metadata: Any) -> None:
        start = getattr(metadata, "start", None)
        gap = Gap(
            reason=reason,
            after_seq=self.cursor.seq,
            last_ts_event=self.cursor.last_ts_event,
            resumed_start=int(start) if start is not None else None,
            message=text,
        )
        log.warning("resume gap: %s", gap)
        self.gaps.append(gap)
        if self.on_gap is not None:
            self.on_gap(gap)

    async def close(self) -> None:
        """End for good: no reconnect after this."""
        self._closing = True
        self._closed.set()
        if self.live is not None:
            await self.live.close()

    async def __aenter__(self) -> ResumingClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def _errors(batch: RecordBatch) -> list[tuple[int, str]]:
    """(code, text) of the ErrorMsg records in ``batch``."""
    idx = batch.index
    if RTYPE_ERROR not in idx.rtype_set:  # cached on the index, used again downstream
        return []
    out = []
    data = idx.data
    for pos in np.flatnonzero(idx.rtypes == RTYPE_ERROR).tolist():
        off = int(idx.offsets[pos])
        rec = data[off : off + int(idx.lengths[pos])]
        text = bytes(rec[16:318]).split(b"\0", 1)[0].decode("utf-8", "replace")
        out.append((rec[318] if len(rec) > 318 else 0, text))
    return out
