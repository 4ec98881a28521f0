"""Who may hold the ingest slot, and for how long (a real gateway process, real sockets):
a silent publisher is dropped, a live one keeps the slot, a stale one is replaced, an address
outside the allow-list is refused, and sessions never see a publisher's address."""

from __future__ import annotations

import socket
import threading
import time

import databento_dbn as dbn

from gateway.dbn import encode_publisher_metadata
from tests.integration.helpers import (
    OfficialSession,
    data_records,
    gateway,
    poll_until,
    synthetic_trades,
)


def _system_texts(records: list[object]) -> list[str]:
    return [
        r.msg
        for r in records
        if isinstance(r, dbn.SystemMsg) and r.code != dbn.SystemCode.SUBSCRIPTION_ACK
    ]


def _closed_by_gateway(sock: socket.socket, timeout: float) -> bool:
    """True if the gateway closes ``sock`` (EOF or reset) within ``timeout`` seconds."""
    sock.settimeout(timeout)
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def _session(port: int, dataset: str) -> OfficialSession:
    s = OfficialSession(port, dataset, [{"schema": "trades", "symbols": "ALL_SYMBOLS"}])
    s.start()
    return s


def test_silent_publisher_is_dropped_and_a_new_one_is_served() -> None:
    symbols, first = synthetic_trades(2, seed=1)
    _, second = synthetic_trades(50, seed=2)
    with gateway(feeds={"ING.S": "ingest://127.0.0.1:0?idle_timeout_s=1"}) as gw:
        port = gw.ingest_ports["ING.S"]
        s = _session(gw.port, "ING.S")
        silent = socket.create_connection(("127.0.0.1", port), timeout=10)
        silent.sendall(
            encode_publisher_metadata("ING.S", time.time_ns(), symbols) + b"".join(first)
        )
        assert s.wait_for(lambda r: len(data_records(r)) >= len(first))
        # a header and two records, then silence: dropped after idle_timeout_s
        assert _closed_by_gateway(silent, 10), "the silent publisher was never dropped"
        silent.close()
        assert s.wait_for(lambda r: any("publisher timed out" in t for t in _system_texts(r)))
        pub = socket.create_connection(("127.0.0.1", port), timeout=10)
        pub.sendall(encode_publisher_metadata("ING.S", time.time_ns(), symbols) + b"".join(second))
        assert s.wait_for(lambda r: len(data_records(r)) >= len(first) + len(second))
        pub.close()
        assert s.stop() is None
        log = gw.log()
    assert [bytes(r) for r in data_records(s.records)] == first + second
    texts = _system_texts(s.records)
    assert "Feed ING.S: publisher timed out; waiting for a publisher" in texts
    assert "dropping publisher 127.0.0.1:" in log and "idle_timeout_s=1" in log


def test_newcomer_is_refused_while_the_publisher_is_live() -> None:
    symbols, recs = synthetic_trades(400, seed=3)
    with gateway(feeds={"ING.L": "ingest://127.0.0.1:0?idle_timeout_s=3"}) as gw:
        port = gw.ingest_ports["ING.L"]
        s = _session(gw.port, "ING.L")
        live = socket.create_connection(("127.0.0.1", port), timeout=10)
        live.sendall(encode_publisher_metadata("ING.L", time.time_ns(), symbols) + recs[0])
        assert s.wait_for(lambda r: len(data_records(r)) >= 1)
        stop = threading.Event()

        def keep_publishing() -> None:  # one record every 50 ms: never idle
            for rec in recs[1:]:
                if stop.wait(0.05):
                    return
                live.sendall(rec)

        feeder = threading.Thread(target=keep_publishing, daemon=True)
        feeder.start()
        try:
            newcomer = socket.create_connection(("127.0.0.1", port), timeout=10)
            # closed at once (well inside the 3 s idle timeout): refused, not timed out
            assert _closed_by_gateway(newcomer, 2.5)
            newcomer.close()
            got = len(data_records(s.records))
            assert s.wait_for(lambda r: len(data_records(r)) >= got + 10)  # still flowing
        finally:
            stop.set()
            feeder.join(10)
        live.close()
        assert s.stop() is None
        log = gw.log()
    assert "refusing publisher 127.0.0.1:" in log and "holds the slot and is live" in log
    data = [bytes(r) for r in data_records(s.records)]
    assert data == recs[: len(data)]  # only the live publisher's records, in order
    assert not any("timed out" in t for t in _system_texts(s.records))


