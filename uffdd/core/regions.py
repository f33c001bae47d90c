"""The guest's regions as the session sees them: find, move, split, relocate, discard.

Pure bookkeeping over the handshake's regions and a page-state buffer: no kernel, no event
loop, so it is unit-tested on its own. Every region owns a slice of the session's page-state
array (``state``) and, for shared memory, a slice of the daemon's second mapping (``mem``).
A page keeps its *global index* (its position in the page-state array) for the whole session,
however its region is moved or split: that index is what survives an mremap.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterator

from uffdd.handshake import RegionSpec


def _no_mem() -> memoryview:
    """A region of anonymous memory has no second mapping (each its own view: views get released)."""
    return memoryview(b"")


class Region:
    """One guest memory region: where it is in the VMM, the memory file and the page states."""

    __slots__ = ("base", "end", "index", "mem", "npages", "offset", "page_size", "retired", "shift", "start",
                 "state")

    def __init__(self, spec: RegionSpec, state: memoryview, base: int, mem: memoryview | None = None) -> None:
        self.start = spec.start
        self.end = spec.end
        self.offset = spec.offset
        """Where the region's first page is in the memory file and in the page source."""
        self.page_size = spec.page_size
        self.shift = spec.page_size.bit_length() - 1
        self.npages = spec.pages
        self.state = state
        """This region's slice of the session's page states, one byte per page."""
        self.base = base
        """Global index of this region's first page (its position in the page states)."""
        self.mem = mem if mem is not None else _no_mem()
        """This region's slice of the second mapping (empty for anonymous memory)."""
        self.index = 0
        """Position in :attr:`RegionMap.regions` (renumbered when regions split)."""
        self.retired = False
        """Replaced by its pieces after a partial mremap; work in flight is relocated by index."""

    def addr(self, idx: int) -> int:
        """The VMM's address of page ``idx``."""
        return self.start + (idx << self.shift)

    def file_offset(self, idx: int) -> int:
        """Offset of page ``idx`` in the memory file and the page source."""
        return self.offset + (idx << self.shift)

    def spec(self) -> RegionSpec:
        return RegionSpec(self.start, self.npages << self.shift, self.offset, self.page_size)

    def __repr__(self) -> str:
        return f"Region({self.start:#x}+{self.npages}x{self.page_size}, offset={self.offset:#x}, base={self.base})"


Run = tuple[Region, int, int]
"""(region, first page, pages): a run of consecutive pages of one region."""


class RegionMap:
    """The session's regions, kept sorted by address for lookups."""

    def __init__(self, specs: tuple[RegionSpec, ...] | list[RegionSpec], states: memoryview,
                 mems: list[memoryview] | None = None) -> None:
        self.regions: list[Region] = []
        base = 0
        for i, spec in enumerate(specs):
            mem = mems[i] if mems is not None else None
            self.regions.append(Region(spec, states[base : base + spec.pages], base, mem))
            base += spec.pages
        if base > len(states):
            raise ValueError(f"regions hold {base} pages, the page states {len(states)}")
        self.pages = base
        self._retired: list[Region] = []
        self._reindex()

    def __iter__(self) -> Iterator[Region]:
        return iter(self.regions)

    def __len__(self) -> int:
        return len(self.regions)

    def _reindex(self) -> None:
        for i, r in enumerate(self.regions):
            r.index = i
        self._by_addr = sorted(self.regions, key=lambda r: r.start)
        self._starts = [r.start for r in self._by_addr]
        self._last = self._by_addr[0]

    # --- lookups -------------------------------------------------------------------------
    def find(self, addr: int) -> Region | None:
        """The region holding ``addr``, or None (the last hit is tried first: faults cluster)."""
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

    def by_offset(self) -> list[Region]:
        return sorted(self.regions, key=lambda r: r.offset)

    def at(self, gidx: int) -> tuple[Region, int] | None:
        """The live region and page index holding global page ``gidx``."""
        for r in self.regions:
            if r.base <= gidx < r.base + r.npages:
                return r, gidx - r.base
        return None

    def relocate(self, region: Region, lo: int, n: int) -> list[Run]:
        """Pages [lo, lo+n) of a retired region, as runs of the live regions that hold them now."""
        return self.global_runs(region.base + lo, n)

    def global_runs(self, g: int, n: int) -> list[Run]:
        """Global pages [g, g+n), as runs of the live regions that hold them now."""
        out: list[Run] = []
        g0, g1 = g, g + n
        for r in self.regions:
            a, b = max(g0, r.base), min(g1, r.base + r.npages)
            if a < b:
                out.append((r, a - r.base, b - a))
        return out

    def layout(self) -> tuple[RegionSpec, ...]:
        """The regions as they are now, in page-state order: what a successor must be told."""
        return tuple(r.spec() for r in sorted(self.regions, key=lambda r: r.base))

    def table(self) -> list[tuple[int, int, int, int, int]]:
        """(start, end, shift, base, offset) per region, in :attr:`regions` order (for the C path)."""
        return [(r.start, r.end, r.shift, r.base, r.offset) for r in self.regions]

    # --- changes the guest makes -----------------------------------------------------------
    def overlapping(self, start: int, end: int) -> list[Run]:
        """The pages of [start, end) (addresses), as runs per region; partial pages count whole."""
        out: list[Run] = []
        for r in self.regions:
            lo_addr, hi_addr = max(start, r.start), min(end, r.end)
            if lo_addr < hi_addr:
                i0 = (lo_addr - r.start) >> r.shift
                i1 = (hi_addr - r.start + r.page_size - 1) >> r.shift
                out.append((r, i0, i1 - i0))
        return out

    def move(self, frm: int, to: int, length: int) -> bool:
        """mremap moved [frm, frm+length) to ``to``: regions follow, split where only part of
        one moved. Returns whether any region changed."""
        end = frm + length
        changed = False
        for r in list(self.regions):
            if r.end <= frm or r.start >= end:
                continue
            parts = [r]
            cut_lo = max(frm, r.start) - r.start
            cut_hi = min(end, r.end) - r.start
            if cut_lo > 0 or cut_hi < r.end - r.start:
                parts = self.split(r, [c >> r.shift for c in (cut_lo, cut_hi) if 0 < c < r.end - r.start])
            for p in parts:
                if frm <= p.start and p.end <= end:
                    p.start += to - frm
                    p.end += to - frm
            changed = True
        if changed:
            self._reindex()
        return changed

    def split(self, r: Region, cuts: list[int]) -> list[Region]:
        """Replace ``r`` by pieces cut at the given page indices; ``r`` is retired."""
        bounds = [0, *sorted(set(cuts)), r.npages]
        pieces = []
        for a, b in itertools.pairwise(bounds):
            spec = RegionSpec(r.start + (a << r.shift), (b - a) << r.shift, r.offset + (a << r.shift), r.page_size)
            mem = r.mem[a << r.shift : b << r.shift] if len(r.mem) else None
            pieces.append(Region(spec, r.state[a:b], r.base + a, mem))
        r.retired = True
        self._retired.append(r)
        i = self.regions.index(r)
        self.regions[i : i + 1] = pieces
        self._reindex()
        return pieces

    def release(self) -> None:
        """Release every view the regions hold (before the page states and mappings close)."""
        for r in self.regions + self._retired:
            r.state.release()
            r.mem.release()


__all__ = ["Region", "RegionMap", "Run"]
