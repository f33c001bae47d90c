"""Restores from packed images behind real servers: nginx on loopback and moto's S3 server.

A stand-in VMM faults on guest memory, the daemon fills it from a ``kind: image`` source, and
the VMM checks every page against the memory file the image was packed from. Servers die,
answer 500s or slowly, hold a corrupted chunk; the chunk cache holds a torn file: zero wrong
pages every time, and a healthy guest on the same daemon is served meanwhile.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import Daemon, DaemonProcess, make_config, running_daemon
from tests.test_cli import assert_demo_ok, uffdd_cli
from uffdd.images.cache import shared_cache
from uffdd.images.pack import PackOptions, PackResult, pack
from uffdd.sources.image import ImageSource
from uffdd.testing import VmmProcess, VmmSpec
from uffdd.testing.guestmem import make_guest_image
from uffdd.testing.servers import MotoServer, NginxServer
from uffdd.testing.waiting import eventually

MIB = 1 << 20
SIZE = 32 * MIB
FAST = {"retry_min": 0.01, "retry_max": 0.2, "timeout": 5.0, "connect_timeout": 1.0, "open_timeout": 5.0}
PREFETCH = {"fault_around": 65536, "prefetch": {"enabled": True}}


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(memory file, store directory holding the image ``vm.json``), packed once per module."""
    work = tmp_path_factory.mktemp("image")
    mem = work / "vm.mem"
    make_guest_image(mem, SIZE, seed=21)
    asyncio.run(pack(str(mem), str(work / "store"), PackOptions(name="vm")))
    return mem, work / "store"


@pytest.fixture
def store(packed: tuple[Path, Path], tmp_path: Path) -> Path:
    """A copy of the packed store this test may damage."""
    return Path(shutil.copytree(packed[1], tmp_path / "store"))


@pytest.fixture
def nginx(store: Path, tmp_path: Path) -> Iterator[NginxServer]:
    if not NginxServer.available():
        pytest.fail("nginx is not installed: ./scripts/test installs Debian's nginx-light")
    server = NginxServer(store, tmp_path / "nginx").start()
    try:
        yield server
    finally:
        server.kill()


def chunk_gets(server: NginxServer) -> Counter[str]:
    """Chunk objects read, by path: whole (200) or as one range of the size the manifest says (206)."""
    return Counter(path for method, path, status, _ in server.requests("/chunks/")
                   if method == "GET" and status in (200, 206))


def image_source(url: str, tmp_path: Path, **extra: Any) -> dict[str, Any]:
    return {"kind": "image", "url": url, "cache": {"path": str(tmp_path / "cache"), "max_bytes": "1GiB"},
            **FAST, **extra}


def image_spec(d: Daemon, mem: Path, **kw: Any) -> VmmSpec:
    return d.spec(snapshot=str(mem), source="image", region_sizes=[SIZE], **kw)


@pytest.fixture
async def image_daemon(packed: tuple[Path, Path], nginx: NginxServer, tmp_path: Path,
                       snapshot_4k: Path) -> AsyncIterator[Daemon]:
    """An in-process daemon with the image behind nginx ("image") and a file source ("default")."""
    cfg = make_config(tmp_path, snapshot_4k, session=PREFETCH, sources={
        "default": {"kind": "file", "path": str(snapshot_4k)},
        "image": image_source(f"{nginx.url}/vm.json", tmp_path, deadline=1.0)})
    async with running_daemon(cfg, snapshot_4k) as d:
        yield d


def assert_exact(res: dict[str, Any]) -> None:
    assert res.get("stage") != "handshake", res
    checked = res["touched"] if res.get("verify_only_touched") else res["pages"]
    assert res["wrong_pages"] == 0 and res["pages_checked"] == checked > 0 and res["returncode"] == 0, res


def the_source(d: Daemon) -> ImageSource:
    for s in d.listener.sessions.values():
        if isinstance(s.source, ImageSource):
            return s.source
    raise AssertionError("no image session")


async def healthy_guest_is_served(d: Daemon) -> None:
    """A guest of the file source, restored while the image guest waits: every byte right."""
    assert_exact(await d.run_vmm(region_sizes=[8 * MIB], threads=2))


