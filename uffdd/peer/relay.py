"""A TCP relay whose link can be cut on purpose: ``uffdd demo --peer --cut-link`` and tests.

Sits between a destination daemon and ``uffdd serve`` on one host, where no real link can be
unplugged. A cut either resets every relayed connection and refuses new ones for a while
(``silent=False``: what a rebooted router or a killed proxy looks like), or swallows all
traffic without closing anything (``silent=True``: a pulled cable; the ends only notice the
silence), resetting the swallowed connections when the cut ends, as their bytes are lost.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import cast

import structlog

log = structlog.get_logger("uffdd.relay")

_HIGH_WATER = 1 << 20


class _Half(asyncio.Protocol):
    """One side of a relayed connection; forwards what it receives to its twin."""

    def __init__(self, relay: Relay, edit: Callable[[bytes], bytes] | None = None, upstream: bool = False) -> None:
        self.relay = relay
        self.edit = edit
        self.upstream = upstream
        """True for the half connected to the server (its bytes go downstream, to the client)."""
        self.transport: asyncio.Transport | None = None
        self.twin: _Half | None = None
        self.pending: list[bytes] = []
        self.lost = False
        self.swallowed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport subclasses
        self.transport.set_write_buffer_limits(high=_HIGH_WATER)

    def data_received(self, data: bytes) -> None:
        if self.relay.blackholed:
            self.swallowed = True
            if self.twin is not None:
                self.twin.swallowed = True
            return
        if self.edit is not None:
            data = self.edit(data)
        if self.upstream:
            self.relay._count_downstream(len(data))
        twin = self.twin
        if twin is None or twin.transport is None:
            self.pending.append(data)
            return
        twin.transport.write(data)

    def pause_writing(self) -> None:
        if self.twin is not None and self.twin.transport is not None:
            self.twin.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.twin is not None and self.twin.transport is not None and not self.twin.lost:
            self.twin.transport.resume_reading()

    def eof_received(self) -> bool | None:
        if self.twin is not None and self.twin.transport is not None and self.twin.transport.can_write_eof():
            self.twin.transport.write_eof()
            return True
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.relay._halves.discard(self)
        if self.twin is not None and self.twin.transport is not None and not self.twin.lost:
            self.twin.transport.close()

    def abort(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.abort()


class Relay:
    """Forwards every connection made to it to ``target``; :meth:`cut` breaks the link."""

    def __init__(self, target_host: str, target_port: int,
                 downstream_editor: Callable[[], Callable[[bytes], bytes]] | None = None) -> None:
        """``downstream_editor`` makes, per connection, a function applied to server -> client bytes."""
        self.target = (target_host, target_port)
        self.downstream_editor = downstream_editor
        self._server: asyncio.AbstractServer | None = None
        self._halves: set[_Half] = set()
        self._refuse_until = 0.0
        self.blackholed = False
        self.cuts = 0
        self.connections = 0
        self.downstream_bytes = 0
        self._cut_after: tuple[int, float, bool] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.address: tuple[str, int] = ("", 0)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._accept, host, port, reuse_address=True)
        name = self._server.sockets[0].getsockname()
        self.address = (str(name[0]), int(name[1]))
        return self.address

    def _accept(self) -> _Half:
        half = _Half(self)
        self._halves.add(half)
        self.connections += 1
        loop = asyncio.get_running_loop()
        task = loop.create_task(self._connect_twin(half))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return half

    async def _connect_twin(self, client: _Half) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(0)  # let connection_made run
        if loop.time() < self._refuse_until:
            client.abort()
            return
        if self.blackholed:
            return  # held open, silent, reset when the cut ends
        try:
            editor = self.downstream_editor() if self.downstream_editor is not None else None
            _, upstream = await loop.create_connection(lambda: _Half(self, editor, upstream=True), *self.target)
        except OSError:
            client.abort()
            return
        if client.lost:
            upstream.abort()
            return
        self._halves.add(upstream)
        client.twin, upstream.twin = upstream, client
        assert upstream.transport is not None
        for chunk in client.pending:
            upstream.transport.write(chunk)
        client.pending.clear()

    def cut_after(self, nbytes: int, duration: float, *, silent: bool = False) -> None:
        """Cut the link once ``nbytes`` more have gone from the server to the clients: a cut
        that lands mid-transfer however fast the transfer is."""
        self._cut_after = (self.downstream_bytes + nbytes, duration, silent)

    def _count_downstream(self, n: int) -> None:
        self.downstream_bytes += n
        armed = self._cut_after
        if armed is not None and self.downstream_bytes >= armed[0]:
            self._cut_after = None
            asyncio.get_running_loop().call_soon(lambda: self.cut(armed[1], silent=armed[2]))

    def cut(self, duration: float, *, silent: bool = False) -> None:
        """Break the link for ``duration`` seconds (see the module docstring for the two kinds)."""
        loop = asyncio.get_running_loop()
        self.cuts += 1
        log.warning("link_cut", seconds=duration, silent=silent, connections=len(self._halves) // 2)
        if silent:
            self.blackholed = True
            loop.call_later(duration, self._end_blackhole)
            return
        self._refuse_until = loop.time() + duration
        for half in list(self._halves):
            half.abort()

    def _end_blackhole(self) -> None:
        self.blackholed = False
        for half in list(self._halves):
            if half.swallowed or half.twin is None:
                half.abort()
        log.warning("link_restored")

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for half in list(self._halves):
            half.abort()
        for t in list(self._tasks):
            t.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*self._tasks, return_exceptions=True)
