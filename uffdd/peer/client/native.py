"""The urgent connection in C: once Python has connected and authenticated, the socket goes to
a :class:`uffdd.peer._native.Link`, which sends READs and checks and delivers the answers
without the interpreter, also for the fault path's own requests (uffdd/core/_fastpath.c).

A :class:`NativeConnection` stands in for the :class:`~.connection.ClientConnection` it takes the
socket from, so its channel sees no difference: requests, answers, errors, keepalive, the end of
the connection. TLS connections stay in Python (Python's ssl owns their bytes).
"""

from __future__ import annotations

import time
from typing import Any

import structlog

from uffdd.peer import protocol as p
from uffdd.peer.client.bulk import NativeBulkConnection
from uffdd.peer.client.connection import (
    MAX_CLIENT_BLOCKS,
    ClientConnection,
    Connection,
    LinkConnection,
    Request,
    Requests,
)
from uffdd.peer.native import module as _native

log = structlog.get_logger("uffdd.peer")


def new_link(retries: int) -> Any | None:
    """A C link for an urgent channel, or None where the extension is not built."""
    return _native.Link(MAX_CLIENT_BLOCKS, 2048, retries) if _native is not None else None


def take_over(channel: Requests, conn: ClientConnection, welcome: p.Welcome, link: Any) -> Connection:
    """The connection ``conn`` just authenticated, run from now on by ``link`` (urgent or bulk)."""
    if _native is not None and isinstance(link, _native.Bulk):
        return NativeBulkConnection(channel, conn, welcome, link)
    return NativeConnection(channel, conn, welcome, link)


class NativeConnection(LinkConnection):
    """One connection of a channel, run by the channel's C link (see the module docstring)."""

    def __init__(self, channel: Requests, conn: ClientConnection, welcome: p.Welcome, link: Any) -> None:
        super().__init__(channel, conn)
        self.link = link
        self._ping = 0
        self._writing = False
        fd, *keys = conn.hand_over()  # the asyncio transport lets go of its copy without a word
        link.attach(fd, *keys, min(welcome.max_blocks, MAX_CLIENT_BLOCKS), welcome.max_inflight)
        self.fd = fd
        self.loop.add_reader(fd, self._on_readable)
        self._flush()
        self._ka = self.loop.call_later(channel.opts.config.keepalive, self._keepalive)

    @property
    def usable(self) -> bool:
        return not self._dead

    def hold(self, on: bool) -> None:
        """Only bulk connections are held back; this one carries demand faults."""

    def send_read(self, req: Request) -> None:
        assert req.dest is not None
        self.link.submit(req.id, req.offset, req.count, req.dest)
        self._flush()

    def discard(self, req_id: int) -> None:
        """Nobody waits for ``req_id`` any more: its bytes, if they still come, are dropped."""
        self.link.discard(req_id)

    def _flush(self) -> None:
        try:
            done = self.link.flush()
        except OSError as exc:
            self.abort(f"write failed: {exc.strerror}")
            return
        if not done and not self._writing:
            self._writing = True
            self.loop.add_writer(self.fd, self._on_writable)

    def _on_writable(self) -> None:
        self._writing = False
        self.loop.remove_writer(self.fd)
        if not self._dead:
            self._flush()

    def _on_readable(self) -> None:
        events = self.link.receive()
        if events:
            self._handle(events)
        if not self._dead and self.link.tx_pending and not self._writing:
            self._flush()

    def _handle(self, events: list[tuple[Any, ...]]) -> None:
        ch = self.channel
        for ev in events:
            kind = ev[0]
            if kind == "data":
                req = ch.request(ev[1])
                if req is not None:
                    ch.on_data(req, ev[2], ev[3])
            elif kind == "error":
                req = ch.request(ev[1])
                if req is not None:
                    ch.on_request_error(req, p.error_code(ev[2]), ev[3].decode("utf-8", "replace"))
            elif kind == "server":
                code = p.error_code(ev[1])
                msg = ev[2].decode("utf-8", "replace")
                self.close_reason = f"server: {code.name if code else ev[1]}: {msg}"
                log.warning("peer_server_error", channel=ch.name, code=code.name if code else ev[1], error=msg)
            elif kind == "lost":
                reason = str(ev[1])
                if reason.startswith("tampered"):
                    ch.stats.tampered += 1
                    ch.stats.protocol_errors += 1
                    log.error("peer_link_tampered", channel=ch.name, error=reason,
                              hint="a frame failed its tag: the link is reconnected, nothing it carried is "
                                   "installed")
                elif ev[2]:  # the server broke the protocol (not: the connection broke)
                    ch.stats.protocol_errors += 1
                self.abort(reason)
                return

    def _keepalive(self) -> None:
        if self._dead:
            return
        self.channel.fold_link_stats()
        opts = self.channel.opts.config
        silent = (time.monotonic_ns() - self.link.last_rx_ns) / 1e9
        if silent > opts.io_timeout:
            log.warning("peer_link_silent", channel=self.channel.name, seconds=round(silent, 2),
                        inflight=self.channel.inflight)
            self.abort(f"nothing received for {silent:.1f}s")
            return
        self._ping = (self._ping + 1) & 0xFFFFFFFF
        self.link.ping(self._ping)
        self._flush()
        self._ka = self.loop.call_later(opts.keepalive, self._keepalive)

    def abort(self, reason: str, send: p.ProtocolError | None = None) -> None:
        """End this connection (the channel reconnects; the link keeps its owner's requests)."""
        if self._dead:
            return
        self._dead = True
        self.close_reason = reason
        self._ka.cancel()
        self.loop.remove_reader(self.fd)
        if self._writing:
            self.loop.remove_writer(self.fd)
        self.link.detach()
        self.channel.fold_link_stats()
        if not self.closed.done():
            self.closed.set_result(reason)


__all__ = ["NativeConnection", "new_link", "take_over"]
