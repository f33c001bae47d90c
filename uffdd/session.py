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
import ctypes
import errno
import itertools
import mmap
import os
import time
from array import array
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field

import structlog

from uffdd import workingset
from uffdd.config import SessionConfig
from uffdd.errors import HandshakeError, PagePoisoned, SessionError, SourceError
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
from uffdd.kernel.errors import classify
from uffdd.kernel.uffd import supported_features
from uffdd.pagestate import EMPTY, FILLED, FILLING, INSTALLING, REMOVED, UNMAPPED, PageStates
from uffdd.sources import PageSource

try:
    from uffdd.kernel._fastpath import FastPath
except ImportError:  # built without a C compiler: Session._on_fault does the same in Python
    FastPath = None  # type: ignore[assignment,misc]

log = structlog.get_logger("uffdd.session")

RETRY_MIN_S = 0.005
RETRY_MAX_S = 1.0
_LAT_BUCKETS = 40

DEMAND, FAULT_AROUND, PREFETCH, REPLAY = "demand", "fault_around", "prefetch", "replay"


class Region:
    """Runtime state of one region; ``state`` is its slice of the session's PageStates."""

    __slots__ = ("base", "end", "index", "npages", "offset", "page_size", "retired", "shift", "spec", "start",
                 "state")

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
        self.retired = False
        """Split by a partial mremap; in-flight work is relocated by page index."""

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
    """Sum over demand faults of read -> installed: the vCPU time uffdd is responsible for."""
    blocked_ns_by_tid: dict[int, int] = field(default_factory=dict)
    """The same, per faulting thread (UFFD_FEATURE_THREAD_ID): which vCPUs waited, and how long."""
    pages_removed: int = 0
    """Pages the guest discarded (balloon, MADV_DONTNEED/REMOVE) before or after their fill."""
    pages_zeroed: int = 0
    """Faults on discarded pages answered with zeros, never with the source's bytes."""
    pages_poisoned: int = 0
    events: int = 0
    complete_s: float = 0.0
    """Seconds from session start until every page was in place (0: not complete)."""
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
    latency_log2_us: array[int] = field(default_factory=lambda: array("Q", bytes(8 * _LAT_BUCKETS)))
    """Histogram of fault service time (message read -> installed): bucket i holds times below
    2**i * 1.024 us (shifts, not divisions, on the fault path)."""

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
        for tid, ns in other.blocked_ns_by_tid.items():
            self.blocked_ns_by_tid[tid] = self.blocked_ns_by_tid.get(tid, 0) + ns
        for name in _SUMMED:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for i, n in enumerate(other.latency_log2_us):
            self.latency_log2_us[i] += n

    def as_dict(self) -> dict[str, float | int]:
        """The counters, plus what is derived from them, for log lines and reports."""
        out: dict[str, float | int] = {name: getattr(self, name) for name in _SUMMED if name != "blocked_ns"}
        out.update({
            "blocked_ms": round(self.blocked_ns / 1e6, 3),
            "vcpus_blocked": len(self.blocked_ns_by_tid),
            "max_vcpu_blocked_ms": round(max(self.blocked_ns_by_tid.values(), default=0) / 1e6, 3),
            "complete_s": round(self.complete_s, 4),
            "p50_us_le": self.latency_quantile(0.5),
            "p99_us_le": self.latency_quantile(0.99),
            "seconds": round(time.monotonic() - self.started, 3),
        })
        return out


_SUMMED = ("pages_total", "pages_filled", "pages_demand", "pages_fault_around", "pages_prefetch", "pages_replay",
           "blocked_ns", "fault_msgs", "minor_faults", "fills_inline", "fills_async",
           "pages_removed", "pages_zeroed", "pages_poisoned", "events", "coalesced", "stolen", "already_mapped",
           "retries", "source_errors", "kernel_errors", "bytes_filled")

EVENTS = abi.FEATURE_EVENT_REMOVE | abi.FEATURE_EVENT_UNMAP | abi.FEATURE_EVENT_REMAP
WANTED_FEATURES = abi.FEATURE_MINOR_SHMEM | abi.FEATURE_MINOR_HUGETLBFS | abi.FEATURE_THREAD_ID | EVENTS
REGISTER_MODE = abi.REGISTER_MODE_MISSING | abi.REGISTER_MODE_MINOR


