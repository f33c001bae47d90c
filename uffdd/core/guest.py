"""One guest's pages: their states, where their bytes go, and the rules that put them in place.

A page moves EMPTY -> FILLING -> INSTALLING -> FILLED (uffdd.core.pagestate). Whoever fetched
its bytes (a demand fill, pre-paging, replay) hands a run of complete pages to
:meth:`Guest.install_run`, the only place that marks pages INSTALLING and FILLED: it issues
one ioctl per run through the :class:`~uffdd.core.installer.Installer`, marks pages filled only
as the kernel accepts them, retries what the kernel refused for now, and gives pages the guest
discarded meanwhile zeros (never the source's bytes).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

import structlog

from uffdd.core.installer import Installer, Outcome, Result
from uffdd.core.pagestate import EMPTY, FILLED, FILLING, INSTALLING, REMOVED, UNMAPPED, PageStates
from uffdd.core.regions import Region, RegionMap, Run
from uffdd.core.retry import RETRY_MIN_S, Retries, backoff
from uffdd.core.stats import SessionStats, Wait
from uffdd.errors import GuestMemoryGone, PagePoisoned
from uffdd.handshake import Handshake
from uffdd.kernel import KernelError, SecondMapping, Userfaultfd, abi
from uffdd.kernel.memory import PrivateBuffer, fill_zeros

DEMAND, FAULT_AROUND, PREFETCH, REPLAY = "demand", "fault_around", "prefetch", "replay"
"""How a page got in: a demand fault's own page, its fault-around block, pre-paging, replay."""

_INSTALLING = bytes((INSTALLING,))
_FILLED = bytes((FILLED,))

Log = structlog.typing.FilteringBoundLogger


def _covers(region: Region, lo: int, n: int, wait: Wait | None) -> Wait | None:
    """``wait`` if its page is in [lo, lo+n) of ``region``, else None."""
    if wait is not None and region.base + lo <= wait.gidx < region.base + lo + n:
        return wait
    return None


