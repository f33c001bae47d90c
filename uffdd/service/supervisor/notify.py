"""The parent's view of one worker, and what the worker tells it on its notify socket.

The parent does for each worker what systemd does for a ``Type=notify`` service: it records
READY/RELOADING/STATUS/WATCHDOG, keeps the descriptors the worker stores (FDSTORE=1) and drops
those it removes (FDSTOREREMOVE=1), mirroring both into its own manager's store under the
names ``w<i>.<name>``. A worker's counts arrive as ``X_UFFDD_COUNTS=`` (see
:class:`~uffdd.service.manager.StatusCounts`), next to its STATUS= words.

A datagram is only peeked at until what it asks for is done (and mirrored): a worker's
FDSTORE=1 may carry the only copy of a VMM's connection. The notify sockets themselves are in
our manager's store (``notify.<i>``), so what is queued on them outlives us too, and the next
parent reads it before it starts any worker (:func:`read_messages`). A datagram read again
after such a restart stores nothing twice (:meth:`Worker.keep_fds`).
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import structlog

from uffdd.service import systemd
from uffdd.service.manager import COUNTS_FIELD, StatusCounts
from uffdd.unixsock import ancillary_space, close_fds, parse_ancillary, same_file

log = structlog.get_logger("uffdd.workers")

NOTIFY_MAX = 4096
"""Largest datagram read, as systemd does."""
SCM_MAX_FD = 253
PREFIX_RE = re.compile(r"w(?P<index>[0-9]+)\.(?P<name>.+)")
"""How a worker's descriptors are named in the parent's own store."""
NOTIFY_NAME_RE = re.compile(r"notify\.(?P<index>[0-9]+)")
"""How worker i's notify socket is named in the parent's own store."""


@dataclass(eq=False)
class Stored:
    name: str
    fd: int


def read_messages(sock: socket.socket, sender_ok: Callable[[int], bool],
                  refused: Callable[[int, int], None]) -> Iterator[tuple[dict[str, str], list[int]]]:
    """The datagrams queued on ``sock``, each removed from the queue only once the caller has
    handled it (a parent killed meanwhile leaves it to the next one, see the module docstring).
    Datagrams from a sender that is not ok, or truncated, go to ``refused(pid, flags)``."""
    while True:
        try:
            data, anc, flags, _ = sock.recvmsg(NOTIFY_MAX, ancillary_space(SCM_MAX_FD, credentials=True),
                                               socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        fds, pid = parse_ancillary(anc)
        try:
            if not sender_ok(pid) or flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                refused(pid, flags)
                close_fds(fds)
                continue
            yield parse_fields(data), fds
        finally:
            sock.recv(1)  # now drop it (its fds, received again, are closed by the kernel)


def parse_fields(data: bytes) -> dict[str, str]:
    """The assignments of one notify datagram (newline separated ``KEY=VALUE``)."""
    fields: dict[str, str] = {}
    for line in data.decode(errors="replace").split("\n"):
        key, sep, value = line.partition("=")
        if sep:
            fields[key] = value
    return fields


@dataclass(eq=False)
class Worker:
    """One worker process and what its manager (the parent) keeps for it."""

    index: int
    notify: socket.socket
    notify_path: str
    pid: int | None = None
    pidfd: int | None = None
    started_at: float = 0.0
    starts: int = 0
    ready: bool = False
    reloading: bool = False
    status: str = ""
    """Its STATUS= words, for `uffdd status`."""
    counts: StatusCounts = field(default_factory=StatusCounts)
    store: list[Stored] = field(default_factory=list)
    exits: list[int] = field(default_factory=list)
    watchdog_deadline: float | None = None

    @classmethod
    def open(cls, index: int, path: str) -> Worker:
        """A worker slot with its notify socket bound at ``path`` (credentials on: senders are checked)."""
        ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        ns.bind(path)
        ns.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        ns.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        ns.setblocking(False)
        return cls(index=index, notify=ns, notify_path=path)

    def messages(self, *, dead_pid: int | None = None) -> Iterator[tuple[dict[str, str], list[int]]]:
        """The datagrams queued on the notify socket, from our worker (or, just after it died,
        from ``dead_pid``); others are refused and their descriptors closed."""
        def sender_ok(pid: int) -> bool:
            return pid == self.pid or (dead_pid is not None and pid in (dead_pid, 0))

        def refused(pid: int, flags: int) -> None:
            log.warning("worker_notify_refused", worker=self.index, sender=pid, truncated=bool(flags))

        return read_messages(self.notify, sender_ok, refused)

    def keep_fds(self, fields: dict[str, str], fds: list[int], *, mirror: bool) -> None:
        """FDSTORE=1 / FDSTOREREMOVE=1; with ``mirror``, in the parent's own manager too."""
        name = fields.get("FDNAME", "stored")
        if fields.get("FDSTORE") == "1" and fds and systemd.fdname_is_valid(name):
            for fd in fds:
                if any(s.name == name and same_file(s.fd, fd) for s in self.store):
                    os.close(fd)  # read again after a restart of ours: kept (and mirrored) already
                    continue
                self.store.append(Stored(name, fd))
                if mirror:
                    systemd.store_fd(f"w{self.index}.{name}", fd, poll=fields.get("FDPOLL") != "0")
        else:
            close_fds(fds)
        if fields.get("FDSTOREREMOVE") == "1" and "FDNAME" in fields:
            for s in [s for s in self.store if s.name == name]:
                self.store.remove(s)
                os.close(s.fd)
            if mirror:
                systemd.remove_fds(f"w{self.index}.{name}")

    def apply(self, fields: dict[str, str], *, watchdog_usec: int | None) -> tuple[bool, bool]:
        """Record the worker's state; returns (its status changed, it became ready)."""
        changed = False
        if "STATUS" in fields:
            self.status = fields["STATUS"]
            changed = True
        if COUNTS_FIELD in fields:
            try:
                self.counts = StatusCounts.decode(fields[COUNTS_FIELD])
                changed = True
            except ValueError as exc:
                log.warning("worker_counts_invalid", worker=self.index, error=str(exc))
        ready = False
        if fields.get("RELOADING") == "1":
            self.reloading = True
        elif fields.get("READY") == "1":
            self.ready, self.reloading = True, False
            if watchdog_usec and self.watchdog_deadline is None:
                self.watchdog_deadline = time.monotonic() + watchdog_usec / 1e6
            ready = True
        if fields.get("WATCHDOG") == "1" and watchdog_usec:
            self.watchdog_deadline = time.monotonic() + watchdog_usec / 1e6
        return changed, ready

    def exited(self, code: int) -> None:
        """The process is gone (reaped): its store stays for the replacement, and its last counts
        until the replacement reports its own."""
        self.pid = self.pidfd = None
        self.ready = False
        self.watchdog_deadline = None
        self.exits.append(code)

    def close(self) -> None:
        self.notify.close()
        close_fds(s.fd for s in self.store)
        self.store.clear()
