"""Hostile clients: garbage, truncated and oversize lines, bad auth, resets, drips,
stalls; each action says whether the gateway answered as promised."""

from __future__ import annotations

import asyncio
import random

from gateway import control
from tests.soak.config import ERR_INVALID, HOST, SOAK_CLIENT
from tests.soak.session import auth_line
from tests.support.wire import AsyncRawClient, error_records

# --- hostile clients -----------------------------------------------------------------------

HOSTILE_ACTIONS = (
    "garbage_line",
    "garbage_open",
    "truncated",
    "oversize",
    "bad_auth",
    "auth_garbage",
    "pipelined_garbage",
    "post_start_garbage",
    "stream_reset",
    "half_close",
    "reset_early",
    "drip",
    "stall_close",
    "bad_dataset",
    "many_subs",
    "idle",
)


class Hostile(AsyncRawClient):
    """A raw client that misbehaves on purpose (``tests.support.wire.AsyncRawClient``
    plus random garbage)."""

    def __init__(
        self, port: int, key: str, dataset: str, rng: random.Random, max_line: int = 128 * 1024
    ) -> None:
        super().__init__(port, key, dataset, host=HOST, client_name=SOAK_CLIENT)
        self.rng = rng
        self.max_line = max_line

    def garbage(self, size: int, newline: bool) -> bytes:
        data = self.rng.randbytes(size)
        if not newline:
            return data.replace(b"\n", b" ")
        return data + b"\n"


