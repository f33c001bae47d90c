"""``uffdd pack``: a raw memory file -> a packed image; ``--verify``: re-read one and check it.

Chunks are hashed and compressed in worker threads (both release the GIL) and written with
bounded concurrency. A chunk of zeros is not stored; a chunk whose hash the parent image has at
the same place, that this image already holds, or that the store already has (another image's)
is not written again. The manifest is written last, so a reader never finds a manifest whose
chunks are not all there.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from uffdd.images.fetcher import executor
from uffdd.images.format import (
    CODECS,
    DEFAULT_CHUNK,
    MAX_CHUNK,
    MAX_MANIFEST_BYTES,
    MIN_CHUNK,
    PAGE_SIZES,
    ChunkRef,
    ImageFormatError,
    Manifest,
    chunk_key,
    digest,
    open_chunk,
    parse_manifest,
    seal_chunk,
)
from uffdd.images.store import ObjectStore, StoreError, StoreOptions, split_url

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class PackError(Exception):
    """The memory file, the destination or the parent is not usable; the message says why."""


@dataclass(frozen=True)
class PackOptions:
    name: str | None = None
    """Image name: the manifest is DEST/NAME.json. Default: the memory file's name, less its suffix."""
    parent: str | None = None
    """A manifest URL, or the name of an image in DEST."""
    chunk_size: int = DEFAULT_CHUNK
    compression: str = "zstd"
    level: int = 3
    page_size: int = 4096
    concurrency: int = 16
    store: StoreOptions = field(default_factory=StoreOptions)


@dataclass
class PackResult:
    url: str
    digest: str
    size: int = 0
    chunks: int = 0
    zero_chunks: int = 0
    from_parent: int = 0
    duplicates: int = 0
    """Chunks this image holds more than once, or that the store already had."""
    written: int = 0
    written_bytes: int = 0
    stored_bytes: int = 0
    seconds: float = 0.0


def manifest_url(dest: str, name: str) -> str:
    return f"{dest.rstrip('/')}/{name}.json"


async def load_manifest(url: str, options: StoreOptions | None = None) -> tuple[Manifest, str]:
    """(manifest, its digest) from a manifest URL; PackError if unreadable or malformed."""
    base, key = split_url(url)
    try:
        raw = bytes(await ObjectStore(base, options).get(key, limit=MAX_MANIFEST_BYTES))
        return parse_manifest(raw), digest(raw)
    except (StoreError, ImageFormatError) as exc:
        raise PackError(f"{url}: {exc}") from None