# --- restores and the cache -----------------------------------------------------------------
def start_daemon(tmp_path: Path, name: str, source: dict[str, Any]) -> DaemonProcess:
    sock = str(tmp_path / f"{name}.sock")
    cfg_path = tmp_path / f"{name}.yaml"
    cfg_path.write_text(yaml.safe_dump({"listen": sock, "sources": {"image": source}, "workers": 1,
                                        "log": {"format": "json", "level": "info"}, "session": PREFETCH}))
    log_path = tmp_path / f"{name}.log"
    with open(log_path, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "uffdd", "run", "-c", str(cfg_path)], stdout=fh,
                                stderr=subprocess.STDOUT)
    d = DaemonProcess(proc=proc, socket=sock, log_path=log_path)
    deadline = time.monotonic() + 15
    while not os.path.exists(sock):
        if proc.poll() is not None or time.monotonic() > deadline:
            d.stop(signal.SIGKILL)
            raise RuntimeError(f"daemon did not start: {log_path.read_text()[-2000:]}")
        time.sleep(0.02)
    return d


def restore(sock: str, mem: Path) -> dict[str, Any]:
    vmm = VmmProcess(VmmSpec(socket=sock, snapshot=str(mem), region_sizes=[SIZE], source="image", vm_id="vm",
                             threads=4, wait_complete=30, timeout=90))
    try:
        return vmm.result(90)
    finally:
        vmm.kill()


def test_a_second_restore_after_a_restart_reads_no_chunk_from_the_network(
        packed: tuple[Path, Path], nginx: NginxServer, tmp_path: Path) -> None:
    mem = packed[0]
    source = image_source(f"{nginx.url}/vm.json", tmp_path)
    first = start_daemon(tmp_path, "first", source)
    try:
        res = restore(first.socket, mem)
        assert_exact(res)
        assert res["present_before_touch"] == res["pages"], "installed whole by pre-paging"
    finally:
        first.stop()
    gets = chunk_gets(nginx)
    assert gets and max(gets.values()) == 1, "each chunk fetched once"
    second = start_daemon(tmp_path, "second", source)
    try:
        assert_exact(restore(second.socket, mem))
    finally:
        second.stop()
    assert chunk_gets(nginx) == gets, "the second restore found every chunk in the cache"
    assert len([r for r in nginx.requests("/vm.json")]) == 2


def test_two_daemons_sharing_a_cache_fetch_each_chunk_once(
        packed: tuple[Path, Path], nginx: NginxServer, tmp_path: Path) -> None:
    mem = packed[0]
    # Slow answers keep both daemons wanting the same chunks at the same time.
    nginx.start(rate="4m")
    source = image_source(f"{nginx.url}/vm.json", tmp_path)
    daemons = [start_daemon(tmp_path, f"d{i}", source) for i in range(2)]
    try:
        vmms = [VmmProcess(VmmSpec(socket=d.socket, snapshot=str(mem), region_sizes=[SIZE], source="image",
                                   vm_id="vm", threads=2, wait_complete=60, timeout=90)) for d in daemons]
        try:
            results = [v.result(90) for v in vmms]
        finally:
            for v in vmms:
                v.kill()
    finally:
        for d in daemons:
            d.stop()
    for res in results:
        assert_exact(res)
    gets = chunk_gets(nginx)
    stored = {p.name for p in (Path(nginx.root) / "chunks").glob("*/*")}
    assert {path.rsplit("/", 1)[1] for path in gets} == stored
    assert max(gets.values()) == 1, [p for p, n in gets.items() if n > 1]