def test_publishers_stuck_before_or_inside_their_metadata_are_dropped_or_replaced() -> None:
    symbols, recs = synthetic_trades(30, seed=4)
    with gateway(feeds={"ING.M": "ingest://127.0.0.1:0?idle_timeout_s=1"}) as gw:
        port = gw.ingest_ports["ING.M"]
        s = _session(gw.port, "ING.M")
        # 1. connects and never sends a byte
        mute = socket.create_connection(("127.0.0.1", port), timeout=10)
        assert _closed_by_gateway(mute, 10), "a publisher that never sent anything kept the slot"
        mute.close()
        # 2. announces a 60 MiB Metadata header, sends a little of it, stalls
        stalled = socket.create_connection(("127.0.0.1", port), timeout=10)
        stalled.sendall(b"DBN\x03" + (60 << 20).to_bytes(4, "little") + bytes(1000))
        assert _closed_by_gateway(stalled, 10), "a publisher stalled in its Metadata kept it"
        stalled.close()
        assert poll_until(lambda: gw.log().count("inside its Metadata header") >= 2)
        # 3. trickles its Metadata (a byte every 200 ms: never idle for 1 s): once it has
        #    connected more than idle_timeout_s ago, a newcomer replaces it
        trickler = socket.create_connection(("127.0.0.1", port), timeout=10)
        trickler.sendall(b"DBN\x03" + (60 << 20).to_bytes(4, "little"))
        connected_at = time.monotonic()
        stop = threading.Event()

        def trickle() -> None:
            while not stop.wait(0.2):
                try:
                    trickler.sendall(b"\0")
                except OSError:
                    return

        feeder = threading.Thread(target=trickle, daemon=True)
        feeder.start()
        try:
            # staleness is a matter of time itself: wait until the trickler is 1.5 s old
            time.sleep(max(0.0, connected_at + 1.5 - time.monotonic()))
            assert "replaces publisher" not in gw.log()
            pub = socket.create_connection(("127.0.0.1", port), timeout=10)
            pub.sendall(
                encode_publisher_metadata("ING.M", time.time_ns(), symbols) + b"".join(recs)
            )
            assert s.wait_for(lambda r: len(data_records(r)) >= len(recs))
            assert _closed_by_gateway(trickler, 10)
        finally:
            stop.set()
            feeder.join(10)
        trickler.close()
        pub.close()
        assert s.stop() is None
        log = gw.log()
    assert [bytes(r) for r in data_records(s.records)] == recs
    assert "replaces publisher 127.0.0.1:" in log
    assert "Metadata header still incomplete" in log


def test_address_outside_the_allow_list_is_refused_and_logged() -> None:
    symbols, recs = synthetic_trades(10, seed=5)
    feeds = {
        "ING.A": "ingest://127.0.0.1:0?allow=10.0.0.0/8",
        "ING.OK": "ingest://127.0.0.1:0?allow=127.0.0.1,10.0.0.0/8",
    }
    with gateway(feeds=feeds) as gw:
        s = _session(gw.port, "ING.A")
        refused = socket.create_connection(("127.0.0.1", gw.ingest_ports["ING.A"]), timeout=10)
        # closed at once: the default idle timeout is 30 s
        assert _closed_by_gateway(refused, 5)
        refused.close()
        assert poll_until(lambda: "address not in the ingest allow-list" in gw.log())
        # the same address is served where the allow-list names it
        ok = _session(gw.port, "ING.OK")
        pub = socket.create_connection(("127.0.0.1", gw.ingest_ports["ING.OK"]), timeout=10)
        pub.sendall(encode_publisher_metadata("ING.OK", time.time_ns(), symbols) + b"".join(recs))
        assert ok.wait_for(lambda r: len(data_records(r)) >= len(recs))
        pub.close()
        assert ok.stop() is None
        assert s.stop() is None
        log = gw.log()
    assert "feed ING.A: refusing publisher 127.0.0.1:" in log
    assert "10.0.0.0/8" in log
    # a refused address is not a publisher: the feed's sessions hear nothing about it
    assert _system_texts(s.records) == []
    assert data_records(s.records) == []


def test_sessions_never_see_a_publishers_address() -> None:
    symbols, recs = synthetic_trades(20, seed=6)
    with gateway(feeds={"ING.D": "ingest://127.0.0.1:0?idle_timeout_s=1"}) as gw:
        port = gw.ingest_ports["ING.D"]
        s = _session(gw.port, "ING.D")
        peers = []
        # connects, publishes, leaves mid-record
        pub = socket.create_connection(("127.0.0.1", port), timeout=10)
        peers.append(pub.getsockname())
        pub.sendall(
            encode_publisher_metadata("ING.D", time.time_ns(), symbols)
            + b"".join(recs)
            + recs[0][:7]
        )
        assert s.wait_for(lambda r: len(data_records(r)) >= len(recs))
        pub.close()
        assert s.wait_for(lambda r: any("mid-record" in t for t in _system_texts(r)))
        # sends garbage
        bad = socket.create_connection(("127.0.0.1", port), timeout=10)
        peers.append(bad.getsockname())
        bad.sendall(b"GET / HTTP/1.1\r\n\r\n")
        assert _closed_by_gateway(bad, 5)
        bad.close()
        # connects, publishes, goes silent
        quiet = socket.create_connection(("127.0.0.1", port), timeout=10)
        peers.append(quiet.getsockname())
        quiet.sendall(encode_publisher_metadata("ING.D", time.time_ns(), symbols) + recs[0])
        assert _closed_by_gateway(quiet, 10)
        quiet.close()
        assert s.wait_for(lambda r: any("timed out" in t for t in _system_texts(r)))
        assert s.stop() is None
        log = gw.log()
    texts = _system_texts(s.records)
    assert texts == [
        "Feed ING.D: publisher connected",
        "Feed ING.D: publisher disconnected mid-record (7 bytes of a partial record dropped); "
        "waiting for a publisher",
        "Feed ING.D: publisher sent invalid DBN; waiting for a publisher",
        "Feed ING.D: publisher connected",
        "Feed ING.D: publisher timed out; waiting for a publisher",
    ]
    for host, peer_port in peers:
        assert f"{host}:{peer_port}" in log  # the operator gets the address
        assert not any(host in t or str(peer_port) in t for t in texts)
