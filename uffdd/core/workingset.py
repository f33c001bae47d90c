"""Working-set record files: the order in which a guest first faulted its pages.

A restore of the same snapshot reads the file and prefetches exactly those pages first, in that
order, in large reads (REAP, ASPLOS'21). Format, little-endian:

    8s  magic  b"UFFDWS1\\0"
    Q   source size in bytes (a record of another snapshot is stale)
    I   page size
    I   number of entries N
    N*I page numbers (file offset // page size), first fault first
"""

from __future__ import annotations

import array
import os
import struct
import sys

import aiofiles
import aiofiles.os

MAGIC = b"UFFDWS1\0"
HEADER = struct.Struct("<8sQII")
MAX_ENTRIES = 1 << 26


class RecordError(ValueError):
    """The record file is corrupt or belongs to another snapshot."""


def _pages(payload: bytes) -> array.array[int]:
    pages = array.array("I")
    pages.frombytes(payload)
    if sys.byteorder != "little":
        pages.byteswap()
    return pages


def parse(data: bytes, *, source_size: int, page_size: int) -> list[int]:
    """Page numbers from a record file's bytes; raise RecordError saying what is wrong."""
    if len(data) < HEADER.size:
        raise RecordError("too short for a header")
    magic, size, psize, count = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise RecordError("bad magic: not a uffdd working-set record")
    if size != source_size:
        raise RecordError(f"recorded for a source of {size} bytes, this one has {source_size}: stale")
    if psize != page_size:
        raise RecordError(f"recorded with {psize}-byte pages, this guest uses {page_size}")
    if count > MAX_ENTRIES or len(data) != HEADER.size + 4 * count:
        raise RecordError(f"header says {count} entries, file holds {(len(data) - HEADER.size) / 4:g}")
    pages = _pages(data[HEADER.size :])
    limit = source_size // page_size
    if any(p >= limit for p in pages):
        raise RecordError("an entry lies past the end of the source")
    return list(pages)


def encode(pages: list[int], *, source_size: int, page_size: int) -> bytes:
    arr = array.array("I", pages[:MAX_ENTRIES])
    if sys.byteorder != "little":
        arr.byteswap()
    return HEADER.pack(MAGIC, source_size, page_size, len(arr)) + arr.tobytes()


async def load_record(path: str, *, source_size: int, page_size: int) -> list[int]:
    """Read a record file (off the fault path, through aiofiles). Missing file: []."""
    try:
        async with aiofiles.open(path, "rb") as fh:
            data = await fh.read(HEADER.size + 4 * MAX_ENTRIES + 1)
    except FileNotFoundError:
        return []
    return parse(data, source_size=source_size, page_size=page_size)


async def save_record(path: str, pages: list[int], *, source_size: int, page_size: int) -> None:
    """Write atomically: a reader never sees half a record."""
    tmp = f"{path}.tmp.{os.getpid()}"
    async with aiofiles.open(tmp, "wb") as fh:
        await fh.write(encode(pages, source_size=source_size, page_size=page_size))
    await aiofiles.os.replace(tmp, path)


def record_runs(pages: list[int]) -> list[tuple[int, int]]:
    """Merge consecutive page numbers into (first, count) runs, keeping first-appearance order."""
    out: list[tuple[int, int]] = []
    seen: set[int] = set()
    for p in pages:
        if p in seen:
            continue
        seen.add(p)
        if out and out[-1][0] + out[-1][1] == p:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((p, 1))
    return out


__all__ = ["HEADER", "MAGIC", "MAX_ENTRIES", "RecordError", "encode", "load_record", "parse",
           "record_runs", "save_record"]
