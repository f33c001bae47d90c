"""The client's decoder of server -> client bytes: page payloads land straight in their destination."""

from __future__ import annotations

from array import array
from collections.abc import Callable
from typing import Protocol

import lz4.block  # type: ignore[import-untyped]
from crc32c import crc32c

from uffdd.peer.protocol.frames import (
    BLOCK_SHIFT,
    BLOCK_SIZE,
    CLIENT_CONTROL,
    DESC_SIZE,
    FLAG_TAGGED,
    HEADER,
    HEADER_SIZE,
    LITTLE_ENDIAN,
    MAX_CONTROL_PAYLOAD,
    RAW_HI32,
    TAG_SIZE,
    ZERO_BLOCK,
    ZERO_CRC,
    ZERO_HI32,
    Encoding,
    ErrorCode,
    Frame,
    FrameType,
    Limits,
    Piece,
    ProtocolError,
    check_header,
)
from uffdd.peer.protocol.seal import Opener


class Target(Protocol):
    """What a ResponseReader needs to know about a pending request (the client's request)."""

    offset: int
    count: int
    pos: int
    """Blocks already received; the next DATA frame for this request must start there."""
    dest: memoryview | None
    """Where its bytes go; None once nobody waits for it (its bytes are then discarded)."""


class ReaderHandler(Protocol):
    def lookup(self, req_id: int) -> Target | None: ...
    def on_frame(self, frame: Frame) -> None: ...
    def on_data(self, target: Target, blocks: int, ok: bool) -> None: ...


_S_HEADER, _S_CONTROL, _S_TABLE, _S_PAYLOAD, _S_TAG = range(5)
DISCARD_SIZE = 256 << 10


