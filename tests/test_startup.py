"""Safe start-up: a second `uffdd run` never takes the sockets of a live one, and every bind that
can fail (VMM socket, control socket, metrics port) is tried before a stale file is replaced."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import DaemonProcess
from uffdd.service.control import query
from uffdd.testing import VmmProcess, VmmSpec
from uffdd.testing.waiting import wait_until

MIB = 1 << 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(cfg_path: Path) -> subprocess.CompletedProcess[str]:
    """`uffdd run` to its end (it must not start, so it ends by itself)."""
    return subprocess.run([sys.executable, "-m", "uffdd", "run", "-c", str(cfg_path)],
                          capture_output=True, text=True, timeout=30)


def _inodes(*paths: str) -> list[int]:
    return [os.lstat(p).st_ino for p in paths]


def _answers(ctl: str) -> bool:
    try:
        return bool(query(ctl, "ping")["ok"])
    except OSError:
        return False


def _guest(d: DaemonProcess, snapshot: Path, **kw: Any) -> VmmProcess:
    return VmmProcess(VmmSpec(socket=d.socket, snapshot=str(snapshot), region_sizes=[8 * MIB], threads=2,
                              vm_id="healthy", **kw))


def _served(d: DaemonProcess, snapshot: Path) -> dict[str, Any]:
    """A guest restored by ``d`` to the end (killed if it does not finish)."""
    guest = _guest(d, snapshot)
    try:
        return guest.result(60)
    finally:
        guest.kill()


@pytest.mark.timeout(90)
def test_a_second_daemon_with_the_same_config_refuses_to_start_and_the_first_serves_on(
        daemon_process: Callable[..., DaemonProcess], snapshot_4k: Path, tmp_path: Path) -> None:
    port = _free_port()
    d = daemon_process(metrics={"listen": f"127.0.0.1:{port}"})
    ctl = str(Path(d.socket).with_suffix(".ctl"))
    before = _inodes(d.socket, ctl)
    guest = _guest(d, snapshot_4k, start_delay=1.0)
    try:
        second = _run(tmp_path / "uffdd.yaml")
        assert second.returncode == 1, second.stderr
        assert f"listen: {d.socket} is in use: pid {d.proc.pid} answers on it" in second.stderr
        res = guest.result(60)
    finally:
        guest.kill()
    assert res["wrong_pages"] == 0 and res["returncode"] == 0
    assert _inodes(d.socket, ctl) == before
    assert query(ctl, "ping")["pid"] == d.proc.pid
    assert sorted(os.listdir(tmp_path)) == sorted(["uffdd.yaml", "daemon.log", "d.sock", "d.ctl"])
    assert d.stop(signal.SIGTERM) == 0


@pytest.mark.timeout(90)
def test_a_live_control_socket_stops_start_up_before_the_vmm_socket_is_bound(
        daemon_process: Callable[..., DaemonProcess], snapshot_4k: Path, tmp_path: Path) -> None:
    d = daemon_process()
    ctl = str(Path(d.socket).with_suffix(".ctl"))
    other = tmp_path / "other"
    cfg = {"listen": str(other / "d.sock"), "control": {"listen": ctl}, "workers": 1,
           "sources": {"default": {"kind": "file", "path": str(snapshot_4k)}}}
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(cfg))
    second = _run(tmp_path / "other.yaml")
    assert second.returncode == 1, second.stderr
    assert f"control.listen: {ctl} is in use" in second.stderr
    assert os.listdir(other) == []  # its own VMM socket was never put in place
    res = _served(d, snapshot_4k)
    assert res["wrong_pages"] == 0 and query(ctl, "ping")["pid"] == d.proc.pid
    d.stop()


@pytest.mark.timeout(90)
def test_a_squatted_metrics_port_stops_start_up_before_any_stale_socket_is_replaced(
        daemon_process: Callable[..., DaemonProcess], snapshot_4k: Path, tmp_path: Path) -> None:
    port = _free_port()
    dead = daemon_process(metrics={"listen": f"127.0.0.1:{port}"})
    dead.stop(signal.SIGKILL)  # leaves both socket files behind, stale
    ctl = str(Path(dead.socket).with_suffix(".ctl"))
    before = _inodes(dead.socket, ctl)
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", port))
        squatter.listen(1)
        second = _run(tmp_path / "uffdd.yaml")
    assert second.returncode == 1, second.stderr
    assert f"metrics.listen: cannot bind 127.0.0.1:{port}: Address already in use" in second.stderr
    assert _inodes(dead.socket, ctl) == before  # not replaced: the failed start changed nothing
    assert sorted(os.listdir(tmp_path)) == sorted(["uffdd.yaml", "daemon.log", "d.sock", "d.ctl"])
    d = daemon_process(metrics={"listen": f"127.0.0.1:{port}"})  # port free again: the stale files go
    wait_until(lambda: _inodes(d.socket, ctl) != before and _answers(ctl), what="the new daemon's sockets in place")
    res = _served(d, snapshot_4k)
    assert res["wrong_pages"] == 0 and query(ctl, "ping")["pid"] == d.proc.pid
    assert _inodes(d.socket, ctl) != before
    d.stop()


def _stale_socket(path: str) -> None:
    """A socket file nobody listens on, as a daemon killed with SIGKILL leaves behind."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()


