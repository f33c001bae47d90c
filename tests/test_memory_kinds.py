"""Every kind of guest memory a VMM hands over: anonymous memory through Firecracker's exact
handshake, balloon (REMOVE) and munmap/mremap events, and poisoned pages."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import FAULT_PATHS, HUGE, core_session, make_config, running_daemon
from tests.test_session import assert_all_correct
from uffdd.testing import make_snapshot

MIB = 1 << 20
NO_PREFETCH = {"fault_around": 0, "prefetch": {"enabled": False}}
# Shared memory on both single-page fault paths (C and Python), and anonymous memory.
MEMORY = [*(f"shmem-{p}" for p in FAULT_PATHS), "anon"]


def memory_session(memory: str) -> dict[str, object]:
    return core_session(memory.removeprefix("shmem-")) if memory.startswith("shmem-") else NO_PREFETCH


@pytest.fixture(scope="module")
def snapshot_256m(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("snap256") / "guest.mem"
    make_snapshot(path, 256 * MIB, seed=31, page_size=HUGE)
    return path


@pytest.mark.parametrize("page_size", [4096, HUGE], ids=["4k", "2m"])
async def test_firecracker_handshake_restores_a_256m_anonymous_guest_byte_for_byte(
        tmp_path: Path, snapshot_256m: Path, hugepages: Any, page_size: int) -> None:
    if page_size == HUGE:
        hugepages(128)
    cfg = make_config(tmp_path, snapshot_256m, session={"fault_around": 0, "prefetch": {"enabled": True}})
    async with running_daemon(cfg, snapshot_256m) as d:
        # Firecracker: private anonymous memory, uffd API+REGISTER(MISSING) done by the VMM, one fd,
        # a compact JSON list with page_size and page_size_kib, offsets cumulative in the snapshot.
        res = await d.run_vmm(region_sizes=[192 * MIB, 64 * MIB], page_size=page_size, anonymous=True,
                              firecracker=True, preregister=True, threads=4, timeout=120)
        assert_all_correct(res)
        assert res["pages"] == 256 * MIB // page_size


@pytest.mark.parametrize("preregister", [False, True], ids=["bare", "vmm-registered"])
async def test_anonymous_guest_with_fault_around_and_zero_pages(
        tmp_path: Path, snapshot_4k: Path, preregister: bool) -> None:
    cfg = make_config(tmp_path, snapshot_4k, session={"fault_around": 65536, "prefetch": {"enabled": False}})
    async with running_daemon(cfg, snapshot_4k) as d:
        res = await d.run_vmm(region_sizes=[8 * MIB, 4 * MIB], anonymous=True, preregister=preregister)
        assert_all_correct(res)
        await d.wait_idle()
        assert d.listener.ended_totals.pages_fault_around > 0


async def test_balloon_dontneed_then_faults_read_zeros_without_a_source_fetch(
        tmp_path: Path, snapshot_4k: Path) -> None:
    cfg = make_config(tmp_path, snapshot_4k, session=NO_PREFETCH)
    async with running_daemon(cfg, snapshot_4k) as d:
        # Touch half the pages, discard 256 (a balloon inflating, before the migration is
        # complete), then read every page: the discarded ones must read zeros.
        res = await d.run_vmm(region_sizes=[8 * MIB], anonymous=True, touch_fraction=0.5, dontneed=[[512, 256]])
        assert_all_correct(res)
        assert res["zero_pages"] == 256
        await d.wait_idle()
        t = d.listener.ended_totals
        assert t.pages_removed == 256 and t.pages_zeroed == 256
        # The discarded pages never touched before were never fetched from the source.
        assert t.fills_inline + t.fills_async < 2048
        assert t.pages_filled == 2048


@pytest.mark.parametrize("fault_path", FAULT_PATHS)
async def test_dontneed_on_shared_memory_keeps_faulted_bytes_and_never_fetches_the_rest(
        tmp_path: Path, snapshot_4k: Path, fault_path: str) -> None:
    cfg = make_config(tmp_path, snapshot_4k, session=core_session(fault_path))
    async with running_daemon(cfg, snapshot_4k) as d:
        # MADV_DONTNEED on shared memory drops mappings, not contents: pages the guest had keep
        # the snapshot's bytes; pages it never touched read zeros, not bytes it never asked for.
        res = await d.run_vmm(region_sizes=[4 * MIB], touch_fraction=0.5, dontneed=[[100, 50]])
        assert_all_correct(res)
        assert 0 < res["zero_pages"] < 50
        await d.wait_idle()
        assert d.listener.ended_totals.pages_removed == 50


async def test_remove_burst_interleaved_with_faults_finishes_with_bounded_cpu(
        tmp_path: Path, snapshot_4k: Path) -> None:
    cfg = make_config(tmp_path, snapshot_4k, session=NO_PREFETCH)
    async with running_daemon(cfg, snapshot_4k) as d:
        cpu0, wall0 = time.process_time(), time.monotonic()
        res = await d.run_vmm(region_sizes=[16 * MIB], anonymous=True, threads=4, remove_burst=1500, timeout=60)
        cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
        assert_all_correct(res)  # discarded pages read zeros, every other page the snapshot's bytes
        assert res["zero_pages"] == 1500
        await d.wait_idle()
        t = d.listener.ended_totals
        assert t.events >= 1500
        # No busy retry loop: the daemon's CPU time stays well below the run's wall time.
        assert cpu < 0.8 * wall + 0.5, (cpu, wall, t.retries)


@pytest.mark.parametrize("memory", MEMORY)
async def test_munmap_of_part_of_guest_memory_while_other_threads_fault(
        tmp_path: Path, snapshot_4k: Path, memory: str) -> None:
    anonymous = memory == "anon"
    cfg = make_config(tmp_path, snapshot_4k, session=memory_session(memory))
    async with running_daemon(cfg, snapshot_4k) as d:
        res = await d.run_vmm(region_sizes=[8 * MIB, 4 * MIB], anonymous=anonymous, unmap_pages=[256, 512],
                              threads=4)
        assert_all_correct(res)
        assert res["unmapped"] == 512
        await d.wait_idle()
        assert d.listener.ended_totals.pages_filled == 3072  # every page in place or unmapped


@pytest.mark.parametrize("memory", MEMORY)
async def test_mremap_moves_the_session_view_of_a_region(
        tmp_path: Path, snapshot_4k: Path, memory: str) -> None:
    anonymous = memory == "anon"
    cfg = make_config(tmp_path, snapshot_4k, session=memory_session(memory))
    async with running_daemon(cfg, snapshot_4k) as d:
        res = await d.run_vmm(region_sizes=[4 * MIB, 4 * MIB], anonymous=anonymous, remap_region=1, threads=3)
        assert_all_correct(res)
        await d.wait_idle()
        assert d.listener.ended_totals.events >= 1


@pytest.mark.parametrize("anonymous", [False, True], ids=["shmem", "anon"])
async def test_poisoned_page_raises_sigbus_in_the_guest_and_its_neighbours_are_fine(
        tmp_path: Path, snapshot_4k: Path, anonymous: bool) -> None:
    snap = tmp_path / "poisoned.mem"
    snap.write_bytes(snapshot_4k.read_bytes()[: 4 * MIB])
    (tmp_path / "poisoned.mem.poison").write_text("# memory error seen on the source host\n0x65000\n")
    cfg = make_config(tmp_path, snap, session={"fault_around": 65536, "prefetch": {"enabled": True}})
    async with running_daemon(cfg, snap) as d:
        res = await d.run_vmm(region_sizes=[4 * MIB], anonymous=anonymous, final_touch=0x65, threads=2)
        # Every other page (neighbours included) matched the snapshot; touching the poisoned one
        # last killed the guest with SIGBUS rather than handing it garbage.
        assert res["wrong_pages"] == 0 and res["pages_checked"] == 1023
        assert res["returncode"] == -signal.SIGBUS
        await d.wait_idle()
        assert d.listener.ended_totals.pages_poisoned == 1


def test_partial_mremap_splits_the_region_and_reports_the_layout_a_successor_needs() -> None:
    import os

    from uffdd.core import Session
    from uffdd.handshake import Handshake, RegionSpec
    from uffdd.kernel import Userfaultfd
    from uffdd.sources.base import PageSource

    class NoSource(PageSource):
        @classmethod
        async def open(cls, config: Any, *, vm_id: str) -> NoSource:
            return cls()

        @property
        def size(self) -> None:
            return None

        async def fill(self, offset: int, dest: memoryview) -> None:
            raise AssertionError("not fetched")

    memfd = os.memfd_create("uffdd-guest", os.MFD_CLOEXEC)
    os.ftruncate(memfd, 4 * MIB)
    base = 0x7F0000000000
    hs = Handshake("vm", "default", (RegionSpec(base, 4 * MIB, 0, 4096),))
    with Userfaultfd.open() as uffd:
        s = Session(session_id="s1", handshake=hs, uffd=uffd, memfd=memfd, source=NoSource())
        seen: list[Handshake] = []
        s.on_regions_changed = lambda sess: seen.append(sess.current_handshake())
        # The middle MiB moves elsewhere: three pieces, in page-state order, the middle one moved.
        s.events.move(base + MIB, 0x7F1000000000, MIB)
        assert seen == [Handshake("vm", "default", (
            RegionSpec(base, MIB, 0, 4096), RegionSpec(0x7F1000000000, MIB, MIB, 4096),
            RegionSpec(base + 2 * MIB, 2 * MIB, 2 * MIB, 4096)))]
        assert s.guest.regions.find(0x7F1000000000 + 4096) is not None and s.guest.regions.find(base + MIB) is None
