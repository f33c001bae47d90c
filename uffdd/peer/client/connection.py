"""One TCP (or TLS) connection of a channel: the handshake, keepalive, and the bytes of the
answers, decoded by the sans-IO :class:`~uffdd.peer.protocol.ResponseReader` straight into
the waiting requests' buffers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from typing import Protocol, cast

import structlog

from uffdd.peer import protocol as p
from uffdd.peer.client.options import ClientOptions, PeerRefused, PeerStats

log = structlog.get_logger("uffdd.peer")

MAX_CLIENT_BLOCKS = 16384
BULK_SLICE = 256 << 10
"""Bytes a bulk connection may take in before it lets the event loop run other callbacks."""
HOLD_SLICE_S = 0.005
"""While demand faults wait, a bulk connection takes in one slice per this many seconds."""


class Request:
    """One READ and where its bytes go; kept by its channel until fully answered."""

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



class Connection(Protocol):
    """What a channel drives: one connection at a time, Python's or the C link's (:mod:`.native`)."""

    epoch: int
    ready: bool
    closed: asyncio.Future[str]
    close_reason: str

    @property
    def usable(self) -> bool: ...
    def hold(self, on: bool) -> None: ...
    def send_read(self, req: Request) -> None: ...
    def discard(self, req_id: int) -> None: ...
    def abort(self, reason: str, send: p.ProtocolError | None = None) -> None: ...


class Requests(Protocol):
    """What a connection needs of its channel: the requests it may answer, and where to report."""

    role: p.Role
    name: str
    opts: ClientOptions
    stats: PeerStats
    inflight: int

    link: object

    def request(self, req_id: int) -> Request | None: ...
    def fold_link_stats(self) -> None: ...
    def on_data(self, req: Request, blocks: int, ok: bool) -> None: ...
    def on_request_error(self, req: Request, code: p.ErrorCode | None, msg: str) -> None: ...


class LinkConnection:
    """What a connection run by a C link after its handshake (urgent or bulk) starts with."""

    def __init__(self, channel: Requests, conn: ClientConnection) -> None:
        self.channel = channel
        self.epoch = conn.epoch
        self.loop = asyncio.get_running_loop()
        self.closed: asyncio.Future[str] = self.loop.create_future()
        self.close_reason = "closed"
        self.ready = True
        self._dead = False


class ClientConnection(asyncio.BufferedProtocol):
    """One TCP (or TLS) connection of a channel; dies with its socket, never reused."""

    def __init__(self, channel: Requests, epoch: int) -> None:
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
        self.sealer: p.Sealer | None = None
        """Tags what we send once the connection is authenticated (:mod:`uffdd.peer.protocol.seal`)."""

    # -- transport callbacks ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport subclasses
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT,
                                int(self.channel.opts.config.io_timeout * 1000))

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
            if exc.code is p.ErrorCode.TAMPERED:
                self.channel.stats.tampered += 1
                log.error("peer_link_tampered", channel=self.channel.name, error=exc.message,
                          hint="a frame failed its tag: the link is reconnected, nothing it carried is installed")
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

    def hand_over(self) -> tuple[int, bytes | None, bytes | None, int, int]:
        """The socket goes on under other management (a C link, :mod:`.native`): stop reading it
        and let go of our copy, without a word on it and without reporting a loss. Returns a
        non-blocking duplicate of its fd, then the frame keys and sequence numbers the link goes
        on with: sending key, receiving key, next sent, next received."""
        assert self.transport is not None
        fd = os.dup(self.transport.get_extra_info("socket").fileno())
        os.set_blocking(fd, False)
        opener, sealer = self.reader.opener, self.sealer
        keys = (sealer.key if sealer else None, opener.key if opener else None,
                sealer.seq if sealer else 0, opener.seq if opener else 0)
        self._dead = True
        self.close_reason = "handed over"
        if self._ka is not None:
            self._ka.cancel()
        if self._valve is not None:
            self._valve.cancel()
        t = self.transport
        if t is not None:
            t.pause_reading()
            t.abort()
        return (fd, *keys)

    def discard(self, req_id: int) -> None:
        """Nobody waits for ``req_id`` any more (its bytes are dropped when they come: the
        reader finds no destination)."""

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
                    t.write(p.encode_error(send.code, send.message, sealer=self.sealer if self.ready else None))
            t.abort()

    # -- ReaderHandler ---------------------------------------------------------------------
    def lookup(self, req_id: int) -> p.Target | None:
        req = self.channel.request(req_id)
        if req is None or not req.sent or req.epoch != self.epoch:
            return None
        return req

    def on_data(self, target: p.Target, blocks: int, ok: bool) -> None:
        assert isinstance(target, Request)
        self.channel.on_data(target, blocks, ok)

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
            req = self.channel.request(frame.id)
            if req is None or not req.sent or req.epoch != self.epoch:
                raise p.ProtocolError(p.ErrorCode.BAD_ID, f"ERROR for request {frame.id}, which is not in flight")
            self.channel.on_request_error(req, code, msg)
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
        # lz4 only for prefetch: a demand fault's page is not worth a compression probe.
        lz4 = opts.config.compression and ch.role is p.Role.BULK and ch.link is None
        hello = p.Hello(ch.role, p.FEATURE_LZ4 if lz4 else 0, os.urandom(p.NONCE_SIZE), opts.image).encode()
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
        opener = None
        if opts.secret is not None:
            # From here on every frame carries a tag, under keys bound to this very exchange.
            c2s, s2c = p.session_keys(opts.secret, hello, core, proof)
            self.sealer, opener = p.Sealer(c2s), p.Opener(s2c)
            self.reader.opener = opener
        frame = await self._next(p.FrameType.WELCOME)
        if opener is not None and not frame.tagged:
            raise p.ProtocolError(p.ErrorCode.TAMPERED, "WELCOME came without its tag")
        welcome = p.Welcome.decode(frame.payload)
        if welcome.features & p.FEATURE_LZ4 and not lz4:
            raise p.ProtocolError(p.ErrorCode.BAD_FRAME, "server granted lz4, which we did not ask for")
        self.reader = p.ResponseReader(self, lz4=bool(welcome.features & p.FEATURE_LZ4),
                                       max_blocks=min(welcome.max_blocks, MAX_CLIENT_BLOCKS),
                                       max_read=BULK_SLICE if ch.role is p.Role.BULK else 1 << 62)
        self.reader.opener = opener
        self.reader.require_tags = opener is not None
        self.ready = True
        self.last_rx = self.loop.time()
        self._ka = self.loop.call_later(opts.config.keepalive, self._keepalive)
        return welcome

    def _keepalive(self) -> None:
        if self._dead or self.transport is None or self.transport.is_closing():
            return
        opts = self.channel.opts
        silent = self.loop.time() - self.last_rx
        if silent > opts.config.io_timeout:
            log.warning("peer_link_silent", channel=self.channel.name, seconds=round(silent, 2),
                        inflight=self.channel.inflight)
            self.abort(f"nothing received for {silent:.1f}s")
            return
        self._ping = (self._ping + 1) & 0xFFFFFFFF
        self.transport.write(p.encode_frame(p.FrameType.PING, id=self._ping, sealer=self.sealer))
        self._ka = self.loop.call_later(opts.config.keepalive, self._keepalive)

    @property
    def usable(self) -> bool:
        """Ready and not going away (uvloop refuses writes to a transport it already closed)."""
        t = self.transport
        return self.ready and not self._dead and t is not None and not t.is_closing()

    def send_read(self, req: Request) -> None:
        assert self.transport is not None
        self.transport.write(p.encode_read(req.id, req.offset, req.count, sealer=self.sealer))

