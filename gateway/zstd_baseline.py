"""``zstd_mode = "per_session"``: the naive zstd baseline, for benchmarks only.

Each zstd session gets its own streaming compressor and every write is compressed again
for it (one flushed block per write), instead of the design's one independent frame per
chunk shared by the whole fan-out group. ``bench`` runs it to measure what the shared
frames save; the production send path (``ClientConnection.deliver``) knows nothing of it:
``server.connection_factory`` picks this subclass when the config asks for the mode.
"""

from __future__ import annotations

import time
from typing import Any

import zstandard

from gateway.connection import ClientConnection
from gateway.fanout import Payload

__all__ = ["PerSessionZstdConnection"]


class PerSessionZstdConnection(ClientConnection):
    """A ``ClientConnection`` whose zstd sessions compress their own stream."""

    _stream: Any = None

    def deliver(self, data: Payload, records: int) -> None:
        transport = self.transport
        if not self.zstd or self.closing or transport is None:
            super().deliver(data, records)
            return
        # Never the fast path: every chunk is compressed on its way out.
        self._deliver_behind(data, records, transport.get_write_buffer_size(), self.state.clock())

    def _write_chunk(self, data: Payload, records: int, now: float) -> None:
        super()._write_chunk(self._compress(data) if self.zstd else data, records, now)

    def _compress(self, data: Payload) -> bytes:
        """This session's own stream, one flushed block per write."""
        assert self.feed is not None
        if self._stream is None:
            self._stream = zstandard.ZstdCompressor(level=self.state.zstd_level).compressobj()
        fanout = self.feed.fanout
        started = time.perf_counter()
        out: bytes = self._stream.compress(data) + self._stream.flush(
            zstandard.COMPRESSOBJ_FLUSH_BLOCK
        )
        fanout.compress_seconds += time.perf_counter() - started
        fanout.bytes_compressed_in += len(data)
        fanout.bytes_compressed_out += len(out)
        return out
