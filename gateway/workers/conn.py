"""A client connection in a worker process (``--workers N``): ``WorkerConnection``.

It is ``ClientConnection`` with one difference in ``deliver``: chunks come from the shared
ring as memoryviews into the mapping (``state.pins``, a ``pins.PinTracker``, names the
entry being published). Where the loop's transports keep references to written buffers
(uvloop; the stdlib loop from Python 3.12), such a view must not stay queued once the ring
wants its space back:

- fast path (nothing queued): the view is written as is; if the transport kept part of
  it, the entry is pinned (the worker does not release it until the transport sent it);
- behind path (bytes already queued): the transport would queue the view itself, so the
  session gets a copy (one ``bytes`` copy per entry, shared by every session behind).

A view that is not the entry's own object is copied if it is read-only (every view of the
ring's PROT_READ mapping is; the fan-out's filtered selections are views of fresh writable
numpy copies and go out as they are). Under the stdlib loop up to 3.11 (it copies) every
payload is written unchanged.
``connection_lost`` drops the connection's pins.
"""

from __future__ import annotations

from gateway.connection import ClientConnection
from gateway.fanout import Payload
from gateway.workers.pins import PinTracker

__all__ = ["WorkerConnection"]


class WorkerConnection(ClientConnection):
    """One subscriber socket of a worker process (``state.pins`` is its PinTracker)."""

    def deliver(self, data: Payload, records: int) -> None:
        transport = self.transport
        if self.closing or transport is None:
            return
        pins: PinTracker = self.state.pins
        ring_view = pins.enabled and type(data) is memoryview and data.readonly
        if ring_view and data is not pins.current_view:
            # Read-only but not the entry's own object: possibly a view derived from the
            # ring (every view of the PROT_READ mapping is read-only); copied. The fan-out's
            # own selections are views of fresh, writable numpy copies: written as they are.
            data = bytes(data)
            ring_view = False
        now = self.state.clock()
        slow = self.slow
        buffered = transport.get_write_buffer_size()
        if not buffered and not slow.skipped:
            slow.mark_drained()
            transport.write(data)
            self.records_sent += records
            self.bytes_sent += len(data)
            self.last_write = now
            if ring_view and transport.get_write_buffer_size():
                pins.note(self, pins.current_pos, self.bytes_sent)
            return
        if ring_view:
            data = pins.copy_of_current()
        self._deliver_behind(data, records, buffered, now)

    def connection_lost(self, exc: Exception | None) -> None:
        pins = self.state.pins
        if pins is not None:
            pins.drop(self)
        super().connection_lost(exc)
