"""Non-cooperative events: the guest's memory changes under the session (REMOVE, UNMAP, REMAP).

They arrive on the userfaultfd in order with the faults and are applied in that order. While
one is unread, every ioctl on the range fails with EAGAIN (see uffdd.core.retry), and the VMM
thread that caused it is blocked until it is read, so the fault loop reads them promptly.

The ordering hazard: a fill may be on its way for a page the guest has just discarded. The page
is marked REMOVED at once, so that when the fill's install comes, the page gets zeros (or its
page cache as it is), never the source's bytes the guest asked to drop.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

from uffdd.core.guest import Guest
from uffdd.core.pagestate import EMPTY, FILLING, INSTALLING, REMOVED, UNMAPPED
from uffdd.kernel import UffdMsg, abi

_TO_REMOVED = bytes(UNMAPPED if s == UNMAPPED else REMOVED for s in range(256))
"""bytes.translate table: every page state becomes REMOVED, except UNMAPPED."""


class Events:
    """Applies the guest's events to the session's page states and regions."""

    def __init__(self, guest: Guest, on_moved: Callable[[], None]) -> None:
        self.guest = guest
        self._on_moved = on_moved
        """Called after an mremap moved or split regions (the C path and the fd store follow)."""

    def handle(self, msg: UffdMsg) -> None:
        self.guest.stats.events += 1
        ev = msg.event
        if ev == abi.EVENT_REMOVE:
            self.discard(msg.arg0, msg.arg1, REMOVED)
        elif ev == abi.EVENT_UNMAP:
            self.discard(msg.arg0, msg.arg1, UNMAPPED)
        elif ev == abi.EVENT_REMAP:
            self.move(msg.arg0, msg.arg1, msg.arg2)
        elif ev == abi.EVENT_FORK:
            fd = msg.arg0 & 0xFFFFFFFF
            self.guest.log.warning("fork_not_served", uffd=fd, hint="the child process's copy is not served")
            with contextlib.suppress(OSError):
                os.close(fd)
        else:
            self.guest.log.warning("unexpected_uffd_event", uffd_event=hex(ev))

    def discard(self, start: int, end: int, new_state: int) -> None:
        """Mark [start, end) discarded: the source is never asked for these pages again."""
        stats = self.guest.stats
        for r, i0, n in self.guest.regions.overlapping(start, end):
            seg = bytes(r.state[i0 : i0 + n])
            pending = seg.count(EMPTY) + seg.count(FILLING) + seg.count(INSTALLING)
            stats.count_filled(pending)  # resolved: they no longer need the source
            if new_state == REMOVED:
                stats.pages_removed += n - seg.count(REMOVED) - seg.count(UNMAPPED)
                r.state[i0 : i0 + n] = seg.translate(_TO_REMOVED)
            else:
                r.state[i0 : i0 + n] = bytes((UNMAPPED,)) * n
        if stats.all_in_place:
            self.guest.on_all_filled()

    def move(self, frm: int, to: int, length: int) -> None:
        """mremap moved [frm, frm+length) to ``to``: the regions follow (split where needed)."""
        guest = self.guest
        if guest.regions.move(frm, to, length):
            guest.cursor = (guest.regions.regions[0], 0)
            guest.log.info("regions_moved", frm=hex(frm), to=hex(to), length=length)
            self._on_moved()


__all__ = ["Events"]
