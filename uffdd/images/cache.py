"""The local chunk cache: chunk objects on disk, shared by every process on the host.

Files hold chunks decompressed, named by their content hash, so one file serves every image
that contains that chunk, and a cached chunk costs one read and one hash: no decompression.
After the bytes come block tags (:mod:`uffdd.images.tags`): a demand fault that needs 64 KiB of
a chunk reads and checks that block alone. A file appears only by ``rename`` of a complete
write, and every read checks what it uses (the whole chunk against its name, or a block against
its tag): a torn or corrupted file (a crash, a bad disk, a hand edit) is removed and fetched
again, never served. Processes agree
on who fetches a chunk with a byte-range lock per chunk on one lock file, so two daemons (or
workers) wanting the same chunk fetch it once. The cache is kept under ``max_bytes`` by
removing the least recently used files (modification time, refreshed on use).

All methods here may block on the disk: call them from a worker thread, except
``load(..., nowait=True)``, which only reads what the page cache holds.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from uffdd.images import tags
from uffdd.images.format import CHUNKS_DIR, digest
from uffdd.pools import RWF_NOWAIT

LOW_WATER = 0.9
"""Eviction removes files until the cache holds at most this share of max_bytes."""
TOUCH_AFTER_S = 60.0
"""A file used again is marked recent at most this often (one utime per minute, not per use)."""
_EVICT_LOCK = 0


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    corrupt: int = 0
    """Files that failed their hash check on read (removed, fetched again)."""
    writes: int = 0
    evicted: int = 0


class ChunkCache:
    """One cache directory; one instance per process (see :func:`shared_cache`)."""

    def __init__(self, path: str, max_bytes: int) -> None:
        self.path = os.path.abspath(path)
        self.max_bytes = max_bytes
        self.stats = CacheStats()
        self._lock_fd = -1
        self._bytes = 0
        self._written_since_scan = 0
        self._mu = threading.Lock()
        self._key = b""

    def open(self) -> None:
        """Create the directories and lock file; count what is cached (blocking)."""
        for sub in (CHUNKS_DIR, "tmp", "worksets"):
            os.makedirs(os.path.join(self.path, sub), exist_ok=True)
        self._lock_fd = os.open(os.path.join(self.path, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self._key = tags.load_key(self.path)
        self._bytes = sum(size for _, size, _ in self._scan())

    def close(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def file(self, name: str) -> str:
        return os.path.join(self.path, CHUNKS_DIR, name[:2], name)

    def workset_path(self, image_id: str) -> str:
        return os.path.join(self.path, "worksets", f"{image_id}.ws")

    # --- chunks ----------------------------------------------------------------------------
    def probe(self, name: str) -> str:
        """Where ``name`` stands, from file metadata only (cheap enough for the event loop):
        "cached" (read it), "mine" (not cached, and this process now holds the right to fetch
        it) or "busy" (another process is fetching it)."""
        path = self.file(name)
        if os.path.exists(path):
            return "cached"
        if not self.try_lock(name):
            return "busy"
        if os.path.exists(path):  # finished by another process just before we locked
            self.unlock(name)
            return "cached"
        self.stats.misses += 1
        return "mine"

    def read(self, name: str, plain_len: int) -> bytes | None:
        """The chunk's plain bytes if the cache holds a good copy; None otherwise."""
        got = self._read(name, plain_len, lambda fd: os.pread(fd, plain_len, 0))
        return got if isinstance(got, bytes) else None

    def load(self, name: str, dest: memoryview, *, nowait: bool = False) -> bool:
        """Fill ``dest`` (exactly the chunk's length) from the cache and check the hash.

        False: not cached, a bad copy (removed, if no one has replaced it meanwhile), or with
        ``nowait`` not all in the page cache (preadv2 RWF_NOWAIT): then nothing is counted.
        """
        if nowait:
            return self.read_nowait(name, len(dest), into=dest) is not None
        return self._load(name, dest)

    def read_nowait(self, name: str, plain_len: int, *, into: memoryview | None = None) -> Plain | None:
        """The chunk from a cache file the page cache holds whole (no waiting on the disk), read
        into ``into`` or a new buffer; None if it is not cached, not all in the page cache, or bad.
        The buffer is allocated only once the file is open: a miss costs one failed open."""
        path = self.file(name)
        with _opened(path) as opened:
            if opened is None:
                return None
            fd, st = opened
            if not _sized(st, plain_len):
                n, dest = -1, memoryview(b"")
            else:
                dest = into if into is not None else memoryview(bytearray(plain_len))
                try:
                    n = os.preadv(fd, [dest], 0, RWF_NOWAIT)
                except OSError:  # would block (EAGAIN), or no RWF_NOWAIT here
                    return None
                if n != plain_len:
                    return None
        if not self._checked(path, st, dest if n == plain_len else b"", name, plain_len):
            return None
        return dest.obj if into is None else into  # type: ignore[return-value]

    def _load(self, name: str, dest: memoryview) -> bool:
        def into_dest(fd: int) -> object:
            return dest if os.preadv(fd, [dest], 0) == len(dest) else b""
        return self._read(name, len(dest), into_dest) is not None

    def _read(self, name: str, plain_len: int, fetch: Callable[[int], object]) -> object | None:
        """``fetch(fd)``'s result if it is the whole, good chunk ``name``; None otherwise."""
        path = self.file(name)
        with _opened(path) as opened:
            if opened is None:
                self.stats.misses += 1
                return None
            fd, st = opened
            data = fetch(fd) if _sized(st, plain_len) else b""
        return data if self._checked(path, st, data, name, plain_len) else None

    def read_part_nowait(self, name: str, plain_len: int, within: int, dest: memoryview) -> bool | None:
        """Fill ``dest`` with the chunk's bytes from ``within`` on, out of a cache file the page
        cache holds, checking only the blocks they lie in (against their tags).

        None: no such file, or one without tags (read the whole chunk instead). False: not all
        in the page cache, or a block failed its tag (the file is removed). ``dest`` may then
        be partly written.
        """
        path = self.file(name)
        with _opened(path) as opened:
            if opened is None:
                return None
            fd, st = opened
            if st.st_size != plain_len + tags.trailer_len(plain_len):
                return None
            first, last = within // tags.BLOCK, (within + len(dest) - 1) // tags.BLOCK
            start, end = first * tags.BLOCK, min((last + 1) * tags.BLOCK, plain_len)
            exact = start == within and end == within + len(dest)
            blocks = dest if exact else memoryview(bytearray(end - start))
            tag_bytes = bytearray((last - first + 1) * tags.TAG)
            try:
                got = (os.preadv(fd, [blocks], start, RWF_NOWAIT),
                       os.preadv(fd, [tag_bytes], plain_len + first * tags.TAG, RWF_NOWAIT))
            except OSError:  # would block (EAGAIN), or no RWF_NOWAIT here
                return False
        if got != (len(blocks), len(tag_bytes)) or not tags.blocks_ok(self._key, name, first, blocks, tag_bytes):
            self._remove_bad(path, st.st_ino)
            return False
        if not exact:
            dest[:] = blocks[within - start : within - start + len(dest)]
        self._used(path, st)
        return True

    def _checked(self, path: str, st: os.stat_result, data: object, name: str, plain_len: int) -> bool:
        """Whether ``data`` is the whole chunk ``name``; a bad copy is removed and counted."""
        if len(data) != plain_len or digest(data) != name:  # type: ignore[arg-type]
            self._remove_bad(path, st.st_ino)
            return False
        self._used(path, st)
        return True

    def _used(self, path: str, st: os.stat_result) -> None:
        self.stats.hits += 1
        if time.time() - st.st_mtime > TOUCH_AFTER_S:
            with contextlib.suppress(OSError):
                os.utime(path)

    def _remove_bad(self, path: str, ino: int) -> None:
        self.stats.corrupt += 1
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == ino:
                os.unlink(path)

    def write(self, name: str, plain: object) -> bool:
        """Add a checked chunk (its plain bytes): written aside, then renamed into place.
        True if the cache should now be trimmed (:meth:`evict`)."""
        final = self.file(name)
        tmp = os.path.join(self.path, "tmp", f"{name}.{os.getpid()}.{threading.get_native_id()}")
        data = memoryview(plain)  # type: ignore[arg-type]
        trailer = tags.make_tags(self._key, name, data)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        try:
            fd = os.open(tmp, flags, 0o644)
        except FileNotFoundError:  # the cache was wiped under us: start it again
            os.makedirs(os.path.dirname(tmp), exist_ok=True)
            fd = os.open(tmp, flags, 0o644)
        try:
            for part in (data, memoryview(trailer)):
                done = 0
                while done < len(part):
                    done += os.write(fd, part[done:])
        finally:
            os.close(fd)
        try:
            os.rename(tmp, final)
        except FileNotFoundError:
            os.makedirs(os.path.dirname(final), exist_ok=True)
            os.rename(tmp, final)
        self.stats.writes += 1
        with self._mu:
            self._bytes += len(data) + len(trailer)
            self._written_since_scan += len(data) + len(trailer)
            return self._bytes > self.max_bytes or self._written_since_scan > self.max_bytes // 8

    # --- one fetch per chunk across processes ----------------------------------------------
    @staticmethod
    def _slot(name: str) -> int:
        return int(name[:15], 16) + 1  # byte 0 is the eviction lock

    def try_lock(self, name: str) -> bool:
        """Take the right to fetch ``name`` (non-blocking); False: another process has it."""
        try:
            fcntl.lockf(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, self._slot(name))
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno in (11, 13):  # EAGAIN / EACCES: held elsewhere
                return False
            raise
        return True

    def unlock(self, name: str) -> None:
        fcntl.lockf(self._lock_fd, fcntl.LOCK_UN, 1, self._slot(name))

    # --- size ------------------------------------------------------------------------------
    def _scan(self) -> list[tuple[float, int, str]]:
        out = []
        root = os.path.join(self.path, CHUNKS_DIR)
        for sub in os.scandir(root):
            if not sub.is_dir():
                continue
            for f in os.scandir(sub.path):
                with contextlib.suppress(OSError):
                    st = f.stat()
                    out.append((st.st_mtime, st.st_size, f.path))
        return out

    def evict(self) -> None:
        """Bring the cache under max_bytes, least recently used first; one process at a time."""
        try:
            fcntl.lockf(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, _EVICT_LOCK)
        except OSError:
            return  # another process is at it
        try:
            files = self._scan()
            total = sum(size for _, size, _ in files)
            if total > self.max_bytes:
                files.sort()
                goal = int(self.max_bytes * LOW_WATER)
                for _, size, path in files:
                    if total <= goal:
                        break
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
                        total -= size
                        self.stats.evicted += 1
            with self._mu:
                self._bytes = total
                self._written_since_scan = 0
        finally:
            fcntl.lockf(self._lock_fd, fcntl.LOCK_UN, 1, _EVICT_LOCK)

    @property
    def bytes(self) -> int:
        return self._bytes


