"""One guest served: page states, regions, the fault loop and its C twin, fills, events,
pre-paging, completion. :class:`Session` composes the parts; see docs/architecture.md."""

from uffdd.core.guest import DEMAND, FAULT_AROUND, PREFETCH, REPLAY
from uffdd.core.pagestate import EMPTY, FILLED, FILLING, INSTALLING, REMOVED, UNMAPPED, PageStates
from uffdd.core.registration import prepare_uffd
from uffdd.core.session import Session
from uffdd.core.stats import SessionStats

__all__ = ["DEMAND", "EMPTY", "FAULT_AROUND", "FILLED", "FILLING", "INSTALLING", "PREFETCH", "REMOVED", "REPLAY",
           "UNMAPPED", "PageStates", "Session", "SessionStats", "prepare_uffd"]
