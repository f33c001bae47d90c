"""A snapshot file on this host as a page source.

Reads go straight into the destination (preadv), first with RWF_NOWAIT so a page-cache hit is
served inline on the event loop; a cold read goes to a small thread pool.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import mmap
import os
import platform
import threading
from typing import ClassVar, Literal

from uffdd.errors import PagePoisoned, SourceError, SourceShortRead, SourceUnavailable
from uffdd.pools import RWF_NOWAIT, SharedPool
from uffdd.sources.base import PageSource, SourceConfig

_MEMORY_FS = frozenset({"tmpfs", "ramfs", "hugetlbfs"})
_executor = SharedPool("uffdd-read", 8)
"""Threads for cold reads, shared by all file sources (bounded: disks queue anyway)."""


class FileSourceConfig(SourceConfig):
    kind: Literal["file"] = "file"
    path: str
    """Snapshot path; ``{vm_id}`` is replaced by the handshake's vm_id."""
    verify_unchanged: bool = True
    """End a session whose snapshot is written in place during the restore (its size, mtime or
    ctime change). Off only for a file that legitimately changes, such as a live guest's
    memory in /dev/shm whose owner promises not to touch what is still being copied."""


class FileSource(PageSource):
    """Pages from a regular file (snapshot image) or a /dev/shm file."""

    config_model: ClassVar[type[SourceConfig]] = FileSourceConfig

    def __init__(self, path: str, fd: int, poisoned: list[tuple[int, int]] | None = None, *,
                 verify_unchanged: bool = True) -> None:
        self.path = path
        self._fd = fd
        st = os.fstat(fd)
        self._size = st.st_size
        self._identity = (st.st_size, st.st_mtime_ns, st.st_ctime_ns) if verify_unchanged else None
        self._nowait: int | None = 0 if _fs_type(fd) in _MEMORY_FS else RWF_NOWAIT
        """preadv flags for inline reads; None: this file system cannot say "would block".
        Files in memory (tmpfs refuses RWF_NOWAIT) are read inline without the flag."""
        self._poison = sorted(poisoned or [])
        """(offset, length) ranges that hold memory errors, from ``<path>.poison``."""

    @classmethod
    async def open(cls, config: SourceConfig, *, vm_id: str) -> FileSource:
        assert isinstance(config, FileSourceConfig)
        path = config.path.replace("{vm_id}", vm_id)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise SourceUnavailable(f"cannot open snapshot {path!r}: {exc.strerror}") from None
        try:
            poisoned = load_poison_marks(path + ".poison")
        except ValueError as exc:
            os.close(fd)
            raise SourceUnavailable(str(exc)) from None
        return cls(path, fd, poisoned, verify_unchanged=config.verify_unchanged)

    @property
    def size(self) -> int:
        return self._size

    def changed(self) -> str | None:
        if self._identity is None:
            return None
        st = os.fstat(self._fd)
        now = (st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if now == self._identity:
            return None
        return (f"snapshot {self.path!r} was modified during the restore (size {self._identity[0]} -> "
                f"{now[0]}, mtime or ctime changed): pages already served may mix old and new bytes")

    def _poisoned(self, offset: int, length: int) -> PagePoisoned | None:
        for start, n in self._poison:  # a handful of marks at most
            if start < offset + length and offset < start + n:
                return PagePoisoned(start, n)
        return None

    def fill_nowait(self, offset: int, dest: memoryview) -> bool:
        if self._poison and self._poisoned(offset, len(dest)):
            return False  # fill() says so
        if self._nowait is None:
            return False
        try:
            n = os.preadv(self._fd, [dest], offset, self._nowait)
        except BlockingIOError:
            # RWF_NOWAIT also refuses cached pages that carry a readahead mark (about one page
            # in sixteen after a sequential read). If the page cache holds the whole range, a
            # plain read cannot block: do it here rather than pay a thread hop.
            if not _all_cached(self._fd, offset, len(dest)):
                return False
            try:
                n = os.preadv(self._fd, [dest], offset)
            except OSError:
                return False
        except OSError as exc:
            if exc.errno == errno.EOPNOTSUPP and self._nowait:
                # Files in memory were read without the flag from the start (__init__); this
                # file system cannot say "would block": stop asking and use the thread pool.
                self._nowait = None
                return False
            return False  # let fill() raise the real error with context
        return n == len(dest)

    def _read_full(self, offset: int, dest: memoryview) -> None:
        done = 0
        want = len(dest)
        while done < want:
            try:
                n = os.preadv(self._fd, [dest[done:]], offset + done)
            except InterruptedError:
                continue
            except OSError as exc:
                raise SourceError(f"read of {self.path!r} at {offset + done} failed: {exc.strerror}") from None
            if n == 0:
                raise SourceShortRead(
                    f"{self.path!r} ended at {offset + done}, inside the page at {offset} "
                    f"(+{want} bytes): snapshot truncated?")
            done += n

    async def fill(self, offset: int, dest: memoryview) -> None:
        if self._poison and (mark := self._poisoned(offset, len(dest))):
            raise mark
        await asyncio.get_running_loop().run_in_executor(_executor(), self._read_full, offset, dest)

    def backing_fd(self) -> int | None:
        # Bulk copies bypass fill(); with memory errors marked, everything goes through it.
        return self._fd if self._fd >= 0 and not self._poison else None

    def inline_read(self) -> tuple[int, int] | None:
        # fill_nowait is exactly one preadv2 with these flags unless memory errors are marked.
        return None if self._poison or self._nowait is None or self._fd < 0 else (self._fd, self._nowait)

    def record_path(self) -> str:
        return record_path_for(self.path)

    async def aclose(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def describe(self) -> str:
        return f"file:{self.path}"


def record_path_for(snapshot: str | os.PathLike[str]) -> str:
    """Where the working-set record of a snapshot lives: next to it, ending in ``.ws``."""
    return os.fspath(snapshot) + ".ws"


def load_poison_marks(path: str) -> list[tuple[int, int]]:
    """Read ``<snapshot>.poison``: one ``OFFSET [LENGTH]`` per line (decimal or 0x hex; LENGTH
    defaults to 4096), ``#`` comments. A missing file means no marks."""
    try:
        with open(path) as fh:
            lines = fh.read().splitlines()
    except FileNotFoundError:
        return []
    marks = []
    for no, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].split()
        if not text:
            continue
        try:
            off = int(text[0], 0)
            length = int(text[1], 0) if len(text) > 1 else 4096
        except ValueError:
            raise ValueError(f"{path}:{no}: expected 'OFFSET [LENGTH]', got {line!r}") from None
        marks.append((off, length))
    return marks


_SYS_CACHESTAT = {"x86_64": 451, "aarch64": 451, "riscv64": 451}.get(platform.machine())
_libc = ctypes.CDLL(None, use_errno=True)
_cachestat_ok = _SYS_CACHESTAT is not None


class _CachestatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Cachestat(ctypes.Structure):
    _fields_ = [("nr_cache", ctypes.c_uint64), ("nr_dirty", ctypes.c_uint64), ("nr_writeback", ctypes.c_uint64),
                ("nr_evicted", ctypes.c_uint64), ("nr_recently_evicted", ctypes.c_uint64)]


_local = threading.local()


def _all_cached(fd: int, offset: int, length: int) -> bool:
    """Whether every page of [offset, offset+length) is in the page cache (cachestat(2), Linux
    6.5+); False when the kernel cannot say, so the caller takes the safe (thread) path."""
    global _cachestat_ok
    if not _cachestat_ok:
        return False
    try:
        rng, st = _local.bufs
    except AttributeError:
        rng, st = _local.bufs = (_CachestatRange(), _Cachestat())
    rng.off, rng.len = offset, length
    if _libc.syscall(_SYS_CACHESTAT, fd, ctypes.byref(rng), ctypes.byref(st), 0) != 0:
        _cachestat_ok = ctypes.get_errno() not in (errno.ENOSYS, errno.EPERM)
        return False
    return bool(st.nr_cache * mmap.PAGESIZE >= length)


def _fs_type(fd: int) -> str:
    """File-system type of an open file, from /proc/self/mountinfo ("" if unknown)."""
    st = os.fstat(fd)
    dev = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    try:
        with open("/proc/self/mountinfo") as fh:
            for line in fh:
                fields = line.split()
                if len(fields) > 2 and fields[2] == dev and " - " in line:
                    return line.split(" - ", 1)[1].split()[0]
    except OSError:
        pass
    return ""
