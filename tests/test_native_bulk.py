"""The bulk link in C (uffdd/peer/_bulk.c) against a server played by the test over a real socket,
writing into a real memory file: frames land in the pages they froze and nowhere else, a page a
fault took is never written, a frame that fails its checks is never reported in place, a forged
frame ends the connection, a memory file that shrank ends the request, not the process."""

from __future__ import annotations

import contextlib
import mmap
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from uffdd.peer import protocol as p
from uffdd.peer.native import module
from uffdd.testing.waiting import wait_until

native: Any = module
pytestmark = pytest.mark.skipif(native is None, reason="uffdd.peer._native is not built")

BS = p.BLOCK_SIZE
PAGES = 256
TAKEN, FROZEN = 1, 2


@dataclass
class Rig:
    """The link's thread on one end of a socket pair, the test as the server on the other."""

    bulk: Any
    server: socket.socket
    memfd: int
    mem: mmap.mmap
    claims: bytearray = field(default_factory=lambda: bytearray(PAGES))
    image: bytes = field(default_factory=lambda: os.urandom(PAGES * BS))
    result: list[str | None] = field(default_factory=list)
    thread: threading.Thread | None = None
    sealer: p.Sealer | None = None
    opener: p.Opener | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=lambda: self.result.append(self.bulk.run()), daemon=True)
        self.thread.start()

    def next_frame(self) -> tuple[p.FrameType, int, int, int]:
        """(type, id, offset, count) of the next frame the link sends; PINGs are answered."""
        hdr = self._recv(p.HEADER_SIZE)
        t, _, count, rid, offset, length, _ = p.HEADER.unpack(hdr)
        body = self._recv(length)
        if self.opener is not None:
            assert self.opener.check(body[-p.TAG_SIZE :], hdr, body[: -p.TAG_SIZE]), "the link's tag is wrong"
        if t == p.FrameType.PING:
            self.server.sendall(p.encode_frame(p.FrameType.PONG, id=rid, sealer=self.sealer))
        return p.FrameType(t), rid, offset, count

    def read_request(self) -> tuple[int, int, int]:
        """(id, offset, count) of the next READ the link sends (PINGs are answered on the way)."""
        while True:
            t, rid, offset, count = self.next_frame()
            if t is p.FrameType.READ:
                return rid, offset, count

    def answer(self, rid: int, offset: int, count: int, *, corrupt: int | None = None) -> None:
        data = bytearray(self.image[offset : offset + count * BS])
        pieces = p.encode_data(rid, offset, memoryview(data), p.Compressor(False), None, self.sealer)
        frame = bytearray(b"".join(bytes(x) for x in pieces))
        if corrupt is not None:
            frame[p.HEADER_SIZE + count * p.DESC_SIZE + corrupt] ^= 0x40
        self.server.sendall(frame)

    def _recv(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            got = self.server.recv(n - len(out))
            assert got, "the link closed the connection"
            out += got
        return out

    def records(self, until_kind: int) -> list[tuple[int, int, int, int, int]]:
        seen: list[tuple[int, int, int, int, int]] = []

        def done() -> bool:
            seen.extend(self.bulk.drain())
            return any(r[0] == until_kind for r in seen)

        wait_until(done, timeout=10, what="the link's report")
        return seen

    def page(self, i: int) -> bytes:
        return bytes(self.mem[i * BS : (i + 1) * BS])


@pytest.fixture
def rig(request: pytest.FixtureRequest) -> Iterator[Rig]:
    keyed = getattr(request, "param", False)
    assert native is not None
    a, b = socket.socketpair()
    memfd = os.memfd_create("guest")
    os.ftruncate(memfd, PAGES * BS)
    mem = mmap.mmap(memfd, PAGES * BS)
    mem[:] = b"\xee" * (PAGES * BS)  # what the guest memory held before: never a wrong byte, only this or right
    bulk = native.Bulk()
    keys = (os.urandom(32), os.urandom(32)) if keyed else (None, None)
    fd = os.dup(a.fileno())
    a.close()
    os.set_blocking(fd, False)
    bulk.attach(fd, keys[0], keys[1], 0, 0, 64, 8, 0.2, 5.0)
    r = Rig(bulk, b, memfd, mem)
    if keyed:
        assert keys[0] is not None and keys[1] is not None
        r.sealer, r.opener = p.Sealer(keys[1]), p.Opener(keys[0])
    r.start()
    try:
        yield r
    finally:
        bulk.stop()
        if r.thread is not None:
            r.thread.join(10)
        bulk.close()
        b.close()
        mem.close()
        os.close(memfd)


def submit(r: Rig, rid: int, first: int, n: int) -> None:
    with memoryview(r.mem) as m:
        r.bulk.submit(rid, first * BS, n, m[first * BS : (first + n) * BS], memoryview(r.claims)[first : first + n])


def test_frames_land_in_the_pages_they_froze_and_are_reported_in_place(rig: Rig) -> None:
    submit(rig, 7, 10, 64)
    assert rig.read_request() == (7, 10 * BS, 64)
    rig.answer(7, 10 * BS, 32)
    rig.answer(7, 42 * BS, 32)
    recs = rig.records(native.BULK_DONE)
    assert [(k, i, f, n) for k, i, f, n, _ in recs] == [
        (native.BULK_FRAME_OK, 7, 0, 32), (native.BULK_FRAME_OK, 7, 32, 32), (native.BULK_DONE, 7, 64, 0)]
    assert bytes(rig.mem[10 * BS : 74 * BS]) == rig.image[10 * BS : 74 * BS]
    assert rig.claims[10:74] == bytes([FROZEN]) * 64 and rig.page(9) == b"\xee" * BS


def test_a_page_a_fault_took_is_never_written(rig: Rig) -> None:
    submit(rig, 1, 0, 16)
    rig.read_request()
    assert native.claim_take(rig.claims, 5)  # a demand fault takes page 5 before its bytes come
    rig.answer(1, 0, 16)
    rig.records(native.BULK_DONE)
    assert rig.page(5) == b"\xee" * BS and rig.claims[5] == TAKEN
    assert rig.page(4) == rig.image[4 * BS : 5 * BS] and rig.claims[4] == FROZEN
    assert not native.claim_take(rig.claims, 4)  # frozen: the fault waits for the install instead


def test_a_frame_that_fails_its_checksum_is_never_reported_in_place(rig: Rig) -> None:
    submit(rig, 3, 0, 8)
    rig.read_request()
    rig.answer(3, 0, 8, corrupt=3 * BS + 17)
    recs = rig.records(native.BULK_DONE)
    assert recs[0][:4] == (native.BULK_FRAME_BAD, 3, 0, 8)
    assert rig.claims[0:8] == bytes(8)  # unfrozen: not installed, fetched again later
    assert rig.bulk.stats["bad_frames"] == 1


@pytest.mark.parametrize("rig", [True], indirect=True, ids=["authenticated"])
def test_a_forged_frame_ends_the_connection_and_unfreezes_its_pages(rig: Rig) -> None:
    submit(rig, 2, 0, 8)
    rig.read_request()
    data = bytearray(rig.image[: 8 * BS])
    data[BS] ^= 1  # the attacker rewrites a page and its crc; only the tag is out of reach
    pieces = p.encode_data(2, 0, memoryview(data), p.Compressor(False), None, p.Sealer(os.urandom(32)))
    rig.server.sendall(b"".join(bytes(x) for x in pieces))
    wait_until(lambda: rig.result, timeout=10, what="the link to give up the connection")
    assert rig.result[0] is not None and rig.result[0].startswith("tampered")
    assert rig.claims[0:8] == bytes(8) and rig.bulk.drain() == []


@pytest.mark.parametrize("rig", [True], indirect=True, ids=["authenticated"])
def test_an_authenticated_link_pings_and_takes_tagged_frames_and_pongs(rig: Rig) -> None:
    for _ in range(3):  # a PING every 0.2 s, each answered with a PONG (a frame without payload)
        assert rig.next_frame()[0] is p.FrameType.PING
    submit(rig, 4, 100, 64)
    assert rig.read_request() == (4, 100 * BS, 64)
    rig.answer(4, 100 * BS, 64)
    rig.records(native.BULK_DONE)
    assert bytes(rig.mem[100 * BS : 164 * BS]) == rig.image[100 * BS : 164 * BS]
    assert not rig.result  # still connected: PONGs (frames without payload) are taken in stride


def test_guest_memory_that_shrank_ends_the_request_not_the_process(rig: Rig) -> None:
    submit(rig, 9, 128, 64)
    rig.read_request()
    os.ftruncate(rig.memfd, 64 * BS)  # the VMM shrinks its memory file under the run
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the link hangs up mid-frame
        rig.answer(9, 128 * BS, 64)
    recs = rig.records(native.BULK_GONE)
    assert recs[-1][:2] == (native.BULK_GONE, 9)
    wait_until(lambda: rig.result, timeout=10, what="the link to end the connection")
    assert rig.result[0] == "guest memory gone under a frame"
