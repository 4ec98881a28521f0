"""The client-facing server: shared state of every connection, and the connection factory.

    admission.py    who may connect (connection limits, per-IP rate, refusals)
    connection.py   ClientConnection: the asyncio adapter of one subscriber socket
    session.py      the sans-I/O protocol state machine each adapter drives
    slowreader.py   slow-reader policy decisions
    linger.py       the lingering close and the reset
    zstd_baseline.py  the benchmark-only per-session zstd mode

The names other modules use (``ClientConnection``, ``HANDOVER_TEXT``, ``SHUTDOWN_TEXT``,
``reset``, ``refuse_queued``) are importable from here.
"""

from __future__ import annotations

import functools
import itertools
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gateway import admission
from gateway.admission import Admission
from gateway.auth import Authenticator
from gateway.config import LimitsConfig, SlowReaderConfig
from gateway.connection import HANDOVER_TEXT, SHUTDOWN_TEXT, ClientConnection
from gateway.linger import reset
from gateway.metrics import Metrics
from gateway.session import DEFAULT_HEARTBEAT_S
from gateway.zstd_baseline import PerSessionZstdConnection

if TYPE_CHECKING:
    from gateway.feeds.base import Feed
    from gateway.journal import JournalStore
    from gateway.replay.budget import ReplayBudget

__all__ = [
    "HANDOVER_TEXT",
    "SHUTDOWN_TEXT",
    "ClientConnection",
    "ServerState",
    "connection_factory",
    "refuse_queued",
    "reset",
]


@dataclass
class ServerState:
    """What every connection of the server shares. ``limits`` and ``slow`` are the
    config's ``[limits]`` and ``[slow_reader]`` sections (a reload replaces ``limits``)."""

    version: str
    authenticator: Authenticator
    feeds: dict[str, Feed]
    metrics: Metrics
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    slow: SlowReaderConfig = field(default_factory=SlowReaderConfig)
    default_heartbeat_s: float = DEFAULT_HEARTBEAT_S
    #: the loop's clock (monotonic): connections arm their timers with ``loop.call_at``
    clock: Callable[[], float] = time.monotonic
    #: applied to every accepted socket (transport options: buffers, busy-poll, ...)
    tune_socket: Callable[[Any], object] | None = None
    #: benchmark baseline: one streaming zstd compressor per session instead of shared frames
    zstd_per_session: bool = False
    zstd_level: int = 1
    connections: set[ClientConnection] = field(default_factory=set)
    #: bytes written to sessions so far, by (dataset, compression), after compression: each
    #: connection adds its own every tick and at its end (``SessionAccount.export_bytes``)
    bytes_out: dict[tuple[str, str], int] = field(default_factory=dict)
    accepting: bool = True
    #: a journal store is open (``[journal] dir``): replays (``start=``) can be served
    journal_enabled: bool = False
    #: the open journal store (None: no journal configured); each feed has its dataset's
    journal: JournalStore | None = None
    #: replays that may run at once (``[journal] max_replays``); past it: a clear ErrorMsg
    max_replays: int = 16
    #: bytes one replay may hand the kernel per loop turn (``[journal] replay_step_bytes``)
    replay_step_bytes: int = 1 << 20
    #: replays running now (the replay adapter counts them in and out)
    replays_active: int = 0
    #: bytes per second all replays together may send (``[journal] replay_bytes_per_s``)
    replay_budget: ReplayBudget | None = None
    #: bytes replayed so far by path: written with os.sendfile or copied through Python
    replay_bytes: dict[str, int] = field(default_factory=lambda: {"sendfile": 0, "copy": 0})
    admission: Admission = field(default_factory=Admission)
    #: with ``--workers N``: this worker's slot (-1: the single-process gateway)
    worker_slot: int = -1
    #: with ``--workers N``: the other workers' listeners on the client port (not successors)
    siblings: int = 0
    #: with ``--workers N``: connections whose transports still hold shared-ring memory
    #: (gateway.workers.pins.PinTracker); None in the single-process gateway
    pins: Any = None
    #: with ``--workers N``: gateway-wide connection and per-key session counts
    #: (gateway.workers.limits.SharedLimits); None in the single-process gateway. Given
    #: here it is bound at once (admission, authenticator and the connection sets count
    #: in it); set later, call ``shared_limits.bind(state)``
    shared_limits: Any = None
    _ids: itertools.count[int] = field(
        default_factory=lambda: itertools.count(int(time.time()) * 1000)
    )

    def __post_init__(self) -> None:
        if self.shared_limits is not None:
            self.shared_limits.bind(self)

    def admit(self, conn: ClientConnection, ip: str, now: float) -> bytes | None:
        """Admit a new connection (counted as open and unauthenticated), or return the
        ``success=0|error=`` line that refuses it (counted and logged)."""
        refusal = self.admission.refusal(
            ip,
            now,
            accepting=self.accepting,
            open_connections=len(self.connections),
            limits=self.limits,
        )
        if refusal is not None:
            return self.admission.refuse(self.metrics, conn.peer, refusal)
        self.connections.add(conn)
        self.admission.unauthenticated.add(conn)
        self.metrics.connections.labels("accepted", "none").inc()
        return None

    @property
    def unauthenticated(self) -> int:
        """Connections admitted that have not authenticated yet."""
        return len(self.admission.unauthenticated)

    def next_session_id(self) -> int:
        return next(self._ids)


def connection_factory(state: ServerState) -> Callable[[], ClientConnection]:
    """The protocol factory for the client listener (``loop.create_server``)."""
    cls = PerSessionZstdConnection if state.zstd_per_session else ClientConnection
    return functools.partial(cls, state)


def refuse_queued(state: ServerState, sock: socket.socket, text: str) -> None:
    """A connection taken from the accept queue as the listener closes: answered with
    ``success=0|error=<text>`` (counted and logged as a refusal), then closed."""
    admission.refuse_queued(state.admission, state.metrics, sock, text)
