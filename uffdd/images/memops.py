"""Filling pre-paging buffers fast: pages allocated in one call, copies without the GIL.

A fresh buffer costs a page fault per page as it is first written (about 3 us each inside
preadv, measured: 200 us for a 256 KiB read into fresh memory, 35 us into allocated memory).
MADV_POPULATE_WRITE allocates them all in one call. ctypes.memmove and memset release the GIL,
so a worker thread copies while the event loop serves faults.
"""

from __future__ import annotations

import ctypes
import mmap

from uffdd.kernel.memory import MADV_POPULATE_WRITE

_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_PAGE = mmap.PAGESIZE

Part = tuple[int, "bytes | bytearray | None", int, int]
"""(offset in dest, plain bytes or None for zeros, offset in plain, length)."""


def populate(dest: memoryview) -> None:
    """Allocate the pages under ``dest`` in one call; best effort (kernels before 5.14 fault)."""
    if len(dest) < 4 * _PAGE:
        return
    anchor = ctypes.c_char.from_buffer(dest)
    try:
        addr = ctypes.addressof(anchor)
        start = -(-addr // _PAGE) * _PAGE
        end = (addr + len(dest)) // _PAGE * _PAGE
        if end > start:
            _libc.madvise(start, end - start, MADV_POPULATE_WRITE)
    finally:
        del anchor


def copy_into(dest: memoryview, parts: list[Part]) -> None:
    """Copy each part into ``dest`` (zeros where plain is None) with memmove/memset."""
    if not parts:
        return
    anchor = ctypes.c_char.from_buffer(dest)
    try:
        base = ctypes.addressof(anchor)
        for at, plain, within, n in parts:
            if plain is None:
                ctypes.memset(base + at, 0, n)
            elif isinstance(plain, bytes):
                src_addr = ctypes.cast(ctypes.c_char_p(plain), ctypes.c_void_p).value or 0
                ctypes.memmove(base + at, src_addr + within, n)
            else:
                src = ctypes.c_char.from_buffer(plain)
                ctypes.memmove(base + at, ctypes.addressof(src) + within, n)
                del src
    finally:
        del anchor
