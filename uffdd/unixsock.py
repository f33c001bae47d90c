"""Unix sockets as every part of uffdd uses them.

- binding a stream socket (a stale socket file is replaced, never a live one: uffdd.sockclaim);
- ancillary data: the fds (SCM_RIGHTS) and the sender's pid (SCM_CREDENTIALS) a message carried;
- the VMM handshake: a JSON body that may span several reads, with its fds;
- :class:`UnixServer`: each accepted connection in its own task of one ``asyncio.TaskGroup``.

Used by the daemon's listener, ``uffdd serve``'s VMM handover, the control socket and the worker
supervisor's notify sockets.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import json
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import structlog

from uffdd import handshake as hs_mod
from uffdd.errors import HandshakeError
from uffdd.sockclaim import prepare_unix

log = structlog.get_logger("uffdd.unixsock")

FD_SIZE = array.array("i").itemsize
UCRED = struct.Struct("iII")  # pid, uid, gid
HANDSHAKE_READ = 4096
"""Bytes of a handshake read (and scanned, about 0.1 ms) at once: the event loop gets a turn
between reads, so a long body delays a fault by one such piece at most."""
ACCEPT_RETRY_S = 0.1
"""After a failed accept() (EMFILE, ENOBUFS), the next try comes this much later."""
ACCEPT_LOG_EVERY_S = 10.0
"""While accept() keeps failing, one log line per this many seconds (with the count meanwhile)."""
OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
"""accept() failures that leave the server unable to take any connection until they pass."""


# --- descriptors and ancillary data ------------------------------------------------------------

def ancillary_space(max_fds: int, *, credentials: bool = False) -> int:
    """The ancillary buffer size for up to ``max_fds`` fds (and the sender's credentials)."""
    return socket.CMSG_SPACE(max_fds * FD_SIZE) + (socket.CMSG_SPACE(UCRED.size) if credentials else 0)


def parse_ancillary(anc: Iterable[tuple[int, int, bytes]]) -> tuple[list[int], int]:
    """The fds received (now open in this process: the caller owns them) and the sender's pid
    (0 when no credentials came along)."""
    fds: list[int] = []
    pid = 0
    for level, typ, cdata in anc:
        if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
            got = array.array("i")
            got.frombytes(cdata[: len(cdata) - len(cdata) % FD_SIZE])
            fds.extend(got)
        elif level == socket.SOL_SOCKET and typ == socket.SCM_CREDENTIALS:
            pid = UCRED.unpack(cdata[: UCRED.size])[0]
    return fds, pid


def same_file(a: int, b: int) -> bool:
    """Two descriptors of one open file (or at least of one inode: enough next to equal names)."""
    sa, sb = os.fstat(a), os.fstat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def close_fds(fds: Iterable[int]) -> None:
    """Close each fd, ignoring those already closed."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


# --- binding and waiting -----------------------------------------------------------------------

def bind_unix(path: str, *, backlog: int, key: str) -> socket.socket:
    """Bind and listen on ``path``, replacing a stale socket file but never one a live process
    answers on, nor another kind of file (``key`` names the config setting in the error)."""
    return prepare_unix(path, backlog=backlog, key=key).commit()


async def wait_readable(sock: socket.socket) -> None:
    """Until ``sock`` has something to read (or a connection to accept)."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_reader(sock.fileno(), ready)
    try:
        await fut
    finally:
        loop.remove_reader(sock.fileno())


# --- the VMM handshake -------------------------------------------------------------------------

async def receive_handshake(sock: socket.socket, *, max_bytes: int, timeout: float,
                            max_fds: int = 2, max_depth: int = hs_mod.MAX_DEPTH) -> tuple[bytes, list[int]]:
    """Read one handshake: a JSON body that may span several reads, plus SCM_RIGHTS fds.

    Each read is scanned once (:class:`uffdd.handshake.BodyScanner`), so a body that trickles in
    costs time linear in its length. Fds are counted across all reads: once more than
    ``max_fds`` have come, all are closed at once. On error every received fd is closed and
    HandshakeError says what was wrong.
    """
    body = bytearray()
    fds: list[int] = []
    scanner = hs_mod.BodyScanner(max_depth)
    try:
        async with asyncio.timeout(timeout):
            while not scanner.complete:
                data = await _read_part(sock, body, fds, max_fds)
                body += data
                if len(body) > max_bytes:
                    raise HandshakeError(f"handshake longer than {max_bytes} bytes")
                scanner.feed(data)
    except TimeoutError:
        close_fds(fds)
        raise HandshakeError(
            f"no complete handshake within {timeout:g}s (got {len(body)} bytes)") from None
    except BaseException:
        close_fds(fds)
        raise
    return bytes(body), fds


async def _read_part(sock: socket.socket, body: bytearray, fds: list[int], max_fds: int) -> bytes:
    """The next piece of a handshake after ``body``; its fds go into ``fds`` (see
    :func:`check_handshake_piece`)."""
    while True:
        await wait_readable(sock)
        try:
            data, anc, flags, _ = sock.recvmsg(HANDSHAKE_READ, ancillary_space(max_fds))
        except (BlockingIOError, InterruptedError):
            continue
        fds.extend(parse_ancillary(anc)[0])
        check_handshake_piece(data, flags, body, fds, max_fds)
        return data


def check_handshake_piece(data: bytes, flags: int, body: bytearray, fds: list[int], max_fds: int) -> None:
    """Refuse one read of a handshake: more than ``max_fds`` fds so far (counted over all the
    reads; the caller closes them) or the end of the stream before the body is whole."""
    if flags & socket.MSG_CTRUNC or len(fds) > max_fds:
        raise HandshakeError(
            f"too many file descriptors: more than {max_fds} came with the handshake "
            f"(send [uffd, memfd] or [uffd]); all of them were closed")
    if not data:
        raise HandshakeError("connection closed before the handshake was complete"
                             if body else "connection closed without a handshake")


async def send_line(conn: socket.socket, doc: dict[str, Any]) -> None:
    """Send ``doc`` as one JSON line; a peer that is gone is not an error here."""
    with contextlib.suppress(OSError):
        await asyncio.get_running_loop().sock_sendall(conn, (json.dumps(doc) + "\n").encode())


async def until_eof(conn: socket.socket) -> None:
    """Read (and drop) what the peer sends until it hangs up."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            data = await loop.sock_recv(conn, 4096)
        except OSError:
            return
        if not data:
            return


# --- a server: one task per connection, all in one TaskGroup -------------------------------------

Accept = Callable[[socket.socket], Awaitable[socket.socket]]


async def accept_connection(sock: socket.socket) -> socket.socket:
    """The default accept step: the next connection, non-blocking."""
    conn, _ = await asyncio.get_running_loop().sock_accept(sock)
    return conn


class UnixServer:
    """Runs ``handler(conn)`` for every connection accepted on a listening socket, each in its own
    task of one ``asyncio.TaskGroup``.

    A connection's unexpected error is logged and ends that connection alone: no task of the
    group ever raises, so none takes the others down. The group lives from :meth:`open` (or
    :meth:`start`) to :meth:`close`, which cancels every task and waits for them; tasks that must
    run before accepting (resumed sessions) go in with :meth:`spawn`.
    """

    def __init__(self, handler: Callable[[socket.socket], Awaitable[None]], *, name: str,
                 accept: Accept = accept_connection, on_count: Callable[[int], None] | None = None) -> None:
        self.handler = handler
        self.name = name
        self._accept = accept
        self.on_count = on_count
        """Called with the new number of connections whenever it changes."""
        self.connections = 0
        """Connections (spawned tasks) running now."""
        self._idle = asyncio.Event()
        self._idle.set()
        self._group: asyncio.TaskGroup | None = None
        self._runner: asyncio.Task[None] | None = None
        self._accepting: asyncio.Task[None] | None = None
        self.accept_failures = 0
        """accept() calls that failed, ever."""
        self.accept_error: str | None = None
        """Why the last accept() failed, while that was for want of fds or buffers (the server
        takes no connection then); None once one succeeds."""
        self._failures_unlogged = 0
        self._logged_at = -ACCEPT_LOG_EVERY_S

    async def open(self) -> None:
        """Open the task group (idempotent)."""
        if self._runner is not None:
            return
        loop = asyncio.get_running_loop()
        opened: asyncio.Future[asyncio.TaskGroup] = loop.create_future()
        self._runner = loop.create_task(self._hold(opened), name=f"uffdd-{self.name}")
        self._group = await opened

    async def _hold(self, opened: asyncio.Future[asyncio.TaskGroup]) -> None:
        async with asyncio.TaskGroup() as group:
            opened.set_result(group)
            await asyncio.get_running_loop().create_future()  # until close() cancels us

    async def start(self, sock: socket.socket) -> None:
        """Accept on ``sock`` (bound and listening) until :meth:`stop_accepting` or :meth:`close`."""
        await self.open()
        assert self._group is not None
        sock.setblocking(False)
        self._accepting = self._group.create_task(self._accept_loop(sock))

    async def _accept_loop(self, sock: socket.socket) -> None:
        while True:
            try:
                conn = await self._accept(sock)
            except OSError as exc:  # out of fds or buffers: keep the socket, the backlog waits
                self._accept_failed(exc)
                await asyncio.sleep(ACCEPT_RETRY_S)
                continue
            if self.accept_error is not None:
                log.warning("accept_recovered", server=self.name, failures=self.accept_failures)
                self.accept_error = None
            conn.setblocking(False)
            self.spawn(self.handler, conn)

    def _accept_failed(self, exc: OSError) -> None:
        """Count the failure; log it at most once per ACCEPT_LOG_EVERY_S (not once per retry)."""
        self.accept_failures += 1
        self.accept_error = str(exc) if exc.errno in OUT_OF_RESOURCES else None
        now = time.monotonic()
        if now - self._logged_at < ACCEPT_LOG_EVERY_S:
            self._failures_unlogged += 1
            return
        log.error("accept_failed", server=self.name, error=str(exc), failures=self.accept_failures,
                  not_logged_since_last_line=self._failures_unlogged,
                  hint=f"retrying every {ACCEPT_RETRY_S:g}s; logged at most every {ACCEPT_LOG_EVERY_S:g}s")
        self._logged_at = now
        self._failures_unlogged = 0

    def spawn(self, fn: Callable[..., Awaitable[None]], *args: Any) -> asyncio.Task[None]:
        """Run ``fn(*args)`` as one more connection of the group (counted from now on: a worker
        publishes its load before it accepts again). The group keeps the task."""
        assert self._group is not None, "open() the server first"
        task = self._group.create_task(self._guarded(fn, args))
        self._count(+1)
        return task

    async def _guarded(self, fn: Callable[..., Awaitable[None]], args: tuple[Any, ...]) -> None:
        try:
            await fn(*args)
        except Exception:
            log.exception("connection_failed", server=self.name, handler=getattr(fn, "__name__", repr(fn)))
        finally:
            self._count(-1)

    def _count(self, delta: int) -> None:
        self.connections += delta
        if self.connections:
            self._idle.clear()
        else:
            self._idle.set()
        if self.on_count is not None:
            self.on_count(self.connections)

    async def stop_accepting(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
            await asyncio.wait({self._accepting})
            self._accepting = None

    async def wait_idle(self) -> None:
        """Until no connection is left (new ones may still be accepted meanwhile)."""
        await self._idle.wait()

    async def close(self) -> None:
        """Stop accepting, cancel every connection and wait until they have all ended."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        runner.cancel()
        await asyncio.wait({runner})
        self._group = self._accepting = None
        if not runner.cancelled() and runner.exception() is not None:  # a bug: say so, loudly
            log.error("server_tasks_failed", server=self.name, error=repr(runner.exception()))
