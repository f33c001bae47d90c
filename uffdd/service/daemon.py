"""`uffdd run`: the service shell around the listener, as phases you can read at a glance.

:meth:`Daemon.serve` is :meth:`~Daemon.startup` (take what the service manager passed, bind or
take the socket, resume stored sessions, start the control socket and metrics, say READY),
:meth:`~Daemon.main_loop` (until SIGTERM/SIGINT; SIGHUP runs :meth:`~Daemon.reload`), and
:meth:`~Daemon.shutdown` (STOPPING, then hand the sessions over or wait for them). Everything
start-up opens is closed on the way out, in reverse order, whatever happened.

The worker supervisor (uffdd.service.supervisor) runs a Daemon in each worker, adjusting it
through the hooks :meth:`~Daemon.make_listener`, :meth:`~Daemon.adjust` and
:meth:`~Daemon.status_lines`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from typing import Any

import structlog

from uffdd import __version__, logs
from uffdd.config import Config, load_config
from uffdd.errors import ConfigError, StartupError
from uffdd.service import systemd
from uffdd.service.control import ControlServer
from uffdd.service.fdstore import FdStore, listening_socket, sort_inherited
from uffdd.service.listener import Listener
from uffdd.service.manager import StatusCounts, StatusReporter, install_signals, start_watchdog
from uffdd.service.metrics import make_registry
from uffdd.sockclaim import Claims, prepare_unix

log = structlog.get_logger("uffdd.daemon")


class Daemon:
    """One run of the service: start-up, main loop, reload, shutdown (see the module docstring)."""

    def __init__(self, config: Config, *, config_path: str | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.started = time.monotonic()
        self.listener: Listener | None = None
        self.store = FdStore(enabled=False)
        self.reloads = 0
        self.should_exit = asyncio.Event()
        """Set by the first SIGTERM/SIGINT: stop accepting, then end as ShutdownConfig says."""
        self.force_exit = asyncio.Event()
        """Set by a second one: stop waiting for the sessions."""
        self.status = StatusReporter(self.status_lines)
        self._reload_requested = asyncio.Event()
        self._exit_stack = contextlib.AsyncExitStack()

    # --- hooks (a worker overrides them) ----------------------------------------------------
    def make_listener(self, sock: socket.socket | None, owns_path: bool, store: FdStore) -> Listener:
        return Listener(self.config, sock=sock, owns_path=owns_path, store=store)

    def adjust(self, config: Config) -> Config:
        """Applied to a reloaded config before it takes effect."""
        return config

    def status_lines(self) -> list[str]:
        """The assignments of our status message."""
        return [f"STATUS={self.status_line()}"]

    # --- the run ----------------------------------------------------------------------------
    async def serve(self, ready: asyncio.Event | None = None) -> int:
        """Run until SIGTERM/SIGINT; see ShutdownConfig for what happens to live sessions."""
        async with self._exit_stack:
            await self.startup()
            if ready is not None:
                ready.set()
            await self.main_loop()
            await self.shutdown()
        assert self.listener is not None
        log.info("stopped", sessions_served=self.listener.sessions_total, handed_over=self.listener.handing_over)
        return 0

    async def startup(self) -> None:
        """Everything up to READY=1; each part opened here is closed by the exit stack."""
        loop = asyncio.get_running_loop()
        listener, control_sock = await self._start_listener()
        control = ControlServer(self.control_path, self.snapshot)
        await control.start(control_sock)
        self._exit_stack.push_async_callback(control.close)
        self._exit_stack.callback(install_signals(loop, stop=self._on_stop_signal, reload=self._reload_requested.set))
        watchdog = start_watchdog(loop)
        if watchdog is not None:
            self._exit_stack.callback(watchdog.cancel)
        self.status.start(loop)
        self._exit_stack.callback(self.status.stop)
        log.info("listening", socket=listener.path, control=self.control_path, version=__version__,
                 sources=sorted(self.config.sources), metrics=self.config.metrics.listen, fd_store=self.store.enabled,
                 resumed=listener.sessions_resumed)
        if not self.store.enabled:
            log.info("fd_store_unavailable", hint="no service manager ($NOTIFY_SOCKET): sessions end with the daemon")
        self.status.send("READY=1", f"MAINPID={os.getpid()}")

    async def _start_listener(self) -> tuple[Listener, socket.socket]:
        """Take the descriptors the manager passed, claim our sockets and the metrics port, then
        listen (resuming stored sessions first). Returns the listener and the control socket."""
        inherited = sort_inherited(systemd.listen_fds())
        inherited.close_unknown()
        self.store = FdStore()
        self._exit_stack.callback(self.store.close)
        sock, owns_path = listening_socket(inherited, self.config.listen, self.store)
        listener, control_sock = self._claim_sockets(sock, owns_path)
        self.listener = listener
        # Only now that the paths are ours may closing the listener remove its socket file.
        self._exit_stack.push_async_callback(listener.close)
        listener.on_change = self.status.soon
        if inherited.sessions:
            # Before accepting: new sessions must not take the ids (and fd names) of stored ones.
            log.info("resuming", sessions=sorted(inherited.sessions))
            await listener.resume(inherited)
        await listener.start()
        return listener, control_sock

    def _claim_sockets(self, sock: socket.socket | None, owns_path: bool) -> tuple[Listener, socket.socket]:
        """Bind everything that can fail (the VMM socket unless inherited, the control socket, the
        metrics port) before any stale socket file is replaced; a socket a live process answers
        on stops start-up (StartupError) and is left alone."""
        claims = Claims()
        try:
            fresh = sock is None
            if sock is None:
                sock = claims.add(prepare_unix(self.config.listen, backlog=128, key="listen"))
            control_sock = claims.add(prepare_unix(self.control_path, backlog=16, key="control.listen"))
            listener = self.make_listener(sock, owns_path, self.store)
            self._start_metrics(listener)
            claims.commit()
        except BaseException:
            claims.abort()
            if sock is not None:
                sock.close()  # an inherited socket: closed, its file untouched
            raise
        if fresh:
            self.store.store_listener(sock.fileno())
        return listener, control_sock

    def _start_metrics(self, listener: Listener) -> None:
        """Serve metrics; StartupError (before anything is replaced) if the port cannot be bound."""
        address = self.config.metrics.address
        if address is None:
            return
        from prometheus_client import start_http_server

        try:
            server, _ = start_http_server(address[1], addr=address[0], registry=make_registry(listener))
        except OSError as exc:
            raise StartupError(f"metrics.listen: cannot bind {self.config.metrics.listen}: "
                               f"{exc.strerror or exc}") from None
        self._exit_stack.callback(server.shutdown)

    def _on_stop_signal(self, signum: int) -> None:
        if self.should_exit.is_set():
            self.force_exit.set()
        self.should_exit.set()
        log.info("signal", signal=signal.Signals(signum).name,
                 sessions=len(self.listener.sessions) if self.listener else 0)

    async def main_loop(self) -> None:
        """Until SIGTERM/SIGINT. Each SIGHUP asks for a reload; they run one at a time, and
        signals that arrive during one make one more."""
        async with asyncio.TaskGroup() as tasks:
            reloader = tasks.create_task(self._reload_when_asked())
            await self.should_exit.wait()
            reloader.cancel()

    async def _reload_when_asked(self) -> None:
        while True:
            await self._reload_requested.wait()
            self._reload_requested.clear()
            try:
                await self.reload()
            except Exception as exc:  # a bug, not a bad file: say so loudly, and keep serving
                log.exception("reload_failed", error=repr(exc))
                systemd.notify("READY=1", f"STATUS=reload failed: {exc!r}"[:1000])
                self.status.forget()

    async def shutdown(self) -> None:
        """Stop accepting; hand the sessions over to the fd store, or wait for them to end."""
        listener = self.listener
        assert listener is not None
        systemd.notify("STOPPING=1")
        if self.config.shutdown.on_sigterm == "handover" and self.store.enabled:
            log.info("handing_over", sessions=sorted(listener.sessions))
            await listener.hand_over()
            return
        await listener.stop_accepting()
        if not listener.sessions and not listener.handshakes_in_flight:  # a VMM in its handshake may
            return  # already run its guest (Firecracker does not wait for "ready"): it is waited for too
        log.warning("waiting_for_sessions", sessions=sorted(listener.sessions),
                    hint="send the signal again to " + ("hand them over to the fd store" if self.store.enabled
                                                        else "end them now (their guests lose their pages)"))
        async with asyncio.TaskGroup() as tasks:
            ended = tasks.create_task(listener.wait_sessions())
            forced = tasks.create_task(self.force_exit.wait())
            await asyncio.wait({ended, forced}, return_when=asyncio.FIRST_COMPLETED)
            ended.cancel()
            forced.cancel()
        if self.force_exit.is_set() and self.store.enabled:
            log.info("handing_over", sessions=sorted(listener.sessions))
            await listener.hand_over()

    # --- reload -------------------------------------------------------------------------------
    async def reload(self) -> None:
        """SIGHUP: read the config again. New sessions use it; live sessions keep theirs."""
        systemd.notify("RELOADING=1", f"MONOTONIC_USEC={systemd.monotonic_usec()}")
        assert self.listener is not None
        try:
            if self.config_path is None:
                raise ConfigError("no config file to reload (started without one)")
            new = self.adjust(await asyncio.to_thread(load_config, self.config_path))
        except ConfigError as exc:
            log.error("reload_failed", error=str(exc), hint="the previous configuration stays in force")
            systemd.notify("READY=1", f"STATUS=reload failed, previous configuration kept: {exc}"[:1000])
            self.status.forget()
            return
        for key in ("listen", "metrics", "control"):
            if getattr(new, key) != getattr(self.config, key):
                log.warning("reload_needs_restart", key=key, hint=f"{key}: changes take effect on the next start")
        new = new.model_copy(update={"listen": self.config.listen, "metrics": self.config.metrics,
                                     "control": self.config.control})
        self.config = new
        self.listener.config = new
        logs.configure(new.log.format, new.log.level)
        self.reloads += 1
        log.info("reloaded", sources=sorted(new.sources))
        await self.listener.retry_unresumed()
        self.status.send("READY=1")

    # --- what we show -------------------------------------------------------------------------
    @property
    def control_path(self) -> str:
        path = self.config.control_path
        return path if path != self.config.listen else path + ".ctl"

    def counts(self) -> StatusCounts:
        lst = self.listener
        if lst is None:
            return StatusCounts()
        live = list(lst.sessions.values())
        return StatusCounts(sessions=len(live), pages_to_go=sum(s.pages_remaining for s in live),
                            served=lst.sessions_total,
                            faults=sum(s.stats.fault_msgs for s in live) + lst.ended_totals.fault_msgs,
                            resumed=lst.sessions_resumed, unresumed=len(lst.unresumed))

    def status_line(self) -> str:
        return "starting" if self.listener is None else self.counts().line()

    def snapshot(self) -> dict[str, Any]:
        """What `uffdd status` shows."""
        lst = self.listener
        assert lst is not None
        rows = []
        for s in list(lst.sessions.values()):
            st = s.stats
            rows.append({
                "session": s.id, "vm_id": s.vm_id, "source": s.handshake.source, "kind": lst.source_kind(s),
                "pages_total": st.pages_total, "pages_filled": st.pages_filled, "pages_remaining": s.pages_remaining,
                "faults": st.fault_msgs, "p99_us_le": st.latency_quantile(0.99),
                "blocked_ms": round(st.blocked_ns / 1e6, 3), "resumed": s.resumed, "completed": s.completed,
                "seconds": round(time.monotonic() - st.started, 3)})
        return {"pid": os.getpid(), "version": __version__, "listen": lst.path,
                "uptime_s": round(time.monotonic() - self.started, 3), "status": self.status_line(),
                "sessions": rows, "sessions_total": lst.sessions_total, "sessions_resumed": lst.sessions_resumed,
                "waiting_complete": sorted(lst.waiting_complete), "unresumed": sorted(lst.unresumed),
                "handshakes_refused": lst.handshakes_refused, "handshakes_resumed": lst.handshakes_resumed,
                "fd_store": lst.store.enabled, "reloads": self.reloads,
                "healthy": lst.accept_error is None, "accept_error": lst.accept_error,
                "accept_failures": lst.accept_failures, "handshakes_pending": lst.handshakes_pending,
                "mapped_bytes": lst.mapped_bytes}


async def serve(config: Config, *, config_path: str | None = None, ready: asyncio.Event | None = None) -> int:
    """`uffdd run` in a single process: one :class:`Daemon` until SIGTERM/SIGINT."""
    return await Daemon(config, config_path=config_path).serve(ready)