class _Packer:
    def __init__(self, view: memoryview, size: int, opts: PackOptions, store: ObjectStore,
                 parent: Manifest | None) -> None:
        self.view, self.size, self.opts, self.store = view, size, opts, store
        self.count = -(-size // opts.chunk_size)
        self.parent_names = [None] * self.count if parent is None else [
            r.name if r is not None and i < len(parent.table) else None
            for i, r in enumerate(parent.table[: self.count])] + [None] * max(0, self.count - len(parent.table))
        self.sizes: dict[str, int] = {} if parent is None else {r.name: r.stored for r in parent.table if r}
        self.writing: dict[str, asyncio.Future[None]] = {}
        self.table: list[ChunkRef | None] = [None] * self.count
        self.res = PackResult(url="", digest="", size=size, chunks=self.count)
        self.next = 0

    def prepare(self, i: int) -> tuple[str | None, bytes | None]:
        """Worker thread: (hash, object to write) of chunk i; (None, None) for zeros; no object
        when the parent or this image already has the chunk."""
        cs = self.opts.chunk_size
        piece = self.view[i * cs : min((i + 1) * cs, self.size)]
        if bytes(piece) == _zeros(len(piece)):  # (memoryview == bytes compares item by item: slow)
            return None, None
        name = digest(piece)
        if name == self.parent_names[i] or name in self.sizes:
            return name, None
        return name, seal_chunk(piece, self.opts.compression, self.opts.level)

    async def worker(self) -> None:
        loop = asyncio.get_running_loop()
        while self.next < self.count:
            i = self.next
            self.next += 1
            name, blob = await loop.run_in_executor(executor(), self.prepare, i)
            if name is None:
                self.res.zero_chunks += 1
                continue
            if name == self.parent_names[i]:
                self.res.from_parent += 1
            elif name in self.sizes or name in self.writing or blob is None:
                self.res.duplicates += 1
                if name in self.writing:
                    await self.writing[name]
            else:
                await self._write(name, blob)
            self.table[i] = ChunkRef(name, self.sizes[name])

    async def _write(self, name: str, blob: bytes) -> None:
        done = self.writing[name] = asyncio.get_running_loop().create_future()
        try:
            have = await self.store.size_of(chunk_key(name))
            if have is None:
                await self.store.put(chunk_key(name), blob)
                self.res.written += 1
                self.res.written_bytes += len(blob)
                self.sizes[name] = len(blob)
            else:
                self.res.duplicates += 1
                self.sizes[name] = have
        finally:
            done.set_result(None)
            del self.writing[name]


_ZERO_CACHE: dict[int, bytes] = {}


def _zeros(n: int) -> bytes:
    z = _ZERO_CACHE.get(n)
    if z is None:
        z = _ZERO_CACHE[n] = bytes(n)
    return z


def _check_options(opts: PackOptions, size: int) -> None:
    cs = opts.chunk_size
    if not MIN_CHUNK <= cs <= MAX_CHUNK or cs & (cs - 1):
        raise PackError(f"--chunk-size: {cs} is not a power of two in [{MIN_CHUNK}, {MAX_CHUNK}]")
    if opts.compression not in CODECS:
        raise PackError(f"--compression: {opts.compression!r} is not one of {', '.join(CODECS)}")
    if opts.page_size not in PAGE_SIZES:
        raise PackError(f"--page-size: {opts.page_size} is not one of {PAGE_SIZES}")
    if size == 0 or size % opts.page_size:
        raise PackError(f"the memory file holds {size} bytes: not a positive multiple of the page size "
                        f"{opts.page_size}")


async def pack(memory_file: str, dest: str, opts: PackOptions,
               on_progress: Callable[[PackResult], None] | None = None) -> PackResult:
    """Pack ``memory_file`` into the store ``dest``; return what was written and the manifest URL."""
    t0 = time.perf_counter()
    name = opts.name or os.path.basename(memory_file).rsplit(".", 1)[0]
    if not _NAME.fullmatch(name):
        raise PackError(f"image name {name!r}: use 1-128 of [A-Za-z0-9._-] (--name)")
    try:
        fd = os.open(memory_file, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise PackError(f"{memory_file}: {exc.strerror}") from None
    try:
        size = os.fstat(fd).st_size
        _check_options(opts, size)
        parent, parent_url, parent_digest = await _parent(dest, opts)
        store = ObjectStore(dest, opts.store, create=True)
        with mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ) as mm:
            mm.madvise(mmap.MADV_SEQUENTIAL)
            view = memoryview(mm)
            try:
                packer = _Packer(view, size, opts, store, parent)
                workers = [asyncio.create_task(packer.worker()) for _ in range(max(1, opts.concurrency))]
                await _gather_all(workers, on_progress, packer.res)
            finally:
                view.release()
    except StoreError as exc:
        raise PackError(str(exc)) from None
    finally:
        os.close(fd)
    manifest = Manifest(size=size, page_size=opts.page_size, chunk_size=opts.chunk_size, table=tuple(packer.table),
                        parent=parent_url, parent_digest=parent_digest,
                        created=datetime.now(UTC).isoformat(timespec="seconds"))
    raw = manifest.to_json()
    res = packer.res
    res.url, res.digest = manifest_url(dest, name), digest(raw)
    try:
        await store.put(f"{name}.json", raw)
    except StoreError as exc:
        raise PackError(str(exc)) from None
    res.stored_bytes = manifest.stored_bytes
    res.seconds = time.perf_counter() - t0
    return res


async def _gather_all(workers: list[asyncio.Task[None]], on_progress: Callable[[PackResult], None] | None,
                      res: PackResult) -> None:
    try:
        while True:
            done, pending = await asyncio.wait(workers, timeout=0.5)
            for t in done:
                t.result()
            if on_progress is not None:
                on_progress(res)
            if not pending:
                return
            workers = list(pending)
    except BaseException:
        for t in workers:
            t.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        raise


async def _parent(dest: str, opts: PackOptions) -> tuple[Manifest | None, str | None, str | None]:
    if opts.parent is None:
        return None, None, None
    url = opts.parent if ("/" in opts.parent or ":" in opts.parent) else manifest_url(dest, opts.parent)
    if split_url(url)[0].rstrip("/") != dest.rstrip("/"):
        raise PackError(f"--parent {opts.parent}: a parent must be an image in the same store ({dest}): "
                        "the new image refers to its chunks there")
    parent, parent_digest = await load_manifest(url, opts.store)
    if parent.chunk_size != opts.chunk_size or parent.page_size != opts.page_size:
        raise PackError(f"--parent {opts.parent}: chunk size {parent.chunk_size} and page size {parent.page_size} "
                        f"differ from this image's {opts.chunk_size} and {opts.page_size}")
    return parent, split_url(url)[1], parent_digest


@dataclass
class VerifyResult:
    url: str
    chunks: int = 0
    checked: int = 0
    bad: list[str] = field(default_factory=list)
    mismatched: list[int] = field(default_factory=list)
    """Chunk indices whose bytes differ from the memory file given to compare with."""


async def verify(url: str, *, against: str | None = None, concurrency: int = 16,
                 options: StoreOptions | None = None) -> VerifyResult:
    """Fetch every chunk of an image and check it (and, given a memory file, compare with it)."""
    manifest, _ = await load_manifest(url, options)
    store = ObjectStore(split_url(url)[0], options)
    res = VerifyResult(url=url, chunks=len(manifest.table))
    ref_bytes: Any = None
    if against is not None:
        with open(against, "rb") as fh:  # noqa: ASYNC230 - a CLI command, no other work to block
            ref_bytes = mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ)
        if len(ref_bytes) != manifest.size:
            raise PackError(f"{against}: {len(ref_bytes)} bytes, the image holds {manifest.size}")
    sem = asyncio.Semaphore(concurrency)
    loop = asyncio.get_running_loop()

    async def one(i: int, ref: ChunkRef | None) -> None:
        n = manifest.chunk_len(i)
        plain: bytes | None = None
        if ref is not None:
            async with sem:
                try:
                    blob = await store.get(chunk_key(ref.name), size=ref.stored, limit=ref.stored)
                    plain = await loop.run_in_executor(executor(), open_chunk, blob, ref.name, n)
                except (StoreError, ImageFormatError) as exc:
                    res.bad.append(f"table[{i}] {ref.name}: {exc}")
                    return
        res.checked += 1
        if ref_bytes is not None:
            cs = manifest.chunk_size
            want = ref_bytes[i * cs : i * cs + n]
            if (plain if plain is not None else _zeros(n)) != want:
                res.mismatched.append(i)

    try:
        await asyncio.gather(*(one(i, r) for i, r in enumerate(manifest.table)))
    finally:
        if ref_bytes is not None:
            ref_bytes.close()
    return res
