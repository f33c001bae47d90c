"""Pages from a packed image (``uffdd pack``) in a directory, on an HTTP server or in S3.

Chunks come from memory, then the host's chunk cache, then the store (see uffdd.images): a
demand fault fetches the chunk it needs at once, pre-paging and working-set replay fetch whole
chunks in the background, and every chunk is checked against its hash before a byte of it is
used. A failing store is retried; past ``deadline`` the source reports itself unreachable
(``unreachable``, a log line) and keeps trying. Pages are never filled with anything else.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ByteSize, ConfigDict, Field, field_validator, model_validator

from uffdd.errors import SourceUnavailable
from uffdd.images.fetcher import FetchOptions, FetchStats
from uffdd.images.reader import CacheSpec, ImageReader
from uffdd.images.store import StoreOptions, check_url
from uffdd.sources.base import PageSource, SourceConfig


class ImageCacheConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    path: str
    """Directory of the chunk cache; shared by every source, session and worker that names it."""
    max_bytes: ByteSize = Field(ge=1 << 20)
    """Bound on the cached chunks (e.g. 20GiB); least recently used chunks go first."""

    @field_validator("path")
    @classmethod
    def _absolute(cls, v: str) -> str:
        if not os.path.isabs(v):
            raise ValueError(f"expected an absolute path, got {v!r}")
        return v


class ImageSourceConfig(SourceConfig):
    kind: Literal["image"] = "image"
    url: str
    """The image's manifest: /path, file://, http(s)://, s3://, gs://, az://; ``{vm_id}`` is replaced."""
    digest: str | None = None
    """Pin the manifest: its BLAKE3 (as ``uffdd pack`` prints it); any other manifest is refused."""
    cache: ImageCacheConfig | None = None
    """The host's chunk cache; unset: chunks are kept in memory only while used."""
    memory_bytes: ByteSize = Field(default=ByteSize(64 << 20), ge=0)
    concurrency: int = Field(default=16, ge=1, le=1024)
    deadline: float = Field(default=60.0, gt=0, le=86400)
    """Seconds of failing store requests before the source is reported unreachable."""
    open_timeout: float = Field(default=10.0, gt=0, le=3600)
    timeout: float = Field(default=30.0, gt=0, le=3600)
    connect_timeout: float = Field(default=5.0, gt=0, le=300)
    retry_min: float = Field(default=0.05, gt=0, le=60)
    retry_max: float = Field(default=2.0, gt=0, le=600)
    endpoint: str | None = None
    """S3-compatible server (MinIO, Ceph...) for s3:// URLs."""
    region: str | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        check_url(v.replace("{vm_id}", "x"))
        if v.endswith("/"):
            raise ValueError(f"{v!r} names a folder; name the image's manifest (as `uffdd pack` prints it)")
        return v

    @field_validator("digest")
    @classmethod
    def _digest(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[0-9a-f]{64}", v):
            raise ValueError("expected 64 lower-case hex digits (the BLAKE3 `uffdd pack` prints)")
        return v

    @model_validator(mode="after")
    def _check(self) -> Any:
        if self.retry_max < self.retry_min:
            raise ValueError("retry_max must not be below retry_min")
        return self


class ImageSource(PageSource):
    """A packed memory image, read chunk by chunk through the host's chunk cache."""

    config_model: ClassVar[type[SourceConfig]] = ImageSourceConfig

    def __init__(self, reader: ImageReader) -> None:
        self.reader = reader

    @classmethod
    async def open(cls, config: SourceConfig, *, vm_id: str) -> ImageSource:
        assert isinstance(config, ImageSourceConfig)
        c = config
        reader = await ImageReader.open(
            c.url.replace("{vm_id}", vm_id),
            store_options=StoreOptions(timeout=c.timeout, connect_timeout=c.connect_timeout, endpoint=c.endpoint,
                                       region=c.region),
            fetch_options=FetchOptions(concurrency=c.concurrency, deadline=c.deadline, retry_min=c.retry_min,
                                       retry_max=c.retry_max, memory_bytes=int(c.memory_bytes)),
            cache=CacheSpec(c.cache.path, int(c.cache.max_bytes)) if c.cache else None,
            pinned_digest=c.digest, open_timeout=c.open_timeout)
        return cls(reader)

    @property
    def size(self) -> int:
        return self.reader.size

    @property
    def stats(self) -> FetchStats:
        """The counters of this store's fetcher (shared by the sessions of this process)."""
        return self.reader.fetcher.stats

    @property
    def unreachable(self) -> SourceUnavailable | None:
        """Set while the store has failed for longer than the deadline."""
        return self.reader.fetcher.unreachable

    def fill_nowait(self, offset: int, dest: memoryview) -> bool:
        return self.reader.read_nowait(offset, dest)

    async def fill(self, offset: int, dest: memoryview) -> None:
        await self.reader.read(offset, dest, urgent=True)

    async def prefetch(self, offset: int, dest: memoryview) -> None:
        await self.reader.read(offset, dest, urgent=False)

    def record_path(self) -> str | None:
        return self.reader.record_path()

    async def aclose(self) -> None:
        """Let the chunk-cache writes in flight finish (the fetcher itself serves other sessions)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await self.reader.fetcher.drain()

    def describe(self) -> str:
        return f"image:{self.reader.url}"
