"""The source side of a migration: serve memory images to destination daemons over TCP.

One :class:`PeerServer` per ``uffdd serve``: it listens, holds the images, and keeps one
:class:`~.connection.ServerConnection` per client, run in C (:mod:`.responder`) once
authenticated where it can be, in Python otherwise; :class:`~.stats.ServerStats` is what it counts.
"""

from __future__ import annotations

import asyncio
import ssl

from uffdd.peer import protocol as p
from uffdd.peer.config import ServeLimits
from uffdd.peer.image import Image, ImageError
from uffdd.peer.server.admission import Admission
from uffdd.peer.server.connection import ServerConnection
from uffdd.peer.server.stats import ServerStats


class PeerServer:
    """Serves the images in ``images`` (name -> Image) on one TCP address."""

    def __init__(self, images: dict[str, Image] | None = None, limits: ServeLimits | None = None, *,
                 secret: bytes | None = None, compression: bool = True,
                 ssl_context: ssl.SSLContext | None = None, native: bool = True) -> None:
        """``limits`` as configured (``limits:`` of the serve config); beside them what was
        resolved from the config: the secret's bytes and the TLS context."""
        self.images: dict[str, Image] = dict(images or {})
        self.limits = limits or ServeLimits()
        self.secret = secret
        self.compression = compression
        self.ssl_context = ssl_context
        self.native = native
        """Connections without TLS (or lz4) run in C (:mod:`.responder`) where it is built."""
        self.stats = ServerStats()
        self.admission = Admission(self.limits)
        """Unauthenticated connections apart from authenticated ones; refusals summed up in the log."""
        self.connections: set[ServerConnection] = set()
        self.last_urgent = 0.0
        """perf_counter() of the last urgent READ: bulk work steps aside for a moment after one."""
        self._server: asyncio.AbstractServer | None = None
        self.address: tuple[str, int] = ("", 0)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: ServerConnection(self), host, port, ssl=self.ssl_context, reuse_address=True,
            ssl_handshake_timeout=self.limits.handshake_timeout if self.ssl_context else None)
        sockname = self._server.sockets[0].getsockname()
        self.address = (str(sockname[0]), int(sockname[1]))
        return self.address

    def add_image(self, image: Image) -> None:
        if image.name in self.images:
            raise ImageError(f"an image named {image.name!r} is already served")
        self.images[image.name] = image

    def remove_image(self, name: str) -> None:
        """Withdraw an image: its clients are told and dropped, its fd is closed."""
        image = self.images.pop(name, None)
        if image is None:
            return
        for conn in list(self.connections):
            if conn.image is image:
                conn.fail(p.ProtocolError(p.ErrorCode.NO_SUCH_IMAGE, f"image {name!r} was withdrawn"))
        image.close()

    def collect(self) -> ServerStats:
        """Fold the per-connection block counters into :attr:`stats` (scrape time, not per block)."""
        for conn in self.connections:
            conn.flush_counts()
        return self.stats

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        self.admission.close()
        for conn in list(self.connections):
            conn.flush_counts()
            conn.shutdown()
        for _ in range(100):
            if not self.connections:
                break
            await asyncio.sleep(0.01)
        for conn in list(self.connections):
            conn.abort()
        for image in self.images.values():
            image.close()
        self.images.clear()

    def drop_connections(self) -> None:
        """Abort every client connection at once (tests: a server-side view of a broken link)."""
        for conn in list(self.connections):
            conn.abort()


__all__ = ["PeerServer", "ServerConnection", "ServerStats"]
