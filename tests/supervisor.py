"""A small service manager for tests: systemd's side of sd_notify(3) and sd_listen_fds(3).

systemd is not PID 1 on the test machines, so the service tests run the daemon under this
supervisor instead. It does what the manager does for a ``Type=notify`` service, as documented
in sd_notify(3), sd_listen_fds(3), sd_watchdog_enabled(3) and systemd.service(5):

- a notify socket (AF_UNIX datagram, SO_PASSCRED) named by ``$NOTIFY_SOCKET``; each datagram is
  newline-separated assignments; the sender's pid comes from SCM_CREDENTIALS and is checked
  against ``NotifyAccess=`` (main/all/none); datagrams longer than the manager's buffer are
  dropped; descriptors sent without ``FDSTORE=1`` (or ``BARRIER=1``) are closed;
- READY=1, RELOADING=1 (+MONOTONIC_USEC=), STOPPING=1, STATUS=, ERRNO=, MAINPID=,
  EXTEND_TIMEOUT_USEC=, WATCHDOG=1, WATCHDOG=trigger, WATCHDOG_USEC=, BARRIER=1;
- the file descriptor store: FDSTORE=1 with FDNAME= (default "stored") and FDPOLL=0,
  FDSTOREREMOVE=1 with FDNAME=; ``FileDescriptorStoreMax=``; the same open file stored twice is
  kept once; stored descriptors that report POLLHUP/POLLERR are dropped unless FDPOLL=0;
- start: socket-activation descriptors first, then the store, as fd 3.. with ``$LISTEN_FDS``
  and ``$LISTEN_FDNAMES``; ``$LISTEN_PID`` and ``$WATCHDOG_PID`` must be the service's own pid,
  which only exists after fork, so a tiny exec wrapper moves the descriptors into place, sets
  them and execs the service (systemd does the same between fork and exec);
- the watchdog, armed when start-up completes (READY=1): no WATCHDOG=1 within
  ``WatchdogSec=`` -> SIGABRT, then SIGKILL after ``TimeoutAbortSec=``;
- ``Restart=`` no/on-failure/always with ``RestartSec=``; the store is kept across restarts
  and flushed when the service stops for good, unless ``FileDescriptorStorePreserve=yes``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal

from uffdd.unixsock import ancillary_space, parse_ancillary

NOTIFY_BUFFER_MAX = 4096
"""systemd reads notify datagrams into a buffer of this size and drops longer ones."""
SCM_MAX_FD = 253
_CLEAN_SIGNALS = frozenset({signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGPIPE})

# Runs as the service's pid: moves the passed descriptors to 3.., sets LISTEN_PID/WATCHDOG_PID
# to its own pid, and execs the service (which keeps that pid).
_WRAPPER = """
import fcntl, os, sys
fds = [int(x) for x in os.environ.pop("_SUPERVISOR_FDS", "").split(",") if x]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3 + len(fds)) for fd in fds]
for fd in fds:
    os.close(fd)
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i, inheritable=True)
    os.close(fd)
if fds:
    os.environ["LISTEN_PID"] = str(os.getpid())
if "WATCHDOG_USEC" in os.environ:
    os.environ["WATCHDOG_PID"] = str(os.getpid())
os.execv(sys.argv[1], sys.argv[1:])
"""

_libc = ctypes.CDLL(None, use_errno=True)
_SYS_KCMP = {"x86_64": 312, "aarch64": 272}.get(os.uname().machine)
_KCMP_FILE = 0


def same_file(a: int, b: int) -> bool:
    """True if two descriptors of this process refer to the same open file (kcmp KCMP_FILE)."""
    if _SYS_KCMP is not None:
        pid = os.getpid()
        r = _libc.syscall(_SYS_KCMP, pid, pid, _KCMP_FILE, a, b)
        if r >= 0:
            return bool(r == 0)
    sa, sb = os.fstat(a), os.fstat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def fdname_is_valid(name: str) -> bool:
    """systemd's rule: 1..255 printable ASCII characters, no ':' (the LISTEN_FDNAMES separator)."""
    return 0 < len(name) <= 255 and all(0x20 < ord(c) < 0x7F and c != ":" for c in name)


@dataclass
class Message:
    """One accepted notify datagram."""

    pid: int
    fields: dict[str, str]
    fd_names: list[str]
    at: float
    run: int
    """Which start of the service (1 = first) was running when it arrived."""


@dataclass(eq=False)
class StoredFd:
    name: str
    fd: int
    poll: bool


@dataclass
class Exit:
    pid: int
    returncode: int
    """As subprocess reports it: negative for a signal."""
    reason: str
    """"exit", "signal" or "watchdog"."""