def prepare_uffd(uffd: Userfaultfd, hs: Handshake, *, hugetlb: bool, anonymous: bool = False) -> tuple[bool, int]:
    """Make ``uffd`` ready for ``hs``: API (unless the VMM did it) and registration.

    Shared memory is registered MISSING|MINOR (MINOR alone lets never-written pages read as
    zeros), anonymous memory MISSING. Registration is repeated even if the VMM did it: it is
    idempotent for the same uffd. Returns (whether the VMM had done UFFDIO_API, the features on).
    """
    feats = uffd.fdinfo_features()
    preinit = feats is not None
    if feats is None:
        uffd.api(WANTED_FEATURES & supported_features())
        feats = uffd.fdinfo_features() or 0
    minor = abi.FEATURE_MINOR_HUGETLBFS if hugetlb else abi.FEATURE_MINOR_SHMEM
    if not anonymous and not feats & minor:
        raise HandshakeError(
            f"the userfaultfd was initialized without {abi.FEATURE_NAMES[minor]}: do UFFDIO_API with "
            "that feature, or pass a bare userfaultfd and let uffdd do it")
    mode = abi.REGISTER_MODE_MISSING if anonymous else REGISTER_MODE
    need = abi.IOCTL_BIT_COPY if anonymous else abi.IOCTL_BIT_CONTINUE
    for i, r in enumerate(hs.regions):
        try:
            ioctls = uffd.register(r.start, r.size, mode)
        except KernelError as exc:
            what = ("private anonymous (or MAP_HUGETLB) memory" if anonymous
                    else "a shared mapping of the memory file")
            raise HandshakeError(
                f"regions[{i}]: cannot register {r.start:#x}+{r.size:#x} as "
                f"{'MISSING' if anonymous else 'MISSING|MINOR'}: {exc} (the region must be {what} in the VMM)"
            ) from None
        if not ioctls & (1 << need):
            raise HandshakeError(f"regions[{i}]: the kernel does not allow "
                                 f"{'UFFDIO_COPY' if anonymous else 'UFFDIO_CONTINUE'} on it")
    return preinit, feats


class _Bounce:
    """Page-aligned private memory holding bytes to UFFDIO_COPY into an anonymous guest."""

    __slots__ = ("addr", "mm", "view")

    def __init__(self, size: int) -> None:
        self.mm = mmap.mmap(-1, size)
        self.addr = ctypes.addressof(ctypes.c_char.from_buffer(self.mm))
        self.view = memoryview(self.mm)

    def close(self) -> None:
        self.view.release()
        self.mm.close()


_ZEROS = bytes(2 << 20)
_TO_REMOVED = bytes(UNMAPPED if s == UNMAPPED else REMOVED for s in range(256))
"""bytes.translate table: every page state becomes REMOVED, except UNMAPPED."""
_ZERO_VIEW = memoryview(_ZEROS)


