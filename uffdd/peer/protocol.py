"""The peer wire protocol (docs/peer-protocol.md): frame layout, codecs and sans-IO decoders.

Everything here is pure: no sockets, no event loop. The server feeds received bytes to a
:class:`FrameDecoder`; the client lets a :class:`ResponseReader` tell it where the next bytes
must go (its ``get_buffer`` / ``buffer_updated`` pair is asyncio's ``BufferedProtocol``), so
page payloads land straight in the destination buffer. Every length, count and offset is
checked against what was negotiated before anything is read into memory.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
import sys
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Protocol

import lz4.block  # type: ignore[import-untyped]
from crc32c import crc32c

MAGIC = b"UFPD"
VERSION = 1
BLOCK_SIZE = 4096
BLOCK_SHIFT = 12

HEADER = struct.Struct("<BBHIQII")
"""type u8, flags u8, count u16, id u32, offset u64, length u32, aux u32 (little endian)."""
HEADER_SIZE = HEADER.size
DESC = struct.Struct("<IHBB")
"""Per-block descriptor of a DATA frame: crc32c u32, stored length u16, encoding u8, reserved u8."""
DESC_SIZE = DESC.size

HELLO = struct.Struct("<4sHBB32sH")
"""magic, version, role, features, client nonce, name length; then the image name (UTF-8)."""
CHALLENGE = struct.Struct("<4sHBB32s32s")
"""magic, version, auth method, reserved, server nonce, server proof."""
AUTH = struct.Struct("<32s")
WELCOME = struct.Struct("<QIIIB3x16s")
"""image size, block size, max blocks per READ, max READs in flight, features granted, image id."""

NONCE_SIZE = 32
PROOF_SIZE = 32
MAX_NAME = 255
MAX_ERROR_MESSAGE = 1024
ZERO_BLOCK = bytes(BLOCK_SIZE)
ZERO_CRC = crc32c(ZERO_BLOCK)
NO_PROOF = bytes(PROOF_SIZE)

LZ4_WORTH_IT = BLOCK_SIZE - BLOCK_SIZE // 8
"""A compressed block is sent only if it saves at least an eighth of the block."""


class FrameType(IntEnum):
    HELLO = 0x01
    CHALLENGE = 0x02
    AUTH = 0x03
    WELCOME = 0x04
    READ = 0x10
    DATA = 0x11
    PING = 0x20
    PONG = 0x21
    ERROR = 0x7F


class Encoding(IntEnum):
    RAW = 0
    ZERO = 1
    LZ4 = 2


class Role(IntEnum):
    URGENT = 0
    """Demand faults: a vCPU is waiting. Never shares a connection with prefetch traffic."""
    BULK = 1
    """Background prefetch."""


class AuthMethod(IntEnum):
    NONE = 0
    HMAC_SHA256 = 1


FEATURE_LZ4 = 0x01
KNOWN_FEATURES = FEATURE_LZ4


class ErrorCode(IntEnum):
    """Codes of ERROR frames; docs/peer-protocol.md says what each means."""

    BAD_FRAME = 1
    UNKNOWN_TYPE = 2
    BAD_LENGTH = 3
    BAD_STATE = 4
    BAD_ID = 5
    OUT_OF_RANGE = 6
    TOO_MANY_REQUESTS = 7
    VERSION = 8
    AUTH_REQUIRED = 9
    AUTH_FAILED = 10
    NO_SUCH_IMAGE = 11
    IO_ERROR = 12
    SHUTTING_DOWN = 13
    TIMEOUT = 14
    BUSY = 15


def error_code(value: int) -> ErrorCode | None:
    """The ErrorCode for a wire value, None for a code this version does not know."""
    try:
        return ErrorCode(value)
    except ValueError:
        return None


class ProtocolError(Exception):
    """The peer broke the protocol (or refused us): the connection it came on is dropped."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Frame:
    """A decoded frame other than DATA (whose payload never becomes an object)."""

    type: FrameType
    id: int = 0
    offset: int = 0
    count: int = 0
    aux: int = 0
    payload: bytes = b""


