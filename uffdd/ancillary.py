"""Ancillary data of Unix sockets: the fds (SCM_RIGHTS) and sender pid (SCM_CREDENTIALS) a
message carried. Used by the VMM handshake, the notify protocol and the worker parent."""

from __future__ import annotations

import array
import socket
import struct
from collections.abc import Iterable

FD_SIZE = array.array("i").itemsize
UCRED = struct.Struct("iII")  # pid, uid, gid


def space(max_fds: int, *, credentials: bool = False) -> int:
    """The ancillary buffer size for up to ``max_fds`` fds (and the sender's credentials)."""
    return socket.CMSG_SPACE(max_fds * FD_SIZE) + (socket.CMSG_SPACE(UCRED.size) if credentials else 0)


def parse(anc: Iterable[tuple[int, int, bytes]]) -> tuple[list[int], int]:
    """The fds received (now open in this process: the caller owns them) and the sender's pid
    (0 when no credentials came along)."""
    fds: list[int] = []
    pid = 0
    for level, typ, cdata in anc:
        if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
            got = array.array("i")
            got.frombytes(cdata[: len(cdata) - len(cdata) % FD_SIZE])
            fds.extend(got)
        elif level == socket.SOL_SOCKET and typ == socket.SCM_CREDENTIALS:
            pid = UCRED.unpack(cdata[: UCRED.size])[0]
    return fds, pid
