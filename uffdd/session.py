"""One VMM's guest: its regions, the state of every page, and the fault loop.

The fault loop runs on the event loop as a reader callback. Each readable event drains the
userfaultfd (up to 64 messages per read) and resolves faults *inline* when the source can fill
without blocking (a page-cache hit); only a page that needs real waiting becomes a task. Every
page goes through the same steps: write it through the daemon's second mapping (or the memory
file), then UFFDIO_CONTINUE. A page is marked filled only once CONTINUE returned (or said
EEXIST). A demand fault fills an aligned block around the page (fault-around) with one read and
one CONTINUE; background pre-paging (uffdd.prefetch) fills the rest; once every page is in
place the session completes: ranges unregistered, the VMM told, the source released.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import os
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field

import structlog

from uffdd import workingset
from uffdd.config import SessionConfig
from uffdd.errors import HandshakeError, SessionError, SourceError
from uffdd.handshake import Handshake, RegionSpec, check_against
from uffdd.kernel import (
    MAX_BATCH,
    GuestGone,
    KernelError,
    MappingChanging,
    PageExists,
    SecondMapping,
    UffdMsg,
    Userfaultfd,
    abi,
    file_page_size,
    file_size,
)
from uffdd.kernel.uffd import supported_features
from uffdd.pagestate import EMPTY, FILLED, FILLING, INSTALLING, PageStates
from uffdd.sources import PageSource

log = structlog.get_logger("uffdd.session")

RETRY_MIN_S = 0.005
RETRY_MAX_S = 1.0
_LAT_BUCKETS = 40

DEMAND, FAULT_AROUND, PREFETCH, REPLAY = "demand", "fault_around", "prefetch", "replay"


class Region:
    """Runtime state of one region; ``state`` is its slice of the session's PageStates."""

    __slots__ = ("base", "end", "index", "npages", "offset", "page_size", "shift", "spec", "start", "state")

    def __init__(self, spec: RegionSpec, index: int, state: memoryview, base: int) -> None:
        self.spec = spec
        self.index = index
        self.start = spec.start
        self.end = spec.end
        self.offset = spec.offset
        self.page_size = spec.page_size
        self.shift = spec.page_size.bit_length() - 1
        self.npages = spec.pages
        self.state = state
        self.base = base
        """Index of this region's first page in the session's PageStates."""

    def addr(self, idx: int) -> int:
        return self.start + (idx << self.shift)

    def file_offset(self, idx: int) -> int:
        return self.offset + (idx << self.shift)


@dataclass
class SessionStats:
    """Counters a session keeps; read by logs, metrics and the demo. Cheap to update."""

    pages_total: int = 0
    pages_filled: int = 0
    pages_demand: int = 0
    pages_fault_around: int = 0
    pages_prefetch: int = 0
    pages_replay: int = 0
    blocked_ns: int = 0
    complete_s: float = 0.0
    """Seconds from session start until every page was in place (0: not complete)."""
    """Sum over demand faults of read -> installed: the vCPU time uffdd is responsible for."""
    fault_msgs: int = 0
    minor_faults: int = 0
    fills_inline: int = 0
    fills_async: int = 0
    coalesced: int = 0
    stolen: int = 0
    """Demand faults that took a page over from slow background work (fetched urgently)."""
    already_mapped: int = 0
    retries: int = 0
    source_errors: int = 0
    kernel_errors: int = 0
    bytes_filled: int = 0
    started: float = field(default_factory=time.monotonic)
    latency_log2_us: list[int] = field(default_factory=lambda: [0] * _LAT_BUCKETS)
    """Histogram of fault service time (message read -> CONTINUE), bucket i < 2**i us."""

    def latency_quantile(self, q: float) -> float:
        """Upper bound (us) of the bucket holding quantile ``q``; 0 when nothing was measured."""
        total = sum(self.latency_log2_us)
        if not total:
            return 0.0
        rank = q * total
        seen = 0
        for i, n in enumerate(self.latency_log2_us):
            seen += n
            if seen >= rank:
                return float(1 << i)
        return float(1 << (_LAT_BUCKETS - 1))

    def add(self, other: SessionStats) -> None:
        """Fold another session's counters into these (totals of ended sessions)."""
        self.complete_s = other.complete_s  # the latest session's, for benchmarks
        for name in _SUMMED:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for i, n in enumerate(other.latency_log2_us):
            self.latency_log2_us[i] += n

    def as_dict(self) -> dict[str, float | int]:
        return {
            "pages_total": self.pages_total,
            "pages_filled": self.pages_filled,
            "pages_demand": self.pages_demand,
            "pages_fault_around": self.pages_fault_around,
            "pages_prefetch": self.pages_prefetch,
            "pages_replay": self.pages_replay,
            "blocked_ms": round(self.blocked_ns / 1e6, 3),
            "complete_s": round(self.complete_s, 4),
            "fault_msgs": self.fault_msgs,
            "minor_faults": self.minor_faults,
            "fills_inline": self.fills_inline,
            "fills_async": self.fills_async,
            "coalesced": self.coalesced,
            "stolen": self.stolen,
            "already_mapped": self.already_mapped,
            "retries": self.retries,
            "source_errors": self.source_errors,
            "kernel_errors": self.kernel_errors,
            "bytes_filled": self.bytes_filled,
            "p50_us_le": self.latency_quantile(0.5),
            "p99_us_le": self.latency_quantile(0.99),
            "seconds": round(time.monotonic() - self.started, 3),
        }


