"""What the peer client is told and what it counts: its options, its counters, its refusals."""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from typing import Any

from uffdd.configbase import join_hostport, parse_hostport
from uffdd.errors import SourceUnavailable
from uffdd.peer import protocol as p
from uffdd.peer.config import DEFAULT_PORT, PeerLinkConfig, read_secret


class ClientOptions:
    """A link's options as the client uses them: the validated :class:`PeerLinkConfig` itself
    (``config``), and beside it what had to be resolved from it: the host and port, the image
    name for this guest, the secret's bytes and the TLS context."""

    def __init__(self, *, host: str, port: int, image: str = "default", secret: bytes | None = None,
                 ssl_context: ssl.SSLContext | None = None, server_hostname: str | None = None,
                 config: PeerLinkConfig | None = None, **settings: Any) -> None:
        """Without ``config``, the model is validated from ``settings`` (its fields by name) and
        the address and image given here."""
        if config is None:
            config = PeerLinkConfig.model_validate(
                {"address": join_hostport(host, port), "image": image, **settings})
        elif settings:
            raise TypeError(f"settings {sorted(settings)} given beside a config")
        self.config = config
        self.host = host
        self.port = port
        self.image = image
        self.secret = secret
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname

    @classmethod
    def from_config(cls, config: PeerLinkConfig, *, vm_id: str = "", where: str = "peer") -> ClientOptions:
        """Resolve ``config`` for one guest (``{vm_id}`` in the image name); ``where`` names the
        config section in errors (the secret file is read here)."""
        host, port = parse_hostport(config.address, default_port=DEFAULT_PORT)
        tls = config.tls
        return cls(host=host, port=port, image=config.image.replace("{vm_id}", vm_id),
                   secret=read_secret(config.secret, config.secret_file, where),
                   ssl_context=tls.context() if tls is not None else None,
                   server_hostname=tls.server_name if tls is not None else None, config=config)

    @property
    def address(self) -> str:
        return join_hostport(self.host, self.port)


@dataclass
class PeerStats:
    """Counters of one peer source (both channels); read by logs, tests, benchmarks."""

    connects: int = 0
    reconnects: int = 0
    connect_failures: int = 0
    link_losses: int = 0
    requests: int = 0
    requests_resent: int = 0
    checksum_failures: int = 0
    protocol_errors: int = 0
    tampered: int = 0
    """Connections dropped because a frame failed its tag: someone on the path changed it."""
    request_errors: int = 0
    unreachable: int = 0
    outage_seconds: float = 0.0
    last_error: str = ""
    losses_by_reason: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return {k: v for k, v in self.__dict__.items() if k != "losses_by_reason"} | {
            "losses_by_reason": dict(self.losses_by_reason)}


class PeerRefused(SourceUnavailable):
    """The server answered but refused us (auth, image, version): retrying will not help by itself."""

    def __init__(self, code: p.ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code

