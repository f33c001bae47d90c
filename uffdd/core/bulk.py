"""How background runs get their bytes: bulk copies off the event loop, or a source's slow path.

Pre-paging (uffdd.core.prefetch) decides *what* to fetch and claims those pages (FILLING);
this module fetches them and hands complete runs to :meth:`Guest.install_run`.

- A source with a backing file (:meth:`PageSource.backing_fd`) is copied by a worker thread:
  for shmem, ``pwrite`` from a read-only mapping of the source straight into the memory file (no
  fault per page in our mapping, no zeroing of pages about to be overwritten), by the C copier
  (uffdd.core.copier: no GIL, a claim byte per page, each step installed as it is written) where
  it is built; for hugetlbfs, which has no write(2), the huge pages are allocated in one madvise
  and read into with ``preadv``; anonymous guests are read into a private buffer that
  UFFDIO_COPY takes from.
- A source that receives into guest memory itself, off the event loop (:meth:`PageSource.direct_bulk`:
  a peer's bulk link in C) is given the run's pages in the memory file and a claim byte per page;
  a demand fault takes a page whose bytes have not started arriving (:meth:`BulkFetcher.steal`),
  and waits for one being written. Each part is installed as soon as it is checked.
- Any other source is asked for its slow path (:meth:`PageSource.prefetch`) into a private
  buffer, so that a demand fault on one of those pages can take it over (:meth:`BulkFetcher.steal`)
  and fetch it urgently; only pages nobody took over are copied into guest memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import structlog

from uffdd.core.copier import STEP_BYTES, LocalCopier, copier_available
from uffdd.core.pagestate import PageStates
from uffdd.core.regions import Region, RegionMap, Run
from uffdd.core.stats import SessionStats, Wait
from uffdd.errors import GuestMemoryGone, PagePoisoned, SourceError
from uffdd.kernel.memory import PrivateBuffer, copy_into, populate
from uffdd.pools import background_priority
from uffdd.sources import PageSource
from uffdd.sources.base import DirectReceiver

INSTALL_STEP = 256 << 10
"""Bytes of background pages installed at once before the fault loop gets its turn."""


class _BufferPool:
    """Private buffers for background runs, kept between runs (and sessions) with their pages
    allocated: a fresh buffer costs a fault and a zeroed page per page."""

    def __init__(self, keep: int) -> None:
        self._keep = keep
        self._idle: list[PrivateBuffer] = []

    def take(self, size: int) -> PrivateBuffer:
        for k, b in enumerate(self._idle):
            if len(b.view) >= size:
                return self._idle.pop(k)
        buf = PrivateBuffer(size)
        with contextlib.suppress(OSError):
            populate(buf.view)
        return buf

    def give(self, buf: PrivateBuffer) -> None:
        if len(self._idle) < self._keep:
            self._idle.append(buf)
        else:
            buf.close()


_BUFFERS = _BufferPool(keep=8)


class Refill(Protocol):
    def __call__(self, region: Region, idx: int, wait: Wait | None, /) -> None: ...


class PrefetchHost(Protocol):
    """What background work needs of a session: its pages, and the one way to install them.
    (uffdd.core.guest.Guest is the implementation.)"""

    id: str
    page_size: int
    hugetlb: bool
    anonymous: bool
    memfd: int | None
    regions: RegionMap
    states: PageStates
    stats: SessionStats
    cursor: tuple[Region, int]
    file_end: int
    closed: bool
    log: structlog.typing.FilteringBoundLogger

    def install_run(self, region: Region, lo: int, n: int, path: str, wait: Wait | None = None,
                    src: PrivateBuffer | None = None, src_off: int = 0, delay: float = ...) -> None: ...

    def release_claims(self, runs: list[Run]) -> None: ...

    def poison_run(self, region: Region, lo: int, n: int, exc: PagePoisoned, wait: Wait | None,
                   refill: Refill) -> None: ...

    def gone_unless_covered(self, region: Region, lo: int, n: int) -> bool: ...

    def covers(self, region: Region, lo: int, n: int) -> bool: ...

    def memory_short(self) -> bool: ...


class _InFlight:
    __slots__ = ("claims", "frozen", "lo", "n", "receiver", "region", "stolen")

    def __init__(self, region: Region, lo: int, n: int, receiver: DirectReceiver | None = None,
                 claims: memoryview | None = None) -> None:
        self.region, self.lo, self.n = region, lo, n
        self.stolen: set[int] = set()
        self.receiver = receiver
        self.claims = claims
        """Direct runs: a claim byte per page (:class:`DirectReceiver`); the receiver arbitrates."""
        self.frozen = False
        """The bytes are here: a demand fault waits for the local copy instead of taking over."""

    def unstolen(self, lo: int | None = None, hi: int | None = None) -> list[tuple[int, int]]:
        """[p, q) runs of the pages (within [lo, hi), by default all) no demand fault took over:
        still this work's to install."""
        out: list[tuple[int, int]] = []
        p = self.lo if lo is None else lo
        end = self.lo + self.n if hi is None else hi
        while p < end:
            if p in self.stolen:
                p += 1
                continue
            q = p
            while q < end and q not in self.stolen:
                q += 1
            out.append((p, q))
            p = q
        return out


