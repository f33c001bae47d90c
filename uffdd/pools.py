"""Threads for work that blocks or runs in the background, off the event loop.

The shared pools (cold reads, cache writes, hashing) are each made at first use: a worker process
the supervisor forks starts its own, and a daemon that never reads cold never starts the threads.
Background threads (bulk copies and transfers) lower their own priority, so demand faults go first.
"""

from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Final

RWF_NOWAIT: Final = getattr(os, "RWF_NOWAIT", 0x8)
"""preadv2(2) flag: fail with EAGAIN instead of waiting for the disk (Linux >= 4.14)."""
BACKGROUND_NICE: Final = 10
"""The niceness of background threads (the fault loop keeps the process's, -10 under the unit)."""


def background_priority() -> None:
    """The calling thread yields its CPU to the fault loop and to the vCPUs it wakes: demand first."""
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)


class SharedPool:
    """A named pool of ``workers`` threads, made when it is first called for."""

    def __init__(self, name: str, workers: int) -> None:
        self.name = name
        self.workers = workers
        self._pool: ThreadPoolExecutor | None = None

    def __call__(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix=self.name)
        return self._pool


__all__ = ["BACKGROUND_NICE", "RWF_NOWAIT", "SharedPool", "background_priority"]
