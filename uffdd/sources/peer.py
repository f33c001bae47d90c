"""Pages from another host: ``uffdd serve`` on the migration source, over TCP (optionally TLS).

Demand faults (:meth:`PeerSource.fill`) use the urgent connection; :meth:`PeerSource.prefetch`
uses a separate bulk connection, so background traffic never sits in front of a fault. Each
4 KiB block's crc32c (and, with a shared secret, each frame's tag) is checked before a byte of it
reaches guest memory: ``fill`` receives into a private buffer and copies it in with a guarded
copy (a memory file the VMM shrank is an error for that session, never a SIGBUS); ``prefetch``
is given private buffers already. A broken link makes ``fill`` wait (reconnect, re-send) rather
than fail; past ``deadline`` it raises :class:`~uffdd.errors.SourceUnavailable`, and the session
retries.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import structlog

from uffdd.errors import ConfigError, SourceUnavailable
from uffdd.kernel.memory import copy_into
from uffdd.peer.client import ClientOptions, PeerClient, PeerStats
from uffdd.peer.config import PeerLinkConfig
from uffdd.sources.base import DirectReceiver, PageSource, SourceConfig

log = structlog.get_logger("uffdd.sources.peer")


class PeerSourceConfig(PeerLinkConfig, SourceConfig):
    """``kind: peer``: the link settings of :class:`~uffdd.peer.config.PeerLinkConfig`."""

    kind: Literal["peer"] = "peer"


class PeerSource(PageSource):
    """A memory image served by ``uffdd serve`` on another host."""

    config_model: ClassVar[type[SourceConfig]] = PeerSourceConfig

    def __init__(self, client: PeerClient) -> None:
        self.client = client

    @classmethod
    async def open(cls, config: SourceConfig, *, vm_id: str) -> PeerSource:
        assert isinstance(config, PeerSourceConfig)
        try:
            opts = ClientOptions.from_config(config, vm_id=vm_id, where="sources.peer")
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
        buf = bytearray(len(dest))
        await self.client.fill(offset, memoryview(buf))
        copy_into(dest, buf)

    def direct_bulk(self) -> DirectReceiver | None:
        """The bulk link in C (no TLS, the extension built), opened on first use."""
        return self.client.direct()

    def native_link(self) -> object | None:
        """The urgent channel's C link, where it runs one (no TLS, the extension built)."""
        link: object | None = self.client.urgent.link
        return link

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