@pytest.mark.parametrize("second", ["pre-paging", "demand faults"])
async def test_a_corrupted_or_torn_cache_file_is_fetched_again_never_served(
        packed: tuple[Path, Path], nginx: NginxServer, tmp_path: Path, snapshot_4k: Path, second: str) -> None:
    """The second restore reads whole chunks (pre-paging: checked against their names) or one
    64 KiB block per fault (demand faults only: checked against the block's tag)."""
    mem = packed[0]
    # No chunks kept in memory: the second restore reads the disk cache.
    cfg = make_config(tmp_path, snapshot_4k, session=PREFETCH, sources={
        "image": image_source(f"{nginx.url}/vm.json", tmp_path, memory_bytes=0)})
    async with running_daemon(cfg, snapshot_4k) as d:
        assert_exact(await d.run_vmm(**_image_vmm(mem)))
        await d.wait_idle()
    if second == "demand faults":
        cfg = make_config(tmp_path, snapshot_4k, session={**PREFETCH, "prefetch": {"enabled": False}}, sources={
            "image": image_source(f"{nginx.url}/vm.json", tmp_path, memory_bytes=0)})
    async with running_daemon(cfg, snapshot_4k) as d:
        before = chunk_gets(nginx)
        files = sorted((tmp_path / "cache" / "chunks").glob("*/*"))
        flipped, torn = files[0], files[1]
        data = bytearray(flipped.read_bytes())
        data[len(data) // 2] ^= 0x40
        flipped.write_bytes(bytes(data))
        torn.write_bytes(torn.read_bytes()[: torn.stat().st_size // 3])
        res = await d.run_vmm(**_image_vmm(mem, wait_complete=30 if second == "pre-paging" else 0))
        assert_exact(res)
        corrupt = shared_cache(str(tmp_path / "cache"), 1 << 30).stats.corrupt  # this process's, both daemons'
    refetched = chunk_gets(nginx) - before
    assert corrupt == 2
    if second == "pre-paging":
        assert sorted(p.rsplit("/", 1)[1] for p in refetched) == sorted([flipped.name, torn.name])
    else:  # a chunk no longer cached may be fetched by more than one fault before it is written back
        assert {p.rsplit("/", 1)[1] for p in refetched} == {flipped.name, torn.name}


def _image_vmm(mem: Path, **kw: Any) -> dict[str, Any]:
    return {"snapshot": str(mem), "source": "image", "region_sizes": [SIZE], "wait_complete": 30, **kw}


# --- a failing server -----------------------------------------------------------------------
async def test_a_server_that_dies_mid_restore_stalls_the_guest_until_it_is_back(
        packed: tuple[Path, Path], nginx: NginxServer, image_daemon: Daemon) -> None:
    mem = packed[0]
    d = image_daemon
    await d.listener.close()  # re-created below with pre-paging slowed, so the kill lands mid-restore
    cfg = make_config(Path(d.socket).parent, d.snapshot, session={**PREFETCH, "prefetch": {"rate": 16}},
                      sources={"default": {"kind": "file", "path": str(d.snapshot)},
                               "image": image_source(f"{nginx.url}/vm.json", Path(d.socket).parent,
                                                     deadline=0.5)})
    async with running_daemon(cfg, d.snapshot) as d2:
        vmm = d2.start_vmm(**_image_vmm(mem, threads=2))
        result = asyncio.create_task(asyncio.to_thread(vmm.result, 90))
        await eventually(lambda: d2.listener.sessions and the_source(d2).stats.requests >= 8,
                         what="the restore under way")
        nginx.kill()
        src = the_source(d2)
        await eventually(lambda: src.unreachable is not None, what="the store reported unreachable")
        await healthy_guest_is_served(d2)
        session = next(s for s in d2.listener.sessions.values() if s.source is src)
        assert not result.done() and session.pages_remaining > 0
        nginx.start()
        res = await result
        assert_exact(res)
        assert src.unreachable is None and src.stats.store_errors > 0


async def test_500s_and_slow_answers_only_slow_the_restore(
        packed: tuple[Path, Path], nginx: NginxServer, image_daemon: Daemon) -> None:
    nginx.start(fail_percent=40, rate="8m")
    healthy = asyncio.create_task(healthy_guest_is_served(image_daemon))
    res = await image_daemon.run_vmm(**_image_vmm(packed[0]))
    assert_exact(res)
    await healthy
    statuses = Counter(status for _, _, status, _ in nginx.requests("/chunks/"))
    assert statuses[500] > 0 and statuses[206] > 0


async def test_a_chunk_corrupted_on_the_server_is_never_installed(
        packed: tuple[Path, Path], store: Path, nginx: NginxServer, image_daemon: Daemon) -> None:
    d = image_daemon
    victims = sorted((store / "chunks").glob("*/*"))[:2]
    good = [v.read_bytes() for v in victims]
    flipped = bytearray(good[0])
    flipped[-10] ^= 1
    victims[0].write_bytes(bytes(flipped))
    victims[1].write_bytes(good[1] * 2)  # longer than the manifest says: refused unread
    vmm = d.start_vmm(**_image_vmm(packed[0]))
    result = asyncio.create_task(asyncio.to_thread(vmm.result, 90))
    await eventually(lambda: d.listener.sessions and the_source(d).stats.checksum_failures >= 2,
                     what="the bad chunk fetched and refused (twice)")
    src = the_source(d)
    await eventually(lambda: src.stats.store_errors >= 4, what="refusals of both damaged objects")
    await healthy_guest_is_served(d)
    assert not result.done()
    for v, data in zip(victims, good, strict=True):
        v.write_bytes(data)
    assert_exact(await result)


async def test_a_manifest_other_than_the_pinned_one_is_refused(
        packed: tuple[Path, Path], nginx: NginxServer, tmp_path: Path, snapshot_4k: Path) -> None:
    cfg = make_config(tmp_path, snapshot_4k, sources={
        "image": image_source(f"{nginx.url}/vm.json", tmp_path, digest="0" * 64)})
    async with running_daemon(cfg, snapshot_4k) as d:
        res = await d.run_vmm(**_image_vmm(packed[0]))
    assert res["stage"] == "handshake" and "digest" in res["error"], res
    assert not chunk_gets(nginx)


# --- S3 ---------------------------------------------------------------------------------------
async def test_a_restore_from_s3_and_again_from_the_cache(
        packed: tuple[Path, Path], tmp_path: Path, snapshot_4k: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mem = packed[0]
    server = MotoServer(tmp_path / "moto").start()
    try:
        for k, v in server.env().items():
            monkeypatch.setenv(k, v)
        server.create_bucket("uffdd-images")
        res: PackResult = await pack(str(mem), "s3://uffdd-images/fleet", PackOptions(name="vm"))
        assert res.url == "s3://uffdd-images/fleet/vm.json"
        cfg = make_config(tmp_path, snapshot_4k, session=PREFETCH, sources={
            "image": image_source(res.url, tmp_path, memory_bytes=0, digest=res.digest)})
        async with running_daemon(cfg, snapshot_4k) as d:
            assert_exact(await d.run_vmm(**_image_vmm(mem)))
            await d.wait_idle()
            first = [r for r in server.requests("/chunks/") if r[0] == "GET"]
            assert len(first) == res.written
            assert_exact(await d.run_vmm(**_image_vmm(mem)))
        assert [r for r in server.requests("/chunks/") if r[0] == "GET"] == first
    finally:
        server.kill()


def test_the_demo_restores_from_a_packed_image_over_http() -> None:
    out = assert_demo_ok(uffdd_cli("demo", "--image", "--size", "64M", timeout=120))
    assert "image chunks" in out


async def test_a_recorded_working_set_of_an_image_is_replayed_from_the_cache(
        packed: tuple[Path, Path], nginx: NginxServer, tmp_path: Path, snapshot_4k: Path) -> None:
    mem = packed[0]
    source = image_source(f"{nginx.url}/vm.json", tmp_path)
    off = {"fault_around": 0, "prefetch": {"enabled": False}}
    cfg = make_config(tmp_path, snapshot_4k, session={**off, "record": True, "replay": False},
                      sources={"image": source})
    async with running_daemon(cfg, snapshot_4k) as d:
        assert_exact(await d.run_vmm(**_image_vmm(mem, touch_fraction=0.05, seed=9, wait_complete=0,
                                                  verify_only_touched=True)))
        await d.wait_idle()
    records = list((tmp_path / "cache" / "worksets").glob("*.ws"))
    assert len(records) == 1
    cfg = make_config(tmp_path, snapshot_4k, session={**off, "replay": True}, sources={"image": source})
    async with running_daemon(cfg, snapshot_4k) as d:
        assert_exact(await d.run_vmm(**_image_vmm(mem, touch_fraction=0.05, seed=9, wait_complete=0,
                                                  verify_only_touched=True)))
        await d.wait_idle()
        assert d.listener.ended_totals.pages_replay > 0


@pytest.mark.parametrize("memory", ["hugetlbfs", "anonymous"])
async def test_a_guest_on_huge_pages_or_private_memory_restores_from_an_image(
        memory: str, nginx: NginxServer, store: Path, tmp_path: Path, snapshot_4k: Path,
        hugepages: Any) -> None:
    """A 2 MiB page spans 8 chunks (one fill gathers them); private memory is filled by
    UFFDIO_COPY from the daemon's own buffer."""
    mem = tmp_path / "huge.mem"
    page_size = 2 * MIB if memory == "hugetlbfs" else 4096
    if memory == "hugetlbfs":
        hugepages(SIZE // page_size)
    make_guest_image(mem, SIZE, seed=23, page_size=page_size)
    await pack(str(mem), str(store), PackOptions(name="other", page_size=page_size))
    cfg = make_config(tmp_path, snapshot_4k, session=PREFETCH, sources={
        "image": image_source(f"{nginx.url}/other.json", tmp_path)})
    async with running_daemon(cfg, snapshot_4k) as d:
        res = await d.run_vmm(**_image_vmm(mem, page_size=page_size, anonymous=memory == "anonymous"))
    assert_exact(res)
    assert chunk_gets(nginx)
