"""Hostile input and availability (issue 11), over real sockets with a real gateway:
records that would crash a client, Rust panics, floods of ordinary requests, slots held by
idle sessions, and what a client may be told."""

from __future__ import annotations

import socket
import struct
import tempfile
import time
from pathlib import Path

import databento_dbn as dbn
import pytest

from gateway.dbn import encode_publisher_metadata
from tests.integration.helpers import (
    KEY,
    OfficialSession,
    RawClient,
    data_records,
    error_texts,
    gateway,
    http_get,
    metric,
    metric_samples,
    poll_until,
    split_records,
    synthetic_records,
)

RUST_NOISE = ("panicked", "stack backtrace", "RUST_BACKTRACE", "PanicException", "Traceback")


def _short(record: bytes, words: int) -> bytes:
    """The record cut to ``words`` 4-byte words, its length byte saying so."""
    return bytes([words]) + record[1 : words * 4]


def test_short_mbp1_record_never_reaches_official_clients() -> None:
    """An mbp-1 record of 48 bytes (length 12) instead of 80 would make every official
    mbp-1 subscriber panic. The good records before it are delivered, the publisher is
    dropped with one clear log line, sessions are told, and the next publisher goes on."""
    symbols, good = synthetic_records("mbp-1", 300, seed=1)
    _, more = synthetic_records("mbp-1", 200, seed=2)
    with gateway("--metrics-port", "0", feeds={"ING.M": "ingest://127.0.0.1:0"}) as gw:
        port = gw.ingest_ports["ING.M"]
        s = OfficialSession(gw.port, "ING.M", [{"schema": "mbp-1", "symbols": "ALL_SYMBOLS"}])
        s.start()
        pub = socket.create_connection(("127.0.0.1", port))
        meta = encode_publisher_metadata("ING.M", time.time_ns(), symbols)
        pub.sendall(meta + b"".join(good) + _short(more[0], 12) + b"".join(more[1:]))
        assert s.wait_for(
            lambda r: any(isinstance(x, dbn.SystemMsg) and "invalid DBN" in x.msg for x in r)
        )
        pub.close()
        # A new publisher carries on.
        pub = socket.create_connection(("127.0.0.1", port))
        pub.sendall(meta + b"".join(more))
        assert s.wait_for(lambda r: len(data_records(r)) >= len(good) + len(more))
        pub.close()
        assert s.stop() is None  # no PanicException, no error on close
        got = [bytes(r) for r in data_records(s.records)]
        assert got == good + more
        log = gw.log()
        # one line with the reason (beside the feed's state change)
        assert sum("shorter than the 80 bytes" in line for line in log.splitlines()) == 1
        assert not [n for n in RUST_NOISE if n in log]
        assert poll_until(  # exported on the metrics tick
            lambda: (
                metric(
                    metric_samples(gw.metrics_port),
                    "gateway_feed_events_total",
                    dataset="ING.M",
                    event="invalid",
                )
                == 1
            )
        )


def _v1_metadata(dataset: str) -> bytes:
    return bytes(
        dbn.Metadata(
            dataset=dataset,
            start=time.time_ns(),
            stype_in=None,
            stype_out=dbn.SType.INSTRUMENT_ID,  # type: ignore[arg-type]  # stubs type enum members as str
            schema=None,
            version=1,
        ).encode()
    )


def test_v1_file_with_a_short_record_fails_cleanly() -> None:
    """The DBN v1 -> v3 upgrade used to panic inside databento_dbn: the replay task died
    silently and the feed stayed "starting" for ever. Now: the good records are published,
    the feed is down with a reason, one log line, no backtrace."""
    _, good = synthetic_records("trades", 50, seed=3)
    _, mbp = synthetic_records("mbp-1", 1, seed=4)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bad-v1.dbn"
        path.write_bytes(_v1_metadata("FILE.V1") + b"".join(good) + _short(mbp[0], 12))
        with gateway("--metrics-port", "0", feeds={"FILE.V1": f"file:{path}?pace=max"}) as gw:
            assert poll_until(
                lambda: "invalid DBN" in http_get(gw.metrics_port, "/status.json")[1], 20
            )
            code, body = http_get(gw.metrics_port, "/readyz")
            assert "starting" not in body
            assert str(path) not in http_get(gw.metrics_port, "/status.json")[1]
            assert poll_until(
                lambda: (
                    metric(
                        metric_samples(gw.metrics_port),
                        "gateway_feed_records_in_total",
                        dataset="FILE.V1",
                    )
                    == 50
                )
            )
            log = gw.log()
            assert not [n for n in RUST_NOISE if n in log]
            assert sum("shorter than the 80 bytes" in line for line in log.splitlines()) == 1


