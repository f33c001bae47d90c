"""The packed image format, version 1: a JSON manifest and content-addressed chunk objects.

Everything read from a store is untrusted: :func:`parse_manifest` checks every field and its
limits, and :func:`open_chunk` decompresses into a bounded buffer and checks the content hash
before anyone sees a byte. docs/image-format.md describes the format field by field.
"""

from __future__ import annotations

import json
import re
import struct
import threading
from dataclasses import dataclass
from typing import Any

import blake3
import lz4.block  # type: ignore[import-untyped]
import zstandard

FORMAT = "uffdd-image"
VERSION = 1
HASH = "blake3"
CHUNKS_DIR = "chunks"
MAX_MANIFEST_BYTES = 64 << 20
MAX_IMAGE_BYTES = 1 << 46
MIN_CHUNK, MAX_CHUNK = 4096, 16 << 20
PAGE_SIZES = (4096, 2 << 20)
DEFAULT_CHUNK = 256 << 10

MAGIC = b"UFC1"
HEADER = struct.Struct("<4sB3xI")
"""Chunk object header: magic, codec, 3 reserved zero bytes, plain length (little-endian)."""
CODECS = {"none": 0, "zstd": 1, "lz4": 2}
CODEC_NAMES = {v: k for k, v in CODECS.items()}
MAX_OVERHEAD = 1024
"""A stored chunk is at most its plain length plus this (header, and a codec's worst case is
never kept: such chunks are stored as "none")."""

_HEX64 = re.compile(r"[0-9a-f]{64}")


class ImageFormatError(ValueError):
    """A manifest or chunk object is malformed, over a limit, or fails its hash."""


def digest(data: Any) -> str:
    """The content hash that names chunks and manifests: BLAKE3-256, lower-case hex."""
    return blake3.blake3(data).hexdigest()


def chunk_key(name: str) -> str:
    """Object key of a chunk under the store's prefix (two-level fan-out for file systems)."""
    return f"{CHUNKS_DIR}/{name[:2]}/{name}"


@dataclass(frozen=True)
class ChunkRef:
    """One non-zero chunk of an image: its content hash and its stored (object) size."""

    name: str
    stored: int


@dataclass(frozen=True)
class Manifest:
    """A parsed, checked manifest; ``table[i]`` is None for a chunk of zeros."""

    size: int
    page_size: int
    chunk_size: int
    table: tuple[ChunkRef | None, ...]
    parent: str | None = None
    parent_digest: str | None = None
    created: str = ""

    def chunk_len(self, index: int) -> int:
        """Plain bytes of chunk ``index`` (the last one may be short)."""
        return min(self.chunk_size, self.size - index * self.chunk_size)

    @property
    def stored_bytes(self) -> int:
        """Bytes of all distinct chunk objects the image refers to."""
        return sum(r.stored for r in {r.name: r for r in self.table if r is not None}.values())

    def to_json(self) -> bytes:
        doc = {
            "format": FORMAT, "version": VERSION, "hash": HASH,
            "size": self.size, "page_size": self.page_size, "chunk_size": self.chunk_size,
            "parent": None if self.parent is None else {"url": self.parent, "digest": self.parent_digest},
            "created": self.created,
            "stored_bytes": self.stored_bytes,
            "table": [None if r is None else [r.name, r.stored] for r in self.table],
        }
        return json.dumps(doc, separators=(",", ":")).encode()


def _int(doc: dict[str, Any], key: str, lo: int, hi: int) -> int:
    v = doc.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise ImageFormatError(f"manifest: {key}: expected an integer in [{lo}, {hi}], got {v!r}")
    return v


