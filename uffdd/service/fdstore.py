"""Sessions kept in the service manager's file descriptor store, so a successor can resume them.

Each session stores five descriptors, one ``FDSTORE=1`` message each, named ``<session>.<kind>``:

- ``uffd``: the userfaultfd (while the store holds it, the guest's registration outlives us);
- ``mem``: the guest memory file;
- ``state``: the page-state memfd (uffdd.core.pagestate), the record of which pages are in place;
- ``conn``: the VMM's connection, so the successor still sees its EOF (stored with polling on:
  the manager drops it by itself when the VMM hangs up while no daemon runs). It is stored
  first, right after accept() and before the handshake is read: a ``conn`` without ``desc`` is
  a handshake in flight, which a successor runs again (uffdd.service.inflight);
- ``desc``: a small memfd with this record (handshake, flags) as JSON, stored last: a session
  without its ``desc`` never started serving and is not resumed.

The record is rewritten in place (same memfd, so the stored copy sees it) when the VMM has been
told "ready" and when the session completed, so that a successor sends neither twice.
The listening socket is stored too, as ``listen``, so VMMs that connect during a restart wait
in its backlog instead of being refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
from dataclasses import dataclass, field

import structlog

from uffdd import handshake as hs_mod
from uffdd.errors import UffddError
from uffdd.service import systemd
from uffdd.sockclaim import is_temporary_name

log = structlog.get_logger("uffdd.fdstore")

KINDS = ("uffd", "mem", "state", "conn", "desc")
"""Stored in this order; ``desc`` last marks the set complete."""
_POLLED = frozenset({"conn"})
LISTEN_NAME = "listen"
_NAME_RE = re.compile(r"(?P<sid>s[0-9]+)\.(?P<kind>uffd|mem|state|conn|desc)")
_VERSION = 1


class RecordError(UffddError):
    """A stored session description cannot be read."""


@dataclass
class SessionRecord:
    """What a successor needs besides the descriptors, kept in a memfd."""

    session_id: str
    handshake: hs_mod.Handshake
    preinitialized: bool = False
    features: int = 0
    anonymous: bool = False
    """No memory file (``[uffd]`` alone): nothing stored as ``mem``."""
    ready_sent: bool = False
    complete: bool = False
    fd: int = -1

    def _encode(self) -> bytes:
        return json.dumps({
            "version": _VERSION, "session": self.session_id,
            "handshake": json.loads(hs_mod.encode(self.handshake)),
            "preinitialized": self.preinitialized, "features": self.features, "anonymous": self.anonymous,
            "ready_sent": self.ready_sent, "complete": self.complete,
        }).encode()

    def create(self) -> int:
        """Write the record into a new memfd (with room to rewrite it in place) and return it."""
        data = self._encode()
        fd = os.memfd_create(f"uffdd-{self.session_id}-desc", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, len(data) + 64)
            os.pwrite(fd, data.ljust(len(data) + 64), 0)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        return fd

    def update(self, **changes: bool | hs_mod.Handshake) -> None:
        """Rewrite in place: one pwrite of the same length (trailing spaces are valid JSON)."""
        for k, v in changes.items():
            setattr(self, k, v)
        if self.fd < 0:
            return
        data = self._encode()
        size = os.fstat(self.fd).st_size
        if len(data) > size:
            os.ftruncate(self.fd, len(data))
            size = len(data)
        os.pwrite(self.fd, data.ljust(size), 0)

    @classmethod
    def read(cls, fd: int) -> SessionRecord:
        """Parse a stored record; takes ownership of ``fd`` on success."""
        try:
            raw = os.pread(fd, 1 << 20, 0)
            doc = json.loads(raw)
            if not isinstance(doc, dict) or doc.get("version") != _VERSION:
                version = doc.get("version") if isinstance(doc, dict) else None
                raise RecordError(f"unknown session record version {version!r}")
            hs = hs_mod.parse(json.dumps(doc["handshake"]).encode())
            return cls(session_id=str(doc["session"]), handshake=hs, preinitialized=bool(doc["preinitialized"]),
                       features=int(doc["features"]), anonymous=bool(doc["anonymous"]),
                       ready_sent=bool(doc["ready_sent"]), complete=bool(doc["complete"]), fd=fd)
        except RecordError:
            raise
        except (OSError, ValueError, KeyError, TypeError, UffddError) as exc:
            raise RecordError(f"unreadable session record: {exc}") from None

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            with contextlib.suppress(OSError):
                os.close(fd)


@dataclass
class Inherited:
    """Descriptors received at start, sorted out: listening sockets and sessions to resume."""

    listeners: list[systemd.ListenFd] = field(default_factory=list)
    stored_listener: int | None = None
    """Our own listening socket from a previous run (``listen``), if stored."""
    sessions: dict[str, dict[str, int]] = field(default_factory=dict)
    """session id -> kind -> fd."""
    unknown: list[systemd.ListenFd] = field(default_factory=list)

    @property
    def last_session_number(self) -> int:
        return max((int(sid[1:]) for sid in self.sessions), default=0)

    def close_unknown(self) -> None:
        """Close what nobody here can use (logged: the manager passed something unexpected)."""
        for lf in self.unknown:
            log.warning("unknown_fd_closed", name=lf.name, fd=lf.fd)
            os.close(lf.fd)
        self.unknown.clear()


def sort_inherited(fds: list[systemd.ListenFd]) -> Inherited:
    """Group what sd_listen_fds handed us. Duplicate names keep the first and close the rest."""
    out = Inherited()
    for lf in fds:
        m = _NAME_RE.fullmatch(lf.name)
        if m:
            group = out.sessions.setdefault(m["sid"], {})
            if m["kind"] in group:
                os.close(lf.fd)
            else:
                group[m["kind"]] = lf.fd
        elif lf.name == LISTEN_NAME and out.stored_listener is None and systemd.is_listening_unix_socket(lf.fd):
            out.stored_listener = lf.fd
        elif systemd.is_listening_unix_socket(lf.fd):
            out.listeners.append(lf)
        else:
            out.unknown.append(lf)
    return out


class FdStore:
    """Keeps the service manager's store in step with the live sessions."""

    def __init__(self, enabled: bool | None = None) -> None:
        self.enabled = systemd.notify_available() if enabled is None else enabled
        self._notifier = systemd.Notifier()

    def store_session(self, sid: str, fds: dict[str, int]) -> bool:
        """Store a session's descriptors (``mem`` may be absent), ``desc`` last; True if all were sent."""
        if not self.enabled:
            return False
        ok = True
        for kind in KINDS:
            if kind not in fds:
                continue
            ok = systemd.store_fd(f"{sid}.{kind}", fds[kind], poll=kind in _POLLED) and ok
        return ok

    def remove(self, sid: str, kinds: tuple[str, ...] = tuple(reversed(KINDS))) -> None:
        """Drop a session's descriptors, ``desc`` first: a crash half-way leaves no record, so
        the successor drops the rest too."""
        if self.enabled:
            for kind in kinds:
                systemd.remove_fds(f"{sid}.{kind}")

    def store_conn(self, sid: str, fd: int) -> bool:
        """Store a VMM's connection as soon as it is accepted (its handshake not yet read): one
        sendmsg on a kept socket, or, if that would block, the waiting path."""
        return self.enabled and systemd.store_fd(f"{sid}.conn", fd, poll=True, via=self._notifier)

    def close(self) -> None:
        self._notifier.close()

    def store_listener(self, fd: int) -> None:
        if self.enabled:
            systemd.store_fd(LISTEN_NAME, fd, poll=False)

    def remove_listener(self) -> None:
        if self.enabled:
            systemd.remove_fds(LISTEN_NAME)


