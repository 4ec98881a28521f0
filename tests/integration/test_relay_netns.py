"""A primary and two relay edges on three "hosts" (network namespaces joined by veth links),
the official client at every edge: records exact end to end, and no gap at an edge whose
upstream link is cut for a few seconds.

    publisher (root ns) --> primary (ingest + journal) --> edge1, edge2 (lsg:// relay feeds)
                                                            |        |
                                  official clients (root ns, over a link of their own)

Needs root and iproute2 (``ip netns``); skipped, saying why, without them. The namespaces and
links are this run's own and are removed afterwards (tests/support/netns.py).
"""

from __future__ import annotations

import contextlib
import functools
import json
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import databento_dbn as dbn
import pytest

from gateway.dbn import encode_publisher_metadata
from tests.integration.helpers import (
    KEY,
    GatewayProcess,
    gateway,
    metric,
    poll_until,
    synthetic_trades,
)
from tests.support import netns
from tests.support.prometheus import Samples, parse_samples

pytestmark = pytest.mark.slow_e2e  # three gateway processes and real links: once, on uvloop

DATASET = "NETNS.RELAY"
#: the edges' upstream heartbeat: a lost upstream is noticed after 5 + 10 s of silence
HEARTBEAT_S = 5
#: how long the upstream link stays down: long enough for the primary's retransmissions to
#: back off for seconds, shorter than the relay's silence limit (15 s) — TCP may survive
HOLD_S = 4.0
#: records per phase: before the cut, during it, after it
PHASE = 1500
CLIENTS_PER_EDGE = 2


@pytest.fixture
def star() -> Iterator[netns.NetnsStar]:
    reason = netns.unavailable()
    if reason is not None:
        pytest.skip(reason)
    topology = netns.NetnsStar(edges=2)
    try:
        yield topology
    finally:
        problems = topology.close()
    assert not problems, problems


class Client:
    """One official ``databento.Live`` session (trades, every symbol) at ``host:port``."""

    def __init__(self, name: str, host: str, port: int) -> None:
        import databento as db

        self.name = name
        self.records: list[Any] = []
        self.client = db.Live(key=KEY, gateway=host, port=port)
        self.client.add_callback(self.records.append)
        self.error: BaseException | None = None

    def start(self, timeout: float = 15.0) -> None:
        done = threading.Event()

        def subscribe() -> None:  # blocks on the handshake: in a thread, with our timeout
            try:
                self.client.subscribe(dataset=DATASET, schema="trades", symbols="ALL_SYMBOLS")
            except BaseException as exc:  # noqa: BLE001 - reported below
                self.error = exc
            done.set()

        threading.Thread(target=subscribe, daemon=True).start()
        assert done.wait(timeout), f"{self.name}: subscribe() did not return in {timeout} s"
        if self.error is not None:
            raise AssertionError(f"{self.name}: subscribe failed: {self.error!r}")
        self.client.start()
        poll_until(lambda: self.client.metadata is not None, timeout, what=f"{self.name} metadata")

    def trades(self) -> list[bytes]:
        return [bytes(r) for r in list(self.records) if isinstance(r, dbn.TradeMsg)]

    def notices(self) -> list[str]:
        """The gateway's SystemMsg texts (heartbeats and acks aside) and ErrorMsg texts."""
        out = []
        for r in list(self.records):
            if isinstance(r, dbn.ErrorMsg):
                out.append(f"error: {r.err}")
            elif isinstance(r, dbn.SystemMsg) and not r.is_heartbeat():
                if r.code != dbn.SystemCode.SUBSCRIPTION_ACK:
                    out.append(r.msg)
        return out

    def gaps(self) -> list[str]:
        """Notices of a gap (``Feed D: gap: ...``) or of an error."""
        return [n for n in self.notices() if ": gap:" in n or n.startswith("error: ")]

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.client.stop()
            self.client.block_for_close(10)


def _sequence(record: bytes) -> int:
    return int.from_bytes(record[44:48], "little")  # TradeMsg.sequence: the last 4 of 48 bytes


def _compare(name: str, got: list[bytes], want: list[bytes]) -> str | None:
    """None when ``got`` is exactly ``want``; else a short account of the difference."""
    if got == want:
        return None
    g = [_sequence(r) for r in got]
    w = [_sequence(r) for r in want]
    missing = sorted(set(w) - set(g))
    dup = len(g) - len(set(g))
    first_diff = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), None)
    return (
        f"{name}: got {len(got)} records, want {len(want)}; missing seqs "
        f"{missing[:10]}{'...' if len(missing) > 10 else ''} ({len(missing)}), "
        f"{dup} duplicate(s), first differing index {first_diff}"
    )


