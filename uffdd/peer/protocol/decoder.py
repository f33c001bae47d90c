"""The server's decoder: bytes in, whole control frames out (tags checked)."""

from __future__ import annotations

from collections.abc import Iterator

from uffdd.peer.protocol.frames import (
    FLAG_TAGGED,
    HEADER,
    HEADER_SIZE,
    SERVER_ACCEPTS,
    TAG_SIZE,
    ErrorCode,
    Frame,
    FrameType,
    Limits,
    ProtocolError,
    check_header,
)
from uffdd.peer.protocol.seal import Opener


class FrameDecoder:
    """Bytes in, whole control frames out. Used by the server for everything it receives.

    Holds at most one header and one control payload (<= MAX_CONTROL_PAYLOAD bytes plus a tag)
    of unparsed input, whatever the peer claims. Once :attr:`opener` is set (the connection is
    authenticated), every frame must carry a tag, and a frame whose tag fails is TAMPERED.
    """

    def __init__(self, accept: frozenset[FrameType] = SERVER_ACCEPTS, limits: Limits | None = None) -> None:
        if FrameType.DATA in accept:
            raise ValueError("DATA frames are decoded by ResponseReader")
        self.accept = accept
        self.limits = limits or Limits()
        self.opener: Opener | None = None
        self._buf = bytearray()
        self._need = HEADER_SIZE
        self._hdr: tuple[FrameType, int, int, int, int, int, bool] | None = None
        self._raw_hdr = b""
        self.broken: ProtocolError | None = None

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """Decode what ``data`` completes; raise ProtocolError at the first bad frame (and forever after)."""
        return list(self.frames(data))

    def frames(self, data: bytes | bytearray | memoryview) -> Iterator[Frame]:
        """:meth:`feed` one frame at a time: what the caller does with a frame (e.g. set the
        opener after AUTH) applies to the frames after it."""
        if self.broken is not None:
            raise self.broken
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
                    return
                if self._hdr is None:
                    ftype, flags, count, rid, offset, length, aux = HEADER.unpack(buf)
                    t = check_header(ftype, flags, count, rid, offset, length, aux, self.accept, self.limits)
                    self._hdr = (t, rid, offset, count, aux, length, bool(flags & FLAG_TAGGED))
                    self._raw_hdr = bytes(buf)
                    buf.clear()
                    self._need = length
                    if length:
                        continue
                frame = self._finish(bytes(buf))
                buf.clear()
                self._hdr = None
                self._need = HEADER_SIZE
                yield frame
        except ProtocolError as exc:
            self.broken = exc
            raise

    def _finish(self, payload: bytes) -> Frame:
        assert self._hdr is not None
        t, rid, offset, count, aux, _, tagged = self._hdr
        opener = self.opener
        if opener is not None:
            if not tagged:
                raise ProtocolError(ErrorCode.TAMPERED, f"untagged {t.name} on an authenticated connection")
            body, tag = payload[:-TAG_SIZE], payload[-TAG_SIZE:]
            if not opener.check(tag, self._raw_hdr, body):
                raise ProtocolError(ErrorCode.TAMPERED, f"{t.name} frame failed its tag")
            return Frame(t, rid, offset, count, aux, body, True)
        if tagged:
            raise ProtocolError(ErrorCode.BAD_FRAME, f"tagged {t.name} before the connection was authenticated")
        return Frame(t, rid, offset, count, aux, payload)
