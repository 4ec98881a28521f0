"""Soak settings (``SoakConfig``), the constants of the records it reads, and the
process probes (RSS, open fds) the controller samples."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from gateway.config import SlowReaderConfig

#: the default, which the soak does not change
CUT_GRACE_S = SlowReaderConfig().cut_grace_s

DATASET = "SOAK"
HOST = "127.0.0.1"
SEQ_OFFSET = 44  # u32 sequence in TradeMsg (48 B) and Mbp1Msg (80 B)
TS_RECV_OFFSET = 32  # u64 ts_recv (wall clock, ns) in both
#: records published this long after a session's start and before it left must all be there
EDGE_NS = 3_000_000_000
SCHEMA_RTYPE = {"trades": 0x00, "mbp-1": 0x01}
RTYPE_ERROR, RTYPE_MAPPING, RTYPE_SYSTEM = 0x15, 0x16, 0x17
GATEWAY_RTYPES = (RTYPE_ERROR, RTYPE_MAPPING, RTYPE_SYSTEM)
ERR_UNRESOLVED, ERR_INVALID, ERR_INTERNAL, ERR_SKIPPED = 4, 5, 6, 7
SYS_WARNING = 2
SKIP_TEXT = re.compile(r"Skipped (\d+) records after slow reading")
MASK64 = (1 << 64) - 1
UNKNOWN_SYMBOL = "NOSUCH.SYM"
#: the gateway's log line for a cut session ("id=" or "session_id=")
CUT_LINE = re.compile(r"session cut (?:session_)?id=(\d+)")
SOAK_CLIENT = "soak"


# --- configuration ------------------------------------------------------------------------


@dataclass
class SoakConfig:
    duration: float = 60.0
    #: concurrent session slots, stalled ones included
    sessions: int = 200
    stalled: int = 10
    hostile: int = 5
    workers: int = 2
    rate: float = 10_000.0
    instruments: int = 100
    seed: int = 1
    #: RSS "after warm-up" is sampled this many seconds in (default: once the first stalled
    #: warn sessions can have reached the hard cap, so their buffers are in the baseline)
    warmup: float | None = None
    poll_ms: float = 50.0
    min_life: float = 3.0
    max_life: float = 15.0
    skip_stall_min: float = 3.0
    skip_stall_max: float = 6.0
    stall_rcvbuf: int = 64 * 1024
    behind_bytes: int = 1 << 20
    behind_age_s: float = 2.0
    resume_bytes: int = 256 << 10
    warning_interval_s: float = 0.5
    hard_cap_bytes: int = 8 << 20
    handshake_timeout_s: float = 3.0
    #: SO_SNDBUF of the gateway's client sockets (0: kernel autotuning, up to tcp_wmem max,
    #: 4 MiB here, which hides a stalled reader from the slow-reader policy for seconds)
    sndbuf: int = 128 * 1024
    rss_tolerance: float = 0.10
    #: fraction of the warn-stall slots (at least one if > 0) that resume only after the
    #: gateway's cut grace period: they must not see a clean end of stream without the
    #: disconnect ErrorMsg (failures tagged "late-cut")
    late_resume: float = 0.2
    #: gateway event loop: uvloop | asyncio (default: GATEWAY_TEST_LOOP or uvloop)
    loop: str = ""
    #: print progress lines while running
    progress: bool = True

    @property
    def warmup_s(self) -> float:
        if self.warmup is not None:
            return self.warmup
        slowest_cut = (self.hard_cap_bytes + 2 * self.sndbuf) / (self.rate * 0.75 * 80)
        return max(self.duration / 3, min(self.duration / 2, 1.5 * slowest_cut + 4.0))

    def gateway_toml(self) -> str:
        return (
            "[limits]\n"
            f"handshake_timeout_s = {self.handshake_timeout_s}\n"
            "[slow_reader]\n"
            f"behind_bytes = {self.behind_bytes}\n"
            f"behind_age_s = {self.behind_age_s}\n"
            f"resume_bytes = {self.resume_bytes}\n"
            f"warning_interval_s = {self.warning_interval_s}\n"
            f"hard_cap_bytes = {self.hard_cap_bytes}\n"
            + (f"[transport]\nsndbuf = {self.sndbuf}\n" if self.sndbuf else "")
        )


# --- process probes -----------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))
