"""``file:PATH`` — replay a .dbn or .dbn.zst file (DBN v1-v3, served as v3).

Pacing follows the records' own ``ts_event``: ``pace=realtime`` (default), a speed
factor (``pace=10``), or ``pace=max``. ``loop=1`` starts again at the end. A file
replayed at ``pace=max`` waits for its sessions (lossless back-pressure) by default:
a file can always wait; with real-time pacing it follows the feed's ``backpressure``.

A looping feed whose replay fails (the file is missing for a moment, being rewritten,
empty, truncated or corrupt) retries with backoff — 0.5 s doubling to 10 s, back to
0.5 s after a pass that completes — and is reported down ("file replay failed: <reason>;
retrying") until a replay starts again. A non-looping feed reports the failure and stops.
Sessions are told a generic reason; the path and the exact error go to the log.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import zstandard

from gateway.aio import cancel_and_wait
from gateway.compress import ZSTD_MAGIC, FrameDecompressor
from gateway.dbn import UNDEF_TIMESTAMP, ChunkIndex, DbnStreamDecoder, index_records
from gateway.errors import DbnError
from gateway.feeds.base import Feed

__all__ = ["FileSource"]

log = logging.getLogger("gateway.feed")

_BLOCK = 256 * 1024
LOOP_RATE = 20
RETRY_FIRST_S = 0.5
RETRY_MAX_S = 10.0


class _FileProblem(DbnError):
    """A file that is not a whole DBN stream; ``reason`` is safe to tell sessions."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def public_reason(exc: BaseException) -> str:
    """What sessions may be told about a failed replay: no path, no OS error text."""
    if isinstance(exc, _FileProblem):
        return exc.reason
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    if isinstance(exc, IsADirectoryError):
        return "path is a directory"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, OSError):
        return "read error"
    if isinstance(exc, zstandard.ZstdError):
        return "invalid zstd data"
    if isinstance(exc, DbnError):
        return "invalid DBN data"
    return "internal error"


def read_blocks(path: Path) -> Iterator[bytes]:
    """The file's DBN bytes in blocks, decompressing a .zst (any number of frames)."""
    with path.open("rb") as raw:
        first = raw.read(_BLOCK)
        if not first.startswith(ZSTD_MAGIC):
            block = first
            while block:
                yield block
                block = raw.read(_BLOCK)
            return
        dec = FrameDecompressor()
        block = first
        while block:
            out = dec.decompress(block)
            if out:
                yield out
            block = raw.read(_BLOCK)
        dec.finish()


