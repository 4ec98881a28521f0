"""One soak session (``SoakSession``, an asyncio Protocol): handshake with the codec,
subscribe per its ``Plan``, read (polling, or stalled), leave; and ``Env``, what a reader
process shares between its sessions."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any

from gateway import control
from gateway.client import FrameDecompressor
from tests.soak.config import CUT_GRACE_S, DATASET, HOST, SOAK_CLIENT
from tests.soak.plans import Plan
from tests.soak.tracking import StreamError, Tracker, scan

# --- one session ---------------------------------------------------------------------------


@dataclass
class Env:
    """What sessions of one process share."""

    port: int
    key: str
    dataset: str = DATASET
    poll_s: float = 0.05
    #: session ids the gateway logged as cut, and waiters for them
    cut_ids: set[int] = field(default_factory=set)
    cut_waiters: dict[int, asyncio.Event] = field(default_factory=dict)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    def cut_event(self, session_id: int) -> asyncio.Event:
        ev = self.cut_waiters.setdefault(session_id, asyncio.Event())
        if session_id in self.cut_ids:
            ev.set()
        return ev

    def saw_cut(self, session_id: int) -> None:
        self.cut_ids.add(session_id)
        ev = self.cut_waiters.get(session_id)
        if ev is not None:
            ev.set()


def auth_line(
    challenge: str,
    key: str,
    dataset: str,
    *,
    ts_out: bool = False,
    compression: str | None = None,
    slow_reader_behavior: str | None = None,
) -> bytes:
    """The soak's authentication request (no ``compression`` key unless given)."""
    return control.encode_auth(
        control.cram_response(challenge, key),
        dataset,
        ts_out=ts_out,
        compression=compression,
        slow_reader_behavior=slow_reader_behavior,
        client=SOAK_CLIENT,
    )


