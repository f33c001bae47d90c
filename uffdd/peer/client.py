"""The destination side of the link: pipelined page requests that survive a broken connection.

A :class:`Channel` is one logical connection to ``uffdd serve`` (urgent or bulk). It keeps
every request that has not been fully answered; when the connection breaks (an error, EOF, or
silence longer than ``io_timeout`` while pings go unanswered) it reconnects with bounded
exponential backoff and re-sends all of them. Waiting readers never see the outage, only a
longer wait; past ``deadline`` they get :class:`SourceUnavailable`, loudly. A reconnect that
finds another image (different id or size) is refused for good: pages of two images are
never mixed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import ssl
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import structlog

from uffdd.errors import SourceError, SourceUnavailable
from uffdd.peer import protocol as p

log = structlog.get_logger("uffdd.peer")

MAX_CLIENT_BLOCKS = 16384
STABLE_S = 1.0
"""A connection that lived this long resets the reconnect backoff."""
BULK_SLICE = 256 << 10
"""Bytes a bulk connection may take in before it lets the event loop run other callbacks."""
HOLD_SLICE_S = 0.005
"""While demand faults wait, a bulk connection takes in one slice per this many seconds."""


@dataclass(frozen=True)
class ClientOptions:
    host: str
    port: int
    image: str = "default"
    secret: bytes | None = None
    ssl_context: ssl.SSLContext | None = None
    server_hostname: str | None = None
    compression: bool = True
    connect_timeout: float = 2.0
    """Seconds for one attempt: TCP connect, TLS and the HELLO/AUTH exchange."""
    open_timeout: float = 10.0
    """Seconds the first connection may take before the session is refused."""
    reconnect_min: float = 0.05
    reconnect_max: float = 2.0
    deadline: float = 60.0
    """Seconds without a working connection before waiting readers get SourceUnavailable."""
    keepalive: float = 0.5
    io_timeout: float = 3.0
    """A connection that received nothing for this long (pings included) is declared dead."""
    max_inflight: int = 256
    checksum_retries: int = 5

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass
class PeerStats:
    """Counters of one peer source (both channels); read by logs, tests, benchmarks."""

    connects: int = 0
    reconnects: int = 0
    connect_failures: int = 0
    link_losses: int = 0
    requests: int = 0
    requests_resent: int = 0
    checksum_failures: int = 0
    protocol_errors: int = 0
    request_errors: int = 0
    unreachable: int = 0
    outage_seconds: float = 0.0
    last_error: str = ""
    losses_by_reason: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return {k: v for k, v in self.__dict__.items() if k != "losses_by_reason"} | {
            "losses_by_reason": dict(self.losses_by_reason)}


class PeerRefused(SourceUnavailable):
    """The server answered but refused us (auth, image, version): retrying will not help by itself."""

    def __init__(self, code: p.ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class _Request:
    __slots__ = ("count", "dest", "epoch", "future", "id", "offset", "pos", "refetches", "sent", "tainted")

    def __init__(self, rid: int, offset: int, count: int, dest: memoryview, future: asyncio.Future[None]) -> None:
        self.id = rid
        self.offset = offset
        self.count = count
        self.dest: memoryview | None = dest
        self.future = future
        self.pos = 0
        self.epoch = -1
        self.sent = False
        self.tainted = False
        self.refetches = 0


class _Connection(asyncio.BufferedProtocol):
    """One TCP (or TLS) connection of a channel; dies with its socket, never reused."""

    def __init__(self, channel: Channel, epoch: int) -> None:
        self.channel = channel
        self.epoch = epoch
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        # Until WELCOME says what is negotiated, no DATA can be valid (lookup finds nothing).
        self.reader = p.ResponseReader(self, lz4=False, max_blocks=1)
        self.ready = False
        self.closed: asyncio.Future[str] = self.loop.create_future()
        self._expect: asyncio.Future[p.Frame] | None = None
        self._discard = memoryview(bytearray(4096))
        self._dead = False
        self.last_rx = self.loop.time()
        self._ka: asyncio.TimerHandle | None = None
        self._ping = 0
        self.close_reason = "closed"
        self._yield_every = BULK_SLICE if channel.role is p.Role.BULK else 0
        self._since_yield = 0
        self._held = False
        self._valve: asyncio.TimerHandle | None = None

    # -- transport callbacks ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport subclasses
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT,
                                int(self.channel.opts.io_timeout * 1000))

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._dead:
            return self._discard
        return self.reader.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        if self._dead:
            return
        self.last_rx = self.loop.time()
        try:
            self.reader.buffer_updated(nbytes)
        except p.ProtocolError as exc:
            self.channel.stats.protocol_errors += 1
            self.abort(f"protocol error from server: {exc}", send=exc)
            return
        if self._yield_every:
            self._since_yield += nbytes
            if self._since_yield >= self._yield_every and self.transport is not None:
                # A transport reads (and we verify) as long as bytes keep coming: make the bulk
                # connection step aside once per slice so a demand fault's answer is not kept
                # waiting behind megabytes of prefetch in this very callback.
                self._since_yield = 0
                self.transport.pause_reading()
                self.loop.call_soon(self._resume)

    def _resume(self) -> None:
        if self._held:
            # Demand faults are waiting: the next slice comes only when the valve opens.
            if self._valve is None:
                self._valve = self.loop.call_later(HOLD_SLICE_S, self._open_valve)
            return
        if not self._dead and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def hold(self, on: bool) -> None:
        """Pause (or resume) reading this bulk connection; even held, one slice per
        HOLD_SLICE_S goes through, so endless demand faults cannot starve prefetch outright."""
        t = self.transport
        if self._dead or t is None or t.is_closing() or on == self._held:
            self._held = on and not self._dead
            return
        self._held = on
        if on:
            t.pause_reading()
            self._valve = self.loop.call_later(HOLD_SLICE_S, self._open_valve)
        else:
            if self._valve is not None:
                self._valve.cancel()
                self._valve = None
            self._since_yield = 0
            t.resume_reading()

    def _open_valve(self) -> None:
        self._valve = None
        if self._held and not self._dead and self.transport is not None and not self.transport.is_closing():
            self._since_yield = 0
            self.transport.resume_reading()

    def eof_received(self) -> bool | None:
        self.close_reason = "server closed the connection"
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._dead = True
        if self._ka is not None:
            self._ka.cancel()
        if self._valve is not None:
            self._valve.cancel()
        if exc is not None and self.close_reason in ("closed", "server closed the connection"):
            self.close_reason = f"{type(exc).__name__}: {exc}"
        if self._expect is not None and not self._expect.done():
            self._expect.set_exception(ConnectionResetError(self.close_reason))
        if not self.closed.done():
            self.closed.set_result(self.close_reason)

    def abort(self, reason: str, send: p.ProtocolError | None = None) -> None:
        """Drop this connection now (the channel reconnects and re-sends)."""
        if self._dead:
            return
        self._dead = True
        self.close_reason = reason
        t = self.transport
        if t is not None:
            if send is not None:
                with contextlib.suppress(Exception):
                    t.write(p.encode_error(send.code, send.message))
            t.abort()

    # -- ReaderHandler ---------------------------------------------------------------------
    def lookup(self, req_id: int) -> p.Target | None:
        req = self.channel._pending.get(req_id)
        if req is None or not req.sent or req.epoch != self.epoch:
            return None
        return req

    def on_data(self, target: p.Target, blocks: int, ok: bool) -> None:
        assert isinstance(target, _Request)
        self.channel._on_data(target, blocks, ok)

    def on_frame(self, frame: p.Frame) -> None:
        t = frame.type
        if not self.ready:
            if t is p.FrameType.ERROR and frame.id == 0:
                refused = p.error_code(frame.aux) or p.ErrorCode.BAD_FRAME
                msg = f"server refused: {refused.name}: {frame.payload.decode('utf-8', 'replace')}"
                self.close_reason = msg
                if self._expect is not None and not self._expect.done():
                    self._expect.set_exception(PeerRefused(refused, msg))
                return
            if self._expect is None or self._expect.done():
                raise p.ProtocolError(p.ErrorCode.BAD_STATE, f"unexpected {t.name} during the handshake")
            self._expect.set_result(frame)
            return
        if t is p.FrameType.PONG:
            return
        if t is p.FrameType.ERROR:
            code = p.error_code(frame.aux)
            msg = frame.payload.decode("utf-8", "replace")
            if frame.id == 0:
                self.close_reason = f"server: {code.name if code else frame.aux}: {msg}"
                log.warning("peer_server_error", channel=self.channel.name, code=code.name if code else frame.aux,
                            error=msg)
                return
            req = self.channel._pending.get(frame.id)
            if req is None or not req.sent or req.epoch != self.epoch:
                raise p.ProtocolError(p.ErrorCode.BAD_ID, f"ERROR for request {frame.id}, which is not in flight")
            self.channel._on_request_error(req, code, msg)
            return
        raise p.ProtocolError(p.ErrorCode.BAD_STATE, f"unexpected {t.name} after the handshake")

    # -- handshake -------------------------------------------------------------------------
    async def _next(self, want: p.FrameType) -> p.Frame:
        self._expect = self.loop.create_future()
        frame = await self._expect
        self._expect = None
        if frame.type is not want:
            raise p.ProtocolError(p.ErrorCode.BAD_STATE, f"expected {want.name}, got {frame.type.name}")
        return frame

    async def handshake(self) -> p.Welcome:
        ch = self.channel
        opts = ch.opts
        assert self.transport is not None
        hello = p.Hello(ch.role, p.FEATURE_LZ4 if opts.compression else 0, os.urandom(p.NONCE_SIZE),
                        opts.image).encode()
        self.transport.write(p.encode_frame(p.FrameType.HELLO, hello))
        challenge = p.Challenge.decode((await self._next(p.FrameType.CHALLENGE)).payload)
        core = challenge.core()
        if challenge.auth is p.AuthMethod.HMAC_SHA256:
            if opts.secret is None:
                self.abort("no secret", send=p.ProtocolError(p.ErrorCode.AUTH_REQUIRED, "client has no secret"))
                raise PeerRefused(p.ErrorCode.AUTH_REQUIRED,
                                  "the server requires a shared secret and none is configured (secret_file)")
            if not p.proofs_equal(challenge.proof, p.server_proof(opts.secret, hello, core)):
                self.abort("bad server proof", send=p.ProtocolError(p.ErrorCode.AUTH_FAILED, "server proof wrong"))
                raise PeerRefused(p.ErrorCode.AUTH_FAILED,
                                  "the server does not know our shared secret (wrong secret, or not our server)")
            proof = p.client_proof(opts.secret, hello, core)
        else:
            if opts.secret is not None:
                self.abort("server without auth",
                           send=p.ProtocolError(p.ErrorCode.AUTH_REQUIRED, "client requires authentication"))
                raise PeerRefused(p.ErrorCode.AUTH_REQUIRED,
                                  "a secret is configured but the server does not authenticate: refusing it")
            proof = p.NO_PROOF
        self.transport.write(p.encode_frame(p.FrameType.AUTH, proof))
        welcome = p.Welcome.decode((await self._next(p.FrameType.WELCOME)).payload)
        if welcome.features & p.FEATURE_LZ4 and not opts.compression:
            raise p.ProtocolError(p.ErrorCode.BAD_FRAME, "server granted lz4, which we did not ask for")
        self.reader = p.ResponseReader(self, lz4=bool(welcome.features & p.FEATURE_LZ4),
                                       max_blocks=min(welcome.max_blocks, MAX_CLIENT_BLOCKS),
                                       max_read=BULK_SLICE if ch.role is p.Role.BULK else 1 << 62)
        self.ready = True
        self.last_rx = self.loop.time()
        self._ka = self.loop.call_later(opts.keepalive, self._keepalive)
        return welcome

    def _keepalive(self) -> None:
        if self._dead or self.transport is None or self.transport.is_closing():
            return
        opts = self.channel.opts
        silent = self.loop.time() - self.last_rx
        if silent > opts.io_timeout:
            log.warning("peer_link_silent", channel=self.channel.name, seconds=round(silent, 2),
                        inflight=self.channel.inflight)
            self.abort(f"nothing received for {silent:.1f}s")
            return
        self._ping = (self._ping + 1) & 0xFFFFFFFF
        self.transport.write(p.header(p.FrameType.PING, id=self._ping))
        self._ka = self.loop.call_later(opts.keepalive, self._keepalive)

    @property
    def usable(self) -> bool:
        """Ready and not going away (uvloop refuses writes to a transport it already closed)."""
        t = self.transport
        return self.ready and not self._dead and t is not None and not t.is_closing()

    def send_read(self, req: _Request) -> None:
        assert self.transport is not None
        self.transport.write(p.encode_read(req.id, req.offset, req.count))


class Channel:
    """Requests over one logical connection, kept across reconnects."""

    def __init__(self, opts: ClientOptions, role: p.Role, stats: PeerStats,
                 reference: Channel | None = None) -> None:
        self.opts = opts
        self.role = role
        self.name = role.name.lower()
        self.stats = stats
        self.reference = reference
        self.welcome: p.Welcome | None = None
        self._pending: dict[int, _Request] = {}
        self._unsent: deque[_Request] = deque()
        self._conn: _Connection | None = None
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

    @property
    def connected(self) -> bool:
        return self._conn is not None and self._conn.ready

    @property
    def unreachable(self) -> SourceUnavailable | None:
        """Set while the peer has been unreachable past the deadline."""
        return self._failed

    # -- connection management -------------------------------------------------------------
    async def _connect(self) -> tuple[_Connection, p.Welcome]:
        loop = asyncio.get_running_loop()
        opts = self.opts
        self._epoch += 1
        epoch = self._epoch
        conn: _Connection | None = None
        try:
            async with asyncio.timeout(opts.connect_timeout):
                _, proto = await loop.create_connection(
                    lambda: _Connection(self, epoch), opts.host, opts.port, ssl=opts.ssl_context,
                    server_hostname=(opts.server_hostname or opts.host) if opts.ssl_context else None,
                    ssl_handshake_timeout=opts.connect_timeout if opts.ssl_context else None)
                conn = proto
                welcome = await conn.handshake()
        except BaseException:
            if conn is not None:
                conn.abort("handshake failed")
            raise
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
        delay = opts.reconnect_min
        attempt = 0
        while not self._closed:
            try:
                conn, welcome = await self._connect()
                try:
                    self._check_welcome(welcome)
                except SourceError:
                    conn.abort("another image")
                    raise
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
                    delay = opts.reconnect_min
                    continue
                # A connection that dies at once (e.g. the server drops it for what we send)
                # must not turn into a reconnect storm: keep backing off.
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, opts.reconnect_max)
                continue
            attempt += 1
            self._check_deadline()
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, opts.reconnect_max)

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
        if down > self.opts.deadline:
            self._failed = SourceUnavailable(
                f"peer {self.opts.address} unreachable for {down:.1f}s (deadline {self.opts.deadline:g}s): "
                f"{self.stats.last_error}")
            self.stats.unreachable += 1
            self._log.error("peer_unreachable", seconds=round(down, 1), deadline=self.opts.deadline,
                            failed_requests=len(self._pending), error=self.stats.last_error)
            self._fail_all(self._failed)

    def _on_connected(self, conn: _Connection, welcome: p.Welcome, attempt: int) -> None:
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

    def _on_lost(self, conn: _Connection, reason: str) -> None:
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

    def hold(self, on: bool) -> None:
        """Bulk side: while demand faults wait, leave this connection's bytes in the kernel."""
        self._held = on
        if self._conn is not None:
            self._conn.hold(on)

    # -- requests --------------------------------------------------------------------------
    def _new_id(self) -> int:
        while True:
            self._next = (self._next % 0xFFFFFFFF) + 1
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
        req = _Request(self._new_id(), offset, count, dest, fut)
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
        return min(self.opts.max_inflight, w.max_inflight if w is not None else 1)

    def _dispatch(self, req: _Request) -> None:
        if self._conn is not None and self._conn.usable and self.inflight < self._limit():
            self._send(req)
        else:
            self._unsent.append(req)

    def _send(self, req: _Request) -> None:
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

    def _orphan(self, req: _Request) -> None:
        """Nobody waits for ``req`` any more: its bytes, if they still come, are discarded."""
        req.dest = None
        if not req.sent:
            self._pending.pop(req.id, None)
            with contextlib.suppress(ValueError):
                self._unsent.remove(req)
        self._update_busy()

    def _finish(self, req: _Request, exc: BaseException | None) -> None:
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

    def _on_data(self, req: _Request, blocks: int, ok: bool) -> None:
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
            if req.refetches > self.opts.checksum_retries:
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

    def _on_request_error(self, req: _Request, code: p.ErrorCode | None, msg: str) -> None:
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


class PeerClient:
    """Both channels to one image: urgent for demand faults, bulk (opened on first use) for prefetch."""

    def __init__(self, opts: ClientOptions) -> None:
        self.opts = opts
        self.stats = PeerStats()
        self.urgent = Channel(opts, p.Role.URGENT, self.stats)
        self.urgent.on_busy = self._urgent_busy
        self.bulk: Channel | None = None

    def _urgent_busy(self, busy: bool) -> None:
        if self.bulk is not None:
            self.bulk.hold(busy)

    async def open(self) -> p.Welcome:
        try:
            return await self.urgent.wait_ready(self.opts.open_timeout)
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
            self.bulk = Channel(self.opts, p.Role.BULK, self.stats, reference=self.urgent)
            self.bulk.hold(self.urgent._busy)
        await self.bulk.read(offset, dest)

    @property
    def unreachable(self) -> SourceUnavailable | None:
        return self.urgent.unreachable or (self.bulk.unreachable if self.bulk is not None else None)

    async def aclose(self) -> None:
        await self.urgent.aclose()
        if self.bulk is not None:
            await self.bulk.aclose()
