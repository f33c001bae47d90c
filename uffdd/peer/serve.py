"""`uffdd serve`: the service shell around :class:`PeerServer` (images, VMM handover, signals, metrics).

A source VMM can hand over its running guest's memory instead of a file: it connects to
``vmm_socket`` and sends the same JSON region description as the daemon's handshake, with
``[memfd]`` in SCM_RIGHTS. The image is served under the handshake's vm_id (``default`` for
Firecracker's list form) for as long as that connection stays open.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from collections.abc import Callable, Iterator

import structlog
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from uffdd import __version__
from uffdd import handshake as hs_mod
from uffdd.errors import ConfigError, HandshakeError
from uffdd.peer.config import ServeConfig, is_loopback, read_secret, split_hostport
from uffdd.peer.image import Image, ImageError
from uffdd.peer.server import PeerServer
from uffdd.unixsock import UnixServer, bind_unix, close_fds, receive_handshake, send_line, until_eof

log = structlog.get_logger("uffdd.serve")

HANDOVER_MAX_BYTES = 1 << 20
HANDOVER_TIMEOUT = 5.0


class VmmHandover:
    """Unix socket on which source VMMs hand over live guest memory (memfd) to be served."""

    def __init__(self, path: str, server: PeerServer) -> None:
        self.path = path
        self.server = server
        self._sock: socket.socket | None = None
        self._conns = UnixServer(self._serve, name="vmm-handover")

    async def start(self) -> None:
        """Bind the socket (replacing a stale socket file, never another kind of file) and accept."""
        self._sock = bind_unix(self.path, backlog=16, key="vmm_socket")
        await self._conns.start(self._sock)

    async def _serve(self, conn: socket.socket) -> None:
        try:
            name, hs = await self._take_image(conn)
        except HandshakeError as exc:
            log.warning("vmm_handover_refused", error=str(exc))
            await send_line(conn, {"error": str(exc)})
            conn.close()
            return
        try:
            log.info("serving_live_image", image=name, bytes=hs.total_bytes, regions=len(hs.regions))
            await send_line(conn, {"status": "serving", "image": name, "bytes": hs.total_bytes})
            await until_eof(conn)
        finally:
            log.info("live_image_withdrawn", image=name, reason="the VMM closed its connection")
            self.server.remove_image(name)
            conn.close()

    async def _take_image(self, conn: socket.socket) -> tuple[str, hs_mod.Handshake]:
        """Receive the regions and the memfd; serve them as an image named after the vm_id."""
        body, fds = await receive_handshake(conn, max_bytes=HANDOVER_MAX_BYTES, timeout=HANDOVER_TIMEOUT)
        try:
            hs = hs_mod.parse(body)
            if len(fds) != 1:
                raise HandshakeError(f"expected 1 file descriptor [memfd] with the regions, got {len(fds)}")
            image = Image.from_memfd(hs.vm_id, fds[0], [(r.offset, r.size) for r in hs.regions])
            self.server.add_image(image)
        except ImageError as exc:
            close_fds(fds)
            raise HandshakeError(str(exc)) from None
        except BaseException:
            close_fds(fds)
            raise
        return image.name, hs

    async def close(self) -> None:
        await self._conns.close()
        if self._sock is not None:
            self._sock.close()
            with contextlib.suppress(OSError):
                os.unlink(self.path)


class ServeCollector(Collector):
    """Prometheus view of a PeerServer's counters, read at scrape time."""

    def __init__(self, server: PeerServer) -> None:
        self.server = server

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        s = self.server.collect()
        yield GaugeMetricFamily("uffdd_serve_connections_active", "Client connections open",
                                value=len(self.server.connections))
        yield GaugeMetricFamily("uffdd_serve_images", "Images being served", value=len(self.server.images))
        yield GaugeMetricFamily("uffdd_serve_connections_unauthenticated", "Client connections still in the handshake",
                                value=len(self.server.admission.pending))
        yield CounterMetricFamily("uffdd_serve_connections_refused", "Connections refused or dropped before they "
                                  "authenticated (any reason)", value=self.server.admission.refused_total)
        for attr, doc in (("connections_total", "Client connections accepted"),
                          ("handshakes_ok", "Clients authenticated and welcomed"),
                          ("auth_failures", "Clients refused for a missing or wrong secret"),
                          ("reads", "READ requests"), ("read_errors", "READs answered with IO_ERROR"),
                          ("payload_bytes", "DATA payload bytes sent")):
            yield CounterMetricFamily(f"uffdd_serve_{attr}", doc, value=getattr(s, attr))
        blocks = CounterMetricFamily("uffdd_serve_blocks", "Blocks sent, by encoding", labels=["encoding"])
        for enc in ("raw", "zero", "lz4"):
            blocks.add_metric([enc], getattr(s, f"blocks_{enc}"))
        yield blocks
        welcomed = CounterMetricFamily("uffdd_serve_welcomed", "Connections welcomed, by role", labels=["role"])
        for role in ("urgent", "bulk"):
            welcomed.add_metric([role], s.welcomed.get(role, 0))
        yield welcomed
        errs = CounterMetricFamily("uffdd_serve_protocol_errors", "Connections dropped, by error code",
                                   labels=["code"])
        for code, n in sorted(s.protocol_errors.items()):
            errs.add_metric([code], n)
        yield errs


