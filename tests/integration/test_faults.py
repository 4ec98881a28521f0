"""Feeds that die, lie or come back, and a gateway that is told to stop."""

from __future__ import annotations

import shutil
import signal
import socket
import tempfile
import time
from pathlib import Path

import databento_dbn as dbn
import numpy as np

from gateway.dbn import encode_publisher_metadata
from tests.integration.helpers import (
    DATA,
    OfficialSession,
    RawClient,
    data_records,
    error_texts,
    gateway,
    split_records,
    start_gateway,
    synthetic_trades,
)


def _system_texts(records: list[object]) -> list[str]:
    return [
        r.msg
        for r in records
        if isinstance(r, dbn.SystemMsg) and r.code != dbn.SystemCode.SUBSCRIPTION_ACK
    ]


def test_publisher_dies_mid_record_then_another_one_carries_on() -> None:
    symbols, first = synthetic_trades(200, seed=1)
    _, second = synthetic_trades(300, seed=2)
    with gateway(feeds={"ING.F": "ingest://127.0.0.1:0"}) as gw:
        port = gw.ingest_ports["ING.F"]
        s = OfficialSession(gw.port, "ING.F", [{"schema": "trades", "symbols": "ALL_SYMBOLS"}])
        s.start()
        pub = socket.create_connection(("127.0.0.1", port))
        pub.sendall(
            encode_publisher_metadata("ING.F", time.time_ns(), symbols)
            + b"".join(first)
            + second[0][:20]
        )  # dies 20 bytes into a record
        assert s.wait_for(lambda r: len(data_records(r)) >= len(first))
        pub.close()
        assert s.wait_for(lambda r: any("mid-record" in t for t in _system_texts(r)))
        # A new publisher (a reconnecting feed handler) continues the same feed.
        pub = socket.create_connection(("127.0.0.1", port))
        pub.sendall(encode_publisher_metadata("ING.F", time.time_ns(), symbols) + b"".join(second))
        assert s.wait_for(lambda r: len(data_records(r)) >= len(first) + len(second))
        time.sleep(0.2)  # deliberate: time for any record too many to arrive
        pub.close()
        assert s.stop() is None
    got = [bytes(r) for r in data_records(s.records)]
    assert got == first + second  # the partial record was dropped, nothing else
    texts = _system_texts(s.records)
    assert any(
        "publisher disconnected mid-record (20 bytes of a partial record dropped)" in t
        for t in texts
    )
    assert any("connected" in t and "disconnected" not in t for t in texts)


def test_publisher_sending_garbage_is_dropped_and_sessions_are_told() -> None:
    symbols, recs = synthetic_trades(100, seed=3)
    with gateway(feeds={"ING.G": "ingest://127.0.0.1:0"}) as gw:
        port = gw.ingest_ports["ING.G"]
        s = OfficialSession(gw.port, "ING.G", [{"schema": "trades", "symbols": "ALL_SYMBOLS"}])
        s.start()
        bad = socket.create_connection(("127.0.0.1", port))
        bad.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        bad.settimeout(5)
        assert bad.recv(10) == b""  # the gateway hung up on it
        bad.close()
        bad = socket.create_connection(("127.0.0.1", port))
        bad.sendall(
            encode_publisher_metadata("ING.G", time.time_ns(), symbols)
            + recs[0]
            + b"\x02"
            + bytes(47)
        )  # a record claiming 8 bytes
        bad.settimeout(5)
        assert bad.recv(10) == b""
        bad.close()
        good = socket.create_connection(("127.0.0.1", port))
        good.sendall(encode_publisher_metadata("ING.G", time.time_ns(), symbols) + b"".join(recs))
        assert s.wait_for(lambda r: len(data_records(r)) >= len(recs) + 1)
        good.close()
        assert s.stop() is None
        log = gw.log()
    texts = _system_texts(s.records)
    # sessions get a generic reason; the exact one (and the publisher's address) is logged
    assert sum("publisher sent invalid DBN; waiting for a publisher" in t for t in texts) == 2
    assert "sent invalid DBN: stream does not start with the DBN magic" in log
    assert "shorter than its header" in log
    assert [bytes(r) for r in data_records(s.records)] == [recs[0], *recs]


def test_truncated_and_corrupt_files_are_reported_not_fatal() -> None:
    src = DATA / "GLBX.MDP3" / "test_data.mbp-10.dbn.zst"
    tmp = Path(tempfile.mkdtemp())
    try:
        raw = src.read_bytes()
        (tmp / "truncated.dbn.zst").write_bytes(raw[: len(raw) // 2])
        corrupt = bytearray(raw)
        corrupt[len(raw) // 2] ^= 0xFF
        (tmp / "corrupt.dbn.zst").write_bytes(bytes(corrupt))
        feeds = {
            "TRUNC": f"file:{tmp / 'truncated.dbn.zst'}?pace=max",
            "CORRUPT": f"file:{tmp / 'corrupt.dbn.zst'}?pace=max",
            "DEMO.SYNTH": "synthetic:?rate=1000",
        }
        with gateway(feeds=feeds) as gw:
            healthy = OfficialSession(
                gw.port, "DEMO.SYNTH", [{"schema": "trades", "symbols": "ALL_SYMBOLS"}]
            )
            healthy.start()
            assert healthy.wait_for(lambda r: len(data_records(r)) > 50)
            assert healthy.stop() is None
            log = gw.log()
        assert "feed TRUNC down: file replay failed" in log
        assert "feed CORRUPT down: file replay failed" in log
    finally:
        shutil.rmtree(tmp)


def test_sigterm_drains_queued_data_and_closes_cleanly() -> None:
    gw = start_gateway(
        feeds={"DEMO.SYNTH": "synthetic:?rate=20000"}, config="shutdown_grace_s = 10\n"
    )
    try:
        c = RawClient(gw.port)
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        assert c.handshake().startswith("success=1")
        # trades is not a skip schema: the session is in warn mode and keeps every record.
        c.send(
            b"schema=trades|symbols=ALL_SYMBOLS\nschema=mbp-1|symbols=ALL_SYMBOLS\nstart_session\n"
        )
        time.sleep(1.0)  # not reading: data queues up in the gateway
        gw.proc.send_signal(signal.SIGTERM)
        data = c.read_all(limit=20)  # now read everything until the gateway closes
        c.close()
        assert gw.proc.wait(20) == 0
    finally:
        gw.stop()
        gw.cleanup()
    _, records = split_records(data)  # whole records to the end: a clean close
    body = [r for r in records if r[1] in (0x00, 0x01)]
    seqs = np.array([int.from_bytes(r[44:48], "little") for r in body], dtype=np.int64)
    assert len(seqs) > 1000 and (np.diff(seqs) == 1).all()  # nothing queued was lost
    # The last record is an ErrorMsg (code 6) so that clients' reconnect policies fire.
    assert error_texts(records[-1:]) == [(6, "Gateway shutting down")]
