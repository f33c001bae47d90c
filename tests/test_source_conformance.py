"""Every page-source kind passes the same conformance check (uffdd.testing.conformance).

A new kind is added to SOURCE_KINDS with a factory that opens it over a known snapshot; the
last test makes sure no built-in kind is left out.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import ByteSize

from uffdd.images.pack import PackOptions, pack
from uffdd.peer.image import Image
from uffdd.peer.server import PeerServer
from uffdd.sources import BUILTIN_SOURCES, PageSource
from uffdd.sources.file import FileSource, FileSourceConfig
from uffdd.sources.image import ImageCacheConfig, ImageSource, ImageSourceConfig
from uffdd.sources.peer import PeerSource, PeerSourceConfig
from uffdd.testing.conformance import check_page_source
from uffdd.testing.servers import NginxServer

Factory = Callable[[Path], contextlib.AbstractAsyncContextManager[PageSource]]


@contextlib.asynccontextmanager
async def file_source(snapshot: Path) -> AsyncIterator[PageSource]:
    source = await FileSource.open(FileSourceConfig(path=str(snapshot)), vm_id="conf")
    try:
        yield source
    finally:
        await source.aclose()


@contextlib.asynccontextmanager
async def file_source_on_tmpfs(snapshot: Path) -> AsyncIterator[PageSource]:
    shm = Path("/dev/shm") / f"uffdd-conformance-{os.getpid()}.mem"
    shm.write_bytes(snapshot.read_bytes())
    try:
        async with file_source(shm) as source:
            yield source
    finally:
        shm.unlink()


@contextlib.asynccontextmanager
async def peer_source(snapshot: Path, **options: Any) -> AsyncIterator[PageSource]:
    server = PeerServer({"default": Image.from_file("default", str(snapshot))})
    await server.start("127.0.0.1", 0)
    host, port = server.address
    try:
        source = await PeerSource.open(PeerSourceConfig(address=f"{host}:{port}", **options), vm_id="conf")
        try:
            yield source
        finally:
            await source.aclose()
    finally:
        await server.close()


@contextlib.asynccontextmanager
async def image_source(snapshot: Path, *, cache: bool = True, http: bool = False) -> AsyncIterator[PageSource]:
    """The snapshot packed into a store (a directory, or behind nginx) and read as ``kind: image``."""
    with tempfile.TemporaryDirectory(prefix="uffdd-conformance-") as tmp:
        packed = await pack(str(snapshot), f"{tmp}/store", PackOptions(name="conf"))
        server = NginxServer(f"{tmp}/store", f"{tmp}/nginx").start() if http else None
        try:
            url = f"{server.url}/conf.json" if server is not None else packed.url
            cfg = ImageSourceConfig(url=url, cache=ImageCacheConfig(path=f"{tmp}/cache", max_bytes=ByteSize(1 << 30))
                                    if cache else None)
            source = await ImageSource.open(cfg, vm_id="conf")
            try:
                yield source
            finally:
                await source.aclose()
        finally:
            if server is not None:
                server.stop()


SOURCE_KINDS: dict[str, Factory] = {
    "file": file_source,
    "file-tmpfs": file_source_on_tmpfs,
    "peer": peer_source,
    "peer-uncompressed": lambda snap: peer_source(snap, compression=False),
    "image": image_source,
    "image-http": lambda snap: image_source(snap, http=True),
    "image-without-cache": lambda snap: image_source(snap, cache=False),
}


@pytest.mark.parametrize("kind", sorted(SOURCE_KINDS))
async def test_source_kind_passes_the_conformance_check(kind: str, snapshot_4k: Path) -> None:
    async with SOURCE_KINDS[kind](snapshot_4k) as source:
        await check_page_source(source, snapshot_4k.read_bytes())


def test_every_built_in_source_kind_has_a_conformance_case() -> None:
    covered = {k.split("-")[0] for k in SOURCE_KINDS}
    assert set(BUILTIN_SOURCES) <= covered, f"no conformance case for {set(BUILTIN_SOURCES) - covered}"


async def test_the_conformance_check_catches_a_source_that_answers_past_the_end_with_zeros(
        snapshot_4k: Path) -> None:
    class ZeroPadding(FileSource):
        async def fill(self, offset: int, dest: memoryview) -> None:
            if offset >= self.size:
                dest[:] = bytes(len(dest))
                return
            await super().fill(offset, dest)

    fd = os.open(snapshot_4k, os.O_RDONLY | os.O_CLOEXEC)
    source = ZeroPadding(str(snapshot_4k), fd)
    try:
        with pytest.raises(AssertionError, match="past the end"):
            await check_page_source(source, snapshot_4k.read_bytes())
    finally:
        await source.aclose()
