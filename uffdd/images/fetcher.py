"""Getting chunks: memory, then the disk cache, then the store; each chunk once, demand first.

One :class:`ChunkFetcher` per store and cache in a process serves every session that reads
from that store. A chunk wanted by many sessions (or by a fault and by pre-paging at once) is
fetched by one task that they all await; across processes the cache's per-chunk lock makes
the others wait for the file instead of fetching again. Requests to the store share a bounded
number of slots, and background fetches may take all but a few, so a demand fault never waits
behind pre-paging for a slot; a fault that needs a chunk pre-paging has queued promotes it.

A failing store is retried with backoff. Once it has failed for longer than ``deadline`` (no
success since the first failure), the fetcher reports it unreachable (a log line and
:attr:`ChunkFetcher.unreachable`), fails the waiting requests with SourceUnavailable (the
session retries them) and keeps trying. Nothing reaches a caller that failed its hash check.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import structlog

from uffdd.errors import SourceUnavailable
from uffdd.images.cache import ChunkCache, MemoryLRU, Plain
from uffdd.images.format import ChunkRef, ImageFormatError, chunk_key, open_chunk
from uffdd.images.store import ObjectStore, StoreError
from uffdd.images.writer import CacheWriter
from uffdd.pools import SharedPool

log = structlog.get_logger("uffdd.images")

URGENT_RESERVE = 2
INLINE_CHECK = 256 << 10
"""A demand fault's chunk up to this size is decompressed and checked on the event loop
(about 100 us for 64 KiB): handing it to a thread and back costs as much again."""
"""Store slots that background fetches leave free for demand faults."""
_CHUNK_THREADS = max(2, min(8, os.cpu_count() or 2))
_pools = {False: SharedPool("uffdd-chunk", _CHUNK_THREADS), True: SharedPool("uffdd-chunk-urgent", _CHUNK_THREADS)}


def executor(urgent: bool = False) -> ThreadPoolExecutor:
    """Threads for hashing, decompressing and the disk cache (they release the GIL). Demand
    work has threads of its own, so it never queues behind a pre-paging backlog."""
    return _pools[urgent]()


@dataclass(frozen=True)
class FetchOptions:
    concurrency: int = 16
    """Requests to the store in flight at once (per store, per process)."""
    deadline: float = 60.0
    retry_min: float = 0.05
    retry_max: float = 2.0
    memory_bytes: int = 64 << 20


@dataclass
class FetchStats:
    """Counters of one fetcher (all sessions of one store in this process)."""

    requests: int = 0
    """GETs sent to the store."""
    bytes_fetched: int = 0
    memory_hits: int = 0
    cache_hits: int = 0
    waited_for_other: int = 0
    """Chunks another process was fetching: read from the cache once it had finished."""
    store_errors: int = 0
    checksum_failures: int = 0
    """Chunks from the store that failed their hash or format check (fetched again)."""
    unreachable: int = 0
    last_error: str = ""

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


class _Job:
    """One chunk being loaded, awaited by everyone who wants it."""

    __slots__ = ("attempts", "future", "keep", "plain_len", "ref", "running_bg", "task", "urgent", "wakeup")

    def __init__(self, ref: ChunkRef, plain_len: int, urgent: bool) -> None:
        self.ref = ref
        self.plain_len = plain_len
        self.urgent = urgent
        self.running_bg = False
        self.attempts = 0
        self.keep = False
        """Put the chunk in memory when it arrives (it was fetched ahead of need)."""
        self.wakeup: asyncio.Future[None] | None = None
        self.future: asyncio.Future[Plain] = asyncio.get_running_loop().create_future()
        self.task: asyncio.Task[None] | None = None


class _Slots:
    """Store requests in flight: at most ``n``, background ones at most ``n - reserve``;
    a freed slot goes to the oldest urgent waiter first."""

    def __init__(self, n: int, reserve: int) -> None:
        self.free = n
        self.bg_max = max(1, n - reserve)
        self.bg_running = 0
        self.waiting: deque[_Job] = deque()

    def _can_start(self, job: _Job) -> bool:
        return self.free > 0 and (job.urgent or self.bg_running < self.bg_max)

    def _start(self, job: _Job) -> None:
        self.free -= 1
        job.running_bg = not job.urgent
        self.bg_running += job.running_bg

    async def acquire(self, job: _Job) -> None:
        if self._can_start(job) and (job.urgent or not self.waiting):
            self._start(job)
            return
        job.wakeup = asyncio.get_running_loop().create_future()
        self.waiting.append(job)
        self.wake()
        try:
            await job.wakeup
        except asyncio.CancelledError:
            if job in self.waiting:
                self.waiting.remove(job)
            elif job.wakeup.done() and not job.wakeup.cancelled():
                self.release(job)
            raise

    def release(self, job: _Job) -> None:
        self.free += 1
        self.bg_running -= job.running_bg
        job.running_bg = False
        self.wake()

    def wake(self) -> None:
        for want_urgent in (True, False):
            for job in list(self.waiting):
                if job.urgent == want_urgent and self._can_start(job):
                    self.waiting.remove(job)
                    self._start(job)
                    assert job.wakeup is not None
                    job.wakeup.set_result(None)


class ChunkFetcher:
    """Chunks of one store, for every session of this process that reads from it."""

    def __init__(self, store: ObjectStore, cache: ChunkCache | None, options: FetchOptions) -> None:
        self.store = store
        self.cache = cache
        self.opts = options
        self.stats = FetchStats()
        self.memory = MemoryLRU(options.memory_bytes)
        self._jobs: dict[str, _Job] = {}
        self._slots = _Slots(options.concurrency, min(URGENT_RESERVE, options.concurrency - 1))
        self._outage_start: float | None = None
        self.unreachable: SourceUnavailable | None = None
        self.writer = CacheWriter(cache) if cache is not None else None

    def get_nowait(self, ref: ChunkRef, plain_len: int) -> Plain | None:
        """The chunk from memory, or from a cache file the page cache holds whole; no waiting."""
        plain = self.memory.get(ref.name)
        if plain is not None:
            self.stats.memory_hits += 1
            return plain
        if self.cache is None or ref.name in self._jobs:
            return None
        got = self.cache.read_nowait(ref.name, plain_len)
        if got is None:
            return None
        self.stats.cache_hits += 1
        self.memory.put(ref.name, got)
        return got

    def read_part_nowait(self, ref: ChunkRef, plain_len: int, within: int, dest: memoryview) -> bool:
        """Fill ``dest`` with part of a chunk from memory, or from the blocks of a page-cached
        cache file that hold it (each checked against its tag); no waiting."""
        if self.memory.get(ref.name) is None and self.cache is not None and ref.name not in self._jobs:
            done = self.cache.read_part_nowait(ref.name, plain_len, within, dest)
            if done is not None:
                if done:
                    self.stats.cache_hits += 1
                return done
        plain = self.get_nowait(ref, plain_len)  # memory, or a cache file without tags read whole
        if plain is None:
            return False
        dest[:] = memoryview(plain)[within : within + len(dest)]
        return True

    def load_nowait(self, ref: ChunkRef, dest: memoryview) -> bool:
        """Fill ``dest`` (the whole chunk) from memory or the page-cached cache file; no waiting."""
        plain = self.memory.get(ref.name)
        if plain is not None:
            dest[:] = plain
            self.stats.memory_hits += 1
            return True
        if self.cache is not None and self.cache.load(ref.name, dest, nowait=True):
            self.stats.cache_hits += 1
            return True
        return False

    def read_ahead(self, ref: ChunkRef, plain_len: int) -> None:
        """Start a background fetch of a chunk that is not here yet; it is kept in memory."""
        name = ref.name
        if (name in self._jobs or self.memory.get(name) is not None
                or (self.writer is not None and name in self.writer.waiting)
                or (self.cache is not None and os.path.exists(self.cache.file(name)))):
            return
        job = self._jobs[name] = _Job(ref, plain_len, urgent=False)
        job.keep = True
        job.task = asyncio.get_running_loop().create_task(self._run(job))

    async def get(self, ref: ChunkRef, plain_len: int, *, urgent: bool, keep: bool = True) -> Plain:
        """The chunk's checked plain bytes. ``keep``: remember it in memory for the next faults."""
        plain = self.memory.get(ref.name)
        if plain is None and self.writer is not None:
            plain = self.writer.waiting.get(ref.name)
        if plain is not None:
            self.stats.memory_hits += 1
            return plain
        if urgent and self.writer is not None:
            self.writer.note_urgent()
        job = self._jobs.get(ref.name)
        if job is None and urgent:
            # A fault: load it in this task (a task switch less on the way to the guest);
            # whoever else wants the chunk meanwhile awaits the job's future.
            job = self._jobs[ref.name] = _Job(ref, plain_len, urgent)
            await self._run(job)
        elif job is None:
            job = self._jobs[ref.name] = _Job(ref, plain_len, urgent)
            job.task = asyncio.get_running_loop().create_task(self._run(job))
        elif urgent and not job.urgent:
            job.urgent = True  # a fault needs what pre-paging asked for: to the front
            self._slots.wake()
        plain = await asyncio.shield(job.future)
        if keep:
            self.memory.put(ref.name, plain)
        return plain

    async def _run(self, job: _Job) -> None:
        try:
            plain, fetched = await self._load(job)
        except BaseException as exc:
            self._jobs.pop(job.ref.name, None)
            if not job.future.done():
                job.future.set_exception(exc if isinstance(exc, Exception) else SourceUnavailable("cancelled"))
                job.future.exception()  # retrieved: nobody may be waiting any more
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        if fetched and self.writer is not None:
            if job.urgent:
                self.writer.note_urgent()
            self.writer.add(job.ref.name, plain)
        if job.keep:
            self.memory.put(job.ref.name, plain)
        self._jobs.pop(job.ref.name, None)
        job.future.set_result(plain)

    async def _load(self, job: _Job) -> tuple[Plain, bool]:
        delay = self.opts.retry_min
        while True:
            try:
                got = await self._load_once(job)
            except (StoreError, ImageFormatError) as exc:
                self._note_failure(exc, job)
                if self.unreachable is not None:
                    raise SourceUnavailable(str(self.unreachable)) from None
            else:
                if got[1]:  # from the store: a chunk read from the cache says nothing of it
                    self._note_success()
                return got
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, self.opts.retry_max)

    async def _load_once(self, job: _Job) -> tuple[Plain, bool]:
        """(plain chunk, whether it came from the store and must go to the cache)."""
        ref, loop, cache = job.ref, asyncio.get_running_loop(), self.cache
        if cache is not None:
            poll = 0.002
            while (state := cache.probe(ref.name)) != "mine":
                if state == "cached":
                    got = await loop.run_in_executor(executor(job.urgent), cache.read, ref.name, job.plain_len)
                    if got is not None:
                        self.stats.cache_hits += 1
                        return got, False
                    continue  # a bad copy, now removed
                self.stats.waited_for_other += 1
                await asyncio.sleep(poll)  # another process is fetching it: wait for its file
                poll = min(poll * 2, 0.05)
        try:
            blob = await self._download(job)
            try:
                if job.urgent and job.plain_len <= INLINE_CHECK:  # a thread hop costs more than this
                    plain = open_chunk(blob, ref.name, job.plain_len)
                else:
                    plain = await loop.run_in_executor(executor(), open_chunk, blob, ref.name, job.plain_len)
            except ImageFormatError:
                self.stats.checksum_failures += 1
                raise
        except BaseException:
            if cache is not None:
                cache.unlock(ref.name)
            raise
        return plain, True

    async def _download(self, job: _Job) -> Any:
        await self._slots.acquire(job)
        try:
            self.stats.requests += 1
            blob = await self.store.get(chunk_key(job.ref.name), size=job.ref.stored, limit=job.ref.stored)
            self.stats.bytes_fetched += len(blob)
            return blob
        finally:
            self._slots.release(job)

    def _note_failure(self, exc: Exception, job: _Job) -> None:
        self.stats.store_errors += 1
        self.stats.last_error = str(exc)
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._outage_start is None:
            self._outage_start = now
        job.attempts += 1
        if job.attempts == 1 or job.attempts % 10 == 0:  # loud, but not one line per retry
            log.warning("chunk_fetch_failed", store=self.store.url, chunk=job.ref.name, error=str(exc),
                        urgent=job.urgent, attempt=job.attempts)
        down = now - self._outage_start
        if self.unreachable is None and down > self.opts.deadline:
            self.unreachable = SourceUnavailable(
                f"image store {self.store.url} failing for {down:.1f}s (deadline {self.opts.deadline:g}s): {exc}")
            self.stats.unreachable += 1
            log.error("image_store_unreachable", store=self.store.url, seconds=round(down, 1),
                      deadline=self.opts.deadline, error=str(exc))

    def _note_success(self) -> None:
        if self.unreachable is not None:
            log.info("image_store_reachable", store=self.store.url)
        self.unreachable = None
        self._outage_start = None

    async def drain(self) -> None:
        """Write the fetched chunks still waiting for the cache."""
        if self.writer is not None:
            await self.writer.drain()
