"""The gateway's journal wiring (gateway/app.py): the store opened before any feed, each
feed given its dataset's journal and the mappings journaled so far, one gateway per
directory, closed (and unlocked) once."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway import dbn
from gateway.app import Gateway
from gateway.config import ApiKeyConfig, Config, JournalConfig
from gateway.feeds.base import Feed
from gateway.journal import JournalLockedError, JournalStore

from .conftest import NOW_NS, trade

KEY = "db-UNITKEY00000000000000000000AB"


def _config(path: Path | None) -> Config:
    return Config(
        api_keys=[ApiKeyConfig(key=KEY)],
        feeds={"JRNL.UNIT": "synthetic:"},
        journal=JournalConfig(dir=None if path is None else str(path), max_replays=3),
    )


def _chunk(*recs: bytes) -> dbn.ChunkIndex:
    index, used = dbn.index_records(b"".join(recs))
    assert used == sum(map(len, recs))
    return index


def test_no_journal_unless_configured() -> None:
    gw = Gateway(_config(None))
    gw._open_journal()
    feed = Feed("JRNL.UNIT")
    gw._attach_journal(feed)
    assert gw.journal is None and feed.journal is None
    assert gw.state.journal_enabled is False and gw.state.journal is None
    assert gw.state.max_replays == 3  # the setting is there for the adapter's refusal
    gw.close_journal()


def test_feeds_get_their_journal_and_the_mappings_journaled_so_far(tmp_path: Path) -> None:
    with JournalStore.open(tmp_path) as store:
        journal = store.dataset("JRNL.UNIT")
        journal.learn([("AAA", 7), ("BBB", 8)], ts=NOW_NS)
        assert journal.append(_chunk(trade(7), trade(8))) == 1
        journal.learn([("AAA", 9)], ts=NOW_NS + 1)  # AAA changes after seq 1
    gw = Gateway(_config(tmp_path))
    gw._open_journal()
    try:
        assert gw.state.journal_enabled is True and gw.state.journal is gw.journal
        feed = gw.feeds["JRNL.UNIT"] = Feed("JRNL.UNIT")  # as start() makes it
        gw._attach_journal(feed)
        assert gw.journal is not None
        assert feed.journal is gw.journal.dataset("JRNL.UNIT")
        assert feed.directory.by_symbol == {"AAA": 9, "BBB": 8}
        # seeded, not journaled again: the journal's symbology is as it was
        assert feed.journal.mapping_changes(0, 10) == [(1, "AAA", 7), (1, "BBB", 8), (2, "AAA", 9)]
        # and the feed appends after what was there (seqs survive the restart)
        feed.publish(_chunk(trade(9, NOW_NS + 2)))
        assert feed.journal.last_seq == 2
        # one gateway per directory
        with pytest.raises(JournalLockedError, match="locked"):
            JournalStore.open(tmp_path)
    finally:
        gw.close_journal()
    assert gw.journal is None and feed.journal is None and gw.state.journal_enabled is False
    gw.close_journal()  # idempotent
    JournalStore.open(tmp_path).close()  # unlocked


def test_a_journal_dir_that_cannot_be_made_names_it(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    gw = Gateway(_config(blocker / "journal"))
    with pytest.raises(Exception, match="journal") as exc:
        gw._open_journal()
    assert str(blocker) in str(exc.value)
    assert gw.journal is None
