"""Handshakes in flight: durable from the moment a VMM's connection is accepted.

Firecracker registers its userfaultfd, sends the handshake and runs the guest at once, without
waiting for "ready". A daemon that dies between accept() and storing the session took the only
copy of that connection (and of the fds it carried) with it, and the guest hangs for good. So
the listener stores each connection in the fd store (``<session>.conn``) right after accept(),
before it reads anything, and reads the handshake with :func:`peek_handshake`, which leaves the
body and its fds queued on the connection: a successor that finds ``<session>.conn`` without a
``desc`` reads the same handshake from the start and finishes it.

Why MSG_PEEK rather than a copy of the bytes read so far (say, in a memfd record): a read
consumes the bytes and the fds at once, so between the read and the write of the copy there
would be a moment in which a SIGKILL loses them, and a successor could not tell which bytes
of its copy had already left the socket. Peeking consumes nothing: the stored connection stays
the one record, the fds stay in flight (held by the queue) until the session's own descriptors
are stored, and once they are the session reads its connection to EOF as always, which drops
the handshake (and closes the fds queued with it). ``SO_PEEK_OFF`` lets each peek continue
where the last one stopped, and since peeked bytes keep the socket readable, waiting for the
rest of a body that comes in pieces is done on an edge-triggered epoll of its own.

What stays: the moment between accept() returning and the FDSTORE message being sent. The
accept step calls its ``on_accept`` hook at once, which sends that message on a socket kept
open for it: about 3 us from accept() returning to the message sent, measured in a loop, against
9 us when each message opened a socket of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
from collections.abc import Awaitable, Callable

import structlog

from uffdd import handshake as hs_mod
from uffdd.errors import HandshakeError
from uffdd.unixsock import (
    HANDSHAKE_READ,
    ancillary_space,
    check_handshake_piece,
    close_fds,
    parse_ancillary,
    receive_handshake,
    same_file,
    wait_readable,
)

log = structlog.get_logger("uffdd.inflight")

SO_PEEK_OFF = getattr(socket, "SO_PEEK_OFF", 42)
"""Linux's value; Python's socket module does not name it."""
PEEK_LIMIT = 64 << 10
"""Peeked bytes stay queued, and a stream socket queues only so much (the sender's buffer, about
200 KiB): a handshake still incomplete after this many bytes is read for real from there on. It
is then not durable, but never stuck. Real handshakes are a few KiB."""


OnAccept = Callable[[socket.socket], None]
"""Stores a connection the moment accept() returned it."""
AcceptStep = Callable[[socket.socket, OnAccept], Awaitable[socket.socket]]
"""Waits for and accepts the next connection, calling ``on_accept`` right after accept()."""


async def accept_at_once(sock: socket.socket, on_accept: OnAccept) -> socket.socket:
    """accept(), then ``on_accept`` with nothing in between (``loop.sock_accept`` would accept
    in a callback, a loop turn before the caller could store the connection)."""
    while True:
        await wait_readable(sock)
        try:
            conn, _ = sock.accept()
        except (BlockingIOError, InterruptedError):
            continue
        on_accept(conn)
        return conn


class _Arrivals:
    """Wakes when more bytes arrive on a socket whose queued bytes were only peeked at."""

    def __init__(self, sock: socket.socket) -> None:
        self._ep = select.epoll(1)
        self._ep.register(sock.fileno(), select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET)
        self._arrived = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._ep.fileno(), self._drain)

    def _drain(self) -> None:
        if self._ep.poll(0):
            self._arrived.set()

    async def wait(self) -> None:
        """Until something arrived since the last wait (or since we started)."""
        await self._arrived.wait()
        self._arrived.clear()

    def close(self) -> None:
        self._loop.remove_reader(self._ep.fileno())
        self._ep.close()


async def peek_handshake(sock: socket.socket, *, max_bytes: int, timeout: float,
                         max_fds: int = 2, max_depth: int = hs_mod.MAX_DEPTH) -> tuple[bytes, list[int]]:
    """Read one handshake like :func:`uffdd.unixsock.receive_handshake`, but leave it queued on
    ``sock`` (see the module docstring). The fds returned are copies this process owns; on error
    they are closed and HandshakeError says what was wrong."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)  # from the start, whatever a predecessor peeked
    except OSError as exc:  # a kernel without it for Unix sockets: read as before, not durable
        log.warning("handshake_not_durable", error=str(exc), hint="SO_PEEK_OFF is needed on Unix sockets")
        return await receive_handshake(sock, max_bytes=max_bytes, timeout=timeout, max_fds=max_fds,
                                       max_depth=max_depth)
    reader = _Reader(sock, max_fds, max_depth)
    try:
        async with asyncio.timeout(timeout):
            await reader.run(max_bytes)
    except TimeoutError:
        close_fds(reader.fds)
        raise HandshakeError(f"no complete handshake within {timeout:g}s (got {len(reader.body)} bytes)") from None
    except BaseException:
        close_fds(reader.fds)
        raise
    finally:
        reader.close()
    return bytes(reader.body), reader.fds


