"""`uffdd run`: the service shell around the listener.

It speaks to the service manager (READY/STATUS/STOPPING/RELOADING, the watchdog, socket
activation, the fd store that lets sessions survive a restart), handles signals (SIGTERM and
SIGINT stop, SIGHUP reloads the config), and serves metrics and the control socket.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

import structlog

from uffdd import __version__, logs
from uffdd.config import Config, load_config
from uffdd.errors import ConfigError
from uffdd.service import systemd
from uffdd.service.control import ControlServer
from uffdd.service.fdstore import FdStore, Inherited, sort_inherited
from uffdd.service.listener import Listener
from uffdd.service.metrics import make_registry

log = structlog.get_logger("uffdd.daemon")

STATUS_INTERVAL_S = 2.0
"""STATUS= is refreshed at most this often while counts change (and at once on session changes)."""


def _listening_socket(inherited: Inherited, config: Config, store: FdStore) -> tuple[socket.socket | None, bool]:
    """The socket to accept on: ours from the fd store, else one from socket activation, else
    None (bind it). The bool says whether the socket file is ours to remove on a clean stop."""
    if inherited.stored_listener is not None and not inherited.listeners:
        sock = socket.socket(fileno=inherited.stored_listener)
        path = sock.getsockname()
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
        if name != config.listen:
            log.info("socket_activated", socket=name, configured=config.listen,
                     hint="the socket unit's path is used; listen: in the config is ignored")
        return sock, False
    return None, True


class Daemon:
    """One run of the service: everything :func:`serve` starts, and the STATUS= line."""

    def __init__(self, config: Config, config_path: str | None,
                 adjust: Callable[[Config], Config] | None = None) -> None:
        self.config = config
        self.adjust = adjust
        """Applied to a reloaded config (a worker's own control socket and metrics port)."""
        self.config_path = config_path
        self.started = time.monotonic()
        self.listener: Listener | None = None
        self.reloads = 0
        self._status_sent = ""
        self._status_handle: asyncio.TimerHandle | None = None

    def status_line(self) -> str:
        lst = self.listener
        if lst is None:
            return "starting"
        live = list(lst.sessions.values())
        remaining = sum(s.pages_remaining for s in live)
        faults = sum(s.stats.fault_msgs for s in live) + lst.ended_totals.fault_msgs
        parts = [f"{len(live)} session(s), {remaining} page(s) to go", f"{lst.sessions_total} served",
                 f"{faults} faults"]
        if lst.sessions_resumed:
            parts.append(f"{lst.sessions_resumed} resumed")
        if lst.unresumed:
            parts.append(f"{len(lst.unresumed)} NOT resumed (see log)")
        return "; ".join(parts)

    def send_status(self) -> None:
        line = self.status_line()
        if line != self._status_sent:
            self._status_sent = line
            systemd.notify(f"STATUS={line}")

    def status_soon(self) -> None:
        """Coalesce bursts of session changes into one STATUS= message."""
        if self._status_handle is None:
            loop = asyncio.get_running_loop()

            def send() -> None:
                self._status_handle = None
                self.send_status()

            self._status_handle = loop.call_later(0.05, send)

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
                "handshakes_refused": lst.handshakes_refused, "fd_store": lst.store.enabled, "reloads": self.reloads}

    async def reload(self) -> None:
        """SIGHUP: read the config again. New sessions use it; live sessions keep theirs."""
        systemd.notify("RELOADING=1", f"MONOTONIC_USEC={systemd.monotonic_usec()}")
        assert self.listener is not None
        try:
            if self.config_path is None:
                raise ConfigError("no config file to reload (started without one)")
            new = await asyncio.to_thread(load_config, self.config_path)
            if self.adjust is not None:
                new = self.adjust(new)
        except ConfigError as exc:
            log.error("reload_failed", error=str(exc), hint="the previous configuration stays in force")
            systemd.notify("READY=1", f"STATUS=reload failed, previous configuration kept: {exc}"[:1000])
            self._status_sent = ""
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
        self._status_sent = ""
        systemd.notify("READY=1", f"STATUS={self.status_line()}")
        self._status_sent = self.status_line()


class _Every:
    """Call ``fn`` every ``interval`` seconds on the loop until cancelled."""

    def __init__(self, loop: asyncio.AbstractEventLoop, interval: float, fn: Callable[[], object]) -> None:
        self._loop, self._interval, self._fn = loop, interval, fn
        self._handle = loop.call_later(interval, self._tick)

    def _tick(self) -> None:
        self._fn()
        self._handle = self._loop.call_later(self._interval, self._tick)

    def cancel(self) -> None:
        self._handle.cancel()


