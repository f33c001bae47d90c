"""Completion: once every page is in place, the ranges are unregistered and the VMM told, once.

The fault loop stays on until the ranges are unregistered and the queue was read once more:
events queued before that (a balloon's REMOVE) block their VMM thread until they are read.
An unregister the kernel refuses (most often: the VMM has just exited and its EOF is on the
way) is tried again with backoff while faults keep being served: a guest with registered
ranges and nobody reading them would hang.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine

from uffdd.core.guest import Guest
from uffdd.kernel import KernelError


class Completion:
    def __init__(self, guest: Guest, *, spawn: Callable[[Coroutine[object, object, None]], object],
                 before: Callable[[], None], drain: Callable[[], None],
                 finish: Callable[[], Coroutine[object, object, None]]) -> None:
        self.guest = guest
        self._spawn = spawn
        self._before = before
        """Stops new background work."""
        self._drain = drain
        """Reads the userfaultfd's queue (events that wait to be read)."""
        self._finish = finish
        """Ends the session as completed (stop the fault loop, release, report)."""
        self._running = False
        self._delay = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self.enabled = False
        """Set once the session serves faults: completion never starts before that."""

    def schedule(self) -> None:
        """Every page may be in place: complete, unless that is under way or the session ended."""
        if self._running or not self.enabled or self.guest.closed:
            return
        self._running = True
        self._spawn(self._run())

    async def _run(self) -> None:
        guest = self.guest
        guest.stats.complete_s = time.monotonic() - guest.stats.started
        self._before()
        failed = []
        for r in guest.regions:
            try:
                guest.uffd.unregister(r.start, r.end - r.start)
            except KernelError as exc:
                failed.append((r.index, str(exc)))
        if failed:
            if not self._delay:
                guest.log.info("unregister_retry", regions=failed)
            self._delay = min(max(self._delay * 2, 0.05), 1.0)
            self._running = False
            self._drain()
            self._timer = asyncio.get_running_loop().call_later(self._delay, self.schedule)
            return
        self._drain()
        await self._finish()

    def cancel(self) -> None:
        self.enabled = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


__all__ = ["Completion"]
