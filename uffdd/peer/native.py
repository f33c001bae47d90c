"""The peer protocol's C extension (``uffdd.peer._native``: the urgent link's two ends), loaded
once and checked against :mod:`uffdd.peer.protocol` at import.

The extension is optional (built by setup.py where a C compiler is present). Its frame layout
(uffdd/csrc/frame.h) must match the protocol's: a build from another version of the layout is
not used (connections stay in Python), never half-trusted. :data:`STATUS` says which, for
`uffdd check`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from uffdd.peer import protocol as p
from uffdd.peer.protocol.data import block_crcs
from uffdd.peer.protocol.frames import CONTROL_MAX


def _expected() -> dict[str, int]:
    zero_crc = block_crcs(memoryview(bytes(p.BLOCK_SIZE)))[0]
    return {"HEADER_SIZE": p.HEADER_SIZE, "DESC_SIZE": p.DESC_SIZE, "TAG_SIZE": p.TAG_SIZE,
            "FLAG_TAGGED": p.FLAG_TAGGED, "MAX_ERROR_MESSAGE": p.MAX_ERROR_MESSAGE,
            "MAX_HELLO": CONTROL_MAX[p.FrameType.HELLO], "MAX_AUTH": CONTROL_MAX[p.FrameType.AUTH],
            "ZERO_CRC": zero_crc}


def _load() -> tuple[ModuleType | None, str]:
    try:
        mod = importlib.import_module("uffdd.peer._native")
    except ImportError as exc:
        return None, f"not built ({exc})"
    wrong = {k: (getattr(mod, k, None), v) for k, v in _expected().items() if getattr(mod, k, None) != v}
    if wrong:
        return None, f"built from another version: constants differ (C, Python): {wrong}"
    return mod, "built"


module, STATUS = _load()
"""The extension (None where it is not used) and why."""

__all__ = ["STATUS", "module"]
