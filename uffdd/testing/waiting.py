"""Waiting on state instead of sleeping: the only way tests (and tools) synchronise.

A test that sleeps and then asserts is either slow (the sleep is long) or flaky (it is not).
:func:`eventually` polls a predicate until it holds and fails loudly, naming what it waited
for, when it does not hold in time. :func:`wait_until` is the same for synchronous code.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

DEFAULT_TIMEOUT = 10.0
_FIRST_INTERVAL = 0.001
_MAX_INTERVAL = 0.05


class NotYet(AssertionError):
    """The awaited condition did not hold within the timeout."""


def _describe(what: str | None, predicate: Callable[..., object], last: object) -> str:
    name = what or getattr(predicate, "__name__", repr(predicate))
    return f"{name} did not hold within the timeout (last value: {last!r})"


async def eventually(predicate: Callable[[], T | Awaitable[T]], *, timeout: float = DEFAULT_TIMEOUT,
                     what: str | None = None, max_interval: float = _MAX_INTERVAL) -> T:
    """Poll ``predicate`` (a function or coroutine function) until it returns a true value,
    and return that value; raise :class:`NotYet` after ``timeout`` seconds.

    The interval grows from 1 ms (or ``max_interval``, if smaller) to ``max_interval`` (50 ms),
    so a condition that holds at once costs nothing and a slow one does not spin; a test that
    must catch a moment (a kill landing mid-migration) polls finer.
    """
    deadline = time.monotonic() + timeout
    interval = min(_FIRST_INTERVAL, max_interval)
    while True:
        value = predicate()
        if asyncio.iscoroutine(value) or isinstance(value, asyncio.Future):
            value = await value
        if value:
            return value  # type: ignore[return-value]
        if time.monotonic() >= deadline:
            raise NotYet(_describe(what, predicate, value))
        await asyncio.sleep(interval)
        interval = min(interval * 2, max_interval)


def wait_until(predicate: Callable[[], T], *, timeout: float = DEFAULT_TIMEOUT, what: str | None = None,
               max_interval: float = _MAX_INTERVAL) -> T:
    """:func:`eventually` for synchronous code (a thread, a test without an event loop)."""
    deadline = time.monotonic() + timeout
    interval = min(_FIRST_INTERVAL, max_interval)
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise NotYet(_describe(what, predicate, value))
        time.sleep(interval)
        interval = min(interval * 2, max_interval)


__all__ = ["DEFAULT_TIMEOUT", "NotYet", "eventually", "wait_until"]
