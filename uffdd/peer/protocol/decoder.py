"""The server's decoder: bytes in, whole control frames out."""

from __future__ import annotations

from uffdd.peer.protocol.frames import (
    HEADER,
    HEADER_SIZE,
    SERVER_ACCEPTS,
    Frame,
    FrameType,
    Limits,
    ProtocolError,
    check_header,
)


class FrameDecoder:
    """Bytes in, whole control frames out. Used by the server for everything it receives.

    Holds at most one header and one control payload (<= MAX_CONTROL_PAYLOAD bytes) of
    unparsed input, whatever the peer claims.
    """

    def __init__(self, accept: frozenset[FrameType] = SERVER_ACCEPTS, limits: Limits | None = None) -> None:
        if FrameType.DATA in accept:
            raise ValueError("DATA frames are decoded by ResponseReader")
        self.accept = accept
        self.limits = limits or Limits()
        self._buf = bytearray()
        self._need = HEADER_SIZE
        self._hdr: tuple[FrameType, int, int, int, int, int] | None = None
        self.broken: ProtocolError | None = None

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """Decode what ``data`` completes; raise ProtocolError at the first bad frame (and forever after)."""
        if self.broken is not None:
            raise self.broken
        out: list[Frame] = []
        buf = self._buf
        view = memoryview(data)
        pos = 0
        try:
            while True:
                take = min(self._need - len(buf), len(view) - pos)
                if take > 0:
                    buf += view[pos : pos + take]
                    pos += take
                if len(buf) < self._need:
                    return out
                if self._hdr is None:
                    ftype, flags, count, rid, offset, length, aux = HEADER.unpack(buf)
                    t = check_header(ftype, flags, count, rid, offset, length, aux, self.accept, self.limits)
                    self._hdr = (t, rid, offset, count, aux, length)
                    buf.clear()
                    self._need = length
                    if length:
                        continue
                t, rid, offset, count, aux, _ = self._hdr
                out.append(Frame(t, rid, offset, count, aux, bytes(buf)))
                buf.clear()
                self._hdr = None
                self._need = HEADER_SIZE
        except ProtocolError as exc:
            self.broken = exc
            raise

