"""Snapshot images with content that makes any misplaced or zeroed page detectable."""

from __future__ import annotations

import os
import random
import struct

CHUNK = 16 << 20


def make_snapshot(path: str | os.PathLike[str], size: int, *, seed: int = 0, page_size: int = 4096) -> None:
    """Write ``size`` bytes: random data, each page stamped with its own index, every 61st page zero.

    The stamp means a page served at the wrong offset never matches; the zero pages make sure
    a handler that hands out zeros is caught only where zeros are wrong.
    """
    rng = random.Random(seed)
    with open(path, "wb") as fh:
        done = 0
        while done < size:
            n = min(CHUNK, size - done)
            buf = bytearray(rng.randbytes(n))
            for off in range(0, n, page_size):
                page = (done + off) // page_size
                if page % 61 == 60:
                    buf[off : off + page_size] = bytes(min(page_size, n - off))
                else:
                    struct.pack_into("<QQ", buf, off, page, seed)
            fh.write(buf)
            done += n
