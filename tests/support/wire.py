"""A raw Live client over a real socket, for tests that need the exact bytes.

``RawClient`` blocks (integration tests); ``AsyncRawClient`` runs on the event loop (the
soak's hostile clients). Both write control lines with ``gateway.control`` and read the
gateway's replies as text, then the DBN stream as bytes: ``split_records`` cuts an
uncompressed stream into its Metadata header and records, ``error_texts`` and
``error_records`` pull the ErrorMsgs out.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import Sequence

from gateway import control

__all__ = [
    "RTYPE_ERROR",
    "AsyncRawClient",
    "RawClient",
    "error_records",
    "error_texts",
    "split_records",
]

RTYPE_ERROR = 0x15


def _extra_fields(extra: str) -> dict[str, control.FieldValue]:
    """``"|k=v|k2=v2"`` (the tests' old way to add auth fields) as fields in order."""
    return {k: v for k, _, v in (t.partition("=") for t in extra.split("|") if t)}


class RawClient:
    """Blocking; every read bounded by ``timeout`` (the socket's)."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""

    def line(self) -> str:
        while b"\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError(f"closed; have {self.buf!r}")
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_all(self, limit: float = 10.0) -> bytes:
        """Everything until the gateway closes the connection."""
        self.sock.settimeout(limit)
        out = self.buf
        self.buf = b""
        while True:
            try:
                data = self.sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not data:
                break
            out += data
        return out

    def recv_some(self, limit: float = 5.0) -> bytes:
        self.sock.settimeout(limit)
        if self.buf:
            out, self.buf = self.buf, b""
            return out
        return self.sock.recv(1 << 20)

    def handshake(self, key: str, dataset: str = "DEMO.SYNTH", extra: str = "") -> str:
        """Greeting, CRAM and the auth request; the gateway's reply line.

        ``extra`` is ``"|key=value..."`` added before ``client=test``."""
        assert self.line().startswith("lsg_version=")
        cram = self.line()
        assert cram.startswith("cram=")
        self.send(
            control.encode_auth(
                control.cram_response(cram[5:], key),
                dataset,
                extra=_extra_fields(extra),
                client="test",
            )
        )
        return self.line()

    def subscribe(
        self,
        schema: str,
        symbols: Sequence[str] | str,
        stype_in: str = "raw_symbol",
        sub_id: int = 1,
    ) -> None:
        self.send(control.encode_subscriptions(schema, symbols, stype_in=stype_in, sub_id=sub_id))

    def start(self) -> None:
        self.send(control.START_SESSION)

    def records(self, limit: float = 10.0) -> tuple[bytes, list[bytes]]:
        """(Metadata header, records) of everything until the gateway closes."""
        return split_records(self.read_all(limit))

    def close(self) -> None:
        self.sock.close()


class AsyncRawClient:
    """On the event loop, every step bounded by ``limit_s``; ``ended`` says how a read
    ended (``eof``, ``reset`` or ``timeout``). Its auth request leaves out ``compression``
    (the gateway's default, none)."""

    def __init__(
        self,
        port: int,
        key: str,
        dataset: str,
        *,
        host: str = "127.0.0.1",
        limit_s: float = 8.0,
        client_name: str = "test",
    ) -> None:
        self.port = port
        self.key = key
        self.dataset = dataset
        self.host = host
        self.limit_s = limit_s
        self.client_name = client_name
        self.sock: socket.socket | None = None
        self.buf = b""
        self.ended = ""

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    async def open(self, rcvbuf: int | None = None) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock = sock
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.wait_for(self.loop.sock_connect(sock, (self.host, self.port)), 5)

    async def send(self, data: bytes) -> bool:
        assert self.sock is not None
        try:
            await asyncio.wait_for(self.loop.sock_sendall(self.sock, data), self.limit_s)
        except (ConnectionError, BrokenPipeError):
            return False
        return True

    async def recv(self, limit: float | None = None) -> bytes | None:
        """Some bytes; b"" at EOF; None on reset or timeout (``self.ended`` tells)."""
        assert self.sock is not None
        try:
            data = await asyncio.wait_for(
                self.loop.sock_recv(self.sock, 1 << 18), limit or self.limit_s
            )
        except (ConnectionResetError, ConnectionAbortedError):
            self.ended = "reset"
            return None
        except TimeoutError:
            self.ended = "timeout"
            return None
        if not data:
            self.ended = "eof"
        return data

    async def line(self) -> str | None:
        while b"\n" not in self.buf:
            data = await self.recv()
            if not data:
                return None
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode("ascii", "replace")

    async def to_end(self, limit: float | None = None, cap: int = 64 << 20) -> bytes:
        """Everything until the gateway closes (``ended`` is eof, reset or timeout)."""
        out = [self.buf]
        self.buf = b""
        size = 0
        deadline = time.monotonic() + (limit or self.limit_s)
        while size < cap:
            left = deadline - time.monotonic()
            if left <= 0:
                self.ended = "timeout"
                break
            data = await self.recv(left)
            if not data:
                break
            out.append(data)
            size += len(data)
        return b"".join(out)

    def auth_line(
        self,
        challenge: str,
        dataset: str | None = None,
        *,
        key: str | None = None,
        ts_out: bool = False,
        compression: str | None = None,
        slow_reader_behavior: str | None = None,
    ) -> bytes:
        """The authentication request answering ``challenge``."""
        return control.encode_auth(
            control.cram_response(challenge, self.key if key is None else key),
            self.dataset if dataset is None else dataset,
            ts_out=ts_out,
            compression=compression,
            slow_reader_behavior=slow_reader_behavior,
            client=self.client_name,
        )

    async def greeting(self) -> str | None:
        """The challenge, after the greeting; None if the gateway said something else."""
        if await self.line() is None:
            return None
        cram = await self.line()
        return cram[5:] if cram and cram.startswith("cram=") else None

    async def authed(self) -> bool:
        challenge = await self.greeting()
        if challenge is None:
            return False
        await self.send(self.auth_line(challenge))
        reply = await self.line()
        return bool(reply and reply.startswith("success=1"))

    async def streaming(self, schema: str = "mbp-1") -> bool:
        """Authenticated, subscribed to ALL_SYMBOLS of ``schema``, started, and the first
        bytes are a DBN Metadata header (kept in ``buf``)."""
        if not await self.authed():
            return False
        sub = control.encode_subscription(schema, control.ALL_SYMBOLS, snapshot=None, is_last=None)
        await self.send(sub)
        await self.send(control.START_SESSION)
        data = await self.recv()
        if not data:
            return False
        self.buf = data
        return data[:3] == b"DBN"

    def reset(self) -> None:
        """Close with an RST (SO_LINGER 0)."""
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.sock.close()

    def half_close(self) -> None:
        assert self.sock is not None
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()


def split_records(data: bytes) -> tuple[bytes, list[bytes]]:
    """(Metadata header, records) of an uncompressed DBN stream."""
    assert data[:3] == b"DBN", data[:40]
    length = int.from_bytes(data[4:8], "little")
    head, rest = data[: 8 + length], data[8 + length :]
    records = []
    off = 0
    while off < len(rest):
        size = rest[off] * 4
        records.append(rest[off : off + size])
        off += size
    assert off == len(rest)
    return head, records


def error_texts(records: list[bytes]) -> list[tuple[int, str]]:
    """(code, text) of every ErrorMsg record."""
    out = []
    for rec in records:
        if rec[1] == RTYPE_ERROR:
            out.append((rec[318], rec[16:318].split(b"\0", 1)[0].decode()))
    return out


def error_records(stream: bytes) -> list[tuple[int, str]] | None:
    """(code, text) of the ErrorMsgs of an uncompressed stream, stopping at a cut record;
    None if it is not DBN."""
    if stream[:3] != b"DBN" or len(stream) < 8:
        return None
    off = 8 + int.from_bytes(stream[4:8], "little")
    out = []
    while off < len(stream):
        size = stream[off] * 4
        if size < 16 or off + size > len(stream):
            break
        if stream[off + 1] == RTYPE_ERROR:
            rec = stream[off : off + size]
            out.append((rec[318], rec[16:318].split(b"\0", 1)[0].decode("utf-8", "replace")))
        off += size
    return out
