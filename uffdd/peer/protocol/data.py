"""DATA frames as the server builds them: per-block crc32c, zero blocks as a flag, lz4 where it pays."""

from __future__ import annotations

import importlib
from array import array
from dataclasses import dataclass
from types import ModuleType

import lz4.block  # type: ignore[import-untyped]
from crc32c import crc32c

from uffdd.peer.protocol.frames import (
    BLOCK_SHIFT,
    BLOCK_SIZE,
    LITTLE_ENDIAN,
    RAW_HI,
    ZERO_BLOCK,
    ZERO_CRC,
    Encoding,
    FrameType,
    Piece,
    Tagger,
    frame_pieces,
    u64_table,
)

try:
    _wire: ModuleType | None = importlib.import_module("uffdd.peer._wire")
except ImportError:  # built without a C compiler
    _wire = None

LZ4_WORTH_IT = BLOCK_SIZE - BLOCK_SIZE // 8
"""A compressed block is sent only if it saves at least an eighth of the block."""


class Compressor:
    """Decides per block whether lz4 pays off. After 8 incompressible blocks in a row it only
    probes one block per frame until one compresses again, so random memory costs ~nothing."""

    __slots__ = ("enabled", "misses")

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.misses = 0

    @property
    def probing(self) -> bool:
        return self.misses >= 8

    def try_compress(self, block: memoryview) -> bytes | None:
        if not self.enabled:
            return None
        out: bytes = lz4.block.compress(block, store_size=False)
        if len(out) <= LZ4_WORTH_IT:
            self.misses = 0
            return out
        self.misses += 1
        return None


@dataclass(slots=True)
class BlockCounts:
    raw: int = 0
    zero: int = 0
    lz4: int = 0
    payload_bytes: int = 0



def block_crcs(data: memoryview) -> list[int]:
    """The crc32c of each 4 KiB block of ``data``."""
    if _wire is not None:
        raw = array("I")
        raw.frombytes(_wire.crc32c_blocks(data))
        if not LITTLE_ENDIAN:
            raw.byteswap()
        return raw.tolist()
    return [crc32c(data[a : a + BLOCK_SIZE]) for a in range(0, len(data), BLOCK_SIZE)]


def encode_data(req_id: int, offset: int, data: memoryview, compressor: Compressor,
                counts: BlockCounts | None = None, sealer: Tagger | None = None) -> list[Piece]:
    """One DATA frame for ``data`` (whole blocks read at ``offset``): header, table, the payload
    pieces and, with a ``sealer``, the tag. Raw runs are slices of ``data`` (no copy); zero
    blocks carry no payload."""
    n = len(data) >> BLOCK_SHIFT
    crcs = block_crcs(data)
    if compressor.enabled and compressor.probing:
        compressor.try_compress(data[:BLOCK_SIZE])  # one probe per frame; a hit ends the probing
    compress = compressor.enabled and not compressor.probing
    if ZERO_CRC not in crcs and not compress:
        # The common case for random memory: every block raw, one contiguous payload.
        table = u64_table([c | RAW_HI for c in crcs])
        if counts is not None:
            counts.raw += n
            counts.payload_bytes += n << BLOCK_SHIFT
        return frame_pieces(FrameType.DATA, [table, data], id=req_id, offset=offset, count=n, sealer=sealer)
    descs: list[int] = []
    pieces: list[Piece] = []
    run_start = -1
    payload = 0
    nraw = nzero = nlz4 = 0
    for i, c in enumerate(crcs):
        a = i << BLOCK_SHIFT
        blk = data[a : a + BLOCK_SIZE]
        comp = None
        if c == ZERO_CRC and blk.tobytes() == ZERO_BLOCK:
            enc, stored = Encoding.ZERO, 0
            nzero += 1
        else:
            if compress and not compressor.probing:
                comp = compressor.try_compress(blk)
            if comp is None:
                if run_start < 0:
                    run_start = a
                descs.append(c | RAW_HI)
                payload += BLOCK_SIZE
                nraw += 1
                continue
            enc, stored = Encoding.LZ4, len(comp)
            nlz4 += 1
        if run_start >= 0:
            pieces.append(data[run_start:a])
            run_start = -1
        if comp is not None:
            pieces.append(comp)
        descs.append(c | (stored | enc << 16) << 32)
        payload += stored
    if run_start >= 0:
        pieces.append(data[run_start:])
    table = u64_table(descs)
    if counts is not None:
        counts.raw += nraw
        counts.zero += nzero
        counts.lz4 += nlz4
        counts.payload_bytes += payload
    return frame_pieces(FrameType.DATA, [table, *pieces], id=req_id, offset=offset, count=n, sealer=sealer)

