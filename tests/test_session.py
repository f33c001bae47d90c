"""End to end: the real daemon serving stand-in VMM processes through real userfaultfds."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import FAULT_PATHS, HUGE, Daemon, core_session, make_config, running_daemon
from tests.flaky import FlakySource
from uffdd.sources import BUILTIN_SOURCES
from uffdd.testing.waiting import eventually

MIB = 1 << 20


def assert_all_correct(res: dict[str, Any]) -> None:
    assert res.get("stage") != "handshake", res
    assert res["wrong_pages"] == 0, res
    expected = res["touched"] if res.get("verify_only_touched") else (
        res["pages"] - res.get("unmapped", 0) - ("final_addr" in res))
    assert res["pages_checked"] == expected, res
    assert res["returncode"] == 0, res


@pytest.mark.parametrize("preregister", [False, True], ids=["bare-uffd", "vmm-registered"])
async def test_4k_guest_gets_every_snapshot_byte_with_bare_or_preregistered_uffd(
        daemon: Daemon, preregister: bool) -> None:
    res = await daemon.run_vmm(region_sizes=[8 * MIB, 4 * MIB], threads=4, preregister=preregister)
    assert_all_correct(res)
    await daemon.wait_idle()
    assert daemon.listener.ended_totals.pages_filled == res["pages"]


@pytest.mark.parametrize("preregister", [False, True], ids=["bare-uffd", "vmm-registered"])
async def test_2m_hugetlbfs_guest_gets_every_snapshot_byte(
        daemon_2m: Daemon, hugepages: Any, preregister: bool) -> None:
    hugepages(16)
    res = await daemon_2m.run_vmm(region_sizes=[16 * MIB, 8 * MIB], page_size=HUGE, threads=4,
                                  preregister=preregister, prepopulate=0.3)
    assert_all_correct(res)
    assert res["pages"] == 12


async def test_blocked_time_is_attributed_to_each_faulting_vcpu_thread(daemon: Daemon) -> None:
    res = await daemon.run_vmm(region_sizes=[4 * MIB], threads=4)
    assert_all_correct(res)
    await daemon.wait_idle()
    by_tid = daemon.listener.ended_totals.blocked_ns_by_tid
    assert set(by_tid) == set(res["vcpu_tids"])  # the thread ids the guest's vCPUs really had
    assert all(ns > 0 for ns in by_tid.values())
    assert sum(by_tid.values()) == daemon.listener.ended_totals.blocked_ns


async def test_prepopulated_and_never_written_pages_both_get_snapshot_bytes(daemon: Daemon) -> None:
    res = await daemon.run_vmm(region_sizes=[8 * MIB], prepopulate=0.5, seed=3)
    assert_all_correct(res)
    await daemon.wait_idle()
    totals = daemon.listener.ended_totals
    # Pre-populated pages fault as MINOR, never-written ones as MISSING: both kinds were served.
    assert 0 < totals.minor_faults < totals.fault_msgs
    assert totals.minor_faults == res["prepopulated"]


async def test_three_regions_with_gaps_in_memory_file(daemon: Daemon) -> None:
    res = await daemon.run_vmm(region_sizes=[4 * MIB, 2 * MIB, 1 * MIB], region_gap=MIB, threads=3)
    assert_all_correct(res)


async def test_many_threads_on_the_same_pages_cause_one_fill_per_page(daemon: Daemon) -> None:
    res = await daemon.run_vmm(region_sizes=[2 * MIB], threads=8, same_pages=True)
    assert_all_correct(res)
    await daemon.wait_idle()
    t = daemon.listener.ended_totals
    assert t.fills_inline + t.fills_async == res["pages"]  # one fetch per page, however many faulted
    assert t.pages_filled == res["pages"]


async def test_many_threads_same_pages_with_slow_source_coalesce_onto_inflight_fill(
        tmp_path: Path, snapshot_4k: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(BUILTIN_SOURCES, "flaky", "tests.flaky:FlakySource")
    cfg = make_config(tmp_path, snapshot_4k,
                      sources={"default": {"kind": "flaky", "path": str(snapshot_4k), "fail_every": 10**9}})
    async with running_daemon(cfg, snapshot_4k) as d:
        res = await d.run_vmm(region_sizes=[1 * MIB], threads=8, same_pages=True)
        assert_all_correct(res)
        await d.wait_idle()
        t = d.listener.ended_totals
        assert t.fills_async == res["pages"]
        assert t.coalesced > 0  # other vCPUs waited on the fill in flight instead of fetching again


async def test_firecracker_list_form_uses_default_source(daemon: Daemon) -> None:
    res = await daemon.run_vmm(region_sizes=[2 * MIB, 2 * MIB], list_form=True, preregister=True)
    assert_all_correct(res)


async def test_handshake_body_split_over_several_reads_is_accepted(daemon: Daemon) -> None:
    res = await daemon.run_vmm(region_sizes=[2 * MIB, 1 * MIB], split_body=5)
    assert_all_correct(res)


async def test_vm_id_selects_the_snapshot_file(tmp_path: Path, daemon: Daemon) -> None:
    os.link(daemon.snapshot, daemon.snapshot.parent / "vm-7.mem") if not (
        daemon.snapshot.parent / "vm-7.mem").exists() else None
    res = await daemon.run_vmm(region_sizes=[2 * MIB], vm_id="vm-7", source="byid")
    assert_all_correct(res)
    res = await daemon.run_vmm(region_sizes=[2 * MIB], vm_id="no-such-vm", source="byid")
    assert res["stage"] == "handshake"
    assert "no-such-vm.mem" in res["error"]


def _daemon_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _memfd_mappings() -> int:
    with open("/proc/self/maps") as fh:
        return sum("memfd:uffdd-guest" in line for line in fh)


@pytest.mark.parametrize("how", ["disconnect", "sigkill"])
async def test_vmm_gone_mid_run_ends_session_and_releases_fds_and_mappings(daemon: Daemon, how: str) -> None:
    fds_before = _daemon_fds()
    assert _memfd_mappings() == 0  # nothing left from earlier tests
    size = 16 * MIB if how == "disconnect" else 32 * MIB  # one vCPU on the whole snapshot: still going when killed
    if how == "disconnect":
        res = await daemon.run_vmm(region_sizes=[size], threads=2, disconnect_after=200)
        assert res["returncode"] == 0
    else:
        vmm = daemon.start_vmm(region_sizes=[size], threads=1, prepopulate=0.0)
        await eventually(lambda: any(s.stats.pages_filled > 100 for s in daemon.listener.sessions.values()),
                         what="the guest is being restored")
        vmm.kill()
    await daemon.wait_idle()
    assert daemon.listener.sessions_total == 1
    assert 0 < daemon.listener.ended_totals.pages_filled < size // 4096
    # Everything the session held is gone at once: no fd, no mapping of the guest's memfd.
    def session_fds() -> dict[str, str]:
        out = {}
        for fd in _daemon_fds():
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            if "memfd:" in target or "userfaultfd" in target:
                out[fd] = target
        return out

    # (A userfaultfd whose VMM hung up early is read until that process has exited: at once.)
    await eventually(lambda: not {fd: t for fd, t in session_fds().items() if fd not in fds_before},
                     what="no descriptor of the session left")
    assert _memfd_mappings() == 0
    assert len(daemon.listener.orphans) == 0
    # ... and the daemon carries on serving.
    assert_all_correct(await daemon.run_vmm(region_sizes=[1 * MIB]))


async def test_a_vmm_that_hangs_up_early_and_unmaps_its_memory_is_not_blocked(daemon: Daemon) -> None:
    """A VMM keeps its own copy of the userfaultfd, hangs up before its guest is complete, then
    unmaps guest memory: the UNMAP event uffdd turned on is still read, so munmap returns (it
    used to wait forever on a userfaultfd nobody read). The daemon lets go once the VMM exits."""
    res = await daemon.run_vmm(region_sizes=[16 * MIB], threads=1, disconnect_after=200,
                               unmap_after_disconnect=True, timeout=20)
    assert res["returncode"] == 0 and float(res["unmap_s"]) < 5, res
    session = await daemon.session()
    assert session.closed and session.stats.pages_filled < (16 * MIB) // 4096
    await eventually(lambda: len(daemon.listener.orphans) == 0, what="the exited VMM's userfaultfd closed")


async def _raw_handshake(sock_path: str, body: bytes, fds: list[int], *, read: bool = True) -> dict[str, Any]:
    def go() -> dict[str, Any]:
        import array

        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(sock_path)
            s.settimeout(10)
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
            s.sendmsg([body], anc)
            line = s.makefile("rb").readline()
            return dict(json.loads(line)) if line else {}

    return await asyncio.to_thread(go)


def _memfd(size: int) -> int:
    fd = os.memfd_create("uffdd-guest", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def _region(addr: int = 0x7F0000000000, size: int = MIB, offset: int = 0, ps: int = 4096) -> dict[str, int]:
    return {"base_host_virt_addr": addr, "size": size, "offset": offset, "page_size": ps}


BAD_HANDSHAKES: list[tuple[str, bytes, str]] = [
    ("bad-json", b'{"regions": [oops]}', "not valid JSON"),
    ("overlap", json.dumps([_region(size=2 * MIB), _region(addr=0x7F0000100000, offset=2 * MIB)]).encode(), "overlap"),
    ("misaligned", json.dumps([_region(addr=0x7F0000000100)]).encode(), "aligned"),
    ("past-memfd", json.dumps([_region(offset=4 * MIB)]).encode(), "memory file"),
    ("past-snapshot", json.dumps([_region(size=64 * MIB)]).encode(), "page source"),
    ("unknown-source", json.dumps({"source": "nope", "regions": [_region()]}).encode(), "nope"),
    ("hugetlb-page-size-on-shmem", json.dumps([_region(size=HUGE, ps=HUGE)]).encode(), "page size"),
    ("not-mapped-in-vmm", json.dumps([_region()]).encode(), "register"),
]


async def test_malformed_handshakes_get_a_clear_error_while_a_healthy_session_finishes(daemon: Daemon) -> None:
    from uffdd.kernel import Userfaultfd

    healthy = daemon.start_vmm(region_sizes=[16 * MIB], threads=2)
    errors: dict[str, str] = {}
    for name, body, _ in BAD_HANDSHAKES:
        uffd = Userfaultfd.open()
        memfd = _memfd(128 * MIB if name == "past-snapshot" else 2 * MIB)
        try:
            answer = await _raw_handshake(daemon.socket, body, [uffd.fileno(), memfd])
        finally:
            uffd.close()
            os.close(memfd)
        errors[name] = answer.get("error", "")
    # Missing fds, one fd, too many fds: each named.
    errors["no-fds"] = (await _raw_handshake(daemon.socket, json.dumps([_region()]).encode(), [])).get("error", "")
    r, w = os.pipe()
    errors["three-fds"] = (await _raw_handshake(daemon.socket, json.dumps([_region()]).encode(), [r, w, r])).get(
        "error", "")
    os.close(r)
    os.close(w)
    res = await asyncio.to_thread(healthy.result, 90)
    assert_all_correct(res)
    for name, _, needle in BAD_HANDSHAKES:
        assert needle in errors[name], (name, errors[name])
    assert "[uffd, memfd]" in errors["no-fds"]
    assert "file descriptors" in errors["three-fds"]
    await daemon.wait_idle()
    assert daemon.listener.handshakes_refused == len(BAD_HANDSHAKES) + 2
    assert daemon.listener.sessions_total == 1


async def test_silent_client_is_refused_after_the_handshake_timeout(daemon: Daemon) -> None:
    def go() -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(daemon.socket)
            s.settimeout(10)
            s.sendall(b'[{"base_host_virt_addr": 1')  # incomplete, then silence
            return dict(json.loads(s.makefile("rb").readline()))

    answer = await asyncio.to_thread(go)
    assert "no complete handshake within 2s" in answer["error"]


async def test_source_failures_are_retried_and_never_reach_the_guest(
        tmp_path: Path, snapshot_4k: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(BUILTIN_SOURCES, "flaky", "tests.flaky:FlakySource")
    cfg = make_config(tmp_path, snapshot_4k,
                      sources={"default": {"kind": "flaky", "path": str(snapshot_4k), "fail_every": 3}})
    async with running_daemon(cfg, snapshot_4k) as d:
        vmm = d.start_vmm(region_sizes=[2 * MIB], threads=4)
        session = await d.session()
        assert_all_correct(await asyncio.to_thread(vmm.result, 90))
        await d.wait_idle()
        source = session.source
        assert isinstance(source, FlakySource) and source.failures > 100
        assert d.listener.ended_totals.source_errors == source.failures


@pytest.mark.parametrize("fault_path", FAULT_PATHS)
async def test_snapshot_truncated_mid_run_makes_faults_wait_not_read_zeros(
        tmp_path: Path, snapshot_4k: Path, fault_path: str) -> None:
    """Pages past the end of a shrunken snapshot are retried until the bytes are back (for a
    file that may change under the restore: a changed snapshot otherwise ends the session)."""
    snap = tmp_path / "shrinking.mem"
    data = snapshot_4k.read_bytes()[: 4 * MIB]
    snap.write_bytes(data)
    cfg = make_config(tmp_path, snap, session=core_session(fault_path),
                      sources={"default": {"kind": "file", "path": str(snap), "verify_unchanged": False}})
    async with running_daemon(cfg, snap) as d:
        vmm = d.start_vmm(region_sizes=[4 * MIB], threads=2, start_delay=1.0)
        await eventually(lambda: d.listener.sessions, what="the handshake was accepted")
        os.truncate(snap, 2 * MIB)  # after validation: the handshake saw a whole snapshot
        # Faults in the lost half are failing and waiting, not answered.
        await eventually(lambda: sum(s.stats.source_errors for s in d.listener.sessions.values()) >= 2,
                         what="fills of the lost half fail and wait")
        with open(snap, "r+b") as fh:
            fh.seek(2 * MIB)
            fh.write(data[2 * MIB :])
        res = await asyncio.to_thread(vmm.result, 60)
        assert_all_correct(res)


@pytest.mark.parametrize("fault_path", FAULT_PATHS)
async def test_snapshot_on_tmpfs_is_served_inline_without_a_thread_hop(
        tmp_path: Path, snapshot_4k: Path, fault_path: str) -> None:
    """tmpfs refuses RWF_NOWAIT; its reads never wait for a disk, so they stay on the fast path."""
    shm = Path("/dev/shm") / f"uffdd-test-{os.getpid()}.mem"
    shm.write_bytes(snapshot_4k.read_bytes()[: 4 * MIB])
    try:
        async with running_daemon(make_config(tmp_path, shm, session=core_session(fault_path)), shm) as d:
            res = await d.run_vmm(region_sizes=[4 * MIB])
            assert_all_correct(res)
            await d.wait_idle()
            assert d.listener.ended_totals.fills_inline == 1024
            assert d.listener.ended_totals.fills_async == 0
    finally:
        shm.unlink()


@pytest.mark.parametrize("fault_path", FAULT_PATHS)
async def test_snapshot_pages_evicted_from_page_cache_get_exact_bytes(
        tmp_path: Path, snapshot_4k: Path, fault_path: str) -> None:
    """RWF_NOWAIT refuses them: the C path hands them to Python, which reads inline once the
    kernel's readahead has them cached, or in a thread."""
    snap = tmp_path / "cold.mem"
    snap.write_bytes(snapshot_4k.read_bytes()[: 4 * MIB])
    fd = os.open(snap, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    async with running_daemon(make_config(tmp_path, snap, session=core_session(fault_path)), snap) as d:
        res = await d.run_vmm(region_sizes=[4 * MIB], threads=4)
        assert_all_correct(res)
        await d.wait_idle()
        totals = d.listener.ended_totals
        assert totals.fills_inline + totals.fills_async == totals.pages_filled == 1024


@pytest.mark.parametrize("native", [True, False], ids=["native-on", "native-off"])
async def test_session_uses_the_c_fast_path_unless_configured_off(
        tmp_path: Path, snapshot_4k: Path, native: bool) -> None:
    from uffdd.core import _fastpath  # noqa: F401 - ./scripts/test builds it; its absence is a failure here

    cfg = make_config(tmp_path, snapshot_4k, session={"fault_around": 0, "native": native})
    async with running_daemon(cfg, snapshot_4k) as d:
        vmm = d.start_vmm(region_sizes=[16 * MIB], threads=2, start_delay=1.0)
        await eventually(lambda: any(s.started for s in d.listener.sessions.values()),
                         what="the session started (its fault path is chosen)")
        (session,) = d.listener.sessions.values()
        assert session.fault_path == ("c" if native else "python")
        res = await asyncio.to_thread(vmm.result, 60)
        assert_all_correct(res)
        await d.wait_idle()
        assert d.listener.ended_totals.pages_filled == 4096


def test_cache_residency_check_tells_cached_from_evicted_snapshot_pages(tmp_path: Path) -> None:
    """Backs the inline path for pages RWF_NOWAIT refuses only because of a readahead mark."""
    from uffdd.sources.file import _all_cached

    snap = tmp_path / "resident.mem"
    snap.write_bytes(os.urandom(MIB))
    fd = os.open(snap, os.O_RDONLY)
    try:
        os.fsync(fd)
        assert _all_cached(fd, 0, MIB)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert not _all_cached(fd, 0, MIB)
        os.pread(fd, 4096, 8192)
        assert _all_cached(fd, 8192, 4096)
    finally:
        os.close(fd)
