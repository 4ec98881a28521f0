"""The gateway's side of the journal (``[journal]``): open the store at start, give each
feed its dataset's journal seeded with the mappings journaled so far.

Kept out of ``gateway.app`` (the composition root only calls it) and out of
``gateway.journal`` (storage knows nothing of feeds or config).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from gateway.config import JournalConfig
from gateway.errors import ConfigError
from gateway.journal import JournalStore

if TYPE_CHECKING:
    from gateway.feeds.base import Feed

__all__ = ["attach_feed", "open_store"]

log = logging.getLogger("gateway")


def open_store(jc: JournalConfig) -> JournalStore | None:
    """Open (and recover) the journal directory, locked for this gateway; None when no
    ``dir`` is configured. A directory another gateway holds (``JournalLockedError``) or
    one that cannot be made is a ConfigError naming it. Logs what it holds."""
    if jc.dir is None:
        return None
    try:
        store = JournalStore.open(
            jc.dir,
            retention_s=jc.retention_s,
            max_bytes=jc.max_bytes,
            fsync=jc.fsync,
            fsync_interval_s=jc.fsync_interval_s,
            segment_bytes=jc.segment_bytes,
            segment_span_s=jc.segment_span_s,
        )
    except OSError as exc:
        raise ConfigError(f"journal.dir {jc.dir}: cannot open the journal: {exc}") from exc
    datasets = store.datasets()
    log.info(
        "journal dir=%s datasets=%s retained=%d bytes fsync=%s retention_s=%g max_bytes=%d",
        jc.dir,
        ",".join(f"{ds}:{j.first_seq()}-{j.last_seq}" for ds, j in datasets.items()) or "none",
        sum(j.stats().bytes for j in datasets.values()),
        jc.fsync,
        jc.retention_s,
        jc.max_bytes,
    )
    return store


def attach_feed(store: JournalStore, feed: Feed) -> None:
    """Journal ``feed`` from now on, its directory seeded with every mapping journaled so
    far (a restarted gateway knows each symbol before its source is back; seeded mappings
    are not journaled again)."""
    journal = store.dataset(feed.dataset)
    # + 1: mappings learnt after the last chunk are effective before the next one
    known = journal.mappings_as_of(journal.last_seq + 1)
    if known:
        feed.directory.learn_many(list(known.items()))
    feed.journal = journal
