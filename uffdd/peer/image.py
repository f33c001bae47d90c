"""What ``uffdd serve`` serves: a memory image (file or a live guest's memfd) read with preadv.

Reads go into a fresh buffer with preadv, never through a mapping: a file truncated under us
is a short read (an IO_ERROR answer), not a SIGBUS that kills the server. A read that would
wait for the disk (RWF_NOWAIT says EAGAIN) goes to a thread so the event loop keeps serving
demand faults.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import stat
from collections.abc import Iterable

from uffdd.pools import RWF_NOWAIT, SharedPool

_executor = SharedPool("uffdd-serve-read", 4)
"""Threads for the image's cold reads."""


class ImageError(Exception):
    """The image cannot give these bytes (truncated, I/O error, withdrawn)."""


class Image:
    """One named memory image. ``extents`` are the byte ranges a client may read."""

    def __init__(self, name: str, fd: int, *, size: int, extents: Iterable[tuple[int, int]], kind: str,
                 description: str) -> None:
        self.name = name
        self.size = size
        self.extents = sorted(extents)
        self.kind = kind
        self.description = description
        self._fd = fd
        st = os.fstat(fd)
        # Stable across a server restart for the same file or memfd, different for another one:
        # a client that reconnects never mixes pages of two images.
        self.image_id = hashlib.sha256(f"{kind}:{st.st_dev}:{st.st_ino}:{size}".encode()).digest()[:16]
        self._nowait = True
        self._busy = 0
        """Reads that had to wait for the disk (done in a thread)."""
        self._closing = False

    @classmethod
    def from_file(cls, name: str, path: str) -> Image:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise ImageError(f"cannot open image {name!r} at {path}: {exc.strerror}") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise ImageError(f"image {name!r}: {path} is not a regular file")
        return cls(name, fd, size=st.st_size, extents=[(0, st.st_size)], kind="file", description=path)

    @classmethod
    def from_memfd(cls, name: str, fd: int, regions: Iterable[tuple[int, int]]) -> Image:
        """A live guest's memory file; only the regions' byte ranges are served. Takes ``fd``."""
        size = os.fstat(fd).st_size
        ext = []
        for off, length in regions:
            if off + length > size:
                raise ImageError(f"region {off:#x}+{length:#x} lies past the end of the memory file ({size:#x} bytes)")
            ext.append((off, off + length))
        # Clients see the image end where the last region ends, so a destination whose regions
        # reach further is refused at its handshake rather than waiting on pages never served.
        end = max((b for _, b in ext), default=0)
        return cls(name, fd, size=end, extents=ext, kind="memfd", description=f"memfd of {name}")

    def dup_fd(self) -> int:
        """A duplicate of the image's fd, for a reader in C (it closes its copy itself)."""
        if self._closing or self._fd < 0:
            raise ImageError(f"image {self.name!r} was withdrawn")
        return os.dup(self._fd)

    def in_bounds(self, offset: int, length: int) -> bool:
        """Within the size announced in WELCOME (outside it is a protocol error)."""
        return offset + length <= self.size

    def contains(self, offset: int, length: int) -> bool:
        end = offset + length
        return any(a <= offset and end <= b for a, b in self.extents)

    def read_nowait(self, offset: int, buf: bytearray | memoryview) -> bytearray | memoryview | None:
        """Fill ``buf`` if that needs no disk wait and return it; None means "use read()"."""
        if self._closing:
            raise ImageError(f"image {self.name!r} was withdrawn")
        length = len(buf)
        if self._nowait:
            try:
                n = os.preadv(self._fd, [buf], offset, RWF_NOWAIT)
            except BlockingIOError:
                return None
            except OSError as exc:
                if exc.errno != 95:  # EOPNOTSUPP: shmem/tmpfs, which never waits for a disk
                    raise ImageError(f"read of image {self.name!r} at {offset:#x} failed: {exc.strerror}") from None
                self._nowait = False
                return self._read_full(offset, buf)
            if n == length:
                return buf
            return None  # partly cached, or past the end: the full read says which
        return self._read_full(offset, buf)

    def _read_full(self, offset: int, buf: bytearray | memoryview) -> bytearray | memoryview:
        view = memoryview(buf)
        done = 0
        while done < len(buf):
            try:
                n = os.preadv(self._fd, [view[done:]], offset + done)
            except InterruptedError:
                continue
            except OSError as exc:
                raise ImageError(f"read of image {self.name!r} at {offset + done:#x} failed: {exc.strerror}") from None
            if n == 0:
                raise ImageError(f"image {self.name!r} ends at {offset + done:#x}, inside the requested range "
                                 f"{offset:#x}+{len(buf):#x} (truncated?)")
            done += n
        return buf

    async def read(self, offset: int, buf: bytearray | memoryview) -> bytearray | memoryview:
        """Fill ``buf`` in a thread (the bytes are not in the page cache)."""
        if self._closing:
            raise ImageError(f"image {self.name!r} was withdrawn")
        self._busy += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(_executor(), self._read_full, offset, buf)
        finally:
            self._busy -= 1
            if self._closing and not self._busy:
                self._close_fd()

    def close(self) -> None:
        """Stop serving; the fd is closed once no thread is reading it."""
        self._closing = True
        if not self._busy:
            self._close_fd()

    def _close_fd(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1