def _subscribe_in_chunks(c: RawClient, symbols: list[str], per_line: int = 5_000) -> None:
    for i in range(0, len(symbols), per_line):
        last = int(i + per_line >= len(symbols))
        part = ",".join(symbols[i : i + per_line])
        c.send(f"schema=trades|stype_in=raw_symbol|id=1|is_last={last}|symbols={part}\n".encode())


def test_100k_unknown_symbols_are_coalesced_and_counted() -> None:
    limits = "[limits]\nmax_symbols = 200000\ncontrol_burst = 5000\n"
    with gateway(feeds={"DEMO.SYNTH": "synthetic:?rate=500"}, config=limits) as gw:
        c = RawClient(gw.port, timeout=30)
        assert c.handshake().startswith("success=1")
        symbols = [f"NOPE{i:06d}" for i in range(100_000)]
        _subscribe_in_chunks(c, symbols)
        c.send(b"start_session\n")
        data = b""
        # Read until the final (is_last) resolution error, bounded in time.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            data += c.recv_some(10)
            if b"Failed to resolve" in data[-4000:] and _has_last_error(data):
                break
        c.close()
        _, records = split_records(_whole(data))
        errors = [(code, text) for code, text in error_texts(records)]
        named = [s for _, text in errors for s in text.split(": ", 1)[1].split(", ")]
        assert named == symbols
        error_bytes = sum(len(r) for r in records if r[1] == 0x15)
        assert error_bytes < 1_500_000  # one record per symbol would be 32 MB


def _whole(data: bytes) -> bytes:
    """The stream up to its last whole record."""
    length = int.from_bytes(data[4:8], "little")
    off = 8 + length
    while off < len(data) and off + data[off] * 4 <= len(data):
        off += data[off] * 4
    return data[:off]


def _has_last_error(data: bytes) -> bool:
    _, records = split_records(_whole(data))
    return any(r[1] == 0x15 and r[319] == 1 for r in records)


def test_session_that_never_starts_is_ended_and_frees_its_slot() -> None:
    config = "[limits]\nstart_timeout_s = 1.5\n"
    with gateway(feeds={"DEMO.SYNTH": "synthetic:"}, config=config, max_sessions=1) as gw:
        idle = RawClient(gw.port)
        assert idle.handshake().startswith("success=1")
        blocked = RawClient(gw.port)
        assert blocked.handshake().startswith("success=0|error=Connection limit exceeded")
        blocked.close()
        started = time.monotonic()
        data = idle.read_all(limit=15)
        idle.close()
        assert 1.0 < time.monotonic() - started < 12
        _, records = split_records(data)
        (err,) = error_texts(records)
        assert "start_session not received within 1.5 s" in err[1]
        again = RawClient(gw.port)
        assert again.handshake().startswith("success=1")
        again.close()
        assert "start_timeout" in gw.log()


def test_clients_are_not_told_other_datasets_or_key_names() -> None:
    config = (
        "[[api_keys]]\n"
        f'key = "{KEY}"\n'
        'name = "desk-7-internal"\n'
        'datasets = ["DEMO.SYNTH"]\n'
        "max_sessions = 1\n"
    )
    feeds = {"DEMO.SYNTH": "synthetic:", "SECRET.DS": "synthetic:?rate=10"}
    with gateway(feeds=feeds, config=config, keys=[]) as gw:
        replies = []
        for dataset in ("NOPE.DS", "SECRET.DS"):
            c = RawClient(gw.port)
            replies.append(c.handshake(dataset=dataset))
            c.close()
        first = RawClient(gw.port)
        assert first.handshake().startswith("success=1")
        c = RawClient(gw.port)
        replies.append(c.handshake())
        c.close()
        first.close()
        assert replies[0] == "success=0|error=Unknown dataset NOPE.DS"
        assert replies[1] == "success=0|error=API key is not entitled to dataset SECRET.DS"
        assert replies[2].startswith("success=0|error=Connection limit exceeded: this API key")
        for reply in replies:
            assert "desk-7" not in reply and "DEMO.SYNTH" not in reply
        assert "SECRET" not in replies[0]
        assert "key_id=desk-7-internal" in gw.log()


def _tbbo_file(path: Path) -> None:
    symbols, recs = synthetic_records("mbp-1", 20, seed=5)
    meta = bytes(
        dbn.Metadata(
            dataset="FILE.TBBO",
            start=time.time_ns(),
            stype_in=dbn.SType.RAW_SYMBOL,  # type: ignore[arg-type]  # stubs type enum members as str
            stype_out=dbn.SType.INSTRUMENT_ID,  # type: ignore[arg-type]  # stubs type enum members as str
            schema=dbn.Schema.TBBO,  # type: ignore[arg-type]  # stubs type enum members as str
        ).encode()
    )
    path.write_bytes(meta + b"".join(recs))