@pytest.mark.timeout(90)
def test_with_workers_a_second_daemon_refuses_to_start_and_the_first_serves_on(
        daemon_process: Callable[..., DaemonProcess], snapshot_4k: Path, tmp_path: Path) -> None:
    d = daemon_process(workers=2)
    ctl = str(Path(d.socket).with_suffix(".ctl"))
    wait_until(lambda: _answers(ctl) and all(_answers(str(tmp_path / f"d.{i}.ctl")) for i in range(2)),
               what="the parent's and both workers' control sockets")
    before = _inodes(d.socket, ctl)
    guest = _guest(d, snapshot_4k, start_delay=1.0)
    try:
        second = _run(tmp_path / "uffdd.yaml")
        assert second.returncode == 1, second.stderr
        assert "is in use" in second.stderr and "refusing to start" in second.stderr
        res = guest.result(60)
    finally:
        guest.kill()
    assert res["wrong_pages"] == 0 and res["returncode"] == 0
    assert _inodes(d.socket, ctl) == before and query(ctl, "ping")["pid"] == d.proc.pid
    assert d.stop() == 0
    # The workers know the socket they inherit as listen, though it was bound under another name.
    assert not [e for e in d.log_lines() if e["event"] == "socket_activated"]


@pytest.mark.timeout(60)
def test_with_workers_a_taken_worker_metrics_port_stops_start_up_before_any_stale_socket_is_replaced(
        snapshot_4k: Path, tmp_path: Path) -> None:
    port = _free_port()
    sock, ctl = str(tmp_path / "d.sock"), str(tmp_path / "d.ctl")
    _stale_socket(sock)
    _stale_socket(ctl)
    before = _inodes(sock, ctl)
    cfg = {"listen": sock, "workers": 2, "metrics": {"listen": f"127.0.0.1:{port}"},
           "sources": {"default": {"kind": "file", "path": str(snapshot_4k)}}}
    (tmp_path / "uffdd.yaml").write_text(yaml.safe_dump(cfg))
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        with contextlib.suppress(OSError):  # already taken by someone else: just as good
            squatter.bind(("127.0.0.1", port + 1))
            squatter.listen(1)
        second = _run(tmp_path / "uffdd.yaml")
    assert second.returncode == 1, second.stderr
    assert f"metrics.listen (worker 1): cannot bind 127.0.0.1:{port + 1}: Address already in use" in second.stderr
    assert _inodes(sock, ctl) == before
    assert sorted(os.listdir(tmp_path)) == ["d.ctl", "d.sock", "uffdd.yaml"]
