"""Prometheus metrics, collected at scrape time from the sessions' own counters.

Nothing is incremented on the fault path for metrics: the collector reads the plain integer
counters each session already keeps, plus :class:`Totals`, where the listener folds in the
counters of each session as it ends. Labels: ``source`` (the configured source's name, so
bounded by the config) and ``kind`` (its kind); per-session series only for live sessions.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from uffdd.core import Session, SessionStats
from uffdd.service.listener import Listener
from uffdd.service.totals import PATHS, SourceTotals

Family = CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily

_COUNTERS = {
    "fault_msgs": ("uffdd_faults", "Page-fault messages read from userfaultfds"),
    "pages_filled": ("uffdd_pages_filled", "Pages installed into guests (CONTINUE succeeded)"),
    "bytes_filled": ("uffdd_bytes_filled", "Bytes installed into guests"),
    "fills_inline": ("uffdd_fills_inline", "Pages filled without waiting (page-cache hits)"),
    "fills_async": ("uffdd_fills_async", "Pages filled after waiting for the source"),
    "coalesced": ("uffdd_faults_coalesced", "Faults on a page whose fill was already in flight"),
    "source_errors": ("uffdd_source_errors", "Failed source reads (each retried)"),
    "kernel_errors": ("uffdd_kernel_errors", "Failed userfaultfd ioctls (each retried)"),
    "source_changed": ("uffdd_source_changed", "Sessions ended because their source changed during the restore"),
    "retries": ("uffdd_continue_retries", "UFFDIO_CONTINUE retried after EAGAIN"),
}
OUTCOMES = {"inline": "fills_inline", "waited": "fills_async", "coalesced": "coalesced",
            "already_mapped": "already_mapped", "stolen": "stolen", "zeroed": "pages_zeroed"}
"""What became of a fault: served from the page cache at once, after waiting for the source,
joined a fill in flight, found its page already there, took it over from pre-paging, or
got zeros for a page the guest had discarded."""


class SessionCollector(Collector):
    """Sums the counters of live sessions and of those that have ended."""

    def __init__(self, listener: Listener) -> None:
        self.listener = listener

    def collect(self) -> Iterator[Family]:
        lst = self.listener
        live = list(lst.sessions.values())
        ended = dict(lst.totals.by_source)
        yield from _service_families(lst, [s.stats for s in live] + [t.stats for t in ended.values()], len(live))
        yield from _source_families(lst, live, ended)
        yield from _session_families(live)
        yield from peer_metrics(live)


def _service_families(lst: Listener, stats: list[SessionStats], live: int) -> Iterator[Family]:
    """Totals over every session, the session counts, and errors by kind."""
    for attr, (name, doc) in _COUNTERS.items():
        yield CounterMetricFamily(name, doc, value=sum(getattr(s, attr) for s in stats))
    yield GaugeMetricFamily("uffdd_sessions_active", "Sessions being served", value=live)
    yield CounterMetricFamily("uffdd_sessions", "Sessions started (resumed ones included)", value=lst.sessions_total)
    yield CounterMetricFamily("uffdd_sessions_resumed", "Sessions taken over from a predecessor via the fd store",
                              value=lst.sessions_resumed)
    yield CounterMetricFamily("uffdd_handshakes_refused", "Handshakes refused", value=lst.handshakes_refused)
    yield CounterMetricFamily("uffdd_handshakes_resumed", "Handshakes in flight when a predecessor died, run again",
                              value=lst.handshakes_resumed)
    yield GaugeMetricFamily("uffdd_handshakes_pending", "Handshakes being read or checked now (handshake.max_pending)",
                            value=lst.handshakes_pending)
    yield GaugeMetricFamily("uffdd_mapped_bytes", "Guest memory of the sessions admitted (limits.max_mapped_bytes)",
                            value=lst.mapped_bytes)
    yield CounterMetricFamily("uffdd_accept_failures", "accept() calls on the VMM socket that failed",
                              value=lst.accept_failures)
    yield GaugeMetricFamily("uffdd_accept_failing", "1 while accept() on the VMM socket fails for want of fds or "
                            "buffers (no VMM can connect)", value=0 if lst.accept_error is None else 1)
    yield GaugeMetricFamily("uffdd_sessions_unresumed", "Stored sessions that could not be resumed (guests wait)",
                            value=len(lst.unresumed))
    errors = CounterMetricFamily("uffdd_errors", "Errors by kind", labels=["kind"])
    errors.add_metric(["source"], sum(s.source_errors for s in stats))
    errors.add_metric(["kernel"], sum(s.kernel_errors for s in stats))
    errors.add_metric(["continue_retry"], sum(s.retries for s in stats))
    errors.add_metric(["handshake"], lst.handshakes_refused)
    errors.add_metric(["resume"], lst.resume_failures)
    errors.add_metric(["fd_store"], lst.store_failures)
    yield errors


def _source_families(lst: Listener, live: list[Session],
                     ended: dict[tuple[str, str], SourceTotals]) -> Iterator[Family]:
    """Per source: pages and bytes by path, outcomes, fetches in flight, latency."""
    groups: dict[tuple[str, str], list[Session]] = {}
    for s in live:
        groups.setdefault((s.handshake.source, lst.source_kind(s)), []).append(s)
    pages = CounterMetricFamily("uffdd_source_pages", "Pages installed, by source and path",
                                labels=["source", "kind", "path"])
    nbytes = CounterMetricFamily("uffdd_source_bytes", "Bytes installed, by source and path",
                                 labels=["source", "kind", "path"])
    outcomes = CounterMetricFamily("uffdd_fault_outcomes", "Faults by source and outcome",
                                   labels=["source", "kind", "outcome"])
    inflight = GaugeMetricFamily("uffdd_pages_inflight", "Pages being fetched from the source right now",
                                 labels=["source", "kind"])
    latency = HistogramMetricFamily(
        "uffdd_fault_service_seconds", "Time from reading a demand fault to installing its page, by source",
        labels=["source", "kind", "outcome"])
    for key in sorted(set(groups) | set(ended)):
        ss = groups.get(key, [])
        tot = ended.get(key)
        all_stats = [s.stats for s in ss] + ([tot.stats] if tot else [])
        for path, attr in PATHS.items():
            pages.add_metric([*key, path], sum(getattr(st, attr) for st in all_stats))
            b = sum(getattr(s.stats, attr) * s.handshake.page_size for s in ss)
            nbytes.add_metric([*key, path], b + (tot.bytes_by_path[path] if tot else 0))
        for outcome, attr in OUTCOMES.items():
            outcomes.add_metric([*key, outcome], sum(getattr(st, attr, 0) for st in all_stats))
        inflight.add_metric(list(key), sum(s.pages_in_flight for s in ss))
        latency.add_metric([*key, "installed"], _buckets(all_stats), sum_value=_approx_sum(all_stats))
    yield from (pages, nbytes, outcomes, inflight, latency)


def _session_families(live: list[Session]) -> Iterator[Family]:
    """Per live session: pages to go and the time its vCPUs spent blocked."""
    remaining = GaugeMetricFamily(
        "uffdd_session_pages_remaining", "Pages not yet installed", labels=["session", "vm_id"])
    blocked = CounterMetricFamily(
        "uffdd_session_blocked_seconds", "vCPU time spent waiting for uffdd (sum over demand faults)",
        labels=["session", "vm_id"])
    vcpu = CounterMetricFamily(
        "uffdd_vcpu_blocked_seconds", "Time each faulting thread (vCPU) waited for uffdd, like QEMU's "
        "postcopy blocktime", labels=["session", "vm_id", "tid"])
    for s in live:
        remaining.add_metric([s.id, s.vm_id], s.pages_remaining)
        blocked.add_metric([s.id, s.vm_id], s.stats.blocked_ns / 1e9)
        for tid, ns in list(s.stats.blocked_ns_by_tid.items()):
            vcpu.add_metric([s.id, s.vm_id, str(tid)], ns / 1e9)
    yield from (remaining, blocked, vcpu)


def _buckets(stats: list[SessionStats]) -> list[tuple[str, float]]:
    """Cumulative buckets (seconds) from the sessions' log2-microsecond histograms."""
    if not stats:
        return [("+Inf", 0.0)]
    counts = [sum(col) for col in zip(*(s.latency_log2_us for s in stats), strict=True)]
    buckets: list[tuple[str, float]] = []
    cum = 0
    for i, n in enumerate(counts[:-1]):
        cum += n
        buckets.append((repr((1 << i) / 1e6), cum))
    cum += counts[-1]
    buckets.append(("+Inf", cum))
    return buckets