class Guest:
    """The memory of one guest as a session serves it (see the module docstring)."""

    def __init__(self, *, session_id: str, handshake: Handshake, uffd: Userfaultfd, memfd: int | None,
                 states: PageStates, stats: SessionStats, log: Log) -> None:
        self.id = session_id
        self.uffd = uffd
        self.memfd = memfd
        self.anonymous = memfd is None
        """Private anonymous memory: installed with UFFDIO_COPY from a private buffer."""
        self.page_size = handshake.page_size
        self.hugetlb = self.page_size > 4096
        self.states = states
        self.stats = stats
        self.log = log
        self.mappings: list[SecondMapping] = []
        """The second mapping, one per region: it covers the regions' ranges of the memory file only."""
        if memfd is not None:
            try:
                for spec in handshake.regions:
                    self.mappings.append(SecondMapping(memfd, spec.size, spec.offset))
            except BaseException:
                for m in self.mappings:
                    m.close()
                raise
        mems = [m.view(m.offset, m.size) for m in self.mappings] if memfd is not None else None
        self.regions = RegionMap(handshake.regions, states.view, mems)
        self.file_end = max(r.offset + r.size for r in handshake.regions)
        """Bytes of the memory file the regions need."""
        self.installer = Installer(uffd, stats, page_size=self.page_size, anonymous=self.anonymous, log=log,
                                   memory_short=self.memory_short)
        self.retries: Retries | None = None
        """Set when the session starts (timers need its loop)."""
        self.waiting: dict[int, list[Wait]] = {}
        """vCPUs that faulted on a page whose fill was already on its way, by global page index:
        their waits are booked when that page is in place (or handed back to the demand path)."""
        self.cursor: tuple[Region, int] = (self.regions.regions[0], 0)
        """Where the latest demand fault was: background pre-paging starts near it."""
        self.closed = False
        self.on_all_filled: Callable[[], None] = lambda: None
        self.on_gone: Callable[[BaseException], None] = lambda exc: None

    # --- installing ----------------------------------------------------------------------
    def install_run(self, region: Region, lo: int, n: int, path: str, wait: Wait | None = None,
                    src: PrivateBuffer | None = None, src_off: int = 0, delay: float = RETRY_MIN_S) -> None:
        """Install pages [lo, lo+n) whose bytes are complete: in the page cache for shared
        memory, in ``src`` at ``src_off`` for anonymous memory. ``wait`` is the vCPU that
        faulted on one of them (booked once its page is in). Pages mapped some other way are
        skipped (EEXIST); pages the guest discarded meanwhile get zeros."""
        if self.closed or self.uffd.closed:
            return
        if region.retired:
            for r2, lo2, n2 in self.regions.relocate(region, lo, n):
                self.install_run(r2, lo2, n2, path, _covers(r2, lo2, n2, wait), src,
                                 src_off + ((lo2 - lo) << region.shift), delay)
            return
        st = region.state
        end = lo + n
        window = bytes(st[lo:end])
        if REMOVED in window or UNMAPPED in window:
            self._install_around_discarded(region, lo, window, path, wait, src, src_off)
            return
        st[lo:end] = _INSTALLING * n
        shift = region.shift
        pos = lo
        while pos < end:
            res = self.installer.map(region.addr(pos), (end - pos) << shift, src, src_off + ((pos - lo) << shift))
            if res.outcome is Outcome.DONE:
                done = end - pos
            elif res.outcome is Outcome.EXISTS:
                self.stats.already_mapped += 1
                done = 1
            elif res.outcome is Outcome.GONE:
                self.fail(res)
                return
            else:
                done = res.done >> shift
                if not done:
                    self._install_later(region, pos, end - pos, path, wait, src, src_off + ((pos - lo) << shift),
                                        delay)
                    return
            self.mark_filled(region, pos, done, path, wait)
            pos += done
        if wait is not None:
            self.book(wait)

    def _install_around_discarded(self, region: Region, lo: int, window: bytes, path: str, wait: Wait | None,
                                  src: PrivateBuffer | None, src_off: int) -> None:
        """Some pages of a run were discarded (REMOVE/UNMAP) while their bytes were on the way:
        those get zeros (or nothing, if unmapped), the others are installed as usual."""
        n = len(window)
        p = 0
        while p < n:
            state = window[p]
            if state in (REMOVED, UNMAPPED):
                w = _covers(region, lo + p, 1, wait)
                if state == REMOVED:
                    self.zero_fill(region, lo + p, 0, w)
                elif w is not None:
                    self.book(w)  # nothing to serve: the range is gone from the guest
                p += 1
                continue
            q = p
            while q < n and window[q] not in (REMOVED, UNMAPPED):
                q += 1
            self.install_run(region, lo + p, q - p, path, _covers(region, lo + p, q - p, wait), src,
                             src_off + (p << region.shift))
            p = q

    def _install_later(self, region: Region, lo: int, n: int, path: str, wait: Wait | None,
                       src: PrivateBuffer | None, src_off: int, delay: float) -> None:
        kept, off = self._keep(src, src_off, n << region.shift)
        self.later(("install", region.base + lo),
                   lambda: self.install_run(region, lo, n, path, wait, kept, off, backoff(delay)), delay)

    def _keep(self, src: PrivateBuffer | None, off: int, length: int) -> tuple[PrivateBuffer | None, int]:
        """Bytes that must survive until a retry (the caller may reuse its buffer): a copy."""
        if src is None:
            return None, 0
        kept = PrivateBuffer(length)
        kept.view[:length] = src.view[off : off + length]
        return kept, 0

    def mark_filled(self, region: Region, pos: int, n: int, path: str, wait: Wait | None = None) -> None:
        st = region.state
        if n == 1:
            st[pos] = FILLED
        else:
            st[pos : pos + n] = _FILLED * n
        stats = self.stats
        stats.count_filled(n)
        stats.bytes_filled += n << region.shift
        if path == DEMAND:
            hit = 1 if _covers(region, pos, n, wait) is not None else 0
            stats.pages_demand += hit
            stats.pages_fault_around += n - hit
        elif path == PREFETCH:
            stats.pages_prefetch += n
        else:
            stats.pages_replay += n
        if self.waiting:
            self._book_waiting(region.base + pos, n)
        if stats.all_in_place:
            self.on_all_filled()

    def book(self, wait: Wait) -> None:
        """A vCPU's page is in place (or will never come): book its wait, once."""
        if wait.t0:
            self.stats.book(wait)

    def wait_for_fill(self, wait: Wait) -> None:
        """A vCPU faulted on a page whose fill is on its way: book its wait when the page is in."""
        self.waiting.setdefault(wait.gidx, []).append(wait)

    def book_installed(self) -> None:
        """Book the waiting vCPUs whose pages are in place now (the C path installs remote fills
        and books only the faults it took itself)."""
        view = self.states.view
        self._book_pages([g for g in self.waiting if view[g] == FILLED])

    def _book_waiting(self, first: int, n: int) -> None:
        """Book the vCPUs waiting on global pages [first, first+n)."""
        waiting = self.waiting
        self._book_pages(range(first, first + n) if n <= len(waiting)
                         else [g for g in waiting if first <= g < first + n])

    def _book_pages(self, pages: Iterable[int]) -> None:
        for g in pages:
            for wait in self.waiting.pop(g, ()):
                self.book(wait)

    # --- faults on pages that are not EMPTY -------------------------------------------------
    def zero_fill(self, region: Region, idx: int, flags: int, wait: Wait | None = None,
                  delay: float = RETRY_MIN_S) -> None:
        """A fault on a page the guest discarded: zeros, never the source's bytes. On shared
        memory a MINOR fault means the page cache kept the page (MADV_DONTNEED only dropped the
        mapping): map it as it is."""
        addr = region.addr(idx)
        ps = region.page_size
        if not self.anonymous and not flags & abi.PAGEFAULT_FLAG_MINOR:
            try:
                with region.mem[idx << region.shift : (idx + 1) << region.shift] as dest:
                    fill_zeros(dest)
            except OSError:  # the memory file shrank under us: the guest is beyond help
                self.on_gone(GuestMemoryGone.at(region.file_offset(idx), ps))
                return
        res = self.installer.map_zeros(addr, ps)
        if res.outcome in (Outcome.RETRY, Outcome.FAILED):
            self.later(("zero", region.base + idx),
                       lambda: self.zero_fill(region, idx, flags, wait, backoff(delay)), delay)
            return
        if res.outcome is Outcome.GONE:
            self.fail(res)
            return
        if region.state[idx] == REMOVED:
            region.state[idx] = FILLED
            self.stats.pages_zeroed += 1
        if wait is not None:
            self.book(wait)
        if self.waiting:
            self._book_waiting(region.base + idx, 1)

    def remap(self, region: Region, idx: int, wait: Wait | None = None, delay: float = RETRY_MIN_S) -> None:
        """A FILLED page faulted again (a stale duplicate message, or a mapping the kernel
        dropped). Shared memory: CONTINUE maps the page cache again. Anonymous memory: a
        discarded page reads as zeros, so ZEROPAGE (EEXIST if it is still there: only wake)."""
        res = self.installer.map_zeros(region.addr(idx), region.page_size)
        if res.outcome in (Outcome.RETRY, Outcome.FAILED):
            self.later(("remap", region.base + idx), lambda: self.remap(region, idx, wait, backoff(delay)), delay)
            return
        if res.outcome is Outcome.GONE:
            self.fail(res)
            return
        if wait is not None:
            self.book(wait)

    def poison_run(self, region: Region, lo: int, n: int, exc: PagePoisoned, wait: Wait | None,
                   refill: Callable[[Region, int, Wait | None], None]) -> None:
        """The source says some of these pages are poisoned (a memory error at the source):
        those get UFFDIO_POISON, so the guest takes a SIGBUS instead of reading garbage; the
        others go back to EMPTY and are fetched again (``refill``)."""
        ps = region.page_size
        for p in range(lo, lo + n):
            w = _covers(region, p, 1, wait)
            if not exc.covers(region.file_offset(p), ps):
                region.state[p] = EMPTY
                refill(region, p, w)
                continue
            res = self.installer.poison(region.addr(p), ps)
            if res.outcome in (Outcome.DONE, Outcome.EXISTS):
                self.log.warning("page_poisoned", offset=region.file_offset(p), address=hex(region.addr(p)))
                self.stats.pages_poisoned += 1
                self.mark_filled(region, p, 1, PREFETCH)
            elif res.outcome is Outcome.GONE:
                self.fail(res)
                return
            if w is not None:
                self.book(w)

    def release_claims(self, runs: list[Run]) -> None:
        """Background work failed: its FILLING pages go back to EMPTY, their waiters are woken
        (and fault again, now served on demand)."""
        for r, i, n in runs:
            if r.retired:
                continue
            for p in range(i, i + n):
                if r.state[p] == FILLING:
                    r.state[p] = EMPTY
            self.installer.wake(r.addr(i), n << r.shift)
            if self.waiting:
                self._book_waiting(r.base + i, n)  # woken: each faults again, a wait of its own

    def covers(self, region: Region, lo: int, n: int) -> bool:
        """Whether the memory file still holds pages [lo, lo+n) (a VMM may shrink it)."""
        if self.memfd is None:
            return True
        try:
            return os.fstat(self.memfd).st_size >= region.file_offset(lo) + (n << region.shift)
        except OSError:
            return False

    def memory_short(self) -> bool:
        """Whether the memory file is shorter than the regions need (the VMM shrank it)."""
        if self.memfd is None:
            return False
        try:
            return os.fstat(self.memfd).st_size < self.file_end
        except OSError:
            return True

    def gone_unless_covered(self, region: Region, lo: int, n: int) -> bool:
        """After a failed copy into guest memory: if the memory file no longer holds the pages,
        end the session (True); else the failure was the source's (False)."""
        if self.covers(region, lo, n):
            return False
        self.on_gone(GuestMemoryGone.at(region.file_offset(lo), n << region.shift))
        return True

    # --- plumbing ----------------------------------------------------------------------------
    def later(self, key: tuple[str, int], fn: Callable[[], None], delay: float) -> None:
        if self.retries is not None:
            self.retries.later(key, fn, delay)

    def retrying(self, region: Region, idx: int) -> bool:
        return self.retries is not None and self.retries.pending(("install", region.base + idx))

    def fail(self, res: Result) -> None:
        self.on_gone(res.error or KernelError("ioctl", 0))

    @property
    def pages_remaining(self) -> int:
        return self.stats.pages_total - self.stats.in_place[0]

    def close(self) -> None:
        """Release the second mapping and the installer's buffers (views first)."""
        self.closed = True
        self.waiting.clear()
        self.regions.release()
        for m in self.mappings:
            try:
                m.close()
            except BufferError:  # a view still held somewhere: the GC unmaps it with its owner
                self.log.warning("second_mapping_busy_at_close")
        self.mappings = []
        self.installer.close()


__all__ = ["DEMAND", "FAULT_AROUND", "PREFETCH", "REPLAY", "Guest"]
