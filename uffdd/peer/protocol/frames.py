"""The peer wire protocol's frames (docs/peer-protocol.md): layouts, codes, header checks, encoders.

Every frame starts with one fixed header; :func:`check_header` checks each field that needs no
other state, for the decoders on both sides (:mod:`.decoder`, :mod:`.reader`).
"""

from __future__ import annotations

import struct
import sys
from array import array
from dataclasses import dataclass
from enum import IntEnum
from typing import Protocol

from crc32c import crc32c

MAGIC = b"UFPD"
VERSION = 2
"""2: frames of an authenticated connection carry a tag (:mod:`.seal`)."""
BLOCK_SIZE = 4096
BLOCK_SHIFT = 12

HEADER = struct.Struct("<BBHIQII")
"""type u8, flags u8, count u16, id u32, offset u64, length u32, aux u32 (little endian)."""
HEADER_SIZE = HEADER.size
FLAG_TAGGED = 0x01
"""The payload ends with a TAG_SIZE-byte tag (counted in ``length``): see :mod:`.seal`."""
TAG_SIZE = 16
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
    TAMPERED = 16


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
    """A decoded frame other than DATA (whose payload never becomes an object). The payload is
    without its tag; ``tagged`` says whether one came and was checked."""

    type: FrameType
    id: int = 0
    offset: int = 0
    count: int = 0
    aux: int = 0
    payload: bytes = b""
    tagged: bool = False


# --- encoders ------------------------------------------------------------------------------

def header(ftype: FrameType, *, id: int = 0, offset: int = 0, count: int = 0, length: int = 0, aux: int = 0,
           flags: int = 0) -> bytes:
    """A raw header (tests and tools build frames by hand with it)."""
    return HEADER.pack(ftype, flags, count, id, offset, length, aux)


class Tagger(Protocol):
    def tag(self, *parts: bytes | bytearray | memoryview) -> bytes: ...


Piece = bytes | bytearray | memoryview


def frame_pieces(ftype: FrameType, pieces: list[Piece], *, id: int = 0, offset: int = 0, count: int = 0,
                 aux: int = 0, sealer: Tagger | None = None) -> list[Piece]:
    """A frame as the pieces to write: the header, ``pieces`` (the payload), and with a
    ``sealer`` (an authenticated connection) the tag over all of them."""
    length = sum(len(x) for x in pieces) + (TAG_SIZE if sealer is not None else 0)
    hdr = HEADER.pack(ftype, FLAG_TAGGED if sealer is not None else 0, count, id, offset, length, aux)
    if sealer is None:
        return [hdr, *pieces]
    return [hdr, *pieces, sealer.tag(hdr, *pieces)]


def encode_frame(ftype: FrameType, payload: bytes = b"", *, id: int = 0, offset: int = 0, count: int = 0,
                 aux: int = 0, sealer: Tagger | None = None) -> bytes:
    return b"".join(frame_pieces(ftype, [payload] if payload else [], id=id, offset=offset, count=count, aux=aux,
                                 sealer=sealer))


def encode_read(req_id: int, offset: int, count: int, sealer: Tagger | None = None) -> bytes:
    return encode_frame(FrameType.READ, id=req_id, offset=offset, count=count, sealer=sealer)


def encode_error(code: ErrorCode, message: str, *, id: int = 0, sealer: Tagger | None = None) -> bytes:
    msg = message.encode("utf-8", "replace")[:MAX_ERROR_MESSAGE]
    return encode_frame(FrameType.ERROR, msg, id=id, aux=code, sealer=sealer)



# --- DATA block descriptors ------------------------------------------------------------------

RAW_HI = (BLOCK_SIZE | Encoding.RAW << 16) << 32
"""A RAW descriptor read as one little-endian u64: crc | RAW_HI."""
LITTLE_ENDIAN = sys.byteorder == "little"
RAW_HI32 = BLOCK_SIZE | Encoding.RAW << 16
ZERO_HI32 = Encoding.ZERO << 16


def u64_table(values: list[int]) -> bytes:
    arr = array("Q", values)
    if not LITTLE_ENDIAN:
        arr.byteswap()
    return arr.tobytes()


# --- decoding (both sides) ------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Limits:
    """What a decoder accepts; the server's come from its config, the client's from WELCOME."""

    max_blocks: int = 1024


CONTROL_MAX: dict[FrameType, int] = {
    FrameType.HELLO: HELLO.size + MAX_NAME,
    FrameType.CHALLENGE: CHALLENGE.size,
    FrameType.AUTH: AUTH.size,
    FrameType.WELCOME: WELCOME.size,
    FrameType.READ: 0,
    FrameType.PING: 0,
    FrameType.PONG: 0,
    FrameType.ERROR: MAX_ERROR_MESSAGE,
}
MAX_CONTROL_PAYLOAD = max(CONTROL_MAX.values())

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
    if flags & ~FLAG_TAGGED:
        raise ProtocolError(ErrorCode.BAD_FRAME,
                            f"{t.name} flags {flags:#x}: only TAGGED ({FLAG_TAGGED:#x}) is defined")
    if flags & FLAG_TAGGED:
        if length < TAG_SIZE:
            raise ProtocolError(ErrorCode.BAD_LENGTH, f"tagged {t.name} of {length} bytes has no room for its tag")
        length -= TAG_SIZE
    if t is FrameType.DATA:
        if not 1 <= count <= limits.max_blocks:
            raise ProtocolError(ErrorCode.OUT_OF_RANGE, f"DATA count {count} outside 1..{limits.max_blocks}")
        if not count * DESC_SIZE <= length <= count * (DESC_SIZE + BLOCK_SIZE):
            raise ProtocolError(ErrorCode.BAD_LENGTH, f"DATA length {length} impossible for {count} blocks")
    elif length > CONTROL_MAX[t]:
        raise ProtocolError(ErrorCode.BAD_LENGTH,
                            f"{t.name} length {length} exceeds the limit of {CONTROL_MAX[t]} bytes")
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

