"""Waiting for a condition: poll it with a deadline, never sleep a fixed time."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeVar, overload

__all__ = ["apoll_until", "poll_until"]

_T = TypeVar("_T")


def _poll_failed(what: str, predicate: Any, timeout: float, last: Any) -> AssertionError:
    name = what or getattr(predicate, "__qualname__", repr(predicate))
    return AssertionError(f"timed out after {timeout:g} s waiting for {name}; last value: {last!r}")


def poll_until(
    predicate: Callable[[], _T | None | Literal[False]],
    timeout: float = 15.0,
    interval: float = 0.02,
    what: str = "",
) -> _T:
    """Call ``predicate`` until it returns something truthy and return that; AssertionError
    naming ``what`` (and the last value) after ``timeout`` s. The one wait loop of the suite:
    tests poll for the condition they need instead of sleeping a fixed time."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise _poll_failed(what, predicate, timeout, value)
        time.sleep(interval)


@overload
async def apoll_until(
    predicate: Callable[[], Awaitable[_T | None | Literal[False]]],
    timeout: float = ...,
    interval: float = ...,
    what: str = ...,
) -> _T: ...


@overload
async def apoll_until(
    predicate: Callable[[], _T | None | Literal[False]],
    timeout: float = ...,
    interval: float = ...,
    what: str = ...,
) -> _T: ...


async def apoll_until(
    predicate: Callable[[], Any],
    timeout: float = 15.0,
    interval: float = 0.02,
    what: str = "",
) -> Any:
    """poll_until for a test running on the event loop: waits with ``asyncio.sleep`` so the
    test's own clients keep running. ``predicate`` may return an awaitable (a coroutine, or
    ``asyncio.to_thread(...)`` for blocking work such as an HTTP scrape of a busy gateway)."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        value = await result if inspect.isawaitable(result) else result
        if value:
            return value
        if time.monotonic() >= deadline:
            raise _poll_failed(what, predicate, timeout, value)
        await asyncio.sleep(interval)
