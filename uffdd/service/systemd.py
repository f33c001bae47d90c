"""The service manager's protocols, stdlib only (no libsystemd).

- sd_notify(3): datagrams of KEY=VALUE lines to ``$NOTIFY_SOCKET``; ``FDSTORE=1`` sends file
  descriptors along (SCM_RIGHTS) for the manager to keep across restarts of the daemon.
- sd_listen_fds(3): descriptors handed in at start as fd 3.. with ``$LISTEN_FDS``, valid only
  if ``$LISTEN_PID`` is this process; ``$LISTEN_FDNAMES`` names them (colon separated).
- sd_watchdog_enabled(3): ``$WATCHDOG_USEC`` (and ``$WATCHDOG_PID``, if set, must be us).
"""

from __future__ import annotations

import array
import errno
import fcntl
import os
import re
import socket
import time
from dataclasses import dataclass

import structlog

log = structlog.get_logger("uffdd.systemd")

LISTEN_FDS_START = 3
SEND_TIMEOUT_S = 5.0
"""A manager that does not read its socket for this long loses the message (logged)."""
_FDNAME_RE = re.compile(r"[\x21-\x39\x3b-\x7e]{1,255}")
"""What the manager accepts as FDNAME=: printable ASCII without ':' or spaces, 255 at most."""


def fdname_is_valid(name: str) -> bool:
    return bool(_FDNAME_RE.fullmatch(name))


def _notify_address() -> str | None:
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return None
    if addr.startswith("@"):
        return "\0" + addr[1:]  # abstract namespace
    if not addr.startswith("/"):
        return None  # vsock and other forms are not used on a hypervisor host
    return addr


def notify(*lines: str, fds: tuple[int, ...] = ()) -> bool:
    """Send ``lines`` (e.g. "READY=1") and ``fds`` to the service manager.

    False if no manager listens. One datagram per call, so the lines are applied together.
    """
    addr = _notify_address()
    if addr is None:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(SEND_TIMEOUT_S)
        try:
            sock.sendmsg(["\n".join(lines).encode()], _rights(fds), 0, addr)
        except OSError as exc:
            log.warning("notify_failed", message=lines[0] if lines else "", error=str(exc))
            return False
    return True


class Notifier:
    """A datagram socket to the manager, kept open and never blocking: an FDSTORE sent right
    after accept() costs one sendmsg, so the moment in which a SIGKILL would lose the connection
    lasts microseconds (see uffdd.service.inflight)."""

    def __init__(self) -> None:
        self._sock: socket.socket | None = None

    def send(self, lines: list[str], fds: tuple[int, ...]) -> bool:
        """False if no manager listens or it would block (then :func:`notify`, which waits)."""
        addr = _notify_address()
        if addr is None:
            return False
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        try:
            self._sock.sendmsg(["\n".join(lines).encode()], _rights(fds), 0, addr)
        except OSError:
            return False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _rights(fds: tuple[int, ...]) -> list[tuple[int, int, bytes]]:
    """The SCM_RIGHTS ancillary data that carries ``fds`` (none for no fds)."""
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []


def notify_available() -> bool:
    return _notify_address() is not None


def store_fd(name: str, fd: int, *, poll: bool = True, via: Notifier | None = None) -> bool:
    """Put ``fd`` into the manager's file descriptor store as ``name``.

    With ``poll`` the manager drops it by itself once it reports POLLHUP/POLLERR (a peer that
    hung up); without, it stays until :func:`remove_fds`. With ``via``, the message goes out
    on that kept socket if it can be sent without waiting.
    """
    if not fdname_is_valid(name):
        raise ValueError(f"invalid file descriptor name {name!r}")
    lines = ["FDSTORE=1", f"FDNAME={name}"]
    if not poll:
        lines.append("FDPOLL=0")
    if via is not None and via.send(lines, (fd,)):
        return True
    return notify(*lines, fds=(fd,))


def remove_fds(name: str) -> bool:
    """Drop every stored descriptor called ``name`` (the manager closes its copies)."""
    return notify("FDSTOREREMOVE=1", f"FDNAME={name}")


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


@dataclass(frozen=True)
class ListenFd:
    fd: int
    name: str


def listen_fds(*, unset_environment: bool = True) -> list[ListenFd]:
    """The descriptors passed in by the manager (socket activation and the fd store).

    Like sd_listen_fds_with_names(3): empty unless ``$LISTEN_PID`` is our pid; each descriptor
    is made close-on-exec; unnamed ones are called "unknown"; the variables are removed from
    the environment so that children do not take them for theirs.
    """
    env = os.environ
    try:
        pid = env.get("LISTEN_PID")
        if pid is None or int(pid) != os.getpid():
            return []
        n = int(env.get("LISTEN_FDS", "0"))
        names = env.get("LISTEN_FDNAMES", "")
    except ValueError:
        log.warning("listen_fds_invalid", LISTEN_PID=env.get("LISTEN_PID"), LISTEN_FDS=env.get("LISTEN_FDS"))
        return []
    finally:
        if unset_environment:
            for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
                env.pop(key, None)
    parts = names.split(":") if names else []
    out: list[ListenFd] = []
    for i in range(max(n, 0)):
        fd = LISTEN_FDS_START + i
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFD)
        except OSError as exc:
            if exc.errno == errno.EBADF:
                log.warning("listen_fd_missing", fd=fd)
                continue
            raise
        fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
        out.append(ListenFd(fd, parts[i] if i < len(parts) and parts[i] else "unknown"))
    return out


def watchdog_usec() -> int | None:
    """The watchdog interval the manager expects pings within, or None if it is off for us."""
    env = os.environ
    try:
        usec = int(env.get("WATCHDOG_USEC", "0"))
        pid = env.get("WATCHDOG_PID")
        if pid is not None and int(pid) != os.getpid():
            return None
    except ValueError:
        return None
    return usec if usec > 0 else None


def is_listening_unix_socket(fd: int) -> bool:
    """True for an AF_UNIX stream socket in the listening state (what socket activation passes)."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return False
    try:
        return (sock.family == socket.AF_UNIX and sock.type == socket.SOCK_STREAM
                and bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)))
    except OSError:
        return False
    finally:
        sock.detach()