def parse_manifest(raw: bytes) -> Manifest:
    """Check an untrusted manifest: format, version, limits, and every table entry."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ImageFormatError(f"manifest: {len(raw)} bytes, over the limit of {MAX_MANIFEST_BYTES}")
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ImageFormatError(f"manifest: not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ImageFormatError(f"manifest: format: not a {FORMAT} manifest")
    if doc.get("version") != VERSION:
        raise ImageFormatError(f"manifest: version {doc.get('version')!r} is not supported (this is {VERSION})")
    if doc.get("hash") != HASH:
        raise ImageFormatError(f"manifest: hash {doc.get('hash')!r} is not supported (expected {HASH!r})")
    page_size = _int(doc, "page_size", 4096, 2 << 20)
    if page_size not in PAGE_SIZES:
        raise ImageFormatError(f"manifest: page_size: {page_size} is not one of {PAGE_SIZES}")
    size = _int(doc, "size", page_size, MAX_IMAGE_BYTES)
    if size % page_size:
        raise ImageFormatError(f"manifest: size: {size} is not a multiple of page_size {page_size}")
    chunk_size = _int(doc, "chunk_size", MIN_CHUNK, MAX_CHUNK)
    if chunk_size & (chunk_size - 1):
        raise ImageFormatError(f"manifest: chunk_size: {chunk_size} is not a power of two")
    table_doc = doc.get("table")
    count = -(-size // chunk_size)
    if not isinstance(table_doc, list) or len(table_doc) != count:
        got = len(table_doc) if isinstance(table_doc, list) else type(table_doc).__name__
        raise ImageFormatError(f"manifest: table: expected {count} entries (size / chunk_size), got {got}")
    table: list[ChunkRef | None] = []
    for i, entry in enumerate(table_doc):
        if entry is None:
            table.append(None)
            continue
        plain = min(chunk_size, size - i * chunk_size)
        if (not isinstance(entry, list) or len(entry) != 2 or not isinstance(entry[0], str)
                or not _HEX64.fullmatch(entry[0]) or not isinstance(entry[1], int) or isinstance(entry[1], bool)
                or not HEADER.size <= entry[1] <= plain + MAX_OVERHEAD):
            raise ImageFormatError(f"manifest: table[{i}]: expected null or [64 hex digits, stored size "
                                   f"<= {plain + MAX_OVERHEAD}], got {str(entry)[:120]}")
        table.append(ChunkRef(entry[0], entry[1]))
    parent = doc.get("parent")
    p_url = p_digest = None
    if parent is not None:
        if (not isinstance(parent, dict) or not isinstance(parent.get("url"), str)
                or not isinstance(parent.get("digest"), str) or not _HEX64.fullmatch(parent["digest"])):
            raise ImageFormatError("manifest: parent: expected null or {url: string, digest: 64 hex digits}")
        p_url, p_digest = parent["url"], parent["digest"]
    created = doc.get("created", "")
    return Manifest(size=size, page_size=page_size, chunk_size=chunk_size, table=tuple(table),
                    parent=p_url, parent_digest=p_digest, created=created if isinstance(created, str) else "")


_local = threading.local()


def _decompressor() -> zstandard.ZstdDecompressor:
    """One per thread: zstandard's objects are not thread-safe."""
    d: zstandard.ZstdDecompressor | None = getattr(_local, "d", None)
    if d is None:
        d = _local.d = zstandard.ZstdDecompressor()
    return d


def seal_chunk(plain: Any, codec: str, level: int = 3) -> bytes:
    """The object for one chunk: header + payload; stored plain when compressing saves < 1/32."""
    n = len(plain)
    body: Any
    code = CODECS[codec]
    if code == CODECS["zstd"]:
        c = getattr(_local, "c", None)
        if c is None or getattr(_local, "level", None) != level:
            c = _local.c = zstandard.ZstdCompressor(level=level)
            _local.level = level
        body = c.compress(plain)
    elif code == CODECS["lz4"]:
        body = lz4.block.compress(plain, store_size=False)
    else:
        body = plain
    if code and len(body) > n - (n >> 5):
        code, body = CODECS["none"], plain
    return HEADER.pack(MAGIC, code, n) + bytes(body)


def unseal(blob: Any, name: str, plain_len: int) -> bytes:
    """Decompress one untrusted chunk object into at most ``plain_len`` bytes (what the
    manifest says this chunk holds), so a decompression bomb costs nothing; a wrong header or
    length raises ImageFormatError. The content is not checked yet: see :func:`open_chunk`."""
    mv = memoryview(blob)
    if len(mv) < HEADER.size or len(mv) > plain_len + MAX_OVERHEAD:
        raise ImageFormatError(f"chunk {name}: {len(mv)} bytes stored for {plain_len} plain: not a chunk object")
    magic, code, n = HEADER.unpack_from(mv)
    if magic != MAGIC or n != plain_len or code not in CODEC_NAMES:
        raise ImageFormatError(f"chunk {name}: bad header (magic {bytes(magic)!r}, codec {code}, length {n}; "
                               f"expected {MAGIC!r}, length {plain_len})")
    body = mv[HEADER.size :]
    try:
        if code == CODECS["zstd"]:
            if zstandard.frame_content_size(body) != n:
                raise ImageFormatError(f"chunk {name}: zstd frame does not declare {n} bytes")
            plain = _decompressor().decompress(body, max_output_size=n)
        elif code == CODECS["lz4"]:
            plain = lz4.block.decompress(body, uncompressed_size=n)
        else:
            plain = bytes(body)
    except (zstandard.ZstdError, lz4.block.LZ4BlockError) as exc:
        raise ImageFormatError(f"chunk {name}: does not decompress: {exc}") from None
    if len(plain) != n:
        raise ImageFormatError(f"chunk {name}: decompressed to {len(plain)} bytes, expected {n}")
    return plain


def open_chunk(blob: Any, name: str, plain_len: int) -> bytes:
    """The plain bytes of an untrusted chunk object, if and only if they are exactly the
    chunk ``name`` (:func:`unseal`, then the content hash); ImageFormatError otherwise."""
    plain = unseal(blob, name, plain_len)
    got = digest(plain)
    if got != name:
        raise ImageFormatError(f"chunk {name}: content hash is {got}: corrupted")
    return plain
