"""What every uffdd config file shares: strict models, YAML reading, errors that name the file
and the key, and the ``HOST:PORT`` form of network addresses.

The daemon's config (:mod:`uffdd.config`) and ``uffdd serve``'s (:mod:`uffdd.peer.config`) both
build on this module, so they read files, refuse bad keys and parse addresses the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from uffdd.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


class StrictModel(BaseModel):
    """Unknown keys are refused (a typo must not silently mean "the default"); frozen once loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def parse_hostport(value: str, *, default_port: int | None = None,
                   default_host: str | None = None) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT`` or ``HOST`` -> (host, port); ValueError naming what is wrong.

    Without ``default_port`` the port is required; without ``default_host`` so is the host
    (``:PORT`` then means ``default_host:PORT``). A bare IPv6 address has no port: ``::1``.
    """
    v = value.strip()
    if v.startswith("["):
        host, sep, rest = v[1:].partition("]")
        if not sep:
            raise ValueError(f"{value!r}: missing ']'")
        if rest and not rest.startswith(":"):
            raise ValueError(f"{value!r}: expected [HOST]:PORT")
        port_s = rest[1:]
    elif v.count(":") == 1:
        host, _, port_s = v.partition(":")
    else:
        host, port_s = v, ""
    if not host:
        if default_host is None:
            raise ValueError(f"{value!r}: missing host")
        host = default_host
    if not port_s:
        if default_port is None:
            raise ValueError(f"{value!r}: expected HOST:PORT (the port is missing)")
        return host, default_port
    if not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise ValueError(f"{value!r}: port must be 0..65535")
    return host, int(port_s)


def join_hostport(host: str, port: int) -> str:
    """The inverse of :func:`parse_hostport` (IPv6 hosts in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def describe_validation_error(exc: ValidationError, prefix: str = "") -> str:
    """One line per pydantic error, each naming the dotted key (prefixed) and what is wrong."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        key = ".".join(p for p in (prefix, loc) if p) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        if err["type"] == "value_error" and "error" in err.get("ctx", {}):
            msg = str(err["ctx"]["error"])
            if msg.startswith(key):  # the nested validator already named the full key
                parts.append(msg)
                continue
        parts.append(f"{key}: {msg}")
    return "; ".join(parts)


def validate(model: type[M], data: Any, origin: str) -> M:
    """Validate already-loaded YAML data (None: an empty file) as ``model``; ConfigError names
    ``origin`` (the file) and every bad key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: the top level must be a mapping, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{origin}: {describe_validation_error(exc)}") from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping a YAML file holds (an empty file: ``{}``); ConfigError naming the file otherwise."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read config file: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping, got {type(data).__name__}")
    return data