def listening_socket(inherited: Inherited, listen: str, store: FdStore) -> tuple[socket.socket | None, bool]:
    """The socket to accept VMMs on: ours from the fd store, else one from socket activation,
    else None (bind ``listen``). The bool says whether the socket file is ours to remove on a
    clean stop."""
    if inherited.stored_listener is not None and not inherited.listeners:
        sock = socket.socket(fileno=inherited.stored_listener)
        path = sock.getsockname()
        if isinstance(path, str) and is_temporary_name(path, listen):
            path = listen  # bound under a temporary name, then renamed over listen (uffdd.sockclaim)
        if isinstance(path, str) and os.path.exists(path):
            return sock, True
        # Its file is gone (e.g. the runtime directory was removed): nobody could connect.
        log.warning("stored_listen_socket_unreachable", socket=path, hint="binding a new one")
        sock.close()
        store.remove_listener()
        return None, True
    if inherited.stored_listener is not None:
        os.close(inherited.stored_listener)  # socket activation passes its own again
        store.remove_listener()
    if inherited.listeners:
        first, *rest = inherited.listeners
        for extra in rest:
            log.warning("extra_listen_fd_ignored", name=extra.name, fd=extra.fd)
            os.close(extra.fd)
        sock = socket.socket(fileno=first.fd)
        name = sock.getsockname()
        if isinstance(name, str) and is_temporary_name(name, listen):
            name = listen  # our parent's (a worker's listen fd), bound then renamed over listen
        if name != listen:
            log.info("socket_activated", socket=name, configured=listen,
                     hint="the socket unit's path is used; listen: in the config is ignored")
        return sock, False
    return None, True