class FileSource:
    kind = "file"

    def __init__(self, feed: Feed, path: Path, pace: float | None, loop: bool) -> None:
        """``pace``: None for max speed, else a speed factor (1.0 = real time)."""
        self.feed = feed
        self.path = path
        self.pace = pace
        self.loop = loop
        self._task: asyncio.Task[None] | None = None
        self._resume = asyncio.Event()
        self._resume.set()
        feed.flow_listeners.append(self._on_flow)
        self.failures = 0

    def _on_flow(self, paused: bool) -> None:
        if paused:
            self._resume.clear()
        else:
            self._resume.set()

    async def start(self) -> None:
        if not self.path.exists():
            raise DbnError(f"feed file {self.path} does not exist")
        if self.path.is_dir():
            raise DbnError(f"feed file {self.path} is a directory, not a file")
        if not self.path.is_file():
            raise DbnError(f"feed file {self.path} is not a regular file")
        self._task = asyncio.get_running_loop().create_task(self._run())
        self._task.add_done_callback(self._task_done)

    async def stop(self) -> None:
        if self._task is not None and self._task.done():
            return  # ended on its own (its exception was logged by _task_done)
        await cancel_and_wait(self._task)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        # _run handles every Exception; this catches what is not one (a decoder panic).
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        log.error("feed %s: file %s replay died: %r", self.feed.dataset, self.path, exc)
        self.feed.set_state(False, "file replay failed: internal error")

    async def _run(self) -> None:
        feed = self.feed
        delay = RETRY_FIRST_S
        while True:
            try:
                await self._replay_once()
            except Exception as exc:
                self.failures += 1
                if isinstance(exc, (DbnError, zstandard.ZstdError)):
                    feed.invalid_inputs += 1
                reason = public_reason(exc)
                if reason == "internal error":
                    log.exception("feed %s: file %s failed", feed.dataset, self.path)
                if not self.loop:
                    log.error("feed %s: file %s failed: %s", feed.dataset, self.path, exc)
                    feed.set_state(False, f"file replay failed: {reason}")
                    return
                log.error(
                    "feed %s: file %s failed: %s; retrying in %.1f s",
                    feed.dataset,
                    self.path,
                    exc,
                    delay,
                )
                feed.set_state(False, f"file replay failed: {reason}; retrying")
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            delay = RETRY_FIRST_S
            if not self.loop:
                log.info("feed %s: replay of %s finished", feed.dataset, self.path)
                feed.set_state(True, "replay finished")
                return
            # Never spin on a tiny file: at most LOOP_RATE passes a second.
            await asyncio.sleep(1.0 / LOOP_RATE)

    async def _replay_once(self) -> None:
        feed = self.feed
        decoder = DbnStreamDecoder()
        loop = asyncio.get_running_loop()
        wall0: float | None = None
        ts0: int | None = None
        total = 0
        for block in read_blocks(self.path):
            total += len(block)
            chunks = decoder.feed(block)
            if wall0 is None and decoder.metadata is not None:
                feed.on_metadata(decoder.metadata, decoder.mappings)
                if not feed.connected:
                    log.info("feed %s: replaying %s", feed.dataset, self.path)
                feed.set_state(True, "replaying")
                wall0 = loop.time()
            for index in chunks:
                if ts0 is None:
                    ts0 = _first_defined(index.ts_events)
                assert wall0 is not None
                for piece, due in self._paced(index, ts0):
                    if due is not None:
                        delay = wall0 + due - loop.time()
                        if delay > 0:
                            await asyncio.sleep(delay)
                    await self._resume.wait()
                    feed.publish(piece)
                await asyncio.sleep(0)
            if decoder.error is not None:
                raise decoder.error
        if decoder.metadata is None:
            if total == 0:
                raise _FileProblem("the file is empty", f"{self.path} is empty")
            raise _FileProblem(
                "truncated Metadata header",
                f"{self.path} ends inside its Metadata header ({total} bytes)",
            )
        if decoder.pending:
            raise _FileProblem(
                "the file ends with a truncated record",
                f"{self.path} ends with a truncated record ({decoder.pending} bytes)",
            )

    def _paced(self, index: ChunkIndex, ts0: int) -> list[tuple[ChunkIndex, float | None]]:
        if self.pace is None or index.count == 0:
            return [(index, None)]
        ts = index.ts_events
        # UNDEF_TIMESTAMP (u64::MAX) records go out with the record before them.
        due = np.where(
            ts == np.uint64(UNDEF_TIMESTAMP),
            0.0,
            (ts.astype(np.float64) - float(ts0)) / 1e9 / self.pace,
        )
        due = np.maximum.accumulate(np.maximum(due, 0.0))
        bucket = (due * 1000).astype(np.int64)  # 1 ms granularity
        cuts = np.flatnonzero(np.diff(bucket)) + 1
        starts = np.concatenate(([0], cuts))
        ends = np.concatenate((cuts, [index.count]))
        out: list[tuple[ChunkIndex, float | None]] = []
        for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
            lo = int(index.offsets[s])
            hi = int(index.offsets[e - 1] + index.lengths[e - 1])
            piece, _ = index_records(index.data[lo:hi])
            out.append((piece, float(due[s])))
        return out


def _first_defined(ts: npt.NDArray[np.uint64]) -> int:
    defined = ts[ts != np.uint64(UNDEF_TIMESTAMP)]
    return int(defined[0]) if defined.size else 0
