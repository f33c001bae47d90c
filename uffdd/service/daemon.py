"""`uffdd run`: the service shell around the listener (logging, signals, metrics, sd_notify)."""

from __future__ import annotations

import asyncio
import signal

import structlog

from uffdd import __version__
from uffdd.config import Config
from uffdd.service.listener import Listener
from uffdd.service.metrics import make_registry
from uffdd.service.systemd import notify

log = structlog.get_logger("uffdd.daemon")


def _split_hostport(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


async def serve(config: Config, *, ready: asyncio.Event | None = None) -> int:
    """Run until SIGTERM/SIGINT. The first signal stops accepting and waits for the sessions to
    end (a guest is never cut off from its pages on the first request); a second one ends them."""
    listener = Listener(config)
    await listener.start()
    metrics_server = None
    if config.metrics.listen:
        from prometheus_client import start_http_server

        host, port = _split_hostport(config.metrics.listen)
        metrics_server, _ = start_http_server(port, addr=host, registry=make_registry(listener))
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    force = asyncio.Event()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            force.set()
        stop.set()
        log.info("signal", signal=signal.Signals(signum).name, sessions=len(listener.sessions))

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    log.info("listening", socket=config.listen, version=__version__, sources=sorted(config.sources),
             metrics=config.metrics.listen)
    notify("READY=1", f"STATUS=listening on {config.listen}")
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
        notify("STOPPING=1")
        await listener.stop_accepting()
        if listener.sessions:
            log.warning("waiting_for_sessions", sessions=sorted(listener.sessions),
                        hint="send the signal again to end them now (their guests lose their pages)")
            waiter = loop.create_task(listener.wait_sessions())
            forced = loop.create_task(force.wait())
            await asyncio.wait({waiter, forced}, return_when=asyncio.FIRST_COMPLETED)
            forced.cancel()
            waiter.cancel()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await listener.close()
        if metrics_server is not None:
            metrics_server.shutdown()
    log.info("stopped", sessions_served=listener.sessions_total)
    return 0
