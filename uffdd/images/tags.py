"""Block tags in chunk-cache files: a demand fault checks the 64 KiB it reads, not the whole chunk.

A cache file holds a chunk's plain bytes and, after them, one tag per :data:`BLOCK` bytes:
BLAKE3 keyed with the cache's key over (chunk name, block index, block bytes). Tags are made
when a chunk is written, right after its bytes matched its name, so a good tag vouches for bytes
that were the chunk's. A block whose tag fails means a corrupted file: it is removed and the
chunk fetched again. The key is ``<cache>/key`` (32 random bytes, mode 0600, made once and
shared by every process using the cache): without it no one can write a block and a tag that
pass. A whole chunk read from the cache is still checked against its name, tags or not.
"""

from __future__ import annotations

import contextlib
import hmac
import os

import blake3

BLOCK = 64 << 10
"""Bytes per tag: the shipped fault-around block, so a demand fault reads and checks one block."""
TAG = 32
KEY_BYTES = 32


def trailer_len(plain_len: int) -> int:
    """Bytes of tags after a chunk of ``plain_len`` bytes."""
    return -(-plain_len // BLOCK) * TAG


def load_key(cache_dir: str) -> bytes:
    """The cache's key, made on first use. Two processes that make it at once agree: the key
    appears by ``link`` of a complete file, and the loser reads the winner's."""
    path = os.path.join(cache_dir, "key")
    with contextlib.suppress(FileNotFoundError):
        return _read_key(path)
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, os.urandom(KEY_BYTES))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
    return _read_key(path)


def _read_key(path: str) -> bytes:
    with open(path, "rb") as f:
        key = f.read(KEY_BYTES + 1)
    if len(key) != KEY_BYTES:
        raise OSError(f"{path}: a cache key is {KEY_BYTES} bytes, this file holds {len(key)}; remove it "
                      f"(the cache's files are then checked whole until they are written again)")
    return key


def tag(key: bytes, name: str, index: int, block: memoryview | bytes) -> bytes:
    h = blake3.blake3(key=key)
    h.update(bytes.fromhex(name))
    h.update(index.to_bytes(8, "little"))
    h.update(block)
    return h.digest()


def make_tags(key: bytes, name: str, plain: memoryview) -> bytes:
    """The trailer of chunk ``name``: one tag per block."""
    return b"".join(tag(key, name, i, plain[at : at + BLOCK]) for i, at in enumerate(range(0, len(plain), BLOCK)))


def blocks_ok(key: bytes, name: str, first: int, blocks: memoryview, tags: bytes | bytearray) -> bool:
    """Whether ``blocks`` (blocks ``first``... of chunk ``name``, the last possibly short) match ``tags``."""
    for k, at in enumerate(range(0, len(blocks), BLOCK)):
        if not hmac.compare_digest(tag(key, name, first + k, blocks[at : at + BLOCK]), tags[k * TAG : (k + 1) * TAG]):
            return False
    return True
