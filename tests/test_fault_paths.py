"""The fault paths, driven message by message against real kernel state.

Each case builds guests in this process (a memfd mapped MAP_SHARED and registered with its own
userfaultfd, as a VMM would) and feeds their sessions synthetic fault messages. No thread ever
touches the registered mappings, so nothing here faults while holding the GIL: the sessions'
ioctls act on real kernel state, and the tests compare page states, counters, the pages the
kernel mapped, and the bytes in each guest's memory file.

- The C path against the Python one: the same fault sequences, the same outcome.
- Per-thread blocked time adds up to the total whichever branch served the fault (a page left
  INSTALLING, an install the kernel refused for now because an event was unread).
"""

from __future__ import annotations

import asyncio
import ctypes
import mmap
import os
import random
import select
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from uffdd.config import PrefetchConfig, SessionConfig
from uffdd.core import EMPTY, FILLED, FILLING, INSTALLING, REMOVED, Session
from uffdd.core.guest import PREFETCH
from uffdd.core.native import STATUS, native_available
from uffdd.core.stats import LAT_BUCKETS
from uffdd.handshake import Handshake, RegionSpec
from uffdd.kernel import abi
from uffdd.sources.file import FileSource, FileSourceConfig
from uffdd.testing.waiting import eventually

PAGE = 4096
REGION_PAGES = [256, 128]
COUNTERS = ("fault_msgs", "minor_faults", "fills_inline", "fills_async", "pages_filled", "pages_demand",
            "pages_fault_around", "bytes_filled", "already_mapped", "coalesced", "pages_zeroed", "kernel_errors",
            "retries", "stolen")


