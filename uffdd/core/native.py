"""The C twin of the fault loop's common case (``_fastpath.c``), and what Python does with it.

The extension is optional (built by setup.py when a C compiler is present). It is used only
where it does exactly what the Python path would: shared memory, no working-set recording, and a
source that can be read with one preadv2 (:meth:`PageSource.inline_read`) or that hands over a C
peer link (:meth:`PageSource.native_link`). With a link, a demand fault's run goes out as one
request and the fault is over for now; the link checks the answer, writes it into guest memory
and calls back into the C path, which installs it, all without the interpreter. What C cannot
finish (a failed fetch, a run that changed meanwhile, a refused install) comes back here. Its page-state
values and histogram size are checked against Python's here, at import: a mismatch (a stale
build) means the extension is not used, never that the two disagree silently.
"""

from __future__ import annotations

import asyncio
import importlib
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol

from uffdd.core.guest import DEMAND, Guest
from uffdd.core.pagestate import EMPTY, FILLED, FILLING, INSTALLING, REMOVED, UNMAPPED
from uffdd.core.regions import Region
from uffdd.core.stats import LAT_BUCKETS, Wait

if TYPE_CHECKING:
    from uffdd.core._fastpath import FastPath

COUNTERS = ("fault_msgs", "minor_faults", "fills_inline", "pages_filled", "pages_demand", "pages_fault_around",
            "bytes_filled", "blocked_ns", "already_mapped", "fills_async")
"""What take() returns, in order (before the latest demand fault's region and page)."""
_SHARED = {"EMPTY": EMPTY, "FILLING": FILLING, "INSTALLING": INSTALLING, "FILLED": FILLED,
           "HIST_BUCKETS": LAT_BUCKETS, "COUNTERS": COUNTERS}


def _load() -> tuple[ModuleType | None, str]:
    try:
        _fastpath = importlib.import_module("uffdd.core._fastpath")
    except ImportError as exc:
        return None, f"not built ({exc})"
    wrong = {k: (getattr(_fastpath, k, None), v) for k, v in _SHARED.items() if getattr(_fastpath, k, None) != v}
    if wrong:
        return None, f"built from another version: constants differ (C, Python): {wrong}"
    return _fastpath, "built"


_module, STATUS = _load()
"""Why the C path is (not) available, for `uffdd check` and the session's start line."""


def native_available() -> bool:
    return _module is not None


class Refill(Protocol):
    """How the Python path fetches a run again (:meth:`uffdd.core.fill.DemandFiller.fill`)."""

    def __call__(self, region: Region, lo: int, hi: int, wait: Wait | None) -> None: ...


FETCH_AGAIN, INSTALL, GONE = 1, 2, 3
"""Why a remote fill comes back from C (``link_failures()``)."""


class NativePath:
    """One session's C fault path: it shares the page states, the histogram, the per-thread
    dict and the pages-in-place count with the Python path; :meth:`fold` adds its other
    counters to the session's."""

    def __init__(self, guest: Guest, src_fd: int, rwf: int, fa_pages: int, *, link: Any = None,
                 refill: Refill | None = None) -> None:
        assert _module is not None
        self.guest = guest
        stats = guest.stats
        self.remote = link is not None
        self._refill = refill
        self._loop = asyncio.get_running_loop() if self.remote else None
        self._attention_due = False
        self._fp: FastPath = _module.FastPath(
            guest.uffd.fileno(), src_fd, rwf, fa_pages, guest.states.view, stats.latency_log2_us,
            stats.blocked_ns_by_tid, stats.in_place, stats.pages_total, link,
            self._notify if self.remote else None)
        self.drain = self._fp.drain
        """drain(buf) -> None, or (first message left for Python, messages in buf, t0)."""
        self.serve = self._fp.serve
        """serve(buf, start, end, t0) -> index of the first message left for Python."""
        self.set_regions()

    def set_regions(self) -> None:
        """Tell the C side the regions as they are now (after a move or split too)."""
        self.fold()  # its last fault's position refers to the table it has now
        self._fp.set_regions([(r.start, r.end, r.shift, r.base, r.offset, r.mem) for r in self.guest.regions])

    def failed_run(self) -> tuple[Region, int, int] | None:
        """The INSTALLING run whose CONTINUE the kernel refused, for the message last returned."""
        failed = self._fp.failed()
        if failed is None:
            return None
        pos, lo, n = failed
        return self.guest.regions.regions[pos], lo, n

    def fold(self) -> None:
        """Add what the C path did since the last call to the session's counters."""
        faults, minor, inline, pages, demand, around, nbytes, ns, already, fills_async, pos, idx = self._fp.take()
        if not faults and not pages:
            return
        stats = self.guest.stats  # the names and order of COUNTERS, checked at import
        stats.fault_msgs += faults
        stats.minor_faults += minor
        stats.fills_inline += inline
        stats.pages_filled += pages  # in_place counted them already, as they came
        stats.pages_demand += demand
        stats.pages_fault_around += around
        stats.bytes_filled += nbytes
        stats.blocked_ns += ns
        stats.already_mapped += already
        stats.fills_async += fills_async
        if self.guest.waiting:
            self.guest.book_installed()
        if pages and 0 <= pos < len(self.guest.regions.regions):  # pre-paging goes on from the latest fault
            self.guest.cursor = (self.guest.regions.regions[pos], idx)
        if stats.all_in_place:
            self.guest.on_all_filled()

    # --- remote fills -----------------------------------------------------------------------
    def _notify(self) -> None:
        """Called by C from inside the link's receive(): look soon, outside it."""
        if not self._attention_due and self._loop is not None:
            self._attention_due = True
            self._loop.call_soon(self._attention)

    def _attention(self) -> None:
        self._attention_due = False
        if self.guest.closed:
            return
        for kind, _status, g, n, gidx, t0, tid in self._fp.link_failures():
            self._take_over(kind, g, n, Wait(gidx, t0, tid))
        self.fold()

    def _take_over(self, kind: int, g: int, n: int, wait: Wait) -> None:
        """A remote fill C could not finish: its pages are Python's from here. Pages still
        FILLING are installed (their bytes are complete) or fetched again; pages the guest
        discarded meanwhile get what the installer gives them (zeros, or nothing), so that a
        vCPU waiting on one is woken either way; pages someone else resolved are left alone."""
        guest = self.guest
        for region, lo, cnt in guest.regions.global_runs(g, n):
            st = region.state
            i, end = lo, lo + cnt
            while i < end:
                state = st[i]
                j = i + 1
                if state == FILLING:
                    while j < end and st[j] == FILLING:
                        j += 1
                elif state in (REMOVED, UNMAPPED):
                    while j < end and st[j] in (REMOVED, UNMAPPED):
                        j += 1
                else:
                    i = j
                    continue
                w = wait if region.base + i <= wait.gidx < region.base + j else None
                if kind == INSTALL or state != FILLING:  # complete bytes, or none needed
                    guest.install_run(region, i, j - i, DEMAND, w)
                elif kind == GONE and guest.gone_unless_covered(region, i, j - i):
                    return
                elif self._refill is not None:
                    self._refill(region, i, j, w)  # fetch again, with the Python path's retries
                i = j

    def close(self) -> None:
        """Release what it holds (the page states, the mappings' views, the histogram); with a
        link, nothing is written into guest memory after this."""
        self._fp.close()


__all__ = ["COUNTERS", "STATUS", "NativePath", "native_available"]
