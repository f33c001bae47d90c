"""Reading a packed image by offset: the manifest, and chunks through the shared fetcher."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

from uffdd.errors import SourceShortRead, SourceUnavailable
from uffdd.images.cache import ChunkCache, Plain, shared_cache
from uffdd.images.fetcher import ChunkFetcher, FetchOptions, executor
from uffdd.images.format import MAX_MANIFEST_BYTES as _MANIFEST_LIMIT
from uffdd.images.format import ImageFormatError, Manifest, digest, parse_manifest
from uffdd.images.memops import copy_into, populate
from uffdd.images.store import ObjectStore, StoreError, StoreOptions, split_url

_ZEROS = memoryview(bytes(2 << 20))
READ_AHEAD = 32
"""Chunks fetched ahead of pre-paging (in the background, into memory)."""
Piece = tuple[int, int, int, int]
"""(chunk index, offset in the chunk, offset in dest, bytes)."""
_fetchers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[str, str], ChunkFetcher]] = \
    weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class CacheSpec:
    path: str
    max_bytes: int


def shared_fetcher(store_url: str, store_options: StoreOptions, cache: CacheSpec | None,
                   options: FetchOptions, *, cache_obj: ChunkCache | None = None) -> ChunkFetcher:
    """The event loop's one fetcher for this store and cache: every session of the process
    that reads from the same store shares its chunks, its slots and its view of the outage."""
    per_loop = _fetchers.setdefault(asyncio.get_running_loop(), {})
    key = (store_url, cache.path if cache else "")
    fetcher = per_loop.get(key)
    if fetcher is None:
        fetcher = per_loop[key] = ChunkFetcher(ObjectStore(store_url, store_options), cache_obj, options)
    return fetcher


class ImageReader:
    """One image: maps byte ranges to chunks and fills buffers from them."""

    def __init__(self, url: str, manifest: Manifest, image_id: str, fetcher: ChunkFetcher) -> None:
        self.url = url
        self.manifest = manifest
        self.image_id = image_id
        """BLAKE3 of the manifest's bytes: names this exact image (working-set records)."""
        self.fetcher = fetcher

    @classmethod
    async def open(cls, url: str, *, store_options: StoreOptions, fetch_options: FetchOptions,
                   cache: CacheSpec | None = None, pinned_digest: str | None = None,
                   open_timeout: float = 10.0) -> ImageReader:
        """Fetch and check the manifest (retrying until ``open_timeout``); SourceUnavailable if not."""
        store_url, key = split_url(url)
        loop = asyncio.get_running_loop()
        cache_obj = None
        if cache is not None:
            try:
                cache_obj = await loop.run_in_executor(executor(), shared_cache, cache.path, cache.max_bytes)
            except OSError as exc:
                raise SourceUnavailable(f"chunk cache {cache.path!r}: {exc.strerror or exc}") from None
        fetcher = shared_fetcher(store_url, store_options, cache, fetch_options, cache_obj=cache_obj)
        raw = await _get_manifest(fetcher.store, key, url, open_timeout)
        image_id = digest(raw)
        if pinned_digest is not None and image_id != pinned_digest:
            raise SourceUnavailable(f"image {url}: manifest digest is {image_id}, the config pins {pinned_digest}")
        try:
            manifest = parse_manifest(raw)
        except ImageFormatError as exc:
            raise SourceUnavailable(f"image {url}: {exc}") from None
        return cls(url, manifest, image_id, fetcher)

    @property
    def size(self) -> int:
        return self.manifest.size

    def record_path(self) -> str | None:
        cache = self.fetcher.cache
        return cache.workset_path(self.image_id) if cache is not None else None

    def _pieces(self, offset: int, length: int) -> Iterator[Piece]:
        """(chunk index, offset in chunk, offset in dest, bytes) covering [offset, offset+length)."""
        if offset < 0 or offset + length > self.manifest.size:
            raise SourceShortRead(f"image {self.url} holds {self.manifest.size} bytes; asked for "
                                  f"{length} at {offset}")
        cs = self.manifest.chunk_size
        pos, end = offset, offset + length
        while pos < end:
            index, within = divmod(pos, cs)
            n = min(cs - within, end - pos)
            yield index, within, pos - offset, n
            pos += n

    def read_nowait(self, offset: int, dest: memoryview) -> bool:
        """Fill from memory, zero chunks and page-cached cache files; False if any part would
        need waiting (``dest`` may then be partly written: the caller fills it again)."""
        m, fetcher = self.manifest, self.fetcher
        for index, within, at, n in self._pieces(offset, len(dest)):
            ref = m.table[index]
            if ref is None:
                _copy(dest, at, None, within, n)
            elif n == m.chunk_len(index):
                if not fetcher.load_nowait(ref, dest[at : at + n]):
                    return False
            elif not fetcher.read_part_nowait(ref, m.chunk_len(index), within, dest[at : at + n]):
                return False
        return True

    async def read(self, offset: int, dest: memoryview, *, urgent: bool) -> None:
        """Fill ``dest`` completely from the chunks (fetched concurrently), or raise SourceError."""
        if not urgent:
            await self._read_background(offset, dest)
            return
        m = self.manifest
        pieces = list(self._pieces(offset, len(dest)))
        wanted = [(index, ref) for index, _, _, _ in pieces if (ref := m.table[index]) is not None]
        if len(wanted) == 1:  # the usual fault: one chunk, awaited without a gather's extra task
            got = [await self.fetcher.get(wanted[0][1], m.chunk_len(wanted[0][0]), urgent=True)]
        else:
            got = await asyncio.gather(*(self.fetcher.get(ref, m.chunk_len(i), urgent=True) for i, ref in wanted))
        plains = iter(got)
        for index, within, at, n in pieces:
            _copy(dest, at, None if m.table[index] is None else next(plains), within, n)

    async def _read_background(self, offset: int, dest: memoryview) -> None:
        """Pre-paging: zeros and cached chunks are written into ``dest`` by a worker thread
        (one hop per run, copies without the GIL); the rest is fetched, then copied the same way."""
        m, fetcher = self.manifest, self.fetcher
        loop = asyncio.get_running_loop()
        pieces = list(self._pieces(offset, len(dest)))
        self._read_ahead(pieces[-1][0] + 1)
        todo = await loop.run_in_executor(executor(), self._fill_local, dest, pieces)
        # Keep in memory only chunks this run uses part of: the next run needs the rest.
        got = await asyncio.gather(*(
            fetcher.get(ref, m.chunk_len(index), urgent=False, keep=n < m.chunk_len(index))
            for index, _, _, n in todo if (ref := m.table[index]) is not None))
        if todo:
            parts: list[tuple[int, Plain | None, int, int]] = [
                (at, plain, within, n) for (_, within, at, n), plain in zip(todo, got, strict=True)]
            await loop.run_in_executor(executor(), copy_into, dest, parts)

    def _read_ahead(self, first: int) -> None:
        """Start fetching the chunks after a pre-paging run (those the cache does not hold), so
        the store is kept busy while the daemon installs what it has: pre-paging moves on."""
        m = self.manifest
        for index in range(first, min(first + READ_AHEAD, len(m.table))):
            ref = m.table[index]
            if ref is not None:
                self.fetcher.read_ahead(ref, m.chunk_len(index))

    def _fill_local(self, dest: memoryview, pieces: list[Piece]) -> list[Piece]:
        """Worker thread: write the zero chunks and the whole chunks the cache holds; return
        the pieces still to fetch."""
        m, cache = self.manifest, self.fetcher.cache
        populate(dest)  # one call, instead of a page fault per page while copying
        zeros: list[tuple[int, Plain | None, int, int]] = []
        todo = []
        for index, within, at, n in pieces:
            ref = m.table[index]
            if ref is None:
                zeros.append((at, None, within, n))
            elif not (cache is not None and n == m.chunk_len(index) and cache.load(ref.name, dest[at : at + n])):
                todo.append((index, within, at, n))
        copy_into(dest, zeros)
        self.fetcher.stats.cache_hits += sum(1 for p in pieces if m.table[p[0]] is not None) - len(todo)
        return todo


def _copy(dest: memoryview, at: int, plain: Plain | None, within: int, n: int) -> None:
    if plain is None:
        while n > 0:  # a zero chunk (possibly larger than the zero buffer)
            k = min(n, len(_ZEROS))
            dest[at : at + k] = _ZEROS[:k]
            at += k
            n -= k
    else:
        dest[at : at + n] = memoryview(plain)[within : within + n]


async def _get_manifest(store: ObjectStore, key: str, url: str, open_timeout: float) -> bytes:
    loop = asyncio.get_running_loop()
    give_up = loop.time() + open_timeout
    delay = 0.05
    while True:
        try:
            return bytes(await store.get(key, limit=_MANIFEST_LIMIT))
        except StoreError as exc:
            if exc.missing or loop.time() + delay > give_up:
                raise SourceUnavailable(f"image {url}: cannot read the manifest: {exc}") from None
        await asyncio.sleep(delay)
        delay = min(delay * 2, 1.0)
