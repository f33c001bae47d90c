"""Background runs straight into guest memory: the bulk connection in C, on a thread of its own.

:class:`DirectBulk` is what background pre-paging (uffdd.core.bulk) uses when the guest's
memory is shared memory of 4 KiB pages: it hands a run's destination in guest memory and its
claim bytes to a :class:`uffdd.peer._native.Bulk`, whose thread receives the bytes into the pages
without the GIL and checks them (crc32c per block, the tag on an authenticated connection). Each
frame's outcome comes back through an eventfd the event loop watches; the pages are installed
by the caller. The claim bytes keep a demand fault and a frame from ever both writing a page
(_bulk.c says how).

The connection itself is a channel's like any other (:mod:`.channel`): handshake, reconnects with
backoff, the deadline, the image check; :class:`NativeBulkConnection` stands in for a Python
connection, running the thread for as long as the socket lives.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import structlog

from uffdd.errors import GuestMemoryGone, SourceError, SourceUnavailable
from uffdd.peer import protocol as p
from uffdd.peer.client.connection import ClientConnection, LinkConnection, Request, Requests
from uffdd.peer.native import module as _native
from uffdd.pools import background_priority

log = structlog.get_logger("uffdd.peer")

if _native is not None:
    FRAME_OK, FRAME_BAD, DONE, GONE, ERROR = (_native.BULK_FRAME_OK, _native.BULK_FRAME_BAD, _native.BULK_DONE,
                                              _native.BULK_GONE, _native.BULK_ERROR)
else:
    FRAME_OK, FRAME_BAD, DONE, GONE, ERROR = range(5)
STOP_WAIT_S = 5.0

OnFrame = Callable[[int, int, bool], None]
"""(first block of the run, blocks, whether they are in place and checked) for each frame."""


def direct_available() -> bool:
    return _native is not None


class NativeBulkConnection(LinkConnection):
    """One connection of the direct bulk channel: its socket belongs to the C link's thread."""

    def __init__(self, channel: Requests, conn: ClientConnection, welcome: p.Welcome, bulk: Any) -> None:
        super().__init__(channel, conn)
        self.bulk = bulk
        cfg = channel.opts.config
        bulk.attach(*conn.hand_over(), welcome.max_blocks, welcome.max_inflight, cfg.keepalive, cfg.io_timeout)
        self.thread = threading.Thread(target=self._run, name=f"uffdd-bulk-{channel.name}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        background_priority()
        reason = self.bulk.run()
        with contextlib.suppress(RuntimeError):  # the loop is gone (process exit)
            self.loop.call_soon_threadsafe(self._ended, reason)

    def _ended(self, reason: str | None) -> None:
        self._dead = True
        if reason is not None:
            self.close_reason = reason
            if reason.startswith("tampered"):
                self.channel.stats.tampered += 1
                self.channel.stats.protocol_errors += 1
                log.error("peer_link_tampered", channel=self.channel.name, error=reason,
                          hint="a frame failed its tag: the link is reconnected, nothing it carried is installed")
            elif not reason.endswith("closed the connection") and not reason.startswith("nothing received"):
                self.channel.stats.protocol_errors += 1
        if not self.closed.done():
            self.closed.set_result(self.close_reason)

    @property
    def usable(self) -> bool:
        return not self._dead

    def hold(self, on: bool) -> None:
        self.bulk.hold(on)

    def send_read(self, req: Request) -> None:
        raise SourceError("the direct bulk connection carries only its own requests")

    def discard(self, req_id: int) -> None:
        """Nothing to do: Python's requests never go to this connection."""

    def abort(self, reason: str, send: p.ProtocolError | None = None) -> None:
        if not self._dead:
            self.close_reason = reason
            self.bulk.stop()



class DirectBulk:
    """Runs received into guest memory by the C link (see the module docstring)."""

    def __init__(self, channel: Any, bulk: Any) -> None:
        self.channel = channel
        self.bulk = bulk
        self._loop = asyncio.get_running_loop()
        self._waiting: dict[int, tuple[OnFrame, asyncio.Future[None]]] = {}
        self._records: deque[tuple[int, int, int, int, int]] = deque()
        self._next = 0
        self._loop.add_reader(bulk.done_fd, self._drain)

    async def fetch(self, offset: int, dest: memoryview, claims: memoryview, on_frame: OnFrame) -> None:
        """Receive the image's bytes at ``offset`` into ``dest``, one claim byte per block; each
        frame is reported to ``on_frame`` as it is checked. Raises GuestMemoryGone, SourceError
        (the server refused the range) or SourceUnavailable (past the deadline); the blocks not
        reported by then are not in place."""
        w = await self.channel.wait_ready(self.channel.opts.config.open_timeout)
        blocks = len(dest) >> p.BLOCK_SHIFT
        per = w.max_blocks
        parts = []
        for first in range(0, blocks, per):
            k = min(per, blocks - first)

            def shifted(f: int, n: int, ok: bool, base: int = first) -> None:
                on_frame(base + f, n, ok)

            a, b = first << p.BLOCK_SHIFT, (first + k) << p.BLOCK_SHIFT
            parts.append(self._request(offset + a, dest[a:b], claims[first : first + k], shifted))
        results = await asyncio.gather(*parts, return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r

    async def _request(self, offset: int, dest: memoryview, claims: memoryview, on_frame: OnFrame) -> None:
        if self.channel.unreachable is not None:
            raise self.channel.unreachable
        self._next = self._next % 0x7FFFFFFF + 1
        rid = self._next
        fut: asyncio.Future[None] = self._loop.create_future()
        self._waiting[rid] = (on_frame, fut)
        self.bulk.submit(rid, offset, len(dest) >> p.BLOCK_SHIFT, dest, claims)
        self.channel.stats.requests += 1
        self.channel.start()
        await fut

    def _drain(self) -> None:
        """Take the link's records, and handle them a frame per turn of the event loop: a
        frame's install is a run of CONTINUEs, and a demand fault must not wait behind many."""
        more = not self._records
        self._records.extend(self.bulk.drain())
        if more and self._records:
            self._loop.call_soon(self._next_record)

    def _next_record(self) -> None:
        while self._records:
            kind, rid, first, n, code = self._records.popleft()
            self._handle(kind, rid, first, n, code)
            if kind in (FRAME_OK, FRAME_BAD):
                break
        if self._records:
            self._loop.call_soon(self._next_record)

    def _handle(self, kind: int, rid: int, first: int, n: int, code: int) -> None:
        entry = self._waiting.get(rid)
        if entry is None:
            return
        on_frame, fut = entry
        if kind in (FRAME_OK, FRAME_BAD):
            if kind == FRAME_BAD:
                self.channel.stats.checksum_failures += 1
            on_frame(first, n, kind == FRAME_OK)
            return
        del self._waiting[rid]
        if fut.done():
            return
        if kind == DONE:
            fut.set_result(None)
        elif kind == GONE:
            fut.set_exception(GuestMemoryGone("guest memory gone under a background run"))
        elif kind == ERROR:
            name = p.error_code(code)
            fut.set_exception(SourceError(f"peer {self.channel.opts.address}: "
                                          f"{name.name if name else code}: background read refused"))
        else:
            fut.set_exception(self.channel.unreachable or SourceUnavailable("peer unreachable"))

    def take(self, claims: memoryview, index: int) -> bool:
        assert _native is not None
        taken: bool = _native.claim_take(claims, index)
        return taken

    async def aclose(self) -> None:
        """Stop the thread, then let go of every destination (before guest memory goes)."""
        self._loop.remove_reader(self.bulk.done_fd)
        self._records.clear()
        await self.channel.aclose()
        self.bulk.stop()
        waited = 0.0
        while self.bulk.running and waited < STOP_WAIT_S:
            await asyncio.sleep(0.002)
            waited += 0.002
        self.bulk.close()
        for _, fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(SourceError("peer source closed"))
        self._waiting.clear()


def new_bulk() -> Any | None:
    """A C bulk link, or None where the extension is not built."""
    return _native.Bulk() if _native is not None else None


__all__ = ["DirectBulk", "NativeBulkConnection", "OnFrame", "direct_available", "new_bulk"]