class SoakSession(asyncio.Protocol):
    """One subscriber: handshake, then records checked run by run; sans threads."""

    def __init__(self, plan: Plan, env: Env) -> None:
        self.plan = plan
        self.env = env
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.tracker = Tracker(plan)
        self.phase = 0  # 0 greeting, 1 challenge, 2 auth reply, 3 Metadata, 4 records
        self.text = b""
        self.rest = b""
        self.session_id = 0
        self.decomp = FrameDecompressor() if plan.zstd else None
        self.started: asyncio.Future[bool] = self.loop.create_future()
        self.lost: asyncio.Future[None] = self.loop.create_future()
        self.eof = False
        self.lost_exc = ""
        self.stalled = False
        self._resume: asyncio.TimerHandle | None = None
        self.bytes_in = 0
        self.failure: str | None = None
        self.t_join = self.t_start = self.t_leave = self.t_end = 0.0
        self.stall_from = self.stall_to = 0.0
        self.records_at_stall = 0
        self.left = ""
        self.lost_early = False
        self.cut_seen = False
        self.start_wall = self.leave_wall = 0  # time.time_ns() at Metadata / at leaving

    # --- protocol callbacks ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        try:
            if self.phase < 3:
                self._text(data)
            else:
                self._binary(data)
        except StreamError as exc:
            self._fail(str(exc))
            return
        except Exception as exc:  # noqa: BLE001 - a decoder error is the gateway's fault too
            self._fail(f"{type(exc).__name__}: {exc}")
            return
        tr = self.transport
        if self.phase < 3 or not self.plan.poll or self.env.poll_s <= 0:
            return
        if tr is not None and not tr.is_closing():
            tr.pause_reading()
            if self._resume is None and not self.stalled:
                self._resume = self.loop.call_later(self.env.poll_s, self._poll)

    def eof_received(self) -> bool | None:
        self.eof = True
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            self.lost_exc = type(exc).__name__
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        self.t_end = time.monotonic()
        if not self.started.done():
            self.started.set_result(False)
        if not self.lost.done():
            self.lost.set_result(None)

    # --- reading ---

    def _poll(self) -> None:
        self._resume = None
        tr = self.transport
        if tr is not None and not self.stalled and not tr.is_closing():
            tr.resume_reading()

    def stall(self) -> None:
        self.stalled = True
        self.stall_from = time.monotonic()
        self.records_at_stall = self.tracker.data_records
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        tr = self.transport
        if tr is not None and not tr.is_closing():
            tr.pause_reading()

    def unstall(self) -> None:
        if self.stalled:
            self.stall_to = time.monotonic()
        self.stalled = False
        tr = self.transport
        if tr is not None and not tr.is_closing() and self._resume is None:
            tr.resume_reading()

    def _fail(self, text: str) -> None:
        if self.failure is None:
            self.failure = text
        if not self.started.done():
            self.started.set_result(False)
        if self.transport is not None:
            self.transport.abort()

    def _text(self, data: bytes) -> None:
        self.text += data
        plan, env = self.plan, self.env
        while self.phase < 3:
            nl = self.text.find(b"\n")
            if nl < 0:
                if len(self.text) > 4096:
                    raise StreamError("handshake line longer than 4096 bytes")
                return
            line = self.text[:nl].decode("ascii", "replace")
            self.text = self.text[nl + 1 :]
            if self.phase == 0:
                if not line.startswith("lsg_version="):
                    raise StreamError(f"bad greeting {line!r}")
                self.phase = 1
            elif self.phase == 1:
                if not line.startswith("cram="):
                    raise StreamError(f"no challenge: {line!r}")
                out = auth_line(
                    line[5:],
                    env.key,
                    env.dataset,
                    ts_out=plan.ts_out,
                    compression="zstd" if plan.zstd else "none",
                    slow_reader_behavior=plan.behavior,
                )
                if plan.pipelined:
                    out += plan.lines()
                assert self.transport is not None
                self.transport.write(out)
                self.phase = 2
            else:
                fields = dict(t.partition("=")[::2] for t in line.split("|"))
                if fields.get("success") != "1":
                    raise StreamError(f"authentication refused: {line!r}")
                self.session_id = int(fields["session_id"])
                if not plan.pipelined:
                    assert self.transport is not None
                    self.transport.write(plan.lines())
                self.phase = 3
                rest, self.text = self.text, b""
                if rest:
                    if not plan.pipelined:
                        raise StreamError("bytes after the auth reply before start_session")
                    self._binary(rest)

    def _binary(self, data: bytes) -> None:
        if self.decomp is not None:
            data = self.decomp.decompress(data)
        buf = self.rest + data if self.rest else data
        off = 0
        if self.phase == 3:
            if len(buf) < 8:
                self.rest = buf
                return
            if buf[:3] != b"DBN" or buf[3] != 3:
                raise StreamError(f"stream does not start with a DBN v3 header: {buf[:8]!r}")
            total = 8 + int.from_bytes(buf[4:8], "little")
            if len(buf) < total:
                self.rest = buf
                return
            dataset = buf[8:24].split(b"\0", 1)[0].decode()
            if dataset != self.env.dataset or buf[52] != int(self.plan.ts_out):
                raise StreamError(f"bad Metadata: dataset {dataset!r} ts_out {buf[52]}")
            off = total
            self.phase = 4
            self.t_start = time.monotonic()
            self.start_wall = time.time_ns()
            if not self.started.done():
                self.started.set_result(True)
        used = scan(buf, off, self.tracker)
        self.rest = buf[used:]

    # --- the scenario ---

    async def _wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True if the connection was lost meanwhile."""
        if seconds > 0 and not self.lost.done():
            await asyncio.wait([self.lost], timeout=seconds)
        return self.lost.done()

    async def run(self) -> None:
        plan, env = self.plan, self.env
        self.t_join = time.monotonic()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if plan.rcvbuf:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, plan.rcvbuf)
            sock.setblocking(False)
            await asyncio.wait_for(self.loop.sock_connect(sock, (HOST, env.port)), 10)
            await self.loop.create_connection(lambda: self, sock=sock)
        except (OSError, TimeoutError) as exc:
            sock.close()
            self.failure = f"connect: {exc!r}"
            return
        try:
            ok = await asyncio.wait_for(asyncio.shield(self.started), 15)
        except TimeoutError:
            ok = False
            self._fail("no Metadata within 15 s of connecting")
        if not ok:
            if self.failure is None:
                self.failure = f"closed during the handshake (phase {self.phase})"
            await self._wait(5)
            return
        await self._scenario()
        if self.lost.done():
            self.lost_early = not self.left
        else:
            await self.leave(plan.leave)
        self.tracker.finish()

    async def _scenario(self) -> None:
        plan, env = self.plan, self.env
        if plan.kind == "healthy":
            await self._wait(plan.lifetime)
        elif plan.kind == "reference":
            stop: asyncio.Future[Any] = asyncio.ensure_future(env.stop.wait())
            await asyncio.wait([stop, self.lost], return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
        elif plan.kind == "skip_stall":
            if await self._wait(plan.pre):
                return
            self.stall()
            if await self._wait(plan.stall):
                return
            self.unstall()
            await self._wait(plan.post)
        elif plan.kind == "warn_stall":
            if await self._wait(plan.pre):
                return
            self.stall()
            cut: asyncio.Future[Any] = asyncio.ensure_future(env.cut_event(self.session_id).wait())
            await asyncio.wait(
                [cut, self.lost], timeout=plan.stall, return_when=asyncio.FIRST_COMPLETED
            )
            cut.cancel()
            self.cut_seen = self.session_id in env.cut_ids
            if self.cut_seen and plan.late:
                await self._wait(CUT_GRACE_S + 2.0)  # the gateway gives up on us meanwhile
            self.unstall()
            if self.cut_seen:
                self.left = "cut"
                await self._wait(20)  # read what is buffered, then EOF
            else:
                await self._wait(plan.post)

    async def leave(self, mode: str) -> None:
        tr = self.transport
        assert tr is not None
        self.left = mode
        self.t_leave = time.monotonic()
        self.leave_wall = time.time_ns()
        if mode == "drain":
            self.unstall()
            if tr.can_write_eof():
                tr.write_eof()
            if not await self._wait(20):
                self.failure = self.failure or "no EOF within 20 s of half-closing"
                tr.abort()
        elif mode == "reset":
            sock = tr.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            tr.abort()
        else:
            tr.close()
        await self._wait(5)

    def summary(self) -> dict[str, Any]:
        t = self.tracker
        return {
            "plan": dataclasses.asdict(self.plan),
            "session_id": self.session_id,
            "failure": self.failure,
            "t_join": self.t_join,
            "t_start": self.t_start,
            "t_end": self.t_end,
            "start_wall": self.start_wall,
            "leave_wall": self.leave_wall,
            "stall_from": self.stall_from,
            "stall_to": self.stall_to,
            "records_at_stall": self.records_at_stall,
            "bytes_in": self.bytes_in,
            "eof": self.eof,
            "lost_exc": self.lost_exc,
            "left": self.left,
            "lost_early": self.lost_early,
            "cut_seen": self.cut_seen,
            "first": t.first,
            "last": t.last,
            "records": t.data_records,
            "fp": t.fp,
            "violations": t.violations,
            "n_violations": t.n_violations,
            "system": dict(t.system),
            "errors": t.errors,
            "unresolved": t.unresolved,
            "mappings": t.mappings,
            "skip_notices": t.skip_notices,
            "skipped_reported": t.skipped_reported,
            "gaps": t.gaps,
            "warnings_during_stall": sum(
                1 for w in t.warnings_at if self.stall_from and w >= self.stall_from
            ),
        }