# --- encoders ------------------------------------------------------------------------------

def header(ftype: FrameType, *, id: int = 0, offset: int = 0, count: int = 0, length: int = 0, aux: int = 0) -> bytes:
    return HEADER.pack(ftype, 0, count, id, offset, length, aux)


def encode_frame(ftype: FrameType, payload: bytes = b"", *, id: int = 0, offset: int = 0, count: int = 0,
                 aux: int = 0) -> bytes:
    return HEADER.pack(ftype, 0, count, id, offset, len(payload), aux) + payload


def encode_read(req_id: int, offset: int, count: int) -> bytes:
    return HEADER.pack(FrameType.READ, 0, count, req_id, offset, 0, 0)


def encode_error(code: ErrorCode, message: str, *, id: int = 0) -> bytes:
    msg = message.encode("utf-8", "replace")[:MAX_ERROR_MESSAGE]
    return HEADER.pack(FrameType.ERROR, 0, 0, id, 0, len(msg), code) + msg


@dataclass(frozen=True, slots=True)
class Hello:
    role: Role
    features: int
    nonce: bytes
    name: str
    version: int = VERSION

    def encode(self) -> bytes:
        name = self.name.encode()
        return HELLO.pack(MAGIC, self.version, self.role, self.features, self.nonce, len(name)) + name

    @classmethod
    def decode(cls, payload: bytes) -> Hello:
        if len(payload) < HELLO.size:
            raise ProtocolError(ErrorCode.BAD_LENGTH, f"HELLO payload of {len(payload)} bytes is too short")
        magic, version, role, features, nonce, name_len = HELLO.unpack_from(payload)
        if magic != MAGIC:
            raise ProtocolError(ErrorCode.VERSION, f"bad magic {magic!r}: not a uffdd peer")
        if version != VERSION:
            raise ProtocolError(ErrorCode.VERSION, f"protocol version {version} is not supported (this is {VERSION})")
        if role not in (Role.URGENT, Role.BULK):
            raise ProtocolError(ErrorCode.BAD_FRAME, f"HELLO role {role} is not defined")
        if features & ~KNOWN_FEATURES:
            features &= KNOWN_FEATURES  # unknown wishes are simply not granted
        if HELLO.size + name_len != len(payload):
            raise ProtocolError(ErrorCode.BAD_LENGTH,
                                f"HELLO name length {name_len} does not match the payload ({len(payload)} bytes)")
        try:
            name = payload[HELLO.size:].decode()
        except UnicodeDecodeError:
            raise ProtocolError(ErrorCode.BAD_FRAME, "HELLO image name is not UTF-8") from None
        return cls(Role(role), features, nonce, name, version)


@dataclass(frozen=True, slots=True)
class Challenge:
    auth: AuthMethod
    nonce: bytes
    proof: bytes

    def core(self) -> bytes:
        """The part of the payload the proofs cover (everything but the proof itself)."""
        return CHALLENGE.pack(MAGIC, VERSION, self.auth, 0, self.nonce, NO_PROOF)[: CHALLENGE.size - PROOF_SIZE]

    def encode(self) -> bytes:
        return CHALLENGE.pack(MAGIC, VERSION, self.auth, 0, self.nonce, self.proof)

    @classmethod
    def decode(cls, payload: bytes) -> Challenge:
        if len(payload) != CHALLENGE.size:
            raise ProtocolError(ErrorCode.BAD_LENGTH,
                                f"CHALLENGE payload is {len(payload)} bytes, not {CHALLENGE.size}")
        magic, version, auth, reserved, nonce, proof = CHALLENGE.unpack(payload)
        if magic != MAGIC or version != VERSION:
            raise ProtocolError(ErrorCode.VERSION,
                                f"server speaks {magic!r} version {version}, not {MAGIC!r} {VERSION}")
        if auth not in (AuthMethod.NONE, AuthMethod.HMAC_SHA256) or reserved:
            raise ProtocolError(ErrorCode.BAD_FRAME, f"CHALLENGE auth method {auth} is not defined")
        return cls(AuthMethod(auth), nonce, proof)


