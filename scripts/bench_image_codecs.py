#!/usr/bin/env python3
"""Hashes and codecs for image chunks, on the chunks of guest-like memory (uffdd.testing.guestmem).

Prints, for the non-zero chunks of one chunk size: the speed of each candidate content hash,
and for each codec the bytes stored (as a share of the memory) and the compression and
decompression speeds (one core, best of 3 passes).

    ./scripts/bench_image_codecs.py [--size 256M] [--chunk-size 256K]
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import blake3  # noqa: E402
import lz4.block  # type: ignore[import-untyped]  # noqa: E402
import zstandard  # noqa: E402

from uffdd.cli import parse_size  # noqa: E402
from uffdd.testing.guestmem import make_guest_image  # noqa: E402


def best_of(fn: Callable[[Any], Any], items: list[Any], passes: int = 3) -> float:
    best = float("inf")
    for _ in range(passes):
        t0 = time.perf_counter()
        for x in items:
            fn(x)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=parse_size, default=256 << 20)
    ap.add_argument("--chunk-size", type=parse_size, default=256 << 10)
    args = ap.parse_args()
    cs = args.chunk_size
    with tempfile.TemporaryDirectory(prefix="uffdd-bench-codecs-", dir="/var/tmp") as tmp:
        path = Path(tmp) / "guest.mem"
        make_guest_image(path, args.size, seed=1)
        data = path.read_bytes()
    zero = bytes(cs)
    chunks = [data[o : o + cs] for o in range(0, len(data), cs) if data[o : o + cs] != zero]
    plain = sum(map(len, chunks))
    print(f"{len(chunks)} non-zero chunks of {cs >> 10} KiB ({plain / len(data):.1%} of {len(data) >> 20} MiB "
          "of guest-like memory), one core")
    hashes: dict[str, Callable[[bytes], Any]] = {
        "blake3": lambda x: blake3.blake3(x).digest(),
        "sha256": lambda x: hashlib.sha256(x).digest(),
        "blake2b": lambda x: hashlib.blake2b(x, digest_size=32).digest(),
    }
    try:
        import xxhash

        hashes["xxh3-128 (not collision resistant)"] = xxhash.xxh3_128_digest
    except ImportError:
        pass
    for name, fn in hashes.items():
        print(f"  hash {name:<36} {plain / best_of(fn, chunks) / 1e9:6.2f} GB/s")
    codecs: dict[str, tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]] = {
        "zstd level 1": (zstandard.ZstdCompressor(level=1).compress, zstandard.ZstdDecompressor().decompress),
        "zstd level 3": (zstandard.ZstdCompressor(level=3).compress, zstandard.ZstdDecompressor().decompress),
        "zstd level 9": (zstandard.ZstdCompressor(level=9).compress, zstandard.ZstdDecompressor().decompress),
        "lz4": (lambda x: lz4.block.compress(x, store_size=False),
                lambda y: lz4.block.decompress(y, uncompressed_size=cs)),
    }
    for name, (comp, dec) in codecs.items():
        t0 = time.perf_counter()
        packed = [comp(x) for x in chunks]
        tc = time.perf_counter() - t0
        stored = sum(map(len, packed))
        print(f"  {name:<13} stores {stored / len(data):6.1%} of the memory   compresses {plain / tc / 1e9:5.2f} GB/s"
              f"   decompresses {plain / best_of(dec, packed) / 1e9:5.2f} GB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