class _Reader:
    """One handshake, peeked while it is small, read for real past :data:`PEEK_LIMIT`."""

    def __init__(self, sock: socket.socket, max_fds: int, max_depth: int) -> None:
        self.sock = sock
        self.max_fds = max_fds
        self.body = bytearray()
        self.fds: list[int] = []
        self.scanner = hs_mod.BodyScanner(max_depth)  # each byte scanned once, however it trickles in
        self.flags: int = socket.MSG_PEEK
        self._mid_message = False
        self.arrivals = _Arrivals(sock)

    async def run(self, max_bytes: int) -> None:
        while not self.scanner.complete:
            try:
                data, anc, flags, _ = self.sock.recvmsg(HANDSHAKE_READ, ancillary_space(self.max_fds), self.flags)
            except (BlockingIOError, InterruptedError):
                await self.arrivals.wait()
                continue
            self._add_fds(parse_ancillary(anc)[0])
            self._mid_message = bool(self.flags) and len(data) == HANDSHAKE_READ and bool(self.fds)
            check_handshake_piece(data, flags, self.body, self.fds, self.max_fds)
            self.body += data
            if len(self.body) > max_bytes:
                raise HandshakeError(f"handshake longer than {max_bytes} bytes")
            self.scanner.feed(data)
            if self.flags and len(self.body) >= PEEK_LIMIT and not self.scanner.complete:
                self._read_for_real()
            await asyncio.sleep(0)  # a long body does not hold the event loop: faults go between reads

    def _add_fds(self, got: list[int]) -> None:
        """Keep the fds a read brought. A peek that goes on inside the message that carried fds
        (the last peek filled its buffer) brings copies of them again: those are closed, not
        counted. Fds that come with a new message always count."""
        if got and self._mid_message and len(self.fds) >= len(got) and all(
                same_file(a, b) for a, b in zip(got, self.fds[-len(got):], strict=True)):
            close_fds(got)
            return
        self.fds.extend(got)

    def _read_for_real(self) -> None:
        """Consume what was peeked (its fds again: dropped, the copies are held) and read on."""
        log.warning("handshake_not_durable", bytes=len(self.body),
                    hint=f"a handshake over {PEEK_LIMIT} bytes is read, not peeked")
        self.sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, -1)
        left = len(self.body)
        while left:
            data, anc, _, _ = self.sock.recvmsg(min(left, HANDSHAKE_READ), ancillary_space(self.max_fds))
            close_fds(parse_ancillary(anc)[0])
            if not data:
                raise HandshakeError("connection closed before the handshake was complete")
            left -= len(data)
        self.flags = 0

    def close(self) -> None:
        self.arrivals.close()
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, -1)
