"""Taking a Unix socket path without ever taking it from a live process.

A socket file left by a daemon that died is stale: connect() to it is refused, and it may be
replaced. One that answers a connect() belongs to a live process (another uffdd with the same
config, most likely): start-up stops there, naming the path and the process that listens.

A path is claimed in two steps, so that every bind that can fail is tried before anything is
replaced: :func:`prepare_unix` binds and listens on a temporary name in the same directory
(nothing existing is touched); :meth:`UnixClaim.commit` renames it over the path (atomic: a
connect() finds either the old file or ours). Both steps run under an flock(2) of the
directory and look at the path again, so two instances starting at once cannot both take it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import socket
import stat
import struct
from collections.abc import Iterator
from pathlib import Path

from uffdd.errors import ConfigError, StartupError

_UCRED = struct.Struct("iII")  # pid, uid, gid


def temporary_name(path: str) -> str:
    """Where :func:`prepare_unix` binds before the rename: the same directory, so the rename is
    atomic; a random part, so two instances never share it (not even pid 1 of two containers)."""
    p = Path(path)
    return str(p.with_name(f".{p.name}.{secrets.token_hex(4)}.new"))


def is_temporary_name(name: str, path: str) -> bool:
    """True if ``name`` is what a claim of ``path`` was bound as (getsockname() keeps that name)."""
    p, n = Path(path), Path(name)
    return n.parent == p.parent and n.name.startswith(f".{p.name}.") and n.name.endswith(".new")


@contextlib.contextmanager
def _directory_locked(directory: Path) -> Iterator[None]:
    """An exclusive flock of ``directory`` while claims there are checked and committed."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _listener_pid(probe: socket.socket) -> str:
    """``pid N`` of the process that listens (SO_PEERCRED of a connected socket), if known."""
    try:
        pid = _UCRED.unpack(probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))[0]
    except OSError:
        return "a live process"
    return f"pid {pid}" if pid > 0 else "a live process"


def check_unix_path(path: str, *, key: str) -> None:
    """Raise unless ``path`` is free: absent, or a socket file nobody listens on.

    ConfigError for a file that is not a socket; StartupError for a socket that answers a
    connect() (or cannot be probed): it is never replaced."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"{key}: {path} exists and is not a socket; refusing to replace it")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC) as probe:
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            return  # stale: nobody listens on it
        except BlockingIOError:
            who = "a live process (its backlog is full)"
        except OSError as exc:
            raise StartupError(f"{key}: {path} cannot be probed ({exc.strerror}); refusing to replace it") from None
        else:
            who = _listener_pid(probe)
    raise StartupError(f"{key}: {path} is in use: {who} answers on it (another uffdd with the same config?); "
                       f"refusing to start and leaving it alone")


def check_tcp_port(address: tuple[str, int], *, key: str) -> None:
    """StartupError unless ``address`` can be bound now (tried and released at once)."""
    host, port = address
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the HTTP server binds it
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise StartupError(f"{key}: cannot bind {host}:{port}: {exc.strerror or exc}") from None


class UnixClaim:
    """A listening socket bound under a temporary name, waiting to be renamed over its path."""

    def __init__(self, path: str, key: str, sock: socket.socket, temp: str) -> None:
        self.path = path
        self.key = key
        self.sock = sock
        self._temp: str | None = temp

    def commit(self) -> socket.socket:
        """Rename the socket over its path (after checking again that no live process holds it)."""
        assert self._temp is not None, "committed or aborted already"
        with _directory_locked(Path(self.path).parent):
            try:
                check_unix_path(self.path, key=self.key)
                os.rename(self._temp, self.path)
            except BaseException:
                self.abort()
                raise
        self._temp = None
        return self.sock

    def abort(self) -> None:
        """Close the socket and remove its temporary name; the path itself is untouched."""
        temp, self._temp = self._temp, None
        if temp is not None:
            self.sock.close()
            with contextlib.suppress(OSError):
                os.unlink(temp)


def prepare_unix(path: str, *, backlog: int, key: str) -> UnixClaim:
    """Check ``path`` (see :func:`check_unix_path`), then bind and listen under a temporary name."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    temp = temporary_name(path)
    with _directory_locked(p.parent):
        check_unix_path(path, key=key)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(temp)
            sock.listen(backlog)
        except OSError as exc:
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise StartupError(f"{key}: cannot bind {path}: {exc.strerror or exc}") from None
        except BaseException:
            sock.close()
            raise
    return UnixClaim(path, key, sock, temp)


class Claims:
    """Several claims made together: all are committed, or on any error all are aborted."""

    def __init__(self) -> None:
        self._claims: list[UnixClaim] = []

    def add(self, claim: UnixClaim) -> socket.socket:
        self._claims.append(claim)
        return claim.sock

    def commit(self) -> None:
        for claim in self._claims:
            claim.commit()
        self._claims.clear()

    def abort(self) -> None:
        for claim in self._claims:
            claim.abort()
        self._claims.clear()
