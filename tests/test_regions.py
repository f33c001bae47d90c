"""The region map on its own: lookups, mremap moves and splits, relocation, discards (no kernel)."""

from __future__ import annotations

import pytest

from uffdd.core.regions import RegionMap
from uffdd.handshake import RegionSpec

PAGE = 4096
A = 0x7F0000000000
B = 0x7F8000000000


def make(*specs: RegionSpec) -> tuple[RegionMap, bytearray]:
    states = bytearray(sum(s.pages for s in specs))
    return RegionMap(specs, memoryview(states)), states


def test_find_returns_the_region_holding_an_address_and_none_between_regions() -> None:
    rm, _ = make(RegionSpec(B, 8 * PAGE, 0, PAGE), RegionSpec(A, 4 * PAGE, 8 * PAGE, PAGE))
    assert rm.find(A) is rm.regions[1]
    assert rm.find(A + 4 * PAGE - 1) is rm.regions[1]
    assert rm.find(A + 4 * PAGE) is None
    assert rm.find(B + 7 * PAGE) is rm.regions[0]
    assert rm.find(A - 1) is None and rm.find(B + 8 * PAGE) is None


def test_each_region_owns_its_slice_of_the_page_states() -> None:
    rm, states = make(RegionSpec(A, 4 * PAGE, 0, PAGE), RegionSpec(B, 2 * PAGE, 4 * PAGE, PAGE))
    rm.regions[1].state[1] = 3
    assert states[5] == 3
    assert [(r.base, r.npages) for r in rm] == [(0, 4), (4, 2)]
    assert rm.at(5) == (rm.regions[1], 1)


def test_page_states_too_small_for_the_regions_are_refused() -> None:
    with pytest.raises(ValueError, match="page states"):
        RegionMap((RegionSpec(A, 4 * PAGE, 0, PAGE),), memoryview(bytearray(3)))


def test_moving_a_whole_region_changes_its_addresses_not_its_pages() -> None:
    rm, _ = make(RegionSpec(A, 4 * PAGE, 0, PAGE))
    assert rm.move(A, B, 4 * PAGE)
    (r,) = rm.regions
    assert (r.start, r.offset, r.base, r.retired) == (B, 0, 0, False)
    assert rm.find(A) is None and rm.find(B + PAGE) is r


def test_moving_part_of_a_region_splits_it_in_page_state_order() -> None:
    rm, states = make(RegionSpec(A, 8 * PAGE, 0, PAGE))
    old = rm.regions[0]
    assert rm.move(A + 2 * PAGE, B, 3 * PAGE)
    assert old.retired
    assert rm.layout() == (RegionSpec(A, 2 * PAGE, 0, PAGE), RegionSpec(B, 3 * PAGE, 2 * PAGE, PAGE),
                           RegionSpec(A + 5 * PAGE, 3 * PAGE, 5 * PAGE, PAGE))
    moved = rm.find(B)
    assert moved is not None and moved.base == 2
    moved.state[0] = 4
    assert states[2] == 4  # a piece still writes the same page-state bytes


def test_a_move_that_touches_no_region_changes_nothing() -> None:
    rm, _ = make(RegionSpec(A, 4 * PAGE, 0, PAGE))
    assert not rm.move(B, A + (1 << 30), PAGE)
    assert rm.layout() == (RegionSpec(A, 4 * PAGE, 0, PAGE),)


def test_work_in_flight_on_a_retired_region_is_relocated_to_its_pieces() -> None:
    rm, _ = make(RegionSpec(A, 8 * PAGE, 0, PAGE))
    old = rm.regions[0]
    rm.move(A + 4 * PAGE, B, 2 * PAGE)
    runs = rm.relocate(old, 3, 4)  # pages 3..6: across all three pieces
    assert [(r.start, lo, n) for r, lo, n in runs] == [(A, 3, 1), (B, 0, 2), (A + 6 * PAGE, 0, 1)]


def test_overlapping_counts_a_partly_covered_page_whole() -> None:
    rm, _ = make(RegionSpec(A, 4 * PAGE, 0, PAGE), RegionSpec(B, 4 * PAGE, 4 * PAGE, PAGE))
    runs = rm.overlapping(A + PAGE + 100, A + 2 * PAGE + 1)
    assert [(r.start, lo, n) for r, lo, n in runs] == [(A, 1, 2)]
    assert rm.overlapping(A + 4 * PAGE, B) == []


def test_huge_page_regions_count_pages_of_their_own_size() -> None:
    huge = 2 << 20
    rm, _ = make(RegionSpec(A, 4 * huge, 0, huge))
    (r,) = rm.regions
    assert (r.npages, r.shift, r.addr(3), r.file_offset(2)) == (4, 21, A + 3 * huge, 2 * huge)
