"""Configuration of both ends of a migration link: ``uffdd serve`` and the ``peer`` source.

``uffdd serve`` reads its own YAML file (``-c FILE``; every option also has a flag), validated
like the daemon's: unknown keys and wrong types are refused with the key and the file named.
"""

from __future__ import annotations

import base64
import ipaddress
import math
import os
import ssl
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from uffdd.config import LogConfig, MetricsConfig
from uffdd.configbase import StrictModel, parse_hostport, read_yaml, validate
from uffdd.errors import ConfigError

DEFAULT_PORT = 7447
MIN_SECRET = 32
"""Bytes a shared secret needs at least (`uffdd secret` makes 44 from 32 random bytes)."""
MIN_SECRET_BITS = 128
MIN_SECRET_CHARS = 16


def split_hostport(value: str) -> tuple[str, int]:
    """A peer's ``HOST:PORT`` (``[V6]:PORT``, or ``HOST`` alone for uffdd serve's port 7447)."""
    return parse_hostport(value, default_port=DEFAULT_PORT)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_files(**paths: str | None) -> None:
    """Refuse at load time a file option that names no readable file (the key is named)."""
    for key, path in paths.items():
        if path is not None and not os.access(path, os.R_OK):
            raise ValueError(f"{key}: cannot read {path}")


def secret_weakness(data: bytes) -> str | None:
    """Why ``data`` is too weak to be a shared secret, or None.

    What one captured handshake gives an eavesdropper is an HMAC of the secret: enough to test
    guesses offline, as fast as HMAC goes. Only a secret with at least 128 bits of randomness
    makes that hopeless, so a secret must be long, and drawn from enough different characters
    that it cannot be a word repeated or a short phrase padded (an estimate: the size of the
    character classes it uses, to the power of its length, must reach 2**128)."""
    if len(data) < MIN_SECRET:
        return f"it has {len(data)} bytes; at least {MIN_SECRET} are needed"
    distinct = len(set(data))
    if distinct < MIN_SECRET_CHARS:
        return f"it uses only {distinct} different characters; at least {MIN_SECRET_CHARS} are needed"
    classes = [any(c in data for c in b"abcdefghijklmnopqrstuvwxyz") * 26,
               any(c in data for c in b"ABCDEFGHIJKLMNOPQRSTUVWXYZ") * 26,
               any(c in data for c in b"0123456789") * 10,
               any(32 <= c < 127 and not chr(c).isalnum() for c in data) * 33,
               any(c < 32 or c >= 127 for c in data) * 161]
    bits = len(data) * math.log2(max(sum(classes), 2))
    if bits < MIN_SECRET_BITS:
        return f"it holds about {bits:.0f} bits of randomness; at least {MIN_SECRET_BITS} are needed"
    return None


SECRET_HINT = "make one with `uffdd secret -o FILE`"


def read_secret(secret: str | None, secret_file: str | None, where: str) -> bytes | None:
    """The shared secret as bytes (a file's trailing newline is not part of it), checked for strength."""
    if secret is not None:
        data = secret.encode()
        key = f"{where}.secret"
    elif secret_file is None:
        return None
    else:
        key = f"{where}.secret_file"
        try:
            data = Path(secret_file).read_bytes().rstrip(b"\r\n")
        except OSError as exc:
            raise ConfigError(f"{key}: cannot read {secret_file}: {exc.strerror}") from None
    weak = secret_weakness(data)
    if weak is not None:
        raise ConfigError(f"{key}: the shared secret is too weak: {weak} ({SECRET_HINT})")
    return data


def make_secret() -> str:
    """A shared secret of 256 random bits, base64: what `uffdd secret` prints."""
    return base64.b64encode(os.urandom(32)).decode()


class _SecretMixin(StrictModel):
    secret: str | None = None
    """The shared secret itself (prefer secret_file: config files get copied around)."""
    secret_file: str | None = None

    @model_validator(mode="after")
    def _one_secret(self) -> Any:
        if self.secret is not None and self.secret_file is not None:
            raise ValueError("give secret or secret_file, not both")
        if self.secret is not None and (weak := secret_weakness(self.secret.encode())):
            raise ValueError(f"secret: the shared secret is too weak: {weak} ({SECRET_HINT})")
        check_files(secret_file=self.secret_file)
        return self


class ServerTls(StrictModel):
    cert: str
    key: str
    client_ca: str | None = None
    """When set, clients must present a certificate signed by this CA."""

    @model_validator(mode="after")
    def _files(self) -> Any:
        check_files(cert=self.cert, key=self.key, client_ca=self.client_ca)
        return self

    def context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(self.cert, self.key)
            if self.client_ca:
                ctx.load_verify_locations(self.client_ca)
                ctx.verify_mode = ssl.CERT_REQUIRED
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"tls: cannot load certificates: {exc}") from None
        return ctx


class ClientTls(StrictModel):
    ca: str | None = None
    """CA that signed the server's certificate; unset: the system's trust store."""
    cert: str | None = None
    key: str | None = None
    server_name: str | None = None
    """Name checked against the server's certificate; default: the host of ``address``."""

    @model_validator(mode="after")
    def _files(self) -> Any:
        check_files(ca=self.ca, cert=self.cert, key=self.key)
        if (self.cert is None) != (self.key is None):
            raise ValueError("cert and key go together")
        return self

    def context(self) -> ssl.SSLContext:
        try:
            ctx = ssl.create_default_context(cafile=self.ca)
            if self.cert:
                ctx.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"tls: cannot load certificates: {exc}") from None
        return ctx


