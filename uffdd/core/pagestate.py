"""One byte of state per guest page, kept in a memfd so that a successor daemon can read it.

A page moves EMPTY -> FILLING -> INSTALLING -> FILLED:

- FILLING: its bytes are being written through the second mapping; the guest has not mapped
  it, so after a crash it is simply filled again.
- INSTALLING: its bytes are complete in the page cache and UFFDIO_CONTINUE is being issued. The
  guest may already have it mapped (and written to it), so after a crash it is CONTINUE'd again
  but never refilled.
- FILLED: UFFDIO_CONTINUE returned (or said EEXIST).
- REMOVED: the guest discarded it (MADV_DONTNEED/REMOVE, a balloon): the source's bytes must
  never come back; a later fault gets zeros (or, on shmem, what the page cache still holds).
- UNMAPPED: the guest unmapped it; nothing to serve.

For anonymous memory (UFFDIO_COPY) there is no page cache: COPY installs atomically and never
overwrites, so after a crash an INSTALLING page is simply filled and copied again.
"""

from __future__ import annotations

import mmap
import os
from typing import Final

EMPTY: Final = 0
FILLING: Final = 1
INSTALLING: Final = 2
FILLED: Final = 3
REMOVED: Final = 4
UNMAPPED: Final = 5


class PageStates:
    """A shared byte array over a memfd. ``view`` is sliced per region by the session."""

    __slots__ = ("_mm", "fd", "size", "view")

    def __init__(self, pages: int, fd: int | None = None) -> None:
        self.size = pages
        if fd is None:
            fd = os.memfd_create("uffdd-pagestate", os.MFD_CLOEXEC)
            os.ftruncate(fd, max(pages, 1))
        elif os.fstat(fd).st_size < pages:
            raise ValueError(f"page-state file holds {os.fstat(fd).st_size} bytes, {pages} needed")
        self.fd = fd
        self._mm = mmap.mmap(fd, max(pages, 1), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.view = memoryview(self._mm)

    def find(self, value: int, start: int, end: int) -> int:
        """Index of the first page in [start, end) with state ``value``, or -1 (C speed)."""
        return self._mm.find(bytes((value,)), start, end)

    def count(self, value: int) -> int:
        return self._mm[: self.size].count(bytes((value,)))

    def recover(self, *, anonymous: bool = False) -> None:
        """After a crash: pages that were being filled are refilled from scratch (and, for
        anonymous memory, so are pages whose COPY may not have happened)."""
        for state in (FILLING, INSTALLING) if anonymous else (FILLING,):
            start = 0
            while (i := self.find(state, start, self.size)) >= 0:
                self.view[i] = EMPTY
                start = i + 1

    def close(self) -> None:
        """Unmap and close; views sliced from ``view`` must have been released."""
        self.view.release()
        self._mm.close()
        os.close(self.fd)
