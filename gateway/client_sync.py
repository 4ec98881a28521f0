"""A blocking client for scripts: ``for record in client:``.

    with SyncClient("127.0.0.1", 13000, key, "DEMO.SYNTH") as client:   # resume=True
        client.subscribe("trades", ["AAPL", "MSFT"])
        client.start()
        for record in client:               # databento_dbn records (TradeMsg, SystemMsg, ...)
            print(record)

It runs the asyncio client — ``ResumingClient`` (exact resume across reconnects, the
default) or ``LiveClient`` (``resume=False``) — on an event loop in one background
thread, which hands batches over through a bounded queue (``max_batches``, 64 by default:
when the script falls behind, the thread stops reading and TCP slows the gateway down,
so memory stays bounded). Every call blocks the calling thread until the loop answers.

Iterating: ``for record in client`` yields databento_dbn record objects (convenient, one
object per record); ``client.raw()`` yields ``(rtype, instrument_id, bytes)`` and
``client.batches()`` the ``RecordBatch`` objects themselves (the fastest). Leaving the
``for record in client`` loop — ``break``, an exception, Ctrl-C (KeyboardInterrupt) —
closes the client; ``close()`` (or leaving the ``with`` block) stops the loop and joins
its thread, so no thread is left behind. ``gaps`` lists the gaps a resume reported.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Coroutine, Iterator, Sequence
from types import TracebackType
from typing import Any, Final, TypeVar

from gateway.checkpoint import Gap
from gateway.client import ClientError, LiveClient, RecordBatch
from gateway.client_resume import ResumingClient

__all__ = ["SyncClient"]

_T = TypeVar("_T")
_END: Final = object()


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class SyncClient:
    """See the module docstring. Keyword arguments go to ``ResumingClient`` (``resume``)
    or ``LiveClient.connect``; ``loop_factory`` makes the thread's event loop."""

    def __init__(
        self,
        host: str,
        port: int,
        key: str,
        dataset: str,
        *,
        resume: bool = True,
        max_batches: int = 64,
        timeout: float = 10.0,
        loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None,
        **kwargs: Any,
    ) -> None:
        self.timeout = timeout
        self.resume = resume
        self._loop = (loop_factory or asyncio.new_event_loop)()
        self._queue: asyncio.Queue[object] | None = None
        self._max_batches = max_batches
        self._pump: asyncio.Task[None] | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="gateway-sync-client", daemon=True)
        self._thread.start()
        self.client: LiveClient | ResumingClient
        try:
            if resume:
                self.client = self._call(
                    ResumingClient.connect(host, port, key, dataset, timeout=timeout, **kwargs),
                    None,
                )
            else:
                self.client = self._call(
                    LiveClient.connect(host, port, key, dataset, timeout=timeout, **kwargs), None
                )
        except BaseException:
            self._stop_loop()
            raise

    # --- the loop thread ------------------------------------------------------------------

    def _run(self) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()

    def _call(self, coro: Coroutine[Any, Any, _T], timeout: float | None) -> _T:
        if self._closed:
            coro.close()
            raise ClientError("the client is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _stop_loop(self) -> None:
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10.0)

    # --- the API ----------------------------------------------------------------------------

    @property
    def metadata(self) -> Any:
        return self.client.metadata

    @property
    def gaps(self) -> list[Gap]:
        return self.client.gaps if isinstance(self.client, ResumingClient) else []

    def subscribe(
        self,
        schema: str,
        symbols: Sequence[str] | str,
        stype_in: str = "raw_symbol",
        start: int | str | None = None,
    ) -> int:
        if isinstance(self.client, ResumingClient):
            return self._call(self.client.subscribe(schema, symbols, stype_in, start), None)
        if start is not None:
            raise ClientError("start= needs resume=True (the plain LiveClient sends no start)")
        return self._call(self.client.subscribe(schema, symbols, stype_in), None)

    def start(self) -> Any:
        """Start the session; records then flow into the queue. Returns the Metadata."""
        metadata = self._call(self.client.start(self.timeout), None)
        self._call(self._start_pump(), None)
        return metadata

    async def _start_pump(self) -> None:
        self._queue = asyncio.Queue(self._max_batches)
        self._pump = asyncio.get_running_loop().create_task(self._pump_batches(self._queue))

    async def _pump_batches(self, queue: asyncio.Queue[object]) -> None:
        gen = self.client.batches()
        try:
            async for batch in gen:
                await queue.put(batch)
            await queue.put(_END)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - handed to the reading thread
            await queue.put(_Failure(exc))
        finally:
            await gen.aclose()

    def batches(self) -> Iterator[RecordBatch]:
        """Batches until the stream ends (or the client is closed)."""
        queue = self._queue
        if queue is None:
            raise ClientError("call start() first")
        while not self._closed:
            try:
                item = self._call(queue.get(), None)
            except concurrent.futures.CancelledError:
                return  # closed from another thread: the loop cancelled the wait
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.exc
            assert isinstance(item, RecordBatch)
            yield item

    def raw(self) -> Iterator[tuple[int, int, bytes]]:
        """(rtype, instrument_id, record bytes) per record."""
        for batch in self.batches():
            for rtype, iid, rec in batch.records():
                yield rtype, iid, bytes(rec)

    def __iter__(self) -> Iterator[Any]:
        """databento_dbn records; leaving the loop closes the client."""
        try:
            for batch in self.batches():
                yield from batch.decode(self.client.ts_out)
        finally:
            self.close()

    def close(self) -> None:
        """Close the connection, stop the loop and join its thread (idempotent)."""
        if self._closed:
            return
        try:
            if self._loop.is_running():
                fut = asyncio.run_coroutine_threadsafe(self._aclose(), self._loop)
                try:
                    fut.result(self.timeout)
                except Exception:  # noqa: BLE001 - closing anyway
                    fut.cancel()
        finally:
            self._closed = True
            self._stop_loop()

    async def _aclose(self) -> None:
        await self.client.close()
        if self._pump is not None:
            self._pump.cancel()
            try:
                await self._pump
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
