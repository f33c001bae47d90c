"""Authenticated frames: with a shared secret, every frame after the handshake carries a tag.

A crc32c per block catches a damaged page, not a forged one: anyone on the path can rewrite a
page and its crc. So when the connection was authenticated (HMAC-SHA256 challenge/response,
:mod:`.messages`), both ends derive two keys from the secret and that exchange, one per
direction, and every frame after the handshake ends with a 16-byte tag: ChaCha20-Poly1305
(RFC 8439) with an empty plaintext and the frame (header and payload as sent) as additional
data. The nonce is the frame's sequence number in its direction, so a frame dropped, replayed,
reordered or injected fails too. The header's TAGGED flag says a tag follows; a frame that
fails its tag ends the connection (it is re-established, and what was in flight re-sent).

The C extension ``uffdd.peer._wire`` computes the same tags without the interpreter; without
it the ``cryptography`` package does.
"""

from __future__ import annotations

import hmac
import importlib
import struct
from types import ModuleType

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

TAG_SIZE = 16
KEY_SIZE = 32
_NONCE = struct.Struct("<4xQ")
"""The 96-bit nonce: four zero bytes, then the frame's sequence number (u64, little endian)."""

try:
    _wire: ModuleType | None = importlib.import_module("uffdd.peer._wire")
except ImportError:  # built without a C compiler
    _wire = None


def session_keys(secret: bytes, hello: bytes, challenge_core: bytes, client_proof: bytes) -> tuple[bytes, bytes]:
    """(client -> server key, server -> client key) for one authenticated connection: bound to
    the secret and to both sides' fresh nonces (in the HELLO and the CHALLENGE)."""
    prk = hmac.digest(secret, b"uffdd-peer-v2 keys\0" + hello + challenge_core + client_proof, "sha256")
    return (hmac.digest(prk, b"client to server\x01", "sha256"), hmac.digest(prk, b"server to client\x01", "sha256"))


SMALL = 16 << 10
"""Frames up to this size are tagged by ``_wire`` (no join, no object); larger ones by the
``cryptography`` package, whose vectorised Poly1305 is faster on long inputs."""


def frame_tag(key: bytes, seq: int, *parts: bytes | bytearray | memoryview,
              aead: ChaCha20Poly1305 | None = None) -> bytes:
    """The tag of frame number ``seq`` whose bytes (header with its final length, then the
    payload) are ``parts``, in order; ``aead`` is ``key``'s cipher object, if one is kept."""
    nonce = _NONCE.pack(seq)
    if _wire is not None and sum(len(x) for x in parts) <= SMALL:
        tag: bytes = _wire.aead_tag(key, nonce, *parts)
        return tag
    return (aead or ChaCha20Poly1305(key)).encrypt(nonce, b"", b"".join(parts))


class _Keyed:
    """One direction of one connection: its key and the number of the next frame."""

    __slots__ = ("_aead", "key", "seq")

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_SIZE:
            raise ValueError(f"a frame key has {KEY_SIZE} bytes")
        self.key = key
        self.seq = 0
        self._aead = ChaCha20Poly1305(key)


class Sealer(_Keyed):
    """Tags the frames one end sends on one connection, numbering them from 0."""

    __slots__ = ()

    def tag(self, *parts: bytes | bytearray | memoryview) -> bytes:
        tag = frame_tag(self.key, self.seq, *parts, aead=self._aead)
        self.seq += 1
        return tag


class Opener(_Keyed):
    """Checks the tags of the frames one end receives on one connection, in order."""

    __slots__ = ()

    def check(self, tag: bytes | bytearray | memoryview, *parts: bytes | bytearray | memoryview) -> bool:
        """Whether ``tag`` is the right one for the next frame; the count moves on either way."""
        want = frame_tag(self.key, self.seq, *parts, aead=self._aead)
        self.seq += 1
        return hmac.compare_digest(want, bytes(tag))


__all__ = ["KEY_SIZE", "TAG_SIZE", "Opener", "Sealer", "frame_tag", "session_keys"]
