"""The kernel layer against the real kernel: opening, UFFDIO_API, REGISTER, CONTINUE, messages.

Rule for every test here: a page of a registered range that has not been mapped by
UFFDIO_CONTINUE is never touched by this process (it would wait for itself forever). Pages are
written through a second, unregistered mapping, and checked through /proc/self/pagemap.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import pytest

from uffdd.kernel import (
    AlreadyInitialized,
    FeatureUnsupported,
    GuestGone,
    KernelError,
    PageExists,
    RangeBusy,
    RangeInvalid,
    UffdMsg,
    Userfaultfd,
    abi,
)
from uffdd.kernel.memory import MFD_HUGETLB, SecondMapping, file_page_size, is_hugetlb
from uffdd.kernel.uffd import supported_features

PAGE = mmap.PAGESIZE
PAGES = 16
SIZE = PAGES * PAGE
HUGE = 2 << 20
MISSING_MINOR = abi.REGISTER_MODE_MISSING | abi.REGISTER_MODE_MINOR
CONTINUE_BIT = 1 << abi.IOCTL_BIT_CONTINUE
WAKE_BIT = 1 << abi.IOCTL_BIT_WAKE


def address_of(mm: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(mm))


@dataclass
class SharedMemory:
    """A memfd mapped MAP_SHARED, as a VMM maps guest memory."""

    fd: int
    mm: mmap.mmap
    addr: int
    size: int

    def page(self, i: int) -> int:
        return self.addr + i * PAGE


def map_memfd(size: int, flags: int = 0) -> SharedMemory:
    fd = os.memfd_create("uffdd-test", os.MFD_CLOEXEC | flags)
    os.ftruncate(fd, size)
    mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    return SharedMemory(fd=fd, mm=mm, addr=address_of(mm), size=size)


@pytest.fixture
def shared() -> Iterator[SharedMemory]:
    mem = map_memfd(SIZE)
    yield mem
    mem.mm.close()
    os.close(mem.fd)


@pytest.fixture
def uffds() -> Iterator[Callable[[], Userfaultfd]]:
    """Opens userfaultfds with MINOR_SHMEM enabled; all closed at the end of the test."""
    opened: list[Userfaultfd] = []

    def make() -> Userfaultfd:
        u = Userfaultfd.open()
        opened.append(u)
        u.api(abi.FEATURE_MINOR_SHMEM)
        return u

    yield make
    for u in opened:
        u.close()


@pytest.fixture
def uffd(uffds: Callable[[], Userfaultfd]) -> Userfaultfd:
    return uffds()


def pagemap_entry(addr: int) -> int:
    """This process's /proc/self/pagemap entry for ``addr``; reading it never faults the page."""
    with open("/proc/self/pagemap", "rb") as fh:
        fh.seek(addr // PAGE * 8)
        return int(struct.unpack("=Q", fh.read(8))[0])


def present(addr: int) -> bool:
    return bool(pagemap_entry(addr) >> 63 & 1)


def pfn(addr: int) -> int:
    return pagemap_entry(addr) & ((1 << 55) - 1)


# --- opening ------------------------------------------------------------------------------------


@pytest.mark.parametrize("via", ["syscall", "device", "auto"])
def test_open_gives_a_nonblocking_close_on_exec_userfaultfd(via: Literal["auto", "syscall", "device"]) -> None:
    with Userfaultfd.open(via=via) as u:
        fd = u.fileno()
        assert fd >= 0
        assert not u.closed
        assert os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[userfaultfd]"
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert not os.get_inheritable(fd)


@pytest.mark.parametrize("via", ["syscall", "device"])
def test_open_user_mode_only_gives_a_usable_userfaultfd(via: Literal["syscall", "device"]) -> None:
    with Userfaultfd.open(via=via, user_mode_only=True) as u:
        assert u.api(0).features & abi.FEATURE_MINOR_SHMEM


def test_wrapping_a_blocking_fd_makes_it_nonblocking() -> None:
    r, w = os.pipe()
    try:
        assert not fcntl.fcntl(r, fcntl.F_GETFL) & os.O_NONBLOCK
        u = Userfaultfd(r)
        assert fcntl.fcntl(r, fcntl.F_GETFL) & os.O_NONBLOCK
        assert u.fileno() == r
        u.close()
    finally:
        os.close(w)


def test_closing_twice_is_harmless_and_really_closes_the_fd() -> None:
    u = Userfaultfd.open()
    fd = u.fileno()
    u.close()
    assert u.closed
    with pytest.raises(OSError) as info:
        os.fstat(fd)
    assert info.value.errno == errno.EBADF
    u.close()
    assert u.closed


def test_context_manager_closes_the_fd() -> None:
    with Userfaultfd.open() as u:
        pass
    assert u.closed


# --- UFFDIO_API ---------------------------------------------------------------------------------


def test_is_initialized_is_false_before_api_and_true_after() -> None:
    with Userfaultfd.open() as u:
        assert not u.is_initialized()
        assert u.fdinfo_features() is None
        u.api(abi.FEATURE_MINOR_SHMEM | abi.FEATURE_THREAD_ID)
        assert u.is_initialized()
        feats = u.fdinfo_features()
        assert feats is not None
        assert feats & abi.FEATURE_MINOR_SHMEM
        assert feats & abi.FEATURE_THREAD_ID
        assert not feats & abi.FEATURE_MINOR_HUGETLBFS


def test_api_reports_every_supported_feature_while_fdinfo_shows_the_enabled_ones() -> None:
    with Userfaultfd.open() as u:
        info = u.api(abi.FEATURE_MINOR_SHMEM)
        assert info.features == supported_features()
        assert u.fdinfo_features() == abi.FEATURE_INITIALIZED | abi.FEATURE_MINOR_SHMEM
        assert info.ioctls & (1 << 0x3F)  # _UFFDIO_API
        assert info.ioctls & (1 << 0x00)  # _UFFDIO_REGISTER


def test_second_api_raises_already_initialized() -> None:
    with Userfaultfd.open() as u:
        u.api(0)
        with pytest.raises(AlreadyInitialized) as info:
            u.api(0)
        assert info.value.errno == errno.EINVAL
        assert info.value.op == "UFFDIO_API"
        assert isinstance(info.value, KernelError)


def test_api_with_an_unknown_feature_is_refused_and_leaves_the_fd_uninitialized() -> None:
    with Userfaultfd.open() as u:
        with pytest.raises(FeatureUnsupported) as info:
            u.api(1 << 40)
        assert info.value.errno == errno.EINVAL
        assert not u.is_initialized()
        u.api(abi.FEATURE_MINOR_SHMEM)
        assert u.is_initialized()


def test_supported_features_include_minor_shmem() -> None:
    feats = supported_features()
    assert feats & abi.FEATURE_MINOR_SHMEM
    assert feats & abi.FEATURE_MISSING_SHMEM
    assert "MINOR_SHMEM" in abi.feature_names(feats)
    assert supported_features() == feats


# --- REGISTER / UNREGISTER ------------------------------------------------------------------------


def test_register_missing_minor_on_shared_memfd_allows_continue(uffd: Userfaultfd, shared: SharedMemory) -> None:
    ioctls = uffd.register(shared.addr, shared.size, MISSING_MINOR)
    assert ioctls & CONTINUE_BIT
    assert ioctls & WAKE_BIT


def test_register_minor_on_private_anonymous_memory_raises_range_invalid(uffd: Userfaultfd) -> None:
    anon = mmap.mmap(-1, SIZE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, mmap.PROT_READ | mmap.PROT_WRITE)
    try:
        with pytest.raises(RangeInvalid) as info:
            uffd.register(address_of(anon), SIZE, abi.REGISTER_MODE_MINOR)
        assert info.value.errno == errno.EINVAL
        assert info.value.op == "UFFDIO_REGISTER"
    finally:
        anon.close()


def test_register_of_an_unaligned_range_raises_range_invalid(uffd: Userfaultfd, shared: SharedMemory) -> None:
    with pytest.raises(RangeInvalid):
        uffd.register(shared.addr + 512, PAGE, MISSING_MINOR)


def test_register_of_a_range_owned_by_another_uffd_raises_range_busy(
    uffds: Callable[[], Userfaultfd], shared: SharedMemory
) -> None:
    first, second = uffds(), uffds()
    first.register(shared.addr, shared.size, MISSING_MINOR)
    with pytest.raises(RangeBusy) as info:
        second.register(shared.page(4), 2 * PAGE, MISSING_MINOR)
    assert info.value.errno == errno.EBUSY


def test_registering_the_same_range_again_on_the_same_uffd_succeeds(uffd: Userfaultfd, shared: SharedMemory) -> None:
    first = uffd.register(shared.addr, shared.size, MISSING_MINOR)
    again = uffd.register(shared.addr, shared.size, MISSING_MINOR)
    assert again == first
    assert uffd.register(shared.page(2), 4 * PAGE, MISSING_MINOR) & CONTINUE_BIT


def test_unregister_releases_the_range_for_another_uffd(
    uffds: Callable[[], Userfaultfd], shared: SharedMemory
) -> None:
    first, second = uffds(), uffds()
    first.register(shared.addr, shared.size, MISSING_MINOR)
    first.unregister(shared.addr, shared.size)
    assert second.register(shared.addr, shared.size, MISSING_MINOR) & CONTINUE_BIT


def test_closing_a_uffd_releases_its_ranges(uffds: Callable[[], Userfaultfd], shared: SharedMemory) -> None:
    first, second = uffds(), uffds()
    first.register(shared.addr, shared.size, MISSING_MINOR)
    first.close()
    assert second.register(shared.addr, shared.size, MISSING_MINOR) & CONTINUE_BIT


# --- reading messages ---------------------------------------------------------------------------


def test_read_batch_returns_empty_list_when_nothing_is_queued(uffd: Userfaultfd, shared: SharedMemory) -> None:
    uffd.register(shared.addr, shared.size, MISSING_MINOR)
    assert uffd.read_batch() == []
    assert list(uffd.drain()) == []


# --- CONTINUE -----------------------------------------------------------------------------------


def test_continue_of_a_page_not_in_the_page_cache_raises_range_invalid_with_efault(
    uffd: Userfaultfd, shared: SharedMemory
) -> None:
    uffd.register(shared.addr, shared.size, MISSING_MINOR)
    with pytest.raises(KernelError) as info:
        uffd.continue_(shared.page(5), PAGE)
    # shmem reports ENOENT for a page not in the page cache; the kernel turns it into EFAULT.
    assert type(info.value) is RangeInvalid
    assert info.value.errno == errno.EFAULT
    assert info.value.op == "UFFDIO_CONTINUE"
    assert not present(shared.page(5))


def test_continue_maps_the_page_cache_page_then_raises_page_exists(uffd: Userfaultfd, shared: SharedMemory) -> None:
    uffd.register(shared.addr, shared.size, MISSING_MINOR)
    second = SecondMapping(shared.fd)
    try:
        view = second.view(3 * PAGE, PAGE)
        view[:] = bytes([0xA5]) * PAGE
        second_addr = ctypes.addressof(ctypes.c_char.from_buffer(view))
        view.release()
        assert not present(shared.page(3))

        assert uffd.continue_(shared.page(3), PAGE) == PAGE
        assert present(shared.page(3))
        assert pfn(shared.page(3)) == pfn(second_addr) != 0
        assert not present(shared.page(2))
        assert not present(shared.page(4))

        with pytest.raises(PageExists) as info:
            uffd.continue_(shared.page(3), PAGE)
        assert info.value.errno == errno.EEXIST
        assert info.value.op == "UFFDIO_CONTINUE"
    finally:
        second.close()


def test_continue_of_several_pages_maps_them_all(uffd: Userfaultfd, shared: SharedMemory) -> None:
    uffd.register(shared.addr, shared.size, MISSING_MINOR)
    second = SecondMapping(shared.fd)
    try:
        view = second.view(8 * PAGE, 4 * PAGE)
        view[:] = b"\x01" * len(view)
        view.release()
        assert uffd.continue_(shared.page(8), 4 * PAGE, dontwake=True) == 4 * PAGE
        assert all(present(shared.page(i)) for i in range(8, 12))
        uffd.wake(shared.page(8), 4 * PAGE)
    finally:
        second.close()


def test_continue_on_a_range_no_longer_registered_raises_guest_gone(uffd: Userfaultfd, shared: SharedMemory) -> None:
    uffd.register(shared.addr, shared.size, MISSING_MINOR)
    uffd.unregister(shared.addr, shared.size)
    with pytest.raises(KernelError) as info:
        uffd.continue_(shared.addr, PAGE)
    # The kernel finds no userfaultfd range there: ENOENT, "the mapping is gone".
    assert type(info.value) is GuestGone
    assert info.value.errno == errno.ENOENT


# --- memory files -------------------------------------------------------------------------------


def test_shmem_memfd_has_small_pages(shared: SharedMemory) -> None:
    assert file_page_size(shared.fd) == PAGE
    assert not is_hugetlb(shared.fd)


def test_hugetlb_memfd_registers_for_continue_only_on_huge_page_boundaries(
    hugepages: Callable[[int], None],
) -> None:
    hugepages(2)
    mem = map_memfd(2 * HUGE, MFD_HUGETLB)
    try:
        assert file_page_size(mem.fd) == HUGE
        assert is_hugetlb(mem.fd)
        with Userfaultfd.open() as u:
            u.api(abi.FEATURE_MINOR_HUGETLBFS)
            with pytest.raises(RangeInvalid):
                u.register(mem.addr, PAGE, MISSING_MINOR)
            assert u.register(mem.addr, 2 * HUGE, MISSING_MINOR) & CONTINUE_BIT
            second = SecondMapping(mem.fd)
            try:
                view = second.view(HUGE, HUGE)
                view[:PAGE] = b"\x5a" * PAGE
                view.release()
                with pytest.raises(RangeInvalid):
                    u.continue_(mem.addr + HUGE, PAGE)
                assert u.continue_(mem.addr + HUGE, HUGE) == HUGE
                assert present(mem.addr + HUGE)
            finally:
                second.close()
    finally:
        mem.mm.close()
        os.close(mem.fd)


# --- message layout -----------------------------------------------------------------------------

# struct uffd_msg: __u8 event; __u8 reserved1; __u16 reserved2; __u32 reserved3;
# union { struct { __u64 flags; __u64 address; union { __u32 ptid; } feat; } pagefault; ... }
C_PAGEFAULT_MSG = struct.Struct("<BBHIQQI4x")


def test_uffd_msg_struct_is_32_bytes_like_the_kernel_one() -> None:
    assert abi.MSG_STRUCT.size == abi.MSG_SIZE == C_PAGEFAULT_MSG.size == 32


def test_minor_pagefault_message_fields_are_decoded() -> None:
    raw = C_PAGEFAULT_MSG.pack(abi.EVENT_PAGEFAULT, 0, 0, 0,
                               abi.PAGEFAULT_FLAG_MINOR | abi.PAGEFAULT_FLAG_WRITE, 0x7F12_3456_7000, 4242)
    msg = UffdMsg._make(abi.MSG_STRUCT.unpack(raw))
    assert msg.event == abi.EVENT_PAGEFAULT
    assert msg.flags == abi.PAGEFAULT_FLAG_MINOR | abi.PAGEFAULT_FLAG_WRITE
    assert msg.address == 0x7F12_3456_7000
    assert msg.ptid == 4242
    assert msg.is_minor


def test_missing_pagefault_message_is_not_minor() -> None:
    msg = UffdMsg._make(abi.MSG_STRUCT.unpack(
        abi.MSG_STRUCT.pack(abi.EVENT_PAGEFAULT, abi.PAGEFAULT_FLAG_WRITE, 0x1000, 0)))
    assert not msg.is_minor
    assert msg.flags & abi.PAGEFAULT_FLAG_WRITE
    assert msg.ptid == 0


def test_ptid_ignores_the_bytes_after_the_32_bit_thread_id() -> None:
    msg = UffdMsg._make(abi.MSG_STRUCT.unpack(
        abi.MSG_STRUCT.pack(abi.EVENT_PAGEFAULT, 0, 0x2000, (0xDEADBEEF << 32) | 0xFFFF_FFFE)))
    assert msg.ptid == 0xFFFF_FFFE


def test_reserved_header_bytes_do_not_leak_into_the_fields() -> None:
    raw = C_PAGEFAULT_MSG.pack(abi.EVENT_PAGEFAULT, 0xFF, 0xFFFF, 0xFFFF_FFFF, abi.PAGEFAULT_FLAG_MINOR, 0x3000, 7)
    msg = UffdMsg._make(abi.MSG_STRUCT.unpack(raw))
    assert (msg.event, msg.flags, msg.address, msg.ptid) == (abi.EVENT_PAGEFAULT, abi.PAGEFAULT_FLAG_MINOR, 0x3000, 7)


def test_a_batch_of_messages_is_decoded_in_order() -> None:
    raw = b"".join(C_PAGEFAULT_MSG.pack(abi.EVENT_PAGEFAULT, 0, 0, 0, 0, addr, tid)
                   for addr, tid in ((0x1000, 1), (0x5000, 2), (0x9000, 3)))
    msgs = [UffdMsg._make(m) for m in abi.MSG_STRUCT.iter_unpack(raw)]
    assert [(m.address, m.ptid) for m in msgs] == [(0x1000, 1), (0x5000, 2), (0x9000, 3)]


def test_ioctl_numbers_match_the_kernel_header() -> None:
    assert abi.UFFDIO_API == 0xC018AA3F
    assert abi.UFFDIO_REGISTER == 0xC020AA00
    assert abi.UFFDIO_UNREGISTER == 0x8010AA01
    assert abi.UFFDIO_WAKE == 0x8010AA02
    assert abi.UFFDIO_COPY == 0xC028AA03
    assert abi.UFFDIO_ZEROPAGE == 0xC020AA04
    assert abi.UFFDIO_CONTINUE == 0xC020AA07
    assert abi.UFFDIO_POISON == 0xC020AA08
    assert abi.USERFAULTFD_IOC_NEW == 0xAA00


def test_a_user_mode_only_uffd_fails_kernel_mode_faults_and_check_says_so() -> None:
    """What a VMM that opened its userfaultfd with UFFD_USER_MODE_ONLY gets: KVM's accesses to
    guest memory (kernel mode) fail with EFAULT instead of waiting for the daemon."""
    from uffdd.check import run_checks

    row = next(c for c in run_checks() if c.name == "KVM faults for unprivileged VMMs")
    with open("/proc/sys/vm/unprivileged_userfaultfd") as fh:
        unprivileged = fh.read().strip() == "1"
    assert row.ok is unprivileged and row.required is False
    if not unprivileged:
        assert "UFFD_USER_MODE_ONLY" in row.detail and "failed at once with Bad address" in row.detail
