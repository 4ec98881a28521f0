"""The journal: every feed's chunks on disk, write-ahead, for replay and recovery."""
