"""What a session counts, and the one place a vCPU's wait is booked.

The C fault path (``_fastpath.c``) books its waits the same way (same buckets, same per-thread
sums); ``uffdd.core.native`` checks at import that both sides agree on the bucket count.
"""

from __future__ import annotations

import time
from array import array
from dataclasses import dataclass, field

LAT_BUCKETS = 40
"""Buckets of the fault-service histogram: bucket i counts waits below 2**i * 1.024 us."""


def quantile_us(hist: array[int] | list[int], q: float) -> float:
    """Upper bound (us) of the histogram bucket holding quantile ``q``; 0 when it is empty."""
    total = sum(hist)
    if not total:
        return 0.0
    rank = q * total
    seen = 0
    for i, n in enumerate(hist):
        seen += n
        if seen >= rank:
            return float(1 << i)
    return float(1 << (len(hist) - 1))


class Wait:
    """A vCPU waiting on a demand fault: booked once, when its page is in place."""

    __slots__ = ("gidx", "t0", "tid")

    def __init__(self, gidx: int, t0: int, tid: int) -> None:
        self.gidx = gidx
        """Global index of the faulting page (survives region moves and splits)."""
        self.t0 = t0
        """perf_counter_ns() when the fault message was read."""
        self.tid = tid
        """The faulting thread (UFFD_FEATURE_THREAD_ID), 0 if unknown."""


@dataclass
class SessionStats:
    """Counters a session keeps; read by logs, metrics and the demo. Cheap to update."""

    pages_total: int = 0
    pages_filled: int = 0
    pages_demand: int = 0
    pages_fault_around: int = 0
    pages_prefetch: int = 0
    pages_replay: int = 0
    blocked_ns: int = 0
    """Sum over demand faults of read -> installed: the vCPU time uffdd is responsible for."""
    blocked_ns_by_tid: dict[int, int] = field(default_factory=dict)
    """The same, per faulting thread (UFFD_FEATURE_THREAD_ID): which vCPUs waited, and how long.
    Sums to ``blocked_ns`` (waits of faults without a thread id are booked under 0)."""
    pages_removed: int = 0
    """Pages the guest discarded (balloon, MADV_DONTNEED/REMOVE) before or after their fill."""
    pages_zeroed: int = 0
    """Faults on discarded pages answered with zeros, never with the source's bytes."""
    pages_poisoned: int = 0
    events: int = 0
    complete_s: float = 0.0
    """Seconds from session start until every page was in place (0: not complete)."""
    fault_msgs: int = 0
    minor_faults: int = 0
    fills_inline: int = 0
    fills_async: int = 0
    coalesced: int = 0
    stolen: int = 0
    """Demand faults that took a page over from slow background work (fetched urgently)."""
    already_mapped: int = 0
    retries: int = 0
    source_errors: int = 0
    kernel_errors: int = 0
    source_changed: int = 0
    """1 if the session ended because its source's bytes changed during the restore."""
    bytes_filled: int = 0
    started: float = field(default_factory=time.monotonic)
    latency_log2_us: array[int] = field(default_factory=lambda: array("Q", bytes(8 * LAT_BUCKETS)))
    """Histogram of fault service time (message read -> installed): bucket i holds times below
    2**i * 1.024 us (shifts, not divisions, on the fault path)."""
    in_place: array[int] = field(default_factory=lambda: array("q", [0]))
    """Pages in place (or resolved by an event), counted the moment they are, by the C fault
    path too, which shares this cell: what completion is decided on. ``pages_filled`` is the
    same count as reported, with the C path's share added when its counters are folded in."""

    def count_filled(self, n: int) -> None:
        """``n`` more pages are in place (Python's side: the C path counts its own in in_place)."""
        self.pages_filled += n
        self.in_place[0] += n

    @property
    def all_in_place(self) -> bool:
        return self.in_place[0] >= self.pages_total

    def book(self, wait: Wait) -> None:
        """The page ``wait`` faulted on is in place: book the vCPU's wait, once."""
        ns = time.perf_counter_ns() - wait.t0
        self.blocked_ns += ns
        b = (ns >> 10).bit_length()
        self.latency_log2_us[b if b < LAT_BUCKETS else LAT_BUCKETS - 1] += 1
        by_tid = self.blocked_ns_by_tid
        by_tid[wait.tid] = by_tid.get(wait.tid, 0) + ns

    def latency_quantile(self, q: float) -> float:
        """Upper bound (us) of the bucket holding quantile ``q``; 0 when nothing was measured."""
        return quantile_us(self.latency_log2_us, q)

    def add(self, other: SessionStats) -> None:
        """Fold another session's counters into these (totals of ended sessions)."""
        self.complete_s = other.complete_s  # the latest session's, for benchmarks
        for tid, ns in other.blocked_ns_by_tid.items():
            self.blocked_ns_by_tid[tid] = self.blocked_ns_by_tid.get(tid, 0) + ns
        for name in SUMMED:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for i, n in enumerate(other.latency_log2_us):
            self.latency_log2_us[i] += n

    def as_dict(self) -> dict[str, float | int]:
        """The counters, plus what is derived from them, for log lines and reports."""
        out: dict[str, float | int] = {name: getattr(self, name) for name in SUMMED if name != "blocked_ns"}
        out.update({
            "blocked_ms": round(self.blocked_ns / 1e6, 3),
            "vcpus_blocked": sum(1 for tid in self.blocked_ns_by_tid if tid),
            "max_vcpu_blocked_ms": round(max(self.blocked_ns_by_tid.values(), default=0) / 1e6, 3),
            "complete_s": round(self.complete_s, 4),
            "p50_us_le": self.latency_quantile(0.5),
            "p99_us_le": self.latency_quantile(0.99),
            "seconds": round(time.monotonic() - self.started, 3),
        })
        return out


SUMMED = ("pages_total", "pages_filled", "pages_demand", "pages_fault_around", "pages_prefetch", "pages_replay",
          "blocked_ns", "fault_msgs", "minor_faults", "fills_inline", "fills_async",
          "pages_removed", "pages_zeroed", "pages_poisoned", "events", "coalesced", "stolen", "already_mapped",
          "retries", "source_errors", "kernel_errors", "source_changed", "bytes_filled")
"""The counters :meth:`SessionStats.add` sums (everything but the time and the histogram)."""


__all__ = ["LAT_BUCKETS", "SUMMED", "SessionStats", "Wait", "quantile_us"]
