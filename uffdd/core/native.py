"""The C twin of the fault loop's common case (``_fastpath.c``), and what Python does with it.

The extension is optional (built by setup.py when a C compiler is present). It is used only
where it does exactly what the Python path would: shared memory, a source that can be read
with one preadv2 (:meth:`PageSource.inline_read`), no working-set recording. Its page-state
values and histogram size are checked against Python's here, at import: a mismatch (a stale
build) means the extension is not used, never that the two disagree silently.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING

from uffdd.core.guest import Guest
from uffdd.core.pagestate import EMPTY, FILLED, FILLING, INSTALLING
from uffdd.core.regions import Region
from uffdd.core.stats import LAT_BUCKETS

if TYPE_CHECKING:
    from uffdd.core._fastpath import FastPath

COUNTERS = ("fault_msgs", "minor_faults", "fills_inline", "pages_filled", "pages_demand", "pages_fault_around",
            "bytes_filled", "blocked_ns", "already_mapped")
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


class NativePath:
    """One session's C fault path: it shares the page states, the histogram and the per-thread
    dict with the Python path; :meth:`fold` adds its other counters to the session's."""

    def __init__(self, guest: Guest, src_fd: int, rwf: int, fa_pages: int) -> None:
        assert _module is not None
        self.guest = guest
        stats = guest.stats
        self._fp: FastPath = _module.FastPath(guest.uffd.fileno(), src_fd, rwf, fa_pages, guest.states.view,
                                    stats.latency_log2_us, stats.blocked_ns_by_tid)
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
        faults, minor, inline, pages, demand, around, nbytes, ns, already, pos, idx = self._fp.take()
        if not faults:
            return
        stats = self.guest.stats  # the names and order of COUNTERS, checked at import
        stats.fault_msgs += faults
        stats.minor_faults += minor
        stats.fills_inline += inline
        stats.pages_filled += pages
        stats.pages_demand += demand
        stats.pages_fault_around += around
        stats.bytes_filled += nbytes
        stats.blocked_ns += ns
        stats.already_mapped += already
        if pages:  # a demand fault was served: pre-paging goes on from there
            self.guest.cursor = (self.guest.regions.regions[pos], idx)
        if stats.pages_filled >= stats.pages_total:
            self.guest.on_all_filled()

    def close(self) -> None:
        """Release what it holds (the page states, the mappings' views, the histogram)."""
        self._fp.close()


__all__ = ["COUNTERS", "STATUS", "NativePath", "native_available"]
