"""Putting complete pages into the guest: each userfaultfd ioctl's refusal, turned into a value.

Every way a page enters the guest (CONTINUE for shared memory, COPY/ZEROPAGE for anonymous
memory, POISON for a memory error at the source) can be refused by the kernel in the same few
ways. They are handled here once, and callers act on an :class:`Outcome`:

- EEXIST: the page is mapped already (another path won): its waiters are woken -> EXISTS;
- EAGAIN: an event the daemon has not read yet changes the mapping (or only part of a range was
  done) -> RETRY, with the bytes done before it; the caller reads the queue and tries later;
- ESRCH/ENOENT: the guest process or its mapping is gone -> GONE, the session ends;
- EFAULT from CONTINUE while the memory file is shorter than the regions need: the VMM shrank
  it under us -> GONE (GuestMemoryGone), the session ends instead of failing page by page;
- anything else is counted and logged -> FAILED, and retried later like RETRY.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Callable
from enum import IntEnum
from typing import NamedTuple

import structlog

from uffdd.core.stats import SessionStats
from uffdd.errors import GuestMemoryGone
from uffdd.kernel import GuestGone, KernelError, MappingChanging, PageExists, Userfaultfd
from uffdd.kernel.memory import PrivateBuffer

_ZEROS = bytes(2 << 20)
_ZERO_VIEW = memoryview(_ZEROS)


class Outcome(IntEnum):
    DONE = 0
    """The kernel took the whole range."""
    EXISTS = 1
    """The first page was mapped already; its waiters were woken. Go on after it."""
    RETRY = 2
    """Stopped after ``done`` bytes: read pending events, then retry the rest."""
    GONE = 3
    """The guest or its mapping no longer exists: end the session."""
    FAILED = 4
    """Any other refusal (counted, logged); retried later."""


class Result(NamedTuple):
    outcome: Outcome
    done: int
    """Bytes the kernel completed (the whole length for DONE)."""
    error: KernelError | GuestMemoryGone | None = None


_DONE_CACHE: dict[int, Result] = {}


def _done(length: int) -> Result:
    r = _DONE_CACHE.get(length)
    if r is None:
        r = _DONE_CACHE[length] = Result(Outcome.DONE, length)
    return r


class Installer:
    """Issues the installing ioctls of one session's userfaultfd and classifies what happens."""

    def __init__(self, uffd: Userfaultfd, stats: SessionStats, *, page_size: int, anonymous: bool,
                 log: structlog.typing.FilteringBoundLogger,
                 memory_short: Callable[[], bool] = lambda: False) -> None:
        self.uffd = uffd
        self.memory_short = memory_short
        """Whether the memory file has shrunk below the regions (checked only after an EFAULT)."""
        self.stats = stats
        self.page_size = page_size
        self.anonymous = anonymous
        self.hugetlb = page_size > 4096
        self._log = log
        self._zeros: PrivateBuffer | None = None

    def _attempt(self, op: Callable[[], object], what: str, addr: int, length: int) -> Result:
        try:
            op()
        except KernelError as exc:
            return self._settle(exc.with_traceback(None), what, addr, length)
        return _done(length)

    def _settle(self, exc: KernelError, what: str, addr: int, length: int) -> Result:
        """The error ladder (see the module docstring), once for every kind of install. The
        error is kept without its traceback: that would keep the callers' frames alive."""
        if isinstance(exc, PageExists):
            self.wake(addr, self.page_size)
            return Result(Outcome.EXISTS, 0, exc)
        if isinstance(exc, MappingChanging):
            self.stats.retries += 1
            return Result(Outcome.RETRY, exc.done, exc)
        if isinstance(exc, GuestGone):
            return Result(Outcome.GONE, 0, exc)
        if exc.errno == errno.EFAULT and what == "continue" and self.memory_short():
            return Result(Outcome.GONE, 0, GuestMemoryGone(
                f"the memory file shrank below the guest's regions (UFFDIO_CONTINUE at {addr:#x}: EFAULT)"))
        self.stats.kernel_errors += 1
        self._log.error("install_failed", op=what, address=hex(addr), bytes=length, error=str(exc))
        return Result(Outcome.FAILED, 0, exc)

    def map(self, addr: int, length: int, src: PrivateBuffer | None = None, src_off: int = 0) -> Result:
        """Map pages whose bytes are complete: in the page cache (shared memory: CONTINUE) or in
        ``src`` at ``src_off`` (anonymous memory: COPY, or ZEROPAGE when they are all zeros)."""
        if not self.anonymous:
            return self._attempt(lambda: self.uffd.continue_(addr, length), "continue", addr, length)
        assert src is not None, "anonymous memory is installed from a private buffer"
        with src.view[src_off : src_off + length] as data:
            zeros = not self.hugetlb and length <= len(_ZEROS) and data == _ZERO_VIEW[:length]
        if zeros:
            return self._attempt(lambda: self.uffd.zeropage(addr, length), "zeropage", addr, length)
        return self._attempt(lambda: self.uffd.copy(addr, src.addr + src_off, length), "copy", addr, length)

    def map_zeros(self, addr: int, length: int) -> Result:
        """Anonymous memory: zero pages (ZEROPAGE; a COPY of zeros on hugetlbfs, which has none).
        Shared memory: CONTINUE (the caller has put zeros in the page cache, or the page cache
        kept the page and it is mapped as it is)."""
        if not self.anonymous:
            return self._attempt(lambda: self.uffd.continue_(addr, length), "continue", addr, length)
        if not self.hugetlb:
            return self._attempt(lambda: self.uffd.zeropage(addr, length), "zeropage", addr, length)
        if self._zeros is None or len(self._zeros.view) < length:
            if self._zeros is not None:
                self._zeros.close()
            self._zeros = PrivateBuffer(length)
        zeros = self._zeros
        return self._attempt(lambda: self.uffd.copy(addr, zeros.addr, length), "copy", addr, length)

    def poison(self, addr: int, length: int) -> Result:
        return self._attempt(lambda: self.uffd.poison(addr, length), "poison", addr, length)

    def wake(self, addr: int, length: int) -> None:
        """Wake threads waiting on the range (they retry their access); never fails loudly."""
        with contextlib.suppress(KernelError):
            self.uffd.wake(addr, length)

    def close(self) -> None:
        if self._zeros is not None:
            self._zeros.close()
            self._zeros = None


__all__ = ["Installer", "Outcome", "Result"]
