"""The urgent link in C (uffdd/peer/_native.c) over a real socket: what it keeps across
connections to servers that negotiate different limits."""

from __future__ import annotations

import os
import socket
from typing import Any

import pytest

from uffdd.peer import protocol as p
from uffdd.peer.native import module

native: Any = module
pytestmark = pytest.mark.skipif(native is None, reason="uffdd.peer._native is not built")


def attach(link: object, max_blocks: int) -> socket.socket:
    a, b = socket.socketpair()
    fd = os.dup(a.fileno())
    a.close()
    os.set_blocking(fd, False)
    link.attach(fd, None, None, 0, 0, max_blocks, 16)  # type: ignore[attr-defined]
    return b


def test_a_server_that_allows_larger_reads_after_a_reconnect_gets_them() -> None:
    assert native is not None
    link = native.Link(1024, 64, 3)
    server = attach(link, 16)  # the first server allows 16 blocks per READ
    with pytest.raises(ValueError, match="count"):
        link.submit(1, 0, 64, bytearray(64 * p.BLOCK_SIZE))
    link.detach()
    server.close()
    server = attach(link, 1024)  # a restarted server with the default limit
    link.submit(2, 0, 512, bytearray(512 * p.BLOCK_SIZE))
    assert link.flush()
    hdr = server.recv(p.HEADER_SIZE)
    t, _, count, rid, _, _, _ = p.HEADER.unpack(hdr)
    assert (p.FrameType(t), rid, count) == (p.FrameType.READ, 2, 512)
    link.detach()
    server.close()
