"""Who gets a connection slot on ``uffdd serve``: unauthenticated connections apart from
authenticated ones, so that connections that never authenticate cannot keep a destination out.

- Authenticated connections are limited by ``limits.max_connections``: one more is refused
  (BUSY) when its AUTH arrives.
- Connections still in the handshake are limited by ``limits.max_unauthenticated``: a new one
  past that makes room by dropping the oldest that has not authenticated yet (those that have
  not even sent HELLO first). A destination's handshake takes one round trip, so it gets through
  however many idle connections are opened; each of those is dropped at the latest after
  ``limits.handshake_timeout`` seconds anyway.
- Refusals are counted and logged as one summary line per interval (``peer_connections_refused``,
  with counts by reason), never one line per connection: a flood cannot flood the journal.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

import structlog

from uffdd.peer import protocol as p
from uffdd.peer.config import ServeLimits

log = structlog.get_logger("uffdd.serve")

SUMMARY_INTERVAL_S = 10.0
"""Refusals are summed up over this long before they are logged."""


class Pending(Protocol):
    """A connection still in its handshake, as admission sees it."""

    @property
    def said_hello(self) -> bool: ...

    def fail(self, exc: p.ProtocolError) -> None: ...


class Admission:
    """The unauthenticated connections of one server, and the tally of refusals."""

    def __init__(self, limits: ServeLimits, interval: float = SUMMARY_INTERVAL_S) -> None:
        self.limits = limits
        self.interval = interval
        self.pending: dict[Pending, None] = {}
        """Connections that have not authenticated yet, oldest first."""
        self.authenticated: set[Pending] = set()
        """Connections welcomed and not gone yet (dropping ones included until they are gone)."""
        self.refused: dict[str, int] = {}
        """Refusals by reason (an ErrorCode name) since the last summary line."""
        self.refused_total = 0
        self._timer: asyncio.TimerHandle | None = None

    def admit(self, conn: Pending) -> None:
        """A new connection: make room among the unauthenticated ones if they are at the limit."""
        while len(self.pending) >= self.limits.max_unauthenticated:
            victim = next((c for c in self.pending if not c.said_hello), next(iter(self.pending)))
            del self.pending[victim]
            victim.fail(p.ProtocolError(
                p.ErrorCode.BUSY, f"too many unauthenticated connections (limit {self.limits.max_unauthenticated}); "
                "the oldest are dropped"))
        self.pending[conn] = None

    def authenticate(self, conn: Pending) -> None:
        """``conn`` proved itself: it counts against ``max_connections`` from now on. Raises BUSY
        (and forgets it) if the authenticated ones are at their limit."""
        self.pending.pop(conn, None)
        if len(self.authenticated) >= self.limits.max_connections:
            raise p.ProtocolError(p.ErrorCode.BUSY, f"too many connections (limit {self.limits.max_connections})")
        self.authenticated.add(conn)

    def gone(self, conn: Pending) -> None:
        """``conn`` is closed (or closing as refused): it counts no more."""
        self.pending.pop(conn, None)
        self.authenticated.discard(conn)

    def note_refused(self, reason: str) -> None:
        """Count one refused (or dropped unauthenticated) connection for the next summary line."""
        self.refused[reason] = self.refused.get(reason, 0) + 1
        self.refused_total += 1
        if self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            self._timer = loop.call_later(self.interval, self.flush)

    def flush(self) -> None:
        """Log what was refused since the last line (nothing if nothing was)."""
        self._timer = None
        if not self.refused:
            return
        counts, self.refused = self.refused, {}
        log.warning("peer_connections_refused", count=sum(counts.values()), by_reason=counts,
                    interval_s=self.interval, unauthenticated_now=len(self.pending))

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.flush()


__all__ = ["SUMMARY_INTERVAL_S", "Admission"]
