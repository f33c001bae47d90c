"""Pages from another host: ``uffdd serve`` on the migration source, over TCP (optionally TLS).

Demand faults (:meth:`PeerSource.fill`) use the urgent connection; :meth:`PeerSource.prefetch`
uses a separate bulk connection, so background traffic never sits in front of a fault. Page
bytes are received straight into the destination; each 4 KiB block's crc32c is checked before
``fill`` returns. A broken link makes ``fill`` wait (reconnect, re-send) rather than fail; past
``deadline`` it raises :class:`~uffdd.errors.SourceUnavailable`, and the session retries.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import structlog
from pydantic import Field, model_validator

from uffdd.errors import ConfigError, SourceUnavailable
from uffdd.peer.client import ClientOptions, PeerClient, PeerStats
from uffdd.peer.config import MIN_SECRET, ClientTls, check_files, read_secret, split_hostport
from uffdd.sources.base import PageSource, SourceConfig

log = structlog.get_logger("uffdd.sources.peer")


class PeerSourceConfig(SourceConfig):
    kind: Literal["peer"] = "peer"
    address: str
    """HOST:PORT of ``uffdd serve`` on the migration source."""
    image: str = "default"
    """Name of the image on the server; ``{vm_id}`` is replaced by the handshake's vm_id."""
    secret: str | None = None
    secret_file: str | None = None
    tls: ClientTls | None = None
    compression: bool = True
    """Let the server send lz4 blocks (it does so per block, only when that saves space)."""
    connect_timeout: float = Field(default=2.0, gt=0, le=300)
    open_timeout: float = Field(default=10.0, gt=0, le=3600)
    reconnect_min: float = Field(default=0.05, gt=0, le=60)
    reconnect_max: float = Field(default=2.0, gt=0, le=600)
    deadline: float = Field(default=60.0, gt=0, le=86400)
    """Seconds without a working connection before fills fail with SourceUnavailable (loudly)."""
    keepalive: float = Field(default=0.5, gt=0, le=600)
    io_timeout: float = Field(default=3.0, gt=0, le=3600)
    max_inflight: int = Field(default=256, ge=1, le=65536)
    checksum_retries: int = Field(default=5, ge=0, le=1000)

    @model_validator(mode="after")
    def _check(self) -> Any:
        try:
            split_hostport(self.address)
        except ValueError as exc:
            raise ValueError(f"address: {exc}") from None
        if self.secret is not None and self.secret_file is not None:
            raise ValueError("give secret or secret_file, not both")
        if self.secret is not None and len(self.secret.encode()) < MIN_SECRET:
            raise ValueError(f"secret: at least {MIN_SECRET} bytes are needed")
        check_files(secret_file=self.secret_file)
        if self.io_timeout <= self.keepalive:
            raise ValueError(f"io_timeout ({self.io_timeout}) must be longer than keepalive ({self.keepalive})")
        if self.reconnect_max < self.reconnect_min:
            raise ValueError("reconnect_max must not be below reconnect_min")
        return self

    def client_options(self, vm_id: str) -> ClientOptions:
        host, port = split_hostport(self.address)
        tls = self.tls
        return ClientOptions(
            host=host, port=port, image=self.image.replace("{vm_id}", vm_id),
            secret=read_secret(self.secret, self.secret_file, "sources.peer"),
            ssl_context=tls.context() if tls is not None else None,
            server_hostname=tls.server_name if tls is not None else None,
            compression=self.compression, connect_timeout=self.connect_timeout, open_timeout=self.open_timeout,
            reconnect_min=self.reconnect_min, reconnect_max=self.reconnect_max, deadline=self.deadline,
            keepalive=self.keepalive, io_timeout=self.io_timeout, max_inflight=self.max_inflight,
            checksum_retries=self.checksum_retries)


class PeerSource(PageSource):
    """A memory image served by ``uffdd serve`` on another host."""

    config_model: ClassVar[type[SourceConfig]] = PeerSourceConfig

    def __init__(self, client: PeerClient) -> None:
        self.client = client

    @classmethod
    async def open(cls, config: SourceConfig, *, vm_id: str) -> PeerSource:
        assert isinstance(config, PeerSourceConfig)
        try:
            opts = config.client_options(vm_id)
        except ConfigError as exc:
            raise SourceUnavailable(str(exc)) from None
        client = PeerClient(opts)
        await client.open()
        return cls(client)

    @property
    def size(self) -> int:
        return self.client.welcome.image_size

    @property
    def stats(self) -> PeerStats:
        return self.client.stats

    @property
    def unreachable(self) -> SourceUnavailable | None:
        """Set while the source has been unreachable past its deadline."""
        return self.client.unreachable

    async def fill(self, offset: int, dest: memoryview) -> None:
        await self.client.fill(offset, dest)

    async def prefetch(self, offset: int, dest: memoryview) -> None:
        """Like fill, on the bulk connection: for background transfers that must not delay faults."""
        await self.client.prefetch(offset, dest)

    async def aclose(self) -> None:
        s = self.client.stats
        if s.reconnects or s.checksum_failures or s.protocol_errors or s.unreachable:
            log.info("peer_source_closed", peer=self.client.opts.address, **s.as_dict())
        await self.client.aclose()

    def describe(self) -> str:
        o = self.client.opts
        return f"peer:{o.address}/{o.image}{' (tls)' if o.ssl_context else ''}"
