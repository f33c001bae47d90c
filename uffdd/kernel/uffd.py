"""A userfaultfd file descriptor and the ioctls the daemon issues on it.

Plain synchronous code: the fault loop calls these from its event-loop callbacks, so each
method is one system call with no allocation beyond what ``fcntl.ioctl`` itself does.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, NamedTuple

from uffdd.kernel import abi
from uffdd.kernel.errors import (
    OPEN_HINT,
    AlreadyInitialized,
    FeatureUnsupported,
    KernelError,
    UserfaultfdUnavailable,
    classify,
)

_ioctl = fcntl.ioctl
_readv = os.readv

MAX_BATCH = 64
"""Messages read per read(2): one system call drains a burst of faults from many vCPUs."""


class UffdMsg(NamedTuple):
    """One ``struct uffd_msg``; the meaning of the three arguments depends on ``event``."""

    event: int
    arg0: int
    arg1: int
    arg2: int

    @property
    def flags(self) -> int:
        """Page-fault flags (WRITE, WP, MINOR)."""
        return self.arg0

    @property
    def address(self) -> int:
        """Faulting address (page aligned unless EXACT_ADDRESS was negotiated)."""
        return self.arg1

    @property
    def ptid(self) -> int:
        """Thread id of the faulting thread (with THREAD_ID), else 0."""
        return self.arg2 & 0xFFFFFFFF

    @property
    def is_minor(self) -> bool:
        return bool(self.arg0 & abi.PAGEFAULT_FLAG_MINOR)


@dataclass(frozen=True, slots=True)
class ApiInfo:
    """What UFFDIO_API reported: the features now on for this fd and the ioctls allowed."""

    features: int
    ioctls: int


_libc = ctypes.CDLL(None, use_errno=True)


def _syscall_open(flags: int) -> int:
    nr = abi.userfaultfd_syscall_number()
    if nr is None:
        raise UserfaultfdUnavailable("userfaultfd()", errno.ENOSYS, "unknown syscall number here")
    fd = int(_libc.syscall(ctypes.c_long(nr), ctypes.c_int(flags)))
    if fd < 0:
        err = ctypes.get_errno()
        if err == errno.ENOSYS:
            raise UserfaultfdUnavailable("userfaultfd()", err, "kernel built without CONFIG_USERFAULTFD")
        raise UserfaultfdUnavailable("userfaultfd()", err, OPEN_HINT)
    return fd


def _device_open(flags: int, path: str = "/dev/userfaultfd") -> int:
    try:
        dev = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise UserfaultfdUnavailable(f"open({path})", exc.errno or errno.EIO, OPEN_HINT) from exc
    try:
        return int(fcntl.ioctl(dev, abi.USERFAULTFD_IOC_NEW, flags))
    except OSError as exc:
        raise UserfaultfdUnavailable("USERFAULTFD_IOC_NEW", exc.errno or errno.EIO, OPEN_HINT) from exc
    finally:
        os.close(dev)


class Userfaultfd:
    """Owns one userfaultfd. Non-blocking once constructed, so it can sit in an event loop."""

    __slots__ = ("_buf", "_fd", "_rbuf")

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._buf = bytearray(64)  # the largest range-ioctl struct (uffdio_copy) is 40 bytes
        self._rbuf = bytearray(abi.MSG_SIZE * MAX_BATCH)
        fl = fcntl.fcntl(fd, fcntl.F_GETFL)
        if not fl & os.O_NONBLOCK:
            fcntl.fcntl(fd, fcntl.F_SETFL, fl | os.O_NONBLOCK)

    @classmethod
    def open(
        cls, *, via: Literal["auto", "syscall", "device"] = "auto", user_mode_only: bool = False
    ) -> Userfaultfd:
        """Open a new userfaultfd through the syscall, /dev/userfaultfd, or whichever works."""
        flags = abi.O_CLOEXEC | abi.O_NONBLOCK | (abi.UFFD_USER_MODE_ONLY if user_mode_only else 0)
        if via == "syscall":
            return cls(_syscall_open(flags))
        if via == "device":
            return cls(_device_open(flags))
        try:
            return cls(_syscall_open(flags))
        except UserfaultfdUnavailable as first:
            try:
                return cls(_device_open(flags))
            except UserfaultfdUnavailable:
                raise first from None

    def fileno(self) -> int:
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __enter__(self) -> Userfaultfd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- handshake with the kernel -------------------------------------------------------
    def api(self, features: int) -> ApiInfo:
        """UFFDIO_API: enable ``features``. Allowed once per fd."""
        buf = bytearray(abi.API_STRUCT.pack(abi.UFFD_API, features, 0))
        try:
            fcntl.ioctl(self._fd, abi.UFFDIO_API, buf, True)
        except OSError as exc:
            err = exc.errno or errno.EIO
            if err == errno.EINVAL and self.is_initialized():
                raise AlreadyInitialized("UFFDIO_API", err, "the VMM already did it") from None
            if err == errno.EINVAL:
                _, supported, _ = abi.API_STRUCT.unpack(buf)
                missing = abi.feature_names(features & ~supported) if supported else []
                raise FeatureUnsupported(
                    "UFFDIO_API", err,
                    f"kernel lacks features {missing or abi.feature_names(features)}: minor "
                    "faults need Linux >= 5.13 (shmem) / 5.14 with CONFIG_HAVE_ARCH_USERFAULTFD_MINOR",
                ) from None
            if err == errno.EPERM:
                raise UserfaultfdUnavailable(
                    "UFFDIO_API", err, "EVENT_FORK needs CAP_SYS_PTRACE; " + OPEN_HINT) from None
            raise KernelError("UFFDIO_API", err) from None
        _, feats, ioctls = abi.API_STRUCT.unpack(buf)
        return ApiInfo(feats, ioctls)

    def fdinfo_features(self) -> int | None:
        """Features enabled on this fd as /proc shows them, or None before UFFDIO_API."""
        try:
            with open(f"/proc/self/fdinfo/{self._fd}") as fh:
                for line in fh:
                    if line.startswith("API:"):
                        feats = int(line.split(":")[2], 16)
                        return feats if feats & abi.FEATURE_INITIALIZED else None
        except OSError:
            return None
        return None

    def is_initialized(self) -> bool:
        """True once UFFDIO_API succeeded on this fd (here or in the VMM that made it)."""
        return self.fdinfo_features() is not None

    def register(self, start: int, length: int, mode: int) -> int:
        """UFFDIO_REGISTER; returns the mask of range ioctls allowed on the range."""
        buf = bytearray(abi.REGISTER_STRUCT.pack(start, length, mode, 0))
        try:
            fcntl.ioctl(self._fd, abi.UFFDIO_REGISTER, buf, True)
        except OSError as exc:
            raise classify("UFFDIO_REGISTER", exc.errno or errno.EIO) from None
        return int(abi.REGISTER_STRUCT.unpack(buf)[3])

    def unregister(self, start: int, length: int) -> None:
        try:
            fcntl.ioctl(self._fd, abi.UFFDIO_UNREGISTER, abi.RANGE_STRUCT.pack(start, length))
        except OSError as exc:
            raise classify("UFFDIO_UNREGISTER", exc.errno or errno.EIO) from None

    # --- resolving faults ---------------------------------------------------------------
    def _range_op(self, name: str, code: int, layout: struct.Struct, *fields: int) -> int:
        """One range ioctl whose struct ends with the kernel's result (bytes done, or -errno);
        a refusal raises the classified KernelError carrying the bytes done before it."""
        buf = self._buf
        layout.pack_into(buf, 0, *fields, 0)
        try:
            _ioctl(self._fd, code, buf, True)
        except OSError as exc:
            done = layout.unpack_from(buf)[-1]
            raise classify(name, exc.errno or errno.EIO, max(done, 0)) from None
        return int(layout.unpack_from(buf)[-1])

    def continue_(self, start: int, length: int, dontwake: bool = False) -> int:
        """UFFDIO_CONTINUE: map the page-cache pages of the range; returns bytes mapped."""
        return self._range_op("UFFDIO_CONTINUE", abi.UFFDIO_CONTINUE, abi.CONTINUE_STRUCT, start, length,
                              abi.CONTINUE_MODE_DONTWAKE if dontwake else 0)

    def copy(self, dst: int, src: int, length: int, dontwake: bool = False) -> int:
        """UFFDIO_COPY: allocate pages at ``dst`` filled from our address ``src``."""
        return self._range_op("UFFDIO_COPY", abi.UFFDIO_COPY, abi.COPY_STRUCT, dst, src, length,
                              abi.COPY_MODE_DONTWAKE if dontwake else 0)

    def zeropage(self, start: int, length: int, dontwake: bool = False) -> int:
        """UFFDIO_ZEROPAGE: map zero pages (not on hugetlbfs)."""
        return self._range_op("UFFDIO_ZEROPAGE", abi.UFFDIO_ZEROPAGE, abi.ZEROPAGE_STRUCT, start, length,
                              abi.ZEROPAGE_MODE_DONTWAKE if dontwake else 0)

    def poison(self, start: int, length: int, dontwake: bool = False) -> int:
        """UFFDIO_POISON: the guest takes a SIGBUS on these pages (a memory error at the source)."""
        return self._range_op("UFFDIO_POISON", abi.UFFDIO_POISON, abi.POISON_STRUCT, start, length,
                              abi.POISON_MODE_DONTWAKE if dontwake else 0)

    def wake(self, start: int, length: int) -> None:
        """UFFDIO_WAKE: wake threads waiting on the range so they retry their access."""
        try:
            fcntl.ioctl(self._fd, abi.UFFDIO_WAKE, abi.RANGE_STRUCT.pack(start, length))
        except OSError as exc:
            raise classify("UFFDIO_WAKE", exc.errno or errno.EIO) from None

    # --- messages ------------------------------------------------------------------------
    def read_into(self, buf: bytearray) -> int:
        """One read(2) of whole messages into ``buf``; 0 when none are queued. The fast path."""
        try:
            return _readv(self._fd, [buf])
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise classify("read(userfaultfd)", exc.errno or errno.EIO) from None

    def read_batch(self) -> list[UffdMsg]:
        """One read(2) of up to MAX_BATCH messages; [] when none are queued."""
        try:
            n = os.readv(self._fd, [self._rbuf])
        except BlockingIOError:
            return []
        except OSError as exc:
            raise classify("read(userfaultfd)", exc.errno or errno.EIO) from None
        if n == 0:
            return []
        return [UffdMsg._make(m) for m in abi.MSG_STRUCT.iter_unpack(memoryview(self._rbuf)[:n])]

    def drain(self) -> Iterator[list[UffdMsg]]:
        """Batches of messages until the queue is empty (EAGAIN)."""
        while batch := self.read_batch():
            yield batch


_supported: int | None = None


def supported_features() -> int:
    """Every UFFDIO_API feature this kernel offers, probed once on a throwaway userfaultfd."""
    global _supported
    if _supported is None:
        with Userfaultfd.open() as probe:
            _supported = probe.api(0).features
    return _supported
