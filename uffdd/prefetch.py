"""Background pre-paging: fill every page the guest has not touched yet, in large runs.

Demand faults always go first: they are served inline by the session's reader callback, while
the bulk copies here run in a worker thread (the event loop only issues one UFFDIO_CONTINUE per
run). The order is: a recorded working set first (replay), then a scan that starts at the most
recent demand fault and moves on from there, wrapping around.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import aiofiles.os
import structlog

from uffdd import workingset
from uffdd.config import SessionConfig
from uffdd.errors import PagePoisoned, SourceError
from uffdd.pagestate import EMPTY, FILLING

if TYPE_CHECKING:
    from uffdd.session import Region, Session

log = structlog.get_logger("uffdd.prefetch")

_MADV_POPULATE_WRITE = 23
Segment = tuple["Region", int, int]
"""(region, first page, pages): a run of pages claimed (FILLING) for one copy and one CONTINUE."""


class _InFlight:
    __slots__ = ("lo", "n", "region", "stolen")

    def __init__(self, region: Region, lo: int, n: int) -> None:
        self.region, self.lo, self.n = region, lo, n
        self.stolen: set[int] = set()


class Prefetcher:
    """One per session; :meth:`run` is the session's background task."""

    def __init__(self, session: Session, config: SessionConfig) -> None:
        self.s = session
        self.cfg = config.prefetch
        self.replay = config.replay
        self.chunk_pages = max(1, self.cfg.chunk // session.page_size)
        self._slots = asyncio.Semaphore(max(1, self.cfg.max_inflight // max(self.cfg.chunk, session.page_size)))
        self._pool: ThreadPoolExecutor | None = None
        self._src_map: mmap.mmap | None = None
        self._last_cursor: tuple[Region, int] | None = None
        self._pos: tuple[int, int] = (0, 0)
        self._rate_t0 = 0.0
        self._rate_bytes = 0
        self._pending: set[asyncio.Task[None]] = set()
        self._inflight: list[_InFlight] = []
        self._stopped = False

    def stop(self) -> None:
        """No new background work (the session is complete); work in flight finishes."""
        self._stopped = True

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self._src_map is not None:
            self._src_map.close()
            self._src_map = None

    async def run(self) -> None:
        try:
            if self.replay:
                await self._replay()
            if self.cfg.enabled:
                await self._scan()
            if self._pending:
                await asyncio.gather(*self._pending)
        except asyncio.CancelledError:
            for t in self._pending:
                t.cancel()
            if self._pending:
                await asyncio.gather(*self._pending, return_exceptions=True)
            raise

    # --- what to fetch ---------------------------------------------------------------------
    async def _replay(self) -> None:
        path = self.s.source.record_path()
        size = self.s.source.size
        if path is None or size is None or not await aiofiles.os.path.exists(path):
            return
        try:
            pages = await workingset.load(path, source_size=size, page_size=self.s.page_size)
        except (workingset.RecordError, OSError) as exc:
            log.warning("working_set_ignored", session=self.s.id, path=path, reason=str(exc))
            return
        self.s.skip_recording()
        log.info("working_set_replay", session=self.s.id, path=path, pages=len(pages))
        by_offset = sorted(self.s.regions, key=lambda r: r.offset)
        todo = workingset.runs(pages)
        k = 0
        while k < len(todo) and not self.s.closed:
            await self._slots.acquire()  # claim pages only when they can be fetched right away
            await self._throttle(self.chunk_pages * self.s.page_size)
            batch: list[Segment] = []
            batch_pages = 0
            while k < len(todo) and batch_pages < self.chunk_pages:
                first, count = todo[k]
                k += 1
                for seg in self._claim_file_run(by_offset, first, count):
                    batch.append(seg)
                    batch_pages += seg[2]
            if batch:
                await self._dispatch(batch, "replay", have_slot=True)
            else:
                self._slots.release()

    def _claim_file_run(self, by_offset: list[Region], first: int, count: int) -> list[Segment]:
        """Claim the EMPTY pages of file pages [first, first+count), split by region and state."""
        out: list[Segment] = []
        ps_shift = self.s.regions[0].shift
        off, end = first << ps_shift, (first + count) << ps_shift
        for r in by_offset:
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
            r.state[i : i + n] = bytes((FILLING,)) * n
        return n

    def _next_run(self) -> Segment | None:
        """The next EMPTY run at or after the scan position, which jumps to each new demand fault."""
        s = self.s
        if s.cursor is not self._last_cursor:
            self._last_cursor = s.cursor
            self._pos = (s.cursor[0].index, s.cursor[1])
        ri, i = self._pos
        nreg = len(s.regions)
        for k in range(nreg + 1):
            r = s.regions[(ri + k) % nreg]
            start = i if k == 0 else 0
            j = s.states.find(EMPTY, r.base + start, r.base + r.npages)
            if j < 0 and k == 0 and start > 0:
                j = s.states.find(EMPTY, r.base, r.base + start)  # wrap within the region
            if j >= 0:
                idx = j - r.base
                n = self._claim(r, idx, r.npages - idx)
                self._pos = (r.index, idx + n)
                return (r, idx, n)
        return None

    async def _scan(self) -> None:
        while not self.s.closed and not self._stopped:
            await self._slots.acquire()  # claim pages only when they can be fetched right away
            await self._throttle(self.chunk_pages * self.s.page_size)
            seg = self._next_run()
            if seg is None:
                self._slots.release()
                return
            await self._dispatch([seg], "prefetch", have_slot=True)

    # --- how to fetch ----------------------------------------------------------------------
    async def _dispatch(self, segs: list[Segment], path: str, have_slot: bool = False) -> None:
        """Start filling ``segs`` once an in-flight slot is free; respects the rate limit."""
        if not have_slot:
            await self._slots.acquire()
        task = asyncio.get_running_loop().create_task(self._fill(segs, path))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
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

    async def _fill(self, segs: list[Segment], path: str) -> None:
        try:
            await self._fill_or_raise(segs, path)
        except asyncio.CancelledError:
            raise
        except Exception:
            # Never leave claimed pages stuck: hand them back to the demand path and make their
            # waiting vCPUs fault again.
            log.exception("prefetch_crashed", session=self.s.id)
            self.s.release_claims(segs)

    async def _fill_or_raise(self, segs: list[Segment], path: str) -> None:
        s = self.s
        fd = s.source.backing_fd()
        delay = 0.01
        while True:
            try:
                if fd is not None and s.anonymous:
                    buf = s.new_bounce(sum(n << r.shift for r, _, n in segs))
                    await asyncio.get_running_loop().run_in_executor(
                        self._executor(), self._read_segments, fd, segs, buf.view)
                    off = 0
                    for r, i, n in segs:
                        s.install_run(r, i, n, path, buf, off)
                        off += n << r.shift
                    return
                if fd is not None:
                    loop = asyncio.get_running_loop()
                    await loop.run_in_executor(self._executor(), self._copy_segments, fd, segs)
                else:
                    await self._fill_bounced(segs, path)
                    return
                break
            except (SourceError, OSError) as exc:
                s.stats.source_errors += 1
                log.warning("prefetch_failed", session=s.id, error=str(exc), retry_in=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
        for r, i, n in segs:
            s.install_run(r, i, n, path)

    async def _fill_bounced(self, segs: list[Segment], path: str) -> None:
        """For sources that may be slow (no backing file): fetch into a private buffer, so that a
        demand fault on one of these pages can take it over (``steal``) and fetch it urgently;
        only pages nobody took over are copied into guest memory and installed."""
        s = self.s
        for r, i, n in segs:
            run = _InFlight(r, i, n)
            self._inflight.append(run)
            try:
                buf = s.new_bounce(n << r.shift)
                with buf.view[: n << r.shift] as dest:
                    await s.source.prefetch(r.file_offset(i), dest)
            except PagePoisoned as exc:
                s.poison_run(r, i, n, exc)
                continue
            finally:
                self._inflight.remove(run)
            p = i
            while p < i + n:
                if p in run.stolen:
                    p += 1
                    continue
                q = p
                while q < i + n and q not in run.stolen:
                    q += 1
                if s.anonymous:
                    s.install_run(r, p, q - p, path, buf, (p - i) << r.shift)
                else:
                    with s.second_mapping().view(r.file_offset(p), (q - p) << r.shift) as dest:
                        dest[:] = buf.view[(p - i) << r.shift : (q - i) << r.shift]
                    s.install_run(r, p, q - p, path)
                p = q

    def steal(self, r: Region, idx: int) -> bool:
        """A demand fault hit a page claimed by background work still in flight: if that work
        writes into a private buffer, the fault takes the page over and fetches it urgently."""
        for run in self._inflight:
            if run.region is r and run.lo <= idx < run.lo + run.n and idx not in run.stolen:
                run.stolen.add(idx)
                return True
        return False

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            # Copies into one shmem file serialize on its inode lock: one thread. hugetlbfs
            # copies (preadv into separate huge pages) scale with a second core.
            workers = 2 if self.s.hugetlb else 1
            self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"uffdd-prefetch-{self.s.id}")
        return self._pool

    def _copy_segments(self, fd: int, segs: list[Segment]) -> None:
        """Worker thread: copy runs from the source file into the memory file, GIL released.

        shmem: pwrite from a read-only mapping of the source straight into the memfd (no page
        fault per page in our mapping, no zeroing of pages about to be overwritten).
        hugetlbfs has no write(2): allocate the huge pages in one madvise, then preadv into them.
        """
        s = self.s
        for r, i, n in segs:
            foff = r.file_offset(i)
            length = n << r.shift
            if s.hugetlb:
                view = s.second_mapping().view(foff, length)
                try:
                    s.second_mapping().populate(foff, length)
                    done = 0
                    while done < length:
                        got = os.preadv(fd, [view[done:]], foff + done)
                        if got <= 0:
                            raise SourceError(f"source ended at {foff + done} during prefetch")
                        done += got
                finally:
                    view.release()
            else:
                src = self._source_map(fd)
                if foff + length > len(src):
                    raise SourceError(f"source has {len(src)} bytes, prefetch needs {foff + length}")
                with memoryview(src)[foff : foff + length] as chunk:
                    done = 0
                    assert s.memfd is not None
                    while done < length:
                        done += os.pwrite(s.memfd, chunk[done:], foff + done)

    @staticmethod
    def _read_segments(fd: int, segs: list[Segment], dest: memoryview) -> None:
        """Worker thread: read runs from the source file into a private buffer (anonymous guests)."""
        off = 0
        for r, i, n in segs:
            foff = r.file_offset(i)
            length = n << r.shift
            done = 0
            while done < length:
                got = os.preadv(fd, [dest[off + done : off + length]], foff + done)
                if got <= 0:
                    raise SourceError(f"source ended at {foff + done} during prefetch")
                done += got
            off += length

    def _source_map(self, fd: int) -> mmap.mmap:
        if self._src_map is None:
            self._src_map = mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ)
        return self._src_map
