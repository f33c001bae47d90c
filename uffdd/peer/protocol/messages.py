"""The handshake's messages (HELLO, CHALLENGE, WELCOME) and the proofs of the shared secret."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from uffdd.peer.protocol.frames import (
    BLOCK_SIZE,
    CHALLENGE,
    HELLO,
    KNOWN_FEATURES,
    MAGIC,
    NO_PROOF,
    PROOF_SIZE,
    VERSION,
    WELCOME,
    AuthMethod,
    ErrorCode,
    ProtocolError,
    Role,
)


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

