"""The project's lean asyncio client for the Live Raw API.

    async with await LiveClient.connect("127.0.0.1", 13000, key, "DEMO.SYNTH") as client:
        await client.subscribe("trades", ["AAPL", "MSFT"])
        metadata = await client.start()
        async for batch in client.batches():       # whole records, one memoryview per read
            for rtype, instrument_id, record in batch.records():
                ...

No per-record Python objects unless asked: ``batches()`` yields ``RecordBatch`` objects
that wrap one memoryview of whole records plus a numpy header index;
``RecordBatch.decode()`` turns them into databento_dbn objects for convenience.
Handles CRAM authentication, 500-symbol subscription chunks, zstd streams made of many
independent frames, and a heartbeat timeout (interval + 10 s of silence). Every record is
checked against its rtype's size before it is handed over; a stream that breaks that ends
with a ClientError (``INVALID_DATA``).

``LiveClient`` is one connection: when it ends, the stream ends. Built on it:
``gateway.client_resume.ResumingClient`` reconnects with backoff and resumes exactly
(checkpoint records, ``lsg_resume_after``: nothing missed, nothing twice) and
``gateway.client_sync.SyncClient`` is the blocking ``for record in client:`` for scripts.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncGenerator, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import databento_dbn as dbn

from gateway import control
from gateway.compress import FrameDecompressor
from gateway.dbn import (
    PRELUDE_LEN,
    RTYPE_ERROR,
    ChunkIndex,
    index_records,
)
from gateway.dbn.validate import first_invalid
from gateway.errors import DbnError, GatewayError

__all__ = ["ClientError", "FrameDecompressor", "LiveClient", "RecordBatch"]

SYMBOL_CHUNK = control.SYMBOL_CHUNK
CLIENT_TIMEOUT_MARGIN_S = 10.0
#: how a ClientError for records that are not valid DBN v3 begins (the stream is then
#: over: whole records are never handed on half-checked)
INVALID_DATA = "invalid data from the gateway"
_READ_SIZE = 256 * 1024


class ClientError(GatewayError):
    """Raised by LiveClient: refused authentication, timeouts, a closed stream."""


@dataclass
class RecordBatch:
    index: ChunkIndex

    @property
    def data(self) -> memoryview:
        return self.index.data

    def __len__(self) -> int:
        return self.index.count

    def records(self) -> Iterator[tuple[int, int, memoryview]]:
        """(rtype, instrument_id, record view) per record."""
        idx = self.index
        data = idx.data
        for i in range(idx.count):
            off = int(idx.offsets[i])
            yield (
                int(idx.rtypes[i]),
                int(idx.instrument_ids[i]),
                data[off : off + int(idx.lengths[i])],
            )

    def errors(self) -> list[str]:
        """Texts of the gateway ErrorMsg records in this batch."""
        out = []
        for rtype, _, rec in self.records():
            if rtype == RTYPE_ERROR:
                out.append(bytes(rec[16:318]).split(b"\0", 1)[0].decode("utf-8", "replace"))
        return out

    def decode(self, ts_out: bool = False) -> list[Any]:
        """databento_dbn record objects (convenient, slow: one object per record)."""
        decoder = dbn.DBNDecoder(has_metadata=False, ts_out=ts_out, input_version=3)
        decoder.write(bytes(self.index.data))
        return list(decoder.decode())


async def _connect_socket(
    host: str, port: int, timeout: float, rcvbuf: int | None
) -> socket.socket:
    """A connected socket to ``host`` (every address it resolves to, in order), within
    ``timeout`` in all. The name lookup runs in a thread and cannot be cancelled: when
    the timeout abandons it, its outcome is still collected (asyncio would otherwise log
    "Future exception was never retrieved" for a lookup that fails later)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    lookup = asyncio.ensure_future(loop.getaddrinfo(host, port, type=socket.SOCK_STREAM))
    lookup.add_done_callback(lambda f: None if f.cancelled() else f.exception())
    try:
        infos = await asyncio.wait_for(asyncio.shield(lookup), timeout)
    except TimeoutError:
        raise TimeoutError(f"looking up {host!r} took more than {timeout:g} s") from None
    last: BaseException | None = None
    for family, kind, proto, _, address in infos:
        sock = socket.socket(family, kind, proto)
        try:
            if rcvbuf is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.setblocking(False)
            left = max(0.001, deadline - loop.time())
            await asyncio.wait_for(loop.sock_connect(sock, address), left)
        except (OSError, TimeoutError) as exc:
            sock.close()
            last = exc
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    if last is not None:
        raise last
    raise OSError(f"{host!r} resolves to no address")