class Session:
    """Serves one guest until :meth:`close`. Owns the uffd, the memfd, its mapping and source."""

    def __init__(
        self,
        *,
        session_id: str,
        handshake: Handshake,
        uffd: Userfaultfd,
        memfd: int | None,
        source: PageSource,
        config: SessionConfig | None = None,
        preinitialized: bool = False,
        features: int = 0,
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
        self.features = features
        self.resumed = resumed
        self.anonymous = memfd is None
        """Private anonymous guest memory: pages are installed with UFFDIO_COPY, not CONTINUE."""
        self._mapping: SecondMapping | None = SecondMapping(memfd) if memfd is not None else None
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
        self._bounce = _Bounce(self._fa_pages * self.page_size) if self.anonymous else None
        self._fast = self._mapping is not None and self._fa_pages == 1
        """Single-page shared-memory faults take the flat path in _on_fault."""
        self._mview = self._mapping.whole() if self._mapping is not None else memoryview(b"")
        self._fill_nowait = source.fill_nowait
        self._native: FastPath | None = None
        """The same single-page path in C (uffdd/kernel/_fastpath.c), when built and usable."""
        self._continue = uffd.continue_
        self._zeros: _Bounce | None = None
        self.stats = SessionStats(pages_total=total)
        self.cursor: tuple[Region, int] = (self.regions[0], 0)
        """Where the latest demand fault was: background pre-paging starts near it."""
        self._record: list[int] | None = [] if self.config.record else None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._retry_handles: set[asyncio.TimerHandle] = set()
        self._retrying: set[tuple[object, ...]] = set()
        self._closed = False
        self._completing = False
        self._unregister_retry = 0.0
        self.completed = False
        self.failure: BaseException | None = None
        self.done: asyncio.Event = asyncio.Event()
        self._log = log.bind(session=session_id, vm_id=self.vm_id)
        self.on_complete: Callable[[Session], None] | None = None
        self.on_regions_changed: Callable[[Session], None] | None = None
        """Called after an mremap moved or split regions (see :meth:`current_handshake`)."""
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
            check_against(handshake, memfd_size=None, memfd_page_size=None, source_size=source.size)
            hugetlb = handshake.page_size > 4096
        else:
            page_size = file_page_size(memfd)
            check_against(handshake, memfd_size=file_size(memfd), memfd_page_size=page_size,
                          source_size=source.size)
            hugetlb = page_size > 4096
        uffd = Userfaultfd(uffd_fd)
        preinit, feats = prepare_uffd(uffd, handshake, hugetlb=hugetlb, anonymous=memfd is None)
        return cls(session_id=session_id, handshake=handshake, uffd=uffd, memfd=memfd, source=source,
                   config=config, preinitialized=preinit, features=feats)

    # --- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        """Begin serving faults on the running loop; faults queued before now are served too."""
        loop = self._loop = asyncio.get_running_loop()
        if self.resumed:
            self.states.recover(anonymous=self.anonymous)
            self.stats.pages_filled = sum(self.states.count(v) for v in (FILLED, REMOVED, UNMAPPED))
        self._start_native()
        loop.add_reader(self._uffd.fileno(), self._on_readable)
        self._log.info(
            "session_start", regions=len(self.regions), pages=self.stats.pages_total,
            page_size=self.page_size, bytes=self.handshake.total_bytes, source=self.source.describe(),
            preregistered=self.preinitialized, resumed=self.resumed, pages_filled=self.stats.pages_filled,
            memory="anonymous" if self.anonymous else ("hugetlbfs" if self.hugetlb else "shmem"),
            events=abi.feature_names(self.features & EVENTS),
            fault_around=self._fa_pages, prefetch=self.config.prefetch.enabled, native=self._native is not None)
        if self.resumed:
            self._resume()
        # Faults may have queued between registration and add_reader.
        loop.call_soon(self._on_readable)
        self._prefetcher = Prefetcher(self, self.config)
        self._spawn(self._prefetcher.run())
        if self.stats.pages_filled == self.stats.pages_total:
            self._schedule_complete()

    def _start_native(self) -> None:
        """Use the C fast path where it does exactly what _on_fault's flat path would."""
        if not (self._fast and self.config.native and FastPath is not None and self._record is None):
            return
        inline = self.source.inline_read()
        if inline is None:
            return
        self._native = FastPath(self._uffd.fileno(), inline[0], inline[1], self._mview, self.states.view,
                                self.stats.latency_log2_us, self.stats.blocked_ns_by_tid)
        self._native_regions()

    def _native_regions(self) -> None:
        if self._native is not None:
            self._native.set_regions([(r.start, r.end, r.shift, r.base, r.offset) for r in self.regions])

    def _fold_native(self, native: FastPath) -> None:
        """Add what the C fast path did since the last call to the session's counters."""
        done, minor, nbytes, ns, pos, idx = native.take()
        if not done:
            return
        stats = self.stats
        stats.fault_msgs += done
        stats.minor_faults += minor
        stats.fills_inline += done
        stats.pages_filled += done
        stats.pages_demand += done
        stats.bytes_filled += nbytes
        stats.blocked_ns += ns
        self.cursor = (self.regions[pos], idx)
        if stats.pages_filled >= stats.pages_total:
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
        if self.memfd is not None:
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
        if self._native is not None:
            self._native.close()  # it holds the mapping, the page states and the source's fd
            self._native = None
        await self.source.aclose()
        if self._prefetcher is not None:
            self._prefetcher.close()
        self._mview.release()
        if self._mapping is not None:
            try:
                self._mapping.close()
            except BufferError:  # a view still held somewhere: the GC unmaps it with its owner
                self._log.warning("second_mapping_busy_at_close")
            self._mapping = None
        self._uffd.close()
        for b in (self._bounce, self._zeros):
            if b is not None:
                b.close()
        self._bounce = self._zeros = None
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
        """Every page is in place: unregister, report once, release the source.

        The reader stays on until the ranges are unregistered and the queue read once more:
        events queued before that (a balloon's REMOVE) block their VMM thread until read."""
        self.stats.complete_s = time.monotonic() - self.stats.started
        if self._prefetcher is not None:
            self._prefetcher.stop()
        failed = []
        for r in self.regions:
            try:
                self._uffd.unregister(r.start, r.end - r.start)
            except KernelError as exc:
                failed.append((r.index, str(exc)))
        if failed:
            # Keep serving: a guest with registered ranges and nobody reading would hang. (Most
            # often the VMM has just exited and its EOF is on the way.)
            if not self._unregister_retry:
                self._log.info("unregister_retry", regions=failed)
            self._unregister_retry = min(max(self._unregister_retry * 2, 0.05), 1.0)
            self._completing = False
            self._on_readable()
            assert self._loop is not None
            self._loop.call_later(self._unregister_retry, self._schedule_complete)
            return
        self._on_readable()
        await self._stop_work()
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
        if self._native is not None:
            self._drain_native(self._native)
            return
        buf, view, size = self._rbuf, self._rview, len(self._rbuf)
        unpack = abi.MSG_STRUCT.iter_unpack
        on_fault = self._on_fault
        read_into = self._uffd.read_into
        pagefault = abi.EVENT_PAGEFAULT
        try:
            while True:
                n = read_into(buf)
                if not n:
                    return
                t0 = time.perf_counter_ns()
                for event, a0, a1, a2 in unpack(view[:n]):
                    if event == pagefault:
                        on_fault(a0, a1, a2 & 0xFFFFFFFF, t0)
                    else:
                        self._on_event(UffdMsg(event, a0, a1, a2))
                if n < size or self._closed:
                    return
        except KernelError as exc:
            self._read_failed(exc)

    def _read_failed(self, exc: KernelError) -> None:
        """The fault loop cannot go on: a guest that is gone ends quietly, anything else loudly."""
        if not isinstance(exc, GuestGone):
            self._log.error("uffd_read_failed", error=str(exc))
        self._fail(exc)

    def _drain_native(self, native: FastPath) -> None:
        """_on_readable with the C fast path: it reads and serves; the messages it leaves
        (events, pages not EMPTY, reads that would block, a failed CONTINUE) go through
        _on_fault / _on_event here, one at a time and in order."""
        view = self._rview
        try:
            while (left := native.drain(view)) is not None:
                i, count, t0 = left
                while i < count:
                    self._fold_native(native)
                    event, a0, a1, a2 = abi.MSG_STRUCT.unpack_from(view, i * abi.MSG_SIZE)
                    if event == abi.EVENT_PAGEFAULT:
                        self._on_fault(a0, a1, a2 & 0xFFFFFFFF, t0)
                    else:
                        self._on_event(UffdMsg(event, a0, a1, a2))
                    i += 1
                    if self._native is native and not self._closed:
                        i = native.serve(view, i, count, t0)
                if count < MAX_BATCH or self._closed or self._native is not native:
                    break
        except OSError as exc:  # KernelError as in _on_readable, or drain's own read(2)
            self._read_failed(exc if isinstance(exc, KernelError)
                              else classify("read(userfaultfd)", exc.errno or errno.EIO))
        finally:
            self._fold_native(native)

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

    def _on_fault(self, flags: int, addr: int, tid: int, t0: int) -> None:
        stats = self.stats
        stats.fault_msgs += 1
        if flags & abi.PAGEFAULT_FLAG_MINOR:
            stats.minor_faults += 1
        region = self._last
        if not region.start <= addr < region.end:
            found = self._find(addr)
            if found is None:
                self._log.error("fault_outside_regions", address=hex(addr))
                return
            region = found
        idx = (addr - region.start) >> region.shift
        st = region.state
        state = st[idx]
        if state != EMPTY:
            if state == FILLED:
                # A stale duplicate of a fault already resolved, or a PTE the kernel dropped:
                # map it again (EEXIST -> wake).
                stats.already_mapped += 1
                self._remap(region, idx)
            elif state == REMOVED:
                self._zero_fill(region, idx, flags)
            elif state == INSTALLING and not self.anonymous and (region.index, idx) not in self._retrying:
                # Bytes complete in the page cache (e.g. left by a dead predecessor): map them.
                self._install_run(region, idx, 1, idx, t0, DEMAND)
            elif state == FILLING and self._prefetcher is not None and self._prefetcher.steal(region, idx):
                stats.stolen += 1  # slow background fetch in flight: fetch this page urgently
                self._fill_demand(region, idx, idx, idx + 1, t0, tid)
            elif state == UNMAPPED:
                self._log.warning("fault_on_unmapped_range", address=hex(addr))
            else:
                stats.coalesced += 1  # the fill in flight will install it, which wakes this vCPU too
            return
        self.cursor = (region, idx)
        if self._record is not None:
            self._record.append((region.offset >> region.shift) + idx)
        if self._fast:
            # The common case, kept flat: one page of shared memory, filled through the second
            # mapping and mapped into the guest, inline.
            st[idx] = FILLING
            foff = region.offset + (idx << region.shift)
            ps = region.page_size
            dest = self._mview[foff : foff + ps]
            if self._fill_nowait(foff, dest):
                dest.release()
                stats.fills_inline += 1
                st[idx] = INSTALLING
                try:
                    self._continue(addr - (addr & (ps - 1)), ps)
                except KernelError:
                    self._install_run(region, idx, 1, idx, t0, DEMAND, tid=tid)
                    return
                st[idx] = FILLED
                stats.pages_filled += 1
                stats.pages_demand += 1
                stats.bytes_filled += ps
                ns = time.perf_counter_ns() - t0
                stats.blocked_ns += ns
                b = (ns >> 10).bit_length()
                stats.latency_log2_us[b if b < _LAT_BUCKETS else _LAT_BUCKETS - 1] += 1
                if tid:
                    by_tid = stats.blocked_ns_by_tid
                    by_tid[tid] = by_tid.get(tid, 0) + ns
                if stats.pages_filled >= stats.pages_total:
                    self._schedule_complete()
                return
            stats.fills_async += 1
            self._spawn(self._fill_async(region, idx, 1, idx, dest, t0, None, tid))
            return
        lo, hi = idx, idx + 1
        fa = self._fa_pages
        if fa > 1:
            b0 = idx & ~(fa - 1)
            b1 = min(b0 + fa, region.npages)
            while lo > b0 and st[lo - 1] == EMPTY:
                lo -= 1
            while hi < b1 and st[hi] == EMPTY:
                hi += 1
        self._fill_demand(region, idx, lo, hi, t0, tid)

    def _fill_demand(self, region: Region, idx: int, lo: int, hi: int, t0: int, tid: int = 0) -> None:
        """Fill pages [lo, hi) for the demand fault on ``idx``: inline if the source can, else a task.

        Shared memory is filled in place through the second mapping; anonymous memory into a
        private buffer that UFFDIO_COPY then copies into the guest."""
        stats = self.stats
        st = region.state
        n = hi - lo
        if n == 1:
            st[lo] = FILLING
        else:
            st[lo:hi] = bytes((FILLING,)) * n
        foff = region.offset + (lo << region.shift)
        nbytes = n << region.shift
        bounce = self._bounce
        if bounce is not None:
            dest = bounce.view[:nbytes]
        else:
            assert self._mapping is not None
            dest = self._mapping.view(foff, nbytes)
        if self.source.fill_nowait(foff, dest):
            dest.release()
            stats.fills_inline += 1
            self._install_run(region, lo, n, idx, t0, DEMAND, bounce, tid=tid)
            return
        stats.fills_async += 1
        buf = None
        if bounce is not None:  # the shared bounce buffer is for inline fills only
            dest.release()
            buf = _Bounce(nbytes)
            dest = buf.view[:nbytes]
        self._spawn(self._fill_async(region, lo, n, idx, dest, t0, buf, tid))

    async def _fill_async(self, region: Region, lo: int, n: int, demand_idx: int, dest: memoryview, t0: int,
                          buf: _Bounce | None = None, tid: int = 0) -> None:
        """Fill pages from the source, retrying with backoff; never install a partial page."""
        foff = region.file_offset(lo)
        delay = RETRY_MIN_S
        attempt = 0
        try:
            while True:
                try:
                    await self.source.fill(foff, dest)
                    break
                except PagePoisoned as exc:
                    dest.release()
                    self.poison_run(region, lo, n, exc)
                    return
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
        self._install_run(region, lo, n, demand_idx, t0, DEMAND, buf, tid=tid)

    def poison_run(self, region: Region, lo: int, n: int, exc: PagePoisoned) -> None:
        """The source says some of these pages are poisoned (a memory error at the source): those
        get UFFDIO_POISON, so the guest takes a SIGBUS instead of reading garbage; the rest of
        the run is fetched again page by page."""
        ps = region.page_size
        for p in range(lo, lo + n):
            foff = region.file_offset(p)
            if not exc.covers(foff, ps):
                region.state[p] = EMPTY  # refetched when faulted or by pre-paging
                self._spawn(self._refill_one(region, p))
                continue
            try:
                self._uffd.poison(region.addr(p), ps)
            except PageExists:
                self._uffd.wake(region.addr(p), ps)
            except KernelError as err:
                self._log.error("poison_failed", address=hex(region.addr(p)), error=str(err))
                continue
            self._log.warning("page_poisoned", offset=foff, address=hex(region.addr(p)))
            self.stats.pages_poisoned += 1
            self._mark_filled(region, p, 1, -1, PREFETCH)

    async def _refill_one(self, region: Region, p: int) -> None:
        await asyncio.sleep(0)
        if region.state[p] == EMPTY:
            self._fill_demand(region, p, p, p + 1, 0)

    def _remap(self, region: Region, idx: int) -> None:
        """A FILLED page faulted again. Shared memory: CONTINUE maps the page cache again.
        Anonymous memory: a discarded page reads as zeros, so ZEROPAGE (EEXIST if it is still
        there: only wake)."""
        addr = region.addr(idx)
        ps = region.page_size
        try:
            if self.anonymous:
                self._install_zeros(addr, ps)
            else:
                self._uffd.continue_(addr, ps)
        except PageExists:
            try:
                self._uffd.wake(addr, ps)
            except KernelError as exc:
                self._log.warning("wake_failed", address=hex(addr), error=str(exc))
        except MappingChanging:
            self.stats.retries += 1
            self._retry_call(("remap", region.index, idx), lambda: self._remap(region, idx), RETRY_MIN_S)
        except GuestGone as exc:
            self._fail(exc)
        except KernelError as exc:
            self.stats.kernel_errors += 1
            self._log.error("continue_failed", address=hex(addr), error=str(exc))

    def _install_zeros(self, addr: int, length: int) -> None:
        if self.hugetlb:  # no ZEROPAGE on hugetlbfs
            zeros = self._zero_bounce(length)
            self._uffd.copy(addr, zeros.addr, length)
        else:
            self._uffd.zeropage(addr, length)

    def _zero_bounce(self, length: int) -> _Bounce:
        if self._zeros is None or len(self._zeros.view) < length:
            self._zeros = _Bounce(length)
        return self._zeros

    def _zero_fill(self, region: Region, idx: int, flags: int) -> None:
        """A fault on a page the guest discarded: zeros, never the source's bytes. On shared
        memory a MINOR fault means the page cache kept the page (MADV_DONTNEED only dropped the
        mapping): map it as it is."""
        addr = region.addr(idx)
        ps = region.page_size
        try:
            if self.anonymous:
                self._install_zeros(addr, ps)
            else:
                if not flags & abi.PAGEFAULT_FLAG_MINOR:
                    assert self._mapping is not None
                    with self._mapping.view(region.file_offset(idx), ps) as dest:
                        dest[:] = memoryview(_ZEROS)[:ps] if ps <= len(_ZEROS) else bytes(ps)
                self._uffd.continue_(addr, ps)
        except PageExists:
            with contextlib.suppress(KernelError):
                self._uffd.wake(addr, ps)
        except MappingChanging:
            self.stats.retries += 1
            self._retry_call(("zero", region.index, idx), lambda: self._zero_fill(region, idx, flags), RETRY_MIN_S)
            return
        except GuestGone as exc:
            self._fail(exc)
            return
        except KernelError as exc:
            self.stats.kernel_errors += 1
            self._log.error("zero_fill_failed", address=hex(addr), error=str(exc))
            return
        if region.state[idx] == REMOVED:
            region.state[idx] = FILLED
            self.stats.pages_zeroed += 1

    def install_run(self, region: Region, lo: int, n: int, path: str, src: _Bounce | None = None,
                    src_off: int = 0) -> None:
        """Install pages [lo, lo+n) whose bytes are complete (used by pre-paging): in the page
        cache for shared memory, in ``src`` at ``src_off`` for anonymous memory."""
        self._install_run(region, lo, n, -1, 0, path, src, src_off)

    def _install_run(self, region: Region, lo: int, n: int, demand_idx: int, t0: int, path: str,
                     src: _Bounce | None = None, src_off: int = 0, delay: float = RETRY_MIN_S, tid: int = 0) -> None:
        """CONTINUE (shared) or COPY/ZEROPAGE (anonymous) pages [lo, lo+n) whose bytes are
        complete; mark them filled only as the kernel accepts them. Pages already mapped some
        other way are skipped (EEXIST); pages the guest discarded meanwhile get zeros."""
        if self._closed or self._uffd.closed:
            return
        if region.retired:
            for r2, lo2, n2 in self._relocate(region, lo, n):
                self._install_run(r2, lo2, n2, -1, t0, path, src, src_off + ((lo2 - lo) << region.shift), delay)
            return
        st = region.state
        shift = region.shift
        end = lo + n
        window = bytes(st[lo:end])
        if REMOVED in window or UNMAPPED in window:
            self._install_around_discarded(region, lo, n, window, demand_idx, t0, path, src, src_off)
            return
        st[lo:end] = bytes((INSTALLING,)) * n
        anonymous = self.anonymous
        pos = lo
        while pos < end:
            addr = region.start + (pos << shift)
            length = (end - pos) << shift
            try:
                if anonymous:
                    assert src is not None
                    off = src_off + ((pos - lo) << shift)
                    data = src.view[off : off + length]
                    if not self.hugetlb and length <= len(_ZEROS) and data == _ZERO_VIEW[:length]:
                        self._uffd.zeropage(addr, length)  # the source says zero: map the zero page
                    else:
                        self._uffd.copy(addr, src.addr + off, length)
                else:
                    self._uffd.continue_(addr, length)
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
                    src2, off2 = self._keep(src, src_off + ((pos - lo) << shift), length)
                    self._retry_later(region, pos, end - pos, demand_idx, t0, path, delay, src2, off2)
                    return
            except GuestGone as exc:
                self._fail(exc)
                return
            except KernelError as exc:
                self.stats.kernel_errors += 1
                self._log.error("install_failed", address=hex(addr), pages=end - pos, error=str(exc),
                                retry_in=delay)
                src2, off2 = self._keep(src, src_off + ((pos - lo) << shift), length)
                self._retry_later(region, pos, end - pos, demand_idx, t0, path, delay, src2, off2)
                return
            self._mark_filled(region, pos, done, demand_idx, path)
            pos += done
        if demand_idx >= 0 and t0:
            ns = time.perf_counter_ns() - t0
            self.stats.blocked_ns += ns
            b = (ns >> 10).bit_length()
            self.stats.latency_log2_us[b if b < _LAT_BUCKETS else _LAT_BUCKETS - 1] += 1
            if tid:
                by_tid = self.stats.blocked_ns_by_tid
                by_tid[tid] = by_tid.get(tid, 0) + ns

    def _install_around_discarded(self, region: Region, lo: int, n: int, window: bytes, demand_idx: int, t0: int,
                                  path: str, src: _Bounce | None, src_off: int) -> None:
        """Some pages of a run were discarded (REMOVE/UNMAP) while their bytes were on the way:
        those get zeros (or nothing, if unmapped), the others are installed as usual."""
        p = 0
        while p < n:
            state = window[p]
            if state in (REMOVED, UNMAPPED):
                if state == REMOVED:
                    self._zero_fill(region, lo + p, 0)
                p += 1
                continue
            q = p
            while q < n and window[q] not in (REMOVED, UNMAPPED):
                q += 1
            self._install_run(region, lo + p, q - p, demand_idx, t0, path, src, src_off + (p << region.shift))
            p = q

    def _keep(self, src: _Bounce | None, off: int, length: int) -> tuple[_Bounce | None, int]:
        """Bytes that must survive until a retry: the shared bounce buffer will be reused."""
        if src is None or src is not self._bounce:
            return src, off
        kept = _Bounce(length)
        kept.view[:length] = src.view[off : off + length]
        return kept, 0

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
                     delay: float, src: _Bounce | None = None, src_off: int = 0) -> None:
        self._retry_call(
            (region.index, lo),
            lambda: self._install_run(region, lo, n, demand_idx, t0, path, src, src_off, min(delay * 2, RETRY_MAX_S)),
            delay)

    def _retry_call(self, key: tuple[object, ...], fn: Callable[[], None], delay: float) -> None:
        """Run ``fn`` after ``delay``, once the pending events have been read (never a busy loop)."""
        assert self._loop is not None
        if key in self._retrying:
            return
        self._retrying.add(key)

        def retry() -> None:
            self._retry_handles.discard(handle)
            self._retrying.discard(key)
            self._on_readable()  # apply pending events first
            if not self._closed:
                fn()

        handle = self._loop.call_later(delay, retry)
        self._retry_handles.add(handle)

    # --- non-cooperative events ------------------------------------------------------------
    def _on_event(self, msg: UffdMsg) -> None:
        """REMOVE / UNMAP / REMAP change the guest's mappings under us; apply them in order.
        While one is unread every ioctl fails with EAGAIN, so they are read with the faults."""
        self.stats.events += 1
        ev = msg.event
        if ev == abi.EVENT_REMOVE:
            self._discard(msg.arg0, msg.arg1, REMOVED)
        elif ev == abi.EVENT_UNMAP:
            self._discard(msg.arg0, msg.arg1, UNMAPPED)
        elif ev == abi.EVENT_REMAP:
            self._move(msg.arg0, msg.arg1, msg.arg2)
        elif ev == abi.EVENT_FORK:
            fd = msg.arg0 & 0xFFFFFFFF
            self._log.warning("fork_not_served", uffd=fd, hint="the child process's copy is not served")
            with contextlib.suppress(OSError):
                os.close(fd)
        else:
            self._log.warning("unexpected_uffd_event", uffd_event=hex(ev))

    def _discard(self, start: int, end: int, new_state: int) -> None:
        """Mark [start, end) discarded: the source is never asked for these pages again."""
        stats = self.stats
        for r in list(self.regions):
            lo_addr, hi_addr = max(start, r.start), min(end, r.end)
            if lo_addr >= hi_addr:
                continue
            i0 = (lo_addr - r.start) >> r.shift
            i1 = (hi_addr - r.start + r.page_size - 1) >> r.shift
            seg = bytes(r.state[i0:i1])
            pending = seg.count(EMPTY) + seg.count(FILLING) + seg.count(INSTALLING)
            stats.pages_filled += pending  # resolved: they no longer need the source
            if new_state == REMOVED:
                stats.pages_removed += len(seg) - seg.count(REMOVED) - seg.count(UNMAPPED)
                r.state[i0:i1] = seg.translate(_TO_REMOVED)
            else:
                r.state[i0:i1] = bytes((UNMAPPED,)) * len(seg)
        if stats.pages_filled >= stats.pages_total:
            self._schedule_complete()

    def _move(self, frm: int, to: int, length: int) -> None:
        """mremap moved [frm, frm+length) to ``to``: regions follow (split where needed)."""
        end = frm + length
        changed = False
        for r in list(self.regions):
            if r.end <= frm or r.start >= end:
                continue
            parts = [r]
            cut_lo = max(frm, r.start) - r.start
            cut_hi = min(end, r.end) - r.start
            if cut_lo > 0 or cut_hi < r.end - r.start:
                parts = self._split(r, [c >> r.shift for c in (cut_lo, cut_hi) if 0 < c < r.end - r.start])
            for p in parts:
                if frm <= p.start and p.end <= end:
                    p.start += to - frm
                    p.end += to - frm
            changed = True
        if changed:
            self._reindex()
            self._log.info("regions_moved", frm=hex(frm), to=hex(to), length=length)
            if self.on_regions_changed is not None:
                self.on_regions_changed(self)

    def current_handshake(self) -> Handshake:
        """The regions as they are now (moved, split), in page-state order: a successor built
        from this handshake and the same PageStates sees every page where it is."""
        ordered = sorted(self.regions, key=lambda r: r.base)
        return Handshake(vm_id=self.vm_id, source=self.handshake.source, regions=tuple(
            RegionSpec(r.start, r.npages << r.shift, r.offset, r.page_size) for r in ordered))

    def _split(self, r: Region, cuts: list[int]) -> list[Region]:
        """Replace ``r`` by pieces cut at the given page indices; ``r`` is retired."""
        bounds = [0, *sorted(set(cuts)), r.npages]
        pieces = []
        for a, b in itertools.pairwise(bounds):
            spec = RegionSpec(r.start + (a << r.shift), (b - a) << r.shift, r.offset + (a << r.shift), r.page_size)
            pieces.append(Region(spec, 0, self.states.view[r.base + a : r.base + b], r.base + a))
        r.retired = True
        i = self.regions.index(r)
        self.regions[i : i + 1] = pieces
        return pieces

    def _reindex(self) -> None:
        for i, r in enumerate(self.regions):
            r.index = i
        self._native_regions()
        self._by_addr = sorted(self.regions, key=lambda r: r.start)
        self._starts = [r.start for r in self._by_addr]
        self._last = self._by_addr[0]
        self.cursor = (self.regions[0], 0)

    def _relocate(self, region: Region, lo: int, n: int) -> list[tuple[Region, int, int]]:
        """Pages [lo, lo+n) of a retired region, as runs of the live regions holding them."""
        out = []
        g0, g1 = region.base + lo, region.base + lo + n
        for r in self.regions:
            a, b = max(g0, r.base), min(g1, r.base + r.npages)
            if a < b:
                out.append((r, a - r.base, b - a))
        return out

    # --- for the prefetcher ----------------------------------------------------------------
    def release_claims(self, segs: list[tuple[Region, int, int]]) -> None:
        """Background work failed: its FILLING pages go back to EMPTY, their waiters are woken
        (and fault again, now served on demand)."""
        for r, i, n in segs:
            if r.retired:
                continue
            for p in range(i, i + n):
                if r.state[p] == FILLING:
                    r.state[p] = EMPTY
            with contextlib.suppress(KernelError):
                self._uffd.wake(r.addr(i), n << r.shift)

    @staticmethod
    def new_bounce(size: int) -> _Bounce:
        """A private page-aligned buffer to fetch into (see install_run)."""
        return _Bounce(size)

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
