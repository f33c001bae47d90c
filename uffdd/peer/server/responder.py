"""The source's connections in C: once a plain (non-TLS) connection is authenticated, its socket
goes to a :class:`uffdd.peer._native.Responder`.

- Urgent connections stay on the event loop: the responder answers each READ whose bytes are in
  the page cache without the interpreter (preadv2, a crc32c per block, one tagged DATA frame,
  one writev) and answers PINGs. What it cannot answer at once comes here: a read that must
  wait for the disk (done in a thread, handed back with ``send_data``, which the responder
  frames in order), a client's ERROR, or the end of the connection, with the protocol error to
  tell the client when the client broke a rule.
- Bulk connections run on a thread of their own without the GIL (``serve()``): READs are read
  with plain preadv and sent in chunks of 64 blocks; after an urgent READ on any connection,
  a bulk connection sends at most one chunk per 2 ms, so demand faults come first on this host.

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
from uffdd.peer.image import Image, ImageError
from uffdd.peer.native import module as _native
from uffdd.peer.server.stats import ServerStats


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
        self.image = image
        self.loop = asyncio.get_running_loop()
        self.fd = fd
        self.r: Any = _native.Responder(
            fd, image_fd, image.size, image.extents, sealer.key if sealer else None,
            opener.key if opener else None, sealer.seq if sealer else 0, opener.seq if opener else 0,
            conn.limits.max_blocks, conn.limits.max_inflight, bulk)
        self.deferred: dict[int, asyncio.Task[None]] = {}
        self.closed = False
        self._closing = False
        self._writing = False
        self._seen = {"reads": 0, "read_errors": 0, "blocks_raw": 0, "blocks_zero": 0, "payload_bytes": 0}
        self._thread: threading.Thread | None = None
        self._after: p.ProtocolError | bool | None = None
        """What to do once the bulk thread returns: fail with this error, or (True) close."""
        if bulk:
            self._thread = threading.Thread(target=self._serve, name="uffdd-serve-bulk", daemon=True)
            self._thread.start()
        else:
            self.loop.add_reader(fd, self._on_readable)
        self._timer = self.loop.call_later(conn.limits.idle_timeout / 4, self._idle_check)

    # -- bulk: a thread of its own -------------------------------------------------------------
    def _serve(self) -> None:
        with contextlib.suppress(Exception):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)  # demand faults first
        result = self.r.serve()
        with contextlib.suppress(RuntimeError):  # the loop is gone (process exit)
            self.loop.call_soon_threadsafe(self._served, result)

    def _served(self, result: tuple[Any, ...] | None) -> None:
        self._thread = None
        after, self._after = self._after, None
        if isinstance(after, p.ProtocolError):
            self.fail(after)
        elif after is not None or result is None:
            self.close()
        else:
            self._handle([result])

    def _stop_thread(self, after: p.ProtocolError | bool) -> bool:
        """If the bulk thread runs, ask it to stop and do ``after`` when it has; True if it runs."""
        if self._thread is None:
            return False
        if self._after is None or isinstance(after, p.ProtocolError):
            self._after = after
        self.r.stop()
        return True

    # -- events --------------------------------------------------------------------------------
    def _on_readable(self) -> None:
        self.server.last_urgent = time.perf_counter()  # bulk pumps step aside for a moment
        self._handle(self.r.receive() or ())
        self._after_io()

    def _handle(self, events: Any) -> None:
        for ev in events:
            kind = ev[0]
            if kind == "read":
                self._defer(ev[1], ev[2], ev[3])
            elif kind == "error":
                log.warning("peer_reported_error", code=ev[1], error=ev[2].decode("utf-8", "replace"))
                self.close()
                return
            elif kind == "lost":
                if ev[2]:
                    code = p.ErrorCode(ev[2])
                    if code is p.ErrorCode.TAMPERED:
                        self.server.stats.tampered += 1
                    self.conn.fail(p.ProtocolError(code, str(ev[1])))
                else:
                    self.close()
                return
            if self.closed:
                return

    def _after_io(self) -> None:
        """Bytes wait to be written: stop taking requests until they are (a client that does not
        read bounds what it makes us buffer)."""
        if self.closed or self._closing:
            return
        if self.r.tx_pending and not self._writing:
            self._writing = True
            self.loop.remove_reader(self.fd)
            self.loop.add_writer(self.fd, self._on_writable)

    def _on_writable(self) -> None:
        try:
            done = self.r.flush()
        except OSError:
            self.close()
            return
        if done and self._closing:
            self.close()
        elif done:
            self._writing = False
            self.loop.remove_writer(self.fd)
            self.loop.add_reader(self.fd, self._on_readable)
            self._on_readable()  # READs that waited for room are answered now, not on the next byte in

    def _defer(self, rid: int, offset: int, count: int) -> None:
        """A READ the page cache could not answer at once (the responder counts it in flight,
        against the same limits, until it is answered): read it in a thread."""
        self.deferred[rid] = self.loop.create_task(self._read(rid, offset, count))

    async def _read(self, rid: int, offset: int, count: int) -> None:
        try:
            data: bytearray | memoryview | None = await self.image.read(offset, bytearray(count << p.BLOCK_SHIFT))
            err = None
        except ImageError as exc:
            data, err = None, exc
        finally:
            self.deferred.pop(rid, None)
        if self.closed:
            return
        try:
            if data is not None:
                self.r.send_data(rid, offset, data)
            else:
                self.server.stats.read_errors += 1
                log.error("image_read_failed", offset=offset, blocks=count, error=str(err))
                self.r.send_error(rid, p.ErrorCode.IO_ERROR, str(err))
        except OSError:
            self.close()
            return
        self._after_io()

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
        self.loop.remove_reader(self.fd)
        if not self._writing:
            self._writing = True
            self.loop.add_writer(self.fd, self._on_writable)
        self.loop.call_later(CLOSE_GRACE_S, self.close)

    def close(self) -> None:
        if self.closed or self._stop_thread(True):
            return
        self.closed = True
        self._timer.cancel()
        self.loop.remove_reader(self.fd)
        if self._writing:
            self.loop.remove_writer(self.fd)
        for task in self.deferred.values():
            task.cancel()
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


__all__ = ["NativeResponder", "hand_over", "responder_available"]
