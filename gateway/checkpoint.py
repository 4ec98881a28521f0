"""Resume checkpoints: the opt-in records that make a reconnect exact.

A session that asks for them (auth field ``lsg_checkpoints=1``, which the official clients
never send) gets, now and then, a SystemMsg with code 255 (UNSET) and the text
``lsg-checkpoint seq=<N>``. It means: every record of journal chunks up to ``N`` that this
session selects was sent before this record. A client that counts the data records it got
after its last checkpoint can resume with ``lsg_resume_after=N`` and drop that many records
of the replay: nothing missed, nothing twice. Other sessions never see one.
"""

from __future__ import annotations

from typing import Final

from gateway.dbn.encode import encode_system
from gateway.dbn.records import RTYPE_SYSTEM, SystemCode

__all__ = ["CHECKPOINT_PREFIX", "encode_checkpoint", "parse_checkpoint"]

CHECKPOINT_PREFIX: Final = b"lsg-checkpoint seq="
_MSG_AT: Final = 16
_CODE_AT: Final = 319


def encode_checkpoint(ts_event: int, seq: int) -> bytes:
    """The checkpoint record for journal position ``seq``."""
    return encode_system(ts_event, f"lsg-checkpoint seq={seq}", SystemCode.UNSET)


def parse_checkpoint(record: bytes | memoryview) -> int | None:
    """The journal position a checkpoint record carries, or None for any other record."""
    if len(record) < 320 or record[1] != RTYPE_SYSTEM or record[_CODE_AT] != SystemCode.UNSET:
        return None
    text = bytes(record[_MSG_AT : _MSG_AT + 64]).split(b"\0", 1)[0]
    if not text.startswith(CHECKPOINT_PREFIX):
        return None
    digits = text[len(CHECKPOINT_PREFIX) :]
    return int(digits) if digits.isdigit() else None