class LiveClient:
    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        compression: str,
        ts_out: bool,
        heartbeat_interval_s: int | None,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self.compression = compression
        self.ts_out = ts_out
        self.heartbeat_interval_s = heartbeat_interval_s
        self.session_id = ""
        self.metadata: Any = None
        self.started = False
        self._sub_id = 0
        self._buffer = bytearray()
        self._decompressor = FrameDecompressor() if compression == "zstd" else None
        self.bytes_received = 0

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        key: str,
        dataset: str,
        *,
        ts_out: bool = False,
        compression: str = "none",
        heartbeat_interval_s: int | None = None,
        slow_reader_behavior: str | None = None,
        timeout: float = 10.0,
        client_name: str = "gateway-client",
        rcvbuf: int | None = None,
        checkpoints: bool = False,
    ) -> LiveClient:
        """Connect and authenticate. ``rcvbuf`` sets SO_RCVBUF before connecting (a small
        value makes the kernel hold less for a slow consumer); ``checkpoints`` asks for the
        resume checkpoint records (``lsg_checkpoints=1``, as ``ResumingClient`` does)."""
        if compression not in ("none", "zstd"):
            raise ClientError(f"compression must be none or zstd, not {compression!r}")
        sock = await _connect_socket(host, port, timeout, rcvbuf)
        try:
            opened = asyncio.open_connection(sock=sock, limit=256 * 1024)
            reader, writer = await asyncio.wait_for(opened, timeout)
        except BaseException:
            sock.close()
            raise
        client = cls(
            reader,
            writer,
            compression=compression,
            ts_out=ts_out,
            heartbeat_interval_s=heartbeat_interval_s,
        )
        try:
            await asyncio.wait_for(
                client.authenticate(
                    key,
                    dataset,
                    slow_reader_behavior=slow_reader_behavior,
                    client_name=client_name,
                    checkpoints=checkpoints,
                ),
                timeout,
            )
        except BaseException:
            await client.close()
            raise
        return client

    async def _line(self) -> dict[str, str]:
        raw = await self._reader.readline()
        if not raw.endswith(b"\n"):
            raise ClientError("gateway closed the connection during the handshake")
        return dict(t.partition("=")[::2] for t in raw.decode().rstrip("\n").split("|"))

    async def authenticate(
        self,
        key: str,
        dataset: str,
        *,
        slow_reader_behavior: str | None = None,
        client_name: str = "gateway-client",
        checkpoints: bool = False,
    ) -> None:
        """The CRAM handshake on an open connection (``connect()`` does it for you; the
        probe calls it separately to time connect and auth apart)."""
        slow, name = slow_reader_behavior, client_name
        greeting = await self._line()
        if "lsg_version" not in greeting:
            raise ClientError(f"unexpected greeting {greeting}")
        challenge = await self._line()
        if "cram" not in challenge:
            reason = challenge.get("error", str(challenge))
            raise ClientError(f"no challenge from the gateway: {reason}")
        self._writer.write(
            control.encode_auth(
                control.cram_response(challenge["cram"], key),
                dataset,
                ts_out=self.ts_out,
                compression=self.compression,
                heartbeat_interval_s=self.heartbeat_interval_s,
                slow_reader_behavior=slow,
                lsg_checkpoints=True if checkpoints else None,
                client=name,
            )
        )
        reply = await self._line()
        if reply.get("success") != "1":
            raise ClientError(f"authentication failed: {reply.get('error', reply)}")
        self.session_id = reply.get("session_id", "")

    async def subscribe(
        self,
        schema: str,
        symbols: Sequence[str] | str,
        stype_in: str = "raw_symbol",
        sub_id: int | None = None,
    ) -> int:
        if sub_id is None:
            self._sub_id += 1
            sub_id = self._sub_id
        self._writer.write(
            control.encode_subscriptions(
                schema, symbols, stype_in=stype_in, sub_id=sub_id, chunk=SYMBOL_CHUNK
            )
        )
        await self._writer.drain()
        return sub_id

    async def start(self, timeout: float = 10.0) -> Any:
        """Send start_session and return the decoded Metadata header."""
        if self.started:
            raise ClientError("start() was already called")
        self.started = True
        self._writer.write(control.START_SESSION)
        await self._writer.drain()

        async def read_metadata() -> Any:
            while True:
                if len(self._buffer) >= PRELUDE_LEN:
                    if bytes(self._buffer[:3]) != b"DBN":
                        raise ClientError("stream does not start with a DBN Metadata header")
                    length = int.from_bytes(self._buffer[4:8], "little")
                    if len(self._buffer) >= PRELUDE_LEN + length:
                        head = bytes(self._buffer[: PRELUDE_LEN + length])
                        del self._buffer[: PRELUDE_LEN + length]
                        return dbn.Metadata.decode(head)
                if not await self._fill():
                    raise ClientError("gateway closed the connection before the Metadata")

        self.metadata = await asyncio.wait_for(read_metadata(), timeout)
        return self.metadata

    async def _read(self) -> bytes | None:
        """One read of the stream, decompressed (None at its end)."""
        data = await self._reader.read(_READ_SIZE)
        if not data:
            return None
        self.bytes_received += len(data)
        if self._decompressor is not None:
            data = self._decompressor.decompress(data)
        return data

    async def _fill(self) -> bool:
        data = await self._read()
        if data is None:
            return False
        self._buffer += data
        return True

    async def batches(self) -> AsyncGenerator[RecordBatch, None]:
        """Batches of whole records until the gateway closes the stream."""
        if self.metadata is None:
            raise ClientError("call start() first")
        silence = float(self.heartbeat_interval_s or 30) + CLIENT_TIMEOUT_MARGIN_S
        # One read is one batch over the bytes as read (a partial record left at its end
        # is completed by one copy with the next read): immutable, so a batch can be
        # written on (uvloop keeps a reference) and never changes under its index.
        pending = bytes(self._buffer)
        self._buffer.clear()
        while True:
            if pending:
                try:
                    index, used = index_records(pending)
                except DbnError as exc:
                    raise ClientError(f"{INVALID_DATA}: {exc}") from None
                if used:
                    bad = first_invalid(index)
                    if bad is not None:
                        raise ClientError(f"{INVALID_DATA}: record {bad[0]}: {bad[1]}")
                    pending = pending[used:]
                    yield RecordBatch(index)
                    continue
            try:
                # a timeout scope, not wait_for: no task made per read
                async with asyncio.timeout(silence):
                    more = await self._read()
            except TimeoutError:
                raise ClientError(f"gateway timeout: {silence:g} s without data") from None
            if more is None:
                if pending:
                    raise ClientError(f"stream ended inside a record ({len(pending)} bytes left)")
                return
            pending = pending + more if pending else more

    async def close(self) -> None:
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except (ConnectionError, OSError):
            pass

    async def __aenter__(self) -> LiveClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