def _account(
    clients: dict[str, Client], procs: dict[str, GatewayProcess], edge_metrics: Any
) -> str:
    """What each client has, each edge's relay metrics, each gateway's log tail: for a
    failure message."""
    lines = [
        f"{name}: {len(c.trades())} trades, notices {c.notices()}" for name, c in clients.items()
    ]
    for name, proc in procs.items():
        if name.startswith("edge"):
            try:
                samples = edge_metrics(int(name[4:]))
                relay = {
                    f"{n}{dict(lab)}": v
                    for (n, lab), v in samples.items()
                    if "relay" in n and not n.endswith("_created")
                }
            except OSError as exc:
                relay = {"metrics": repr(exc)}
            lines.append(f"{name} relay metrics: {relay}")
        lines.append(f"{name} log tail:\n{proc.log()[-3000:]}")
    return "\n".join(lines)


def _saved_checkpoint(journal_dir: Path) -> bool:
    """Whether an edge's saved relay position (``<journal-dir>/<dataset>/relay-cursor.json``,
    written every 0.5 s) follows an upstream checkpoint. (/status.json's ``checkpoint`` is
    refreshed only when the next records or heartbeat arrive: up to 5 s later.)"""
    try:
        saved = json.loads((journal_dir / DATASET / "relay-cursor.json").read_text())
    except (FileNotFoundError, ValueError):
        return False  # not written yet
    seq = saved.get("seq")
    return isinstance(seq, int) and seq >= 0


def _metrics(host: str, port: int) -> Samples:
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as r:
        return parse_samples(r.read().decode())


class Publisher:
    """The test's DBN publisher on the primary's ingest port, from the root namespace."""

    def __init__(self, host: str, port: int, symbols: dict[str, int]) -> None:
        self.sock = socket.create_connection((host, port), timeout=10)
        self.sock.sendall(encode_publisher_metadata(DATASET, time.time_ns(), symbols))

    def send(self, records: list[bytes]) -> None:
        self.sock.sendall(b"".join(records))

    def close(self) -> None:
        self.sock.close()


def _serve(
    star: netns.NetnsStar, ns: str, uri: str, *args: str
) -> contextlib.AbstractContextManager[GatewayProcess]:
    """A gateway process inside ``ns``, listening (clients, metrics) on all its addresses."""
    return gateway(
        "--host",
        "0.0.0.0",
        "--metrics-port",
        "0",
        "--metrics-host",
        "0.0.0.0",
        *args,
        feeds={DATASET: uri},
        python=star.python_in(ns),
    )


