from typing_extensions import Buffer

BLOCK_SIZE: int
CRC32C_IMPL: str

def crc32c(data: Buffer, /, value: int = 0) -> int:
    """crc32c of data continuing from value, as crc32c.crc32c(data, value)."""

def crc32c_blocks(data: Buffer, /) -> bytes:
    """The little-endian u32 crc32c of each 4096-byte block of data (a whole number of blocks)."""

def check_blocks(data: Buffer, expected: Buffer, /) -> int:
    """The index of the first 4096-byte block whose crc32c is not the matching u32 of expected, or -1."""

def aead_tag(key: Buffer, nonce: Buffer, /, *parts: Buffer) -> bytes:
    """ChaCha20Poly1305(key).encrypt(nonce, b"", b"".join(parts)): the 16-byte tag, parts never joined."""

def aead_verify(key: Buffer, nonce: Buffer, tag: Buffer, /, *parts: Buffer) -> bool:
    """Whether tag is aead_tag(key, nonce, *parts), compared in constant time."""

def chacha20_block(key: Buffer, counter: int, nonce: Buffer, /) -> bytes:
    """One 64-byte ChaCha20 key stream block (RFC 8439, 2.3)."""

def poly1305(key: Buffer, data: Buffer, /) -> bytes:
    """The Poly1305 one-time authenticator of data (RFC 8439, 2.5)."""

def crc32c_portable(data: Buffer, /) -> int:
    """crc32c through the table path whatever the CPU has (to test that path here)."""
