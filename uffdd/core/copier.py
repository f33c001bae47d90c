"""Background runs from a file source into shared memory by a thread that needs no GIL.

A copy thread in Python must take the GIL back after each system call, and while the event loop
is busy serving faults that takes milliseconds; a vCPU that faulted on a page of the run waits
that long. :class:`LocalCopier` hands a whole run to ``_copier.c``, which writes it a step at a
time without the GIL and reports each step through an eventfd. It speaks the
:class:`~uffdd.sources.base.DirectReceiver` protocol (claim bytes shared with demand faults), so
:class:`~uffdd.core.bulk.BulkFetcher` treats it as it treats the peer's bulk link.

The extension is optional: without it, background runs are copied by a Python thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import importlib
import itertools
import mmap
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType

from uffdd.errors import GuestMemoryGone, SourceError
from uffdd.pools import background_priority

STEP_BYTES = 512 << 10
"""Bytes frozen, written and reported at a time: what a demand fault on a page being written
waits for at most."""

OnFrame = Callable[[int, int, bool], None]


def _load() -> ModuleType | None:
    try:
        return importlib.import_module("uffdd.core._copier")
    except ImportError:
        return None


_module = _load()


def copier_available() -> bool:
    return _module is not None


class LocalCopier:
    """Copies runs of ``src_fd`` into the memory file ``memfd`` at the same offsets (see the
    module docstring). One per session; :meth:`close` before the memory file goes."""

    def __init__(self, src_fd: int, memfd: int, file_end: int, name: str) -> None:
        assert _module is not None
        self._map = mmap.mmap(src_fd, 0, mmap.MAP_SHARED, mmap.PROT_READ)
        self._c = _module.Copier(self._map, memfd, file_end)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name, initializer=background_priority)
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._c.done_fd, self._drain)
        self._waiting: dict[int, OnFrame] = {}
        self._ids = itertools.count(1)

    async def fetch(self, offset: int, dest: memoryview, claims: memoryview, on_frame: OnFrame) -> None:
        """Copy the pages of ``dest`` (its length says how many; ``claims`` has a byte per page)
        from the snapshot at ``offset`` into the memory file at the same offset; each step is
        reported to ``on_frame`` once written. Raises GuestMemoryGone or SourceError; the pages
        not reported by then are not in place (and not frozen)."""
        mod = _module
        assert mod is not None
        pages = len(claims)
        if not pages:
            return
        shift = (len(dest) // pages).bit_length() - 1
        if offset + len(dest) > len(self._map):
            raise SourceError(f"source has {len(self._map)} bytes, prefetch needs {offset + len(dest)}")
        rid = next(self._ids) & 0xFFFFFFFF
        self._waiting[rid] = on_frame
        try:
            status, err = await self._loop.run_in_executor(self._pool, self._c.run, rid, offset, claims, shift,
                                                           max(1, STEP_BYTES >> shift))
            self._drain()  # the steps of this run the reader has not taken yet
        finally:
            del self._waiting[rid]
        if status == mod.RUN_GONE:
            raise GuestMemoryGone.at(offset, len(dest))
        if status == mod.RUN_ERROR:
            raise SourceError(f"background copy at {offset}: {os.strerror(err or errno.EIO)}")

    def _drain(self) -> None:
        for rid, first, n in self._c.drain():
            on_frame = self._waiting.get(rid)
            if on_frame is not None:
                on_frame(first, n, True)

    def take(self, claims: memoryview, index: int) -> bool:
        assert _module is not None
        taken: bool = _module.claim_take(claims, index)
        return taken

    def close(self) -> None:
        """Join the copy thread, then let go of the snapshot's mapping."""
        with contextlib.suppress(ValueError, RuntimeError):  # the loop is closed already
            self._loop.remove_reader(self._c.done_fd)
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._c.close()
        self._map.close()


__all__ = ["LocalCopier", "copier_available"]
