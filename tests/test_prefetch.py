"""Fault-around, background pre-paging, completion, working-set record and replay."""

from __future__ import annotations

import asyncio
import shutil
import threading
from pathlib import Path
from typing import Any, ClassVar, Literal

import pytest
import structlog

from tests.conftest import HUGE, Daemon, make_config, running_daemon
from tests.flaky import FlakySource
from tests.test_session import assert_all_correct
from uffdd.config import Config
from uffdd.core import workingset
from uffdd.core.prefetch import CRASH_DELAY_MIN_S
from uffdd.service.metrics import SessionCollector
from uffdd.sources import BUILTIN_SOURCES
from uffdd.sources.base import PageSource, SourceConfig
from uffdd.sources.file import FileSource, FileSourceConfig, record_path_for
from uffdd.testing.waiting import eventually

MIB = 1 << 20
PREFETCH_ON = {"fault_around": 0, "prefetch": {"enabled": True}}


def session_cfg(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"fault_around": 0, "prefetch": {"enabled": False}}
    base.update(kw)
    return base


@pytest.mark.parametrize("page_size", [4096, HUGE], ids=["4k", "2m"])
async def test_idle_guest_is_fully_installed_and_told_once_then_reads_without_a_fault(
        tmp_path: Path, snapshot_4k: Path, snapshot_2m: Path, hugepages: Any, page_size: int) -> None:
    snap = snapshot_2m if page_size == HUGE else snapshot_4k
    if page_size == HUGE:
        hugepages(12)
    cfg = make_config(tmp_path, snap, session=PREFETCH_ON)
    async with running_daemon(cfg, snap) as d:
        res = await d.run_vmm(region_sizes=[16 * MIB, 8 * MIB], page_size=page_size, touch_fraction=0,
                              wait_complete=30, prepopulate=0.2)
        assert_all_correct(res)
        pages = 24 * MIB // page_size
        assert res["present_before_touch"] == pages  # every page mapped before the guest touched any
        assert res["unregistered"] is True
        assert [e["event"] for e in res["events"]] == ["complete"]  # reported exactly once
        await d.wait_idle()
        t = d.listener.ended_totals
        assert t.fault_msgs == 0
        assert t.pages_prefetch == t.pages_filled == pages


async def test_fault_around_fills_the_block_with_one_fault(tmp_path: Path, snapshot_4k: Path) -> None:
    cfg = make_config(tmp_path, snapshot_4k, session=session_cfg(fault_around=64 * 1024))
    async with running_daemon(cfg, snapshot_4k) as d:
        res = await d.run_vmm(region_sizes=[8 * MIB], threads=4, prepopulate=0.1)
        assert_all_correct(res)
        await d.wait_idle()
        t = d.listener.ended_totals
        assert t.pages_demand + t.pages_fault_around == t.pages_filled == 2048
        assert t.pages_fault_around > 2048 // 2
        assert t.fault_msgs < 2048 // 2  # most touches found their page already mapped


class SlowPrefetchConfig(SourceConfig):
    kind: Literal["slowprefetch"] = "slowprefetch"
    path: str


class SlowPrefetchSource(PageSource):
    """Demand fills are fast; every background fill takes a long time."""

    config_model: ClassVar[type[SourceConfig]] = SlowPrefetchConfig

    def __init__(self, inner: FileSource) -> None:
        self.inner = inner
        self.prefetch_calls = 0

    @classmethod
    async def open(cls, config: SourceConfig, *, vm_id: str) -> SlowPrefetchSource:
        assert isinstance(config, SlowPrefetchConfig)
        return cls(await FileSource.open(FileSourceConfig(path=config.path), vm_id=vm_id))

    @property
    def size(self) -> int:
        return self.inner.size

    async def fill(self, offset: int, dest: memoryview) -> None:
        await self.inner.fill(offset, dest)

    async def prefetch(self, offset: int, dest: memoryview) -> None:
        self.prefetch_calls += 1
        await asyncio.sleep(0.5)
        await self.inner.fill(offset, dest)

    async def aclose(self) -> None:
        await self.inner.aclose()


def slow_prefetch_config(tmp_path: Path, snapshot: Path, monkeypatch: pytest.MonkeyPatch) -> Config:
    """A SlowPrefetchSource, one page per fault, four background runs of 16 pages in flight."""
    monkeypatch.setitem(BUILTIN_SOURCES, "slowprefetch", "tests.test_prefetch:SlowPrefetchSource")
    return make_config(tmp_path, snapshot, sources={"default": {"kind": "slowprefetch", "path": str(snapshot)}},
                       session={"fault_around": 0, "prefetch": {"enabled": True, "chunk": 64 * 1024,
                                                                 "max_inflight": 256 * 1024}})


