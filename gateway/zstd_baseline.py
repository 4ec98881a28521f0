"""``zstd_mode = "per_session"``: the naive zstd baseline, for benchmarks only.

Each zstd session gets its own streaming compressor and every write is compressed again
for it (one flushed block per write), instead of the design's one independent frame per
chunk shared by the whole fan-out group. ``bench`` runs it to measure what the shared
frames save. The production send path (``ClientConnection.deliver``) and fan-out
(``FanOut``) know nothing of it: when the config asks for the mode,
``server.connection_factory`` picks :class:`PerSessionZstdConnection` and the gateway
builds its feeds' fan-outs as :class:`PerSessionZstdFanOut`.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import zstandard

from gateway.connection import ClientConnection
from gateway.fanout import FanOut, OutputSpec, Payload, Subscriber

__all__ = ["PerSessionZstdConnection", "PerSessionZstdFanOut"]


class PerSessionZstdFanOut(FanOut):
    """A ``FanOut`` that builds no shared frame: a zstd member is grouped as if it were
    plain (same selection and ts_out), is handed the raw variant, and compresses it with
    its own stream (:class:`PerSessionZstdConnection`). No frame is built or written."""

    def place(self, member: Subscriber, spec: OutputSpec) -> None:
        super().place(member, dataclasses.replace(spec, zstd=False) if spec.zstd else spec)


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
