"""API keys, the CRAM check and entitlements (datasets, concurrent sessions).

CRAM: the client answers ``sha256_hex(challenge + "|" + key) + "-" + key[-5:]``; the
server finds candidate keys by that 5-character bucket id and recomputes the hash with
its own challenge. Keys are compared in constant time and never logged: logs and
metrics use ``KeyEntry.key_id``.

Sessions per key: ``KeyEntry.active`` counts this process's; with ``--workers N``
(``Authenticator.shared``, a ``gateway.workers.limits.SharedLimits``) ``max_sessions`` is
checked against the key's sessions over every worker, and the refusal names that count in
the same words.
"""

from __future__ import annotations

import hmac
import secrets
import string
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gateway.control import cram_response
from gateway.errors import AuthError

if TYPE_CHECKING:
    from gateway.workers.limits import SharedLimits

__all__ = ["Authenticator", "KeyEntry", "cram_response", "new_challenge"]

_ALPHABET = string.ascii_letters + string.digits


def new_challenge() -> str:
    """32 random alphanumeric characters (one urandom call, not 32 choice() calls)."""
    return "".join(_ALPHABET[b % len(_ALPHABET)] for b in secrets.token_bytes(32))


@dataclass(eq=False)
class KeyEntry:
    key: str = field(repr=False)
    key_id: str
    datasets: frozenset[str] | None  # None: every dataset
    max_sessions: int
    active: int = 0

    def allows(self, dataset: str) -> bool:
        return self.datasets is None or dataset in self.datasets


class Authenticator:
    """Holds the configured keys and the count of sessions open under each."""

    def __init__(self, entries: list[KeyEntry]) -> None:
        #: with ``--workers N``: sessions per key counted over every worker (None: here only)
        self.shared: SharedLimits | None = None
        self._by_bucket: dict[str, list[KeyEntry]] = {}
        for entry in entries:
            self._by_bucket.setdefault(entry.key[-5:], []).append(entry)

    @property
    def entries(self) -> list[KeyEntry]:
        return [e for bucket in self._by_bucket.values() for e in bucket]

    def replace(self, entries: list[KeyEntry]) -> tuple[list[KeyEntry], list[KeyEntry]]:
        """Serve ``entries`` from now on (a reload); returns (added, revoked).

        A key kept keeps its ``KeyEntry`` -- its open sessions and their count -- with
        the new datasets, session limit and name: a lower ``max_sessions`` applies to new
        sessions only. A revoked entry is no longer found by ``check``; its sessions are
        for the caller to end (``release`` still counts them down).
        """
        old = {e.key: e for e in self.entries}
        kept: list[KeyEntry] = []
        added: list[KeyEntry] = []
        for new in entries:
            entry = old.pop(new.key, None)
            if entry is None:
                added.append(new)
                kept.append(new)
                continue
            entry.key_id = new.key_id
            entry.datasets = new.datasets
            entry.max_sessions = new.max_sessions
            kept.append(entry)
        self._by_bucket = {}
        for entry in kept:
            self._by_bucket.setdefault(entry.key[-5:], []).append(entry)
        return added, list(old.values())

    def check(self, challenge: str, response: str) -> KeyEntry:
        """The key that produced ``response``; AuthError("Authentication failed.") if none."""
        digest, sep, bucket = response.rpartition("-")
        if not sep or len(digest) != 64:
            raise AuthError("Authentication failed.")
        for entry in self._by_bucket.get(bucket, ()):
            expected = cram_response(challenge, entry.key)
            if hmac.compare_digest(expected.encode(), response.encode()):
                return entry
        raise AuthError("Authentication failed.")

    def acquire(self, entry: KeyEntry, dataset: str, known_datasets: set[str]) -> None:
        """Admit one session of ``entry`` on ``dataset`` or raise AuthError with the reason."""
        if dataset not in known_datasets:
            raise AuthError(f"Unknown dataset {dataset[:40]}", "unknown_dataset")
        if not entry.allows(dataset):
            raise AuthError(f"API key is not entitled to dataset {dataset}", "not_entitled")
        shared = self.shared
        if shared is None:
            if entry.active >= entry.max_sessions:
                raise _session_limit(entry.active, entry.max_sessions)
        else:
            held = shared.try_acquire(entry.key, entry.max_sessions)
            if held is not None:
                raise _session_limit(held, entry.max_sessions)
        entry.active += 1

    def release(self, entry: KeyEntry) -> None:
        """One session of ``entry`` (admitted by ``acquire``) ended."""
        entry.active = max(0, entry.active - 1)
        if self.shared is not None:
            self.shared.release_key(entry.key)


def _session_limit(held: int, max_sessions: int) -> AuthError:
    return AuthError(
        f"Connection limit exceeded: this API key already has {held} of {max_sessions} sessions",
        "session_limit",
        limit="sessions_per_key",
    )