@dataclass(frozen=True, slots=True)
class Welcome:
    image_size: int
    block_size: int
    max_blocks: int
    max_inflight: int
    features: int
    image_id: bytes

    def encode(self) -> bytes:
        return WELCOME.pack(self.image_size, self.block_size, self.max_blocks, self.max_inflight, self.features,
                            self.image_id)

    @classmethod
    def decode(cls, payload: bytes) -> Welcome:
        if len(payload) != WELCOME.size:
            raise ProtocolError(ErrorCode.BAD_LENGTH, f"WELCOME payload is {len(payload)} bytes, not {WELCOME.size}")
        w = cls(*WELCOME.unpack(payload))
        if w.block_size != BLOCK_SIZE:
            raise ProtocolError(ErrorCode.VERSION, f"block size {w.block_size} is not supported (only {BLOCK_SIZE})")
        if not 1 <= w.max_blocks <= 0xFFFF or not 1 <= w.max_inflight <= 1 << 16:
            raise ProtocolError(ErrorCode.BAD_FRAME, f"WELCOME limits out of range: max_blocks {w.max_blocks}, "
                                                     f"max_inflight {w.max_inflight}")
        if w.features & ~KNOWN_FEATURES:
            raise ProtocolError(ErrorCode.BAD_FRAME, f"WELCOME grants unknown features {w.features:#x}")
        return w


def _proof(label: bytes, secret: bytes, hello: bytes, challenge_core: bytes) -> bytes:
    return hmac.new(secret, label + hello + challenge_core, hashlib.sha256).digest()


def server_proof(secret: bytes, hello: bytes, challenge_core: bytes) -> bytes:
    """HMAC-SHA256 proving the server knows the secret, bound to this client's fresh nonce."""
    return _proof(b"uffdd-peer-v1 server\0", secret, hello, challenge_core)


def client_proof(secret: bytes, hello: bytes, challenge_core: bytes) -> bytes:
    """HMAC-SHA256 proving the client knows the secret, bound to the server's fresh nonce."""
    return _proof(b"uffdd-peer-v1 client\0", secret, hello, challenge_core)


def proofs_equal(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)


# --- DATA frames (server side) --------------------------------------------------------------

class Compressor:
    """Decides per block whether lz4 pays off. After 8 incompressible blocks in a row it only
    probes one block per frame until one compresses again, so random memory costs ~nothing."""

    __slots__ = ("enabled", "misses")

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.misses = 0

    @property
    def probing(self) -> bool:
        return self.misses >= 8

    def try_compress(self, block: memoryview) -> bytes | None:
        if not self.enabled:
            return None
        out: bytes = lz4.block.compress(block, store_size=False)
        if len(out) <= LZ4_WORTH_IT:
            self.misses = 0
            return out
        self.misses += 1
        return None


@dataclass(slots=True)
class BlockCounts:
    raw: int = 0
    zero: int = 0
    lz4: int = 0
    payload_bytes: int = 0


_RAW_HI = (BLOCK_SIZE | Encoding.RAW << 16) << 32
"""A RAW descriptor read as one little-endian u64: crc | _RAW_HI."""
_LITTLE = sys.byteorder == "little"
_RAW_HI32 = BLOCK_SIZE | Encoding.RAW << 16
_ZERO_HI32 = Encoding.ZERO << 16


def _u64_table(values: list[int]) -> bytes:
    arr = array("Q", values)
    if not _LITTLE:
        arr.byteswap()
    return arr.tobytes()