async def _hostile_action(h: Hostile, action: str) -> tuple[str, bool]:
    """Run one hostile action on an open connection; (outcome, as expected?)."""
    rng = h.rng
    if action == "garbage_line":
        if await h.greeting() is None:
            return "no greeting", False
        await h.send(h.garbage(rng.randint(0, 2000), newline=True))
        rest = await h.to_end()
        ok = rest.startswith(b"success=0|error=") or (h.ended == "reset" and not rest)
        return f"{rest[:40]!r} {h.ended}", ok and h.ended != "timeout"
    if action == "garbage_open":
        await h.send(h.garbage(rng.randint(1, 1000), newline=False))
        if rng.random() < 0.5:
            h.close()
            return "closed", True
        h.half_close()
        await h.to_end()
        return f"half-closed {h.ended}", h.ended in ("eof", "reset")
    if action == "truncated":
        challenge = await h.greeting()
        if challenge is None:
            return "no greeting", False
        line = auth_line(challenge, h.key, h.dataset)
        await h.send(line[: rng.randint(1, len(line) - 1)])
        how = rng.choice(["close", "reset", "half"])
        if how == "close":
            h.close()
        elif how == "reset":
            h.reset()
        else:
            h.half_close()
            await h.to_end()
            return f"truncated+half {h.ended}", h.ended in ("eof", "reset")
        return f"truncated+{how}", True
    if action == "oversize":
        if await h.greeting() is None:
            return "no greeting", False
        size = h.max_line + rng.randint(1, 64 * 1024)
        sent = await h.send(b"A" * size + (b"\n" if rng.random() < 0.5 else b""))
        rest = await h.to_end()
        ok = rest.startswith(b"success=0|error=control line longer than") or (
            h.ended == "reset" and not rest
        )
        return f"{rest[:40]!r} sent={sent} {h.ended}", ok and h.ended != "timeout"
    if action == "bad_auth":
        challenge = await h.greeting()
        if challenge is None:
            return "no greeting", False
        bad_key = "db-" + "".join(rng.choice("ABCDEFGH") for _ in range(29))
        await h.send(auth_line(challenge, bad_key, h.dataset))
        rest = await h.to_end()
        return f"{rest[:40]!r} {h.ended}", rest.startswith(b"success=0|error=") and (
            h.ended in ("eof", "reset")
        )
    if action in ("auth_garbage", "pipelined_garbage"):
        challenge = await h.greeting()
        if challenge is None:
            return "no greeting", False
        junk = h.garbage(rng.randint(0, 500), newline=True)
        if action == "pipelined_garbage":
            await h.send(auth_line(challenge, h.key, h.dataset) + junk)
            reply = await h.line()
        else:
            await h.send(auth_line(challenge, h.key, h.dataset))
            reply = await h.line()
            await h.send(junk)
        if not reply or not reply.startswith("success=1"):
            return f"auth reply {reply!r}", False
        stream = await h.to_end()
        errors = error_records(stream)
        ok = bool(errors) and errors[-1][0] == ERR_INVALID and h.ended != "timeout"  # type: ignore[index]
        return f"errors={errors} {h.ended}", ok
    if action == "post_start_garbage":
        if not await h.streaming(rng.choice(["trades", "mbp-1"])):
            return "did not stream", False
        await h.send(h.garbage(rng.randint(0, 200), newline=True))
        stream = await h.to_end()
        errors = error_records(stream)
        ok = bool(errors) and errors[-1][0] == ERR_INVALID and h.ended != "timeout"  # type: ignore[index]
        return f"errors={errors and errors[-1]} {h.ended}", ok
    if action == "stream_reset":
        if not await h.streaming():
            return "did not stream", False
        for _ in range(rng.randint(0, 3)):
            await h.recv(1.0)
        h.reset()
        return "reset mid-stream", True
    if action == "half_close":
        stage = rng.choice(["pre", "auth", "stream"])
        if stage == "pre":
            ok = await h.greeting() is not None
        elif stage == "auth":
            ok = await h.authed()
        else:
            ok = await h.streaming()
        h.half_close()
        await h.to_end()
        return f"half-close {stage} {h.ended}", ok and h.ended in ("eof", "reset")
    if action == "reset_early":
        if rng.random() < 0.5:
            await h.line()
        h.reset()
        return "reset", True
    if action == "drip":
        challenge = await h.greeting()
        if challenge is None:
            return "no greeting", False
        data = auth_line(challenge, h.key, h.dataset)
        data += control.encode_subscription(
            "trades", control.ALL_SYMBOLS, snapshot=None, is_last=None
        )
        data += control.START_SESSION
        i = 0
        while i < len(data):
            n = rng.randint(1, 9)
            await h.send(data[i : i + n])
            i += n
            await asyncio.sleep(0.002)
        reply = await h.line()
        head = h.buf or await h.recv()  # the Metadata may share a read with the reply
        h.close()
        ok = bool(reply and reply.startswith("success=1")) and bool(head) and head[:3] == b"DBN"  # type: ignore[index]
        return "dripped", ok
    if action == "stall_close":
        h.close()  # reopen with a tiny receive buffer
        await h.open(rcvbuf=4096)
        if not await h.streaming():
            return "did not stream", False
        await asyncio.sleep(rng.uniform(0.2, 1.0))
        h.close()
        return "stalled then closed", True
    if action == "bad_dataset":
        challenge = await h.greeting()
        if challenge is None:
            return "no greeting", False
        await h.send(auth_line(challenge, h.key, "NOPE." + h.garbage(4, False).hex()[:6]))
        rest = await h.to_end()
        return f"{rest[:60]!r} {h.ended}", rest.startswith(b"success=0|error=") and (
            h.ended in ("eof", "reset")
        )
    if action == "many_subs":
        if not await h.authed():
            return "auth failed", False
        lines = b"".join(
            control.encode_subscription(
                rng.choice(["trades", "mbp-1", "ohlcv-1s"]),
                [h.garbage(3, False).hex().upper(), "AAPL"],
                snapshot=None,
                sub_id=i,
                is_last=None,
            )
            for i in range(rng.randint(1, 40))
        )
        await h.send(lines + control.START_SESSION)
        head = await h.recv()
        h.close()
        return "subscribed", bool(head) and head[:3] == b"DBN"  # type: ignore[index]
    # idle: connect, say nothing, go
    await asyncio.sleep(rng.uniform(0, 0.3))
    h.close()
    return "idle", True


async def hostile_once(
    port: int,
    rng: random.Random,
    *,
    key: str,
    dataset: str,
    action: str | None = None,
    max_line: int = 128 * 1024,
) -> tuple[str, str, bool]:
    """One hostile connection: (action, outcome, gateway behaved as promised)."""
    action = action or rng.choice(HOSTILE_ACTIONS)
    h = Hostile(port, key, dataset, rng, max_line=max_line)
    try:
        await h.open()
        outcome, ok = await asyncio.wait_for(_hostile_action(h, action), 30)
    except TimeoutError:
        outcome, ok = "action timed out", False
    except OSError as exc:
        outcome, ok = f"{type(exc).__name__}: {exc}", False
    finally:
        h.close()
    return action, outcome, ok
