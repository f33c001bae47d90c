"""Prometheus metrics, collected at scrape time from the sessions' own counters.

Nothing is incremented on the fault path for metrics: the collector reads the plain integer
counters each session already keeps.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from uffdd.session import SessionStats

if TYPE_CHECKING:
    from uffdd.service.listener import Listener

_COUNTERS = {
    "fault_msgs": ("uffdd_faults", "Page-fault messages read from userfaultfds"),
    "pages_filled": ("uffdd_pages_filled", "Pages installed into guests (CONTINUE succeeded)"),
    "bytes_filled": ("uffdd_bytes_filled", "Bytes installed into guests"),
    "fills_inline": ("uffdd_fills_inline", "Pages filled without waiting (page-cache hits)"),
    "fills_async": ("uffdd_fills_async", "Pages filled after waiting for the source"),
    "coalesced": ("uffdd_faults_coalesced", "Faults on a page whose fill was already in flight"),
    "source_errors": ("uffdd_source_errors", "Failed source reads (each retried)"),
    "kernel_errors": ("uffdd_kernel_errors", "Failed userfaultfd ioctls (each retried)"),
    "retries": ("uffdd_continue_retries", "UFFDIO_CONTINUE retried after EAGAIN"),
}


class SessionCollector(Collector):
    """Sums the counters of live sessions and of those that have ended."""

    def __init__(self, listener: Listener) -> None:
        self.listener = listener

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily]:
        lst = self.listener
        live = list(lst.sessions.values())
        stats = [s.stats for s in live] + [lst.ended_totals]
        for attr, (name, doc) in _COUNTERS.items():
            yield CounterMetricFamily(name, doc, value=sum(getattr(s, attr) for s in stats))
        yield GaugeMetricFamily("uffdd_sessions_active", "Sessions being served", value=len(live))
        yield CounterMetricFamily("uffdd_sessions", "Sessions started", value=lst.sessions_total)
        yield CounterMetricFamily("uffdd_handshakes_refused", "Handshakes refused", value=lst.handshakes_refused)
        remaining = GaugeMetricFamily(
            "uffdd_session_pages_remaining", "Pages not yet installed", labels=["session", "vm_id"])
        for s in live:
            remaining.add_metric([s.id, s.vm_id], s.pages_remaining)
        yield remaining
        yield _latency_histogram(stats)


def _latency_histogram(stats: list[SessionStats]) -> HistogramMetricFamily:
    counts = [sum(col) for col in zip(*(s.latency_log2_us for s in stats), strict=True)]
    buckets: list[tuple[str, float]] = []
    cum = 0
    for i, n in enumerate(counts[:-1]):
        cum += n
        buckets.append((repr((1 << i) / 1e6), cum))
    cum += counts[-1]
    buckets.append(("+Inf", cum))
    return HistogramMetricFamily(
        "uffdd_fault_service_seconds", "Time from reading a fault to installing its page",
        buckets=buckets, sum_value=None)


def make_registry(listener: Listener) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(SessionCollector(listener))
    return registry