def encode_data(req_id: int, offset: int, data: memoryview, compressor: Compressor,
                counts: BlockCounts | None = None) -> list[bytes | memoryview]:
    """One DATA frame for ``data`` (whole blocks read at ``offset``): header + table, then the
    payload pieces. Raw runs are slices of ``data`` (no copy); zero blocks carry no payload."""
    n = len(data) >> BLOCK_SHIFT
    crcs = [crc32c(data[a : a + BLOCK_SIZE]) for a in range(0, n << BLOCK_SHIFT, BLOCK_SIZE)]
    if compressor.enabled and compressor.probing:
        compressor.try_compress(data[:BLOCK_SIZE])  # one probe per frame; a hit ends the probing
    compress = compressor.enabled and not compressor.probing
    if ZERO_CRC not in crcs and not compress:
        # The common case for random memory: every block raw, one contiguous payload.
        table = _u64_table([c | _RAW_HI for c in crcs])
        if counts is not None:
            counts.raw += n
            counts.payload_bytes += n << BLOCK_SHIFT
        return [HEADER.pack(FrameType.DATA, 0, n, req_id, offset, len(table) + (n << BLOCK_SHIFT), 0) + table,
                data]
    descs: list[int] = []
    pieces: list[bytes | memoryview] = [b""]
    run_start = -1
    payload = 0
    nraw = nzero = nlz4 = 0
    for i, c in enumerate(crcs):
        a = i << BLOCK_SHIFT
        blk = data[a : a + BLOCK_SIZE]
        comp = None
        if c == ZERO_CRC and blk.tobytes() == ZERO_BLOCK:
            enc, stored = Encoding.ZERO, 0
            nzero += 1
        else:
            if compress and not compressor.probing:
                comp = compressor.try_compress(blk)
            if comp is None:
                if run_start < 0:
                    run_start = a
                descs.append(c | _RAW_HI)
                payload += BLOCK_SIZE
                nraw += 1
                continue
            enc, stored = Encoding.LZ4, len(comp)
            nlz4 += 1
        if run_start >= 0:
            pieces.append(data[run_start:a])
            run_start = -1
        if comp is not None:
            pieces.append(comp)
        descs.append(c | (stored | enc << 16) << 32)
        payload += stored
    if run_start >= 0:
        pieces.append(data[run_start:])
    table = _u64_table(descs)
    pieces[0] = HEADER.pack(FrameType.DATA, 0, n, req_id, offset, len(table) + payload, 0) + table
    if counts is not None:
        counts.raw += nraw
        counts.zero += nzero
        counts.lz4 += nlz4
        counts.payload_bytes += payload
    return pieces


# --- decoding (both sides) ------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Limits:
    """What a decoder accepts; the server's come from its config, the client's from WELCOME."""

    max_blocks: int = 1024


_CONTROL_MAX: dict[FrameType, int] = {
    FrameType.HELLO: HELLO.size + MAX_NAME,
    FrameType.CHALLENGE: CHALLENGE.size,
    FrameType.AUTH: AUTH.size,
    FrameType.WELCOME: WELCOME.size,
    FrameType.READ: 0,
    FrameType.PING: 0,
    FrameType.PONG: 0,
    FrameType.ERROR: MAX_ERROR_MESSAGE,
}
MAX_CONTROL_PAYLOAD = max(_CONTROL_MAX.values())

SERVER_ACCEPTS = frozenset({FrameType.HELLO, FrameType.AUTH, FrameType.READ, FrameType.PING, FrameType.ERROR})
CLIENT_CONTROL = frozenset({FrameType.CHALLENGE, FrameType.WELCOME, FrameType.PONG, FrameType.ERROR})


