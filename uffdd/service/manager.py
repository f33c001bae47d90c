"""What a service tells its manager from the event loop: watchdog pings and its status.

Both the daemon and the worker supervisor are ``Type=notify`` services: they ping the watchdog
from their event loop (a stalled loop stops the pings) and keep ``STATUS=`` current without
flooding the manager. ``STATUS=`` is for people; a worker also sends the same counts as JSON in
``X_UFFDD_COUNTS=`` (sd_notify(3) reserves the ``X_`` prefix for a service's own fields), which
its parent adds up instead of reading the words back.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

import structlog

from uffdd.service import systemd

log = structlog.get_logger("uffdd.manager")

STATUS_INTERVAL_S = 2.0
"""STATUS= is refreshed at most this often while counts change (and soon after session changes)."""
STATUS_COALESCE_S = 0.05
"""A burst of session changes within this long becomes one STATUS= message."""
COUNTS_FIELD = "X_UFFDD_COUNTS"


class Every:
    """Call ``fn`` every ``interval`` seconds on the loop until cancelled."""

    def __init__(self, loop: asyncio.AbstractEventLoop, interval: float, fn: Callable[[], object]) -> None:
        self._loop, self._interval, self._fn = loop, interval, fn
        self._handle = loop.call_later(interval, self._tick)

    def _tick(self) -> None:
        self._fn()
        self._handle = self._loop.call_later(self._interval, self._tick)

    def cancel(self) -> None:
        self._handle.cancel()


def start_watchdog(loop: asyncio.AbstractEventLoop) -> Every | None:
    """Ping the manager from the event loop itself at half the interval: a stalled loop (a
    blocking call on the fault path) stops the pings, and the manager restarts us. None when
    the manager wants no pings from us."""
    usec = systemd.watchdog_usec()
    if usec is None:
        return None
    systemd.notify("WATCHDOG=1")
    log.info("watchdog", interval_s=usec / 2e6)
    return Every(loop, usec / 2e6, lambda: systemd.notify("WATCHDOG=1"))


def install_signals(loop: asyncio.AbstractEventLoop, *, stop: Callable[[int], None],
                    reload: Callable[[], None]) -> Callable[[], None]:
    """SIGTERM and SIGINT call ``stop(signum)``, SIGHUP ``reload()``; returns the undo."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop, sig)
    loop.add_signal_handler(signal.SIGHUP, reload)

    def remove() -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)

    return remove


@dataclass(frozen=True)
class StatusCounts:
    """What a daemon (or a worker) is doing, in numbers: the content of its STATUS= line."""

    sessions: int = 0
    pages_to_go: int = 0
    served: int = 0
    faults: int = 0
    resumed: int = 0
    unresumed: int = 0

    def __add__(self, other: StatusCounts) -> StatusCounts:
        return StatusCounts(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def line(self) -> str:
        """The STATUS= text."""
        parts = [f"{self.sessions} session(s), {self.pages_to_go} page(s) to go", f"{self.served} served",
                 f"{self.faults} faults"]
        if self.resumed:
            parts.append(f"{self.resumed} resumed")
        if self.unresumed:
            parts.append(f"{self.unresumed} NOT resumed (see log)")
        return "; ".join(parts)

    def encode(self) -> str:
        """The ``X_UFFDD_COUNTS=`` assignment a worker sends its parent."""
        return f"{COUNTS_FIELD}={json.dumps(asdict(self), separators=(',', ':'))}"

    @classmethod
    def decode(cls, value: str) -> StatusCounts:
        """Parse the value of ``X_UFFDD_COUNTS=``; ValueError if it is not what :meth:`encode` writes."""
        doc = json.loads(value)
        if not isinstance(doc, dict):
            raise ValueError(f"{COUNTS_FIELD}: expected a JSON object, got {type(doc).__name__}")
        known = {f.name for f in fields(cls)}
        counts = {k: v for k, v in doc.items() if k in known}  # newer senders may add counts
        for k, v in counts.items():
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{COUNTS_FIELD}: {k} must be a count, got {v!r}")
        return cls(**counts)


class StatusReporter:
    """Keeps the manager's STATUS= current: sent when it changed, bursts coalesced, and checked
    every STATUS_INTERVAL_S (counts such as pages to go change without an event of their own)."""

    def __init__(self, status: Callable[[], list[str]]) -> None:
        self._status = status
        """The assignments that make up the status (``STATUS=...`` and maybe the counts)."""
        self._sent: list[str] | None = None
        self._soon: asyncio.TimerHandle | None = None
        self._timer: Every | None = None
        self.enabled = True
        """False: send nothing yet (the supervisor, before all its workers are ready)."""

    def send(self, *with_lines: str) -> None:
        """Send the status now, along with ``with_lines`` (e.g. ``READY=1``); without those, only
        if it changed since the last message."""
        if not self.enabled:
            return
        lines = self._status()
        if with_lines or lines != self._sent:
            self._sent = lines
            systemd.notify(*with_lines, *lines)

    def forget(self) -> None:
        """Another message replaced our STATUS= (a failed reload said so): send ours again next time."""
        self._sent = None

    def soon(self) -> None:
        """Send within STATUS_COALESCE_S (one message for a burst of changes)."""
        if self._soon is None:
            self._soon = asyncio.get_running_loop().call_later(STATUS_COALESCE_S, self._send_soon)

    def _send_soon(self) -> None:
        self._soon = None
        self.send()

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = Every(loop, STATUS_INTERVAL_S, self.send)

    def stop(self) -> None:
        for h in (self._soon, self._timer):
            if h is not None:
                h.cancel()
        self._soon = self._timer = None
