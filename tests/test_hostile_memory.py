"""Hostile memory: a VMM that shrinks its own memory file while the daemon fills it, and a
snapshot written in place during a restore. The affected session ends with an error line, the
daemon lives, and a healthy guest served beside it gets every page right.

The daemon runs as shipped (fault-around, background pre-paging) in its own process, with a file
source and with a peer source (``uffdd serve`` in another process), on shmem and on hugetlbfs.
The attacker truncates its memory file to nothing right after ``ready``, while pre-paging writes
into it: before the fix, a copy through the second mapping died of SIGBUS (taking every other
guest down), and a ``pwrite`` grew the file back and the session failed page by page.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import HUGE, DaemonProcess, make_config, running_daemon
from uffdd.errors import SourceChanged
from uffdd.peer.testing import ServeProcess
from uffdd.testing import VmmProcess, VmmSpec, make_snapshot

MIB = 1 << 20
BIG = 256 * MIB
SMALL = 32 * MIB

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def big_snapshots(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """256 MiB snapshots (4 KiB and 2 MiB page stamps): big enough that pre-paging is still
    writing when the attacker truncates."""
    out = {}
    for ps in (4096, HUGE):
        path = tmp_path_factory.mktemp(f"big{ps}") / "guest.mem"
        make_snapshot(path, BIG, seed=21, page_size=ps)
        out[ps] = path
    return out


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[[Path], str]]:
    started: list[ServeProcess] = []

    def start(image: Path) -> str:
        proc = ServeProcess(["--image", str(image), "--listen", "127.0.0.1:0"], tmp_path / "serve.log").start()
        started.append(proc)
        return f"{proc.address[0]}:{proc.address[1]}"

    yield start
    for proc in started:
        proc.kill()


def _sources(kind: str, big: Path, small: Path, serve: Callable[[Path], str]) -> dict[str, Any]:
    if kind == "file":
        return {"big": {"kind": "file", "path": str(big)}, "small": {"kind": "file", "path": str(small)}}
    return {"big": {"kind": "peer", "address": serve(big)}, "small": {"kind": "peer", "address": serve(small)}}


@pytest.mark.parametrize("page_size", [4096, HUGE], ids=["shmem", "hugetlbfs"])
@pytest.mark.parametrize("kind", ["file", "peer"])
def test_a_vmm_that_shrinks_its_memory_file_mid_fill_ends_only_its_own_session(
        kind: str, page_size: int, daemon_process: Callable[..., DaemonProcess], big_snapshots: dict[int, Path],
        snapshot_4k: Path, snapshot_2m: Path, serve: Callable[[Path], str],
        hugepages: Callable[[int], None]) -> None:
    small = snapshot_4k if page_size == 4096 else snapshot_2m
    if page_size == HUGE:
        hugepages((BIG + SMALL) // HUGE)
    d = daemon_process(sources=_sources(kind, big_snapshots[page_size], small, serve))
    healthy = VmmProcess(VmmSpec(socket=d.socket, snapshot=str(small), region_sizes=[SMALL], page_size=page_size,
                                 threads=2, vm_id="healthy", source="small", start_delay=0.05))
    attacker = VmmProcess(VmmSpec(socket=d.socket, snapshot=str(big_snapshots[page_size]), region_sizes=[BIG],
                                  page_size=page_size, threads=0, vm_id="attacker", source="big",
                                  shrink_after=0.0, timeout=60))
    try:
        attack = attacker.result(90)
        res = healthy.result(90)
    finally:
        attacker.kill()
        healthy.kill()
    assert d.proc.poll() is None, "the daemon died"
    assert res["returncode"] == 0 and res["wrong_pages"] == 0 and res["pages_checked"] == SMALL // page_size
    events = attack["events"]
    assert isinstance(events, list)
    failed = [e for e in events if e.get("event") == "failed"]
    assert len(failed) == 1 and "no longer covers" in str(failed[0]["error"]), attack
    ends = {e["vm_id"]: e for e in d.log_lines() if e.get("event") == "session_end"}
    assert ends["attacker"]["reason"] == "GuestMemoryGone" and ends["attacker"]["level"] == "error"
    assert ends["healthy"]["error"] is None and ends["healthy"]["pages_filled"] == SMALL // page_size
    install_errors = [e for e in d.log_lines() if e.get("event") == "install_failed"]
    assert len(install_errors) <= 1, "the session failed page by page instead of ending"
    # A later guest is served as well: nothing the attack left behind is in its way.
    again = VmmProcess(VmmSpec(socket=d.socket, snapshot=str(small), region_sizes=[SMALL], page_size=page_size,
                               threads=2, vm_id="after", source="small"))
    assert again.result(90)["wrong_pages"] == 0


@pytest.mark.parametrize("verify", [True, False], ids=["checked", "verify_unchanged-off"])
async def test_a_snapshot_overwritten_in_place_mid_restore_ends_that_session_loudly(
        tmp_path: Path, snapshot_4k: Path, verify: bool) -> None:
    """Someone writes into a snapshot while a guest is restored from it: the session ends with
    a 'failed' line, an error log and the uffdd_source_changed counter, instead of mixing old
    and new bytes silently; a guest restored from another snapshot meanwhile is untouched.
    With verify_unchanged off (a file that may legitimately change) the session goes on."""
    victim = tmp_path / "victim.mem"
    shutil.copyfile(snapshot_4k, victim)
    cfg = make_config(tmp_path, snapshot_4k, sources={
        "default": {"kind": "file", "path": str(snapshot_4k)},
        "victim": {"kind": "file", "path": str(victim), "verify_unchanged": verify}})
    async with running_daemon(cfg, snapshot_4k) as d:
        listener = d.start_vmm(vm_id="victim", source="victim", listen_only=4.0)
        session = await d.session()
        healthy = d.start_vmm(vm_id="healthy", region_sizes=[SMALL], threads=2)
        with open(victim, "r+b") as fh:  # an in-place write: same inode, new bytes
            fh.write(b"\xee" * 4096)
        told = await asyncio.to_thread(listener.result, 30)
        res = await asyncio.to_thread(healthy.result, 60)
        assert res["wrong_pages"] == 0 and res["pages_checked"] == SMALL // 4096
        events = told["events"]
        assert isinstance(events, list)
        failed = [e for e in events if e.get("event") == "failed"]
        if verify:
            assert len(failed) == 1 and "modified during the restore" in str(failed[0]["error"]), told
            assert isinstance(session.failure, SourceChanged) and session.stats.source_changed == 1
            assert d.listener.ended_totals.source_changed == 1
        else:
            assert failed == [] and session.failure is None
