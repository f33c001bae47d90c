"""The destination side of the link: pipelined page requests that survive a broken connection.

A :class:`PeerClient` holds two channels to one image (:mod:`.channel`): urgent for demand
faults, and bulk, opened on first use, for prefetch, so background traffic never sits in front
of a fault. Each channel runs one connection at a time (:mod:`.connection`) and re-sends what a
broken one left unanswered. :mod:`.options` holds what the client is told and what it counts.
"""

from __future__ import annotations

from uffdd.errors import SourceUnavailable
from uffdd.peer import protocol as p
from uffdd.peer.client.bulk import DirectBulk, new_bulk
from uffdd.peer.client.channel import Channel
from uffdd.peer.client.native import new_link
from uffdd.peer.client.options import ClientOptions, PeerRefused, PeerStats


class PeerClient:
    """Both channels to one image: urgent for demand faults, bulk (opened on first use) for prefetch."""

    def __init__(self, opts: ClientOptions) -> None:
        self.opts = opts
        self._stats = PeerStats()
        native = opts.config.native and opts.ssl_context is None
        link = new_link(opts.config.checksum_retries) if native else None
        self.urgent = Channel(opts, p.Role.URGENT, self._stats, link=link)
        self.urgent.on_busy = self._urgent_busy
        self.bulk: Channel | None = None
        self._direct: DirectBulk | None = None
        self._direct_ok = native and not opts.config.compression  # lz4 is decoded in Python only

    @property
    def stats(self) -> PeerStats:
        """Both channels' counters, with what the C link did for the fault path added in."""
        self.urgent.fold_link_stats()
        return self._stats

    def _urgent_busy(self, busy: bool) -> None:
        if self.bulk is not None:
            self.bulk.hold(busy)
        if self._direct is not None:
            self._direct.channel.hold(busy)

    async def open(self) -> p.Welcome:
        try:
            return await self.urgent.wait_ready(self.opts.config.open_timeout)
        except BaseException:
            await self.urgent.aclose()
            raise

    @property
    def welcome(self) -> p.Welcome:
        assert self.urgent.welcome is not None
        return self.urgent.welcome

    async def fill(self, offset: int, dest: memoryview) -> None:
        await self.urgent.read(offset, dest)

    async def prefetch(self, offset: int, dest: memoryview) -> None:
        if self.bulk is None:
            self.bulk = Channel(self.opts, p.Role.BULK, self._stats, reference=self.urgent)
            self.bulk.hold(self.urgent.busy)
        await self.bulk.read(offset, dest)

    def direct(self) -> DirectBulk | None:
        """Background runs received straight into guest memory (:mod:`.bulk`) over a channel of
        their own, opened on first use; None where that runs in Python (TLS, no extension)."""
        if self._direct is None and self._direct_ok:
            link = new_bulk()
            if link is None:
                self._direct_ok = False
                return None
            channel = Channel(self.opts, p.Role.BULK, self._stats, reference=self.urgent, link=link)
            channel.hold(self.urgent.busy)
            self._direct = DirectBulk(channel, link)
        return self._direct

    @property
    def unreachable(self) -> SourceUnavailable | None:
        for ch in (self.urgent, self.bulk, self._direct.channel if self._direct else None):
            if ch is not None and ch.unreachable is not None:
                return ch.unreachable
        return None

    async def aclose(self) -> None:
        await self.urgent.aclose()
        if self.bulk is not None:
            await self.bulk.aclose()
        if self._direct is not None:
            await self._direct.aclose()


__all__ = ["Channel", "ClientOptions", "PeerClient", "PeerRefused", "PeerStats"]
