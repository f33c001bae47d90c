"""Binding a Unix stream socket the way every uffdd listener does."""

from __future__ import annotations

import contextlib
import socket
import stat
from pathlib import Path

from uffdd.errors import ConfigError


def bind_unix(path: str, *, backlog: int, key: str) -> socket.socket:
    """Bind and listen on ``path``, replacing a stale socket file but never another kind of file
    (``key`` names the config setting in the error)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(p.lstat().st_mode):
            raise ConfigError(f"{key}: {p} exists and is not a socket; refusing to replace it")
        p.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(str(p))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock
