"""A channel: one logical connection to ``uffdd serve`` (urgent or bulk), whose requests
survive a broken connection.

It keeps every request that has not been fully answered; when the connection breaks (an
error, EOF, or silence longer than ``io_timeout`` while pings go unanswered) it reconnects
with bounded exponential backoff and re-sends all of them. Waiting readers never see the
outage, only a longer wait; past ``deadline`` they get :class:`SourceUnavailable`, loudly. A
reconnect that finds another image (different id or size) is refused for good: pages of two
images are never mixed.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import deque
from collections.abc import Callable
from typing import Any

import structlog

from uffdd.errors import SourceError, SourceUnavailable
from uffdd.peer import protocol as p
from uffdd.peer.client.connection import MAX_CLIENT_BLOCKS, ClientConnection, Connection, Request
from uffdd.peer.client.native import take_over
from uffdd.peer.client.options import ClientOptions, PeerRefused, PeerStats

log = structlog.get_logger("uffdd.peer")

STABLE_S = 1.0
"""A connection that lived this long resets the reconnect backoff."""


class Channel:
    """Requests over one logical connection, kept across reconnects."""

    def __init__(self, opts: ClientOptions, role: p.Role, stats: PeerStats,
                 reference: Channel | None = None, link: Any = None) -> None:
        """``link``: the C link (:mod:`.native`, :mod:`.bulk`) whose connections this channel
        sets up; None: connections in Python."""
        self.opts = opts
        self.role = role
        self.name = role.name.lower()
        self.stats = stats
        self.reference = reference
        self.welcome: p.Welcome | None = None
        self._pending: dict[int, Request] = {}
        self._unsent: deque[Request] = deque()
        self._conn: Connection | None = None
        self.link = link
        self._link_seen = {"owner_requests": 0, "owner_resent": 0, "checksum_failures": 0}
        self.inflight = 0
        self._epoch = 0
        self._next = 0
        self._runner: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._first_error: BaseException | None = None
        self._failed: SourceUnavailable | None = None
        self._fatal: SourceError | None = None
        self._outage_start: float | None = None
        self._closed = False
        self._log = log.bind(peer=opts.address, image=opts.image, channel=self.name)
        self.on_busy: Callable[[bool], None] | None = None
        """Called when the channel starts or stops having readers waiting (urgent -> bulk hold)."""
        self._busy = False
        self._held = False

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        if self._runner is None:
            self._runner = asyncio.get_running_loop().create_task(self._run(), name=f"uffdd-peer-{self.name}")

    async def wait_ready(self, timeout: float) -> p.Welcome:
        """Wait for the first connection; raise SourceUnavailable with the reason if it fails."""
        self.start()
        try:
            async with asyncio.timeout(timeout):
                while self.welcome is None:
                    if self._first_error is not None and isinstance(self._first_error, PeerRefused):
                        raise self._first_error
                    if self._fatal is not None:
                        raise self._fatal
                    self._ready.clear()
                    await self._ready.wait()
        except TimeoutError:
            why = f": {self._first_error}" if self._first_error else ""
            raise SourceUnavailable(f"peer {self.opts.address} not reachable within {timeout:g}s{why}") from None
        return self.welcome

    async def aclose(self) -> None:
        self._closed = True
        if self._conn is not None:
            self._conn.abort("source closed")
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
        self._fail_all(SourceError("peer source closed"))

    def fold_link_stats(self) -> None:
        """Count what the link did for the C fault path (its own requests, which this channel
        never sees) into the stats."""
        if self.link is None:
            return
        now = self.link.stats
        seen = self._link_seen
        st = self.stats
        st.requests += now["owner_requests"] - seen["owner_requests"]
        st.requests_resent += now["owner_resent"] - seen["owner_resent"]
        st.checksum_failures += now["checksum_failures"] - seen["checksum_failures"]
        self._link_seen = {k: now[k] for k in seen}

    def request(self, req_id: int) -> Request | None:
        """The request with this id that is waiting for its answer, if any."""
        return self._pending.get(req_id)

    @property
    def busy(self) -> bool:
        """Readers are waiting on this channel (the urgent one holds the bulk one back then)."""
        return self._busy

    @property
    def connected(self) -> bool:
        return self._conn is not None and self._conn.ready

    @property
    def unreachable(self) -> SourceUnavailable | None:
        """Set while the peer has been unreachable past the deadline."""
        return self._failed

    # -- connection management -------------------------------------------------------------
    async def _connect(self) -> tuple[Connection, p.Welcome]:
        loop = asyncio.get_running_loop()
        opts = self.opts
        self._epoch += 1
        epoch = self._epoch
        conn: ClientConnection | None = None
        try:
            async with asyncio.timeout(opts.config.connect_timeout):
                _, proto = await loop.create_connection(
                    lambda: ClientConnection(self, epoch), opts.host, opts.port, ssl=opts.ssl_context,
                    server_hostname=(opts.server_hostname or opts.host) if opts.ssl_context else None,
                    ssl_handshake_timeout=opts.config.connect_timeout if opts.ssl_context else None)
                conn = proto
                welcome = await conn.handshake()
            self._check_welcome(welcome)  # before a single request goes out on it
        except BaseException:
            if conn is not None:
                conn.abort("handshake failed")
            raise
        if self.link is not None:
            return take_over(self, conn, welcome, self.link), welcome
        return conn, welcome

    def _check_welcome(self, w: p.Welcome) -> None:
        ref = self.welcome or (self.reference.welcome if self.reference is not None else None)
        if ref is not None and (w.image_id != ref.image_id or w.image_size != ref.image_size):
            raise SourceError(
                f"peer {self.opts.address} now serves a different image {self.opts.image!r} "
                f"(id {w.image_id.hex()} size {w.image_size:#x}, was {ref.image_id.hex()} size {ref.image_size:#x}): "
                "refusing to mix pages of two images")

    async def _run(self) -> None:
        opts = self.opts
        delay = opts.config.reconnect_min
        attempt = 0
        while not self._closed:
            try:
                conn, welcome = await self._connect()
            except SourceError as exc:
                if isinstance(exc, PeerRefused):
                    self._note_failure(exc, attempt + 1, delay)
                else:  # another image: nothing will ever make this source right again
                    self._fatal = exc
                    self._log.error("peer_image_changed", error=str(exc))
                    self._fail_all(exc)
                    self._ready.set()
                    return
            except (OSError, TimeoutError, p.ProtocolError, ConnectionError) as exc:
                self._note_failure(exc, attempt + 1, delay)
            except Exception as exc:  # whatever one attempt hits, the channel must live on
                self._log.error("peer_connect_error", error=repr(exc))
                self._note_failure(exc, attempt + 1, delay)
            else:
                self._on_connected(conn, welcome, attempt)
                attempt = 0
                loop = asyncio.get_running_loop()
                started = loop.time()
                reason = await conn.closed
                self._on_lost(conn, reason)
                if loop.time() - started >= STABLE_S:
                    delay = opts.config.reconnect_min
                    continue
                # A connection that dies at once (e.g. the server drops it for what we send)
                # must not turn into a reconnect storm: keep backing off.
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, opts.config.reconnect_max)
                continue
            attempt += 1
            self._check_deadline()
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, opts.config.reconnect_max)

    def _note_failure(self, exc: BaseException, attempt: int, delay: float) -> None:
        self.stats.connect_failures += 1
        msg = str(exc) or type(exc).__name__
        self.stats.last_error = msg
        if self._first_error is None or self.welcome is None:
            self._first_error = exc
            self._ready.set()
        if self._outage_start is None:
            self._outage_start = asyncio.get_running_loop().time()
        if attempt <= 3 or attempt % 10 == 0:
            self._log.warning("peer_connect_failed", attempt=attempt, error=msg, retry_in=round(delay, 3),
                              waiting_requests=len(self._pending))

    def _check_deadline(self) -> None:
        if self._outage_start is None or self._failed is not None:
            return
        down = asyncio.get_running_loop().time() - self._outage_start
        if down > self.opts.config.deadline:
            self._failed = SourceUnavailable(
                f"peer {self.opts.address} unreachable for {down:.1f}s (deadline {self.opts.config.deadline:g}s): "
                f"{self.stats.last_error}")
            self.stats.unreachable += 1
            self._log.error("peer_unreachable", seconds=round(down, 1), deadline=self.opts.config.deadline,
                            failed_requests=len(self._pending), error=self.stats.last_error)
            self._fail_all(self._failed)
            if self.link is not None:
                self.link.unavailable()  # the C fault path's requests fail too, and go to Python's retries

    def _on_connected(self, conn: Connection, welcome: p.Welcome, attempt: int) -> None:
        loop = asyncio.get_running_loop()
        first = self.welcome is None
        self.welcome = welcome
        self._conn = conn
        self.stats.connects += 1
        if not first:
            self.stats.reconnects += 1
        outage = None
        if self._outage_start is not None:
            outage = loop.time() - self._outage_start
            self.stats.outage_seconds += outage
            self._outage_start = None
        if self._failed is not None:
            self._log.warning("peer_reachable_again", after_s=round(outage or 0, 2))
            self._failed = None
        # Requests split for a larger max_blocks than the server now allows: let the caller retry.
        for req in [r for r in self._pending.values() if r.count > welcome.max_blocks]:
            self._finish(req, SourceError("the server's request limit shrank; retry"))
        resent = len(self._unsent)
        if not first:
            self.stats.requests_resent += resent
            self._log.info("peer_reconnected", attempt=attempt, outage_s=round(outage or 0, 3), resent=resent)
        else:
            self._log.debug("peer_connected", image_size=welcome.image_size, max_blocks=welcome.max_blocks,
                            lz4=bool(welcome.features & p.FEATURE_LZ4))
        if self._held:
            conn.hold(True)
        self._ready.set()
        self._pump()

    def _on_lost(self, conn: Connection, reason: str) -> None:
        self._conn = None
        self.inflight = 0
        self.stats.link_losses += 1
        key = reason.split(":")[0][:40]
        self.stats.losses_by_reason[key] = self.stats.losses_by_reason.get(key, 0) + 1
        self.stats.last_error = reason
        if self._outage_start is None:
            self._outage_start = asyncio.get_running_loop().time()
        self._unsent.clear()
        for req in list(self._pending.values()):
            if req.dest is None:
                del self._pending[req.id]
                continue
            req.sent = False
            req.epoch = -1
            self._unsent.append(req)
        self._update_busy()
        if not self._closed:
            self._log.warning("peer_link_lost", reason=reason, waiting_requests=len(self._unsent))

    # -- priority between the channels -----------------------------------------------------
    def _update_busy(self) -> None:
        if self.on_busy is None:
            return
        busy = any(r.dest is not None for r in self._pending.values())
        if busy != self._busy:
            self._busy = busy
            self.on_busy(busy)

    @property
    def held(self) -> bool:
        """Whether this (bulk) channel is being held back for demand faults now."""
        return self._held

    def hold(self, on: bool) -> None:
        """Bulk side: while demand faults wait, leave this connection's bytes in the kernel."""
        self._held = on
        if self._conn is not None:
            self._conn.hold(on)

    # -- requests --------------------------------------------------------------------------
    def _new_id(self) -> int:
        while True:
            self._next = (self._next % 0x7FFFFFFF) + 1  # ids from 2**31 up are the C fault path's
            if self._next not in self._pending:
                return self._next

    async def read(self, offset: int, dest: memoryview) -> None:
        """Fill ``dest`` with the image's bytes at ``offset``; wait through link outages."""
        n = len(dest)
        if n & (p.BLOCK_SIZE - 1) or offset & (p.BLOCK_SIZE - 1):
            raise SourceError(f"peer reads must be whole 4 KiB blocks (got {offset:#x}+{n:#x})")
        w = self.welcome or (self.reference.welcome if self.reference is not None else None)
        if w is not None and offset + n > w.image_size:
            raise SourceError(f"{offset:#x}+{n:#x} lies past the end of the peer image ({w.image_size:#x} bytes)")
        per = min(w.max_blocks if w is not None else 1, MAX_CLIENT_BLOCKS) << p.BLOCK_SHIFT
        if n <= per:
            await self._request(offset, n >> p.BLOCK_SHIFT, dest)
            return
        parts = [self._request(offset + a, min(per, n - a) >> p.BLOCK_SHIFT, dest[a : a + per])
                 for a in range(0, n, per)]
        results = await asyncio.gather(*parts, return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r

    async def _request(self, offset: int, count: int, dest: memoryview) -> None:
        if self._fatal is not None:
            raise self._fatal
        if self._failed is not None:
            raise self._failed
        if self._closed:
            raise SourceError("peer source closed")
        self.start()
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        req = Request(self._new_id(), offset, count, dest, fut)
        self._pending[req.id] = req
        self.stats.requests += 1
        self._dispatch(req)
        self._update_busy()
        try:
            await fut
        except asyncio.CancelledError:
            self._orphan(req)
            raise

    def _limit(self) -> int:
        w = self.welcome
        return min(self.opts.config.max_inflight, w.max_inflight if w is not None else 1)

    def _dispatch(self, req: Request) -> None:
        if self._conn is not None and self._conn.usable and self.inflight < self._limit():
            self._send(req)
        else:
            self._unsent.append(req)

    def _send(self, req: Request) -> None:
        conn = self._conn
        assert conn is not None
        req.epoch = conn.epoch
        req.sent = True
        req.pos = 0
        req.tainted = False
        self.inflight += 1
        conn.send_read(req)

    def _pump(self) -> None:
        conn = self._conn
        if conn is None or not conn.usable:
            return
        limit = self._limit()
        unsent = self._unsent
        while unsent and self.inflight < limit:
            req = unsent.popleft()
            if req.dest is None or req.future.done():
                self._pending.pop(req.id, None)
                continue
            self._send(req)

    def _orphan(self, req: Request) -> None:
        """Nobody waits for ``req`` any more: its bytes, if they still come, are discarded."""
        req.dest = None
        if req.sent and self._conn is not None:
            self._conn.discard(req.id)
        if not req.sent:
            self._pending.pop(req.id, None)
            with contextlib.suppress(ValueError):
                self._unsent.remove(req)
        self._update_busy()

    def _finish(self, req: Request, exc: BaseException | None) -> None:
        self._pending.pop(req.id, None)
        if req.sent:
            req.sent = False
            self.inflight -= 1
        else:
            with contextlib.suppress(ValueError):
                self._unsent.remove(req)
        if not req.future.done():
            if exc is None:
                req.future.set_result(None)
            else:
                req.future.set_exception(exc)
        self._update_busy()

    def on_data(self, req: Request, blocks: int, ok: bool) -> None:
        req.pos += blocks
        if not ok:
            req.tainted = True
        if req.pos < req.count:
            return
        if req.dest is None:
            self._finish(req, None)
            self._pump()
            return
        if req.tainted:
            self.stats.checksum_failures += 1
            req.refetches += 1
            self._log.warning("peer_checksum_mismatch", offset=req.offset, blocks=req.count, attempt=req.refetches)
            if req.refetches > self.opts.config.checksum_retries:
                self._finish(req, SourceError(
                    f"peer pages at {req.offset:#x} (+{req.count} blocks) failed their checksum "
                    f"{req.refetches} times in a row"))
                self._pump()
                return
            self.inflight -= 1
            req.sent = False
            self._dispatch(req)  # fetch again (same id: the server is done with it); never installed
            return
        self._finish(req, None)
        self._pump()

    def on_request_error(self, req: Request, code: p.ErrorCode | None, msg: str) -> None:
        self.stats.request_errors += 1
        self._finish(req, SourceError(f"peer {self.opts.address}: {code.name if code else 'error'}: {msg}"))
        self._pump()

    def _fail_all(self, exc: SourceError) -> None:
        for req in list(self._pending.values()):
            req.sent = False
            self._pending.pop(req.id, None)
            if not req.future.done():
                req.future.set_exception(exc)
        self._unsent.clear()
        self.inflight = 0
        self._update_busy()

