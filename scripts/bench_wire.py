#!/usr/bin/env python3
"""The peer protocol's block checksums and frame tags: uffdd.peer._wire (the C of
uffdd/csrc/wire.h, which the C fast paths use) against the Python packages the protocol uses
today (crc32c, cryptography), on 4 KiB and 256 KiB, measured in the same run.

Each round times every case on both sides in turn (which side goes first alternates); a case's
speed is its median over the rounds. One core, the calls as Python makes them (the C path's
figure includes the call into the extension).

    ./scripts/bench_wire.py [--rounds 9] [--min-time 0.02]
"""

from __future__ import annotations

import argparse
import os
import statistics
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import crc32c  # noqa: E402
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305  # noqa: E402
from cryptography.hazmat.primitives.poly1305 import Poly1305  # noqa: E402

from uffdd.peer import _wire  # noqa: E402

BLOCK = 4096
HEADER = 24  # the fixed frame header (uffdd.peer.protocol.frames.HEADER_SIZE)
DESC = 8  # a DATA frame's descriptor per block


@dataclass
class Case:
    name: str
    size: int
    ours: Callable[[], object]
    theirs: Callable[[], object]
    reference: str
    times: dict[str, list[float]] = field(default_factory=lambda: {"ours": [], "theirs": []})


def py_crc32c_blocks(data: bytes) -> bytes:
    """What the Python side does today: one crc32c call per block, packed little endian."""
    crcs = [crc32c.crc32c(data[a : a + BLOCK]) for a in range(0, len(data), BLOCK)]
    return struct.pack(f"<{len(crcs)}I", *crcs)


def cases(size: int) -> list[Case]:
    data = os.urandom(size)
    key, nonce = os.urandom(32), os.urandom(12)
    aead = ChaCha20Poly1305(key)
    header, descs = os.urandom(HEADER), os.urandom(DESC * (size // BLOCK))
    return [
        Case("crc32c", size, lambda: _wire.crc32c(data), lambda: crc32c.crc32c(data), "crc32c.crc32c"),
        Case("crc32c_blocks", size, lambda: _wire.crc32c_blocks(data), lambda: py_crc32c_blocks(data),
             "crc32c per block"),
        Case("poly1305", size, lambda: _wire.poly1305(key, data), lambda: Poly1305.generate_tag(key, data),
             "Poly1305.generate_tag"),
        Case("aead_tag", size, lambda: _wire.aead_tag(key, nonce, data), lambda: aead.encrypt(nonce, b"", data),
             "ChaCha20Poly1305.encrypt"),
        Case("aead_tag, 3 parts", size, lambda: _wire.aead_tag(key, nonce, header, descs, data),
             lambda: aead.encrypt(nonce, b"", b"".join((header, descs, data))), "join + encrypt"),
    ]


def per_call(fn: Callable[[], object], min_time: float) -> float:
    """Seconds per call, from enough calls to last min_time."""
    n = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        took = time.perf_counter() - t0
        if took >= min_time:
            return took / n
        n *= 2 if took < min_time / 8 else 1 + int(min_time / max(took, 1e-9))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--min-time", type=float, default=0.02, help="seconds per timing (default 0.02)")
    args = ap.parse_args()
    print(f"uffdd.peer._wire crc32c path: {_wire.CRC32C_IMPL}; crc32c {crc32c.__version__}"
          f" (hardware: {bool(crc32c.hardware_based)}); rounds: {args.rounds}")
    todo = cases(4096) + cases(256 << 10)
    for r in range(args.rounds):
        for case in todo:
            sides = ("ours", "theirs") if r % 2 == 0 else ("theirs", "ours")
            for side in sides:
                case.times[side].append(per_call(case.ours if side == "ours" else case.theirs, args.min_time))
    print(f"{'':18} {'size':>7} {'C MB/s':>9} {'C us':>8} {'ref MB/s':>9} {'ref us':>8} {'C/ref':>6}  reference")
    for case in todo:
        ours, theirs = statistics.median(case.times["ours"]), statistics.median(case.times["theirs"])
        print(f"{case.name:18} {case.size // 1024:>5}Ki {case.size / ours / 1e6:9.0f} {ours * 1e6:8.2f}"
              f" {case.size / theirs / 1e6:9.0f} {theirs * 1e6:8.2f} {theirs / ours:6.2f}  {case.reference}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
