"""The fault loop: read the userfaultfd, and hand each message to what handles it.

It runs on the event loop as a reader callback. Each readable event drains the userfaultfd (up
to MAX_BATCH messages per read) and resolves faults *inline* when the source can fill without
blocking; only a page that needs real waiting becomes a task (uffdd.core.fill). With the C path
(uffdd.core.native), C reads and serves the common case and stops at anything else; those
messages come back here, one at a time and in order, and then C goes on after them.

Dispatch by the faulting page's state:

- EMPTY: a demand fill (with its fault-around block);
- FILLED: a stale duplicate of a fault already resolved, or a mapping the kernel dropped: map
  it again (EEXIST just wakes);
- REMOVED: the guest discarded it: zeros, never the source's bytes;
- INSTALLING: its bytes are complete (a refused CONTINUE, or a predecessor that died): map it;
- FILLING: a fill is on its way and will wake this vCPU too; if it is slow background work into
  a private buffer, the fault takes the page over and fetches it urgently;
- UNMAPPED: nothing to serve.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable

from uffdd.core.events import Events
from uffdd.core.fill import DemandFiller
from uffdd.core.guest import DEMAND, Guest
from uffdd.core.native import NativePath
from uffdd.core.pagestate import EMPTY, FILLED, FILLING, INSTALLING, REMOVED, UNMAPPED
from uffdd.core.regions import Region
from uffdd.core.stats import Wait
from uffdd.kernel import MAX_BATCH, GuestGone, KernelError, UffdMsg, abi
from uffdd.kernel.errors import classify

Steal = Callable[[Region, int], bool]
"""Asks background work to give up a page a demand fault needs now; True if it did."""
Note = Callable[[Region, int], None]
"""Told of every demand fault on an EMPTY page (the working-set recorder)."""


class FaultLoop:
    """Reads one session's userfaultfd and dispatches its messages (see the module docstring)."""

    def __init__(self, guest: Guest, filler: DemandFiller, events: Events, *, on_failure: Callable[[KernelError], None],
                 native: NativePath | None = None, note: Note | None = None) -> None:
        self.guest = guest
        self.filler = filler
        self.events = events
        self.native = native
        self.note = note
        self.steal: Steal = lambda region, idx: False
        self._on_failure = on_failure
        self._buf = bytearray(abi.MSG_SIZE * MAX_BATCH)
        self._view = memoryview(self._buf)
        self.stopped = False

    # --- reading -----------------------------------------------------------------------------
    def on_readable(self) -> None:
        """Drain the userfaultfd and resolve what can be resolved without waiting.

        A read shorter than the buffer means the queue was empty at that moment; the reader is
        level-triggered, so anything queued later calls us again. That saves the extra read
        that would only return EAGAIN.
        """
        if self.stopped or self.guest.uffd.closed:
            return
        if self.native is not None:
            self._drain_native(self.native)
            return
        buf, view, size = self._buf, self._view, len(self._buf)
        read_into = self.guest.uffd.read_into
        try:
            while True:
                n = read_into(buf)
                if not n:
                    return
                self.dispatch(view, n // abi.MSG_SIZE, time.perf_counter_ns())
                if n < size or self.stopped:
                    return
        except KernelError as exc:
            self._read_failed(exc)

    def dispatch(self, view: memoryview, count: int, t0: int) -> None:
        """Handle ``count`` messages read at ``t0`` (the Python path)."""
        on_fault = self.on_fault
        pagefault = abi.EVENT_PAGEFAULT
        for event, a0, a1, a2 in abi.MSG_STRUCT.iter_unpack(view[: count * abi.MSG_SIZE]):
            if event == pagefault:
                on_fault(a0, a1, a2 & 0xFFFFFFFF, t0)
            else:
                self.events.handle(UffdMsg(event, a0, a1, a2))

    def _drain_native(self, native: NativePath) -> None:
        """on_readable with the C path: it reads and serves; the messages it leaves come here."""
        view = self._view
        try:
            while (left := native.drain(view)) is not None:
                i, count, t0 = left
                self.dispatch_native(native, view, i, count, t0)
                if count < MAX_BATCH or self.stopped or self.native is not native:
                    break
        except OSError as exc:  # KernelError as in on_readable, or drain's own read(2)
            self._read_failed(exc if isinstance(exc, KernelError)
                              else classify("read(userfaultfd)", exc.errno or errno.EIO))
        finally:
            native.fold()

    def dispatch_native(self, native: NativePath, view: memoryview, i: int, count: int, t0: int) -> None:
        """Messages [i, count) of a batch C stopped at ``i``: Python takes message i, C the
        ones after it, until the batch is done."""
        while i < count:
            native.fold()
            failed = native.failed_run()
            event, a0, a1, a2 = abi.MSG_STRUCT.unpack_from(view, i * abi.MSG_SIZE)
            if failed is not None:
                region, lo, n = failed  # C filled it and counted it; the kernel refused the map
                wait = Wait(region.base + ((a1 - region.start) >> region.shift), t0, a2 & 0xFFFFFFFF)
                self.guest.install_run(region, lo, n, DEMAND, wait)
            elif event == abi.EVENT_PAGEFAULT:
                self.on_fault(a0, a1, a2 & 0xFFFFFFFF, t0)
            else:
                self.events.handle(UffdMsg(event, a0, a1, a2))
            i += 1
            if self.native is not native or self.stopped:
                return
            i = native.serve(view, i, count, t0)

    def _read_failed(self, exc: KernelError) -> None:
        """The fault loop cannot go on: a guest that is gone ends quietly, anything else loudly."""
        if not isinstance(exc, GuestGone):
            self.guest.log.error("uffd_read_failed", error=str(exc))
        self._on_failure(exc)

    # --- one fault ---------------------------------------------------------------------------
    def on_fault(self, flags: int, addr: int, tid: int, t0: int) -> None:
        guest = self.guest
        stats = guest.stats
        stats.fault_msgs += 1
        if flags & abi.PAGEFAULT_FLAG_MINOR:
            stats.minor_faults += 1
        region = guest.regions.find(addr)
        if region is None:
            guest.log.error("fault_outside_regions", address=hex(addr))
            return
        idx = (addr - region.start) >> region.shift
        state = region.state[idx]
        if state == EMPTY:
            guest.cursor = (region, idx)
            if self.note is not None:
                self.note(region, idx)
            self.filler.fault(region, idx, Wait(region.base + idx, t0, tid))
        elif state == FILLED:
            stats.already_mapped += 1
            guest.remap(region, idx)
        elif state == REMOVED:
            guest.zero_fill(region, idx, flags, Wait(region.base + idx, t0, tid))
        elif state == INSTALLING and not guest.anonymous and not guest.retrying(region, idx):
            guest.install_run(region, idx, 1, DEMAND, Wait(region.base + idx, t0, tid))
        elif state == FILLING and self.steal(region, idx):
            stats.stolen += 1  # slow background fetch in flight: fetch this page urgently
            self.filler.fill(region, idx, idx + 1, Wait(region.base + idx, t0, tid))
        elif state == UNMAPPED:
            guest.log.warning("fault_on_unmapped_range", address=hex(addr))
        else:
            stats.coalesced += 1  # the fill in flight will install it, which wakes this vCPU too
            guest.wait_for_fill(Wait(region.base + idx, t0, tid))


__all__ = ["FaultLoop"]
