"""The source's connections in C: once a plain (non-TLS) connection is authenticated, its socket
goes to a :class:`uffdd.peer._native.Responder`, whose ``serve()`` runs the rest of the
connection on a thread of its own without the GIL (uffdd/peer/_responder.c says how it answers
urgent and bulk READs). Python keeps the handshake before and the goodbye after: when ``serve()``
returns, the client is told why (an ERROR with the protocol's code, when it broke a rule) and
the connection closed. An urgent connection's thread runs at the process's priority, a bulk
connection's lower, so demand faults come first on this host's CPU as on the wire.

The same checks, codes and limits as the Python server (:mod:`.connection`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from typing import Any, Protocol

import structlog

from uffdd.peer import protocol as p
from uffdd.peer.config import ServeLimits
from uffdd.peer.image import Image
from uffdd.peer.native import module as _native
from uffdd.peer.server.stats import ServerStats
from uffdd.pools import background_priority


class Owner(Protocol):
    """What a responder reports to: its connection (:class:`.connection.ServerConnection`)."""

    limits: ServeLimits

    @property
    def server(self) -> Host: ...
    def fail(self, exc: p.ProtocolError) -> None: ...
    def native_closed(self) -> None: ...


class Host(Protocol):
    stats: ServerStats
    last_urgent: float

log = structlog.get_logger("uffdd.serve")

CLOSE_GRACE_S = 1.0
"""How long a failed connection's last bytes (its ERROR) may take to be written."""


def responder_available() -> bool:
    return _native is not None


class NativeResponder:
    """Runs one connection's READs in C (see the module docstring); reports to ``conn``."""

    def __init__(self, conn: Owner, fd: int, image_fd: int, image: Image, sealer: p.Sealer | None,
                 opener: p.Opener | None, *, bulk: bool = False) -> None:
        """Takes ``fd`` (the socket) and ``image_fd`` (a duplicate of the image's)."""
        assert _native is not None
        self.conn = conn
        self.server = conn.server
        self.loop = asyncio.get_running_loop()
        self.fd = fd
        self.bulk = bulk
        self.r: Any = _native.Responder(
            fd, image_fd, image.size, image.extents, sealer.key if sealer else None,
            opener.key if opener else None, sealer.seq if sealer else 0, opener.seq if opener else 0,
            conn.limits.max_blocks, conn.limits.max_inflight, bulk)
        self.closed = False
        self._closing = False
        self._writing = False
        self._seen = {"reads": 0, "read_errors": 0, "blocks_raw": 0, "blocks_zero": 0, "payload_bytes": 0}
        self._after: p.ProtocolError | bool | None = None
        """What to do once the thread returns: fail with this error, or (True) close."""
        self._thread: threading.Thread | None = threading.Thread(
            target=self._serve, name=f"uffdd-serve-{'bulk' if bulk else 'urgent'}", daemon=True)
        self._thread.start()
        self._timer = self.loop.call_later(conn.limits.idle_timeout / 4, self._idle_check)

    # -- the thread ----------------------------------------------------------------------------
    def _serve(self) -> None:
        if self.bulk:
            background_priority()
        result = self.r.serve()
        with contextlib.suppress(RuntimeError):  # the loop is gone (process exit)
            self.loop.call_soon_threadsafe(self._served, result)

    def _served(self, result: tuple[Any, ...] | None) -> None:
        """The thread returned: do what was asked meanwhile, or what it returned says."""
        self._thread = None
        after, self._after = self._after, None
        if isinstance(after, p.ProtocolError):
            self.fail(after)
        elif after is not None or result is None:
            self.close()
        elif result[0] == "error":
            log.warning("peer_reported_error", code=result[1], error=result[2].decode("utf-8", "replace"))
            self.close()
        elif result[2]:
            code = p.ErrorCode(result[2])
            if code is p.ErrorCode.TAMPERED:
                self.server.stats.tampered += 1
            self.conn.fail(p.ProtocolError(code, str(result[1])))
        else:
            self.close()

    def _stop_thread(self, after: p.ProtocolError | bool) -> bool:
        """If the thread runs, ask it to stop and do ``after`` when it has; True if it runs."""
        if self._thread is None:
            return False
        if self._after is None or isinstance(after, p.ProtocolError):
            self._after = after
        self.r.stop()
        return True

    def _idle_check(self) -> None:
        if self.closed:
            return
        idle = (time.monotonic_ns() - self.r.last_rx_ns) / 1e9
        limit = self.conn.limits.idle_timeout
        if idle > limit:
            self.conn.fail(p.ProtocolError(p.ErrorCode.TIMEOUT, f"nothing received for {idle:.0f}s"))
            return
        self._timer = self.loop.call_later(limit / 4, self._idle_check)

    # -- the end -------------------------------------------------------------------------------
    def fail(self, exc: p.ProtocolError) -> None:
        """Tell the client what went wrong, after what is queued for it; close once that is
        written, or after CLOSE_GRACE_S for a client that does not read."""
        if self.closed or self._closing or self._stop_thread(exc):
            return
        self._closing = True
        try:
            message = exc.message.encode()[: p.MAX_ERROR_MESSAGE].decode("utf-8", "ignore")
            self.r.send_error(0, exc.code, message)
            done = self.r.flush()
        except OSError:
            done = True
        if done:
            self.close()
            return
        self._writing = True
        self.loop.add_writer(self.fd, self._on_writable)
        self.loop.call_later(CLOSE_GRACE_S, self.close)

    def _on_writable(self) -> None:
        try:
            done = self.r.flush()
        except OSError:
            done = True
        if done:
            self.close()

    def close(self) -> None:
        if self.closed or self._stop_thread(True):
            return
        self.closed = True
        self._timer.cancel()
        if self._writing:
            self.loop.remove_writer(self.fd)
        self.fold_stats()
        self.r.close()
        self.conn.native_closed()

    def fold_stats(self) -> None:
        """Add what the responder counted since the last call to the server's counters."""
        now = self.r.stats
        s = self.server.stats
        d = {k: now[k] - v for k, v in self._seen.items()}
        self._seen = {k: now[k] for k in self._seen}
        s.reads += d["reads"]
        s.read_errors += d["read_errors"]
        s.blocks_raw += d["blocks_raw"]
        s.blocks_zero += d["blocks_zero"]
        s.payload_bytes += d["payload_bytes"]


def urgent_seen() -> float:
    """perf_counter() of the latest urgent READ a C responder took in (0.0: none, or not built)."""
    if _native is None:
        return 0.0
    ns: int = _native.urgent_last_ns()
    return (ns - time.monotonic_ns()) / 1e9 + time.perf_counter() if ns else 0.0


def note_urgent() -> None:
    """An urgent READ in Python: C bulk responders step aside for a moment too."""
    if _native is not None:
        _native.urgent_mark()


def hand_over(transport: asyncio.Transport) -> int | None:
    """A duplicate of the connection's socket, non-blocking, with the transport let go of; None
    when it cannot be handed over (bytes still waiting to be written)."""
    sock = transport.get_extra_info("socket")
    if sock is None or transport.get_write_buffer_size():
        return None
    fd = os.dup(sock.fileno())
    os.set_blocking(fd, False)
    transport.pause_reading()
    transport.abort()
    return fd


__all__ = ["NativeResponder", "hand_over", "note_urgent", "responder_available", "urgent_seen"]