def bind_host(host: str, secret: bytes | None) -> str:
    """Without a secret anyone who can connect gets guest memory: only loopback is allowed then."""
    if secret is None and not is_loopback(host):
        loop_host = "::1" if ":" in host else "127.0.0.1"
        log.warning("no_secret_loopback_only", requested=host, listening_on=loop_host,
                    hint="set secret_file (--secret-file) to serve other hosts")
        return loop_host
    return host


def load_images(config: ServeConfig) -> dict[str, Image]:
    images: dict[str, Image] = {}
    for name, path in config.images.items():
        try:
            images[name] = Image.from_file(name, path)
        except ImageError as exc:
            for img in images.values():
                img.close()
            raise ConfigError(f"images.{name}: {exc}") from None
    return images


async def run_serve(config: ServeConfig, *, ready: Callable[[tuple[str, int]], None] | None = None) -> int:
    """Serve until SIGTERM/SIGINT; clients are told SHUTTING_DOWN (they reconnect to a successor)."""
    if not config.images and not config.vmm_socket:
        raise ConfigError("nothing to serve: give --image [NAME=]PATH, or --vmm-socket PATH for live guests")
    secret = read_secret(config.secret, config.secret_file, "serve")
    host, port = split_hostport(config.listen)
    host = bind_host(host, secret)
    if secret is None:
        log.warning("no_secret_configured", detail="clients are not authenticated; serving loopback only")
    images = load_images(config)
    server = PeerServer(images, config.limits, secret=secret, compression=config.compression,
                        ssl_context=config.tls.context() if config.tls else None, native=config.native)
    try:
        address = await server.start(host, port)
    except OSError as exc:
        await server.close()
        raise ConfigError(f"listen: cannot listen on {host}:{port}: {exc.strerror}") from None
    handover = VmmHandover(config.vmm_socket, server) if config.vmm_socket else None
    if handover is not None:
        await handover.start()
    metrics_server = None
    if config.metrics.address is not None:
        from prometheus_client import start_http_server

        registry = CollectorRegistry()
        registry.register(ServeCollector(server))
        mhost, mport = config.metrics.address
        metrics_server, _ = start_http_server(mport, addr=mhost, registry=registry)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(signum: int) -> None:
        log.info("signal", signal=signal.Signals(signum).name, connections=len(server.connections))
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    log.info("serving", address=f"{address[0]}:{address[1]}", version=__version__,
             images={n: i.description for n, i in images.items()}, vmm_socket=config.vmm_socket,
             auth="hmac-sha256" if secret else "none", tls=bool(config.tls),
             client_certs=bool(config.tls and config.tls.client_ca), metrics=config.metrics.listen)
    if ready is not None:
        ready(address)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        if handover is not None:
            await handover.close()
        stats = server.collect()
        await server.close()
        if metrics_server is not None:
            metrics_server.shutdown()
    log.info("stopped", reads=stats.reads, payload_bytes=stats.payload_bytes,
             connections=stats.connections_total, protocol_errors=stats.protocol_errors)
    return 0
