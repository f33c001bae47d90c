"""Working-set recording: the order in which the guest first faulted its pages.

Saved next to the snapshot when the session ends (uffdd.core.workingset has the format), so
that a later restore of the same snapshot pre-pages exactly those pages first (REAP).
"""

from __future__ import annotations

import structlog

from uffdd.core.regions import Region
from uffdd.core.workingset import save_record
from uffdd.sources import PageSource


class Recorder:
    def __init__(self, source: PageSource, page_size: int, log: structlog.typing.FilteringBoundLogger) -> None:
        self.source = source
        self.page_size = page_size
        self._log = log
        self.pages: list[int] | None = []
        """Source page numbers, first fault first; None once recording stopped."""

    def note(self, region: Region, idx: int) -> None:
        """A demand fault on EMPTY page ``idx`` of ``region``."""
        if self.pages is not None:
            self.pages.append((region.offset >> region.shift) + idx)

    def skip(self) -> None:
        """A recorded working set was replayed: keep that record rather than this run's."""
        self.pages = None

    async def save(self) -> None:
        pages, self.pages = self.pages, None
        path = self.source.record_path()
        if not pages or path is None or self.source.size is None:
            return
        try:
            await save_record(path, pages, source_size=self.source.size, page_size=self.page_size)
            self._log.info("working_set_recorded", path=path, pages=len(pages))
        except OSError as exc:
            self._log.warning("working_set_not_recorded", path=path, error=str(exc))


__all__ = ["Recorder"]
