"""Guest memory files: page sizes, sizes, and the daemon's second mapping.

The second mapping is a MAP_SHARED view of the VMM's memfd that is *not* registered with the
userfaultfd, so writing through it fills the page cache without faulting; UFFDIO_CONTINUE then
maps those pages into the guest.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import importlib
import mmap
import os
import threading
from types import ModuleType
from typing import Final

SMALL_PAGE: Final = mmap.PAGESIZE
MFD_HUGETLB: Final = 0x0004
MFD_HUGE_2MB: Final = 21 << 26
MADV_POPULATE_WRITE: Final = 23


def file_page_size(fd: int) -> int:
    """Page size of the file system behind ``fd``: 4 KiB for shmem, the huge size for hugetlbfs."""
    return max(os.fstatvfs(fd).f_bsize, SMALL_PAGE)


def is_hugetlb(fd: int) -> bool:
    return file_page_size(fd) > SMALL_PAGE


def file_size(fd: int) -> int:
    return os.fstat(fd).st_size


class SecondMapping:
    """A read/write shared mapping of ``size`` bytes of a memory file from ``offset`` (the whole
    file by default), released with :meth:`close`. Offsets of :meth:`view` are file offsets."""

    __slots__ = ("_mm", "_view", "offset", "size")

    def __init__(self, fd: int, size: int | None = None, offset: int = 0) -> None:
        self.offset = offset
        self.size = file_size(fd) - offset if size is None else size
        self._mm = mmap.mmap(fd, self.size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE,
                             offset=offset)
        self._view: memoryview | None = memoryview(self._mm)

    def view(self, offset: int, length: int) -> memoryview:
        """A writable view of ``length`` bytes at file offset ``offset``. Release it before close."""
        assert self._view is not None, "mapping closed"
        return self._view[offset - self.offset : offset - self.offset + length]

    def whole(self) -> memoryview:
        """A view of the whole mapping, for slicing on the fault path; release it before close."""
        assert self._view is not None, "mapping closed"
        return self._view[:]

    def populate(self, offset: int, length: int) -> None:
        """Allocate the pages of a range in one call (MADV_POPULATE_WRITE), not one fault each."""
        self._mm.madvise(MADV_POPULATE_WRITE, offset - self.offset, length)

    def close(self) -> None:
        """Unmap now. Views handed out must be released first, or this raises BufferError."""
        if self._view is not None:
            self._view.release()
            self._view = None
            self._mm.close()


_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def address_of(view: memoryview) -> int:
    """The address of a writable buffer's first byte (for ioctls that take addresses)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def populate(view: memoryview) -> None:
    """MADV_POPULATE_WRITE over a page-aligned view of a mapping: allocate its pages in one call."""
    if _libc.madvise(address_of(view), len(view), MADV_POPULATE_WRITE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"madvise(MADV_POPULATE_WRITE): {os.strerror(err)}")


class PrivateBuffer:
    """Page-aligned private memory: bytes on their way into an anonymous guest (UFFDIO_COPY
    copies from it), or fetched by background work before they go into guest memory."""

    __slots__ = ("addr", "mm", "view")

    def __init__(self, size: int) -> None:
        self.mm = mmap.mmap(-1, max(size, 1))
        self.view = memoryview(self.mm)
        self.addr = address_of(self.view)

    def close(self) -> None:
        self.view.release()
        self.mm.close()


_dev_zero = -1


def fill_zeros(view: memoryview) -> None:
    """Write zeros into ``view`` (a slice of a mapping) with a read of /dev/zero: the kernel does
    the copy, so a memory file that shrank under the mapping yields an OSError (EFAULT), never a
    SIGBUS that would kill the daemon."""
    global _dev_zero
    if _dev_zero < 0:
        _dev_zero = os.open("/dev/zero", os.O_RDONLY | os.O_CLOEXEC)
    done = 0
    while done < len(view):
        done += os.readv(_dev_zero, [view[done:]])


try:
    _memguard: ModuleType | None = importlib.import_module("uffdd.kernel._memguard")
except ImportError:  # built without a C compiler: copy_into goes through a pipe
    _memguard = None

_PIPE_SIZE = 1 << 20
_pipe = threading.local()


def _pipe_copy(dest: memoryview, src: memoryview) -> None:
    """The kernel copies src into a pipe and out of it into dest: a dest that is gone is EFAULT."""
    try:
        r, w = _pipe.fds
    except AttributeError:
        r, w = _pipe.fds = os.pipe2(os.O_CLOEXEC)
        with contextlib.suppress(OSError):
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
    done = 0
    while done < len(src):
        n = os.write(w, src[done : done + _PIPE_SIZE])
        got = 0
        try:
            while got < n:
                got += os.readv(r, [dest[done + got : done + n]])
        except OSError:
            os.close(r)
            os.close(w)
            del _pipe.fds  # what is left in the pipe goes with it
            raise
        done += n


def copy_into(dest: memoryview, src: memoryview | bytes | bytearray) -> None:
    """Copy ``src`` into ``dest``, a slice of a second mapping of guest memory. If the memory
    file shrank under ``dest`` (a VMM may truncate its own file) this raises OSError(EFAULT)
    instead of the SIGBUS a plain copy would take, which would kill the daemon."""
    if _memguard is not None:
        _memguard.copy(dest, src)
    else:
        with memoryview(src) as view:
            _pipe_copy(dest, view.cast("B"))


MEMGUARD = "built" if _memguard is not None else "not built"
"""Whether copy_into uses the C guard (one copy) or a pipe (two), for `uffdd check`."""
