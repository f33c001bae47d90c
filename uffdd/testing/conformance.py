"""What every page source must do, as one check any source kind can be put through.

Like trio's stream conformance tests: a plugin author writes a fixture that opens their source
over known bytes and awaits :func:`check_page_source`. It raises AssertionError naming the first
rule broken. The rules are the ones the daemon relies on (uffdd/sources/base.py):

- ``fill`` writes exactly the source's bytes, all of them, for a page, a fault-around block and a
  pre-paging run, at the start, the middle and the end of the source, concurrently too;
- a range past the end is refused with SourceError, never answered with zeros;
- ``prefetch`` delivers the same bytes as ``fill``;
- ``fill_nowait`` either declines (False) or delivers the exact bytes;
- ``inline_read`` and ``backing_fd``, where offered, read the same bytes at the same offsets.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

from uffdd.errors import SourceError
from uffdd.sources.base import PageSource

_GARBAGE = 0xEE


def _slots(size: int, length: int) -> list[int]:
    """Offsets to test a read of ``length`` at: the start, the middle, the very end."""
    if length > size:
        return []
    last = (size - length) // length * length
    return sorted({0, (size // 2) // length * length, last})


async def _filled(fill: Callable[[int, memoryview], object], offset: int, length: int) -> bytes:
    buf = bytearray([_GARBAGE]) * length
    with memoryview(buf) as dest:
        result = fill(offset, dest)
        if asyncio.iscoroutine(result):
            await result
    return bytes(buf)


async def check_page_source(source: PageSource, expected: bytes, *, page_size: int = 4096) -> None:
    """Put ``source`` (open over exactly ``expected``) through the rules above."""
    size = len(expected)
    assert source.size in (None, size), f"size is {source.size}, the source holds {size} bytes"
    assert isinstance(source.describe(), str) and source.describe(), "describe() must name the source"
    for length in (page_size, 16 * page_size, 1 << 20):
        for off in _slots(size, length):
            got = await _filled(source.fill, off, length)
            assert got == expected[off : off + length], f"fill({off:#x}, {length}) delivered other bytes"
            got = await _filled(source.prefetch, off, length)
            assert got == expected[off : off + length], f"prefetch({off:#x}, {length}) delivered other bytes"
    await _check_concurrent(source, expected, page_size)
    await _check_past_the_end(source, size, page_size)
    _check_nowait(source, expected, page_size)
    _check_fds(source, expected, page_size)


async def _check_concurrent(source: PageSource, expected: bytes, page_size: int) -> None:
    pages = len(expected) // page_size
    picks = [(i * 7919) % pages for i in range(min(pages, 64))]
    results = await asyncio.gather(*(_filled(source.fill, p * page_size, page_size) for p in picks))
    for p, got in zip(picks, results, strict=True):
        assert got == expected[p * page_size : (p + 1) * page_size], f"concurrent fill of page {p} went wrong"


async def _check_past_the_end(source: PageSource, size: int, page_size: int) -> None:
    if source.size is None:
        return
    try:
        await asyncio.wait_for(_filled(source.fill, size, page_size), 30)
    except SourceError:
        return
    except TimeoutError:
        raise AssertionError("fill past the end neither failed nor returned within 30 s") from None
    raise AssertionError(f"fill at {size:#x}, past the end, returned instead of raising SourceError")


def _check_nowait(source: PageSource, expected: bytes, page_size: int) -> None:
    for off in _slots(len(expected), page_size):
        buf = bytearray(page_size)
        with memoryview(buf) as dest:
            served = source.fill_nowait(off, dest)
        assert served in (True, False), "fill_nowait must return a bool"
        if served:
            assert bytes(buf) == expected[off : off + page_size], f"fill_nowait({off:#x}) delivered other bytes"


def _check_fds(source: PageSource, expected: bytes, page_size: int) -> None:
    inline = source.inline_read()
    if inline is not None:
        fd, flags = inline
        for off in _slots(len(expected), page_size):
            buf = bytearray(page_size)
            try:
                n = os.preadv(fd, [buf], off, flags)
            except BlockingIOError:
                continue  # "would block" is an allowed answer
            assert n < page_size or bytes(buf) == expected[off : off + page_size], \
                f"inline_read's preadv2 at {off:#x} read other bytes"
    backing = source.backing_fd()
    if backing is not None:
        for off in _slots(len(expected), page_size):
            assert os.pread(backing, page_size, off) == expected[off : off + page_size], \
                f"backing_fd holds other bytes at {off:#x}"


__all__ = ["check_page_source"]
