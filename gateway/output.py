"""What a streaming session writes, and at what pace: ``SessionOutput``, the ``FeedMember``
side of a client connection (``connection.ClientConnection`` is one).

Market-data chunks from the fan-out go to the socket as they are on the fast path (nothing
queued); once bytes queue, ``slowreader.SlowReader`` gives the verdict (send, skip, cut)
and its notices. The session's own gateway records (acks, mappings, errors, heartbeats)
are framed here: ts_out-stamped when asked, one independent zstd frame per piece for zstd
sessions, and they count against the same cap as market data. Flow control (the
transport's pause/resume) is passed on to the feed. While a replay owns the socket
(``replay``, gateway/replay/run.py) the session's own records go into its pump, in order
after what the replay queued, and the feed is not told of pauses (it is not in the feed).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from gateway import dbn
from gateway.fanout import Payload
from gateway.slowreader import SlowReader, Verdict

if TYPE_CHECKING:
    from gateway.feeds.base import Feed
    from gateway.replay.run import ReplayRun
    from gateway.server import ServerState
    from gateway.session import Session

__all__ = ["SessionOutput"]


class SessionOutput:
    ts_out = False
    zstd = False

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.transport: asyncio.Transport | None = None
        self.session: Session | None = None
        self.feed: Feed | None = None
        #: the socket is being closed (lingering close, or refused): nothing more to send
        self.closing = False
        self.slow = SlowReader(state.slow)
        self.records_sent = self.bytes_sent = 0
        #: ``state.clock`` at the last write (heartbeats count from it)
        self.last_write = 0.0
        self.paused = False
        #: the replay that owns the socket until its hand-over to live (gateway/replay)
        self.replay: ReplayRun | None = None

    @property
    def metadata_sent(self) -> bool:
        return self.session is not None and self.session.stream_open

    def cut(self, label: str, message: str) -> None:
        """End the session for being too far behind (the connection does it)."""
        raise NotImplementedError

    def _write_control(self, head: bytes, records: list[bytes]) -> None:
        """Metadata (if any) plus gateway records, as one piece (one zstd frame); while a
        replay owns the socket, into its pump (after what the replay queued)."""
        if self.transport is None or self.transport.is_closing():
            return
        body = dbn.stamp_records(records, time.time_ns()) if self.ts_out else b"".join(records)
        data = head + body
        if not data:
            return
        if self.zstd:
            data = self._compress(data)
        run = self.replay
        if run is not None and run.active:
            run.pump.push_bytes(data)  # counted as the pump writes it
            return
        self.transport.write(data)
        self.bytes_sent += len(data)
        self.last_write = self.state.clock()

    def _compress(self, data: bytes) -> bytes:
        """This session's own bytes as one independent zstd frame."""
        assert self.feed is not None
        return self.feed.fanout.compress(data)

    def send_gateway_records(self, records: list[bytes]) -> None:
        if not records or self.closing or not self.metadata_sent:
            return
        transport = self.transport
        if transport is not None:
            # The session's own records count against its cap like market data does.
            size = sum(map(len, records))
            if transport.get_write_buffer_size() + size > self.state.slow.hard_cap_bytes:
                self._cut_over_cap()
                return
        self._write_control(b"", records)

    def write_snapshot(self, data: bytes, records: int) -> None:
        """Book snapshot records (gateway/books), written as they are (stamped for a ts_out
        session, one zstd frame for a compressed one); they count against the session's
        cap like market data."""
        transport = self.transport
        if not data or self.closing or transport is None or not self.metadata_sent:
            return
        if self.ts_out:
            index, _ = dbn.index_records(data)
            data = dbn.stamp_ts_out(index, None, time.time_ns())
        if transport.get_write_buffer_size() + len(data) > self.state.slow.hard_cap_bytes:
            self._cut_over_cap()
            return
        if self.zstd:
            data = self._compress(data)
        transport.write(data)
        self.records_sent += records
        self.bytes_sent += len(data)
        self.last_write = self.state.clock()

    def deliver(self, data: Payload, records: int) -> None:
        transport = self.transport
        if self.closing or transport is None:
            return
        now = self.state.clock()
        slow = self.slow
        buffered = transport.get_write_buffer_size()
        if not buffered and not slow.skipped:
            # Fast path: nothing queued, so not behind under any policy.
            slow.mark_drained()
            transport.write(data)
            self.records_sent += records
            self.bytes_sent += len(data)
            self.last_write = now
            return
        self._deliver_behind(data, records, buffered, now)

    def _deliver_behind(self, data: Payload, records: int, buffered: int, now: float) -> None:
        slow = self.slow
        verdict = slow.on_chunk(buffered, len(data), records, now)
        if slow.notices:
            self._send_notices()
        if verdict is Verdict.SEND:
            self._write_chunk(data, records, now)
        elif verdict is Verdict.SKIP:
            self.state.metrics.records_skipped.inc(records)
        else:
            self._cut_over_cap()

    def _write_chunk(self, data: Payload, records: int, now: float) -> None:
        assert self.transport is not None
        self.transport.write(data)
        self.records_sent += records
        self.bytes_sent += len(data)
        self.last_write = now

    def _cut_over_cap(self) -> None:
        cap = self.state.slow.hard_cap_bytes
        self.cut("slow_reader_cap", f"slow reader: more than {cap} bytes buffered; disconnecting")

    def _tell_skipped(self) -> None:
        """A session that ends in the middle of a skip episode (the client leaves, or the
        gateway ends it) is still told how many records it missed since its last notice."""
        if self.slow.skipped and self.metadata_sent and not self.closing:
            self.slow.resume(self.state.clock())
            self._send_notices()

    def _send_notices(self) -> None:
        notices = self.slow.notice_records(time.time_ns())
        for policy, event, _ in notices:
            self.state.metrics.slow_reader_events.labels(policy, event).inc()
        self.send_gateway_records([record for _, _, record in notices])

    def _set_paused(self, paused: bool) -> None:
        if paused == self.paused:
            return
        self.paused = paused
        if self.replay is not None:
            # Not in the feed yet (a replay never holds a lossless feed back); the replay
            # stops producing while the transport is over its high-water mark.
            if not paused:
                self.replay.resume()
            return
        if self.feed is not None:
            self.feed.member_blocked(self, paused)