@dataclass
class Supervisor:
    """Runs ``argv`` as a Type=notify service; call :meth:`close` (or use ``with``) at the end."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    restart: Literal["no", "on-failure", "always"] = "on-failure"
    restart_sec: float = 0.1
    watchdog_sec: float | None = None
    timeout_abort_sec: float = 5.0
    notify_access: Literal["main", "all", "none"] = "main"
    fd_store_max: int = 256
    fd_store_preserve: bool = False
    sockets: list[tuple[socket.socket, str]] = field(default_factory=list)
    """Socket-activation descriptors (``FileDescriptorName=``), passed before the store."""
    log_path: Path | None = None
    max_starts: int = 50

    def __post_init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="uffdd-sup-")
        self.notify_path = os.path.join(self._dir.name, "notify")
        self._nsock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._nsock.bind(self.notify_path)
        self._nsock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self._nsock.setblocking(False)
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._cond = threading.Condition()
        self.messages: list[Message] = []
        self.rejected: list[tuple[int, str]] = []
        """(pid, reason) of datagrams the manager refused."""
        self.store: list[StoredFd] = []
        self.exits: list[Exit] = []
        self.runs = 0
        self.state = "inactive"
        self.status = ""
        self.main_pid: int | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._stop_requested = False
        self._watchdog_usec: int | None = int(self.watchdog_sec * 1e6) if self.watchdog_sec else None
        self._watchdog_deadline: float | None = None
        self._abort_deadline: float | None = None
        self._watchdog_fired = False
        self._restart_at: float | None = None
        self._closed = False
        self._log: IO[bytes] | None = open(self.log_path, "ab") if self.log_path else None  # noqa: SIM115
        self._thread = threading.Thread(target=self._loop, name="supervisor", daemon=True)

    # --- control -------------------------------------------------------------------------
    def start(self) -> Supervisor:
        with self._cond:
            self._spawn()
        self._thread.start()
        return self

    def start_again(self) -> None:
        """``systemctl start`` after a stop (the store is there only if it was preserved)."""
        with self._cond:
            if self.main_pid is not None:
                raise RuntimeError("service is running")
            self._stop_requested = False
            self._spawn()

    def __enter__(self) -> Supervisor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the main process (as ``systemctl kill -s SIG --kill-whom=main``)."""
        with self._cond:
            if self.main_pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.main_pid, sig)

    def stop(self, timeout: float = 15.0) -> Exit:
        """``systemctl stop``: SIGTERM, wait, SIGKILL after ``timeout``; no restart."""
        with self._cond:
            self._stop_requested = True
            self._restart_at = None
            pid = self.main_pid
            n = len(self.exits)
            if pid is None:
                if self.exits:
                    return self.exits[-1]
                raise RuntimeError("service is not running")
            self.state = "deactivating"
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        if not self.wait_for(lambda: len(self.exits) > n, timeout):
            self.kill(signal.SIGKILL)
            self.wait_for(lambda: len(self.exits) > n, 10)
        return self.exits[-1]

    def reload(self) -> None:
        """``systemctl reload`` for ExecReload=kill -HUP $MAINPID."""
        self.kill(signal.SIGHUP)

    def close(self) -> None:
        """Kill whatever runs, stop the loop, close every stored descriptor."""
        with self._cond:
            if self._closed:
                return
            self._stop_requested = True
            self._restart_at = None
            if self.proc is not None and self.proc.poll() is None:
                self.proc.kill()
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        with self._cond:
            self._closed = True
        os.write(self._wake_w, b"x")
        if self._thread.is_alive():
            self._thread.join(10)
        for s in self.store:
            os.close(s.fd)
        self.store.clear()
        self._nsock.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        if self._log is not None:
            self._log.close()
        self._dir.cleanup()

    # --- queries (thread-safe) -----------------------------------------------------------
    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(predicate, timeout)

    def wait_message(self, key: str, value: str | None = None, *, run: int | None = None,
                     timeout: float = 15.0) -> Message:
        """The first message (of start ``run``, if given) that sets ``key`` (to ``value``)."""
        def find() -> Message | None:
            for m in self.messages:
                if key in m.fields and (value is None or m.fields[key] == value) and (run is None or m.run == run):
                    return m
            return None

        if not self.wait_for(lambda: find() is not None, timeout):
            raise TimeoutError(f"no {key}={value or '*'} (run {run}) within {timeout}s; got "
                               f"{[m.fields for m in self.messages][-10:]}; state {self.state}; "
                               f"exits {self.exits}")
        found = find()
        assert found is not None
        return found

    def stored_names(self) -> list[str]:
        with self._cond:
            return [s.name for s in self.store]

    def stored_fd(self, name: str) -> int:
        """A dup of the stored descriptor ``name`` (the caller closes it)."""
        with self._cond:
            for s in self.store:
                if s.name == name:
                    return os.dup(s.fd)
        raise KeyError(name)

    def wait_ready(self, run: int, timeout: float = 15.0) -> Message:
        return self.wait_message("READY", "1", run=run, timeout=timeout)

    # --- the manager's loop ----------------------------------------------------------------
    def _spawn(self) -> None:
        """Start the service (lock held)."""
        self.runs += 1
        if self.runs > self.max_starts:
            raise RuntimeError(f"start limit hit ({self.max_starts} starts)")
        fds = [s.fileno() for s, _ in self.sockets] + [s.fd for s in reversed(self.store)]
        names = [n for _, n in self.sockets] + [s.name for s in reversed(self.store)]
        env = {k: v for k, v in os.environ.items()
               if k not in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "WATCHDOG_USEC", "WATCHDOG_PID",
                            "NOTIFY_SOCKET")}
        env.update(self.env)
        env["NOTIFY_SOCKET"] = self.notify_path
        if fds:
            env["LISTEN_FDS"] = str(len(fds))
            env["LISTEN_FDNAMES"] = ":".join(names)
            env["_SUPERVISOR_FDS"] = ",".join(map(str, fds))
        if self._watchdog_usec:
            env["WATCHDOG_USEC"] = str(self._watchdog_usec)
        out = self._log if self._log is not None else subprocess.DEVNULL
        self.proc = subprocess.Popen([sys.executable, "-c", _WRAPPER, *self.argv], env=env, pass_fds=fds,
                                     stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        self.main_pid = self.proc.pid
        self.state = "activating"
        self._watchdog_fired = False
        self._abort_deadline = None
        self._watchdog_deadline = None  # armed once start-up completes (READY=1), as systemd does
        self._cond.notify_all()

    def _loop(self) -> None:
        while True:
            with self._cond:
                if self._closed:
                    return
                polled = [s for s in self.store if s.poll]
            poller = select.poll()
            poller.register(self._nsock.fileno(), select.POLLIN)
            poller.register(self._wake_r, select.POLLIN)
            by_fd = {s.fd: s for s in polled}
            for s in polled:
                poller.register(s.fd, 0)  # only POLLHUP/POLLERR, which poll always reports
            events = poller.poll(20)
            with self._cond:
                if self._closed:
                    return
                for fd, ev in events:
                    if fd == self._nsock.fileno():
                        self._read_notify()
                    elif fd == self._wake_r:
                        with contextlib.suppress(BlockingIOError):
                            os.read(self._wake_r, 64)
                    elif ev & (select.POLLHUP | select.POLLERR) and fd in by_fd:
                        self._drop_polled(by_fd[fd])
                self._check_child()
                self._check_timers()

    def _drop_polled(self, stored: StoredFd) -> None:
        """Drop the entry that was polled, if it is still stored: its number may already have
        been closed (FDSTOREREMOVE) and reused by a newer entry, which must stay."""
        if any(s is stored for s in self.store):
            self.store.remove(stored)
            os.close(stored.fd)
            self._cond.notify_all()

    def _read_notify(self) -> None:
        while True:
            try:
                data, anc, flags, _ = self._nsock.recvmsg(
                    NOTIFY_BUFFER_MAX, ancillary_space(SCM_MAX_FD, credentials=True))
            except BlockingIOError:
                return
            fds, pid = parse_ancillary(anc)
            self._dispatch(data, fds, pid, flags)

    def _reject(self, pid: int, reason: str, fds: list[int]) -> None:
        self.rejected.append((pid, reason))
        for fd in fds:
            os.close(fd)
        self._cond.notify_all()

    def _dispatch(self, data: bytes, fds: list[int], pid: int, flags: int) -> None:
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            self._reject(pid, "datagram or its descriptors truncated", fds)
            return
        if pid <= 0:
            self._reject(pid, "no credentials", fds)
            return
        if self.notify_access == "none" or (self.notify_access == "main" and pid != self.main_pid):
            self._reject(pid, f"NotifyAccess={self.notify_access}, main pid is {self.main_pid}", fds)
            return
        if b"\0" in data:
            self._reject(pid, "NUL in message", fds)
            return
        fields: dict[str, str] = {}
        for line in data.decode(errors="replace").split("\n"):
            if not line:
                continue
            key, sep, value = line.partition("=")
            if sep:
                fields[key] = value
        if not fields:
            self._reject(pid, "empty message", fds)
            return
        names: list[str] = []
        if fields.get("FDSTORE") == "1" and fds:
            name = fields.get("FDNAME", "stored")
            if not fdname_is_valid(name):
                self._reject(pid, f"invalid FDNAME {name!r}", fds)
                fds = []
            for fd in fds:
                self._store_fd(name, fd, poll=fields.get("FDPOLL") != "0")
                names.append(name)
            fds = []
        elif fields.get("BARRIER") == "1":
            pass  # the client waits for us to close its end: done below
        for fd in fds:
            os.close(fd)
        if fields.get("FDSTOREREMOVE") == "1":
            if "FDNAME" in fields:
                for s in [s for s in self.store if s.name == fields["FDNAME"]]:
                    self.store.remove(s)
                    os.close(s.fd)
            else:
                self.rejected.append((pid, "FDSTOREREMOVE=1 without FDNAME="))
        self._apply_state(fields)
        self.messages.append(Message(pid=pid, fields=fields, fd_names=names, at=time.monotonic(), run=self.runs))
        self._cond.notify_all()

    def _store_fd(self, name: str, fd: int, *, poll: bool) -> None:
        if self.fd_store_max <= 0:
            self.rejected.append((0, "fd store disabled (FileDescriptorStoreMax=0)"))
            os.close(fd)
            return
        for s in self.store:
            if same_file(s.fd, fd):  # the same open file stored again: kept once (name updated)
                s.name = name
                s.poll = poll
                os.close(fd)
                return
        if len(self.store) >= self.fd_store_max:
            self.rejected.append((0, f"fd store full ({self.fd_store_max})"))
            os.close(fd)
            return
        self.store.append(StoredFd(name, fd, poll))

    def _apply_state(self, f: dict[str, str]) -> None:
        if "STATUS" in f:
            self.status = f["STATUS"]
        if f.get("STOPPING") == "1":
            self.state = "deactivating"
        elif f.get("RELOADING") == "1":
            self.state = "reloading"
        elif f.get("READY") == "1":
            if self.state == "activating" and self._watchdog_usec:
                self._watchdog_deadline = time.monotonic() + self._watchdog_usec / 1e6
            self.state = "active"
        if "MAINPID" in f:
            with contextlib.suppress(ValueError):
                self.main_pid = int(f["MAINPID"])
        if "WATCHDOG_USEC" in f:
            with contextlib.suppress(ValueError):
                self._watchdog_usec = int(f["WATCHDOG_USEC"]) or None
        if f.get("WATCHDOG") == "1" and self._watchdog_usec:
            self._watchdog_deadline = time.monotonic() + self._watchdog_usec / 1e6
        elif f.get("WATCHDOG") == "trigger":
            self._watchdog_deadline = time.monotonic()

    def _check_timers(self) -> None:
        now = time.monotonic()
        if (self._watchdog_deadline is not None and now >= self._watchdog_deadline and not self._watchdog_fired
                and self.main_pid is not None and self.state != "deactivating"):
            self._watchdog_fired = True
            self._abort_deadline = now + self.timeout_abort_sec
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.main_pid, signal.SIGABRT)
        if self._abort_deadline is not None and now >= self._abort_deadline and self.main_pid is not None:
            self._abort_deadline = None
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.main_pid, signal.SIGKILL)
        if self._restart_at is not None and now >= self._restart_at:
            self._restart_at = None
            try:
                self._spawn()
            except (RuntimeError, OSError) as exc:
                self.state = "failed"
                self.rejected.append((0, f"restart failed: {exc}"))

    def _check_child(self) -> None:
        proc = self.proc
        if proc is None or self.main_pid is None or proc.poll() is None:
            return
        self._read_notify()  # what it sent before it died still counts as the main process's, as in systemd
        rc = proc.returncode
        reason = "watchdog" if self._watchdog_fired else ("signal" if rc < 0 else "exit")
        self.exits.append(Exit(pid=proc.pid, returncode=rc, reason=reason))
        self.main_pid = None
        self._watchdog_deadline = None
        self._abort_deadline = None
        clean = rc == 0 or (rc < 0 and signal.Signals(-rc) in _CLEAN_SIGNALS)
        want = not self._stop_requested and (
            self.restart == "always" or (self.restart == "on-failure" and (not clean or reason == "watchdog")))
        if want:
            self.state = "auto-restart"
            self._restart_at = time.monotonic() + self.restart_sec
        else:
            self.state = "inactive" if clean else "failed"
            if not self.fd_store_preserve:
                for s in self.store:
                    os.close(s.fd)
                self.store.clear()
        self._cond.notify_all()
