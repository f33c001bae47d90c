"""The parent: starts, watches and replaces the workers (see the package docstring).

Like the daemon, :meth:`WorkerPool.serve` is start-up, a main loop (until every worker has
exited after SIGTERM/SIGINT) and the way out, where everything start-up opened is closed in
reverse order and no worker is left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from typing import Any

import structlog

from uffdd import __version__
from uffdd.config import Config
from uffdd.service import systemd
from uffdd.service.control import ControlServer
from uffdd.service.fdstore import FdStore, listening_socket, sort_inherited
from uffdd.service.manager import Every, StatusCounts, StatusReporter, install_signals, start_watchdog
from uffdd.service.supervisor.notify import NOTIFY_NAME_RE, PREFIX_RE, Stored, Worker, read_messages
from uffdd.service.supervisor.shared import LISTEN_FD_NAME, LOAD_ENV, PARENT_ENV, WORKER_ENV, LoadTable
from uffdd.service.supervisor.worker import worker_config
from uffdd.sockclaim import check_tcp_port, check_unix_path, prepare_unix
from uffdd.unixsock import bind_unix

log = structlog.get_logger("uffdd.workers")

RESTART_DELAY_S = 0.1
QUICK_DEATH_S = 1.0
"""A worker that dies sooner than this after its start is restarted after a second, not at once."""
ABORT_TIMEOUT_S = 5.0
# Runs as the worker's pid, so LISTEN_PID can name it (systemd sets it between fork and exec).
_EXEC_WRAPPER = 'LISTEN_PID=$$; export LISTEN_PID; exec "$@"'
_INHERITED_ENV = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "WATCHDOG_PID", "WATCHDOG_USEC")


class WorkerPool:
    """The service manager of ``count`` worker processes, and a Type=notify service itself."""

    def __init__(self, config: Config, config_path: str, count: int) -> None:
        self.config = config
        self.config_path = config_path
        self.count = count
        self.started = time.monotonic()
        self.stopping = False
        self.ready_sent = False
        self.reloading = False
        self.upstream = FdStore()
        self.workers: list[Worker] = []
        self.sock: socket.socket | None = None
        self.owns_path = True
        self.status = StatusReporter(lambda: [f"STATUS={self.status_line()}"])
        self.status.enabled = False  # nothing upwards before READY=1
        self._exited = asyncio.Event()
        self._watchdog_usec = systemd.watchdog_usec()
        self._dir = tempfile.TemporaryDirectory(prefix="uffdd-workers-")
        self.load_path = os.path.join(self._dir.name, "load")
        self._exit_stack = contextlib.AsyncExitStack()

    # --- the run ----------------------------------------------------------------------------
    async def serve(self) -> int:
        async with self._exit_stack:
            self._exit_stack.callback(self._close)
            await self.startup()
            await self._exited.wait()
        return 0

    async def startup(self) -> None:
        """Notify sockets, the inherited descriptors, the workers, then our own control socket,
        signals and timers; each is undone by the exit stack."""
        loop = asyncio.get_running_loop()
        LoadTable.create(self.load_path, self.count)
        self.workers = [Worker.open(i, os.path.join(self._dir.name, f"notify.{i}")) for i in range(self.count)]
        # Everything that can fail is tried before the VMM socket is replaced: the workers' control
        # sockets and metrics ports, and ours (a live one stops us).
        self._check_worker_binds()
        control_claim = prepare_unix(self.config.control_path, backlog=16, key="control.listen")
        try:
            self._take_inherited()
            control_sock = control_claim.commit()
        except BaseException:
            control_claim.abort()
            raise
        for w in self.workers:
            if self.upstream.enabled:  # what a worker sends us outlives us (see .notify)
                systemd.store_fd(f"notify.{w.index}", w.notify.fileno(), poll=False)
            loop.add_reader(w.notify.fileno(), self._on_notify, w)
        self._exit_stack.callback(self._kill_all)
        for w in self.workers:
            self._spawn(w)
        control = ControlServer(self.config.control_path, self.snapshot)
        await control.start(control_sock)
        self._exit_stack.push_async_callback(control.close)
        self._exit_stack.callback(install_signals(loop, stop=self._on_stop_signal, reload=self._on_reload_signal))
        self._start_timers(loop)
        log.info("workers_starting", workers=self.count, socket=self.config.listen,
                 control=self.config.control_path, fd_store=self.upstream.enabled)

    def _check_worker_binds(self) -> None:
        """StartupError if a worker could not bind its control socket (a live process answers on
        it) or its metrics port: it would fail only after our sockets had been replaced."""
        for i in range(self.count):
            wc = worker_config(self.config, i)
            check_unix_path(wc.control_path, key=f"control.listen (worker {i})")
            if wc.metrics.address is not None and wc.metrics.address[1]:
                check_tcp_port(wc.metrics.address, key=f"metrics.listen (worker {i})")

    def _start_timers(self, loop: asyncio.AbstractEventLoop) -> None:
        watchdog = start_watchdog(loop)
        if watchdog is not None:
            self._exit_stack.callback(watchdog.cancel)
        self.status.start(loop)
        self._exit_stack.callback(self.status.stop)
        if self._watchdog_usec:
            self._exit_stack.callback(Every(loop, self._watchdog_usec / 4e6, self._check_watchdogs).cancel)

    def _take_inherited(self) -> None:
        """Sort what our manager passed: our socket, and the stored sets of earlier workers (or
        of a single-process predecessor, whose sessions go to worker 0)."""
        rest: list[systemd.ListenFd] = []
        notify: list[tuple[int, int]] = []
        for lf in systemd.listen_fds():
            m = PREFIX_RE.fullmatch(lf.name)
            n = NOTIFY_NAME_RE.fullmatch(lf.name)
            if n is not None:
                notify.append((int(n["index"]), lf.fd))
            elif m is None:
                rest.append(lf)
            elif int(m["index"]) < self.count:
                self.workers[int(m["index"])].store.append(Stored(m["name"], lf.fd))
            else:
                log.error("stored_fds_of_missing_worker", name=lf.name,
                          hint=f"kept in the service manager's store; run with workers >= {int(m['index']) + 1}")
                os.close(lf.fd)
        for index, fd in notify:  # after the stored sets: what is queued there came later
            self._drain_inherited_notify(index, fd)
        inherited = sort_inherited(rest)
        inherited.close_unknown()
        for sid, kinds in inherited.sessions.items():
            for kind, fd in kinds.items():
                name = f"{sid}.{kind}"
                self.workers[0].store.append(Stored(name, fd))
                if self.upstream.enabled:  # rename in our manager's store: it is worker 0's now
                    systemd.store_fd(f"w0.{name}", fd, poll=kind == "conn")
                    systemd.remove_fds(name)
        sock, self.owns_path = listening_socket(inherited, self.config.listen, self.upstream)
        if sock is None:
            sock = bind_unix(self.config.listen, backlog=128, key="listen")
            self.upstream.store_listener(sock.fileno())
        self.sock = sock

    def _drain_inherited_notify(self, index: int, fd: int) -> None:
        """What a worker of our predecessor sent that it had not handled when it died: its
        descriptors go into that worker's store (and our manager's) before any worker starts.
        Then the old socket and its directory go."""
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        path = sock.getsockname()
        if index < self.count:
            w, taken = self.workers[index], 0
            for fields, fds in read_messages(sock, lambda pid: True, lambda pid, flags: None):
                w.keep_fds(fields, fds, mirror=self.upstream.enabled)
                taken += 1
            if taken:
                log.info("worker_notify_backlog", worker=index, messages=taken, stored_fds=len(w.store))
        else:
            log.error("notify_socket_of_missing_worker", worker=index, hint="what it holds is dropped")
        sock.close()
        if self.upstream.enabled:
            systemd.remove_fds(f"notify.{index}")
        if isinstance(path, str) and os.path.basename(os.path.dirname(path)).startswith("uffdd-workers-"):
            shutil.rmtree(os.path.dirname(path), ignore_errors=True)

    # --- signals ------------------------------------------------------------------------------
    def _on_stop_signal(self, signum: int) -> None:
        if not self.stopping:
            self.stopping = True
            systemd.notify("STOPPING=1")
        log.info("signal", signal=signal.Signals(signum).name, forwarded_to=[w.pid for w in self.workers])
        self.signal_workers(signal.SIGTERM)
        if all(w.pid is None for w in self.workers):
            self._exited.set()

    def _on_reload_signal(self) -> None:
        self.reloading = True
        systemd.notify("RELOADING=1", f"MONOTONIC_USEC={systemd.monotonic_usec()}")
        for w in self.workers:
            w.reloading = w.pid is not None
        self.signal_workers(signal.SIGHUP)
        self._maybe_ready()

    def signal_workers(self, sig: int) -> None:
        for w in self.workers:
            if w.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.pid, sig)

    # --- a worker's start -------------------------------------------------------------------
    def _spawn(self, w: Worker) -> None:
        """Start worker ``w`` with the listening socket and its stored descriptors as fd 3..."""
        assert self.sock is not None
        fds = [self.sock.fileno(), *(s.fd for s in w.store)]
        names = [LISTEN_FD_NAME, *(s.name for s in w.store)]
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3 + len(fds)) for fd in fds]  # above the targets
        env = {k: v for k, v in os.environ.items() if k not in _INHERITED_ENV}
        env.update(NOTIFY_SOCKET=w.notify_path, LISTEN_FDS=str(len(fds)), LISTEN_FDNAMES=":".join(names))
        env.update({WORKER_ENV: str(w.index), PARENT_ENV: str(os.getpid()), LOAD_ENV: self.load_path})
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

    # --- what a worker says -----------------------------------------------------------------
    def _on_notify(self, w: Worker, *, dead_pid: int | None = None) -> None:
        for fields, fds in w.messages(dead_pid=dead_pid):
            w.keep_fds(fields, fds, mirror=self.upstream.enabled)
            changed, ready = w.apply(fields, watchdog_usec=self._watchdog_usec)
            if changed:
                self.status.soon()
            if ready:
                self._maybe_ready()

    def _maybe_ready(self) -> None:
        if not all(w.ready and not w.reloading for w in self.workers):
            return
        if not self.ready_sent:
            self.ready_sent = self.status.enabled = True
            log.info("workers_ready", workers=self.count, pids=[w.pid for w in self.workers])
            self.status.send("READY=1", f"MAINPID={os.getpid()}")
        elif self.reloading:
            self.reloading = False
            self.status.send("READY=1")

    # --- a worker's end -----------------------------------------------------------------------
    def _reap(self, w: Worker) -> None:
        loop = asyncio.get_running_loop()
        assert w.pid is not None and w.pidfd is not None
        loop.remove_reader(w.pidfd)
        os.close(w.pidfd)
        _, status = os.waitpid(w.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        dead = w.pid
        # What it sent before it died is still queued: take it (FDSTOREs above all) first.
        self._on_notify(w, dead_pid=dead)
        w.exited(code)
        if self.stopping:
            log.info("worker_exited", worker=w.index, pid=dead, code=code, stored_fds=len(w.store))
            if all(x.pid is None for x in self.workers):
                self._exited.set()
            return
        delay = QUICK_DEATH_S if time.monotonic() - w.started_at < QUICK_DEATH_S else RESTART_DELAY_S
        log.warning("worker_died", worker=w.index, pid=dead, code=code, stored_fds=len(w.store),
                    restart_in_s=delay)
        self.status.soon()
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
                asyncio.get_running_loop().call_later(ABORT_TIMEOUT_S, _kill_if_alive, w, pid)

    # --- what the parent shows ----------------------------------------------------------------
    def status_line(self) -> str:
        counts = sum((w.counts for w in self.workers), StatusCounts())
        up = sum(1 for w in self.workers if w.ready)
        restarts = sum(max(w.starts - 1, 0) for w in self.workers)
        return counts.line() + f"; {up}/{self.count} worker(s) up" + (f", {restarts} replaced" if restarts else "")

    def snapshot(self) -> dict[str, Any]:
        """The parent's answer on the control socket: the workers; their sessions are on theirs."""
        return {"pid": os.getpid(), "version": __version__, "listen": self.config.listen,
                "uptime_s": round(time.monotonic() - self.started, 3), "status": self.status_line(), "sessions": [],
                "workers": [{"index": w.index, "pid": w.pid, "ready": w.ready, "starts": w.starts,
                             "exits": w.exits, "stored_fds": len(w.store), "status": w.status,
                             "control": worker_config(self.config, w.index).control_path} for w in self.workers]}

    # --- the way out --------------------------------------------------------------------------
    def _kill_all(self) -> None:
        """On an error of our own: leave no worker behind."""
        self.stopping = True
        loop = asyncio.get_running_loop()
        for w in self.workers:
            if w.pid is not None and w.pidfd is not None:
                loop.remove_reader(w.pidfd)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.pid, signal.SIGKILL)
                os.waitpid(w.pid, 0)
                os.close(w.pidfd)
                w.pid = w.pidfd = None

    def _close(self) -> None:
        """Drop our socket (its file too, unless sessions wait in the store for a successor)."""
        kept = sum(len(w.store) for w in self.workers)
        loop = asyncio.get_running_loop()
        for w in self.workers:
            loop.remove_reader(w.notify.fileno())
            if self.upstream.enabled:
                systemd.remove_fds(f"notify.{w.index}")
            w.close()
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


def _kill_if_alive(w: Worker, pid: int) -> None:
    if w.pid == pid:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
