"""What ``uffdd serve`` counts (exported as metrics by :mod:`uffdd.peer.serve`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from uffdd.peer import protocol as p


@dataclass
class ServerStats:
    connections_total: int = 0
    handshakes_ok: int = 0
    welcomed: dict[str, int] = field(default_factory=dict)
    """Connections welcomed, by role (urgent, bulk)."""
    auth_failures: int = 0
    protocol_errors: dict[str, int] = field(default_factory=dict)
    reads: int = 0
    read_errors: int = 0
    tampered: int = 0
    """Connections dropped because a frame failed its tag (someone on the path changed it)."""
    blocks_raw: int = 0
    blocks_zero: int = 0
    blocks_lz4: int = 0
    payload_bytes: int = 0

    def count_error(self, code: p.ErrorCode) -> None:
        self.protocol_errors[code.name] = self.protocol_errors.get(code.name, 0) + 1


__all__ = ["ServerStats"]
