"""Demand fills: the bytes a faulting vCPU waits for, and the fault-around block around them.

A demand fault on an EMPTY page fills an aligned block around it (``fault_around``), skipping
pages that are not EMPTY, with one source read and one install. When the source can fill without
waiting (a page-cache hit) that happens inline, in the fault loop's callback; otherwise a task
fetches it, retrying with backoff on any source error. A failed read is never installed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine

from uffdd.core.guest import DEMAND, Guest
from uffdd.core.pagestate import EMPTY, FILLING
from uffdd.core.regions import Region
from uffdd.core.retry import RETRY_MIN_S, backoff
from uffdd.core.stats import Wait
from uffdd.errors import PagePoisoned, SourceError
from uffdd.kernel.memory import PrivateBuffer
from uffdd.sources import PageSource

_FILLING = bytes((FILLING,))

Spawn = Callable[[Coroutine[object, object, None]], object]


def fault_around_pages(fault_around: int, page_size: int) -> int:
    """Pages per fault-around block: the largest power of two that fits (1: off)."""
    fa = fault_around // page_size
    return 1 << (fa.bit_length() - 1) if fa > 1 else 1


class DemandFiller:
    """Fills EMPTY pages for demand faults (see the module docstring)."""

    def __init__(self, guest: Guest, source: PageSource, spawn: Spawn, *, fault_around: int) -> None:
        self.guest = guest
        self.source = source
        self._spawn = spawn
        self.block_pages = fault_around_pages(fault_around, guest.page_size)
        self._bounce = PrivateBuffer(self.block_pages * guest.page_size) if guest.anonymous else None
        """Inline fills of anonymous memory go through this buffer (COPY takes it from there)."""
        self._fill_nowait = source.fill_nowait
        self.inflight = 0
        """Pages whose demand fill waits for the source right now (for the metrics)."""

    def block(self, region: Region, idx: int) -> tuple[int, int]:
        """The pages [lo, hi) to fill for a fault on ``idx``: the EMPTY pages around it, within
        its aligned fault-around block."""
        lo, hi = idx, idx + 1
        fa = self.block_pages
        if fa > 1:
            st = region.state
            b0 = idx & ~(fa - 1)
            b1 = min(b0 + fa, region.npages)
            while lo > b0 and st[lo - 1] == EMPTY:
                lo -= 1
            while hi < b1 and st[hi] == EMPTY:
                hi += 1
        return lo, hi

    def fault(self, region: Region, idx: int, wait: Wait) -> None:
        """A demand fault on EMPTY page ``idx``."""
        lo, hi = self.block(region, idx)
        self.fill(region, lo, hi, wait)

    def fill(self, region: Region, lo: int, hi: int, wait: Wait | None) -> None:
        """Fill pages [lo, hi), inline if the source can, else in a task; then install them."""
        n = hi - lo
        st = region.state
        if n == 1:
            st[lo] = FILLING
        else:
            st[lo:hi] = _FILLING * n
        shift = region.shift
        bounce = self._bounce
        dest = bounce.view[: n << shift] if bounce is not None else region.mem[lo << shift : hi << shift]
        if self._fill_nowait(region.file_offset(lo), dest):
            dest.release()
            self.guest.stats.fills_inline += 1
            self.guest.install_run(region, lo, n, DEMAND, wait, bounce)
            return
        self.guest.stats.fills_async += 1
        buf = None
        if bounce is not None:  # the shared bounce buffer is for inline fills only
            dest.release()
            buf = PrivateBuffer(n << shift)
            dest = buf.view[: n << shift]
        self.inflight += n
        self._spawn(self._fill_async(region, lo, n, wait, dest, buf))

    async def _fill_async(self, region: Region, lo: int, n: int, wait: Wait | None, dest: memoryview,
                          buf: PrivateBuffer | None) -> None:
        """Fill from the source, retrying with backoff; never install a partial page."""
        try:
            if not await self._fetch(region, lo, n, wait, dest):
                return
        finally:
            dest.release()
            self.inflight -= n
        self.guest.install_run(region, lo, n, DEMAND, wait, buf)

    async def _fetch(self, region: Region, lo: int, n: int, wait: Wait | None, dest: memoryview) -> bool:
        """Read the run into ``dest`` until it succeeds; False if it turned out to be poisoned."""
        foff = region.file_offset(lo)
        delay = RETRY_MIN_S
        attempt = 0
        while True:
            try:
                await self.source.fill(foff, dest)
                return True
            except PagePoisoned as exc:
                self.guest.poison_run(region, lo, n, exc, wait, self.refill)
                return False
            except (SourceError, OSError, ValueError) as exc:
                if self.guest.gone_unless_covered(region, lo, n):
                    return False  # the VMM shrank the memory file: the session ends
                self.guest.stats.source_errors += 1
                attempt += 1
                if attempt == 1 or attempt % 10 == 0:  # loud, but not one line per retry
                    self.guest.log.warning(
                        "source_fill_failed", offset=foff, pages=n, attempt=attempt,
                        error=str(exc) if isinstance(exc, SourceError) else repr(exc), retry_in=delay)
            await asyncio.sleep(delay)
            delay = backoff(delay)

    def refill(self, region: Region, idx: int, wait: Wait | None) -> None:
        """Fetch one page again (it was next to a poisoned one), as a demand fill."""
        async def again() -> None:
            await asyncio.sleep(0)
            if not region.retired and region.state[idx] == EMPTY:
                self.fill(region, idx, idx + 1, wait)

        self._spawn(again())

    def close(self) -> None:
        if self._bounce is not None:
            self._bounce.close()
            self._bounce = None


__all__ = ["DemandFiller", "fault_around_pages"]
