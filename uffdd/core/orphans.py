"""Userfaultfds of sessions whose VMM hung up before every page was in place.

With the REMOVE/UNMAP/REMAP events on (uffdd turns them on for a bare userfaultfd), a thread of
the VMM that discards, unmaps or moves registered memory waits in the kernel until a reader has
read the event. A VMM that keeps its own copy of the userfaultfd after hanging up would then block
in ``munmap`` or ``madvise`` forever, because of uffdd. Closing the ranges (UNREGISTER) instead
would let its next touch of an unfilled page map zeros: a wrong byte. So the userfaultfd is kept
here, its messages are read (events complete; faults stay unanswered, so a page never filled is
never seen), until the VMM process exits (its pidfd turns readable). Bounded: past ``limit``
orphans a new one is closed at once, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import os

import structlog

from uffdd.kernel import KernelError, Userfaultfd

log = structlog.get_logger("uffdd.orphans")

MAX_ORPHANS = 1024


class Orphans:
    """One per listener: adopted userfaultfds, each until its VMM's pidfd says it exited."""

    def __init__(self, limit: int = MAX_ORPHANS) -> None:
        self.limit = limit
        self._held: dict[int, Userfaultfd] = {}
        """pidfd -> the userfaultfd kept for that VMM."""

    def __len__(self) -> int:
        return len(self._held)

    def adopt(self, uffd: Userfaultfd, pidfd: int) -> bool:
        """Keep ``uffd`` (and own ``pidfd``) until the VMM exits; False (nothing taken) when
        the limit is reached."""
        if len(self._held) >= self.limit:
            return False
        loop = asyncio.get_running_loop()
        self._held[pidfd] = uffd
        loop.add_reader(uffd.fileno(), self._drain, uffd)
        loop.add_reader(pidfd, self.release, pidfd)
        self._drain(uffd)  # what queued before the reader was added
        return True

    @staticmethod
    def _drain(uffd: Userfaultfd) -> None:
        """Read every queued message: events complete, faults stay unanswered."""
        with contextlib.suppress(KernelError):
            for _ in uffd.drain():
                pass

    def release(self, pidfd: int) -> None:
        """The VMM exited (or the daemon stops): close its userfaultfd and the pidfd."""
        uffd = self._held.pop(pidfd, None)
        if uffd is None:
            return
        loop = asyncio.get_running_loop()
        loop.remove_reader(pidfd)
        loop.remove_reader(uffd.fileno())
        uffd.close()
        os.close(pidfd)

    def close(self) -> None:
        for pidfd in list(self._held):
            self.release(pidfd)


def vmm_pidfd(pid: int) -> int | None:
    """A pidfd for the VMM process ``pid`` (from SO_PEERCRED), or None if it is gone already."""
    if pid <= 0:
        return None
    try:
        return os.pidfd_open(pid)
    except OSError:
        return None


__all__ = ["MAX_ORPHANS", "Orphans", "vmm_pidfd"]
