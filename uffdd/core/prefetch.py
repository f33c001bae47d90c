"""Background pre-paging: fill every page the guest has not touched yet, in large runs.

Demand faults always go first: they are served inline by the fault loop, while the bulk copies
(uffdd.core.bulk) run off the event loop, which only issues one install per run. The order: a
recorded working set first (replay, uffdd.core.workingset), then a scan that starts at the most
recent demand fault and moves on from there, wrapping around. Pages are claimed (FILLING) only
when their fetch can start at once, so a demand fault never waits on a claim that only sleeps.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import aiofiles.os

from uffdd.config import SessionConfig
from uffdd.core.bulk import BulkFetcher, PrefetchHost
from uffdd.core.guest import PREFETCH, REPLAY
from uffdd.core.pagestate import EMPTY, FILLING
from uffdd.core.regions import Region, Run
from uffdd.core.tasks import Tasks
from uffdd.core.workingset import RecordError, load_record, record_runs
from uffdd.sources import PageSource

_FILLING = bytes((FILLING,))

CRASH_DELAY_MIN_S = 0.05
CRASH_DELAY_MAX_S = 5.0


class Prefetcher:
    """One per session; :meth:`run` is the session's background task."""

    def __init__(self, host: PrefetchHost, source: PageSource, fetcher: BulkFetcher, config: SessionConfig,
                 *, on_replay: Callable[[], None]) -> None:
        self.host = host
        self.source = source
        self.fetcher = fetcher
        self.cfg = config.prefetch
        self.replay = config.replay
        self._on_replay = on_replay
        """Called when a recorded working set is replayed (the recorder keeps that record)."""
        self.chunk_pages = max(1, self.cfg.chunk // host.page_size)
        self._slots = asyncio.Semaphore(max(1, self.cfg.max_inflight // max(self.cfg.chunk, host.page_size)))
        self._last_cursor: tuple[Region, int] | None = None
        self._pos: tuple[int, int] = (0, 0)
        self._rate_t0 = 0.0
        self._rate_bytes = 0
        self._tasks = Tasks()
        self._stopped = False
        self._crash_delay = 0.0
        """After background work failed unexpectedly (no thread could be started, say): how long
        claiming waits, doubling up to CRASH_DELAY_MAX_S, so a lasting failure never spins."""
        self._resume_at = 0.0

    def stop(self) -> None:
        """No new background work (the session is complete); work in flight finishes."""
        self._stopped = True

    async def run(self) -> None:
        try:
            if self.replay:
                await self._replay()
            if self.cfg.enabled:
                await self._scan()
            await self._tasks.wait()
        finally:
            await self._tasks.cancel()

    # --- what to fetch ---------------------------------------------------------------------
    async def _replay(self) -> None:
        path = self.source.record_path()
        size = self.source.size
        if path is None or size is None or not await aiofiles.os.path.exists(path):
            return
        try:
            pages = await load_record(path, source_size=size, page_size=self.host.page_size)
        except (RecordError, OSError) as exc:
            self.host.log.warning("working_set_ignored", path=path, reason=str(exc))
            return
        self._on_replay()
        self.host.log.info("working_set_replay", path=path, pages=len(pages))
        by_offset = self.host.regions.by_offset()
        todo = record_runs(pages)
        k = 0
        while k < len(todo) and not self.host.closed:
            await self._slot()
            await self._throttle(self.chunk_pages * self.host.page_size)
            batch: list[Run] = []
            batch_pages = 0
            while k < len(todo) and batch_pages < self.chunk_pages:
                first, count = todo[k]
                k += 1
                for run in self._claim_file_run(by_offset, first, count):
                    batch.append(run)
                    batch_pages += run[2]
            if batch:
                await self._dispatch(batch, REPLAY)
            else:
                self._slots.release()

    def _claim_file_run(self, by_offset: list[Region], first: int, count: int) -> list[Run]:
        """Claim the EMPTY pages of file pages [first, first+count), split by region and state."""
        out: list[Run] = []
        ps_shift = by_offset[0].shift
        off, end = first << ps_shift, (first + count) << ps_shift
        for r in by_offset:
            if r.retired:
                continue
            lo = max(off, r.offset)
            hi = min(end, r.offset + (r.npages << r.shift))
            if lo >= hi:
                continue
            i, stop = (lo - r.offset) >> r.shift, (hi - r.offset) >> r.shift
            while i < stop:
                n = self._claim(r, i, stop - i)
                if n:
                    out.append((r, i, n))
                    i += n
                else:
                    i += 1
        return out

    def _claim(self, r: Region, i: int, limit: int) -> int:
        """Mark up to ``limit`` consecutive EMPTY pages from ``i`` FILLING; return how many."""
        window = bytes(r.state[i : i + min(limit, self.chunk_pages)])
        n = len(window) - len(window.lstrip(b"\0"))
        if n:
            r.state[i : i + n] = _FILLING * n
        return n

    def _next_run(self) -> Run | None:
        """The next EMPTY run at or after the scan position, which jumps to each new demand fault."""
        host = self.host
        regions = host.regions.regions
        if host.cursor is not self._last_cursor:
            self._last_cursor = host.cursor
            self._pos = (host.cursor[0].index, host.cursor[1])
        ri, i = self._pos
        nreg = len(regions)
        for k in range(nreg + 1):
            r = regions[(ri + k) % nreg]
            start = i if k == 0 else 0
            j = host.states.find(EMPTY, r.base + start, r.base + r.npages)
            if j < 0 and k == 0 and start > 0:
                j = host.states.find(EMPTY, r.base, r.base + start)  # wrap within the region
            if j >= 0:
                idx = j - r.base
                n = self._claim(r, idx, r.npages - idx)
                self._pos = (r.index, idx + n)
                return (r, idx, n)
        return None

    async def _scan(self) -> None:
        while not self.host.closed and not self._stopped:
            await self._slot()
            await self._throttle(self.chunk_pages * self.host.page_size)
            run = self._next_run()
            if run is None:
                self._slots.release()
                return
            await self._dispatch([run], PREFETCH)

    # --- how fast ----------------------------------------------------------------------------
    async def _slot(self) -> None:
        """Claim pages only when they can be fetched right away (an in-flight slot is free), and
        not while backing off after a crash."""
        await self._slots.acquire()
        if (pause := self._resume_at - time.monotonic()) > 0:
            await asyncio.sleep(pause)

    async def _dispatch(self, runs: list[Run], path: str) -> None:
        """Start fetching ``runs`` (an in-flight slot is already held)."""
        task = self._tasks.spawn(self._fetch(runs, path))
        task.add_done_callback(lambda _: self._slots.release())
        await asyncio.sleep(0)  # let demand faults in between runs

    async def _throttle(self, nbytes: int) -> None:
        """Wait until ``nbytes`` more fit the rate limit; called before pages are claimed, so a
        demand fault never waits on a claim that is only sleeping."""
        rate = self.cfg.rate
        if rate is None:
            return
        now = time.monotonic()
        if not self._rate_t0:
            self._rate_t0 = now
        self._rate_bytes += nbytes
        ahead = self._rate_bytes / (rate * (1 << 20)) - (now - self._rate_t0)
        if ahead > 0:
            await asyncio.sleep(ahead)

    async def _fetch(self, runs: list[Run], path: str) -> None:
        try:
            await self.fetcher.fetch(runs, path)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # Never leave claimed pages stuck: hand them back to the demand path and make their
            # waiting vCPUs fault again. Then back off: the cause may last (threads, memory).
            self.host.release_claims(runs)
            if time.monotonic() < self._resume_at:
                return  # a run that was already in flight: the back-off is logged once
            self._crash_delay = min(max(2 * self._crash_delay, CRASH_DELAY_MIN_S), CRASH_DELAY_MAX_S)
            self._resume_at = time.monotonic() + self._crash_delay
            self.host.log.error("prefetch_crashed", error=repr(exc), retry_in=self._crash_delay,
                                exc_info=self._crash_delay == CRASH_DELAY_MIN_S)  # one traceback a streak
        else:
            self._crash_delay = 0.0


__all__ = ["Prefetcher"]
