"""Order books in a real gateway process (gateway/books): ``snapshot=1`` with the official
client under a running MBO feed, and the refusals around it.

The oracle is the pure-Python reference book (gateway/books/reference.py), fed with what
a session that joined at the start received: a session that joined by snapshot mid-stream
must hold the same books at every later record, and its live records must be exactly the
early session's records of its instruments after the snapshot point (no gap, no
duplicate).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.books.reference import F_LAST, F_SNAPSHOT, UNDEF_PRICE, Books, Order
from gateway.dbn.encode import encode_publisher_metadata
from tests.integration.helpers import (
    GatewayProcess,
    OfficialSession,
    RawClient,
    data_records,
    error_texts,
    gateway,
    metric_samples,
    poll_until,
    split_records,
    start_gateway,
)
from tests.support.mbo_stream import MboStream
from tests.support.prometheus import metric

pytest.importorskip(
    "gateway.books.native", reason="the native book engine is built by make install"
)

DATASET = "ING.B"
SYMBOLS = {"AAA": 101, "BBB": 102, "CCC": 103}
F_BAD_TS_RECV = 1 << 3
MBO_RTYPE = 0xA0


class MboPublisher:
    """Sends MBO events to an ingest port from a thread, ~20 events every 2 ms, until
    stopped; keeps every record it sent."""

    def __init__(self, port: int, seed: int = 7, clears: bool = True) -> None:
        self.stream = MboStream(instruments=tuple(SYMBOLS.values()), seed=seed)
        #: False: leave out the clear records, as a publisher that starts mid-session
        self.clears = clears
        self.sent: list[bytes] = []
        self._stop = threading.Event()
        self._sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._sock.sendall(
                encode_publisher_metadata(DATASET, time.time_ns(), SYMBOLS, schema="mbo")
            )
            while not self._stop.is_set():
                now = time.time_ns()
                batch: list[bytes] = []
                for _ in range(20):
                    batch += self.stream.next_event(now)
                if not self.clears:
                    batch = [r for r in batch if r[38] != ord("R")]
                self._sock.sendall(b"".join(batch))
                self.sent += batch
                self._stop.wait(0.002)
        except OSError:
            pass  # the gateway went away

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10.0)
        self._sock.close()


@pytest.fixture
def gw() -> Iterator[GatewayProcess]:
    with gateway("--metrics-port", "0", feeds={DATASET: "ingest://127.0.0.1:0"}) as g:
        yield g


def _mbo(records: list[Any]) -> list[Any]:
    return [r for r in data_records(records) if int(r.rtype) == MBO_RTYPE]


def _orders(books: Books, iid: int) -> list[Order]:
    book = books.books.get((iid, 1))
    return [] if book is None else list(book.orders())


def test_snapshot_then_live_holds_the_same_books_as_a_session_from_the_start(
    gw: GatewayProcess,
) -> None:
    early = OfficialSession(gw.port, DATASET, [dict(schema="mbo", symbols="ALL_SYMBOLS")])
    early.start()
    pub = MboPublisher(gw.ingest_ports[DATASET])
    late: OfficialSession | None = None
    try:
        poll_until(lambda: len(pub.sent) >= 3000, 30.0, 0.01, "3,000 records published")
        late = OfficialSession(
            gw.port, DATASET, [dict(schema="mbo", symbols=["AAA", "BBB"], snapshot=True)]
        )
        late.start()
        joined_at = len(pub.sent)
        poll_until(lambda: len(pub.sent) >= joined_at + 3000, 30.0, 0.01, "3,000 more")
    finally:
        pub.stop()
    assert late is not None
    sent = pub.sent
    last_seq = int.from_bytes(sent[-1][-4:], "little")
    wanted = {SYMBOLS["AAA"], SYMBOLS["BBB"]}
    last_wanted = max(
        int.from_bytes(r[-4:], "little") for r in sent if int.from_bytes(r[4:8], "little") in wanted
    )
    assert early.wait_for(lambda rs: any(_seq(r) == last_seq for r in _mbo(rs)), 30.0)
    assert late.wait_for(lambda rs: any(_seq(r) == last_wanted for r in _mbo(rs)), 30.0)
    early_recs = _mbo(early.records)
    late_recs = _mbo(late.records)
    early.stop()
    late.stop()
    # the early session got every record, in order (the publisher's own bytes)
    assert [bytes(r) for r in early_recs] == sent

    # the snapshot: per instrument an R, then As; flags; F_LAST on each instrument's last
    snap = [r for r in late_recs if int(r.flags) & F_SNAPSHOT]
    live = late_recs[len(snap) :]
    assert snap and late_recs[: len(snap)] == snap, "snapshot records come first"
    assert not any(int(r.flags) & F_SNAPSHOT for r in live)
    by_iid: dict[int, list[Any]] = {}
    for r in snap:
        by_iid.setdefault(int(r.instrument_id), []).append(r)
    assert set(by_iid) == wanted
    assert len(snap) > 50, "the books held resting orders when the session joined"
    for recs in by_iid.values():
        clear = recs[0]
        assert str(clear.action) in ("R", "Action.CLEAR") or _action(clear) == "R"
        assert (clear.price, clear.size, clear.order_id, clear.sequence) == (UNDEF_PRICE, 0, 0, 0)
        assert _side(clear) == "N"
        assert all(_action(r) == "A" for r in recs[1:])
        assert all(
            int(r.flags) & (F_SNAPSHOT | F_BAD_TS_RECV) == F_SNAPSHOT | F_BAD_TS_RECV for r in recs
        )
        assert [bool(int(r.flags) & F_LAST) for r in recs] == [False] * (len(recs) - 1) + [True]
        assert len({int(r.ts_recv) for r in recs}) == 1  # the snapshot's time

    # no gap, no duplicate: the live part is exactly the early stream's records of those
    # instruments from the first one after the snapshot point on
    first_live = _seq(live[0])
    expected = [
        bytes(r) for r in early_recs if int(r.instrument_id) in wanted and _seq(r) >= first_live
    ]
    assert [bytes(r) for r in live] == expected

    # identical books at every later point
    reference = Books()
    pos = 0
    while _seq(early_recs[pos]) < first_live:
        reference.apply_records([bytes(early_recs[pos])])
        pos += 1
    joined = Books()
    joined.apply_records(bytes(r) for r in snap)
    for iid in wanted:
        assert _orders(joined, iid) == _orders(reference, iid), "the snapshot's book"
    for rec in live:
        while pos < len(early_recs) and _seq(early_recs[pos]) <= _seq(rec):
            reference.apply_records([bytes(early_recs[pos])])
            pos += 1
        joined.apply_records([bytes(rec)])
        iid = int(rec.instrument_id)
        assert _orders(joined, iid) == _orders(reference, iid), f"after sequence {_seq(rec)}"
    samples = metric_samples(gw.metrics_port)
    assert metric(samples, "gateway_books_snapshots_total", dataset=DATASET) >= 1
    assert metric(samples, "gateway_books_orders", dataset=DATASET) > 0


def _seq(rec: Any) -> int:
    return int(rec.sequence)


def _action(rec: Any) -> str:
    action = rec.action
    return str(getattr(action, "value", action))


def _side(rec: Any) -> str:
    side = rec.side
    return str(getattr(side, "value", side))


def _errors_after(port: int, lines: bytes) -> list[tuple[int, str]]:
    c = RawClient(port)
    assert c.handshake(dataset=DATASET).startswith("success=1|session_id=")
    c.send(lines)
    data = c.read_all()
    c.close()
    head, records = split_records(data)
    return error_texts(records)


def test_snapshot_refused_where_books_are_off_and_with_start() -> None:
    sub = b"schema=mbo|stype_in=raw_symbol|symbols=AAA|snapshot=1\n"
    config = "[books]\nenabled = false\n"
    with gateway(feeds={DATASET: "ingest://127.0.0.1:0"}, config=config) as g:
        errors = _errors_after(g.port, sub + b"start_session\n")
    assert errors == [
        (
            5,
            f"snapshot=1 is not supported yet for dataset {DATASET}: order books are off "
            "for this dataset (books.enabled = false)",
        )
    ]
    with gateway(feeds={DATASET: "ingest://127.0.0.1:0"}) as g:
        errors = _errors_after(g.port, sub.replace(b"\n", b"|start=0\n"))
    assert errors == [(5, "invalid subscription: snapshot=1 cannot be combined with start")]


DERIVED = ("trades", "mbp-1", "mbp-10", "ohlcv-1s", "bbo-1s")  # one rtype each
DERIVED_RTYPES = {"trades": 0x00, "mbp-1": 0x01, "mbp-10": 0x0A, "ohlcv-1s": 0x20, "bbo-1s": 0xC3}


def test_derived_schemas_through_the_gateway_equal_the_reference(gw: GatewayProcess) -> None:
    """Sessions of every derived schema on an MBO-only feed get exactly what the
    pure-Python reference derives from the records the publisher sent (interval schemas:
    the intervals a later record closed)."""
    from gateway.books.derive_reference import derive

    many = OfficialSession(
        gw.port, DATASET, [dict(schema=s, symbols="ALL_SYMBOLS") for s in DERIVED]
    )
    many.start()
    tbbo = OfficialSession(gw.port, DATASET, [dict(schema="tbbo", symbols="ALL_SYMBOLS")])
    tbbo.start()
    pub = MboPublisher(gw.ingest_ports[DATASET], seed=11)
    try:
        # past two whole seconds of records, so that 1 s intervals close
        poll_until(lambda: len(pub.sent) >= 2000, 30.0, 0.01, "2,000 records published")
        first_ts = int.from_bytes(pub.sent[0][40:48], "little")
        poll_until(
            lambda: int.from_bytes(pub.sent[-1][40:48], "little") > first_ts + 2_100_000_000,
            30.0,
            0.01,
            "two seconds of records",
        )
    finally:
        pub.stop()
    ref = derive(pub.sent, (*DERIVED, "tbbo"), flush=False)
    assert all(ref[s] for s in (*DERIVED, "tbbo")), {s: len(v) for s, v in ref.items()}

    def complete(records: list[Any], rtype: int, n: int) -> bool:
        return sum(1 for r in data_records(records) if int(r.rtype) == rtype) >= n

    for schema in DERIVED:
        assert many.wait_for(
            lambda rs, s=schema: complete(rs, DERIVED_RTYPES[s], len(ref[s])), 30.0
        ), schema
    assert tbbo.wait_for(lambda rs: complete(rs, 0x01, len(ref["tbbo"])), 30.0)
    got = data_records(many.records)
    for schema in DERIVED:
        mine = [bytes(r) for r in got if int(r.rtype) == DERIVED_RTYPES[schema]]
        assert mine == ref[schema], schema
    assert [bytes(r) for r in data_records(tbbo.records)] == ref["tbbo"]
    many.stop()
    tbbo.stop()
    samples = metric_samples(gw.metrics_port)
    for schema in (*DERIVED, "tbbo"):
        built = metric(
            samples, "gateway_books_derived_records_total", dataset=DATASET, schema=schema
        )
        assert built >= len(ref[schema]), schema


def test_a_snapshot_over_its_bound_ends_the_session_saying_why() -> None:
    config = "[books]\nmax_snapshot_records = 50\n"
    with gateway(feeds={DATASET: "ingest://127.0.0.1:0"}, config=config) as g:
        pub = MboPublisher(g.ingest_ports[DATASET])
        try:
            poll_until(lambda: len(pub.sent) >= 1000, 30.0, 0.01, "1,000 records published")
            sub = b"schema=mbo|stype_in=raw_symbol|symbols=ALL_SYMBOLS|snapshot=1\n"
            errors = _errors_after(g.port, sub + b"start_session\n")
            # the gateway carries on serving everyone else
            other = OfficialSession(g.port, DATASET, [dict(schema="mbo", symbols=["CCC"])])
            other.start()
            assert other.wait_for(lambda rs: len(_mbo(rs)) >= 20, 15.0)
            other.stop()
        finally:
            pub.stop()
    assert len(errors) == 1
    code, text = errors[0]
    assert code == 5 and text.startswith("snapshot=1 refused: the snapshot would hold ")
    assert "books.max_snapshot_records=50" in text


def test_no_snapshot_of_books_joined_mid_stream() -> None:
    """A publisher that starts mid-session (no clear record): the gateway cannot know the
    orders that rested before, so snapshot=1 is refused saying why, never served short."""
    with gateway(feeds={DATASET: "ingest://127.0.0.1:0"}) as g:
        pub = MboPublisher(g.ingest_ports[DATASET], clears=False)
        try:
            poll_until(lambda: len(pub.sent) >= 500, 30.0, 0.01, "500 records published")
            sub = b"schema=mbo|stype_in=raw_symbol|symbols=AAA|snapshot=1\n"
            errors = _errors_after(g.port, sub + b"start_session\n")
        finally:
            pub.stop()
    assert len(errors) == 1
    code, text = errors[0]
    assert code == 5 and text.startswith("snapshot=1 refused: 1 of the books asked for were ")
    assert "not seen from a clear record (R)" in text


def test_books_survive_a_kill9_through_the_journal(tmp_path: Path) -> None:
    """The books are rebuilt from the journal at start: after a kill -9 and a restart on
    the same journal, a snapshot holds exactly the books of every record published."""
    jdir = tmp_path / "journal"
    feeds = {DATASET: "ingest://127.0.0.1:0"}
    first = start_gateway("--journal-dir", str(jdir), "--metrics-port", "0", feeds=feeds)
    try:
        pub = MboPublisher(first.ingest_ports[DATASET])
        try:
            poll_until(lambda: len(pub.sent) >= 3000, 30.0, 0.01, "3,000 records published")
        finally:
            pub.stop()
        sent = list(pub.sent)
        poll_until(
            lambda: (
                metric(
                    metric_samples(first.metrics_port),
                    "gateway_books_records_total",
                    dataset=DATASET,
                )
                >= len(sent)
            ),
            15.0,
            0.02,
            "every record applied",
        )
        first.proc.kill()
        first.proc.wait(10)
    finally:
        first.stop()
        first.cleanup()
    with gateway("--journal-dir", str(jdir), "--metrics-port", "0", feeds=feeds) as again:
        assert "order books rebuilt from the journal" in again.log()
        late = OfficialSession(
            again.port, DATASET, [dict(schema="mbo", symbols="ALL_SYMBOLS", snapshot=True)]
        )
        late.start()
        assert late.wait_for(lambda rs: sum(1 for r in _mbo(rs) if int(r.flags) & F_LAST) >= 3)
        snap = [r for r in _mbo(late.records) if int(r.flags) & F_SNAPSHOT]
        late.stop()
        samples = metric_samples(again.metrics_port)
    reference = Books()
    reference.apply_records(sent)
    rebuilt = Books()
    rebuilt.apply_records(bytes(r) for r in snap)
    for iid in SYMBOLS.values():
        assert _orders(rebuilt, iid) == _orders(reference, iid)
    assert sum(len(_orders(reference, i)) for i in SYMBOLS.values()) > 50
    assert metric(samples, "gateway_books_whole", dataset=DATASET) == 3
