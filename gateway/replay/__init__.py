"""Intraday replay: serving ``start=`` (and resumes) from the journal, then live.

``plan`` decides what a replaying session gets, in journal order; ``pump`` writes it,
with ``os.sendfile`` for whole byte ranges of journal files.
"""