@contextlib.contextmanager
def _opened(path: str) -> Iterator[tuple[int, os.stat_result] | None]:
    """A cache file open for reading, with its stat; None if there is no such file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        yield None
        return
    try:
        yield fd, os.fstat(fd)
    finally:
        os.close(fd)


def _sized(st: os.stat_result, plain_len: int) -> bool:
    """Whether a cache file is as long as a chunk of ``plain_len`` bytes, with or without tags."""
    return st.st_size in (plain_len, plain_len + tags.trailer_len(plain_len))


Plain = bytes | bytearray
"""A chunk's checked plain bytes (never written to once checked)."""


class MemoryLRU:
    """Recently used plain chunks in memory, bounded in bytes: the next faults in a chunk are
    served inline, without a thread hop or a disk read. Event-loop thread only."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, Plain] = OrderedDict()
        self._bytes = 0

    def get(self, name: str) -> Plain | None:
        item = self._items.get(name)
        if item is not None:
            self._items.move_to_end(name)
        return item

    def put(self, name: str, plain: Plain) -> None:
        if name in self._items or len(plain) > self.max_bytes:
            return
        self._items[name] = plain
        self._bytes += len(plain)
        while self._bytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self._bytes -= len(old)


_caches: dict[str, ChunkCache] = {}
_caches_mu = threading.Lock()


def shared_cache(path: str, max_bytes: int) -> ChunkCache:
    """The process's one ChunkCache for ``path`` (opened on first use; blocking). One lock
    file descriptor per process matters: closing any descriptor of the lock file would drop
    every lock the process holds on it. Sources that disagree on max_bytes get the larger."""
    key = os.path.abspath(path)
    with _caches_mu:
        cache = _caches.get(key)
        if cache is None:
            cache = ChunkCache(path, max_bytes)
            cache.open()
            _caches[key] = cache
        cache.max_bytes = max(cache.max_bytes, max_bytes)
        return cache