def _approx_sum(stats: list[SessionStats]) -> float:
    """Sum of service times: the blocked time the sessions measured on the same faults."""
    return sum(s.blocked_ns for s in stats) / 1e9


def make_registry(listener: Listener) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(SessionCollector(listener))
    return registry


_PEER_COUNTERS = {
    "reconnects": "Reconnections to the source host after a broken link",
    "requests_resent": "Page requests sent again after a reconnect",
    "checksum_failures": "Pages whose checksum failed (fetched again, never installed)",
    "protocol_errors": "Malformed frames from the source host (connection dropped)",
    "tampered": "Frames whose tag failed: the link was tampered with (connection dropped, nothing installed)",
    "link_losses": "Links to the source host lost",
}


def peer_metrics(live: list[Session]) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
    """Counters of sessions served from a peer (``uffdd serve``): recovery at a glance."""
    families = {k: CounterMetricFamily(f"uffdd_peer_{k}", doc, labels=["session", "vm_id"])
                for k, doc in _PEER_COUNTERS.items()}
    unreachable = GaugeMetricFamily("uffdd_peer_unreachable", "1 while the source host has been unreachable "
                                    "past its deadline", labels=["session", "vm_id"])
    for sess in live:
        stats = getattr(sess.source, "stats", None)
        if stats is None or not hasattr(stats, "reconnects"):
            continue
        for k, fam in families.items():
            fam.add_metric([sess.id, sess.vm_id], float(getattr(stats, k, 0)))
        unreachable.add_metric([sess.id, sess.vm_id], 1.0 if getattr(sess.source, "unreachable", None) else 0.0)
    yield from families.values()
    yield unreachable
