"""The local copier in C (uffdd/core/_copier.c) against a real snapshot file and a real memory
file: it writes the pages it froze and nowhere else, a page a demand fault took is never
written, each step is reported once written, and a memory file that shrank or a snapshot too
short ends the run loudly instead of writing past them."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from uffdd.core import _copier  # noqa: F401 - ./scripts/test builds it; its absence is a failure here
from uffdd.core.copier import STEP_BYTES, LocalCopier
from uffdd.errors import GuestMemoryGone, SourceError

PAGE = 4096
PAGES = 1024  # 4 MiB: 16 steps of 256 KiB
STEP = STEP_BYTES // PAGE
FREE, TAKEN, FROZEN = 0, 1, 2


@dataclass
class Rig:
    snapshot: bytes
    src_fd: int
    memfd: int

    def page(self, p: int) -> bytes:
        return os.pread(self.memfd, PAGE, p * PAGE)

    def want(self, p: int) -> bytes:
        return self.snapshot[p * PAGE : (p + 1) * PAGE]


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    snapshot = os.urandom(PAGES * PAGE)
    path = tmp_path / "snap.mem"
    path.write_bytes(snapshot)
    src_fd = os.open(path, os.O_RDONLY)
    memfd = os.memfd_create("guest")
    os.ftruncate(memfd, PAGES * PAGE)
    try:
        yield Rig(snapshot, src_fd, memfd)
    finally:
        os.close(src_fd)
        os.close(memfd)


@pytest.fixture
async def copier(rig: Rig) -> AsyncIterator[LocalCopier]:
    c = LocalCopier(rig.src_fd, rig.memfd, PAGES * PAGE, "test-copy")
    try:
        yield c
    finally:
        c.close()


async def test_a_run_is_written_step_by_step_and_pages_a_fault_took_are_never_written(
        rig: Rig, copier: LocalCopier) -> None:
    claims = memoryview(bytearray(PAGES))
    taken = [3, STEP + 7, PAGES - 1]
    for p in taken:
        assert copier.take(claims, p)  # demand faults got there first
    reported: list[tuple[int, int, bool]] = []
    dest = memoryview(bytearray(PAGES * PAGE))  # only its length matters: bytes go by pwrite
    await copier.fetch(0, dest, claims, lambda first, n, ok: reported.append((first, n, ok)))
    assert reported == [(s, STEP, True) for s in range(0, PAGES, STEP)]
    for p in range(PAGES):
        if p in taken:
            assert claims[p] == TAKEN and rig.page(p) == bytes(PAGE), p
        else:
            assert claims[p] == FROZEN and rig.page(p) == rig.want(p), p
    assert not copier.take(claims, 10)  # written and not yet installed: a fault waits for it


async def test_a_run_at_an_offset_lands_at_the_same_offset_of_the_memory_file(
        rig: Rig, copier: LocalCopier) -> None:
    claims = memoryview(bytearray(40))
    await copier.fetch(100 * PAGE, memoryview(bytearray(40 * PAGE)), claims, lambda *_: None)
    assert all(rig.page(p) == rig.want(p) for p in range(100, 140))
    assert rig.page(99) == rig.page(140) == bytes(PAGE)


async def test_a_memory_file_shrunk_by_the_vmm_ends_the_run_and_is_not_grown_back(
        rig: Rig, copier: LocalCopier) -> None:
    os.ftruncate(rig.memfd, 2 * STEP * PAGE)  # the VMM shrinks its memory file
    claims = memoryview(bytearray(PAGES))
    reported: list[tuple[int, int, bool]] = []
    with pytest.raises(GuestMemoryGone):
        await copier.fetch(0, memoryview(bytearray(PAGES * PAGE)), claims,
                           lambda first, n, ok: reported.append((first, n, ok)))
    assert os.fstat(rig.memfd).st_size == 2 * STEP * PAGE  # never grown back by a write
    assert all(first + n <= 2 * STEP for first, n, _ in reported)


async def test_a_run_past_the_end_of_the_snapshot_is_a_source_error_and_writes_nothing(
        rig: Rig, copier: LocalCopier) -> None:
    claims = memoryview(bytearray(16))
    with pytest.raises(SourceError):
        await copier.fetch((PAGES - 8) * PAGE, memoryview(bytearray(16 * PAGE)), claims, lambda *_: None)
    assert bytes(claims) == bytes(16)
    assert all(rig.page(p) == bytes(PAGE) for p in range(PAGES - 8, PAGES))


async def test_a_snapshot_truncated_under_the_copy_is_a_source_error_and_its_step_is_unfrozen(
        rig: Rig, copier: LocalCopier, tmp_path: Path) -> None:
    os.truncate(tmp_path / "snap.mem", 2 * STEP * PAGE)  # the file shrinks under its mapping
    claims = memoryview(bytearray(PAGES))
    reported: list[tuple[int, int, bool]] = []
    with pytest.raises(SourceError):
        await copier.fetch(0, memoryview(bytearray(PAGES * PAGE)), claims,
                           lambda first, n, ok: reported.append((first, n, ok)))
    assert reported == [(0, STEP, True), (STEP, STEP, True)]  # what was whole before the end
    assert bytes(claims[: 2 * STEP]) == bytes([FROZEN]) * (2 * STEP)
    assert bytes(claims[2 * STEP :]) == bytes(PAGES - 2 * STEP)  # the failed step is free again
