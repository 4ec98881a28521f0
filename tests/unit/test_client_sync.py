"""The blocking client (``for record in client:``) against the scripted fake gateway.

The fake gateway runs on the test's event loop; the script runs in a worker thread
(``asyncio.to_thread``), as a user's script would, with the client's own loop in the
client's background thread. Checked: records come through once across a resume, leaving
the loop (break, KeyboardInterrupt) closes the client, and its thread is gone after.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable
from typing import Any

import databento_dbn as d
import pytest

from gateway.client_sync import SyncClient
from tests.conftest import TEST_LOOP
from tests.unit.test_client_resume import (
    DATASET,
    FAST,
    KEY,
    FakeGateway,
    R,
    ckpt,
    send,
    send_and_hold,
    send_then_cut,
)


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    if TEST_LOOP == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return asyncio.new_event_loop


def client_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "gateway-sync-client"]


def sequences(records: list[Any]) -> list[int]:
    return [int(r.sequence) for r in records if isinstance(r, d.TradeMsg)]


async def test_for_record_in_client_resumes_and_break_closes() -> None:
    scripts = [send_then_cut(*R[0:3], ckpt(1), R[3]), send_and_hold(R[3], *R[4:12])]
    async with FakeGateway(scripts) as gw:

        def script() -> tuple[list[Any], SyncClient]:
            got: list[Any] = []
            client = SyncClient(
                "127.0.0.1", gw.port, KEY, DATASET, backoff=FAST, loop_factory=loop_factory()
            )
            client.subscribe("trades", "ALL_SYMBOLS")
            client.start()
            for record in client:
                got.append(record)
                if len(sequences(got)) == 8:
                    break
            return got, client

        got, client = await asyncio.wait_for(asyncio.to_thread(script), 20.0)
    assert sequences(got) == list(range(8))
    assert not any(isinstance(r, d.SystemMsg) for r in got)  # the checkpoint was taken out
    assert client.gaps == [] and len(gw.conns) == 2
    assert not client._thread.is_alive() and client_threads() == []


async def test_keyboard_interrupt_closes_and_raw_and_plain_mode() -> None:
    async with FakeGateway([send(*R[0:5])]) as gw:

        def script() -> tuple[bool, list[tuple[int, int, bytes]], SyncClient, SyncClient]:
            interrupted = False
            first = SyncClient("127.0.0.1", gw.port, KEY, DATASET, loop_factory=loop_factory())
            first.subscribe("trades", "ALL_SYMBOLS")
            first.start()
            try:
                for _record in first:
                    raise KeyboardInterrupt
            except KeyboardInterrupt:
                interrupted = True
            # plain LiveClient underneath: the stream simply ends when the gateway closes
            with SyncClient(
                "127.0.0.1", gw.port, KEY, DATASET, resume=False, loop_factory=loop_factory()
            ) as plain:
                plain.subscribe("trades", ["X"])
                plain.start()
                raw = list(plain.raw())
            return interrupted, raw, first, plain

        interrupted, raw, first, plain = await asyncio.wait_for(asyncio.to_thread(script), 20.0)
    assert interrupted
    assert [rec for _, _, rec in raw] == R[0:5]
    assert [(rtype, iid) for rtype, iid, _ in raw] == [(0, 1 + i % 3) for i in range(5)]
    assert gw.conns[1].auth.get("lsg_checkpoints") is None  # resume=False asks for none
    assert not first._thread.is_alive() and not plain._thread.is_alive()
    assert client_threads() == []


def test_a_failed_connect_leaves_no_thread() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens here
    with pytest.raises(OSError):
        SyncClient("127.0.0.1", port, KEY, DATASET, loop_factory=loop_factory())
    assert client_threads() == []
