"""Counters of sessions that have ended, kept by the listener and read by the metrics collector.

A live session's counters are its own; when it ends, the listener folds them in here, by the
configured source's name and kind, so that scrapes keep counting what ended sessions did.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from uffdd.core import Session, SessionStats

PATHS = {"demand": "pages_demand", "fault_around": "pages_fault_around", "prefetch": "pages_prefetch",
         "replay": "pages_replay"}
"""How a page got in (label -> SessionStats field): the faulting page itself, its fault-around
block, background pre-paging, or replay of a recorded working set."""


@dataclass
class SourceTotals:
    stats: SessionStats = field(default_factory=SessionStats)
    bytes_by_path: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PATHS, 0))


class Totals:
    """Counters of sessions that have ended, by (source name, kind)."""

    def __init__(self) -> None:
        self.by_source: dict[tuple[str, str], SourceTotals] = {}

    def add(self, session: Session, kind: str) -> None:
        t = self.by_source.setdefault((session.handshake.source, kind), SourceTotals())
        t.stats.add(session.stats)
        for path, attr in PATHS.items():
            t.bytes_by_path[path] += getattr(session.stats, attr) * session.handshake.page_size