def test_subscription_the_feed_never_serves_gets_a_non_fatal_error() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tbbo.dbn"
        _tbbo_file(path)
        feeds = {"FILE.TBBO": f"file:{path}?pace=max&loop=1"}
        with gateway("--metrics-port", "0", feeds=feeds) as gw:
            assert poll_until(lambda: http_get(gw.metrics_port, "/readyz")[0] == 200)
            assert poll_until(
                lambda: (
                    metric(
                        metric_samples(gw.metrics_port),
                        "gateway_feed_records_in_total",
                        dataset="FILE.TBBO",
                    )
                    > 0
                )
            )
            c = RawClient(gw.port)
            assert c.handshake(dataset="FILE.TBBO").startswith("success=1")
            c.send(
                b"schema=mbp-1|stype_in=raw_symbol|symbols=ALL_SYMBOLS|id=3\n"
                b"schema=tbbo|stype_in=raw_symbol|symbols=ALL_SYMBOLS|id=4\nstart_session\n"
            )
            data = b""
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                data += c.recv_some(5)
                if len(data) > 8 and any(r[1] == 0x01 for r in split_records(_whole(data))[1]):
                    break
            c.close()
            _, records = split_records(_whole(data))
            assert error_texts(records)[0] == (
                5,
                "Subscription request 3: mbp-1 data is not available from dataset FILE.TBBO",
            )
            # the session stays open: the tbbo subscription beside it is served
            assert any(r[1] == 0x01 for r in records)


@pytest.mark.parametrize("length_words", [0, 2, 3])
def test_publisher_header_garbage_never_reaches_sessions(length_words: int) -> None:
    symbols, good = synthetic_records("trades", 10, seed=6)
    with gateway(feeds={"ING.G": "ingest://127.0.0.1:0"}) as gw:
        s = OfficialSession(gw.port, "ING.G", [{"schema": "trades", "symbols": "ALL_SYMBOLS"}])
        s.start()
        pub = socket.create_connection(("127.0.0.1", gw.ingest_ports["ING.G"]))
        bad = struct.pack("<BBHIQ", length_words, 0, 1, 1, 0) + bytes(32)
        pub.sendall(encode_publisher_metadata("ING.G", time.time_ns(), symbols) + b"".join(good))
        assert s.wait_for(lambda r: len(data_records(r)) >= len(good))
        pub.sendall(bad)
        assert s.wait_for(
            lambda r: any(isinstance(x, dbn.SystemMsg) and "invalid DBN" in x.msg for x in r)
        )
        pub.close()
        assert s.stop() is None
        assert [bytes(r) for r in data_records(s.records)] == good


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_successor_binds_every_fixed_port_by_default() -> None:
    """Client, ingest and metrics ports are all shared with a successor (SO_REUSEPORT is
    on by default for fixed ports), so a deployment with an ingest feed and metrics can
    hand over; the successor takes the publisher once the old one stops."""
    port, metrics_port, ingest = _free_port(), _free_port(), _free_port()
    args = ("--port", str(port), "--metrics-port", str(metrics_port))
    feeds = {"ING.R": f"ingest://127.0.0.1:{ingest}"}
    symbols, recs = synthetic_records("trades", 20, seed=8)
    with gateway(*args, feeds=feeds) as old, gateway(*args, feeds=feeds) as new:
        assert (old.port, new.port) == (port, port)
        assert old.ingest_ports["ING.R"] == new.ingest_ports["ING.R"] == ingest
        assert old.stop() == 0
        c = RawClient(port)
        assert c.handshake(dataset="ING.R").startswith("success=1")
        c.send(b"schema=trades|symbols=ALL_SYMBOLS\nstart_session\n")
        pub = socket.create_connection(("127.0.0.1", ingest))
        pub.sendall(encode_publisher_metadata("ING.R", time.time_ns(), symbols) + b"".join(recs))
        data = b""
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            data += c.recv_some(5)
            if len(data) > 8 and sum(r[1] == 0 for r in split_records(_whole(data))[1]) >= 20:
                break
        pub.close()
        c.close()
        assert [r for r in split_records(_whole(data))[1] if r[1] == 0] == recs
        assert http_get(new.metrics_port, "/healthz")[0] == 200


def test_no_metric_has_an_empty_label_value() -> None:
    with gateway("--metrics-port", "0", feeds={"DEMO.SYNTH": "synthetic:"}) as gw:
        c = RawClient(gw.port)
        assert c.handshake().startswith("success=1")
        c.close()
        body = ""

        def accepted_exported() -> bool:
            nonlocal body
            body = http_get(gw.metrics_port, "/metrics")[1]
            return 'result="accepted"' in body

        assert poll_until(accepted_exported)
        empty = [line for line in body.splitlines() if '=""' in line]
        assert empty == []