@dataclass
class FakeGuest:
    """A guest whose 'VMM' is this process: its memory is mapped here and never touched."""

    session: Session
    memfd: int
    maps: list[mmap.mmap]
    bases: list[int]

    def present(self) -> list[bool]:
        """Which pages the kernel has mapped in the registered mappings (pagemap, no access)."""
        out = []
        with open("/proc/self/pagemap", "rb") as pm:
            for m, base in zip(self.maps, self.bases, strict=True):
                for i in range(len(m) // PAGE):
                    pm.seek(((base + i * PAGE) // PAGE) * 8)
                    out.append(bool(int.from_bytes(pm.read(8), "little") >> 63))
        return out


def _msg(flags: int, addr: int, tid: int) -> bytes:
    return abi.MSG_STRUCT.pack(abi.EVENT_PAGEFAULT, flags, addr, tid)


async def _guest(snap: Path, native: bool, fault_around: int) -> FakeGuest:
    size = sum(REGION_PAGES) * PAGE
    memfd = os.memfd_create("uffdd-guest", os.MFD_CLOEXEC)
    os.ftruncate(memfd, size)
    maps, regions, off = [], [], 0
    for n in REGION_PAGES:
        m = mmap.mmap(memfd, n * PAGE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=off)
        maps.append(m)
        regions.append(RegionSpec(ctypes.addressof(ctypes.c_char.from_buffer(m)), n * PAGE, off, PAGE))
        off += n * PAGE
    from uffdd.kernel import Userfaultfd

    uffd = Userfaultfd.open()
    source = await FileSource.open(FileSourceConfig(path=str(snap)), vm_id="diff")
    cfg = SessionConfig(fault_around=fault_around, prefetch=PrefetchConfig(enabled=False), native=native)
    session = Session.create(session_id="s1", handshake=Handshake("diff", "default", tuple(regions)),
                             uffd_fd=os.dup(uffd.fileno()), memfd=os.dup(memfd), source=source, config=cfg)
    uffd.close()
    return FakeGuest(session, memfd, maps, [r.start for r in regions])


@pytest.fixture
async def make_pair(snapshot_4k: Path) -> AsyncIterator[object]:
    made: list[FakeGuest] = []

    async def pair(fault_around: int) -> tuple[FakeGuest, FakeGuest]:
        c, py = await _guest(snapshot_4k, True, fault_around), await _guest(snapshot_4k, False, fault_around)
        made.extend((c, py))
        return c, py

    yield pair
    for g in made:
        await g.session.close()
        for m in g.maps:
            m.close()
        os.close(g.memfd)


def _prepare(g: FakeGuest, snap: Path, removed: list[int], installing: list[int]) -> None:
    """The same starting point in both guests: some pages discarded, some complete in the page
    cache (as a daemon that died between fill and CONTINUE leaves them)."""
    states = g.session.states.view
    with open(snap, "rb") as fh:
        for p in installing:
            os.pwrite(g.memfd, os.pread(fh.fileno(), PAGE, p * PAGE), p * PAGE)
            states[p] = INSTALLING
    for p in removed:
        states[p] = REMOVED


def _feed(g: FakeGuest, msgs: bytes, t0: int) -> None:
    """Hand one batch to the session's fault path, as its reader callback would."""
    faults = g.session.faults
    view = memoryview(bytearray(msgs))
    count = len(msgs) // abi.MSG_SIZE
    if g.session.native is None:
        faults.dispatch(view, count, t0)
        return
    i = g.session.native.serve(view, 0, count, t0)
    faults.dispatch_native(g.session.native, view, i, count, t0)
    g.session.native.fold()


Fault = tuple[int, int, int]
"""(page of the guest, fault flags, thread id)."""


def _sequence(rng: random.Random, pages: int, removed: list[int]) -> list[list[Fault]]:
    """Batches of faults: random pages (repeats included), minor or not, several threads. A
    discarded page that is not in the page cache can only fault as MISSING."""
    batches = []
    for _ in range(rng.randrange(3, 9)):
        batch = []
        for _ in range(rng.randrange(1, 64)):
            p = rng.randrange(pages)
            flags = rng.choice((0, abi.PAGEFAULT_FLAG_WRITE) if p in removed else
                               (0, abi.PAGEFAULT_FLAG_WRITE, abi.PAGEFAULT_FLAG_MINOR))
            batch.append((p, flags, rng.choice((101, 102, 103))))
        batches.append(batch)
    return batches


def _encode(g: FakeGuest, batch: list[Fault]) -> bytes:
    regions = g.session.guest.regions.regions
    out = b""
    for p, flags, tid in batch:
        r = regions[0] if p < REGION_PAGES[0] else regions[1]
        out += _msg(flags, r.addr(p - r.base), tid)
    return out


@pytest.mark.skipif(not native_available(), reason=f"the C fault path is {STATUS}")
@pytest.mark.parametrize("fault_around", [0, 16 * PAGE], ids=["one-page", "fault-around-64k"])
@pytest.mark.parametrize("seed", range(8))
async def test_c_and_python_paths_leave_the_same_states_counters_and_guest_bytes(
        make_pair: object, snapshot_4k: Path, fault_around: int, seed: int) -> None:
    rng = random.Random(seed)
    c, py = await make_pair(fault_around)  # type: ignore[operator]
    total = sum(REGION_PAGES)
    removed = rng.sample(range(total), 12)
    installing = rng.sample([p for p in range(total) if p not in removed], 12)
    for g in (c, py):
        _prepare(g, snapshot_4k, removed, installing)
        g.session.start()
    assert c.session.fault_path == "c" and py.session.fault_path == "python"
    t0 = time.perf_counter_ns()
    for batch in _sequence(rng, total, removed):
        for g in (c, py):
            _feed(g, _encode(g, batch), t0)  # the same pages, at each guest's own addresses

    sc, sp = c.session.stats, py.session.stats
    assert bytes(c.session.states.view[:total]) == bytes(py.session.states.view[:total])
    assert {k: getattr(sc, k) for k in COUNTERS} == {k: getattr(sp, k) for k in COUNTERS}
    assert sc.fault_msgs > 0 and sc.pages_filled > 0
    # The same waits were booked (their durations differ), and per thread they add up.
    assert sum(sc.latency_log2_us) == sum(sp.latency_log2_us) > 0
    assert set(sc.blocked_ns_by_tid) == set(sp.blocked_ns_by_tid)
    for s in (sc, sp):
        assert sum(s.blocked_ns_by_tid.values()) == s.blocked_ns
    # What the kernel mapped, and what each guest's memory holds.
    assert c.present() == py.present()
    states = bytes(c.session.states.view[:total])
    snap = snapshot_4k.read_bytes()
    for g in (c, py):
        for p, st in enumerate(states):
            got = os.pread(g.memfd, PAGE, p * PAGE)
            if st == FILLED and p not in removed:
                assert got == snap[p * PAGE : (p + 1) * PAGE], (g.session.fault_path, p)
            elif st == EMPTY:
                assert p not in installing


def test_c_and_python_agree_on_page_states_and_histogram_size() -> None:
    """Checked at import (a stale build is not used); here it must hold for the build tested."""
    from uffdd.core import _fastpath, pagestate

    assert (_fastpath.EMPTY, _fastpath.FILLING, _fastpath.INSTALLING, _fastpath.FILLED) == (
        pagestate.EMPTY, pagestate.FILLING, pagestate.INSTALLING, pagestate.FILLED)
    assert _fastpath.HIST_BUCKETS == LAT_BUCKETS
    assert native_available(), STATUS


_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
MADV_DONTNEED = 4


@pytest.mark.parametrize("fault_path", ["c", "python"])
async def test_blocked_time_per_thread_adds_up_through_installing_pages_and_retries(
        snapshot_4k: Path, fault_path: str) -> None:
    g = await _guest(snapshot_4k, fault_path == "c", 16 * PAGE)
    try:
        session = g.session
        installing = [40, 41, 300]
        _prepare(g, snapshot_4k, [], installing)
        session.start()
        assert session.fault_path == fault_path
        # A "balloon" thread discards page 200: the kernel queues a REMOVE event and blocks the
        # thread until the daemon reads it; until then every install fails with EAGAIN.
        balloon = threading.Thread(target=_libc.madvise, args=(g.bases[0] + 200 * PAGE, PAGE, MADV_DONTNEED))
        balloon.start()
        ready, _, _ = select.select([session.guest.uffd.fileno()], [], [], 10)
        assert ready, "the REMOVE event was not queued"
        faults = [(3, 0, 7), (40, abi.PAGEFAULT_FLAG_MINOR, 8), (300, abi.PAGEFAULT_FLAG_MINOR, 9), (150, 0, 7)]
        _feed(g, _encode(g, faults), time.perf_counter_ns())
        stats = session.stats
        assert stats.retries >= 3  # every install was refused for now: the event is unread
        # The retry reads the event first (the balloon thread goes on), then installs.
        await eventually(lambda: all(session.states.view[p] == FILLED for p, _, _ in faults),
                         what="every faulted page installed after the retry")
        await asyncio.to_thread(balloon.join, 10)
        assert stats.events == 1 and stats.pages_removed == 1
        assert set(stats.blocked_ns_by_tid) == {7, 8, 9}
        assert sum(stats.blocked_ns_by_tid.values()) == stats.blocked_ns > 0
        assert sum(stats.latency_log2_us) == len(faults)
    finally:
        await g.session.close()
        for m in g.maps:
            m.close()
        os.close(g.memfd)


@pytest.mark.parametrize("fault_path", ["c", "python"])
async def test_vcpus_that_fault_on_a_page_already_on_its_way_have_their_waits_booked(
        snapshot_4k: Path, fault_path: str) -> None:
    """A fault on a page background work has claimed waits for that work: the wait is the
    session's to count (blocked time, per thread, histogram) when the page is installed, or
    when the work gives the page back and the vCPU is woken to fault again."""
    g = await _guest(snapshot_4k, fault_path == "c", 0)
    try:
        session = g.session
        guest = session.guest
        states = session.states.view
        _prepare(g, snapshot_4k, [], [])
        session.start()
        assert session.fault_path == fault_path
        for p in (*range(48, 64), 100):
            states[p] = FILLING  # claimed by pre-paging, bytes on their way
        _feed(g, _encode(g, [(50, 0, 7), (50, 0, 8), (60, 0, 9), (100, 0, 5)]), time.perf_counter_ns())
        stats = session.stats
        assert stats.coalesced == 4 and stats.blocked_ns == 0 and sum(stats.latency_log2_us) == 0
        with open(snapshot_4k, "rb") as fh:  # the background copy arrives and is installed
            os.pwrite(g.memfd, os.pread(fh.fileno(), 16 * PAGE, 48 * PAGE), 48 * PAGE)
        region = guest.regions.regions[0]
        guest.install_run(region, 48, 16, PREFETCH)
        assert set(stats.blocked_ns_by_tid) == {7, 8, 9}
        assert sum(stats.latency_log2_us) == 3
        guest.release_claims([(region, 100, 1)])  # the work failed: page 100 goes back to EMPTY
        assert states[100] == EMPTY
        assert set(stats.blocked_ns_by_tid) == {5, 7, 8, 9}
        assert sum(stats.latency_log2_us) == 4
        assert sum(stats.blocked_ns_by_tid.values()) == stats.blocked_ns > 0
        assert guest.waiting == {}
    finally:
        await g.session.close()
        for m in g.maps:
            m.close()
        os.close(g.memfd)
