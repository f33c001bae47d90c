"""Typed kernel errors. Each message says what went wrong *and* what to do about it."""

from __future__ import annotations

import errno as _errno


class KernelError(OSError):
    """A userfaultfd operation the kernel refused. ``op`` names the operation."""

    def __init__(self, op: str, err: int, hint: str = "") -> None:
        text = f"{op} failed: {_errno.errorcode.get(err, str(err))} ({_strerror(err)})"
        if hint:
            text = f"{text}: {hint}"
        super().__init__(err, text)
        self.op = op


def _strerror(err: int) -> str:
    import os

    return os.strerror(err)


class UserfaultfdUnavailable(KernelError):
    """No userfaultfd could be opened (permissions, kernel config, missing device)."""


class FeatureUnsupported(KernelError):
    """UFFDIO_API refused the requested features: the kernel is too old or lacks a config."""


class AlreadyInitialized(KernelError):
    """UFFDIO_API was already done on this userfaultfd (it may be called once per fd)."""


class RangeBusy(KernelError):
    """REGISTER found the range registered by another userfaultfd."""


class RangeInvalid(KernelError):
    """The kernel rejected a range: unaligned, outside any mapping, or of a wrong memory type."""


class PageExists(KernelError):
    """The page is already mapped (EEXIST): only the waiters need waking."""


class MappingChanging(KernelError):
    """EAGAIN: an unread event changes the mapping, or only part of a range was done."""

    def __init__(self, op: str, err: int, hint: str = "", done: int = 0) -> None:
        super().__init__(op, err, hint)
        self.done = done


class GuestGone(KernelError):
    """ESRCH/ENOENT: the process or the mapping the userfaultfd served no longer exists."""


OPEN_HINT = (
    "run as root, or give the daemon CAP_SYS_PTRACE, or set vm.unprivileged_userfaultfd=1, "
    "or grant read/write access to /dev/userfaultfd (e.g. a udev rule with GROUP=kvm)"
)


def classify(op: str, err: int, done: int = 0) -> KernelError:
    """Map an errno from a range ioctl to the precise exception type."""
    if err == _errno.EEXIST:
        return PageExists(op, err, "page already mapped")
    if err == _errno.EAGAIN:
        return MappingChanging(op, err, "read pending events, then retry", done)
    if err in (_errno.ESRCH, _errno.ENOENT):
        return GuestGone(op, err, "the guest process or its mapping is gone")
    if err == _errno.EBUSY:
        return RangeBusy(op, err, "another userfaultfd already registered this range")
    if err in (_errno.EINVAL, _errno.EFAULT):
        return RangeInvalid(
            op, err, "the range is unaligned, outside the guest's mappings, or not of a memory "
            "type this mode supports (MINOR needs shmem or hugetlbfs)")
    if err in (_errno.EPERM, _errno.EACCES):
        return UserfaultfdUnavailable(op, err, OPEN_HINT)
    return KernelError(op, err)