class ResponseReader:
    """The client's decoder of server -> client bytes, shaped as asyncio's BufferedProtocol.

    ``get_buffer()`` says where the next bytes go: the header scratch, the descriptor table
    (bounded by the negotiated max_blocks), or for page payloads the destination itself. A
    compressed block goes to a one-block scratch and is decompressed into the destination.
    Each block's crc32c is checked once it is complete; a frame with a bad block is reported
    with ``ok=False`` (the caller re-fetches; the bytes never count as delivered).

    With an :attr:`opener` (an authenticated connection), frames carry tags: a DATA frame is
    reported only once its tag, over the bytes as they came (header, table, raw and compressed
    payload), has been checked, and a frame that fails it is TAMPERED. Once
    :attr:`require_tags` is set (after WELCOME) an untagged frame is TAMPERED too.
    """

    def __init__(self, handler: ReaderHandler, *, lz4: bool, max_blocks: int,
                 accept: frozenset[FrameType] = CLIENT_CONTROL, max_read: int = 1 << 62) -> None:
        """``max_read`` caps one destination buffer (a bulk reader keeps each read's work small)."""
        self.handler = handler
        self.max_read = max_read
        self.lz4 = lz4
        self.limits = Limits(max_blocks=max_blocks)
        self.accept = accept | {FrameType.DATA}
        self._hdr = bytearray(HEADER_SIZE)
        self._hdr_view = memoryview(self._hdr)
        self._ctrl = bytearray(MAX_CONTROL_PAYLOAD + TAG_SIZE)
        self._ctrl_view = memoryview(self._ctrl)
        self._tag = bytearray(TAG_SIZE)
        self.opener: Opener | None = None
        self.require_tags = False
        self._raw_hdr = b""
        self._tagged = False
        self._wire: list[Piece] = []
        """The frame's payload as it came, for its tag: raw runs and compressed blocks."""
        self._table = bytearray(max_blocks * DESC_SIZE)
        self._table_view = memoryview(self._table)
        self._block = bytearray(BLOCK_SIZE)
        self._block_view = memoryview(self._block)
        self._discard = memoryview(bytearray(DISCARD_SIZE))
        self._state = _S_HEADER
        self._got = 0
        self._need = HEADER_SIZE
        # the frame being read
        self._ftype = FrameType.PING
        self._fid = 0
        self._faux = 0
        self._count = 0
        self._target: Target | None = None
        self._base = 0
        """Byte offset in the target's dest of this frame's first block."""
        self._crcs = array("I")
        self._his = array("I")
        """Per block of the frame: its crc, and the descriptor's upper half (stored | enc << 16)."""
        self._blk = 0
        """Index (in this frame) of the block being received."""
        self._run_end = 0
        """For a raw run: index one past its last block."""
        self._checked = 0
        """Raw blocks of the current run whose crc was checked."""
        self._ok = True
        self.broken: ProtocolError | None = None

    # -- BufferedProtocol half --------------------------------------------------------------
    def get_buffer(self) -> memoryview:
        st = self._state
        if st == _S_HEADER:
            return self._hdr_view[self._got : HEADER_SIZE]
        if st == _S_CONTROL:
            return self._ctrl_view[self._got : self._need]
        if st == _S_TABLE:
            return self._table_view[self._got : self._need]
        if st == _S_TAG:
            return memoryview(self._tag)[self._got :]
        if self._his[self._blk] != RAW_HI32:  # an lz4 block (zero blocks need no bytes)
            return self._block_view[self._got : self._need]
        dest = self._target.dest if self._target is not None else None
        if dest is None:
            return self._discard[: min(self._need - self._got, DISCARD_SIZE)]
        a = self._base + (self._blk << BLOCK_SHIFT) + self._got
        return dest[a : min(self._base + (self._run_end << BLOCK_SHIFT), a + self.max_read)]

    def buffer_updated(self, n: int) -> None:
        if self.broken is not None:
            raise self.broken
        try:
            self._got += n
            if self._got < self._need:
                if self._state == _S_PAYLOAD and self._his[self._blk] == RAW_HI32:
                    self._check_raw()
                return
            self._advance()
        except ProtocolError as exc:
            self.broken = exc
            raise

    # -- state machine ----------------------------------------------------------------------
    def _advance(self) -> None:
        """The current piece is complete: move on (through any pieces that need no bytes)."""
        st = self._state
        if st == _S_HEADER:
            self._on_header()
        elif st == _S_CONTROL:
            self._emit_control(bytes(self._ctrl_view[: self._need]))
        elif st == _S_TABLE:
            self._on_table()
        elif st == _S_TAG:
            self._finish_frame()
        else:
            self._on_piece_done()

    def _reset(self) -> None:
        self._state = _S_HEADER
        self._got = 0
        self._need = HEADER_SIZE
        self._target = None

    def _on_header(self) -> None:
        ftype, flags, count, rid, offset, length, aux = HEADER.unpack(self._hdr)
        t = check_header(ftype, flags, count, rid, offset, length, aux, self.accept, self.limits)
        self._ftype, self._fid, self._faux = t, rid, aux
        self._tagged = bool(flags & FLAG_TAGGED)
        self._raw_hdr = bytes(self._hdr)
        if self._tagged and self.opener is None:
            raise ProtocolError(ErrorCode.BAD_FRAME, f"tagged {t.name} on a connection without keys")
        if not self._tagged and self.require_tags:
            raise ProtocolError(ErrorCode.TAMPERED, f"untagged {t.name} on an authenticated connection")
        if not self._tagged and self.opener is not None and not (t is FrameType.ERROR and rid == 0):
            raise ProtocolError(ErrorCode.TAMPERED, f"untagged {t.name} after the keys were made")
        if t is not FrameType.DATA:
            if length == 0:
                self._emit_control(b"")
                return
            self._state, self._got, self._need = _S_CONTROL, 0, length
            return
        target = self.handler.lookup(rid)
        if target is None:
            raise ProtocolError(ErrorCode.BAD_ID, f"DATA for request {rid}, which is not in flight")
        expect = target.offset + (target.pos << BLOCK_SHIFT)
        if offset != expect or count > target.count - target.pos:
            raise ProtocolError(ErrorCode.OUT_OF_RANGE,
                                f"DATA for request {rid} covers {offset:#x}+{count} blocks; expected the next part "
                                f"at {expect:#x} (at most {target.count - target.pos} blocks)")
        self._target = target
        self._count = count
        self._base = target.pos << BLOCK_SHIFT
        self._payload_len = length - count * DESC_SIZE - (TAG_SIZE if self._tagged else 0)
        self._wire = []
        self._state, self._got, self._need = _S_TABLE, 0, count * DESC_SIZE

    def _emit_control(self, payload: bytes) -> None:
        if self._tagged:
            assert self.opener is not None
            body, tag = payload[:-TAG_SIZE], payload[-TAG_SIZE:]
            if not self.opener.check(tag, self._raw_hdr, body):
                raise ProtocolError(ErrorCode.TAMPERED, f"{self._ftype.name} frame failed its tag")
            payload = body
        frame = Frame(self._ftype, self._fid, 0, 0, self._faux, payload, self._tagged)
        self._reset()
        self.handler.on_frame(frame)

    def _on_table(self) -> None:
        n = self._count
        words = array("I")
        words.frombytes(self._table_view[: n * DESC_SIZE])
        if not LITTLE_ENDIAN:
            words.byteswap()
        crcs, his = words[0::2], words[1::2]
        if his.count(RAW_HI32) == n:  # all raw: nothing else to check
            total = n << BLOCK_SHIFT
        else:
            total = 0
            for i, hi in enumerate(his):
                stored, enc, reserved = hi & 0xFFFF, (hi >> 16) & 0xFF, hi >> 24
                if reserved:
                    raise ProtocolError(ErrorCode.BAD_FRAME, f"DATA block {i}: reserved byte is {reserved}")
                if enc == Encoding.RAW:
                    ok = stored == BLOCK_SIZE
                elif enc == Encoding.ZERO:
                    ok = stored == 0
                elif enc == Encoding.LZ4:
                    if not self.lz4:
                        raise ProtocolError(ErrorCode.BAD_FRAME, f"DATA block {i} is lz4, which was not negotiated")
                    ok = 0 < stored < BLOCK_SIZE
                else:
                    raise ProtocolError(ErrorCode.BAD_FRAME, f"DATA block {i}: encoding {enc} is not defined")
                if not ok:
                    raise ProtocolError(ErrorCode.BAD_LENGTH, f"DATA block {i}: stored length {stored} is wrong "
                                                              f"for {Encoding(enc).name}")
                total += stored
        if total != self._payload_len:
            raise ProtocolError(ErrorCode.BAD_LENGTH, f"DATA length says {self._payload_len} payload bytes, "
                                                      f"its blocks add up to {total}")
        self._crcs, self._his = crcs, his
        self._ok = True
        if self._tagged:
            self._wire.append(bytes(self._table_view[: n * DESC_SIZE]))
        self._state = _S_PAYLOAD
        self._start_piece(0)

    def _start_piece(self, i: int) -> None:
        """Set up block ``i``: zero blocks are written at once, raw runs are received as one piece."""
        his = self._his
        n = self._count
        while i < n:
            hi = his[i]
            if hi == ZERO_HI32:
                dest = self._target.dest if self._target is not None else None
                if dest is not None:
                    a = self._base + (i << BLOCK_SHIFT)
                    dest[a : a + BLOCK_SIZE] = ZERO_BLOCK
                if self._crcs[i] != ZERO_CRC:
                    self._ok = False
                i += 1
                continue
            self._blk = i
            self._got = 0
            self._checked = 0
            if hi == RAW_HI32:
                j = i + 1
                while j < n and his[j] == RAW_HI32:
                    j += 1
                self._run_end = j
                self._need = (j - i) << BLOCK_SHIFT
            else:
                self._need = hi & 0xFFFF
            return
        if self._tagged:
            self._state, self._got, self._need = _S_TAG, 0, TAG_SIZE
            return
        self._finish_frame()

    def _check_raw(self) -> None:
        """Check the crc of every block of the raw run that is complete and not yet checked."""
        done = self._got >> BLOCK_SHIFT
        checked = self._checked
        if done <= checked:
            return
        dest = self._target.dest if self._target is not None else None
        if dest is not None:
            first = self._blk
            base = self._base + (first << BLOCK_SHIFT)
            lo, hi = base + (checked << BLOCK_SHIFT), base + (done << BLOCK_SHIFT)
            got = array("I", [crc32c(dest[a : a + BLOCK_SIZE]) for a in range(lo, hi, BLOCK_SIZE)])
            if got != self._crcs[first + checked : first + done]:
                self._ok = False
        self._checked = done

    def _on_piece_done(self) -> None:
        i = self._blk
        hi = self._his[i]
        dest = self._target.dest if self._target is not None else None
        if hi == RAW_HI32:
            self._check_raw()
            if self._tagged and dest is not None:
                a = self._base + (i << BLOCK_SHIFT)
                self._wire.append(dest[a : self._base + (self._run_end << BLOCK_SHIFT)])
            self._start_piece(self._run_end)
            return
        stored = hi & 0xFFFF
        if self._tagged:
            self._wire.append(bytes(self._block_view[:stored]))
        if dest is not None:
            try:
                page = lz4.block.decompress(self._block_view[:stored], uncompressed_size=BLOCK_SIZE)
            except lz4.block.LZ4BlockError:
                page = b""
            if len(page) == BLOCK_SIZE and crc32c(page) == self._crcs[i]:
                a = self._base + (i << BLOCK_SHIFT)
                dest[a : a + BLOCK_SIZE] = page
            else:
                self._ok = False
        self._start_piece(i + 1)

    def _finish_frame(self) -> None:
        target, count, ok = self._target, self._count, self._ok
        if self._tagged:
            assert self.opener is not None
            if target is not None and target.dest is not None:
                if not self.opener.check(self._tag, self._raw_hdr, *self._wire):
                    raise ProtocolError(ErrorCode.TAMPERED, f"DATA for request {self._fid} failed its tag")
            else:
                self.opener.seq += 1  # nobody waits for these bytes: they are dropped unread
            self._wire = []
        self._reset()
        assert target is not None
        self.handler.on_data(target, count, ok)


def feed_reader(reader: ResponseReader, data: bytes | memoryview,
                chunk: Callable[[int], int] | None = None) -> None:
    """Push ``data`` through a ResponseReader as a transport would (tests, fuzzing, tools)."""
    view = memoryview(data)
    pos = 0
    while pos < len(view):
        buf = reader.get_buffer()
        if not len(buf):
            raise AssertionError("ResponseReader.get_buffer returned an empty buffer")
        n = min(len(buf), len(view) - pos)
        if chunk is not None:
            n = max(1, min(n, chunk(n)))
        buf[:n] = view[pos : pos + n]
        pos += n
        reader.buffer_updated(n)
