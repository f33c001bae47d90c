"""One client connection of ``uffdd serve``: its own small state machine (HELLO -> CHALLENGE ->
AUTH -> WELCOME -> READs); anything a client does wrong costs it its own connection and nothing
else. Once a plain connection is authenticated it runs in C (:mod:`.responder`) where the
extension is built; otherwise, and over TLS or with lz4, here: urgent READs are answered inline
when the bytes are at hand, bulk READs go through a per-connection pump that sends at most one
chunk before yielding and slows to one chunk per URGENT_QUIET_S right after an urgent READ, so a
demand fault never waits behind a prefetch for this host's CPU either.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import time
from collections import deque
from typing import Protocol, cast

import structlog

from uffdd.peer import protocol as p
from uffdd.peer.config import ServeLimits
from uffdd.peer.image import Image, ImageError
from uffdd.peer.server.admission import Admission
from uffdd.peer.server.responder import NativeResponder, hand_over, note_urgent, responder_available, urgent_seen
from uffdd.peer.server.stats import ServerStats

log = structlog.get_logger("uffdd.serve")

CHUNK_BLOCKS = 64
"""Blocks per DATA frame when a READ is split (256 KiB): the most a pump sends before yielding."""
CHUNK_BYTES = CHUNK_BLOCKS << p.BLOCK_SHIFT
WRITE_HIGH_WATER = 4 << 20
RING_SLOTS = WRITE_HIGH_WATER // CHUNK_BYTES + 4
"""Reused read buffers per connection. A transport may still hold a buffer it was given until
its bytes are written; it holds at most WRITE_HIGH_WATER plus one chunk (we stop sending at the
high-water mark), so a slot reused RING_SLOTS sends later is no longer referenced."""
SMALL_READ = 16 << p.BLOCK_SHIFT
URGENT_QUIET_S = 0.002
"""After an urgent READ, bulk pumps wait this long before their next chunk."""
CLOSE_GRACE_S = 1.0


class Server(Protocol):
    """What a connection needs of its server (:class:`uffdd.peer.server.PeerServer`)."""

    limits: ServeLimits
    stats: ServerStats
    admission: Admission
    connections: set[ServerConnection]
    images: dict[str, Image]
    secret: bytes | None
    compression: bool
    native: bool
    ssl_context: ssl.SSLContext | None
    last_urgent: float


class _Req:
    __slots__ = ("count", "id", "offset")

    def __init__(self, rid: int, offset: int, count: int) -> None:
        self.id = rid
        self.offset = offset
        self.count = count


_HELLO, _AUTH, _READY, _CLOSING, _NATIVE = range(5)


class ServerConnection(asyncio.Protocol):
    """One client connection."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.limits = server.limits
        self.decoder = p.FrameDecoder(p.SERVER_ACCEPTS, p.Limits(max_blocks=self.limits.max_blocks))
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.state = _HELLO
        self.role = p.Role.URGENT
        self.image: Image | None = None
        self.image_name = ""
        self.hello = b""
        self.challenge_core = b""
        self.compressor = p.Compressor(False)
        self.inflight: set[int] = set()
        self.small: deque[_Req] = deque()
        self.large: deque[_Req] = deque()
        self.paused = False
        self._resumed = asyncio.Event()
        self._resumed.set()
        self._pump_task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()
        self.last_rx = self._loop.time()
        self.counts = p.BlockCounts()
        self.sealer: p.Sealer | None = None
        """Tags what we send once the client is authenticated (:mod:`uffdd.peer.protocol.seal`)."""
        self._ring: list[bytearray] = []
        self._ring_next = 0
        self._log = log
        self.native: NativeResponder | None = None
        """Set once the connection runs in C (:mod:`.responder`)."""

    # -- transport callbacks ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport subclasses
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self._log = log.bind(peer=self.peer)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                # A peer that vanished (link cut) must not hold our buffers for the default ~15 min.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(self.limits.idle_timeout * 1000))
        srv = self.server
        srv.stats.connections_total += 1
        srv.connections.add(self)
        srv.admission.admit(self)  # may drop the oldest unauthenticated connection
        self._timer = self._loop.call_later(self.limits.handshake_timeout, self._handshake_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state == _NATIVE:
            return  # the socket lives on in the responder
        self.state = _CLOSING
        self.server.connections.discard(self)
        self.server.admission.gone(self)
        if self._timer is not None:
            self._timer.cancel()
        if self._pump_task is not None:
            self._pump_task.cancel()
        self._resumed.set()
        self.small.clear()
        self.large.clear()
        self.inflight.clear()
        self.flush_counts()
        self._log.debug("peer_disconnected", error=str(exc) if exc else None)

    def pause_writing(self) -> None:
        self.paused = True
        self._resumed.clear()
        # Stop taking requests too: what a client that does not read can make us buffer is bounded.
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.paused = False
        self._resumed.set()
        if self.transport is not None and self.state != _CLOSING:
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.state in (_CLOSING, _NATIVE):
            return
        self.last_rx = self._loop.time()
        try:
            for frame in self.decoder.frames(data):  # one at a time: AUTH turns tags on for what follows
                self._handle(frame)
                if self.state in (_CLOSING, _NATIVE):  # nothing may follow AUTH before WELCOME
                    return
        except p.ProtocolError as exc:
            if exc.code is p.ErrorCode.TAMPERED:
                self.server.stats.tampered += 1
            self.fail(exc)

    def eof_received(self) -> bool | None:
        return None

    # -- errors ----------------------------------------------------------------------------
    def fail(self, exc: p.ProtocolError) -> None:
        """Tell the client what it did wrong, then drop this connection (only this one)."""
        if self.state == _CLOSING:
            return
        native = self.state == _NATIVE
        unauthenticated = self.state in (_HELLO, _AUTH)
        self.state = _CLOSING
        self.server.admission.gone(self)
        self.server.stats.count_error(exc.code)
        if exc.code in (p.ErrorCode.AUTH_FAILED, p.ErrorCode.AUTH_REQUIRED):
            self.server.stats.auth_failures += 1
        if unauthenticated and exc.code is not p.ErrorCode.SHUTTING_DOWN:
            # Anyone can open connections: those refused before authenticating are summed up,
            # one line per interval (uffdd.peer.server.admission), never one line each.
            self.server.admission.note_refused(exc.code.name)
            self._log.debug("peer_connection_refused", code=exc.code.name, error=exc.message)
        else:
            quiet = exc.code in (p.ErrorCode.SHUTTING_DOWN, p.ErrorCode.TIMEOUT)
            (self._log.info if quiet else self._log.warning)(
                "peer_connection_dropped", code=exc.code.name, error=exc.message, image=self.image_name or None)
        self.small.clear()
        self.large.clear()
        if self._pump_task is not None:
            self._pump_task.cancel()
        if native and self.native is not None:
            self.native.fail(exc)
            return
        t = self.transport
        if t is None:
            return
        with contextlib.suppress(Exception):
            t.write(p.encode_error(exc.code, exc.message, sealer=self.sealer))
        t.close()
        # A client that does not read would keep close() waiting for the flush: cut it short.
        self._loop.call_later(CLOSE_GRACE_S, t.abort)

    def _handshake_timeout(self) -> None:
        if self.state in (_HELLO, _AUTH):
            self.fail(p.ProtocolError(p.ErrorCode.TIMEOUT,
                                      f"handshake not completed within {self.limits.handshake_timeout:g}s"))
        elif self.state == _READY:
            self._idle_check()

    def _idle_check(self) -> None:
        if self.state != _READY:
            return
        idle = self._loop.time() - self.last_rx
        if idle > self.limits.idle_timeout:
            self.fail(p.ProtocolError(p.ErrorCode.TIMEOUT, f"nothing received for {idle:.0f}s"))
            return
        self._timer = self._loop.call_later(self.limits.idle_timeout / 4, self._idle_check)

    # -- frames ----------------------------------------------------------------------------
    def _handle(self, f: p.Frame) -> None:
        t = f.type
        if t is p.FrameType.READ:
            if self.state != _READY:
                raise p.ProtocolError(p.ErrorCode.BAD_STATE, "READ before the handshake completed")
            self._on_read(f)
        elif t is p.FrameType.PING:
            if self.state != _READY:
                raise p.ProtocolError(p.ErrorCode.BAD_STATE, "PING before the handshake completed")
            assert self.transport is not None
            self.transport.write(p.encode_frame(p.FrameType.PONG, id=f.id, sealer=self.sealer))
        elif t is p.FrameType.HELLO:
            if self.state != _HELLO:
                raise p.ProtocolError(p.ErrorCode.BAD_STATE, "HELLO sent twice")
            self._on_hello(f)
        elif t is p.FrameType.AUTH:
            if self.state != _AUTH:
                raise p.ProtocolError(p.ErrorCode.BAD_STATE, "AUTH before HELLO, or twice")
            self._on_auth(f)
        elif t is p.FrameType.ERROR:
            self._log.warning("peer_reported_error", code=f.aux, error=f.payload.decode("utf-8", "replace"))
            self.state = _CLOSING
            if self.transport is not None:
                self.transport.close()
        else:  # the decoder only lets SERVER_ACCEPTS through
            raise p.ProtocolError(p.ErrorCode.BAD_STATE, f"unexpected {t.name}")

    def _on_hello(self, f: p.Frame) -> None:
        hello = p.Hello.decode(f.payload)
        self.role = hello.role
        self.image_name = hello.name
        self.hello = f.payload
        self.compressor = p.Compressor(bool(hello.features & p.FEATURE_LZ4) and self.server.compression)
        secret = self.server.secret
        auth = p.AuthMethod.HMAC_SHA256 if secret else p.AuthMethod.NONE
        nonce = os.urandom(p.NONCE_SIZE)
        core = p.Challenge(auth, nonce, p.NO_PROOF).core()
        proof = p.server_proof(secret, f.payload, core) if secret else p.NO_PROOF
        self.challenge_core = core
        self.state = _AUTH
        assert self.transport is not None
        self.transport.write(p.encode_frame(p.FrameType.CHALLENGE, p.Challenge(auth, nonce, proof).encode()))

    def _on_auth(self, f: p.Frame) -> None:
        if len(f.payload) != p.PROOF_SIZE:
            raise p.ProtocolError(p.ErrorCode.BAD_LENGTH, f"AUTH payload is {len(f.payload)} bytes, not {p.PROOF_SIZE}")
        secret = self.server.secret
        if secret:
            if f.payload == p.NO_PROOF:
                raise p.ProtocolError(p.ErrorCode.AUTH_REQUIRED, "this server requires the shared secret")
            if not p.proofs_equal(f.payload, p.client_proof(secret, self.hello, self.challenge_core)):
                raise p.ProtocolError(p.ErrorCode.AUTH_FAILED, "wrong shared secret")
            # From here on every frame carries a tag, under keys bound to this very exchange.
            c2s, s2c = p.session_keys(secret, self.hello, self.challenge_core, f.payload)
            self.decoder.opener = p.Opener(c2s)
            self.sealer = p.Sealer(s2c)
        image = self.server.images.get(self.image_name)
        if image is None:
            known = ", ".join(sorted(self.server.images)) or "none"
            raise p.ProtocolError(p.ErrorCode.NO_SUCH_IMAGE, f"no image {self.image_name!r} here (serving: {known})")
        self.server.admission.authenticate(self)
        self.image = image
        self.state = _READY
        self.server.stats.handshakes_ok += 1
        role = self.role.name.lower()
        self.server.stats.welcomed[role] = self.server.stats.welcomed.get(role, 0) + 1
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_later(self.limits.idle_timeout / 4, self._idle_check)
        w = p.Welcome(image.size, p.BLOCK_SIZE, self.limits.max_blocks, self.limits.max_inflight,
                      p.FEATURE_LZ4 if self.compressor.enabled else 0, image.image_id)
        assert self.transport is not None
        self.transport.write(p.encode_frame(p.FrameType.WELCOME, w.encode(), sealer=self.sealer))
        self._log = self._log.bind(image=image.name, role=self.role.name.lower())
        # Bulk connections that asked for lz4 stay in Python (the C responder sends raw and zero blocks).
        if (self.server.native and self.server.ssl_context is None and responder_available()
                and not self.compressor.enabled):
            try:
                image_fd = image.dup_fd()
            except ImageError:
                image_fd = -1
            fd = hand_over(self.transport) if image_fd >= 0 else None
            if fd is not None:
                self.state = _NATIVE
                if self._timer is not None:
                    self._timer.cancel()
                self.native = NativeResponder(self, fd, image_fd, image, self.sealer, self.decoder.opener,
                                              bulk=self.role is p.Role.BULK)
            elif image_fd >= 0:
                os.close(image_fd)
        self._log.info("peer_connected", native=self.native is not None)

    @property
    def said_hello(self) -> bool:
        """A HELLO came: dropped after those that sent nothing when room must be made."""
        return self.state != _HELLO

    def native_closed(self) -> None:
        """The responder closed the connection: it is gone from the server's books."""
        self.state = _CLOSING
        self.server.connections.discard(self)
        self.server.admission.gone(self)
        self._log.debug("peer_disconnected")

    def abort(self) -> None:
        """Drop the connection now, without a word."""
        if self.native is not None:
            self.native.close()
        elif self.transport is not None:
            self.transport.abort()

    def _on_read(self, f: p.Frame) -> None:
        if f.id in self.inflight:
            raise p.ProtocolError(p.ErrorCode.BAD_ID, f"request id {f.id} is already in flight")
        if len(self.inflight) >= self.limits.max_inflight:
            raise p.ProtocolError(p.ErrorCode.TOO_MANY_REQUESTS,
                                  f"more than {self.limits.max_inflight} requests in flight")
        image = self.image
        assert image is not None
        length = f.count << p.BLOCK_SHIFT
        if not image.in_bounds(f.offset, length):
            raise p.ProtocolError(p.ErrorCode.OUT_OF_RANGE,
                                  f"READ {f.offset:#x}+{length:#x} is outside image {image.name!r} "
                                  f"({image.size:#x} bytes)")
        self.server.stats.reads += 1
        if self.role is p.Role.URGENT:
            self.server.last_urgent = time.perf_counter()
            note_urgent()
        req = _Req(f.id, f.offset, f.count)
        self.inflight.add(f.id)
        if not image.contains(f.offset, length):
            # Inside the announced size but in a hole between a live guest's regions: this
            # request fails, the connection stays.
            self.server.stats.read_errors += 1
            self.inflight.discard(f.id)
            assert self.transport is not None
            self.transport.write(p.encode_error(
                p.ErrorCode.OUT_OF_RANGE, f"{f.offset:#x}+{length:#x} is not in a region of image {image.name!r}",
                id=f.id, sealer=self.sealer))
            return
        if (self.role is p.Role.URGENT and f.count <= CHUNK_BLOCKS and not self.paused
                and not self.small and not self.large):
            try:
                data = image.read_nowait(f.offset, self._buffer(length))
            except ImageError as exc:
                self._request_failed(req, exc)
                return
            if data is not None:
                self._send(req, data)
                self.inflight.discard(req.id)
                return
        (self.small if f.count <= CHUNK_BLOCKS else self.large).append(req)
        if self._pump_task is None or self._pump_task.done():
            self._pump_task = self._loop.create_task(self._pump())

    def _buffer(self, length: int) -> bytearray | memoryview:
        """Where to read ``length`` image bytes: a fresh small buffer, or the next ring slot.

        Fresh allocations of chunk-sized buffers cost more than the reads themselves (the
        allocator maps and zeroes them each time); if a slot were ever still in use, the bytes
        sent would fail their checksum at the client and be fetched again, never installed.
        """
        if length <= SMALL_READ:
            return bytearray(length)
        i = self._ring_next
        self._ring_next = (i + 1) % RING_SLOTS
        if i == len(self._ring):
            self._ring.append(bytearray(CHUNK_BYTES))
        return memoryview(self._ring[i])[:length]

    def _request_failed(self, req: _Req, exc: ImageError) -> None:
        self.server.stats.read_errors += 1
        self._log.error("image_read_failed", offset=req.offset, blocks=req.count, error=str(exc))
        self.inflight.discard(req.id)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(p.encode_error(p.ErrorCode.IO_ERROR, str(exc), id=req.id, sealer=self.sealer))

    def _send(self, req: _Req, data: bytearray | memoryview) -> None:
        t = self.transport
        if t is None or t.is_closing():  # uvloop refuses writes once it closed the transport
            return
        t.writelines(p.encode_data(req.id, req.offset, memoryview(data), self.compressor, self.counts, self.sealer))

    async def _pump(self) -> None:
        """Serve queued READs: small ones first, large ones one chunk at a time in between."""
        image = self.image
        assert image is not None
        bulk = self.role is p.Role.BULK
        while self.state == _READY and (self.small or self.large):
            if self.paused:
                await self._resumed.wait()
                continue
            if bulk:
                # Demand faults first, on this host's CPU too: while urgent READs keep coming,
                # prefetch gets one chunk per URGENT_QUIET_S instead of all the CPU.
                quiet = max(self.server.last_urgent, urgent_seen()) + URGENT_QUIET_S - time.perf_counter()
                if quiet > 0:
                    await asyncio.sleep(quiet)
                    if self.state != _READY:
                        return
            large = not self.small
            if large:
                req = self.large[0]
                n = min(req.count, CHUNK_BLOCKS)
            else:
                req = self.small.popleft()
                n = req.count
            try:
                buf = self._buffer(n << p.BLOCK_SHIFT)
                data = image.read_nowait(req.offset, buf)
                if data is None:
                    data = await image.read(req.offset, buf)
            except ImageError as exc:
                if self.state != _READY:
                    return
                if large:
                    self.large.popleft()
                self._request_failed(req, exc)
                continue
            if self.state != _READY:
                return
            self._send(_Req(req.id, req.offset, n), data)
            if n == req.count:
                if large:
                    self.large.popleft()
                self.inflight.discard(req.id)
            else:
                req.offset += n << p.BLOCK_SHIFT
                req.count -= n
            await asyncio.sleep(0)

    def shutdown(self) -> None:
        self.fail(p.ProtocolError(p.ErrorCode.SHUTTING_DOWN, "server shutting down"))

    def flush_counts(self) -> None:
        if self.native is not None:
            self.native.fold_stats()
        s, c = self.server.stats, self.counts
        s.blocks_raw += c.raw
        s.blocks_zero += c.zero
        s.blocks_lz4 += c.lz4
        s.payload_bytes += c.payload_bytes
        self.counts = p.BlockCounts()


__all__ = ["CHUNK_BLOCKS", "Server", "ServerConnection"]
