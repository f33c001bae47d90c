"""The Unix-socket listener: accept VMMs, read their handshake, run one session each.

Every connection is its own task: a malformed handshake is answered with one JSON error
line and closed, and nothing else notices.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import itertools
import json
import os
import socket
import stat
from collections.abc import Iterable
from pathlib import Path

import structlog

from uffdd import handshake as hs_mod
from uffdd.config import Config
from uffdd.errors import HandshakeError, SourceError, UffddError
from uffdd.kernel import KernelError
from uffdd.session import Session, SessionStats
from uffdd.sources import PageSource, source_class

log = structlog.get_logger("uffdd.listener")

MAX_FDS = 2
_FD_SIZE = array.array("i").itemsize


async def _wait_readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_reader(sock.fileno(), ready)
    try:
        await fut
    finally:
        loop.remove_reader(sock.fileno())


def _close_fds(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


async def receive_handshake(
    sock: socket.socket, *, max_bytes: int, timeout: float
) -> tuple[bytes, list[int]]:
    """Read one handshake: a JSON body that may span several reads, plus SCM_RIGHTS fds.

    On error every received fd is closed and HandshakeError says what was wrong.
    """
    loop = asyncio.get_running_loop()
    body = bytearray()
    fds: list[int] = []
    try:
        async with asyncio.timeout(timeout):
            while not hs_mod.body_complete(bytes(body)):
                await _wait_readable(loop, sock)
                try:
                    data, anc, flags, _ = sock.recvmsg(65536, socket.CMSG_SPACE(MAX_FDS * _FD_SIZE))
                except (BlockingIOError, InterruptedError):
                    continue
                for level, typ, cdata in anc:
                    if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                        got = array.array("i")
                        got.frombytes(cdata[: len(cdata) - len(cdata) % _FD_SIZE])
                        fds.extend(got)
                if flags & socket.MSG_CTRUNC:
                    raise HandshakeError(f"too many file descriptors: send [uffd, memfd] (at most {MAX_FDS})")
                if not data:
                    raise HandshakeError(
                        "connection closed before the handshake was complete"
                        if body else "connection closed without a handshake")
                body += data
                if len(body) > max_bytes:
                    raise HandshakeError(f"handshake longer than {max_bytes} bytes")
    except TimeoutError:
        _close_fds(fds)
        raise HandshakeError(
            f"no complete handshake within {timeout:g}s (got {len(body)} bytes)") from None
    except BaseException:
        _close_fds(fds)
        raise
    return bytes(body), fds


class Listener:
    """Accepts VMMs on the configured Unix socket and runs their sessions."""

    def __init__(self, config: Config, *, sock: socket.socket | None = None) -> None:
        self.config = config
        self._sock = sock
        self._owns_path = sock is None
        self.sessions: dict[str, Session] = {}
        self._conn_tasks: set[asyncio.Task[None]] = set()
        self._accept_task: asyncio.Task[None] | None = None
        self._ids = itertools.count(1)
        self.sessions_total = 0
        self.ended_totals = SessionStats()
        self.handshakes_refused = 0

    @property
    def path(self) -> str:
        return self.config.listen

    def bind(self) -> socket.socket:
        """Bind the listening socket (replacing a stale socket file, never another file)."""
        if self._sock is not None:
            return self._sock
        path = Path(self.config.listen)
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise UffddError(f"listen: {path} exists and is not a socket; refusing to replace it")
            path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.bind(str(path))
        sock.listen(128)
        self._sock = sock
        return sock

    async def start(self) -> None:
        sock = self.bind()
        sock.setblocking(False)
        self._accept_task = asyncio.get_running_loop().create_task(self._accept_loop(sock))

    async def _accept_loop(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(sock)
            conn.setblocking(False)
            task = loop.create_task(self._serve_connection(conn))
            self._conn_tasks.add(task)
            task.add_done_callback(self._conn_tasks.discard)

    async def stop_accepting(self) -> None:
        if self._accept_task is not None:
            self._accept_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accept_task
            self._accept_task = None
        if self._sock is not None:
            self._sock.close()
            if self._owns_path:
                with contextlib.suppress(OSError):
                    os.unlink(self.config.listen)

    async def close(self) -> None:
        """Stop accepting and end every session now (their VMMs lose their handler)."""
        await self.stop_accepting()
        for t in list(self._conn_tasks):
            t.cancel()
        if self._conn_tasks:
            await asyncio.gather(*self._conn_tasks, return_exceptions=True)

    async def wait_sessions(self) -> None:
        """Wait until every connection (and so every session) has ended."""
        while self._conn_tasks:
            await asyncio.gather(*list(self._conn_tasks), return_exceptions=True)

    async def _open_source(self, hs: hs_mod.Handshake) -> PageSource:
        spec = self.config.sources.get(hs.source)
        if spec is None:
            known = ", ".join(sorted(self.config.sources)) or "none configured"
            raise HandshakeError(f"source: {hs.source!r} is not a configured source (known: {known})")
        cls = source_class(spec.kind)
        try:
            return await cls.open(spec, vm_id=hs.vm_id)
        except SourceError as exc:
            raise HandshakeError(f"source {hs.source!r}: {exc}") from None

    async def _serve_connection(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        session_id = f"s{next(self._ids)}"
        clog = log.bind(session=session_id)
        session: Session | None = None
        fds: list[int] = []
        try:
            try:
                body, fds = await receive_handshake(
                    conn, max_bytes=self.config.handshake.max_bytes, timeout=self.config.handshake.timeout)
                hs = hs_mod.parse(body)
                if len(fds) not in (1, 2):
                    raise HandshakeError(
                        f"expected the file descriptors [uffd, memfd] (shared memory) or [uffd] "
                        f"(anonymous memory) with the handshake, got {len(fds)}")
                source = await self._open_source(hs)
                try:
                    session = Session.create(
                        session_id=session_id, handshake=hs, uffd_fd=fds[0],
                        memfd=fds[1] if len(fds) == 2 else None, source=source, config=self.config.session)
                except BaseException:
                    await source.aclose()
                    raise
                fds = []  # the session owns them now
            except (HandshakeError, KernelError) as exc:
                self.handshakes_refused += 1
                clog.warning("handshake_refused", error=str(exc))
                with contextlib.suppress(OSError):
                    await loop.sock_sendall(conn, (json.dumps({"error": str(exc)}) + "\n").encode())
                return
            self.sessions[session_id] = session
            self.sessions_total += 1

            def completed(s: Session) -> None:
                line = json.dumps({"event": "complete", "session": s.id, "pages": s.stats.pages_total,
                                   "bytes": s.stats.bytes_filled}) + "\n"
                with contextlib.suppress(OSError):
                    conn.send(line.encode())  # one short line: fits the socket buffer

            session.on_complete = completed
            # "ready" goes out before anything else can be sent; faults queue meanwhile.
            with contextlib.suppress(OSError):
                await loop.sock_sendall(conn, (json.dumps(
                    {"status": "ready", "session": session_id, "pages": session.stats.pages_total}) + "\n").encode())
            session.start()
            await self._until_eof_or_done(conn, session)
        finally:
            _close_fds(fds)
            if session is not None:
                await asyncio.shield(session.close())
                if self.sessions.pop(session_id, None) is not None:
                    self.ended_totals.add(session.stats)
            conn.close()

    async def _until_eof_or_done(self, conn: socket.socket, session: Session) -> None:
        loop = asyncio.get_running_loop()
        eof = loop.create_task(self._read_until_eof(conn))
        done = loop.create_task(session.done.wait())
        try:
            await asyncio.wait({eof, done}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (eof, done):
                t.cancel()

    @staticmethod
    async def _read_until_eof(conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                data = await loop.sock_recv(conn, 4096)
            except (ConnectionResetError, BrokenPipeError):
                return
            if not data:
                return