async def test_demand_faults_are_served_ahead_of_queued_background_work(
        tmp_path: Path, snapshot_4k: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = slow_prefetch_config(tmp_path, snapshot_4k, monkeypatch)
    async with running_daemon(cfg, snapshot_4k) as d:
        # 4096 pages; background work at 4 chunks of 16 pages per 0.5 s would need ~30 s.
        vmm = d.start_vmm(region_sizes=[16 * MIB], threads=4, timeout=20)
        session = await d.session()
        res: dict[str, Any] = await asyncio.to_thread(vmm.result, 30)
        assert_all_correct(res)
        assert res["elapsed_s"] < 10
        await d.wait_idle()
        t = d.listener.ended_totals
        assert isinstance(session.source, SlowPrefetchSource) and session.source.prefetch_calls > 0
        assert t.pages_demand > 3000 and t.pages_prefetch < 1000, t


async def test_recorded_working_set_is_replayed_and_cuts_faults(tmp_path: Path, snapshot_4k: Path) -> None:
    snap = tmp_path / "ws.mem"
    shutil.copy(snapshot_4k, snap)
    workload: dict[str, Any] = {"region_sizes": [16 * MIB], "touch_fraction": 0.1, "seed": 9, "threads": 2,
                                "verify_only_touched": True}
    cfg1 = make_config(tmp_path, snap, session=session_cfg(record=True))
    async with running_daemon(cfg1, snap) as d:
        assert_all_correct(await d.run_vmm(**workload))
        await d.wait_idle()
        faults_recording = d.listener.ended_totals.fault_msgs
    record = record_path_for(snap)
    pages = workingset.parse(Path(record).read_bytes(), source_size=snap.stat().st_size, page_size=4096)
    assert len(pages) == faults_recording == int(4096 * 0.1)

    cfg2 = make_config(tmp_path, snap, session=session_cfg(record=True, replay=True))
    async with running_daemon(cfg2, snap) as d:
        assert_all_correct(await d.run_vmm(start_delay=0.5, **workload))
        await d.wait_idle()
        t = d.listener.ended_totals
    assert t.pages_replay == len(pages)
    assert t.fault_msgs < faults_recording // 4
    # The replayed record is kept, not replaced by this run's much smaller one.
    assert len(workingset.parse(Path(record).read_bytes(), source_size=snap.stat().st_size, page_size=4096)) == len(
        pages)


@pytest.mark.parametrize("damage", ["garbage", "stale-size", "truncated"])
async def test_corrupt_or_stale_record_is_ignored_with_a_warning(
        tmp_path: Path, snapshot_4k: Path, damage: str) -> None:
    snap = tmp_path / "ws.mem"
    shutil.copy(snapshot_4k, snap)
    good = workingset.encode([1, 2, 3], source_size=snap.stat().st_size, page_size=4096)
    bad = {"garbage": b"\x00not a record at all",
           "stale-size": workingset.encode([1, 2, 3], source_size=snap.stat().st_size * 2, page_size=4096),
           "truncated": good[:-2]}[damage]
    Path(record_path_for(snap)).write_bytes(bad)
    cfg = make_config(tmp_path, snap, session=session_cfg(replay=True))
    with structlog.testing.capture_logs() as logs:
        async with running_daemon(cfg, snap) as d:
            assert_all_correct(await d.run_vmm(region_sizes=[4 * MIB], start_delay=0.3))
            await d.wait_idle()
            assert d.listener.ended_totals.pages_replay == 0
    warnings = [e for e in logs if e["event"] == "working_set_ignored"]
    assert len(warnings) == 1 and warnings[0]["log_level"] == "warning"


async def test_prefetch_rate_limit_holds_background_bandwidth(tmp_path: Path, snapshot_4k: Path) -> None:
    cfg = make_config(tmp_path, snapshot_4k, session={"fault_around": 0, "prefetch": {
        "enabled": True, "chunk": 256 * 1024, "rate": 8.0}})
    async with running_daemon(cfg, snapshot_4k) as d:
        res = await d.run_vmm(region_sizes=[16 * MIB], touch_fraction=0, wait_complete=30)
        assert_all_correct(res)
        assert [e["event"] for e in res["events"]] == ["complete"]
        await d.wait_idle()
        # 16 MiB at 8 MiB/s, in 256 KiB chunks claimed once they fit the limit: about 2 s.
        assert 1.7 <= d.listener.ended_totals.complete_s <= 6


async def test_defaults_restore_a_guest_with_demand_fault_around_and_prefetch_together(daemon: Daemon,
                                                                                       tmp_path: Path) -> None:
    cfg = make_config(tmp_path, daemon.snapshot, listen=str(tmp_path / "defaults.sock"),
                      session={})
    async with running_daemon(cfg, daemon.snapshot) as d:
        res = await d.run_vmm(region_sizes=[16 * MIB, 8 * MIB], threads=4, prepopulate=0.1, wait_complete=30)
        assert_all_correct(res)
        assert [e["event"] for e in res["events"]] == ["complete"]
        await d.wait_idle()
        t = d.listener.ended_totals
        assert t.pages_demand + t.pages_fault_around + t.pages_prefetch == t.pages_filled == 6144


async def test_a_fault_on_a_page_a_background_copy_has_not_reached_takes_it_over(
        tmp_path: Path, snapshot_4k: Path) -> None:
    """A background run of the whole guest is copied a step at a time; vCPUs that fault on its
    pages meanwhile do not wait for the run: the pages it has not reached are theirs."""
    cfg = make_config(tmp_path, snapshot_4k, session={"fault_around": 0, "prefetch": {
        "enabled": True, "chunk": 32 * MIB, "max_inflight": 32 * MIB}})
    async with running_daemon(cfg, snapshot_4k) as d:
        vmm = d.start_vmm(region_sizes=[32 * MIB], threads=4, timeout=30)
        session = await d.session()
        res = await asyncio.to_thread(vmm.result, 30)
        assert_all_correct(res)
        await d.wait_idle()
    stats = session.stats
    assert stats.pages_prefetch > 0 and stats.stolen > 0, stats
    assert stats.pages_filled == 8192


class JoinCheckConfig(FileSourceConfig):
    kind: Literal["joincheck"] = "joincheck"  # type: ignore[assignment]


class JoinCheckSource(FileSource):
    """A file source that notes, when it is closed, which of its session's copy threads live."""

    config_model: ClassVar[type[SourceConfig]] = JoinCheckConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.copy_threads_at_close: list[str] | None = None

    async def aclose(self) -> None:
        self.copy_threads_at_close = [t.name for t in threading.enumerate() if t.name.startswith("uffdd-prefetch-")]
        await super().aclose()


async def test_copy_threads_are_joined_before_the_source_is_closed(
        tmp_path: Path, snapshot_4k: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A thread still copying after close could preadv a closed (or reused) fd number into guest memory."""
    monkeypatch.setitem(BUILTIN_SOURCES, "joincheck", "tests.test_prefetch:JoinCheckSource")
    cfg = make_config(tmp_path, snapshot_4k, sources={"default": {"kind": "joincheck", "path": str(snapshot_4k)}},
                      session=PREFETCH_ON)
    async with running_daemon(cfg, snapshot_4k) as d:
        vmm = d.start_vmm(region_sizes=[16 * MIB], touch_fraction=0, wait_complete=30)
        session = await d.session()
        res = await asyncio.to_thread(vmm.result, 30)
        assert_all_correct(res)
        await d.wait_idle()
    source = session.source
    assert isinstance(source, JoinCheckSource)
    assert session.stats.pages_prefetch > 0  # the copy threads did run
    assert source.copy_threads_at_close == []


async def test_background_work_that_crashes_backs_off_instead_of_spinning_then_finishes(
        tmp_path: Path, snapshot_4k: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Background reads fail as they do in a process that cannot start a thread (not a source
    error) for a second: pre-paging backs off (a handful of tries and log lines, not thousands),
    then installs the whole guest once they work again, every byte right."""
    monkeypatch.setitem(BUILTIN_SOURCES, "flaky", "tests.flaky:FlakySource")
    cfg = make_config(tmp_path, snapshot_4k, session=PREFETCH_ON, sources={"default": {
        "kind": "flaky", "path": str(snapshot_4k), "fail_every": 10**9, "prefetch_crash_s": 1.0}})
    with structlog.testing.capture_logs() as logs:
        async with running_daemon(cfg, snapshot_4k) as d:
            res = await d.run_vmm(region_sizes=[8 * MIB], touch_fraction=0, wait_complete=30)
            session = await d.session()
    assert_all_correct(res)
    assert [e["event"] for e in res["events"]] == ["complete"]
    source = session.source
    assert isinstance(source, FlakySource)
    assert 1 <= source.crashes <= 40, source.crashes  # without the back-off: thousands in that second
    crashed = [e for e in logs if e["event"] == "prefetch_crashed"]
    assert 1 <= len(crashed) <= 10 and crashed[0]["retry_in"] == CRASH_DELAY_MIN_S


async def test_pages_in_flight_are_counted_as_they_go_for_the_metrics(
        tmp_path: Path, snapshot_4k: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The uffdd_pages_inflight gauge comes from the fillers' own counts, not a scan of every
    page's state per scrape: four slow background runs of 16 pages show as 64, then 0."""
    cfg = slow_prefetch_config(tmp_path, snapshot_4k, monkeypatch)
    async with running_daemon(cfg, snapshot_4k) as d:
        vmm = d.start_vmm(region_sizes=[1 * MIB], touch_fraction=0, wait_complete=30)
        session = await d.session()

        def gauge() -> float:
            fams = {f.name: f for f in SessionCollector(d.listener).collect()}
            return sum(s.value for s in fams["uffdd_pages_inflight"].samples)

        await eventually(lambda: session.pages_in_flight == 64 and gauge() == 64, what="four runs in flight")
        res: dict[str, Any] = await asyncio.to_thread(vmm.result, 30)
        assert_all_correct(res)
        assert session.pages_in_flight == 0 and gauge() == 0
