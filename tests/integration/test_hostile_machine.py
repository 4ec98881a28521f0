"""A hostile pass (issue 11) as a hypothesis state machine over a real gateway process:
clients send any mix of valid and broken control lines while publishers send any mix of
good and broken DBN to the ingest port. Whatever happens, the gateway stays up, every
connection it ends gets a reason and a clean close, and a healthy official-client
session beside them all keeps receiving its records in order."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator

import databento_dbn as dbn
import numpy as np
import pytest
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    rule,
    run_state_machine_as_test,
)

from gateway.control import cram_response
from gateway.dbn import encode_publisher_metadata
from gateway.feeds.synthetic import SyntheticGenerator, SyntheticOptions
from tests.integration.helpers import (
    KEY,
    GatewayProcess,
    OfficialSession,
    data_records,
    start_gateway,
)

CONFIG = """
[limits]
handshake_timeout_s = 2
start_timeout_s = 3
max_subscriptions = 20
max_symbols = 2000
"""
SCHEMAS = ["trades", "mbp-1", "mbo", "tbbo", "ohlcv-1s", "definition", "bogus"]


class Client:
    """A raw Live client whose every step is bounded in time."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.sock.settimeout(0.2)
        self.data = b""
        self.eof = False
        self.reset = False
        self.pump(until=b"cram=", limit=5)
        line = self.data.split(b"cram=", 1)[1].split(b"\n", 1)[0]
        self.challenge = line.decode()

    def pump(self, until: bytes | None = None, limit: float = 0.2) -> None:
        deadline = time.monotonic() + limit
        while not self.eof and time.monotonic() < deadline:
            try:
                chunk = self.sock.recv(1 << 20)
            except TimeoutError:
                if until is None or until in self.data:
                    return
                continue
            except ConnectionResetError:
                self.reset = self.eof = True
                return
            if not chunk:
                self.eof = True
                return
            self.data += chunk
            if until is not None and until in self.data and b"\n" in self.data.split(until)[-1]:
                return

    def send(self, payload: bytes) -> None:
        try:
            self.sock.sendall(payload)
        except OSError:
            pass  # the gateway may have ended the session: checked on close


def auth_line(
    challenge: str, key: str = KEY, dataset: str = "DEMO.SYNTH", extra: str = ""
) -> bytes:
    # built by hand: ``extra`` may hold what the codec refuses to write ('|', bad keys)
    return (
        f"auth={cram_response(challenge, key)}|dataset={dataset}|encoding=dbn|"
        f"compression=none{extra}\n"
    ).encode()


symbols = st.lists(
    st.one_of(
        st.sampled_from(["ALL_SYMBOLS", "SYN0", "SYN1", "NOPE", "", "1", "4294967295", "-5"]),
        st.text("ABCXYZ0123.|=,\x00\xff ", max_size=12),
    ),
    max_size=6,
)


@st.composite
def control_lines(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["sub", "start", "junk", "binary", "long", "partial"]))
    if kind == "sub":
        schema = draw(st.sampled_from(SCHEMAS))
        stype = draw(st.sampled_from(["raw_symbol", "instrument_id", "parent", "bad"]))
        syms = ",".join(draw(symbols))
        extra = draw(st.sampled_from(["", "|snapshot=1", "|start=0", "|id=3|is_last=0", "|id=x"]))
        return f"schema={schema}|stype_in={stype}|symbols={syms}{extra}\n".encode(
            "utf-8", "replace"
        )
    if kind == "start":
        return b"start_session\n"
    if kind == "junk":
        return draw(st.text(max_size=40)).encode("utf-8", "replace") + b"\n"
    if kind == "binary":
        return draw(st.binary(max_size=64))
    if kind == "long":
        return b"schema=trades|symbols=" + b"A" * draw(st.integers(1, 200_000)) + b"\n"
    return draw(st.sampled_from([b"schema=tra", b"auth=", b"\r\n", b"|||\n"]))


def publisher_chunks(records: list[bytes]) -> st.SearchStrategy[bytes]:
    good = st.lists(st.sampled_from(records), min_size=1, max_size=20).map(b"".join)
    header = st.tuples(
        st.integers(0, 255), st.sampled_from([0x00, 0x01, 0x13, 0x15, 0x16, 0x17, 0x99])
    ).map(lambda t: bytes(t) + bytes(14))
    return st.one_of(good, good, header, st.binary(max_size=100))


