"""Sessions survive the daemon: SIGKILL (or a hand-over) mid-migration, restart through the fd store.

The daemon runs under tests/supervisor.py, which keeps the descriptors the daemon stores
(FDSTORE=1) and passes them to the next start (LISTEN_FDS), as systemd does. The stand-in VMM
keeps faulting from several threads while the daemon dies; afterwards it checks every page of
its guest against the snapshot, and it can only finish if no vCPU thread is left waiting.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.supervisor import Supervisor
from uffdd.core import FILLED
from uffdd.service.control import query
from uffdd.testing import VmmProcess, VmmSpec
from uffdd.testing.waiting import wait_until

MIB = 1 << 20
REGIONS = [6 * MIB, 2 * MIB]
PAGES = sum(REGIONS) // 4096
MOMENT = 0.0002
"""Poll interval of waits that must catch a moment: a kill that lands while pages are missing."""


def write_config(tmp_path: Path, snapshot: Path, **extra: Any) -> Path:
    cfg: dict[str, Any] = {
        "listen": str(tmp_path / "uffdd.sock"),
        "sources": {"default": {"kind": "file", "path": str(snapshot)}},
        "log": {"format": "json", "level": "info"},
        # Demand faults only: no fault-around and no pre-paging, so work remains when it dies.
        "session": {"fault_around": 0, "prefetch": {"enabled": False}, "replay": False},
        "workers": 1,  # the single-process daemon unless a test asks for workers
    }
    cfg.update(extra)
    path = tmp_path / "uffdd.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@contextlib.contextmanager
def supervised(tmp_path: Path, snapshot: Path, config: dict[str, Any] | None = None,
               **sup_kw: Any) -> Iterator[Supervisor]:
    """The daemon as a Type=notify service with an fd store; everything is killed at the end."""
    cfg = write_config(tmp_path, snapshot, **(config or {}))
    sup = Supervisor([sys.executable, "-m", "uffdd", "run", "-c", str(cfg)], log_path=tmp_path / "daemon.log",
                     **sup_kw)
    sup.start()
    try:
        yield sup
    finally:
        sup.close()


def log_events(tmp_path: Path) -> list[dict[str, Any]]:
    import json

    out = []
    for line in (tmp_path / "daemon.log").read_text().splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


def filled(state_fd: int, pages: int) -> int:
    return os.pread(state_fd, pages, 0).count(FILLED)


def wait_filled(state_fd: int, at_least: int, timeout: float = 20) -> int:
    """Until ``at_least`` pages are in; returns how many are."""
    def enough() -> int:
        n = filled(state_fd, PAGES)
        return n if n >= at_least else 0

    return wait_until(enough, timeout=timeout, max_interval=MOMENT, what=f"{at_least} pages filled")


def start_guest(tmp_path: Path, snapshot: Path, seed: int, vm_id: str = "mig", threads: int = 4) -> VmmProcess:
    return VmmProcess(VmmSpec(socket=str(tmp_path / "uffdd.sock"), snapshot=str(snapshot), region_sizes=REGIONS,
                              threads=threads, vm_id=vm_id, seed=seed, timeout=50))


def state_fd_of(sup: Supervisor, session: str, timeout: float = 15) -> int:
    if not sup.wait_for(lambda: f"{session}.desc" in sup.stored_names(), timeout):
        raise TimeoutError(f"{session} was not stored: {sup.stored_names()}")
    return sup.stored_fd(f"{session}.state")


def assert_guest_whole(res: dict[str, Any]) -> None:
    assert res["returncode"] == 0, res
    assert res["wrong_pages"] == 0, res
    assert res["pages_checked"] == PAGES, res


@pytest.mark.timeout(60)
@pytest.mark.parametrize("run", range(20))
def test_sigkill_mid_migration_then_restart_from_the_fd_store_leaves_every_page_right(
        run: int, tmp_path: Path, snapshot_4k: Path) -> None:
    rng = random.Random(run)
    with supervised(tmp_path, snapshot_4k) as sup:
        sup.wait_ready(run=1)
        vmm = start_guest(tmp_path, snapshot_4k, seed=run)
        try:
            state = state_fd_of(sup, "s1")
            try:
                wait_filled(state, int(PAGES * rng.uniform(0.05, 0.7)))
                sup.kill(signal.SIGKILL)
                sup.wait_for(lambda: len(sup.exits) == 1, 10)
                at_kill = filled(state, PAGES)
            finally:
                os.close(state)
            sup.wait_ready(run=2)
            res = vmm.result(45)
        finally:
            vmm.kill()
        assert sup.exits[0].returncode == -signal.SIGKILL
        assert 0 < at_kill < PAGES, f"the kill did not land mid-migration ({at_kill}/{PAGES} pages)"
        assert_guest_whole(res)
        resumed = [e for e in log_events(tmp_path) if e.get("event") == "session_resumed"]
        assert [e["session"] for e in resumed] == ["s1"]
        # The VMM hung up: the successor ended the session and emptied the store of it.
        assert sup.wait_for(lambda: sup.stored_names() == ["listen"], 10), sup.stored_names()


@pytest.mark.timeout(90)
def test_three_kills_during_one_migration_of_two_guests_lose_no_page(tmp_path: Path, snapshot_4k: Path) -> None:
    with supervised(tmp_path, snapshot_4k) as sup:
        sup.wait_ready(run=1)
        # Both guests connect first and start faulting together, a second after their ready line.
        vmms = [VmmProcess(VmmSpec(socket=str(tmp_path / "uffdd.sock"), snapshot=str(snapshot_4k),
                                   region_sizes=REGIONS, threads=3, vm_id=f"g{i}", seed=100 + i, start_delay=1.0,
                                   timeout=50)) for i in range(2)]
        try:
            states = [state_fd_of(sup, sid) for sid in ("s1", "s2")]
            at_kill: list[list[int]] = []
            try:
                for k, frac in enumerate((0.1, 0.35, 0.6)):
                    wait_until(lambda f=frac: min(filled(fd, PAGES) for fd in states) >= int(PAGES * f),  # type: ignore[misc]
                               timeout=20, max_interval=MOMENT, what=f"{frac:.0%} of both guests filled")
                    sup.kill(signal.SIGKILL)
                    sup.wait_for(lambda kills=k + 1: len(sup.exits) == kills, 10)  # type: ignore[misc]
                    at_kill.append([filled(fd, PAGES) for fd in states])
                    sup.wait_ready(run=k + 2)
            finally:
                for fd in states:
                    os.close(fd)
            results = [v.result(60) for v in vmms]
        finally:
            for v in vmms:
                v.kill()
        for res in results:
            assert_guest_whole(res)
        assert [e.returncode for e in sup.exits] == [-signal.SIGKILL] * 3
        # The first kill caught a guest mid-way (the other may be whole by then: it was served
        # first); every guest caught mid-way was resumed once per kill.
        assert any(0 < n < PAGES for n in at_kill[0]), at_kill
        resumed = [e["session"] for e in log_events(tmp_path) if e.get("event") == "session_resumed"]
        for sid, counts in zip(("s1", "s2"), zip(*at_kill, strict=True), strict=True):
            assert resumed.count(sid) == sum(1 for n in counts if n < PAGES), (sid, at_kill, resumed)


@pytest.mark.timeout(60)
def test_sigterm_with_handover_leaves_sessions_to_the_next_start(tmp_path: Path, snapshot_4k: Path) -> None:
    with supervised(tmp_path, snapshot_4k, config={"shutdown": {"on_sigterm": "handover"}},
                    fd_store_preserve=True) as sup:
        sup.wait_ready(run=1)
        vmm = start_guest(tmp_path, snapshot_4k, seed=3)
        try:
            state = state_fd_of(sup, "s1")
            try:
                wait_filled(state, PAGES // 3)
            finally:
                os.close(state)
            ex = sup.stop()
            assert ex.returncode == 0  # a clean exit: the sessions are in the store
            assert {"s1.uffd", "s1.mem", "s1.state", "s1.conn", "s1.desc", "listen"} <= set(sup.stored_names())
            sup.start_again()
            sup.wait_ready(run=2)
            res = vmm.result(45)
        finally:
            vmm.kill()
        assert_guest_whole(res)
        events = [e.get("event") for e in log_events(tmp_path)]
        assert "handing_over" in events and "session_resumed" in events


@pytest.mark.timeout(60)
def test_a_guest_that_connects_while_the_daemon_is_down_waits_in_the_stored_backlog(
        tmp_path: Path, snapshot_4k: Path) -> None:
    with supervised(tmp_path, snapshot_4k, restart_sec=1.0) as sup:
        sup.wait_ready(run=1)
        sup.kill(signal.SIGKILL)
        sup.wait_for(lambda: len(sup.exits) == 1, 10)
        vmm = start_guest(tmp_path, snapshot_4k, seed=4)  # connects to the stored listening socket
        try:
            sup.wait_ready(run=2)
            res = vmm.result(45)
        finally:
            vmm.kill()
        assert_guest_whole(res)


@pytest.mark.timeout(60)
def test_a_vmm_that_leaves_while_the_daemon_is_down_is_dropped_by_the_successor(
        tmp_path: Path, snapshot_4k: Path) -> None:
    with supervised(tmp_path, snapshot_4k, restart_sec=1.0) as sup:
        sup.wait_ready(run=1)
        vmm = start_guest(tmp_path, snapshot_4k, seed=5)
        try:
            state = state_fd_of(sup, "s1")
            try:
                wait_filled(state, PAGES // 4)
            finally:
                os.close(state)
            sup.kill(signal.SIGKILL)
            sup.wait_for(lambda: len(sup.exits) == 1, 10)
        finally:
            vmm.kill()
        # The manager drops the polled connection on POLLHUP; the rest goes with the successor.
        sup.wait_ready(run=2)
        assert sup.wait_for(lambda: sup.stored_names() == ["listen"], 10), sup.stored_names()
        events = [e.get("event") for e in log_events(tmp_path)]
        assert "stored_session_vmm_gone" in events and "session_resumed" not in events


@pytest.mark.timeout(60)
def test_a_session_whose_source_is_gone_after_restart_waits_in_the_store_until_a_reload_fixes_it(
        tmp_path: Path, snapshot_4k: Path) -> None:
    with supervised(tmp_path, snapshot_4k) as sup:
        sup.wait_ready(run=1)
        vmm = start_guest(tmp_path, snapshot_4k, seed=6)
        try:
            state = state_fd_of(sup, "s1")
            try:
                wait_filled(state, PAGES // 4)
                good = (tmp_path / "uffdd.yaml").read_text()
                (tmp_path / "uffdd.yaml").write_text(good.replace("default:", "renamed:"))
                sup.kill(signal.SIGKILL)
                sup.wait_ready(run=2)  # resuming is part of start-up: READY=1 comes after the attempt
                assert "resume_failed" in [e.get("event") for e in log_events(tmp_path)]
                assert "s1.uffd" in sup.stored_names()  # kept: the guest waits, it is not cut off
                status = query(str(tmp_path / "uffdd.ctl"))
                assert status["unresumed"] == ["s1"] and status["sessions"] == []  # nothing serves its faults
                assert vmm.proc.poll() is None and filled(state, PAGES) < PAGES  # the guest waits, unharmed
                (tmp_path / "uffdd.yaml").write_text(good)
                sup.reload()
                sup.wait_message("RELOADING", "1", run=2)
                res = vmm.result(45)
            finally:
                os.close(state)
        finally:
            vmm.kill()
        assert_guest_whole(res)
        events = [e.get("event") for e in log_events(tmp_path)]
        assert "resume_failed" in events and "session_resumed" in events


@pytest.mark.timeout(60)
def test_a_session_completed_before_the_kill_is_only_watched_and_never_completed_twice(
        tmp_path: Path, snapshot_4k: Path) -> None:
    config = {"session": {"fault_around": 0, "prefetch": {"enabled": True}, "replay": False}}
    with supervised(tmp_path, snapshot_4k, config=config) as sup:
        sup.wait_ready(run=1)
        spec = VmmSpec(socket=str(tmp_path / "uffdd.sock"), snapshot=str(snapshot_4k), region_sizes=REGIONS,
                       threads=2, vm_id="done", start_delay=1.5, wait_complete=10, timeout=50)
        vmm = VmmProcess(spec)
        try:
            assert sup.wait_for(lambda: "s1.desc" in sup.stored_names(), 10)
            # Complete: pre-paging filled every page, the uffd, memory and state left the store.
            assert sup.wait_for(lambda: sorted(sup.stored_names()) == ["listen", "s1.conn", "s1.desc"], 10), \
                sup.stored_names()
            sup.kill(signal.SIGKILL)
            sup.wait_ready(run=2)
            res = vmm.result(45)
        finally:
            vmm.kill()
        assert_guest_whole(res)
        events: list[dict[str, Any]] = res["events"]  # type: ignore[assignment]
        assert [e["event"] for e in events] == ["complete"]  # one, from the first daemon
        assert res["unregistered"] is True
        assert sup.wait_for(lambda: sup.stored_names() == ["listen"], 10), sup.stored_names()