_SUMMED = ("pages_total", "pages_filled", "pages_demand", "pages_fault_around", "pages_prefetch", "pages_replay",
           "blocked_ns", "fault_msgs", "minor_faults", "fills_inline", "fills_async",
           "coalesced", "stolen", "already_mapped", "retries", "source_errors", "kernel_errors", "bytes_filled")

WANTED_FEATURES = abi.FEATURE_MINOR_SHMEM | abi.FEATURE_MINOR_HUGETLBFS | abi.FEATURE_THREAD_ID
REGISTER_MODE = abi.REGISTER_MODE_MISSING | abi.REGISTER_MODE_MINOR


def prepare_uffd(uffd: Userfaultfd, hs: Handshake, *, hugetlb: bool) -> bool:
    """Make ``uffd`` ready for ``hs``: API (unless the VMM did it) and MISSING|MINOR registration.

    Returns True if the VMM had already done UFFDIO_API. Registration is repeated either way:
    it is idempotent for the same uffd, and it guarantees MISSING is registered too (MINOR alone
    lets never-written pages read as zeros).
    """
    minor = abi.FEATURE_MINOR_HUGETLBFS if hugetlb else abi.FEATURE_MINOR_SHMEM
    feats = uffd.fdinfo_features()
    preinit = feats is not None
    if feats is None:
        feats = uffd.api(WANTED_FEATURES & supported_features()).features
    if not feats & minor:
        raise HandshakeError(
            f"the userfaultfd was initialized without {abi.FEATURE_NAMES[minor]}: do UFFDIO_API with "
            "that feature, or pass a bare userfaultfd and let uffdd do it")
    for i, r in enumerate(hs.regions):
        try:
            ioctls = uffd.register(r.start, r.size, REGISTER_MODE)
        except KernelError as exc:
            raise HandshakeError(
                f"regions[{i}]: cannot register {r.start:#x}+{r.size:#x} as MISSING|MINOR: {exc} "
                "(the region must be a shared mapping of the memory file in the VMM)") from None
        if not ioctls & (1 << abi.IOCTL_BIT_CONTINUE):
            raise HandshakeError(f"regions[{i}]: the kernel does not allow UFFDIO_CONTINUE on it")
    return preinit


