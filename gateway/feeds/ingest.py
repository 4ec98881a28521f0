"""``ingest://HOST:PORT`` — a listener where one publisher writes a DBN stream.

The stream is a DBN Metadata header followed by records, exactly as a ``.dbn`` file
(uncompressed). The gateway learns symbols from the Metadata mappings and from
SymbolMappingMsg / InstrumentDefMsg records, and fans records out as they arrive, cut
at record boundaries. One publisher at a time; when it leaves (or sends garbage and is
dropped) sessions are told with a SystemMsg and the next publisher carries on.

``backpressure=1`` makes the feed lossless: while any session is over its write-buffer
high-water mark the gateway stops reading the publisher's socket, so TCP slows it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import cast

from gateway.dbn import DbnStreamDecoder
from gateway.errors import DbnError
from gateway.feeds.base import Feed

__all__ = ["IngestSource"]

log = logging.getLogger("gateway.feed")


class IngestSource:
    kind = "ingest"

    def __init__(self, feed: Feed, host: str, port: int) -> None:
        self.feed = feed
        self.host = host
        self.port = port
        self.server: asyncio.Server | None = None
        self.active: _Publisher | None = None
        self.publishers_seen = 0
        self.errors = 0
        feed.flow_listeners.append(self._on_flow)

    def _on_flow(self, paused: bool) -> None:
        pub = self.active
        if pub is not None and pub.transport is not None and not pub.transport.is_closing():
            if paused:
                pub.transport.pause_reading()
            else:
                pub.transport.resume_reading()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _Publisher(self), self.host, self.port)
        sock = self.server.sockets[0].getsockname()
        self.port = sock[1]
        self.feed.set_state(
            False, f"waiting for a publisher on {self.host}:{self.port}", notify=False
        )
        log.info("feed %s: ingest listening on %s:%d", self.feed.dataset, self.host, self.port)

    async def stop(self) -> None:
        if self.active is not None and self.active.transport is not None:
            self.active.transport.close()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


class _Publisher(asyncio.Protocol):
    def __init__(self, source: IngestSource) -> None:
        self.source = source
        self.transport: asyncio.Transport | None = None
        self.decoder = DbnStreamDecoder()
        self.peer = "?"
        self.live = False

    def connection_made(self, base: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, base)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        src = self.source
        if src.active is not None:
            log.warning(
                "feed %s: refusing second publisher %s (one is connected)",
                src.feed.dataset,
                self.peer,
            )
            transport.close()
            return
        src.active = self
        src.publishers_seen += 1
        self.live = True
        if src.feed.paused:
            transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        if not self.live:
            return
        feed = self.source.feed
        had_metadata = self.decoder.metadata is not None
        try:
            chunks = self.decoder.feed(data)
            if not had_metadata and self.decoder.metadata is not None:
                meta_dataset = str(self.decoder.metadata.dataset)
                if meta_dataset and meta_dataset != feed.dataset:
                    raise DbnError(
                        f"publisher Metadata is for dataset {meta_dataset}, "
                        f"this feed serves {feed.dataset}"
                    )
                feed.on_metadata(self.decoder.metadata)
                feed.set_state(True, f"publisher {self.peer} connected")
            for index in chunks:
                feed.publish(index)
            if self.decoder.error is not None:
                raise self.decoder.error
        except DbnError as exc:
            self.source.errors += 1
            log.error("feed %s: publisher %s sent invalid DBN: %s", feed.dataset, self.peer, exc)
            self._end(f"publisher sent invalid DBN ({exc}); waiting for a publisher")
            assert self.transport is not None
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.live:
            pending = self.decoder.pending
            detail = "publisher disconnected"
            if pending:
                detail += f" mid-record ({pending} bytes of a partial record dropped)"
            self._end(detail + "; waiting for a publisher")

    def _end(self, detail: str) -> None:
        if not self.live:
            return
        self.live = False
        src = self.source
        if src.active is self:
            src.active = None
        src.feed.set_state(False, detail)
