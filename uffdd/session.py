"""One VMM's guest: its regions, the state of every page, and the fault loop.

The fault loop runs on the event loop as a reader callback. Each readable event drains the
userfaultfd (up to 64 messages per read) and resolves faults *inline* when the source can fill
without blocking (a page-cache hit); only a page that needs real waiting becomes a task. Every
page goes through the same steps: write it through the daemon's second mapping, then
UFFDIO_CONTINUE. A page is marked filled only once CONTINUE returned (or said EEXIST).
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

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
from uffdd.sources import PageSource

log = structlog.get_logger("uffdd.session")

EMPTY, FILLING, FILLED = 0, 1, 2
RETRY_MIN_S = 0.005
RETRY_MAX_S = 1.0
_LAT_BUCKETS = 40


class Region:
    """Runtime state of one region: a byte per page (EMPTY / FILLING / FILLED)."""

    __slots__ = ("end", "offset", "page_size", "shift", "spec", "start", "state")

    def __init__(self, spec: RegionSpec) -> None:
        self.spec = spec
        self.start = spec.start
        self.end = spec.end
        self.offset = spec.offset
        self.page_size = spec.page_size
        self.shift = spec.page_size.bit_length() - 1
        self.state = bytearray(spec.pages)


@dataclass
class SessionStats:
    """Counters a session keeps; read by logs, metrics and the demo. Cheap to update."""

    pages_total: int = 0
    pages_filled: int = 0
    fault_msgs: int = 0
    minor_faults: int = 0
    fills_inline: int = 0
    fills_async: int = 0
    coalesced: int = 0
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
        for name in _SUMMED:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for i, n in enumerate(other.latency_log2_us):
            self.latency_log2_us[i] += n

    def as_dict(self) -> dict[str, float | int]:
        return {
            "pages_total": self.pages_total,
            "pages_filled": self.pages_filled,
            "fault_msgs": self.fault_msgs,
            "minor_faults": self.minor_faults,
            "fills_inline": self.fills_inline,
            "fills_async": self.fills_async,
            "coalesced": self.coalesced,
            "already_mapped": self.already_mapped,
            "retries": self.retries,
            "source_errors": self.source_errors,
            "kernel_errors": self.kernel_errors,
            "bytes_filled": self.bytes_filled,
            "p50_us_le": self.latency_quantile(0.5),
            "p99_us_le": self.latency_quantile(0.99),
            "seconds": round(time.monotonic() - self.started, 3),
        }


_SUMMED = ("pages_total", "pages_filled", "fault_msgs", "minor_faults", "fills_inline", "fills_async",
           "coalesced", "already_mapped", "retries", "source_errors", "kernel_errors", "bytes_filled")

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
        preinitialized: bool = False,
    ) -> None:
        self.id = session_id
        self.handshake = handshake
        self.vm_id = handshake.vm_id
        self._uffd = uffd
        self._memfd = memfd
        self.source = source
        self.preinitialized = preinitialized
        self._mapping = SecondMapping(memfd)
        self.regions = sorted((Region(s) for s in handshake.regions), key=lambda r: r.start)
        self._starts = [r.start for r in self.regions]
        self._last = self.regions[0]
        self._rbuf = bytearray(abi.MSG_SIZE * MAX_BATCH)
        self._rview = memoryview(self._rbuf)
        self.stats = SessionStats(pages_total=sum(len(r.state) for r in self.regions))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._retry_handles: set[asyncio.TimerHandle] = set()
        self._closed = False
        self.failure: BaseException | None = None
        self.done: asyncio.Event = asyncio.Event()
        self._log = log.bind(session=session_id, vm_id=self.vm_id)
        self.on_progress: Callable[[Session], None] | None = None

    # --- construction --------------------------------------------------------------------
    @classmethod
    def create(
        cls, *, session_id: str, handshake: Handshake, uffd_fd: int, memfd: int, source: PageSource
    ) -> Session:
        """Validate the handshake against the fds and the source, set up the uffd, and build.

        Takes ownership of both fds only on success; on failure the caller still owns them.
        """
        page_size = file_page_size(memfd)
        check_against(handshake, memfd_size=file_size(memfd), memfd_page_size=page_size, source_size=source.size)
        uffd = Userfaultfd(uffd_fd)
        preinit = prepare_uffd(uffd, handshake, hugetlb=page_size > 4096)
        return cls(session_id=session_id, handshake=handshake, uffd=uffd, memfd=memfd, source=source,
                   preinitialized=preinit)

    # --- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        """Begin serving faults on the running loop; faults queued before now are served too."""
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._uffd.fileno(), self._on_readable)
        self._log.info(
            "session_start", regions=len(self.regions), pages=self.stats.pages_total,
            page_size=self.handshake.page_size, bytes=self.handshake.total_bytes,
            source=self.source.describe(), preregistered=self.preinitialized)
        # Faults may have queued between registration and add_reader.
        self._loop.call_soon(self._on_readable)

    async def close(self, reason: str = "vmm disconnected") -> None:
        """Stop serving and release everything the session holds, at once."""
        if self._closed:
            return
        self._closed = True
        loop = self._loop
        if loop is not None and not self._uffd.closed:
            loop.remove_reader(self._uffd.fileno())
        for h in self._retry_handles:
            h.cancel()
        self._retry_handles.clear()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        await self.source.aclose()
        try:
            self._mapping.close()
        except BufferError:  # a view still held somewhere: the GC unmaps it with its owner
            self._log.warning("second_mapping_busy_at_close")
        self._uffd.close()
        import os

        os.close(self._memfd)
        s = self.stats
        level = self._log.error if self.failure else self._log.info
        level("session_end", reason=reason, **s.as_dict(),
              pages_unfilled=s.pages_total - s.pages_filled,
              error=str(self.failure) if self.failure else None)
        self.done.set()

    @property
    def closed(self) -> bool:
        return self._closed

    def _fail(self, exc: BaseException) -> None:
        """The guest is gone or the uffd is unusable: record it and end the session."""
        if self.failure is None:
            self.failure = exc
        if self._loop is not None and not self._closed:
            self._loop.create_task(self.close(reason=type(exc).__name__))

    # --- the fault loop ------------------------------------------------------------------
    def _on_readable(self) -> None:
        """Drain the userfaultfd and resolve what can be resolved without waiting.

        A read shorter than the buffer means the queue was empty at that moment; the reader
        is level-triggered, so anything queued later calls us again. That saves the extra
        read that would only return EAGAIN.
        """
        if self._closed:
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
            r = self.regions[i]
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
        state = region.state[idx]
        if state == FILLED:
            # A stale duplicate of a fault we already resolved, or a PTE the kernel dropped:
            # the page cache holds the right bytes, so map it again (EEXIST -> wake).
            stats.already_mapped += 1
            self._install(region, idx, t0)
            return
        if state == FILLING:
            stats.coalesced += 1  # the fill in flight will CONTINUE, which wakes this thread too
            return
        ps = region.page_size
        foff = region.offset + (idx << region.shift)
        dest = self._mapping.view(foff, ps)
        if self.source.fill_nowait(foff, dest):
            dest.release()
            stats.fills_inline += 1
            self._install(region, idx, t0)
            return
        region.state[idx] = FILLING
        stats.fills_async += 1
        assert self._loop is not None
        task = self._loop.create_task(self._fill_async(region, idx, foff, dest, t0))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _fill_async(self, region: Region, idx: int, foff: int, dest: memoryview, t0: int) -> None:
        """Fill one page from the source, retrying with backoff; never install a partial page."""
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
                        self._log.warning("source_fill_failed", offset=foff, attempt=attempt,
                                          error=str(exc) if isinstance(exc, SourceError) else repr(exc),
                                          retry_in=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
        finally:
            dest.release()
        self._install(region, idx, t0)

    def _install(self, region: Region, idx: int, t0: int, delay: float = RETRY_MIN_S) -> None:
        """UFFDIO_CONTINUE the page; mark it filled only once the kernel accepted it."""
        if self._closed:
            return
        ps = region.page_size
        addr = region.start + (idx << region.shift)
        stats = self.stats
        try:
            self._uffd.continue_(addr, ps)
        except PageExists:
            try:
                self._uffd.wake(addr, ps)
            except KernelError as exc:
                self._log.warning("wake_failed", address=hex(addr), error=str(exc))
        except MappingChanging:
            # An event is unread or the range changes: read the queue, then retry later.
            region.state[idx] = FILLING
            stats.retries += 1
            self._retry_later(region, idx, t0, delay)
            return
        except GuestGone as exc:
            self._fail(exc)
            return
        except KernelError as exc:
            region.state[idx] = FILLING
            stats.kernel_errors += 1
            self._log.error("continue_failed", address=hex(addr), error=str(exc), retry_in=delay)
            self._retry_later(region, idx, t0, delay)
            return
        if region.state[idx] != FILLED:
            region.state[idx] = FILLED
            stats.pages_filled += 1
            stats.bytes_filled += ps
            if self.on_progress is not None:
                self.on_progress(self)
        us = (time.perf_counter_ns() - t0) // 1000
        stats.latency_log2_us[min(us.bit_length(), _LAT_BUCKETS - 1)] += 1

    def _retry_later(self, region: Region, idx: int, t0: int, delay: float) -> None:
        assert self._loop is not None

        def retry() -> None:
            self._retry_handles.discard(handle)
            self._on_readable()
            if not self._closed and region.state[idx] != FILLED:
                self._install(region, idx, t0, min(delay * 2, RETRY_MAX_S))

        handle = self._loop.call_later(delay, retry)
        self._retry_handles.add(handle)

    def _on_event(self, msg: UffdMsg) -> None:
        """Non-page-fault events are not requested by the core daemon; log what arrives."""
        self._log.warning("unexpected_uffd_event", uffd_event=hex(msg.event))

    # --- queries -------------------------------------------------------------------------
    @property
    def pages_remaining(self) -> int:
        return self.stats.pages_total - self.stats.pages_filled

    def summary(self) -> dict[str, object]:
        return {"session": self.id, "vm_id": self.vm_id, "source": self.source.describe(),
                **self.stats.as_dict()}


__all__ = ["EMPTY", "FILLED", "FILLING", "Region", "Session", "SessionError", "SessionStats", "prepare_uffd"]
