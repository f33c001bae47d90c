"""Page sources that misbehave on purpose, registered by tests under their own kinds."""

from __future__ import annotations

import asyncio
import random
import time
from typing import ClassVar, Literal

from uffdd.errors import SourceError
from uffdd.sources.base import PageSource, SourceConfig
from uffdd.sources.file import FileSource, FileSourceConfig


class FlakyConfig(SourceConfig):
    kind: Literal["flaky"] = "flaky"
    path: str
    fail_every: int = 2
    """One fill in n fails, at random (after scribbling garbage over part of the page)."""
    prefetch_crash_s: float = 0.0
    """For this long after opening, background reads fail as a process out of threads fails
    (RuntimeError, not a source error)."""


class FlakySource(PageSource):
    """A file source whose reads fail often and never take the inline path."""

    config_model: ClassVar[type[SourceConfig]] = FlakyConfig

    def __init__(self, inner: FileSource, fail_every: int, prefetch_crash_s: float = 0.0) -> None:
        self.inner = inner
        self.fail_every = fail_every
        self.crash_until = time.monotonic() + prefetch_crash_s
        self.crashes = 0
        self.calls = 0
        self.failures = 0
        self.rng = random.Random(5)

    @classmethod
    async def open(cls, config: SourceConfig, *, vm_id: str) -> FlakySource:
        assert isinstance(config, FlakyConfig)
        inner = await FileSource.open(FileSourceConfig(path=config.path), vm_id=vm_id)
        return cls(inner, config.fail_every, config.prefetch_crash_s)

    @property
    def size(self) -> int:
        return self.inner.size

    async def fill(self, offset: int, dest: memoryview) -> None:
        self.calls += 1
        await asyncio.sleep(0)
        if self.rng.randrange(self.fail_every) == 0:
            self.failures += 1
            dest[: len(dest) // 2] = b"\xee" * (len(dest) // 2)  # a half-written page must never reach the guest
            raise SourceError(f"injected failure at {offset}")
        await self.inner.fill(offset, dest)

    async def prefetch(self, offset: int, dest: memoryview) -> None:
        if time.monotonic() < self.crash_until:
            self.crashes += 1
            raise RuntimeError("can't start new thread")
        await self.fill(offset, dest)

    async def aclose(self) -> None:
        await self.inner.aclose()
