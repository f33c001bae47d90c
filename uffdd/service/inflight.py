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

What stays: the moment between accept() returning and the FDSTORE message being sent (one
system call later, with nothing awaited in between).
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket

import structlog

from uffdd import handshake as hs_mod
from uffdd.errors import HandshakeError
from uffdd.unixsock import ancillary_space, close_fds, parse_ancillary, receive_handshake, wait_readable

log = structlog.get_logger("uffdd.inflight")

SO_PEEK_OFF = getattr(socket, "SO_PEEK_OFF", 42)
"""Linux's value; Python's socket module does not name it."""
PEEK_CHUNK = 65536


async def accept_at_once(sock: socket.socket) -> socket.socket:
    """accept() in the same step that returns the connection, so that the caller stores it
    before anything else runs (``loop.sock_accept`` accepts in a callback, a loop turn earlier)."""
    while True:
        await wait_readable(sock)
        try:
            conn, _ = sock.accept()
        except (BlockingIOError, InterruptedError):
            continue
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
                         max_fds: int = 2) -> tuple[bytes, list[int]]:
    """Read one handshake like :func:`uffdd.unixsock.receive_handshake`, but leave it queued on
    ``sock`` (see the module docstring). The fds returned are copies this process owns; on error
    they are closed and HandshakeError says what was wrong."""
    body = bytearray()
    fds: list[int] = []
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)  # from the start, whatever a predecessor peeked
    except OSError as exc:  # a kernel without it for Unix sockets: read as before, not durable
        log.warning("handshake_not_durable", error=str(exc), hint="SO_PEEK_OFF is needed on Unix sockets")
        return await receive_handshake(sock, max_bytes=max_bytes, timeout=timeout, max_fds=max_fds)
    arrivals = _Arrivals(sock)
    try:
        async with asyncio.timeout(timeout):
            while not hs_mod.body_complete(bytes(body)):
                try:
                    data, anc, flags, _ = sock.recvmsg(PEEK_CHUNK, ancillary_space(max_fds), socket.MSG_PEEK)
                except (BlockingIOError, InterruptedError):
                    await arrivals.wait()
                    continue
                fds.extend(parse_ancillary(anc)[0])
                _check_piece(data, flags, body, max_fds)
                body += data
                if len(body) > max_bytes:
                    raise HandshakeError(f"handshake longer than {max_bytes} bytes")
    except TimeoutError:
        close_fds(fds)
        raise HandshakeError(f"no complete handshake within {timeout:g}s (got {len(body)} bytes)") from None
    except BaseException:
        close_fds(fds)
        raise
    finally:
        arrivals.close()
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, -1)
    return bytes(body), fds


def _check_piece(data: bytes, flags: int, body: bytearray, max_fds: int) -> None:
    if flags & socket.MSG_CTRUNC:
        raise HandshakeError(f"too many file descriptors: send [uffd, memfd] (at most {max_fds})")
    if not data:
        raise HandshakeError("connection closed before the handshake was complete"
                             if body else "connection closed without a handshake")
