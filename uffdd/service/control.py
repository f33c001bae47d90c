"""The control socket: a Unix stream socket that answers one request line with one JSON line.

Requests: ``status`` (the daemon and its live sessions) and ``ping``. It is read-only on
purpose: anything that changes the daemon goes through signals and the service manager.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import structlog

from uffdd import __version__
from uffdd.unixsock import UnixServer, accept_connection, bind_unix

log = structlog.get_logger("uffdd.control")

MAX_REQUEST = 256
REQUEST_TIMEOUT_S = 2.0


class ControlServer:
    """Serves ``status`` from ``snapshot()``, a callable that describes the daemon as a dict.

    It keeps one descriptor in reserve: when the process is out of fds (a flood of connections
    on the VMM socket), the reserve is given up to accept one status request, so that `uffdd
    status` can still say what is wrong, and taken back when the answer is sent.
    """

    def __init__(self, path: str, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.path = path
        self.snapshot = snapshot
        self._server = UnixServer(self._handle, name="control", accept=self._accept)
        self._sock: socket.socket | None = None
        self._reserve = -1

    async def start(self, sock: socket.socket | None = None) -> None:
        """Serve on ``sock`` (bound at our path by the caller), else bind the path (a stale socket
        file left by a predecessor is replaced, never a live one nor another kind of file)."""
        if sock is None:
            sock = bind_unix(self.path, backlog=16, key="control.listen")
        os.chmod(self.path, 0o660)
        self._sock = sock
        self._refill()
        await self._server.start(sock)

    async def close(self) -> None:
        await self._server.close()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        if self._reserve >= 0:
            os.close(self._reserve)
            self._reserve = -1

    def _refill(self) -> None:
        if self._reserve < 0:
            with contextlib.suppress(OSError):
                self._reserve = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)

    async def _accept(self, sock: socket.socket) -> socket.socket:
        try:
            return await accept_connection(sock)
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE) or self._reserve < 0:
                raise
        os.close(self._reserve)  # the one fd this answer needs
        self._reserve = -1
        try:
            return await accept_connection(sock)
        except BaseException:
            self._refill()
            raise

    async def _handle(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            data = b""
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                while b"\n" not in data and len(data) < MAX_REQUEST:
                    chunk = await loop.sock_recv(conn, MAX_REQUEST)
                    if not chunk:
                        break
                    data += chunk
            request = data.split(b"\n", 1)[0][:MAX_REQUEST].decode(errors="replace").strip()
            await loop.sock_sendall(conn, json.dumps(self._answer(request)).encode() + b"\n")
        except (TimeoutError, OSError, ValueError) as exc:
            log.debug("control_request_failed", error=str(exc))
        finally:
            conn.close()
            self._refill()  # before anything else may take the fd just freed

    def _answer(self, request: str) -> dict[str, Any]:
        if request == "status":
            return self.snapshot()
        if request == "ping":
            return {"ok": True, "pid": os.getpid(), "version": __version__}
        return {"error": f"unknown request {request!r}; known: status, ping"}


def query(path: str, request: str = "status", timeout: float = 5.0) -> dict[str, Any]:
    """Client side (blocking): send ``request``, return the decoded answer; OSError if unreachable."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(request.encode() + b"\n")
        data = bytearray()
        deadline = time.monotonic() + timeout
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
            if time.monotonic() > deadline:
                raise TimeoutError(f"{path}: no complete answer within {timeout:g}s")
    if not data:
        raise ConnectionError(f"{path}: the daemon closed the connection without answering")
    answer: dict[str, Any] = json.loads(data)
    return answer