class PeerLinkConfig(_SecretMixin):
    """The destination's side of a link to ``uffdd serve``: where, which image, how to
    authenticate, and how to ride out a broken connection. The peer client takes it as is
    (:class:`uffdd.peer.client.ClientOptions` carries it, with the secret and TLS context resolved)."""

    address: str
    """HOST:PORT of ``uffdd serve`` on the migration source."""
    image: str = "default"
    """Name of the image on the server; ``{vm_id}`` is replaced by the handshake's vm_id."""
    tls: ClientTls | None = None
    compression: bool = False
    """Ask for lz4 blocks on the bulk connection (the server uses them per block, only when that
    saves space): for slow links. The bulk connection then runs in Python; without it, in C."""
    connect_timeout: float = Field(default=2.0, gt=0, le=300)
    """Seconds for one attempt: TCP connect, TLS and the HELLO/AUTH exchange."""
    open_timeout: float = Field(default=10.0, gt=0, le=3600)
    """Seconds the first connection may take before the session is refused."""
    reconnect_min: float = Field(default=0.05, gt=0, le=60)
    reconnect_max: float = Field(default=2.0, gt=0, le=600)
    deadline: float = Field(default=60.0, gt=0, le=86400)
    """Seconds without a working connection before fills fail with SourceUnavailable (loudly)."""
    keepalive: float = Field(default=0.5, gt=0, le=600)
    io_timeout: float = Field(default=3.0, gt=0, le=3600)
    """A connection that received nothing for this long (pings included) is declared dead."""
    max_inflight: int = Field(default=256, ge=1, le=65536)
    checksum_retries: int = Field(default=5, ge=0, le=1000)
    native: bool = True
    """Run the urgent connection in C (without TLS, where the extension is built): demand
    faults are then sent, checked and installed without the interpreter. Same protocol, same
    checks; off: the Python connection."""

    @model_validator(mode="after")
    def _check_link(self) -> Any:
        try:
            split_hostport(self.address)
        except ValueError as exc:
            raise ValueError(f"address: {exc}") from None
        if self.io_timeout <= self.keepalive:
            raise ValueError(f"io_timeout ({self.io_timeout}) must be longer than keepalive ({self.keepalive})")
        if self.reconnect_max < self.reconnect_min:
            raise ValueError("reconnect_max must not be below reconnect_min")
        return self


class ServeLimits(StrictModel):
    max_blocks: int = Field(default=1024, ge=1, le=16384)
    """Largest READ, in 4 KiB blocks (default 4 MiB; a 2 MiB huge page is 512)."""
    max_inflight: int = Field(default=256, ge=1, le=65536)
    """READs one connection may have outstanding."""
    max_connections: int = Field(default=256, ge=1, le=65536)
    """Authenticated connections at once; one more is refused (BUSY) when it authenticates."""
    max_unauthenticated: int = Field(default=64, ge=1, le=65536)
    """Connections still in the handshake at once; a new one past it drops the oldest of them,
    so idle connections can never keep an authenticated destination out."""
    handshake_timeout: float = Field(default=5.0, gt=0, le=300)
    """Seconds a connection has to authenticate (TLS handshake included) before it is dropped."""
    idle_timeout: float = Field(default=60.0, gt=0, le=86400)
    """A connection silent this long is closed (clients ping every second or so)."""


class ServeConfig(_SecretMixin):
    listen: str = f"127.0.0.1:{DEFAULT_PORT}"
    images: dict[str, str] = Field(default_factory=dict)
    """Image name -> file (a snapshot, or /dev/shm/...). Clients ask for an image by name."""
    vmm_socket: str | None = None
    """Unix socket on which a source VMM hands over a live guest's memfd (SCM_RIGHTS)."""
    tls: ServerTls | None = None
    compression: bool = True
    """Offer lz4 (used per block, only when it pays off)."""
    native: bool = True
    """Answer urgent connections without TLS in C (where the extension is built): a demand
    fault's READ is read, checksummed, tagged and sent without the interpreter."""
    log: LogConfig = LogConfig()
    metrics: MetricsConfig = MetricsConfig()
    limits: ServeLimits = ServeLimits()

    @model_validator(mode="after")
    def _check(self) -> Any:
        split_hostport(self.listen)
        for name in self.images:
            if not name or len(name.encode()) > 255:
                raise ValueError(f"images: name {name!r} must be 1-255 bytes")
        return self


def parse_serve_config(data: Any, origin: str = "<serve config>") -> ServeConfig:
    return validate(ServeConfig, data, origin)


def load_serve_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> ServeConfig:
    """Read ``path`` (if any) and apply command-line ``overrides`` on top (flags win)."""
    data: dict[str, Any] = dict(read_yaml(path)) if path is not None else {}
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if isinstance(value, dict):
            base = data.get(key)
            data[key] = {**(base if isinstance(base, dict) else {}),
                         **{k: v for k, v in value.items() if v is not None}}
        else:
            data[key] = value
    return parse_serve_config(data, str(path) if path is not None else "command line")


def parse_image_arg(value: str) -> tuple[str, str]:
    """``--image [NAME=]PATH``; the name defaults to ``default``."""
    name, sep, path = value.partition("=")
    if not sep or Path(value).exists():
        return "default", value
    if not name or not path:
        raise ValueError(f"--image {value!r}: expected [NAME=]PATH")
    return name, path
