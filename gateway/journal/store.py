"""The journal directory: its lock, its datasets, retention and the fsync thread.

``maintain()`` runs on the event loop every tick and only does cheap things: it deletes
expired segments (unlink is quick) and hands fsync work to a background thread, so the
loop never waits on the disk. A sealed segment's writer fds (mode ``segment``) or dups of
the open ones (mode ``interval``) are the thread's to fsync and close.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import queue
import threading
import time
from collections import deque
from pathlib import Path
from typing import Final

from gateway.errors import ConfigError
from gateway.journal.dataset import DatasetJournal, _Counters, _Settings
from gateway.journal.segment import Segment

__all__ = ["FSYNC_MODES", "JournalLockedError", "JournalStore"]

log = logging.getLogger("gateway.journal")

FSYNC_MODES: Final = ("never", "segment", "interval")
LOCK_NAME: Final = "LOCK"


class JournalLockedError(ConfigError):
    """Another process holds the journal directory's lock."""

    reason = "journal_locked"


_Job = tuple[str, _Counters, list[int]] | None


class _Syncer:
    """A daemon thread that fsyncs (and then closes) the fds it is handed."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self.errors: deque[tuple[str, OSError]] = deque()
        self.submitted = 0  # written by the caller's thread only
        self.done = 0  # written by the fsync thread only
        self._thread = threading.Thread(target=self._run, name="journal-fsync", daemon=True)
        self._thread.start()

    def submit(self, dataset: str, counters: _Counters, fds: list[int]) -> None:
        if fds:
            self.submitted += 1
            self._jobs.put((dataset, counters, fds))

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            dataset, counters, fds = job
            for fd in fds:
                try:
                    os.fsync(fd)
                    counters.fsyncs += 1
                except OSError as exc:
                    self.errors.append((dataset, exc))
                finally:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            self.done += 1

    @property
    def pending(self) -> int:
        return self.submitted - self.done

    def stop(self) -> None:
        self._jobs.put(None)
        self._thread.join()


class JournalStore:
    """A locked journal directory holding one ``DatasetJournal`` per dataset."""

    def __init__(self, path: Path, lock_fd: int, settings: _Settings, fsync: str,
                 fsync_interval_s: float) -> None:  # fmt: skip
        self.path = path
        self._lock_fd = lock_fd
        self._settings = settings
        self.fsync = fsync
        self.fsync_interval_s = fsync_interval_s
        self._datasets: dict[str, DatasetJournal] = {}
        self._syncer = _Syncer() if fsync != "never" else None
        self._last_sync = time.monotonic()
        #: per dataset, what was written when its files were last handed to fsync
        self._synced: dict[str, tuple[int, int]] = {}
        self._closed = False
        if fsync != "never":
            settings.on_seal = self._on_seal

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        retention_s: float = 86400.0,
        max_bytes: int = 8 << 30,
        fsync: str = "never",
        fsync_interval_s: float = 1.0,
        segment_bytes: int = 256 << 20,
        segment_span_s: float = 3600.0,
    ) -> JournalStore:
        """Lock the directory (created if missing) and recover every dataset in it.

        ``segment_bytes`` is capped at a quarter of ``max_bytes`` so the open segment
        (which retention never deletes) cannot hold the whole budget."""
        if fsync not in FSYNC_MODES:
            raise ConfigError(f"journal fsync must be one of {', '.join(FSYNC_MODES)}")
        if fsync_interval_s <= 0:
            raise ConfigError("journal fsync_interval_s must be positive")
        if retention_s <= 0 or max_bytes <= 0 or segment_bytes <= 0 or segment_span_s <= 0:
            raise ConfigError(
                "journal retention_s, max_bytes, segment_bytes and segment_span_s must be positive"
            )
        root = Path(path)
        try:
            root.mkdir(parents=True, exist_ok=True)
            lock_fd = os.open(root / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise ConfigError(f"journal dir {root}: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(lock_fd)
                raise ConfigError(f"journal dir {root}: cannot lock it: {exc}") from exc
            holder = os.pread(lock_fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(lock_fd)
            raise JournalLockedError(
                f"journal dir {root} is locked by another gateway (pid {holder})"
            ) from exc
        os.ftruncate(lock_fd, 0)
        os.pwrite(lock_fd, f"{os.getpid()}\n".encode(), 0)
        settings = _Settings(
            retention_s=retention_s,
            max_bytes=max_bytes,
            segment_bytes=max(1, min(segment_bytes, max_bytes // 4)),
            segment_span_s=segment_span_s,
        )
        store = cls(root, lock_fd, settings, fsync, fsync_interval_s)
        try:
            for child in sorted(root.iterdir()):
                if child.is_dir() and not child.name.startswith("."):
                    store._datasets[child.name] = DatasetJournal.open(child, child.name, settings)
        except BaseException:
            store.close()
            raise
        return store

    def dataset(self, name: str) -> DatasetJournal:
        """The journal of ``name`` (recovered at open, or new)."""
        journal = self._datasets.get(name)
        if journal is None:
            if not name or name.startswith(".") or "/" in name or "\0" in name:
                raise ConfigError(f"journal: bad dataset name {name!r}")
            journal = DatasetJournal.open(self.path / name, name, self._settings)
            self._datasets[name] = journal
        return journal

    def datasets(self) -> dict[str, DatasetJournal]:
        return dict(self._datasets)

    @property
    def fsyncs_pending(self) -> int:
        """fsync jobs handed to the thread and not done yet."""
        return self._syncer.pending if self._syncer is not None else 0

    # --- upkeep -------------------------------------------------------------------------

    def _on_seal(self, dataset: str, seg: Segment, fds: list[int]) -> None:
        journal = self._datasets.get(dataset)
        if self._syncer is None or journal is None:
            for fd in fds:
                os.close(fd)
            return
        self._syncer.submit(dataset, journal._counters, fds + _dir_fds(journal, seg))

    def maintain(self) -> None:
        """Cheap upkeep for the event loop tick: fsync errors reported by the thread,
        the interval fsync (handed to the thread), retention."""
        if self._closed:
            return
        syncer = self._syncer
        if syncer is not None:
            while syncer.errors:
                dataset, exc = syncer.errors.popleft()
                journal = self._datasets.get(dataset)
                if journal is not None and journal.enabled:
                    journal._disable(exc, [])
            now = time.monotonic()
            if (
                self.fsync == "interval"
                and now - self._last_sync >= self.fsync_interval_s
                and syncer.pending == 0
            ):
                self._last_sync = now
                self._sync_open()
        self._retain()

    def _sync_open(self) -> None:
        assert self._syncer is not None
        for name, journal in self._datasets.items():
            if not journal.enabled:
                continue
            fds = journal.writer_fds()
            written = journal.written()
            if not fds or self._synced.get(name) == written:
                continue  # nothing new since the last fsync
            self._synced[name] = written
            try:
                dups = [os.dup(fd) for fd in fds]
            except OSError as exc:
                log.warning("journal %s: fsync skipped: %s", name, exc)
                continue
            self._syncer.submit(name, journal._counters, dups + _dir_fds(journal, journal._writer))

    def _retain(self) -> None:
        for journal in self._datasets.values():
            for seg in journal.expired():
                journal.delete_segment(seg, "retention")
        total = sum(j.nbytes() for j in self._datasets.values())
        while total > self._settings.max_bytes:
            oldest: tuple[float, int, DatasetJournal, Segment] | None = None
            for journal in self._datasets.values():
                candidates = journal.deletable()
                if candidates:
                    seg = candidates[0]
                    key = (seg.last_write, seg.id, journal, seg)
                    if oldest is None or key[:2] < oldest[:2]:
                        oldest = key
            if oldest is None:
                break
            _, _, journal, seg = oldest
            total -= seg.nbytes
            journal.delete_segment(seg, "max_bytes")

    def close(self) -> None:
        """Final fsync per mode, release the lock. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for journal in self._datasets.values():
            dirs = _dir_fds(journal, journal._writer) if self._syncer is not None else []
            fds = journal.close()
            if self._syncer is not None and fds:
                self._syncer.submit(journal.dataset, journal._counters, fds + dirs)
            else:
                for fd in fds + dirs:
                    os.close(fd)
        if self._syncer is not None:
            self._syncer.stop()
        with contextlib.suppress(OSError):
            os.ftruncate(self._lock_fd, 0)
        os.close(self._lock_fd)

    def __enter__(self) -> JournalStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _dir_fds(journal: DatasetJournal, seg: Segment | None) -> list[int]:
    """fds of the dataset directory (and a segment's), so new files' names are durable."""
    out: list[int] = []
    try:
        out.append(os.open(journal._dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
        if seg is not None:
            out.append(seg.dir_fd())
    except OSError:
        pass
    return out
