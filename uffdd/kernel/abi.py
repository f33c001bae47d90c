"""The userfaultfd kernel ABI: ioctl numbers, feature bits and struct layouts.

Written out by hand from ``include/uapi/linux/userfaultfd.h`` because no Python binding
exists; every other module goes through :mod:`uffdd.kernel.uffd` instead of using these.
"""

from __future__ import annotations

import platform
import struct
from typing import Final

# --- ioctl number encoding (asm-generic/ioctl.h; x86, arm64, riscv share it) ----------------
_IOC_NONE: Final = 0
_IOC_WRITE: Final = 1
_IOC_READ: Final = 2


def _ioc(direction: int, typ: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (typ << 8) | nr


UFFDIO: Final = 0xAA
UFFD_API: Final = 0xAA

# struct layouts (native little-endian, 64-bit)
API_STRUCT: Final = struct.Struct("=QQQ")  # api, features, ioctls
RANGE_STRUCT: Final = struct.Struct("=QQ")  # start, len
REGISTER_STRUCT: Final = struct.Struct("=QQQQ")  # range.start, range.len, mode, ioctls
COPY_STRUCT: Final = struct.Struct("=QQQQq")  # dst, src, len, mode, copy
ZEROPAGE_STRUCT: Final = struct.Struct("=QQQq")  # range.start, range.len, mode, zeropage
CONTINUE_STRUCT: Final = struct.Struct("=QQQq")  # range.start, range.len, mode, mapped
POISON_STRUCT: Final = struct.Struct("=QQQq")  # range.start, range.len, mode, updated
# struct uffd_msg is 32 bytes, packed: event, 7 reserved bytes, then a 24-byte union.
MSG_STRUCT: Final = struct.Struct("=B7xQQQ")
MSG_SIZE: Final = 32
assert MSG_STRUCT.size == MSG_SIZE

USERFAULTFD_IOC_NEW: Final = _ioc(_IOC_NONE, UFFDIO, 0x00, 0)
UFFDIO_API: Final = _ioc(_IOC_READ | _IOC_WRITE, UFFDIO, 0x3F, API_STRUCT.size)
UFFDIO_REGISTER: Final = _ioc(_IOC_READ | _IOC_WRITE, UFFDIO, 0x00, REGISTER_STRUCT.size)
UFFDIO_UNREGISTER: Final = _ioc(_IOC_READ, UFFDIO, 0x01, RANGE_STRUCT.size)
UFFDIO_WAKE: Final = _ioc(_IOC_READ, UFFDIO, 0x02, RANGE_STRUCT.size)
UFFDIO_COPY: Final = _ioc(_IOC_READ | _IOC_WRITE, UFFDIO, 0x03, COPY_STRUCT.size)
UFFDIO_ZEROPAGE: Final = _ioc(_IOC_READ | _IOC_WRITE, UFFDIO, 0x04, ZEROPAGE_STRUCT.size)
UFFDIO_CONTINUE: Final = _ioc(_IOC_READ | _IOC_WRITE, UFFDIO, 0x07, CONTINUE_STRUCT.size)
UFFDIO_POISON: Final = _ioc(_IOC_READ | _IOC_WRITE, UFFDIO, 0x08, POISON_STRUCT.size)

# --- events and fault flags ------------------------------------------------------------------
EVENT_PAGEFAULT: Final = 0x12
EVENT_FORK: Final = 0x13
EVENT_REMAP: Final = 0x14
EVENT_REMOVE: Final = 0x15
EVENT_UNMAP: Final = 0x16

PAGEFAULT_FLAG_WRITE: Final = 1 << 0
PAGEFAULT_FLAG_WP: Final = 1 << 1
PAGEFAULT_FLAG_MINOR: Final = 1 << 2

# --- feature bits of UFFDIO_API --------------------------------------------------------------
FEATURE_PAGEFAULT_FLAG_WP: Final = 1 << 0
FEATURE_EVENT_FORK: Final = 1 << 1
FEATURE_EVENT_REMAP: Final = 1 << 2
FEATURE_EVENT_REMOVE: Final = 1 << 3
FEATURE_MISSING_HUGETLBFS: Final = 1 << 4
FEATURE_MISSING_SHMEM: Final = 1 << 5
FEATURE_EVENT_UNMAP: Final = 1 << 6
FEATURE_SIGBUS: Final = 1 << 7
FEATURE_THREAD_ID: Final = 1 << 8
FEATURE_MINOR_HUGETLBFS: Final = 1 << 9
FEATURE_MINOR_SHMEM: Final = 1 << 10
FEATURE_EXACT_ADDRESS: Final = 1 << 11
FEATURE_WP_HUGETLBFS_SHMEM: Final = 1 << 12
FEATURE_WP_UNPOPULATED: Final = 1 << 13
FEATURE_POISON: Final = 1 << 14
FEATURE_WP_ASYNC: Final = 1 << 15
FEATURE_MOVE: Final = 1 << 16
# Kernel-internal bit that /proc/PID/fdinfo shows once UFFDIO_API has succeeded.
FEATURE_INITIALIZED: Final = 1 << 31

FEATURE_NAMES: Final[dict[int, str]] = {
    FEATURE_PAGEFAULT_FLAG_WP: "PAGEFAULT_FLAG_WP",
    FEATURE_EVENT_FORK: "EVENT_FORK",
    FEATURE_EVENT_REMAP: "EVENT_REMAP",
    FEATURE_EVENT_REMOVE: "EVENT_REMOVE",
    FEATURE_MISSING_HUGETLBFS: "MISSING_HUGETLBFS",
    FEATURE_MISSING_SHMEM: "MISSING_SHMEM",
    FEATURE_EVENT_UNMAP: "EVENT_UNMAP",
    FEATURE_SIGBUS: "SIGBUS",
    FEATURE_THREAD_ID: "THREAD_ID",
    FEATURE_MINOR_HUGETLBFS: "MINOR_HUGETLBFS",
    FEATURE_MINOR_SHMEM: "MINOR_SHMEM",
    FEATURE_EXACT_ADDRESS: "EXACT_ADDRESS",
    FEATURE_WP_HUGETLBFS_SHMEM: "WP_HUGETLBFS_SHMEM",
    FEATURE_WP_UNPOPULATED: "WP_UNPOPULATED",
    FEATURE_POISON: "POISON",
    FEATURE_WP_ASYNC: "WP_ASYNC",
    FEATURE_MOVE: "MOVE",
}

# --- register and range-ioctl modes ----------------------------------------------------------
REGISTER_MODE_MISSING: Final = 1 << 0
REGISTER_MODE_WP: Final = 1 << 1
REGISTER_MODE_MINOR: Final = 1 << 2

COPY_MODE_DONTWAKE: Final = 1 << 0
ZEROPAGE_MODE_DONTWAKE: Final = 1 << 0
CONTINUE_MODE_DONTWAKE: Final = 1 << 0
POISON_MODE_DONTWAKE: Final = 1 << 0

# _UFFDIO_* bit numbers in the ``ioctls`` mask that REGISTER returns
IOCTL_BIT_WAKE: Final = 0x02
IOCTL_BIT_COPY: Final = 0x03
IOCTL_BIT_ZEROPAGE: Final = 0x04
IOCTL_BIT_CONTINUE: Final = 0x07

# --- opening a userfaultfd -------------------------------------------------------------------
UFFD_USER_MODE_ONLY: Final = 1
O_CLOEXEC: Final = 0o2000000
O_NONBLOCK: Final = 0o4000

_SYSCALL_NUMBERS: Final = {"x86_64": 323, "aarch64": 282, "riscv64": 282, "ppc64le": 364, "s390x": 355}


def userfaultfd_syscall_number() -> int | None:
    """The userfaultfd(2) syscall number on this architecture, or None if we do not know it."""
    return _SYSCALL_NUMBERS.get(platform.machine())


def feature_names(features: int) -> list[str]:
    """Names of the known feature bits set in ``features``, lowest bit first."""
    return [name for bit, name in FEATURE_NAMES.items() if features & bit]
