"""The journal: every feed's chunks on disk, write-ahead, for replay and recovery.

``JournalStore.open(dir)`` locks a directory and recovers the ``DatasetJournal`` of every
dataset in it. A feed calls ``journal.append(index)`` right before it fans a chunk out
(each chunk gets the next seq, which survives restarts) and ``journal.learn(changed, ts)``
when its SymbolDirectory learns mappings; replays read ``entries``/``skip_before_ts``/
``mappings_as_of``/``mapping_changes`` and open the segment files with ``Segment.open_fd``.
The on-disk layout is in ``gateway.journal.format``.

With ``--workers N`` the supervisor writes the journal and each worker reads it through
``gateway.journal.follower`` (``open_follower``/``attach_follower``): the same read API,
no lock, nothing ever written, rows read from the files as the writer appends them.
"""

from gateway.journal.dataset import WRITE_BUCKETS, DatasetJournal, JournalStats
from gateway.journal.format import FORMAT_VERSION, filter_ts
from gateway.journal.segment import Entry, JournalFormatError, Segment
from gateway.journal.store import FSYNC_MODES, JournalLockedError, JournalStore

__all__ = [
    "FORMAT_VERSION",
    "FSYNC_MODES",
    "WRITE_BUCKETS",
    "DatasetJournal",
    "Entry",
    "JournalFormatError",
    "JournalLockedError",
    "JournalStats",
    "JournalStore",
    "Segment",
    "filter_ts",
]
