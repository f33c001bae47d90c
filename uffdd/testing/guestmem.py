"""Memory images shaped like a guest's: zero pages, duplicated pages, text, random bytes.

Real guest memory is not random bytes: much of it was never written (zeros, often in long
runs), some pages are copies of others (shared libraries, page cache), much compresses well
(text, code, heap) and some does not (encrypted or compressed data). Packed images, their
caches and their benchmarks mean something only on memory like that.

Every text and random page starts with a stamp (its page index and the seed), as in
:mod:`uffdd.testing.snapshot`, so a page served at the wrong offset never matches; duplicated
pages carry none (a stamp would make them differ) and zero pages are zero.
"""

from __future__ import annotations

import os
import random
import struct
from dataclasses import dataclass

BLOCK = 16 << 20


@dataclass(frozen=True)
class GuestMix:
    """Shares of the image's bytes by kind, and how long their runs are (in pages)."""

    zero: float = 0.45
    duplicate: float = 0.10
    text: float = 0.30
    random: float = 0.15
    zero_run: tuple[int, int] = (16, 1024)
    duplicate_run: tuple[int, int] = (1, 64)
    text_run: tuple[int, int] = (4, 256)
    random_run: tuple[int, int] = (4, 128)


def _corpus(rng: random.Random, size: int = 1 << 20) -> bytes:
    """Text-like bytes: words from a fixed vocabulary, with spaces, newlines and numbers."""
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    weights = [12, 9, 8, 8, 7, 7, 6, 6, 6, 4, 4, 3, 3, 2, 2, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1]
    vocab = ["".join(rng.choices(letters, weights, k=rng.randint(2, 10))) for _ in range(3000)]
    out: list[str] = []
    n = 0
    while n < size:
        line = " ".join(rng.choices(vocab, k=rng.randint(4, 14)))
        if rng.random() < 0.2:
            line += f" {rng.randint(0, 1 << 32):#x}"
        out.append(line)
        n += len(line) + 1
    return "\n".join(out).encode()[:size]


class _Generator:
    """Walks the image in runs of one kind; see :func:`make_guest_image`."""

    def __init__(self, seed: int, page_size: int, mix: GuestMix) -> None:
        self.rng = random.Random(seed)
        self.seed = seed
        self.ps = page_size
        self.mix = mix
        self.corpus = _corpus(self.rng, max(1 << 20, 4 * page_size))
        pool_rng = random.Random(seed ^ 0x5EED)
        self.pool = [pool_rng.randbytes(page_size // 2) + bytes(page_size // 2) if k % 2 else
                     self.corpus[k * 97 : k * 97 + page_size] for k in range(128)]
        """Pages that occur many times (half random, half text); never stamped."""
        kinds = {"zero": (mix.zero, mix.zero_run), "duplicate": (mix.duplicate, mix.duplicate_run),
                 "text": (mix.text, mix.text_run), "random": (mix.random, mix.random_run)}
        # Pick a run's kind with odds that give each kind its share of the bytes.
        self.kinds = [k for k, (share, _) in kinds.items() if share > 0]
        self.weights = [kinds[k][0] / (sum(kinds[k][1]) / 2) for k in self.kinds]
        self.runs = {k: kinds[k][1] for k in self.kinds}
        self.kind = "zero"
        self.left = 0

    def fill(self, buf: bytearray, first_page: int) -> None:
        ps = self.ps
        npages = len(buf) // ps
        p = 0
        while p < npages:
            if self.left == 0:
                self.kind = self.rng.choices(self.kinds, self.weights)[0]
                lo, hi = self.runs[self.kind]
                self.left = self.rng.randint(lo, hi)
            n = min(self.left, npages - p)
            self._run(buf, p, n, first_page)
            p += n
            self.left -= n

    def _run(self, buf: bytearray, p: int, n: int, first_page: int) -> None:
        ps, rng, kind = self.ps, self.rng, self.kind
        off, end = p * ps, (p + n) * ps
        if kind == "zero":
            buf[off:end] = bytes(end - off)
            return
        if kind == "duplicate":
            for k in range(n):
                buf[off + k * ps : off + (k + 1) * ps] = self.pool[rng.randrange(len(self.pool))]
            return
        if kind == "random":
            buf[off:end] = rng.randbytes(end - off)
        else:
            for k in range(n):
                at = rng.randrange(len(self.corpus) - ps)
                buf[off + k * ps : off + (k + 1) * ps] = self.corpus[at : at + ps]
        for k in range(n):
            struct.pack_into("<QQ", buf, off + k * ps, first_page + p + k, self.seed)


def make_guest_image(path: str | os.PathLike[str], size: int, *, seed: int = 0, page_size: int = 4096,
                     mix: GuestMix | None = None) -> None:
    """Write ``size`` bytes of guest-like memory (see the module docstring and :class:`GuestMix`)."""
    gen = _Generator(seed, page_size, mix or GuestMix())
    with open(path, "wb") as fh:
        done = 0
        while done < size:
            n = min(BLOCK, size - done)
            buf = bytearray(n)
            gen.fill(buf, done // page_size)
            assert len(buf) == n, "a run changed the buffer's length"
            fh.write(buf)
            done += n


def change_pages(src: str | os.PathLike[str], dst: str | os.PathLike[str], fraction: float, *, seed: int = 1,
                 page_size: int = 4096, run: tuple[int, int] = (16, 256)) -> int:
    """Copy ``src`` to ``dst`` with ``fraction`` of its pages rewritten; return how many.

    A running guest dirties memory in runs (a heap grows, a file is read into the page cache),
    so the changes come in runs of ``run`` pages at random places. Each changed page gets new
    text-like bytes and a stamp that differs from the original's (the seed).
    """
    size = os.path.getsize(src)
    npages = size // page_size
    rng = random.Random(seed)
    corpus = _corpus(rng, max(1 << 20, 4 * page_size))
    want = int(npages * fraction)
    changed: set[int] = set()
    while len(changed) < want:
        n = min(rng.randint(*run), want - len(changed))
        start = rng.randrange(max(1, npages - n))
        changed.update(range(start, start + n))
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        done = 0
        while done < size:
            buf = bytearray(fin.read(BLOCK))
            first = done // page_size
            for k in range(len(buf) // page_size):
                if first + k in changed:
                    at = rng.randrange(len(corpus) - page_size)
                    buf[k * page_size : (k + 1) * page_size] = corpus[at : at + page_size]
                    struct.pack_into("<QQ", buf, k * page_size, first + k, seed | 1 << 63)
            fout.write(buf)
            done += len(buf)
    return len(changed)
