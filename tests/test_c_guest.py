"""A VMM written independently in C, from the documented handshake (docs/handshake.md) alone, against the daemon."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import HUGE, make_config, running_daemon
from uffdd.testing import make_snapshot

BENCH = Path(__file__).resolve().parent.parent / "scripts" / "bench"
MIB = 1 << 20


@pytest.fixture(scope="module")
def c_guest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed: the C guest cannot be built")
    out = tmp_path_factory.mktemp("cguest") / "guest"
    subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-pthread", "-o", str(out),
                    str(BENCH / "guest.c")], check=True, timeout=120)
    return out


@pytest.fixture(scope="module")
def snapshot_64m(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("snap64") / "guest.mem"
    make_snapshot(path, 64 * MIB, seed=21, page_size=HUGE)
    return path


async def _run_c_guest(guest: Path, sock: str, snap: Path, size: int, threads: int, page_size: int,
                       bare: bool) -> dict[str, Any]:
    cmd = [str(guest), "--socket", sock, "--snapshot", str(snap), "--size", str(size),
           "--threads", str(threads), "--page-size", str(page_size)] + (["--bare"] if bare else [])
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 90)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    res: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return res


@pytest.mark.parametrize(("threads", "bare"), [(1, True), (4, False), (8, True)])
async def test_c_vmm_gets_every_page_of_a_64m_4k_guest(
        c_guest: Path, snapshot_64m: Path, tmp_path: Path, threads: int, bare: bool) -> None:
    async with running_daemon(make_config(tmp_path, snapshot_64m), snapshot_64m) as d:
        res = await _run_c_guest(c_guest, d.socket, snapshot_64m, 64 * MIB, threads, 4096, bare)
    assert res["wrong_pages"] == 0
    assert res["pages"] == 64 * MIB // 4096


@pytest.mark.parametrize("bare", [True, False])
async def test_c_vmm_gets_every_page_of_a_2m_hugetlbfs_guest(
        c_guest: Path, snapshot_64m: Path, tmp_path: Path, hugepages: Any, bare: bool) -> None:
    hugepages(32)
    async with running_daemon(make_config(tmp_path, snapshot_64m), snapshot_64m) as d:
        res = await _run_c_guest(c_guest, d.socket, snapshot_64m, 64 * MIB, 4, HUGE, bare)
    assert res["wrong_pages"] == 0
    assert res["pages"] == 32
