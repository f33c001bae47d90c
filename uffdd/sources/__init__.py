"""Page sources and their registry: ``kind`` name -> ``"module:Class"``, uvicorn-style.

Built-in kinds are listed here; other packages add kinds through the ``uffdd.sources``
entry-point group, e.g. ``[project.entry-points."uffdd.sources"] s3 = "mypkg.s3:S3Source"``.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from uffdd.errors import ConfigError
from uffdd.sources.base import PageSource, SourceConfig

BUILTIN_SOURCES: dict[str, str] = {
    "file": "uffdd.sources.file:FileSource",
    "peer": "uffdd.sources.peer:PeerSource",
    "image": "uffdd.sources.image:ImageSource",
}


def available_kinds() -> dict[str, str]:
    """Every known kind, built-in first, then entry points (which may not shadow built-ins)."""
    kinds = dict(BUILTIN_SOURCES)
    for ep in entry_points(group="uffdd.sources"):
        kinds.setdefault(ep.name, ep.value)
    return kinds


def source_class(kind: str) -> type[PageSource]:
    """Import the class registered for ``kind``."""
    kinds = available_kinds()
    if kind not in kinds:
        raise ConfigError(f"unknown source kind {kind!r}; known kinds: {', '.join(sorted(kinds))}")
    module_name, _, attr = kinds[kind].partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"source kind {kind!r} -> {kinds[kind]!r} cannot be loaded: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, PageSource)):
        raise ConfigError(f"source kind {kind!r} -> {kinds[kind]!r} is not a PageSource")
    return cls


__all__ = ["BUILTIN_SOURCES", "PageSource", "SourceConfig", "available_kinds", "source_class"]