class Session:
    """Serves one guest until :meth:`close`. Owns the uffd, the memfd, its mapping and source."""

    def __init__(
        self,
        *,
        session_id: str,
        handshake: Handshake,
        uffd: Userfaultfd,
        memfd: int,
        source: PageSource,
        config: SessionConfig | None = None,
        preinitialized: bool = False,
        states: PageStates | None = None,
        resumed: bool = False,
    ) -> None:
        self.id = session_id
        self.handshake = handshake
        self.vm_id = handshake.vm_id
        self.config = config if config is not None else SessionConfig()
        self._uffd = uffd
        self.memfd = memfd
        self.source = source
        self.preinitialized = preinitialized
        self.resumed = resumed
        self._mapping: SecondMapping | None = SecondMapping(memfd)
        total = sum(r.pages for r in handshake.regions)
        self.states = states if states is not None else PageStates(total)
        self.regions: list[Region] = []
        base = 0
        for i, spec in enumerate(handshake.regions):
            self.regions.append(Region(spec, i, self.states.view[base : base + spec.pages], base))
            base += spec.pages
        self._by_addr = sorted(self.regions, key=lambda r: r.start)
        self._starts = [r.start for r in self._by_addr]
        self._last = self._by_addr[0]
        self.page_size = handshake.page_size
        self._rbuf = bytearray(abi.MSG_SIZE * MAX_BATCH)
        self._rview = memoryview(self._rbuf)
        fa = self.config.fault_around // self.page_size
        self._fa_pages = 1 << (fa.bit_length() - 1) if fa > 1 else 1
        self.stats = SessionStats(pages_total=total)
        self.cursor: tuple[Region, int] = (self.regions[0], 0)
        """Where the latest demand fault was: background pre-paging starts near it."""
        self._record: list[int] | None = [] if self.config.record else None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._retry_handles: set[asyncio.TimerHandle] = set()
        self._retrying: set[tuple[int, int]] = set()
        self._closed = False
        self._completing = False
        self.completed = False
        self.failure: BaseException | None = None
        self.done: asyncio.Event = asyncio.Event()
        self._log = log.bind(session=session_id, vm_id=self.vm_id)
        self.on_complete: Callable[[Session], None] | None = None
        self._prefetcher: Prefetcher | None = None

    # --- construction --------------------------------------------------------------------
    @classmethod
    def create(
        cls, *, session_id: str, handshake: Handshake, uffd_fd: int, memfd: int | None, source: PageSource,
        config: SessionConfig | None = None,
    ) -> Session:
        """Validate the handshake against the fds and the source, set up the uffd, and build.

        Takes ownership of the fds only on success; on failure the caller still owns them.
        """
        if memfd is None:
            raise HandshakeError("anonymous memory ([uffd] alone) is not supported yet: send [uffd, memfd]")
        page_size = file_page_size(memfd)
        check_against(handshake, memfd_size=file_size(memfd), memfd_page_size=page_size, source_size=source.size)
        uffd = Userfaultfd(uffd_fd)
        preinit = prepare_uffd(uffd, handshake, hugetlb=page_size > 4096)
        return cls(session_id=session_id, handshake=handshake, uffd=uffd, memfd=memfd, source=source,
                   config=config, preinitialized=preinit)

    # --- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        """Begin serving faults on the running loop; faults queued before now are served too."""
        loop = self._loop = asyncio.get_running_loop()
        if self.resumed:
            self.states.recover()
            self.stats.pages_filled = self.states.count(FILLED)
        loop.add_reader(self._uffd.fileno(), self._on_readable)
        self._log.info(
            "session_start", regions=len(self.regions), pages=self.stats.pages_total,
            page_size=self.page_size, bytes=self.handshake.total_bytes, source=self.source.describe(),
            preregistered=self.preinitialized, resumed=self.resumed, pages_filled=self.stats.pages_filled,
            fault_around=self._fa_pages, prefetch=self.config.prefetch.enabled)
        if self.resumed:
            self._resume()
        # Faults may have queued between registration and add_reader.
        loop.call_soon(self._on_readable)
        self._prefetcher = Prefetcher(self, self.config)
        self._spawn(self._prefetcher.run())
        if self.stats.pages_filled == self.stats.pages_total:
            self._schedule_complete()

    def _resume(self) -> None:
        """Take over from a daemon that died: finish its CONTINUEs, then make every waiting vCPU
        fault again, since the fault messages the old daemon had read are gone."""
        for r in self.regions:
            i = 0
            while (i := self.states.find(INSTALLING, r.base + i, r.base + r.npages) - r.base) >= 0:
                self._install_run(r, i, 1, -1, 0, PREFETCH)
                i += 1
        for r in self.regions:
            try:
                self._uffd.wake(r.start, r.end - r.start)
            except KernelError as exc:
                self._log.warning("resume_wake_failed", region=r.index, error=str(exc))

    def _spawn(self, coro: Coroutine[object, object, None]) -> None:
        assert self._loop is not None
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self, reason: str = "vmm disconnected") -> None:
        """Stop serving and release everything the session holds, at once."""
        if self._closed:
            return
        self._closed = True
        await self._stop_work()
        await self._save_record()
        await self._release()
        s = self.stats
        level = self._log.error if self.failure else self._log.info
        level("session_end", reason=reason, **s.as_dict(), pages_unfilled=s.pages_total - s.pages_filled,
              completed=self.completed, error=str(self.failure) if self.failure else None)
        self.states.close()
        os.close(self.memfd)
        self.done.set()

    async def _stop_work(self) -> None:
        loop = self._loop
        if loop is not None and not self._uffd.closed:
            loop.remove_reader(self._uffd.fileno())
        for h in self._retry_handles:
            h.cancel()
        self._retry_handles.clear()
        current = asyncio.current_task()
        tasks = [t for t in self._tasks if t is not current]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _release(self) -> None:
        """Give back the source, the second mapping and our copy of the userfaultfd."""
        await self.source.aclose()
        if self._prefetcher is not None:
            self._prefetcher.close()
        if self._mapping is not None:
            try:
                self._mapping.close()
            except BufferError:  # a view still held somewhere: the GC unmaps it with its owner
                self._log.warning("second_mapping_busy_at_close")
            self._mapping = None
        self._uffd.close()
        for r in self.regions:
            r.state.release()

    @property
    def closed(self) -> bool:
        return self._closed

    def _fail(self, exc: BaseException) -> None:
        """The guest is gone or the uffd is unusable: record it and end the session."""
        if self.failure is None:
            self.failure = exc
        if self._loop is not None and not self._closed:
            self._loop.create_task(self.close(reason=type(exc).__name__))

    # --- completion ----------------------------------------------------------------------
    def _schedule_complete(self) -> None:
        if self._completing or self._closed or self._loop is None:
            return
        self._completing = True
        self._loop.create_task(self._complete())

    async def _complete(self) -> None:
        """Every page is in place: unregister, report once, release the source."""
        self.stats.complete_s = time.monotonic() - self.stats.started
        await self._stop_work()
        for r in self.regions:
            try:
                self._uffd.unregister(r.start, r.end - r.start)
            except KernelError as exc:
                self._log.warning("unregister_failed", region=r.index, error=str(exc))
        self.completed = True
        await self._save_record()
        await self._release()
        self._log.info("session_complete", **self.stats.as_dict())
        if self.on_complete is not None:
            self.on_complete(self)

    async def _save_record(self) -> None:
        rec, self._record = self._record, None
        path = self.source.record_path()
        if not rec or path is None or self.source.size is None:
            return
        try:
            await workingset.save(path, rec, source_size=self.source.size, page_size=self.page_size)
            self._log.info("working_set_recorded", path=path, pages=len(rec))
        except OSError as exc:
            self._log.warning("working_set_not_recorded", path=path, error=str(exc))

    def skip_recording(self) -> None:
        """A recorded working set was replayed: keep that record rather than this run's."""
        self._record = None

    # --- the fault loop ------------------------------------------------------------------
    def _on_readable(self) -> None:
        """Drain the userfaultfd and resolve what can be resolved without waiting.

        A read shorter than the buffer means the queue was empty at that moment; the reader
        is level-triggered, so anything queued later calls us again. That saves the extra
        read that would only return EAGAIN.
        """
        if self._closed or self._uffd.closed:
            return
        buf, view, size = self._rbuf, self._rview, len(self._rbuf)
        unpack = abi.MSG_STRUCT.iter_unpack
        on_fault = self._on_fault
        try:
            while True:
                n = self._uffd.read_into(buf)
                if not n:
                    return
                t0 = time.perf_counter_ns()
                for event, a0, a1, a2 in unpack(view[:n]):
                    if event == abi.EVENT_PAGEFAULT:
                        on_fault(a0, a1, t0)
                    else:
                        self._on_event(UffdMsg(event, a0, a1, a2))
                if n < size or self._closed:
                    return
        except GuestGone as exc:
            self._fail(exc)
        except KernelError as exc:
            self._log.error("uffd_read_failed", error=str(exc))
            self._fail(exc)

    def _find(self, addr: int) -> Region | None:
        r = self._last
        if r.start <= addr < r.end:
            return r
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0:
            r = self._by_addr[i]
            if addr < r.end:
                self._last = r
                return r
        return None

    def _on_fault(self, flags: int, addr: int, t0: int) -> None:
        stats = self.stats
        stats.fault_msgs += 1
        if flags & abi.PAGEFAULT_FLAG_MINOR:
            stats.minor_faults += 1
        region = self._find(addr)
        if region is None:
            self._log.error("fault_outside_regions", address=hex(addr))
            return
        idx = (addr - region.start) >> region.shift
        st = region.state
        state = st[idx]
        if state != EMPTY:
            if state == FILLED:
                # A stale duplicate of a fault already resolved, or a PTE the kernel dropped:
                # the page cache holds the right bytes, so map it again (EEXIST -> wake).
                stats.already_mapped += 1
                self._remap(region, idx)
            elif state == INSTALLING and (region.index, idx) not in self._retrying:
                self._install_run(region, idx, 1, idx, t0, DEMAND)  # left by a dead predecessor
            elif state == FILLING and self._prefetcher is not None and self._prefetcher.steal(region, idx):
                stats.stolen += 1  # slow background fetch in flight: fetch this page urgently
                self._fill_demand(region, idx, idx, idx + 1, t0)
            else:
                stats.coalesced += 1  # the fill in flight will CONTINUE, which wakes this vCPU too
            return
        self.cursor = (region, idx)
        if self._record is not None:
            self._record.append((region.offset >> region.shift) + idx)
        lo, hi = idx, idx + 1
        fa = self._fa_pages
        if fa > 1:
            b0 = idx & ~(fa - 1)
            b1 = min(b0 + fa, region.npages)
            while lo > b0 and st[lo - 1] == EMPTY:
                lo -= 1
            while hi < b1 and st[hi] == EMPTY:
                hi += 1
        self._fill_demand(region, idx, lo, hi, t0)

    def _fill_demand(self, region: Region, idx: int, lo: int, hi: int, t0: int) -> None:
        """Fill pages [lo, hi) for the demand fault on ``idx``: inline if the source can, else a task."""
        stats = self.stats
        st = region.state
        n = hi - lo
        if n == 1:
            st[lo] = FILLING
        else:
            st[lo:hi] = bytes((FILLING,)) * n
        assert self._mapping is not None
        foff = region.offset + (lo << region.shift)
        dest = self._mapping.view(foff, n << region.shift)
        if self.source.fill_nowait(foff, dest):
            dest.release()
            stats.fills_inline += 1
            self._install_run(region, lo, n, idx, t0, DEMAND)
            return
        stats.fills_async += 1
        self._spawn(self._fill_async(region, lo, n, idx, dest, t0))

    async def _fill_async(self, region: Region, lo: int, n: int, demand_idx: int, dest: memoryview, t0: int) -> None:
        """Fill pages from the source, retrying with backoff; never install a partial page."""
        foff = region.file_offset(lo)
        delay = RETRY_MIN_S
        attempt = 0
        try:
            while True:
                try:
                    await self.source.fill(foff, dest)
                    break
                except (SourceError, OSError, ValueError) as exc:
                    self.stats.source_errors += 1
                    attempt += 1
                    if attempt == 1 or attempt % 10 == 0:  # loud, but not one line per retry
                        self._log.warning("source_fill_failed", offset=foff, pages=n, attempt=attempt,
                                          error=str(exc) if isinstance(exc, SourceError) else repr(exc),
                                          retry_in=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
        finally:
            dest.release()
        self._install_run(region, lo, n, demand_idx, t0, DEMAND)

    def _remap(self, region: Region, idx: int) -> None:
        """CONTINUE a page that is already FILLED; EEXIST (still mapped) only needs a wake."""
        addr = region.addr(idx)
        try:
            self._uffd.continue_(addr, region.page_size)
        except PageExists:
            try:
                self._uffd.wake(addr, region.page_size)
            except KernelError as exc:
                self._log.warning("wake_failed", address=hex(addr), error=str(exc))
        except MappingChanging:
            self.stats.retries += 1
            self._retry_later(region, idx, 1, -1, 0, DEMAND, RETRY_MIN_S, remap=True)
        except GuestGone as exc:
            self._fail(exc)
        except KernelError as exc:
            self.stats.kernel_errors += 1
            self._log.error("continue_failed", address=hex(addr), error=str(exc))

    def install_run(self, region: Region, lo: int, n: int, path: str) -> None:
        """Map pages [lo, lo+n) whose bytes are complete in the page cache (used by prefetch)."""
        self._install_run(region, lo, n, -1, 0, path)

    def _install_run(self, region: Region, lo: int, n: int, demand_idx: int, t0: int, path: str,
                     delay: float = RETRY_MIN_S) -> None:
        """UFFDIO_CONTINUE pages [lo, lo+n) whose bytes are complete; mark them filled only as
        the kernel accepts them. Pages some other way already mapped are skipped (EEXIST)."""
        if self._closed or self._uffd.closed:
            return
        st = region.state
        shift = region.shift
        end = lo + n
        st[lo:end] = bytes((INSTALLING,)) * n
        pos = lo
        while pos < end:
            addr = region.start + (pos << shift)
            try:
                self._uffd.continue_(addr, (end - pos) << shift)
                done = end - pos
            except PageExists:
                with contextlib.suppress(KernelError):
                    self._uffd.wake(addr, region.page_size)
                self.stats.already_mapped += 1
                done = 1
            except MappingChanging as exc:
                done = exc.done >> shift
                if done == 0:  # an event is unread or the range changes: read the queue, retry later
                    self.stats.retries += 1
                    self._retry_later(region, pos, end - pos, demand_idx, t0, path, delay)
                    return
            except GuestGone as exc:
                self._fail(exc)
                return
            except KernelError as exc:
                self.stats.kernel_errors += 1
                self._log.error("continue_failed", address=hex(addr), pages=end - pos, error=str(exc),
                                retry_in=delay)
                self._retry_later(region, pos, end - pos, demand_idx, t0, path, delay)
                return
            self._mark_filled(region, pos, done, demand_idx, path)
            pos += done
        if demand_idx >= 0 and t0:
            ns = time.perf_counter_ns() - t0
            self.stats.blocked_ns += ns
            self.stats.latency_log2_us[min((ns // 1000).bit_length(), _LAT_BUCKETS - 1)] += 1

    def _mark_filled(self, region: Region, pos: int, n: int, demand_idx: int, path: str) -> None:
        st = region.state
        if n == 1:
            st[pos] = FILLED
        else:
            st[pos : pos + n] = bytes((FILLED,)) * n
        stats = self.stats
        stats.pages_filled += n
        stats.bytes_filled += n << region.shift
        if path == DEMAND:
            hit = 1 if pos <= demand_idx < pos + n else 0
            stats.pages_demand += hit
            stats.pages_fault_around += n - hit
        elif path == PREFETCH:
            stats.pages_prefetch += n
        else:
            stats.pages_replay += n
        if stats.pages_filled >= stats.pages_total:
            self._schedule_complete()

    def _retry_later(self, region: Region, lo: int, n: int, demand_idx: int, t0: int, path: str,
                     delay: float, remap: bool = False) -> None:
        assert self._loop is not None
        key = (region.index, lo)
        self._retrying.add(key)

        def retry() -> None:
            self._retry_handles.discard(handle)
            self._retrying.discard(key)
            self._on_readable()  # apply pending events first
            if self._closed:
                return
            if remap:
                self._remap(region, lo)
            else:
                self._install_run(region, lo, n, demand_idx, t0, path, min(delay * 2, RETRY_MAX_S))

        handle = self._loop.call_later(delay, retry)
        self._retry_handles.add(handle)

    def _on_event(self, msg: UffdMsg) -> None:
        """Non-page-fault events are not requested by the core daemon; log what arrives."""
        self._log.warning("unexpected_uffd_event", uffd_event=hex(msg.event))

    # --- for the prefetcher ----------------------------------------------------------------
    def second_mapping(self) -> SecondMapping:
        assert self._mapping is not None, "session released"
        return self._mapping

    @property
    def hugetlb(self) -> bool:
        return self.page_size > 4096

    # --- queries -------------------------------------------------------------------------
    @property
    def pages_remaining(self) -> int:
        return self.stats.pages_total - self.stats.pages_filled

    def summary(self) -> dict[str, object]:
        return {"session": self.id, "vm_id": self.vm_id, "source": self.source.describe(),
                "completed": self.completed, **self.stats.as_dict()}


from uffdd.prefetch import Prefetcher  # noqa: E402  (prefetch imports Session's types)

__all__ = ["DEMAND", "EMPTY", "FAULT_AROUND", "FILLED", "FILLING", "INSTALLING", "PREFETCH", "REPLAY", "Region",
           "Session", "SessionError", "SessionStats", "prepare_uffd"]
