"""Copies into guest memory whose file shrank: an error for that copy, never a SIGBUS that kills
the process (uffdd.kernel.memory.copy_into / fill_zeros; C guard and pipe fallback alike)."""

from __future__ import annotations

import mmap
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from uffdd.kernel import memory
from uffdd.kernel.memory import MFD_HUGETLB, copy_into, fill_zeros

HUGE = 2 << 20

COPIES: dict[str, Callable[[memoryview, memoryview], None]] = {
    "c-guard": copy_into, "pipe": memory._pipe_copy, "zeros": lambda dest, src: fill_zeros(dest)}


@pytest.fixture(params=["shmem", "hugetlbfs"])
def shrinking(request: pytest.FixtureRequest, hugepages: Any) -> Iterator[tuple[int, memoryview, int]]:
    """A mapped memory file of two pages, and its page size."""
    huge = request.param == "hugetlbfs"
    if huge:
        hugepages(2)
    ps = HUGE if huge else mmap.PAGESIZE
    fd = os.memfd_create("uffdd-guest", os.MFD_CLOEXEC | (MFD_HUGETLB if huge else 0))
    os.ftruncate(fd, 2 * ps)
    mm = mmap.mmap(fd, 2 * ps, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    view = memoryview(mm)
    yield fd, view, ps
    view.release()
    mm.close()
    os.close(fd)


@pytest.mark.parametrize("how", sorted(COPIES))
def test_a_copy_into_memory_the_vmm_truncated_fails_with_efault_and_the_process_lives(
        shrinking: tuple[int, memoryview, int], how: str) -> None:
    fd, view, ps = shrinking
    src = memoryview(bytes([7]) * ps)
    with view[:ps] as first, view[ps:] as second:
        COPIES[how](first, src)  # still there
        os.ftruncate(fd, ps)  # the VMM shrinks its memory file under our mapping
        errno = 0
        try:
            COPIES[how](second, src)
        except OSError as exc:
            errno = exc.errno or 0
        assert errno == 14  # EFAULT
        COPIES[how](first, src)  # what is still there can still be written
        assert bytes(first[:8]) == (bytes(8) if how == "zeros" else bytes([7]) * 8)


def test_a_sigbus_outside_a_guarded_copy_still_ends_the_process() -> None:
    """The guard only catches its own copies: any other SIGBUS keeps its meaning."""
    code = ("import mmap, os\n"
            "from uffdd.kernel.memory import copy_into\n"
            "fd = os.memfd_create('x'); os.ftruncate(fd, 8192)\n"
            "m = mmap.mmap(fd, 8192); v = memoryview(m)\n"
            "os.ftruncate(fd, 0)\n"
            "try:\n    copy_into(v[:4096], bytes(4096))\nexcept OSError:\n    print('guarded', flush=True)\n"
            "v[0] = 1\n"
            "print('survived', flush=True)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout == "guarded\n"
    assert proc.returncode == -signal.SIGBUS
