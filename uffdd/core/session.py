"""One VMM's guest, served from start to end: the parts of uffdd.core, composed.

- :class:`~uffdd.core.guest.Guest`: page states, regions, second mapping, installs;
- :class:`~uffdd.core.faultloop.FaultLoop` (+ its C twin, uffdd.core.native): reads the
  userfaultfd and dispatches each message;
- :class:`~uffdd.core.fill.DemandFiller`: demand fills with fault-around;
- :class:`~uffdd.core.events.Events`: REMOVE, UNMAP, REMAP;
- :class:`~uffdd.core.prefetch.Prefetcher` and :class:`~uffdd.core.bulk.BulkFetcher`: the rest;
- :class:`~uffdd.core.completion.Completion`: unregister and report once everything is in;
- :class:`~uffdd.core.recorder.Recorder`: the working set, for the next restore.

The session owns the userfaultfd, the memory file and the source; :meth:`Session.close` gives
them all back at once, threads that copy into guest memory first.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

import structlog

from uffdd.config import SessionConfig
from uffdd.core.bulk import BulkFetcher
from uffdd.core.completion import Completion
from uffdd.core.events import Events
from uffdd.core.faultloop import FaultLoop
from uffdd.core.fill import DemandFiller
from uffdd.core.guest import PREFETCH, Guest
from uffdd.core.native import NativePath, native_available
from uffdd.core.orphans import Orphans
from uffdd.core.pagestate import FILLED, INSTALLING, REMOVED, UNMAPPED, PageStates
from uffdd.core.prefetch import Prefetcher
from uffdd.core.recorder import Recorder
from uffdd.core.registration import EVENTS, prepare_uffd
from uffdd.core.retry import Retries
from uffdd.core.stats import SessionStats
from uffdd.core.tasks import Tasks
from uffdd.errors import SourceChanged
from uffdd.handshake import Handshake, check_against
from uffdd.kernel import KernelError, Userfaultfd, abi, file_page_size, file_size
from uffdd.sources import PageSource

log = structlog.get_logger("uffdd.session")

SOURCE_CHECK_S = 0.5
"""How often a session checks that its source has not changed under it (one fstat)."""


class Session:
    """Serves one guest until :meth:`close`. Owns the uffd, the memfd, its mapping and source."""

    def __init__(self, *, session_id: str, handshake: Handshake, uffd: Userfaultfd, memfd: int | None,
                 source: PageSource, config: SessionConfig | None = None, preinitialized: bool = False,
                 features: int = 0, states: PageStates | None = None, resumed: bool = False) -> None:
        self.id = session_id
        self.handshake = handshake
        self.vm_id = handshake.vm_id
        self.config = config if config is not None else SessionConfig()
        self.source = source
        self.preinitialized = preinitialized
        self.features = features
        self.resumed = resumed
        self._log = log.bind(session=session_id, vm_id=self.vm_id)
        total = sum(r.pages for r in handshake.regions)
        self.states = states if states is not None else PageStates(total)
        self.stats = SessionStats(pages_total=total)
        self.guest = Guest(session_id=session_id, handshake=handshake, uffd=uffd, memfd=memfd,
                           states=self.states, stats=self.stats, log=self._log)
        self._tasks = Tasks()
        self.filler = DemandFiller(self.guest, source, self._tasks.spawn, fault_around=self.config.fault_around)
        self.recorder = Recorder(source, handshake.page_size, self._log) if self.config.record else None
        self.events = Events(self.guest, on_moved=self._moved)
        self.fetcher = BulkFetcher(self.guest, source, self.filler.refill)
        self.prefetcher = Prefetcher(self.guest, source, self.fetcher, self.config,
                                     on_replay=self.recorder.skip if self.recorder else lambda: None)
        self.faults = FaultLoop(self.guest, self.filler, self.events, on_failure=self._fail,
                                note=self.recorder.note if self.recorder else None)
        self.faults.steal = self.fetcher.steal
        self.completion = Completion(self.guest, spawn=self._tasks.spawn, before=self.prefetcher.stop,
                                     drain=self.faults.on_readable, finish=self._finish)
        self.guest.on_all_filled = self.completion.schedule
        self.guest.on_gone = self._fail
        self.native: NativePath | None = None
        """The C fault path, when it serves this session (see :meth:`start`)."""
        self.fault_path = ""
        """Which fault path serves this session, chosen at start: "c" or "python"."""
        self.peer: dict[str, int] = {}
        """The VMM process as the kernel saw it (``peer_pid``, ``peer_uid``, ``peer_gid``), for the log."""
        self.started = False
        self._closed = False
        self._releasing: asyncio.Task[None] | None = None
        self.completed = False
        self.failure: BaseException | None = None
        self.done: asyncio.Event = asyncio.Event()
        self.on_complete: Callable[[Session], None] | None = None
        self.orphans: Orphans | None = None
        """Where the userfaultfd goes if the VMM hangs up early (see :mod:`uffdd.core.orphans`)."""
        self.vmm_pidfd: int | None = None
        """The VMM process (a pidfd, owned by the session), when known."""
        self._close_reason = ""
        self.on_regions_changed: Callable[[Session], None] | None = None
        """Called after an mremap moved or split regions (see :meth:`current_handshake`)."""

    @classmethod
    def create(cls, *, session_id: str, handshake: Handshake, uffd_fd: int, memfd: int | None, source: PageSource,
               config: SessionConfig | None = None) -> Session:
        """Validate the handshake against the fds and the source, set up the uffd, and build.

        Takes ownership of the fds only on success; on failure the caller still owns them.
        """
        if memfd is None:
            check_against(handshake, memfd_size=None, memfd_page_size=None, source_size=source.size)
            hugetlb = handshake.page_size > 4096
        else:
            page_size = file_page_size(memfd)
            check_against(handshake, memfd_size=file_size(memfd), memfd_page_size=page_size,
                          source_size=source.size)
            hugetlb = page_size > 4096
        uffd = Userfaultfd(uffd_fd)
        preinit, feats = prepare_uffd(uffd, handshake, hugetlb=hugetlb, anonymous=memfd is None)
        return cls(session_id=session_id, handshake=handshake, uffd=uffd, memfd=memfd, source=source,
                   config=config, preinitialized=preinit, features=feats)

    # --- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        """Begin serving faults on the running loop; faults queued before now are served too."""
        loop = asyncio.get_running_loop()
        guest = self.guest
        guest.retries = Retries(loop, before=self.faults.on_readable)
        if self.resumed:
            self.states.recover(anonymous=guest.anonymous)
            done = sum(self.states.count(v) for v in (FILLED, REMOVED, UNMAPPED))
            self.stats.pages_filled = self.stats.in_place[0] = done
        self.native = self.faults.native = self._start_native()
        self.fault_path = "c" if self.native is not None else "python"
        loop.add_reader(guest.uffd.fileno(), self.faults.on_readable)
        self.started = True
        self._log.info(
            "session_start", regions=len(guest.regions), pages=self.stats.pages_total, page_size=guest.page_size,
            bytes=self.handshake.total_bytes, source=self.source.describe(), preregistered=self.preinitialized,
            resumed=self.resumed, pages_filled=self.stats.pages_filled, memory=self.memory_kind,
            events=abi.feature_names(self.features & EVENTS), fault_around=self.filler.block_pages,
            prefetch=self.config.prefetch.enabled, fault_path=self.fault_path, **self.peer)
        if self.resumed:
            self._resume()
        loop.call_soon(self.faults.on_readable)  # faults may have queued before add_reader
        self._tasks.spawn(self.prefetcher.run())
        self._tasks.spawn(self._watch_source())
        self.completion.enabled = True
        if self.stats.all_in_place:
            self.completion.schedule()

    def _start_native(self) -> NativePath | None:
        """The C path, where it does exactly what the Python path would."""
        if not (self.config.native and native_available() and not self.guest.anonymous and self.recorder is None):
            return None
        inline = self.source.inline_read()
        if inline is not None:
            return NativePath(self.guest, inline[0], inline[1], self.filler.block_pages)
        link = self.source.native_link()
        if link is None:
            return None
        return NativePath(self.guest, -1, 0, self.filler.block_pages, link=link, refill=self.filler.fill)

    @property
    def memory_kind(self) -> str:
        return "anonymous" if self.guest.anonymous else ("hugetlbfs" if self.guest.hugetlb else "shmem")

    def _resume(self) -> None:
        """Take over from a daemon that died: finish its CONTINUEs, then make every waiting vCPU
        fault again, since the fault messages the old daemon had read are gone."""
        guest = self.guest
        for r in list(guest.regions):
            i = 0
            while (i := self.states.find(INSTALLING, r.base + i, r.base + r.npages) - r.base) >= 0:
                guest.install_run(r, i, 1, PREFETCH)
                i += 1
        for r in guest.regions:
            try:
                guest.uffd.wake(r.start, r.end - r.start)
            except KernelError as exc:
                self._log.warning("resume_wake_failed", region=r.index, error=str(exc))

    def _moved(self) -> None:
        if self.native is not None:
            self.native.set_regions()
        if self.on_regions_changed is not None:
            self.on_regions_changed(self)

    async def _watch_source(self) -> None:
        """Until the session ends: a source whose bytes change under the restore ends it."""
        while True:
            await asyncio.sleep(SOURCE_CHECK_S)
            why = self.source.changed()
            if why is not None:
                self.stats.source_changed = 1
                self._fail(SourceChanged(why))
                return

    def _fail(self, exc: BaseException) -> None:
        """The guest is gone or the uffd is unusable: record it and end the session."""
        if self.failure is None:
            self.failure = exc
        if self.started and not self.closed:
            self._tasks.spawn(self.close(reason=type(exc).__name__))

    async def close(self, reason: str = "vmm disconnected") -> None:
        """Stop serving and release everything the session holds, at once. A second caller
        waits until the first one is done."""
        if self._closed:
            await self.done.wait()
            return
        self._closed = self.guest.closed = True
        self._close_reason = reason
        await self._stop_work()
        if self.recorder is not None:
            await self.recorder.save()
        await self._release()
        s = self.stats
        level = self._log.error if self.failure else self._log.info
        level("session_end", reason=reason, **s.as_dict(), pages_unfilled=s.pages_total - s.pages_filled,
              completed=self.completed, error=str(self.failure) if self.failure else None)
        self.states.close()
        if self.guest.memfd is not None:
            os.close(self.guest.memfd)
        self.done.set()

    async def _finish(self) -> None:
        """Completion: every page is in place and the ranges are unregistered."""
        await self._stop_work()
        self.completed = True
        if self.recorder is not None:
            await self.recorder.save()
        await self._release()
        self._log.info("session_complete", **self.stats.as_dict())
        if self.on_complete is not None:
            self.on_complete(self)

    async def _stop_work(self) -> None:
        self.faults.stopped = True
        uffd = self.guest.uffd
        if self.started and not uffd.closed:
            asyncio.get_running_loop().remove_reader(uffd.fileno())
        if self.guest.retries is not None:
            self.guest.retries.cancel()
        self.completion.cancel()
        await self._tasks.cancel()

    async def _release(self) -> None:
        """Give back, in this order: the C path's views, the copy threads (they may still write
        into guest memory from the source's fd), the source, the mappings, the userfaultfd.
        Runs once, to the end even if its first caller is cancelled; later callers wait for it."""
        if self._releasing is None:
            self._releasing = asyncio.get_running_loop().create_task(self._release_all())
        await asyncio.shield(self._releasing)

    async def _release_all(self) -> None:
        if self.native is not None:
            self.native.close()
            self.native = self.faults.native = None
        await asyncio.to_thread(self.fetcher.close)
        await self.source.aclose()
        self.filler.close()
        self.guest.close()
        pidfd, self.vmm_pidfd = self.vmm_pidfd, None
        if pidfd is not None:
            orphans = self.orphans
            early = not self.completed and self._close_reason != "handed over" and self.features & EVENTS
            if early and orphans is not None and orphans.adopt(self.guest.uffd, pidfd):
                return  # the VMM's unmaps and discards must not block on a userfaultfd nobody reads
            os.close(pidfd)
        self.guest.uffd.close()

    # --- queries -------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def pages_in_flight(self) -> int:
        """Pages being fetched from the source now: kept by the fillers as they go, so a metrics
        scrape never scans the page states."""
        return self.filler.inflight + self.fetcher.inflight_pages

    @property
    def memfd(self) -> int | None:
        return self.guest.memfd

    @property
    def page_size(self) -> int:
        return self.guest.page_size

    @property
    def pages_remaining(self) -> int:
        return self.guest.pages_remaining

    def current_handshake(self) -> Handshake:
        """The regions as they are now (moved, split), in page-state order: a successor built
        from this handshake and the same PageStates sees every page where it is."""
        return Handshake(vm_id=self.vm_id, source=self.handshake.source, regions=self.guest.regions.layout())

    def summary(self) -> dict[str, object]:
        return {"session": self.id, "vm_id": self.vm_id, "source": self.source.describe(),
                "completed": self.completed, **self.stats.as_dict()}


__all__ = ["Session"]
