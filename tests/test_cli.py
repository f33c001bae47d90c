"""The command line, run as a user runs it: `python -m uffdd ...` in a subprocess."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import uffdd


def uffdd_cli(*args: str, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    # A wide console, so rich never folds a table cell the assertions look for.
    return subprocess.run([sys.executable, "-m", "uffdd", *args], capture_output=True, text=True,
                          timeout=timeout, check=False, env={**os.environ, "COLUMNS": "200", **(env or {})})


def pages_wrong_line(output: str) -> str:
    lines = [line for line in output.splitlines() if "pages wrong" in line]
    assert len(lines) == 1, output
    return lines[0]


def assert_demo_ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    line = pages_wrong_line(done.stdout)
    assert re.search(r"pages wrong\W+0\W*$", line), line
    return done.stdout


def test_version_prints_the_package_version() -> None:
    done = uffdd_cli("--version")
    assert done.returncode == 0
    assert done.stdout.strip() == f"uffdd {uffdd.__version__}"


def test_no_command_is_a_usage_error() -> None:
    done = uffdd_cli()
    assert done.returncode == 2
    assert "usage: uffdd" in done.stderr


def test_check_json_reports_usable_with_each_memory_type_and_event() -> None:
    done = uffdd_cli("check", "--json")
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    assert report["usable"] is True
    checks = {c["name"]: c for c in report["checks"]}
    shmem = checks["shmem 4 KiB (memfd)"]
    assert shmem["ok"] is True and shmem["required"] is True
    assert "served with CONTINUE" in shmem["detail"]
    assert "served with COPY" in checks["anonymous 4 KiB"]["detail"]
    assert "ZEROPAGE" in checks["anonymous 4 KiB"]["detail"]
    assert checks["balloon / MADV_DONTNEED (REMOVE events)"]["ok"] is True
    assert checks["poisoned pages (UFFDIO_POISON)"]["ok"] is True
    assert checks["feature MINOR_SHMEM"]["ok"] is True
    assert checks["C fast path"]["ok"] is True and checks["C fast path"]["required"] is False
    assert checks["background copies in C"]["ok"] is True
    assert all(c["ok"] for c in report["checks"] if c["required"])


def _peer_checks(env: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    done = uffdd_cli("check", "--json", env=env)
    assert done.returncode == 0, done.stderr  # optional: uffdd works without them
    return {c["name"]: c for c in json.loads(done.stdout)["checks"] if c["name"].startswith("peer ")}


def test_check_reports_the_peer_extensions_and_what_stands_in_when_they_are_not_built(tmp_path: Path) -> None:
    built = _peer_checks()
    wire, link = built["peer checksums and tags in C"], built["peer urgent link in C"]
    assert wire["ok"] is True and wire["required"] is False and wire["detail"].startswith("built (crc32c with ")
    assert link["ok"] is True and link["required"] is False and "run in C at both ends" in link["detail"]
    # What a host without a C compiler gets: neither module can be imported.
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\n"
        "class _NotBuilt:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name in ('uffdd.peer._wire', 'uffdd.peer._native'):\n"
        "            raise ImportError('not built')\n"
        "sys.meta_path.insert(0, _NotBuilt())\n")
    missing = _peer_checks({"PYTHONPATH": str(tmp_path)})
    wire, link = missing["peer checksums and tags in C"], missing["peer urgent link in C"]
    assert wire["ok"] is False and "the crc32c and cryptography packages compute" in wire["detail"]
    assert link["ok"] is False and link["detail"].startswith("not built")
    assert "run in Python at both ends" in link["detail"]


def test_check_without_json_prints_a_table_and_the_verdict() -> None:
    done = uffdd_cli("check")
    assert done.returncode == 0, done.stderr
    assert "shmem 4 KiB (memfd)" in done.stdout
    assert "uffdd can serve guests on this host" in done.stdout


def test_demo_restores_a_small_guest_with_no_wrong_page() -> None:
    out = assert_demo_ok(uffdd_cli("demo", "--size", "16M", "--threads", "2", timeout=120))
    assert "16 MiB" in out
    assert "4,096" in out  # pages checked


def test_demo_restores_a_small_guest_on_2m_huge_pages(hugepages: Callable[[int], None]) -> None:
    hugepages(16)
    out = assert_demo_ok(uffdd_cli("demo", "--size", "16M", "--page-size", "2M", timeout=120))
    assert "hugetlbfs" in out
    assert "2048 KiB pages" in out


@pytest.mark.parametrize("size", ["lots", "M", ""])
def test_demo_refuses_a_size_that_is_not_a_size(size: str) -> None:
    done = uffdd_cli("demo", "--size", size)
    assert done.returncode == 2
    assert "not a size" in done.stderr
