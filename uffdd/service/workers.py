"""`uffdd run` with ``workers: N`` > 1: a small parent that is the service manager of N workers.

Why processes: one event loop is one core, and one guest that faults heavily delays every other
guest on that loop. The parent binds the VMM socket once (or takes it from socket activation)
and hands it to every worker as a socket-activation descriptor, so the kernel spreads the
accept()s over them. Each worker is a plain ``workers: 1`` daemon that speaks sd_notify(3) to
its own notify socket in the parent, which does what systemd does for a Type=notify service:

- READY/STATUS/RELOADING/STOPPING/WATCHDOG are recorded (a worker that stops pinging within
  the parent's own WatchdogSec is aborted and replaced);
- FDSTORE/FDSTOREREMOVE: each worker's stored descriptors are kept, and a worker that dies is
  replaced by one that receives the listening socket plus that store through LISTEN_FDS, so it
  resumes the sessions exactly as a restarted daemon does;
- the store is mirrored into the parent's own manager (names prefixed ``w<i>.``), so the
  sessions survive the parent too: a restarted parent gives worker i back the ``w<i>.`` set.

Upwards the parent sends READY=1 once every worker is ready, STATUS= with the sums, STOPPING=1,
and WATCHDOG=1 from its own loop; SIGTERM/SIGINT/SIGHUP are passed on to the workers.
Each worker keeps its own control socket (``<control>.<i>.ctl``) and metrics port (port + i);
the parent's control socket lists the workers, and `uffdd status` gathers their sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import mmap
import os
import re
import signal
import socket
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from uffdd import __version__
from uffdd.config import Config, ControlConfig, MetricsConfig
from uffdd.configbase import join_hostport
from uffdd.service import systemd
from uffdd.service.control import ControlServer
from uffdd.service.daemon import STATUS_INTERVAL_S, _Every, _listening_socket, _start_watchdog
from uffdd.service.fdstore import FdStore, sort_inherited
from uffdd.service.listener import Listener
from uffdd.unixsock import ancillary_space, bind_unix, parse_ancillary, wait_readable

log = structlog.get_logger("uffdd.workers")

WORKER_ENV = "UFFDD_WORKER"
"""Set (to the worker's index) in the environment of the processes the parent starts."""
LISTEN_FD_NAME = "vmm"
"""LISTEN_FDNAMES entry of the shared listening socket (not "listen": the worker must not
take it for its own stored socket and unlink its file on stop)."""
PARENT_ENV = "UFFDD_WORKER_PARENT"
LOAD_ENV = "UFFDD_WORKER_LOAD"
"""Path of the file (one little-endian u32 per worker: its open connections) that balances accepts."""
ACCEPT_DEFER_S = 0.005
"""A worker busier than another waits this long (per connection more) before accepting, so the idle
one takes the VMM."""
ACCEPT_DEFER_MAX_S = 0.05
RESTART_DELAY_S = 0.1
QUICK_DEATH_S = 1.0
"""A worker that dies sooner than this after its start is restarted after a second, not at once."""
ABORT_TIMEOUT_S = 5.0
_PREFIX_RE = re.compile(r"w(?P<index>[0-9]+)\.(?P<name>.+)")
_COUNT_RE = re.compile(r"(\d+) (session\(s\)|page\(s\) to go|served|faults|resumed)")
# Runs as the worker's pid, so LISTEN_PID can name it (systemd sets it between fork and exec).
_EXEC_WRAPPER = 'LISTEN_PID=$$; export LISTEN_PID; exec "$@"'


def worker_index() -> int | None:
    """Our index if this process is a worker started by the parent, else None."""
    raw = os.environ.get(WORKER_ENV)
    return int(raw) if raw is not None and raw.isdigit() else None


def become_worker(index: int, *, pin: bool) -> None:
    """Die with the parent (as systemd's cgroup kill would): a new parent resumes our sessions
    from its store, and two handlers must never serve one userfaultfd. With ``pin``, run on the
    index-th CPU of the set the parent may use (the parent itself stays unpinned)."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    if str(os.getppid()) != os.environ.get(PARENT_ENV):
        os._exit(1)  # the parent died before the prctl: nobody would be told about our sessions
    structlog.contextvars.bind_contextvars(worker=index)
    if pin:
        cpus = sorted(os.sched_getaffinity(0))
        try:
            os.sched_setaffinity(0, {cpus[index % len(cpus)]})
        except OSError as exc:  # e.g. the CPU left our cpuset meanwhile: serve unpinned, not die
            log.warning("worker_not_pinned", cpu=cpus[index % len(cpus)], error=str(exc))


class WorkerListener(Listener):
    """A worker's listener: every worker is woken by a new VMM, and the one already serving more
    connections than another defers its accept(), so a new guest goes to the least loaded worker
    (the busy one would otherwise often win, being awake already)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.index = worker_index() or 0
        self._load: mmap.mmap | None = None
        path = os.environ.get(LOAD_ENV)
        if path:
            with open(path, "r+b") as fh:
                self._load = mmap.mmap(fh.fileno(), 0)
        super().__init__(*args, accept=self._accept_balanced, on_connections=self._publish, **kwargs)

    def _loads(self) -> list[int]:
        assert self._load is not None
        return [int.from_bytes(self._load[i:i + 4], "little") for i in range(0, len(self._load), 4)]

    def _publish(self, connections: int) -> None:
        if self._load is not None and 4 * self.index + 4 <= len(self._load):
            self._load[4 * self.index:4 * self.index + 4] = connections.to_bytes(4, "little")

    def _excess(self) -> int:
        """How many more connections we serve than the least loaded other worker (0 if none)."""
        if self._load is None:
            return 0
        loads = self._loads()
        others = [n for i, n in enumerate(loads) if i != self.index]
        mine = loads[self.index] if self.index < len(loads) else 0
        return max(mine - min(others), 0) if others else 0

    async def _accept_balanced(self, sock: socket.socket) -> socket.socket:
        while True:
            await wait_readable(sock)
            if excess := self._excess():
                # Longer the busier we are: a loaded host may take a while to schedule the idle one.
                await asyncio.sleep(min(ACCEPT_DEFER_S * excess, ACCEPT_DEFER_MAX_S))
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                continue  # another worker took it
            return conn


def worker_config(config: Config, index: int) -> Config:
    """What worker ``index`` runs: one process, its own control socket and metrics port."""
    ctl = Path(config.control_path)
    update: dict[str, Any] = {"workers": 1,
                              "control": ControlConfig(listen=str(ctl.with_name(f"{ctl.stem}.{index}{ctl.suffix}")))}
    if config.metrics.address is not None:
        host, port = config.metrics.address
        update["metrics"] = MetricsConfig(listen=join_hostport(host, port + index if port else 0))
    return config.model_copy(update=update)


@dataclass(eq=False)
class _Stored:
    name: str
    fd: int


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
    store: list[_Stored] = field(default_factory=list)
    exits: list[int] = field(default_factory=list)
    watchdog_deadline: float | None = None


class WorkerPool:
    """The parent: starts, watches and replaces the workers; see the module docstring."""

    def __init__(self, config: Config, config_path: str, count: int) -> None:
        self.config = config
        self.config_path = config_path
        self.count = count
        self.started = time.monotonic()
        self.stopping = False
        self.ready_sent = False
        self.reloading = False
        self.upstream = FdStore()
        self._dir = tempfile.TemporaryDirectory(prefix="uffdd-workers-")
        self.load_path = os.path.join(self._dir.name, "load")
        with open(self.load_path, "wb") as fh:
            fh.write(bytes(4 * count))
        self.workers: list[Worker] = []
        self.sock: socket.socket | None = None
        self.owns_path = True
        self._exited = asyncio.Event()
        self._status_sent = ""
        self._status_handle: asyncio.TimerHandle | None = None
        self._watchdog_usec = systemd.watchdog_usec()

    # --- start-up ---------------------------------------------------------------------------
    def _take_inherited(self) -> None:
        """Sort what our manager passed: our socket, and the stored sets of earlier workers (or
        of a single-process predecessor, whose sessions go to worker 0)."""
        rest: list[systemd.ListenFd] = []
        for lf in systemd.listen_fds():
            m = _PREFIX_RE.fullmatch(lf.name)
            if m is None:
                rest.append(lf)
            elif int(m["index"]) < self.count:
                self.workers[int(m["index"])].store.append(_Stored(m["name"], lf.fd))
            else:
                log.error("stored_fds_of_missing_worker", name=lf.name,
                          hint=f"kept in the service manager's store; run with workers >= {int(m['index']) + 1}")
                os.close(lf.fd)
        inherited = sort_inherited(rest)
        for lf in inherited.unknown:
            log.warning("unknown_fd_closed", name=lf.name, fd=lf.fd)
            os.close(lf.fd)
        for sid, kinds in inherited.sessions.items():
            for kind, fd in kinds.items():
                name = f"{sid}.{kind}"
                self.workers[0].store.append(_Stored(name, fd))
                if self.upstream.enabled:  # rename in our manager's store: it is worker 0's now
                    systemd.store_fd(f"w0.{name}", fd, poll=kind == "conn")
                    systemd.remove_fds(name)
        sock, self.owns_path = _listening_socket(inherited, self.config, self.upstream)
        if sock is None:
            sock = bind_unix(self.config.listen, backlog=128, key="listen")
            self.upstream.store_listener(sock.fileno())
        self.sock = sock

    def _spawn(self, w: Worker) -> None:
        """Start worker ``w`` with the listening socket and its stored descriptors as fd 3..."""
        assert self.sock is not None
        fds = [self.sock.fileno(), *(s.fd for s in w.store)]
        names = [LISTEN_FD_NAME, *(s.name for s in w.store)]
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3 + len(fds)) for fd in fds]  # above the targets
        env = {k: v for k, v in os.environ.items()
               if k not in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "WATCHDOG_PID", "WATCHDOG_USEC")}
        env.update(NOTIFY_SOCKET=w.notify_path, LISTEN_FDS=str(len(fds)), LISTEN_FDNAMES=":".join(names))
        env[WORKER_ENV] = str(w.index)
        env[PARENT_ENV] = str(os.getpid())
        env[LOAD_ENV] = self.load_path
        if self._watchdog_usec:
            env["WATCHDOG_USEC"] = str(self._watchdog_usec)
        argv = ["/bin/sh", "-c", _EXEC_WRAPPER, "uffdd-worker", sys.executable, "-m", "uffdd", "run",
                "-c", self.config_path]
        try:
            pid = os.posix_spawn(argv[0], argv, env,
                                 file_actions=[(os.POSIX_SPAWN_DUP2, h, 3 + i) for i, h in enumerate(high)])
        finally:
            for h in high:
                os.close(h)
        w.pid, w.pidfd = pid, os.pidfd_open(pid)
        w.started_at = time.monotonic()
        w.starts += 1
        w.ready = False
        w.watchdog_deadline = None
        asyncio.get_running_loop().add_reader(w.pidfd, self._reap, w)
        log.info("worker_started", worker=w.index, pid=pid, start=w.starts, stored_fds=len(w.store))

    # --- a worker's notify socket ---------------------------------------------------------------
    def _read_notify(self, w: Worker, *, dead_pid: int | None = None) -> None:
        while True:
            try:
                data, anc, flags, _ = w.notify.recvmsg(4096, ancillary_space(253, credentials=True))
            except (BlockingIOError, InterruptedError):
                return
            fds, pid = parse_ancillary(anc)
            sender_ok = pid == w.pid or (dead_pid is not None and pid in (dead_pid, 0))
            if not sender_ok or flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                log.warning("worker_notify_refused", worker=w.index, sender=pid, truncated=bool(flags))
                for fd in fds:
                    os.close(fd)
                continue
            self._dispatch(w, data, fds)

    def _dispatch(self, w: Worker, data: bytes, fds: list[int]) -> None:
        fields: dict[str, str] = {}
        for line in data.decode(errors="replace").split("\n"):
            key, sep, value = line.partition("=")
            if sep:
                fields[key] = value
        name = fields.get("FDNAME", "stored")
        if fields.get("FDSTORE") == "1" and fds and systemd.fdname_is_valid(name):
            for fd in fds:
                w.store.append(_Stored(name, fd))
                if self.upstream.enabled:
                    systemd.store_fd(f"w{w.index}.{name}", fd, poll=fields.get("FDPOLL") != "0")
        else:
            for fd in fds:
                os.close(fd)
        if fields.get("FDSTOREREMOVE") == "1" and "FDNAME" in fields:
            for s in [s for s in w.store if s.name == name]:
                w.store.remove(s)
                os.close(s.fd)
            if self.upstream.enabled:
                systemd.remove_fds(f"w{w.index}.{name}")
        if "STATUS" in fields:
            w.status = fields["STATUS"]
            self._status_soon()
        if fields.get("RELOADING") == "1":
            w.reloading = True
        elif fields.get("READY") == "1":
            w.ready, w.reloading = True, False
            if self._watchdog_usec and w.watchdog_deadline is None:
                w.watchdog_deadline = time.monotonic() + self._watchdog_usec / 1e6
            self._maybe_ready()
        if fields.get("WATCHDOG") == "1" and self._watchdog_usec:
            w.watchdog_deadline = time.monotonic() + self._watchdog_usec / 1e6

    def _maybe_ready(self) -> None:
        if not all(w.ready and not w.reloading for w in self.workers):
            return
        if not self.ready_sent:
            self.ready_sent = True
            log.info("workers_ready", workers=self.count, pids=[w.pid for w in self.workers])
            systemd.notify("READY=1", f"STATUS={self.status_line()}", f"MAINPID={os.getpid()}")
        elif self.reloading:
            self.reloading = False
            systemd.notify("READY=1", f"STATUS={self.status_line()}")

    # --- a worker's end -------------------------------------------------------------------------
    def _reap(self, w: Worker) -> None:
        loop = asyncio.get_running_loop()
        assert w.pid is not None and w.pidfd is not None
        loop.remove_reader(w.pidfd)
        os.close(w.pidfd)
        _, status = os.waitpid(w.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        dead = w.pid
        # What it sent before it died is still queued: take it (FDSTOREs above all) first.
        self._read_notify(w, dead_pid=dead)
        w.pid = w.pidfd = None
        w.ready = False
        w.watchdog_deadline = None
        w.exits.append(code)
        if self.stopping:
            log.info("worker_exited", worker=w.index, pid=dead, code=code, stored_fds=len(w.store))
            if all(x.pid is None for x in self.workers):
                self._exited.set()
            return
        delay = QUICK_DEATH_S if time.monotonic() - w.started_at < QUICK_DEATH_S else RESTART_DELAY_S
        log.warning("worker_died", worker=w.index, pid=dead, code=code, stored_fds=len(w.store),
                    restart_in_s=delay)
        self._status_soon()
        loop.call_later(delay, self._respawn, w)

    def _respawn(self, w: Worker) -> None:
        if not self.stopping and w.pid is None:
            self._spawn(w)

    def _check_watchdogs(self) -> None:
        now = time.monotonic()
        for w in self.workers:
            if w.pid is not None and w.watchdog_deadline is not None and now >= w.watchdog_deadline:
                log.error("worker_watchdog", worker=w.index, pid=w.pid, hint="aborting it; it is replaced")
                w.watchdog_deadline = None
                pid = w.pid
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGABRT)
                asyncio.get_running_loop().call_later(ABORT_TIMEOUT_S, self._kill_if_alive, w, pid)

    @staticmethod
    def _kill_if_alive(w: Worker, pid: int) -> None:
        if w.pid == pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def signal_workers(self, sig: int) -> None:
        for w in self.workers:
            if w.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.pid, sig)

    # --- what the parent shows ------------------------------------------------------------------
    def status_line(self) -> str:
        totals: Counter[str] = Counter()
        for w in self.workers:
            for m in _COUNT_RE.finditer(w.status):
                totals[m[2]] += int(m[1])
        up = sum(1 for w in self.workers if w.ready)
        line = (f"{totals['session(s)']} session(s), {totals['page(s) to go']} page(s) to go; "
                f"{totals['served']} served; {totals['faults']} faults")
        if totals["resumed"]:
            line += f"; {totals['resumed']} resumed"
        restarts = sum(max(w.starts - 1, 0) for w in self.workers)
        return line + f"; {up}/{self.count} worker(s) up" + (f", {restarts} replaced" if restarts else "")

    def send_status(self) -> None:
        line = self.status_line()
        if line != self._status_sent and self.ready_sent:
            self._status_sent = line
            systemd.notify(f"STATUS={line}")

    def _status_soon(self) -> None:
        if self._status_handle is None:
            def send() -> None:
                self._status_handle = None
                self.send_status()

            self._status_handle = asyncio.get_running_loop().call_later(0.05, send)

    def snapshot(self) -> dict[str, Any]:
        """The parent's answer on the control socket: the workers; their sessions are on theirs."""
        return {"pid": os.getpid(), "version": __version__, "listen": self.config.listen,
                "uptime_s": round(time.monotonic() - self.started, 3), "status": self.status_line(), "sessions": [],
                "workers": [{"index": w.index, "pid": w.pid, "ready": w.ready, "starts": w.starts,
                             "exits": w.exits, "stored_fds": len(w.store), "status": w.status,
                             "control": worker_config(self.config, w.index).control_path} for w in self.workers]}

    # --- the whole run --------------------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for i in range(self.count):
            path = os.path.join(self._dir.name, f"notify.{i}")
            ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            ns.bind(path)
            ns.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            ns.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            ns.setblocking(False)
            self.workers.append(Worker(index=i, notify=ns, notify_path=path))
        control = ControlServer(self.config.control_path, self.snapshot)
        timers: list[_Every] = []
        try:
            self._take_inherited()
            for w in self.workers:
                loop.add_reader(w.notify.fileno(), self._read_notify, w)
            for w in self.workers:
                self._spawn(w)
            await control.start()
            stop_signals = 0

            def on_stop(signum: int) -> None:
                nonlocal stop_signals
                stop_signals += 1
                if not self.stopping:
                    self.stopping = True
                    systemd.notify("STOPPING=1")
                log.info("signal", signal=signal.Signals(signum).name, forwarded_to=[w.pid for w in self.workers])
                self.signal_workers(signal.SIGTERM)
                if all(w.pid is None for w in self.workers):
                    self._exited.set()

            def on_hup() -> None:
                self.reloading = True
                systemd.notify("RELOADING=1", f"MONOTONIC_USEC={systemd.monotonic_usec()}")
                for w in self.workers:
                    w.reloading = w.pid is not None
                self.signal_workers(signal.SIGHUP)
                self._maybe_ready()

            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, on_stop, sig)
            loop.add_signal_handler(signal.SIGHUP, on_hup)
            watchdog = _start_watchdog(loop)
            if watchdog is not None:
                timers.append(watchdog)
            timers.append(_Every(loop, STATUS_INTERVAL_S, self.send_status))
            if self._watchdog_usec:
                timers.append(_Every(loop, self._watchdog_usec / 4e6, self._check_watchdogs))
            log.info("workers_starting", workers=self.count, socket=self.config.listen,
                     control=self.config.control_path, fd_store=self.upstream.enabled)
            await self._exited.wait()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            for t in timers:
                t.cancel()
            if self._status_handle is not None:
                self._status_handle.cancel()
            self.stopping = True
            self._kill_all(loop)
            await control.close()
            self._close(loop)
        return 0

    def _kill_all(self, loop: asyncio.AbstractEventLoop) -> None:
        """On an error of our own: leave no worker behind."""
        for w in self.workers:
            if w.pid is not None and w.pidfd is not None:
                loop.remove_reader(w.pidfd)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.pid, signal.SIGKILL)
                os.waitpid(w.pid, 0)
                os.close(w.pidfd)
                w.pid = w.pidfd = None

    def _close(self, loop: asyncio.AbstractEventLoop) -> None:
        """Drop our socket (its file too, unless sessions wait in the store for a successor)."""
        kept = sum(len(w.store) for w in self.workers)
        for w in self.workers:
            loop.remove_reader(w.notify.fileno())
            w.notify.close()
            for s in w.store:
                os.close(s.fd)
            w.store.clear()
        if self.sock is not None:
            handing_over = kept > 0 and self.upstream.enabled
            if not handing_over:
                self.upstream.remove_listener()
            self.sock.close()
            if self.owns_path and not handing_over:
                with contextlib.suppress(OSError):
                    os.unlink(self.config.listen)
        self._dir.cleanup()
        log.info("stopped", workers=self.count, replaced=sum(max(w.starts - 1, 0) for w in self.workers),
                 handed_over_fds=kept if self.upstream.enabled else 0)


async def supervise(config: Config, *, config_path: str, count: int) -> int:
    """Run ``count`` workers until SIGTERM/SIGINT and they have all exited."""
    return await WorkerPool(config, config_path, count).run()