@pytest.mark.parametrize("cut", ["short", "until_lost"])
def test_publisher_primary_two_edges_exact_and_no_gap_after_a_link_cut(
    star: netns.NetnsStar, tmp_path: Path, cut: str
) -> None:
    """``short``: edge1's upstream link is down until edge1 has heard nothing for HOLD_S
    (the TCP connection may survive); ``until_lost``: down until edge1's relay gives the
    upstream up (15 s of silence), so it must reconnect and resume from the primary's
    journal. Either way edge1's clients get every record, in order, once."""
    symbols, records = synthetic_trades(3 * PHASE, seed=16)
    assert [_sequence(r) for r in records] == list(range(3 * PHASE))
    before, during, after = (records[i * PHASE : (i + 1) * PHASE] for i in range(3))
    key_file = tmp_path / "upstream.key"
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o600)
    ingest = "ingest://0.0.0.0:0?allow=10.0.0.0/8,127.0.0.0/8&idle_timeout_s=300"

    t0 = time.monotonic()
    timeline: list[str] = []  # when each step was done, for the report line

    def mark(step: str) -> None:
        timeline.append(f"{step} {time.monotonic() - t0:.1f}")

    edges: list[GatewayProcess] = []
    clients: dict[str, Client] = {}

    def edge_metrics(i: int) -> Samples:
        return _metrics(star.edge_from_root(i), edges[i - 1].metrics_port)

    def upstream_up(i: int) -> bool:
        return metric(edge_metrics(i), "gateway_relay_upstream_up", dataset=DATASET) == 1

    with contextlib.ExitStack() as stack:
        try:
            primary = stack.enter_context(
                _serve(star, star.primary, ingest, "--journal-dir", str(tmp_path / "journal"))
            )
            for i in (1, 2):
                upstream = (
                    f"lsg://{star.primary_for_edge(i)}:{primary.port}?schemas=trades"
                    f"&key_file={key_file}&heartbeat_interval_s={HEARTBEAT_S}"
                )
                journal = tmp_path / f"edge{i}-journal"  # where the relay saves its position
                edges.append(
                    stack.enter_context(
                        _serve(star, star.edges[i - 1], upstream, "--journal-dir", str(journal))
                    )
                )

            for i in (1, 2):
                poll_until(functools.partial(upstream_up, i), 20, 0.1, f"edge{i}'s relay connected")
            mark("edges up")

            clients["primary"] = Client("primary", star.primary_from_root, primary.port)
            for i in (1, 2):
                for c in range(1, CLIENTS_PER_EDGE + 1):
                    name = f"edge{i}/client{c}"
                    clients[name] = Client(name, star.edge_from_root(i), edges[i - 1].port)
            for client in clients.values():
                stack.callback(client.stop)
                client.start()
            mark("clients in")
            edge1 = [c for n, c in clients.items() if n.startswith("edge1/")]
            others = [c for n, c in clients.items() if not n.startswith("edge1/")]

            def everyone_has(who: list[Client], n: int) -> bool:
                return all(len(c.trades()) >= n for c in who)

            publisher = Publisher(star.primary_from_root, primary.ingest_ports[DATASET], symbols)
            stack.callback(publisher.close)

            # 1. everyone gets the first phase: half of it, then (once edge1 holds an upstream
            # checkpoint) the other half, and the link is cut as soon as edge1's clients have
            # it — usually before the primary's next checkpoint (its tick: 0.5 s), so a resume
            # must also drop the records edge1 got after its checkpoint
            half = PHASE // 2
            publisher.send(before[:half])
            poll_until(
                lambda: everyone_has([*edge1, *others], half), 20, 0.05, "phase 1a delivered"
            )
            mark("phase 1a")
            # A loss before the first checkpoint is a gap by design (no_checkpoint): not this test
            poll_until(
                lambda: _saved_checkpoint(tmp_path / "edge1-journal"),
                10,
                0.05,
                "an upstream checkpoint at edge1's relay",
            )
            mark("checkpoint")
            publisher.send(before[half:])
            poll_until(lambda: everyone_has(edge1, PHASE), 20, 0.01, "phase 1b at edge1")
            mark("phase 1")

            # 2. edge1's upstream link goes down; the primary and edge2 carry on without it
            star.link_down(1)
            cut_at = time.monotonic()
            publisher.send(during)
            poll_until(lambda: everyone_has(others, 2 * PHASE), 20, 0.05, "phases 1-2 at edge2")
            mark("phase 2 at edge2")
            if cut == "short":  # hold the link down until edge1 has heard nothing for HOLD_S
                poll_until(
                    lambda: (
                        metric(
                            edge_metrics(1),
                            "gateway_relay_upstream_silence_seconds",
                            dataset=DATASET,
                        )
                        >= HOLD_S
                    ),
                    HOLD_S + 10,
                    0.2,
                    f"edge1's upstream silent for {HOLD_S} s",
                )
            else:  # until edge1's relay declares the upstream lost (after 5 + 10 s of silence)
                poll_until(
                    lambda: not upstream_up(1),
                    2 * HEARTBEAT_S + 10 + 5,
                    0.2,
                    "edge1's relay to give the upstream up",
                )
            assert all(len(c.trades()) == PHASE for c in edge1), "records crossed a downed link"
            star.link_up(1)
            held = time.monotonic() - cut_at
            mark("link up")
            assert star.link_is_up(1)

            # 3. after the link is back: more records; edge1's clients catch up with no gap
            publisher.send(after)
            limit = 2 * HEARTBEAT_S + 10 + 15  # silence limit, reconnect back-off, replay
            poll_until(
                lambda: everyone_has([*edge1, *others], 3 * PHASE),
                limit,
                0.05,
                "every record at every client after the link came back",
            )
            caught_up = time.monotonic() - cut_at
            mark("caught up")
            poll_until(functools.partial(upstream_up, 1), 10, 0.1, "edge1's relay up again")
            m1 = edge_metrics(1)
            m2 = edge_metrics(2)
        except AssertionError as exc:  # what everyone had, and the edges' side of it
            procs = {"primary": primary, **{f"edge{i}": e for i, e in enumerate(edges, 1)}}
            raise AssertionError(f"{exc}\n{_account(clients, procs, edge_metrics)}") from None
    mark("stopped")

    problems = [p for name, c in clients.items() if (p := _compare(name, c.trades(), records))]
    assert not problems, "\n".join(problems)
    gaps = {name: c.gaps() for name, c in clients.items() if c.gaps()}
    assert not gaps, f"gap or error notices at the clients: {gaps}"
    assert metric(m1, "gateway_relay_gaps_total", dataset=DATASET) == 0
    assert metric(m2, "gateway_relay_gaps_total", dataset=DATASET) == 0
    assert metric(m2, "gateway_relay_reconnects_total", dataset=DATASET) == 0
    reconnects = metric(m1, "gateway_relay_reconnects_total", dataset=DATASET)
    resumes = metric(m1, "gateway_relay_reconnects_total", dataset=DATASET, mode="resume")
    if cut == "until_lost":  # lost, so reconnected: by resuming (exact), never live
        assert resumes >= 1 and reconnects == resumes, (reconnects, resumes)
    print(
        f"{cut}: edge1's link down {held:.1f} s, caught up {caught_up:.1f} s after the cut, "
        f"relay reconnects {reconnects:g} (resume {resumes:g}), "
        f"deduplicated "
        f"{metric(m1, 'gateway_relay_records_deduplicated_total', dataset=DATASET):g}; "
        f"resume_seconds {metric(m1, 'gateway_relay_resume_seconds', dataset=DATASET):.2f}; "
        f"edge1/client1's notices: {clients['edge1/client1'].notices()}; "
        f"timeline (s): {', '.join(timeline)}"
    )