def _trades() -> tuple[dict[str, int], list[bytes]]:
    gen = SyntheticGenerator(SyntheticOptions(instruments=4, seed=9, schemas=("trades",)))
    blob = b"".join(gen.make(40, time.time_ns(), 1_000_000))
    return dict(gen.instruments), [blob[i : i + 48] for i in range(0, len(blob), 48)]


SYMBOLS, TRADES = _trades()


def make_machine(gw: GatewayProcess) -> type[RuleBasedStateMachine]:
    ingest = gw.ingest_ports["ING.H"]

    class Machine(RuleBasedStateMachine):
        clients = Bundle("clients")

        def __init__(self) -> None:
            super().__init__()
            self.open: list[Client] = []
            self.publisher: socket.socket | None = None

        @rule(target=clients)
        def connect(self) -> Client:
            client = Client(gw.port)
            self.open.append(client)
            return client

        @rule(
            client=clients,
            good=st.booleans(),
            dataset=st.sampled_from(["DEMO.SYNTH", "ING.H", "NOPE"]),
        )
        def authenticate(self, client: Client, good: bool, dataset: str) -> None:
            key = KEY if good else "db-" + "Z" * 29
            client.send(auth_line(client.challenge, key, dataset))
            client.pump()

        @rule(client=clients, line=control_lines())
        def control(self, client: Client, line: bytes) -> None:
            client.send(line)
            client.pump()

        @rule(client=consumes(clients))
        def hang_up(self, client: Client) -> None:
            client.pump(limit=0.3)
            ended_by_gateway = client.eof
            client.sock.close()
            self.open.remove(client)
            if ended_by_gateway:
                check_clean_end(client)

        @rule(chunk=publisher_chunks(TRADES), fresh=st.booleans())
        def publish(self, chunk: bytes, fresh: bool) -> None:
            if self.publisher is None or fresh:
                if self.publisher is not None:
                    self.publisher.close()
                self.publisher = socket.create_connection(("127.0.0.1", ingest), timeout=2)
                chunk = encode_publisher_metadata("ING.H", time.time_ns(), SYMBOLS) + chunk
            try:
                self.publisher.sendall(chunk)
            except OSError:
                self.publisher.close()
                self.publisher = None

        @invariant()
        def gateway_is_up(self) -> None:
            assert gw.proc.poll() is None

        def teardown(self) -> None:
            for client in self.open:
                client.pump(limit=0.1)
                client.sock.close()
                if client.eof:
                    check_clean_end(client)
            if self.publisher is not None:
                self.publisher.close()

    return Machine


def check_clean_end(client: Client) -> None:
    """A connection the gateway ended: a clean close (no reset) with a reason."""
    assert not client.reset, client.data[-200:]
    data = client.data
    text, sep, binary = data.partition(b"success=1|")
    if not sep:
        assert b"success=0|error=" in data, data[-200:]
        return
    binary = binary.split(b"\n", 1)[1] if b"\n" in binary else b""
    # A streaming session ended by the gateway was told why with an ErrorMsg.
    assert b"\x15" in binary or not binary, binary[-100:]


@pytest.fixture(scope="module")
def gw() -> Iterator[GatewayProcess]:
    feeds = {"DEMO.SYNTH": "synthetic:?rate=1000", "ING.H": "ingest://127.0.0.1:0?idle_timeout_s=2"}
    proc = start_gateway(feeds=feeds, config=CONFIG)
    try:
        yield proc
    finally:
        rc = proc.stop()
        proc.cleanup()
        assert rc == 0


@pytest.mark.slow_e2e  # a hypothesis search for invariant breaks, not a loop check
def test_hostile_clients_and_publishers_together(gw: GatewayProcess) -> None:
    watcher = OfficialSession(
        gw.port, "DEMO.SYNTH", [{"schema": "trades", "symbols": "ALL_SYMBOLS"}]
    )
    watcher.start()
    run_state_machine_as_test(
        make_machine(gw),
        settings=settings(
            max_examples=int(os.environ.get("GATEWAY_HOSTILE_EXAMPLES", "15")),
            stateful_step_count=12,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        ),
    )
    seen = len(data_records(watcher.records))
    assert watcher.wait_for(lambda r: len(data_records(r)) > seen + 100)
    assert watcher.stop() is None
    assert not [r for r in watcher.records if isinstance(r, dbn.ErrorMsg)]
    seqs = np.array([r.sequence for r in data_records(watcher.records)])
    assert (np.diff(seqs) > 0).all()
    log = gw.log()
    for noise in ("Traceback", "panicked", "Exception in callback", "Task exception"):
        assert noise not in log, log[log.find(noise) - 500 : log.find(noise) + 1500]
