"""Guest memory files: page sizes, sizes, and the daemon's second mapping.

The second mapping is a MAP_SHARED view of the VMM's memfd that is *not* registered with the
userfaultfd, so writing through it fills the page cache without faulting; UFFDIO_CONTINUE then
maps those pages into the guest.
"""

from __future__ import annotations

import mmap
import os
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
    """A read/write shared mapping of a whole memory file, released with :meth:`close`."""

    __slots__ = ("_mm", "_view", "size")

    def __init__(self, fd: int, size: int | None = None) -> None:
        self.size = file_size(fd) if size is None else size
        self._mm = mmap.mmap(fd, self.size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self._view: memoryview | None = memoryview(self._mm)

    def view(self, offset: int, length: int) -> memoryview:
        """A writable view of ``length`` bytes at file offset ``offset``. Release it before close."""
        assert self._view is not None, "mapping closed"
        return self._view[offset : offset + length]

    def whole(self) -> memoryview:
        """A view of the whole mapping, for slicing on the fault path; release it before close."""
        assert self._view is not None, "mapping closed"
        return self._view[:]

    def populate(self, offset: int, length: int) -> None:
        """Allocate the pages of a range in one call (MADV_POPULATE_WRITE), not one fault each."""
        self._mm.madvise(MADV_POPULATE_WRITE, offset, length)

    def close(self) -> None:
        """Unmap now. Views handed out must be released first, or this raises BufferError."""
        if self._view is not None:
            self._view.release()
            self._view = None
            self._mm.close()
