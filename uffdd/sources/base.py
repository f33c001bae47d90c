"""The page-source interface: fill a destination buffer with the bytes at an offset.

Like an httpx transport, a source has one required method, :meth:`PageSource.fill`. A source
that can sometimes answer without waiting (a page-cache hit) also implements
:meth:`PageSource.fill_nowait`, which the fault loop calls inline, so the common case pays
neither a task nor a thread hop.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar, Protocol

from pydantic import BaseModel, ConfigDict


class DirectReceiver(Protocol):
    """Receives background runs straight into guest memory off the event loop (a peer's bulk
    link in C), arbitrating each page with demand faults through a claim byte per page:
    0 free, 1 taken by the event loop, 2 frozen (its bytes are being written: wait for them)."""

    async def fetch(self, offset: int, dest: memoryview, claims: memoryview,
                    on_frame: Callable[[int, int, bool], None]) -> None:
        """Fill ``dest`` (whole pages of shared memory) with the source's bytes at ``offset``;
        report each part as (first page, pages, ok) when it is checked and in place (ok: those of
        its pages still claimed 2 may be installed) or failed (unfrozen: they are not)."""

    def take(self, claims: memoryview, index: int) -> bool:
        """Atomically take page ``index`` (True), unless a part being written froze it (False)."""


class SourceConfig(BaseModel):
    """Options of a source kind; each kind subclasses this. Unknown keys are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: str


class PageSource(ABC):
    """Where a session's page contents come from. One instance per session."""

    config_model: ClassVar[type[SourceConfig]] = SourceConfig

    @classmethod
    @abstractmethod
    async def open(cls, config: SourceConfig, *, vm_id: str) -> PageSource:
        """Open the source for one guest. Raise SourceUnavailable with a reason on failure."""

    @property
    @abstractmethod
    def size(self) -> int | None:
        """Bytes in the source's address space, or None if unknown (then not checked)."""

    @abstractmethod
    async def fill(self, offset: int, dest: memoryview) -> None:
        """Write exactly ``len(dest)`` bytes from ``offset`` into ``dest``, or raise SourceError.

        Must not return with ``dest`` partly written: the caller installs it into the guest.
        """

    async def prefetch(self, offset: int, dest: memoryview) -> None:
        """Fill for background pre-paging. Sources with a slower, non-urgent path use it here
        so that demand fills never queue behind prefetch; by default the same as :meth:`fill`."""
        await self.fill(offset, dest)

    def backing_fd(self) -> int | None:
        """A regular file holding the source's bytes at the same offsets, for bulk copies made
        off the event loop (pwrite/preadv in a worker thread); None if there is none."""
        return None

    def record_path(self) -> str | None:
        """Where a working-set record for this source lives; None: recording not supported."""
        return None

    def inline_read(self) -> tuple[int, int] | None:
        """(fd, preadv2 flags) such that one preadv2 of a page at its offset either fills it
        exactly as :meth:`fill_nowait` would or reports that it cannot (short read, EAGAIN).
        Lets the C fast path read without calling back into Python. Default: None."""
        return None

    def direct_bulk(self) -> DirectReceiver | None:
        """Background runs received into guest memory by the source itself, off the event loop
        (shared memory of base pages only); None: :meth:`prefetch` into private buffers."""
        return None

    def native_link(self) -> object | None:
        """A C peer link (``uffdd.peer._native.Link``) the C fault path may send its demand fills
        to directly; it checks and writes the bytes into guest memory exactly as :meth:`fill`
        would have. Default: None."""
        return None

    def changed(self) -> str | None:
        """Why the source's bytes are no longer those the session started from, or None.
        Checked periodically: a restore must not go on silently from a rewritten image.
        Default: None (sources that verify every byte against a hash need no check)."""
        return None

    def fill_nowait(self, offset: int, dest: memoryview) -> bool:
        """Try to fill without blocking; False means "use :meth:`fill`". Default: never."""
        return False

    async def aclose(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Release what the source holds. Called once when the session ends."""

    def describe(self) -> str:
        """Short human-readable name for logs."""
        return type(self).__name__