class BulkFetcher:
    """Fetches claimed runs for one session and installs them (see the module docstring)."""

    def __init__(self, host: PrefetchHost, source: PageSource, refill: Refill) -> None:
        self.host = host
        self.source = source
        self.refill = refill
        self._pool: ThreadPoolExecutor | None = None
        self._src_map: mmap.mmap | None = None
        self._inflight: list[_InFlight] = []
        self._direct: DirectReceiver | None = None
        self._claims: memoryview | None = None
        self._copier: LocalCopier | None = None
        self._copier_ok = copier_available()
        if not (host.anonymous or host.hugetlb or host.memfd is None):
            self._direct = source.direct_bulk()

    @property
    def inflight_pages(self) -> int:
        """Pages of background runs on their way right now (those taken over by demand faults
        are counted there)."""
        return sum(run.n - len(run.stolen) for run in self._inflight)

    async def fetch(self, runs: list[Run], path: str) -> None:
        """Fill ``runs`` and install them. A source error is retried with backoff, and only
        for what is not installed yet: an installed page is never written again. If the memory
        file no longer holds a run (the VMM shrank it), the session ends."""
        try:
            await self._fetch(runs, path)
        except GuestMemoryGone:
            for r, i, n in runs:
                if self.host.gone_unless_covered(r, i, n):
                    return
            raise

    async def _fetch(self, runs: list[Run], path: str) -> None:
        fd = self.source.backing_fd()
        if fd is None:
            for r, i, n in runs:
                if self._direct is not None:
                    await self._fetch_direct(self._direct, r, i, n, path)
                else:
                    await self._fetch_slow(r, i, n, path)
        elif self.host.anonymous:
            await self._retrying(lambda: self._fetch_private(fd, runs, path), runs)
        else:
            await self._copy_local(fd, runs, path)

    async def _copy_local(self, fd: int, runs: list[Run], path: str) -> None:
        """Shared memory from a backing file. A run goes to the C copier, which installs it a
        step at a time as it writes it and lets a demand fault take over what it has not reached.
        A batch of short runs (a replayed working set: thousands of a page or two) is copied by
        one thread call instead, then installed: one copier request each would cost more than
        the copying."""
        copier = self._local_copier(fd)
        nbytes = sum(n << r.shift for r, _, n in runs)
        if copier is not None and (len(runs) == 1 or nbytes >= len(runs) * STEP_BYTES):
            done = await asyncio.gather(*(self._fetch_direct(copier, r, i, n, path) for r, i, n in runs),
                                        return_exceptions=True)
            if failed := next((x for x in done if isinstance(x, BaseException)), None):
                raise failed
            if not all(done):  # the snapshot failed a read: pre-paging backs off before it tries again
                raise SourceError("background copy from the snapshot failed")
            return
        loop = asyncio.get_running_loop()
        await self._retrying(lambda: loop.run_in_executor(self._executor(), self._copy, fd, runs), runs)
        for r, i, n in runs:
            await self._install_in_steps(r, i, n, path)

    def _local_copier(self, fd: int) -> LocalCopier | None:
        """The C copier for shared memory of 4 KiB pages, made at first use; None without it
        (or if the source cannot be mapped: then a Python thread copies)."""
        if self._copier is None and self._copier_ok and not self.host.hugetlb and self.host.memfd is not None:
            try:
                self._copier = LocalCopier(fd, self.host.memfd, self.host.file_end, f"uffdd-prefetch-{self.host.id}")
            except (OSError, ValueError) as exc:
                self._copier_ok = False
                self.host.log.warning("background_copier_unavailable", error=str(exc))
        return self._copier

    async def _install_in_steps(self, r: Region, i: int, n: int, path: str, buf: PrivateBuffer | None = None,
                                off: int = 0) -> None:
        """Install a run a step at a time, letting the fault loop run in between: a demand fault
        never waits behind more than one step of background installs."""
        step = max(1, INSTALL_STEP >> r.shift)
        for p in range(i, i + n, step):
            k = min(step, i + n - p)
            self.host.install_run(r, p, k, path, None, buf, off + ((p - i) << r.shift))
            if p + k < i + n:
                await asyncio.sleep(0)

    async def _retrying(self, attempt: Callable[[], Awaitable[object]], runs: list[Run]) -> None:
        delay = 0.01
        while True:
            try:
                await attempt()
                return
            except (PagePoisoned, GuestMemoryGone):
                raise
            except (SourceError, OSError) as exc:
                if not all(self.host.covers(r, i, n) for r, i, n in runs):
                    raise GuestMemoryGone(str(exc)) from None
                self.host.stats.source_errors += 1
                self.host.log.warning("prefetch_failed", error=str(exc), retry_in=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def _fetch_private(self, fd: int, runs: list[Run], path: str) -> None:
        """Anonymous memory: read into a private buffer, then COPY (installs nothing on error)."""
        buf = PrivateBuffer(sum(n << r.shift for r, _, n in runs))
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor(), self._read, fd, runs, buf.view)
            off = 0
            for r, i, n in runs:
                await self._install_in_steps(r, i, n, path, buf, off)
                off += n << r.shift
        finally:
            buf.close()

    async def _fetch_slow(self, r: Region, i: int, n: int, path: str) -> None:
        """One run from the source's slow path into a private buffer, so that a demand fault
        can take a page over while the bytes are on their way. Once they are here, the run is
        frozen (a fault on it waits for the local copy), written into the memory file by a
        thread, and installed."""
        run = _InFlight(r, i, n)
        self._inflight.append(run)
        length = n << r.shift
        buf = _BUFFERS.take(length)
        try:
            with buf.view[:length] as dest:
                await self._retrying(lambda: self.source.prefetch(r.file_offset(i), dest), [])
            run.frozen = True
            pieces = run.unstolen()
            if self.host.anonymous:
                for p, q in pieces:
                    await self._install_in_steps(r, p, q - p, path, buf, (p - i) << r.shift)
                return
            await asyncio.get_running_loop().run_in_executor(self._executor(), self._write_pieces, run, pieces, buf)
            for p, q in pieces:
                await self._install_in_steps(r, p, q - p, path)
        except PagePoisoned as exc:
            for p, q in run.unstolen():
                self.host.poison_run(r, p, q - p, exc, None, self.refill)
        finally:
            self._inflight.remove(run)
            _BUFFERS.give(buf)

    async def _fetch_direct(self, direct: DirectReceiver, r: Region, i: int, n: int, path: str) -> bool:
        """One run received into guest memory by the source's own thread; each checked part is
        installed at once. On a source error, what did not arrive goes back to EMPTY (demand
        faults or a later pass fetch it) and the result is False; a memory file the VMM shrank
        ends the session."""
        if self._claims is None:
            self._claims = memoryview(bytearray(self.host.regions.pages))
        claims = self._claims[r.base + i : r.base + i + n]
        claims[:] = bytes(n)
        run = _InFlight(r, i, n, direct, claims)
        self._inflight.append(run)

        def on_frame(first: int, k: int, ok: bool) -> None:
            want = _FROZEN if ok else _FREE  # frozen: in place and checked; free: failed, unfrozen
            for p, q in _spans(claims, first, first + k, want):
                if ok:
                    self.host.install_run(r, i + p, q - p, path)
                else:
                    self.host.release_claims([(r, i + p, q - p)])

        try:
            with r.mem[i << r.shift : (i + n) << r.shift] as dest:
                await direct.fetch(r.file_offset(i), dest, claims, on_frame)
        except (SourceError, OSError) as exc:
            if isinstance(exc, GuestMemoryGone):
                raise
            self.host.stats.source_errors += 1
            self.host.log.warning("prefetch_failed", error=str(exc), pages=n)
            self.host.release_claims([(r, i + p, q - p) for p, q in _spans(claims, 0, n, _FREE)])
            return False
        finally:
            self._inflight.remove(run)
        return True

    def _pwrite_run(self, memfd: int, data: memoryview, r: Region, lo: int, n: int) -> None:
        """Worker thread: pages [lo, lo+n) of ``r`` into the memory file with pwrite. A pwrite past
        the end would grow a file the VMM shrank: the size is checked before and after (a shrink
        in between leaves the file short of the regions); either way the session ends."""
        foff = r.file_offset(lo)
        if not self.host.covers(r, lo, n):
            raise GuestMemoryGone.at(foff, n << r.shift)
        done = 0
        while done < len(data):
            done += os.pwrite(memfd, data[done:], foff + done)
        if self.host.memory_short():
            raise GuestMemoryGone.at(foff, n << r.shift)

    def _write_pieces(self, run: _InFlight, pieces: list[tuple[int, int]], buf: PrivateBuffer) -> None:
        """Worker thread: the run's pieces into the memory file. shmem: pwrite (the kernel
        allocates the pages, no zeroing, no fault per page); hugetlbfs, which has no write(2):
        allocate the huge pages in one madvise, then a guarded copy."""
        r = run.region
        memfd = self.host.memfd
        assert memfd is not None
        for p, q in pieces:
            with buf.view[(p - run.lo) << r.shift : (q - run.lo) << r.shift] as data:
                if not self.host.hugetlb:
                    self._pwrite_run(memfd, data, r, p, q - p)
                    continue
                with r.mem[p << r.shift : q << r.shift] as dest:
                    try:
                        populate(dest)
                        copy_into(dest, data)
                    except OSError as exc:
                        raise GuestMemoryGone.at(r.file_offset(p), (q - p) << r.shift) from exc

    def steal(self, r: Region, idx: int) -> bool:
        """A demand fault hit a page claimed by background work still in flight: if that work
        writes into a private buffer, the fault takes the page over and fetches it urgently."""
        for run in self._inflight:
            if run.region is r and run.lo <= idx < run.lo + run.n and idx not in run.stolen and not run.frozen:
                if run.claims is not None and run.receiver is not None and not run.receiver.take(run.claims,
                                                                                                  idx - run.lo):
                    return False  # its bytes are being written: the fault waits for them
                run.stolen.add(idx)
                return True
        return False

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            # Copies into one shmem file serialize on its inode lock: one thread. hugetlbfs
            # copies (preadv into separate huge pages) scale with a second core.
            workers = 2 if self.host.hugetlb else 1
            self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"uffdd-prefetch-{self.host.id}",
                                            initializer=background_priority)
        return self._pool

    # --- worker threads (GIL released in the system calls) ------------------------------------
    def _copy(self, fd: int, runs: list[Run]) -> None:
        for r, i, n in runs:
            foff = r.file_offset(i)
            length = n << r.shift
            if self.host.hugetlb:
                with r.mem[i << r.shift : (i + n) << r.shift] as view:
                    populate(view)
                    _read_fully(fd, view, foff)
                continue
            src = self._source_map(fd)
            if foff + length > len(src):
                raise SourceError(f"source has {len(src)} bytes, prefetch needs {foff + length}")
            memfd = self.host.memfd
            assert memfd is not None
            with memoryview(src)[foff : foff + length] as chunk:
                self._pwrite_run(memfd, chunk, r, i, n)

    @staticmethod
    def _read(fd: int, runs: list[Run], dest: memoryview) -> None:
        off = 0
        for r, i, n in runs:
            length = n << r.shift
            _read_fully(fd, dest[off : off + length], r.file_offset(i))
            off += length

    def _source_map(self, fd: int) -> mmap.mmap:
        if self._src_map is None:
            self._src_map = mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ)
        return self._src_map

    def close(self) -> None:
        """Join the copy threads (before the source and the mappings go away)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self._copier is not None:
            self._copier.close()
            self._copier = None
        if self._src_map is not None:
            self._src_map.close()
            self._src_map = None


_FREE, _FROZEN = 0, 2
"""Claim bytes of a direct run (:class:`DirectReceiver`)."""


def _spans(claims: memoryview, lo: int, hi: int, want: int) -> list[tuple[int, int]]:
    """[p, q) runs within [lo, hi) whose claim byte is ``want``."""
    out: list[tuple[int, int]] = []
    p = lo
    while p < hi:
        if claims[p] != want:
            p += 1
            continue
        q = p + 1
        while q < hi and claims[q] == want:
            q += 1
        out.append((p, q))
        p = q
    return out


def _read_fully(fd: int, dest: memoryview, offset: int) -> None:
    done = 0
    while done < len(dest):
        got = os.preadv(fd, [dest[done:]], offset + done)
        if got <= 0:
            raise SourceError(f"source ended at {offset + done} during prefetch")
        done += got


__all__ = ["BulkFetcher", "PrefetchHost", "Refill"]
