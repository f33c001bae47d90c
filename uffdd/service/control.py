"""The control socket: a Unix stream socket that answers one request line with one JSON line.

Requests: ``status`` (the daemon and its live sessions) and ``ping``. It is read-only on
purpose: anything that changes the daemon goes through signals and the service manager.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import structlog

from uffdd import __version__
from uffdd.unixsock import bind_unix

log = structlog.get_logger("uffdd.control")

MAX_REQUEST = 256
REQUEST_TIMEOUT_S = 2.0


class ControlServer:
    """Serves ``status`` from ``snapshot()``, a callable that describes the daemon as a dict."""

    def __init__(self, path: str, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.path = path
        self.snapshot = snapshot
        self._server: asyncio.AbstractServer | None = None

    async def start(self, sock: socket.socket | None = None) -> None:
        """Serve on ``sock`` (bound at our path by the caller), else bind the path (a stale socket
        file left by a predecessor is replaced, never a live one nor another kind of file)."""
        if sock is None:
            sock = bind_unix(self.path, backlog=16, key="control.listen")
        os.chmod(self.path, 0o660)
        self._server = await asyncio.start_unix_server(self._handle, sock=sock)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                line = await reader.readline()
            request = line[:MAX_REQUEST].decode(errors="replace").strip()
            if request == "status":
                answer: dict[str, Any] = self.snapshot()
            elif request == "ping":
                answer = {"ok": True, "pid": os.getpid(), "version": __version__}
            else:
                answer = {"error": f"unknown request {request!r}; known: status, ping"}
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        except (TimeoutError, OSError, ValueError) as exc:
            log.debug("control_request_failed", error=str(exc))
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


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