def check_header(ftype: int, flags: int, count: int, req_id: int, offset: int, length: int, aux: int,
                 accept: frozenset[FrameType], limits: Limits) -> FrameType:
    """Validate the fields of one header that need no other state; return its type."""
    try:
        t = FrameType(ftype)
    except ValueError:
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"frame type {ftype:#04x} is not defined") from None
    if t not in accept:
        raise ProtocolError(ErrorCode.BAD_STATE, f"{t.name} frames are not expected in this direction")
    if flags:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"{t.name} flags {flags:#x}: no flag is defined")
    if t is FrameType.DATA:
        if not 1 <= count <= limits.max_blocks:
            raise ProtocolError(ErrorCode.OUT_OF_RANGE, f"DATA count {count} outside 1..{limits.max_blocks}")
        if not count * DESC_SIZE <= length <= count * (DESC_SIZE + BLOCK_SIZE):
            raise ProtocolError(ErrorCode.BAD_LENGTH, f"DATA length {length} impossible for {count} blocks")
    elif length > _CONTROL_MAX[t]:
        raise ProtocolError(ErrorCode.BAD_LENGTH,
                            f"{t.name} length {length} exceeds the limit of {_CONTROL_MAX[t]} bytes")
    if t is FrameType.READ:
        if not 1 <= count <= limits.max_blocks:
            raise ProtocolError(ErrorCode.OUT_OF_RANGE, f"READ count {count} outside 1..{limits.max_blocks}")
        if offset & (BLOCK_SIZE - 1):
            raise ProtocolError(ErrorCode.OUT_OF_RANGE, f"READ offset {offset:#x} is not block aligned")
    elif t is not FrameType.DATA and (count or offset):
        raise ProtocolError(ErrorCode.BAD_FRAME, f"{t.name} must have count and offset 0")
    if t in (FrameType.READ, FrameType.DATA) and req_id == 0:
        raise ProtocolError(ErrorCode.BAD_ID, f"{t.name} with request id 0")
    if t in (FrameType.HELLO, FrameType.CHALLENGE, FrameType.AUTH, FrameType.WELCOME) and req_id:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"{t.name} must have id 0")
    if aux and t is not FrameType.ERROR:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"{t.name} aux field must be 0")
    return t


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


_S_HEADER, _S_CONTROL, _S_TABLE, _S_PAYLOAD = range(4)
DISCARD_SIZE = 256 << 10


class ResponseReader:
    """The client's decoder of server -> client bytes, shaped as asyncio's BufferedProtocol.

    ``get_buffer()`` says where the next bytes go: the header scratch, the descriptor table
    (bounded by the negotiated max_blocks), or for page payloads the destination itself. A
    compressed block goes to a one-block scratch and is decompressed into the destination.
    Each block's crc32c is checked once it is complete; a frame with a bad block is reported
    with ``ok=False`` (the caller re-fetches; the bytes never count as delivered).
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
        self._ctrl = bytearray(MAX_CONTROL_PAYLOAD)
        self._ctrl_view = memoryview(self._ctrl)
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
        if self._his[self._blk] != _RAW_HI32:  # an lz4 block (zero blocks need no bytes)
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
                if self._state == _S_PAYLOAD and self._his[self._blk] == _RAW_HI32:
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
        self._payload_len = length - count * DESC_SIZE
        self._state, self._got, self._need = _S_TABLE, 0, count * DESC_SIZE

    def _emit_control(self, payload: bytes) -> None:
        frame = Frame(self._ftype, self._fid, 0, 0, self._faux, payload)
        self._reset()
        self.handler.on_frame(frame)

    def _on_table(self) -> None:
        n = self._count
        words = array("I")
        words.frombytes(self._table_view[: n * DESC_SIZE])
        if not _LITTLE:
            words.byteswap()
        crcs, his = words[0::2], words[1::2]
        if his.count(_RAW_HI32) == n:  # all raw: nothing else to check
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
        self._state = _S_PAYLOAD
        self._start_piece(0)

    def _start_piece(self, i: int) -> None:
        """Set up block ``i``: zero blocks are written at once, raw runs are received as one piece."""
        his = self._his
        n = self._count
        while i < n:
            hi = his[i]
            if hi == _ZERO_HI32:
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
            if hi == _RAW_HI32:
                j = i + 1
                while j < n and his[j] == _RAW_HI32:
                    j += 1
                self._run_end = j
                self._need = (j - i) << BLOCK_SHIFT
            else:
                self._need = hi & 0xFFFF
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
        if hi == _RAW_HI32:
            self._check_raw()
            self._start_piece(self._run_end)
            return
        stored = hi & 0xFFFF
        dest = self._target.dest if self._target is not None else None
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
