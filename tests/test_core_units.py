"""The pure pieces of the core: working-set records, counters and quantiles, retries, and a
check over the whole package that every task it starts is kept by a strong reference."""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from uffdd.core import workingset
from uffdd.core.retry import RETRY_MAX_S, Retries, backoff
from uffdd.core.stats import LAT_BUCKETS, SessionStats, Wait, quantile_us
from uffdd.core.tasks import Tasks

ROOT = Path(__file__).resolve().parent.parent


# --- working-set records ---------------------------------------------------------------------

@given(st.lists(st.integers(0, 4095), max_size=300))
def test_a_record_reads_back_exactly_what_was_written(pages: list[int]) -> None:
    data = workingset.encode(pages, source_size=4096 * 4096, page_size=4096)
    assert workingset.parse(data, source_size=4096 * 4096, page_size=4096) == pages


@pytest.mark.parametrize(("change", "reason"), [
    (lambda d: b"NOTARECD" + d[8:], "bad magic"),
    (lambda d: d[:-1], "entries"),
    (lambda d: d[:10], "too short"),
])
def test_a_damaged_record_is_refused_with_the_reason(change: object, reason: str) -> None:
    data = workingset.encode([1, 2, 3], source_size=1 << 20, page_size=4096)
    with pytest.raises(workingset.RecordError, match=reason):
        workingset.parse(change(data), source_size=1 << 20, page_size=4096)  # type: ignore[operator]


def test_a_record_of_another_snapshot_or_page_size_is_stale() -> None:
    data = workingset.encode([1], source_size=1 << 20, page_size=4096)
    with pytest.raises(workingset.RecordError, match="stale"):
        workingset.parse(data, source_size=2 << 20, page_size=4096)
    with pytest.raises(workingset.RecordError, match="pages"):
        workingset.parse(data, source_size=1 << 20, page_size=2 << 20)


def test_an_entry_past_the_end_of_the_source_is_refused() -> None:
    data = workingset.encode([256], source_size=1 << 20, page_size=4096)
    with pytest.raises(workingset.RecordError, match="past the end"):
        workingset.parse(data, source_size=1 << 20, page_size=4096)


def test_runs_merge_consecutive_pages_in_first_fault_order_without_repeats() -> None:
    assert workingset.record_runs([5, 6, 7, 1, 2, 6, 9, 3]) == [(5, 3), (1, 2), (9, 1), (3, 1)]


# --- counters --------------------------------------------------------------------------------

def test_quantile_is_the_upper_bound_of_the_bucket_holding_it() -> None:
    hist = [0] * LAT_BUCKETS
    assert quantile_us(hist, 0.99) == 0.0
    hist[3], hist[10] = 98, 2  # 98 waits below 8 us, 2 below 1024 us
    assert quantile_us(hist, 0.5) == 8.0
    assert quantile_us(hist, 0.99) == 1024.0


def test_a_booked_wait_counts_in_the_histogram_and_per_thread_alike() -> None:
    s = SessionStats()
    s.book(Wait(0, 1, 7))
    s.book(Wait(1, 1, 0))  # a fault without a thread id still adds up
    assert sum(s.latency_log2_us) == 2
    assert set(s.blocked_ns_by_tid) == {0, 7}
    assert sum(s.blocked_ns_by_tid.values()) == s.blocked_ns
    assert s.as_dict()["vcpus_blocked"] == 1


def test_adding_sessions_sums_counters_histograms_and_threads() -> None:
    a, b = SessionStats(pages_filled=3, fault_msgs=2), SessionStats(pages_filled=4, fault_msgs=1)
    a.book(Wait(0, 1, 5))
    b.book(Wait(0, 1, 5))
    total = SessionStats()
    total.add(a)
    total.add(b)
    assert (total.pages_filled, total.fault_msgs) == (7, 3)
    assert total.blocked_ns_by_tid == {5: a.blocked_ns + b.blocked_ns}
    assert total.blocked_ns == a.blocked_ns + b.blocked_ns
    assert sum(total.latency_log2_us) == 2


# --- retries ---------------------------------------------------------------------------------

def test_backoff_doubles_up_to_its_cap() -> None:
    assert backoff(0.005) == 0.01
    assert backoff(RETRY_MAX_S) == RETRY_MAX_S


async def test_a_retry_runs_once_per_key_after_reading_pending_events() -> None:
    order: list[str] = []
    done = asyncio.Event()
    retries = Retries(asyncio.get_running_loop(), before=lambda: order.append("read events"))

    def work() -> None:
        order.append("retry")
        done.set()

    retries.later("k", work, 0.001)
    retries.later("k", work, 0.001)  # the same work is never scheduled twice
    assert retries.pending("k")
    await asyncio.wait_for(done.wait(), 5)
    assert order == ["read events", "retry"]
    assert not retries.pending("k")


async def test_cancelled_retries_never_run() -> None:
    ran: list[int] = []
    retries = Retries(asyncio.get_running_loop(), before=lambda: None)
    retries.later("k", lambda: ran.append(1), 0.001)
    retries.cancel()
    retries.later("k2", lambda: ran.append(2), 0.001)
    later: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_later(0.002, later.set_result, None)  # timers fire in deadline order
    await later
    assert ran == [] and not retries.pending("k")


# --- tasks -----------------------------------------------------------------------------------

async def test_tasks_are_held_until_they_end_and_cancel_stops_the_rest() -> None:
    tasks = Tasks()
    gate = asyncio.Event()

    async def waits() -> None:
        await gate.wait()

    t = tasks.spawn(waits())
    assert t in tasks and len(tasks) == 1
    await tasks.cancel()
    assert t.cancelled() and len(tasks) == 0


def _unkept_tasks(path: Path) -> list[str]:
    """Calls that start a task and drop the result: the loop keeps only a weak reference."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
            fn = node.value.func
            name = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else ""
            if name in ("create_task", "ensure_future"):
                out.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return out


def test_no_task_is_started_without_a_kept_reference() -> None:
    found = [hit for p in sorted((ROOT / "uffdd").rglob("*.py")) for hit in _unkept_tasks(p)]
    assert found == []
