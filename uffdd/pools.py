"""Thread pools for work that blocks (cold reads, cache writes, hashing), shared by the process.

Each pool is made at first use: a worker process the supervisor forks starts its own, and a
daemon that never reads cold never starts the threads.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Final

RWF_NOWAIT: Final = getattr(os, "RWF_NOWAIT", 0x8)
"""preadv2(2) flag: fail with EAGAIN instead of waiting for the disk (Linux >= 4.14)."""


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


__all__ = ["RWF_NOWAIT", "SharedPool"]
