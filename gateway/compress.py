"""zstd streams made of independent frames (what the gateway writes and files hold)."""

from __future__ import annotations

import zstandard

from gateway.errors import DbnError

__all__ = ["ZSTD_MAGIC", "FrameDecompressor"]

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class FrameDecompressor:
    """Decompresses concatenated independent zstd frames, fed in pieces of any size."""

    def __init__(self) -> None:
        self._dctx = zstandard.ZstdDecompressor()
        self._obj = self._dctx.decompressobj()
        self._in_frame = False

    def decompress(self, data: bytes) -> bytes:
        out: list[bytes] = []
        while data:
            self._in_frame = True
            out.append(self._obj.decompress(data))
            if not self._obj.eof:
                break
            self._in_frame = False
            data = self._obj.unused_data
            self._obj = self._dctx.decompressobj()
        return b"".join(out)

    def finish(self) -> None:
        if self._in_frame:
            raise DbnError("zstd stream ends inside a frame (truncated file?)")