def _start_watchdog(loop: asyncio.AbstractEventLoop) -> _Every | None:
    """Ping the manager from the event loop itself at half the interval: a stalled loop (a
    blocking call on the fault path) stops the pings, and the manager restarts us."""
    usec = systemd.watchdog_usec()
    if usec is None:
        return None
    systemd.notify("WATCHDOG=1")
    log.info("watchdog", interval_s=usec / 2e6)
    return _Every(loop, usec / 2e6, lambda: systemd.notify("WATCHDOG=1"))


async def serve(config: Config, *, config_path: str | None = None, ready: asyncio.Event | None = None,
                adjust: Callable[[Config], Config] | None = None, listener_cls: type[Listener] = Listener) -> int:
    """Run until SIGTERM/SIGINT; see ShutdownConfig for what happens to live sessions."""
    loop = asyncio.get_running_loop()
    daemon = Daemon(config, config_path, adjust)
    inherited = sort_inherited(systemd.listen_fds())
    for lf in inherited.unknown:
        log.warning("unknown_fd_closed", name=lf.name, fd=lf.fd)
        os.close(lf.fd)
    store = FdStore()
    sock, owns_path = _listening_socket(inherited, config, store)
    listener = daemon.listener = listener_cls(config, sock=sock, owns_path=owns_path, store=store)
    listener.on_change = daemon.status_soon
    if inherited.sessions:
        # Before accepting: new sessions must not take the ids (and fd names) of stored ones.
        log.info("resuming", sessions=sorted(inherited.sessions))
        await listener.resume(inherited)
    await listener.start()
    control_path = config.control_path if config.control_path != config.listen else config.listen + ".ctl"
    control = ControlServer(control_path, daemon.snapshot)
    await control.start()
    metrics_server = None
    if config.metrics.address is not None:
        from prometheus_client import start_http_server

        host, port = config.metrics.address
        metrics_server, _ = start_http_server(port, addr=host, registry=make_registry(listener))
    stop = asyncio.Event()
    force = asyncio.Event()
    reloads: set[asyncio.Task[None]] = set()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            force.set()
        stop.set()
        log.info("signal", signal=signal.Signals(signum).name, sessions=len(listener.sessions))

    def on_hup() -> None:
        task = loop.create_task(daemon.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    watchdog = _start_watchdog(loop)

    log.info("listening", socket=listener.path, control=control_path, version=__version__,
             sources=sorted(config.sources), metrics=config.metrics.listen, fd_store=store.enabled,
             resumed=listener.sessions_resumed)
    if not store.enabled:
        log.info("fd_store_unavailable", hint="no service manager ($NOTIFY_SOCKET): sessions end with the daemon")
    systemd.notify("READY=1", f"STATUS={daemon.status_line()}", f"MAINPID={os.getpid()}")
    daemon._status_sent = daemon.status_line()
    status_timer = _Every(loop, STATUS_INTERVAL_S, daemon.send_status)
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
        systemd.notify("STOPPING=1")
        if config.shutdown.on_sigterm == "handover" and store.enabled:
            log.info("handing_over", sessions=sorted(listener.sessions))
            await listener.hand_over()
        else:
            await listener.stop_accepting()
            if listener.sessions:
                log.warning("waiting_for_sessions", sessions=sorted(listener.sessions),
                            hint="send the signal again to " + (
                                "hand them over to the fd store" if store.enabled
                                else "end them now (their guests lose their pages)"))
                waiter = loop.create_task(listener.wait_sessions())
                forced = loop.create_task(force.wait())
                await asyncio.wait({waiter, forced}, return_when=asyncio.FIRST_COMPLETED)
                forced.cancel()
                waiter.cancel()
                if force.is_set() and store.enabled:
                    log.info("handing_over", sessions=sorted(listener.sessions))
                    await listener.hand_over()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        for h in (watchdog, status_timer, daemon._status_handle):
            if h is not None:
                h.cancel()
        for t in reloads:
            t.cancel()
        await control.close()
        await listener.close()
        if metrics_server is not None:
            metrics_server.shutdown()
    log.info("stopped", sessions_served=listener.sessions_total, handed_over=listener.handing_over)
    return 0

