"""Work that the kernel refused for now (EAGAIN, a transient error): done again later, never
in a busy loop, and only after the userfaultfd's pending events have been read (while one is
unread, every ioctl on the range fails with EAGAIN)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable

RETRY_MIN_S = 0.005
RETRY_MAX_S = 1.0


def backoff(delay: float) -> float:
    """The delay after ``delay``: doubled, at most RETRY_MAX_S."""
    return min(delay * 2, RETRY_MAX_S)


class Retries:
    """Timers keyed by what they retry: the same work is never scheduled twice."""

    def __init__(self, loop: asyncio.AbstractEventLoop, before: Callable[[], None]) -> None:
        self._loop = loop
        self._before = before
        """Run before each retry: reads the userfaultfd's pending events."""
        self._handles: dict[Hashable, asyncio.TimerHandle] = {}
        self.closed = False

    def later(self, key: Hashable, fn: Callable[[], None], delay: float) -> None:
        """Run ``fn`` after ``delay`` seconds (once the queued events are read)."""
        if self.closed or key in self._handles:
            return

        def run() -> None:
            del self._handles[key]
            self._before()
            if not self.closed:
                fn()

        self._handles[key] = self._loop.call_later(delay, run)

    def pending(self, key: Hashable) -> bool:
        return key in self._handles

    def cancel(self) -> None:
        """Drop every pending retry: the session is ending."""
        self.closed = True
        for h in self._handles.values():
            h.cancel()
        self._handles.clear()


__all__ = ["RETRY_MAX_S", "RETRY_MIN_S", "Retries", "backoff"]
