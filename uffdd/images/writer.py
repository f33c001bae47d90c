"""Writing fetched chunks to the cache when the faults leave room for it.

Creating files competes with the fault path for the CPU and the file system (measured: a
cold demand fault took 1.3-1.5x as long while each fetched chunk was written at once). So
fetched chunks queue here and one task writes them once no demand fault has waited for a
chunk for a moment, or when too many bytes are waiting. Until its file is in place a chunk is
answered from the queue, and this process keeps the chunk's cross-process lock, so no one
fetches it again meanwhile.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import OrderedDict

import structlog

from uffdd.images.cache import ChunkCache, Plain
from uffdd.pools import SharedPool

log = structlog.get_logger("uffdd.images")

QUIET_S = 0.002
"""Writes start once no demand fault has waited for a chunk for this long..."""
MAX_WAITING_BYTES = 64 << 20
"""...or once this many bytes wait to be written."""
WRITES_IN_FLIGHT = 4
_pool = SharedPool("uffdd-cache-write", WRITES_IN_FLIGHT)


class CacheWriter:
    """The queue of checked chunks on their way to one cache (one per fetcher)."""

    def __init__(self, cache: ChunkCache) -> None:
        self.cache = cache
        self.waiting: OrderedDict[str, Plain] = OrderedDict()
        self._bytes = 0
        self._task: asyncio.Task[None] | None = None
        self._urgent_at = 0.0
        self._flush = False
        self._idle = asyncio.Event()
        self._idle.set()

    def note_urgent(self) -> None:
        """A demand fault is waiting for a chunk: hold the writes back a moment."""
        self._urgent_at = asyncio.get_running_loop().time()

    def add(self, name: str, plain: Plain) -> None:
        """Queue a chunk this process fetched and holds the cache lock for."""
        if name in self.waiting:
            return
        self.waiting[name] = plain
        self._bytes += len(plain)
        self._idle.clear()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self.waiting:
                calm = loop.time() - self._urgent_at
                if calm < QUIET_S and self._bytes < MAX_WAITING_BYTES and not self._flush:
                    await asyncio.sleep(QUIET_S - calm)
                    continue
                batch = list(itertools.islice(self.waiting.items(), WRITES_IN_FLIGHT))
                await asyncio.gather(*(self._write(name, plain) for name, plain in batch))
        finally:
            self._task = None
            self._flush = False
            self._idle.set()

    async def _write(self, name: str, plain: Plain) -> None:
        try:
            if await asyncio.get_running_loop().run_in_executor(_pool(), self.cache.write, name, plain):
                await asyncio.get_running_loop().run_in_executor(_pool(), self.cache.evict)
        except OSError as exc:
            log.warning("chunk_cache_write_failed", chunk=name, cache=self.cache.path, error=str(exc))
        finally:
            del self.waiting[name]
            self._bytes -= len(plain)
            self.cache.unlock(name)

    async def drain(self) -> None:
        """Write everything waiting now, without waiting for a quiet moment."""
        if self.waiting:
            self._flush = True
            await self._idle.wait()
