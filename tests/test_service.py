"""`uffdd run` as a real process: logs, signals, sd_notify, metrics."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.conftest import DaemonProcess
from uffdd.testing import VmmProcess, VmmSpec

MIB = 1 << 20


def _vmm(d: DaemonProcess, snapshot: Path, **kw: Any) -> dict[str, Any]:
    spec = VmmSpec(socket=d.socket, snapshot=str(snapshot), region_sizes=[4 * MIB], threads=2, vm_id="svc", **kw)
    return VmmProcess(spec).result(90)


def test_daemon_built_without_the_c_fast_path_serves_every_page_in_python(
        daemon_process: Callable[..., DaemonProcess], snapshot_4k: Path, tmp_path: Path) -> None:
    """What a host without a C compiler gets: `uffdd check` says so, and faults are served."""
    blocker = tmp_path / "no-fastpath"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\n"
        "class _NoFastPath:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'uffdd.core._fastpath':\n"
        "            raise ImportError('not built')\n"
        "sys.meta_path.insert(0, _NoFastPath())\n")
    env = {"PYTHONPATH": str(blocker)}
    check = _uffdd("check", "--json", env=env)
    row = next(c for c in json.loads(check.stdout)["checks"] if c["name"] == "C fast path")
    assert row["ok"] is False and "not built" in row["detail"]
    assert check.returncode == 0  # optional: the daemon works without it
    d = daemon_process(extra_env=env, session={"fault_around": 0, "prefetch": {"enabled": False}})
    res = _vmm(d, snapshot_4k)
    assert res["wrong_pages"] == 0 and res["returncode"] == 0
    assert d.stop(signal.SIGTERM) == 0
    start = next(e for e in d.log_lines() if e["event"] == "session_start")
    assert start["fault_path"] == "python"
    end = next(e for e in d.log_lines() if e["event"] == "session_end")
    assert end["pages_filled"] == end["pages_total"] == 1024 and end["fills_inline"] > 0


def test_daemon_process_serves_a_guest_logs_one_line_per_session_and_exits_0_on_sigterm(
        daemon_process: Callable[..., DaemonProcess], snapshot_4k: Path) -> None:
    d = daemon_process()
    res = _vmm(d, snapshot_4k)
    assert res["wrong_pages"] == 0 and res["returncode"] == 0
    assert d.stop(signal.SIGTERM) == 0
    events = [e["event"] for e in d.log_lines()]
    assert events.count("session_start") == 1
    assert events.count("session_complete") == 1
    assert events.count("session_end") == 1
    assert len(events) <= 7, events  # no line per fault at the default level
    end = next(e for e in d.log_lines() if e["event"] == "session_end")
    assert end["pages_filled"] == end["pages_total"] == 1024
    assert end["pages_demand"] + end["pages_fault_around"] + end["pages_prefetch"] == 1024
    assert not Path(d.socket).exists()  # the socket file is removed on a clean stop


def test_bad_handshake_is_logged_and_the_daemon_keeps_serving(
        daemon_process: Callable[..., DaemonProcess], snapshot_4k: Path) -> None:
    d = daemon_process()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(d.socket)
        s.sendall(b"not json at all")
        assert b"not valid JSON" in s.makefile("rb").readline()
    res = _vmm(d, snapshot_4k)
    assert res["wrong_pages"] == 0
    d.stop()
    refused = [e for e in d.log_lines() if e["event"] == "handshake_refused"]
    assert len(refused) == 1 and "not valid JSON" in refused[0]["error"]


def test_ready_and_stopping_are_sent_to_the_notify_socket(
        daemon_process: Callable[..., DaemonProcess], tmp_path: Path) -> None:
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as ns:
        ns.bind(path)
        ns.settimeout(15)
        d = daemon_process(extra_env={"NOTIFY_SOCKET": path})
        msgs = [ns.recv(4096).decode().splitlines()]
        while "READY=1" not in msgs[-1]:
            msgs.append(ns.recv(4096).decode().splitlines())
        assert ["FDSTORE=1", "FDNAME=listen", "FDPOLL=0"] in msgs  # the listening socket, before READY
        d.proc.send_signal(signal.SIGTERM)
        while "STOPPING=1" not in (last := ns.recv(4096).decode().splitlines()):
            assert "READY=1" not in last
        assert d.proc.wait(10) == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_metrics_endpoint_counts_faults_and_pages_of_ended_sessions(
        daemon_process: Callable[..., DaemonProcess], snapshot_4k: Path) -> None:
    port = _free_port()
    d = daemon_process(metrics={"listen": f"127.0.0.1:{port}"})
    _vmm(d, snapshot_4k)
    text = ""
    for _ in range(100):
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        if "uffdd_pages_filled_total 1024.0" in text:
            break
        asyncio.run(asyncio.sleep(0.05))
    assert "uffdd_pages_filled_total 1024.0" in text
    assert "uffdd_sessions_total 1.0" in text
    assert "uffdd_fault_service_seconds_bucket" in text
    d.stop()


def test_sigterm_waits_for_a_live_session_and_a_second_one_ends_it(
        daemon_process: Callable[..., DaemonProcess], snapshot_4k: Path) -> None:
    d = daemon_process()
    spec = VmmSpec(socket=d.socket, snapshot=str(snapshot_4k), region_sizes=[4 * MIB], threads=1, vm_id="svc",
                   start_delay=30)
    vmm = VmmProcess(spec)
    try:
        for _ in range(200):
            if any(e["event"] == "session_start" for e in d.log_lines()):
                break
            asyncio.run(asyncio.sleep(0.02))
        d.proc.send_signal(signal.SIGTERM)
        asyncio.run(asyncio.sleep(0.5))
        assert d.proc.poll() is None  # a guest is never cut off by the first signal
        assert any(e["event"] == "waiting_for_sessions" for e in d.log_lines())
        assert d.stop(signal.SIGTERM) == 0
    finally:
        vmm.kill()


def _uffdd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "uffdd", *args], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "COLUMNS": "200", **(env or {})})


def test_status_prints_the_live_sessions_from_the_control_socket(
        daemon_process: Callable[..., DaemonProcess], snapshot_4k: Path, tmp_path: Path) -> None:
    d = daemon_process(session={"fault_around": 0, "prefetch": {"enabled": False}})
    spec = VmmSpec(socket=d.socket, snapshot=str(snapshot_4k), region_sizes=[4 * MIB], threads=1, vm_id="svc-live",
                   start_delay=30)
    vmm = VmmProcess(spec)
    try:
        for _ in range(300):
            if any(e["event"] == "session_start" for e in d.log_lines()):
                break
            time.sleep(0.02)
        out = _uffdd("status", "-c", str(tmp_path / "uffdd.yaml"))
        assert out.returncode == 0, out.stderr
        assert "1 live session(s)" in out.stdout
        assert "svc-live" in out.stdout and "0/1024" in out.stdout
        doc = json.loads(_uffdd("status", "--socket", str(tmp_path / "d.ctl"), "--json").stdout)
        assert [(s["vm_id"], s["pages_remaining"], s["kind"]) for s in doc["sessions"]] == [("svc-live", 1024, "file")]
        assert _uffdd("status", "--socket", str(tmp_path / "d.ctl"), "--quiet").returncode == 0
    finally:
        vmm.kill()
    d.stop(signal.SIGTERM)


def test_status_without_a_daemon_exits_1_and_names_the_socket(tmp_path: Path) -> None:
    out = _uffdd("status", "--socket", str(tmp_path / "none.ctl"))
    assert out.returncode == 1
    assert f"no answer from {tmp_path / 'none.ctl'}" in out.stderr


def test_metrics_break_pages_down_by_source_and_path_and_count_errors_by_kind(
        daemon_process: Callable[..., DaemonProcess], snapshot_4k: Path) -> None:
    port = _free_port()
    d = daemon_process(metrics={"listen": f"127.0.0.1:{port}"}, session={"fault_around": 16384,
                                                                         "prefetch": {"enabled": False}})
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(d.socket)
        s.sendall(b"[]")
        s.makefile("rb").readline()
    _vmm(d, snapshot_4k)
    text = ""
    for _ in range(100):
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        if "uffdd_pages_filled_total 1024.0" in text:
            break
        time.sleep(0.05)
    from prometheus_client.parser import text_string_to_metric_families

    series = {(smp.name, frozenset(smp.labels.items())): smp.value
              for fam in text_string_to_metric_families(text) for smp in fam.samples}

    def get(name: str, **labels: str) -> float:
        base = {"source": "default", "kind": "file"} if name != "uffdd_errors_total" else {}
        return series[(name, frozenset({**base, **labels}.items()))]

    demand = get("uffdd_source_pages_total", path="demand")
    around = get("uffdd_source_pages_total", path="fault_around")
    assert demand > 0 and around > 0 and demand + around == 1024
    assert get("uffdd_source_bytes_total", path="demand") == demand * 4096
    assert get("uffdd_errors_total", kind="handshake") == 1.0
    assert get("uffdd_fault_service_seconds_count", outcome="installed") == demand
    assert get("uffdd_fault_outcomes_total", outcome="inline") == demand
    assert get("uffdd_pages_inflight") == 0
    d.stop()


def test_control_socket_defaults_next_to_listen_and_a_bad_shutdown_mode_names_the_key() -> None:
    import pytest

    from uffdd.config import parse_config
    from uffdd.errors import ConfigError

    assert parse_config({"listen": "/run/x/vmm.sock"}).control_path == "/run/x/vmm.ctl"
    assert parse_config({"control": {"listen": "/tmp/c.sock"}}).control_path == "/tmp/c.sock"
    with pytest.raises(ConfigError, match=r"shutdown\.on_sigterm"):
        parse_config({"shutdown": {"on_sigterm": "later"}})


def test_peer_recovery_counters_are_exported_per_session() -> None:
    from types import SimpleNamespace

    from uffdd.peer.client import PeerStats
    from uffdd.service.metrics import _peer_metrics

    stats = PeerStats(reconnects=2, requests_resent=17, checksum_failures=1)
    peer = SimpleNamespace(id="s1", vm_id="vm", source=SimpleNamespace(stats=stats, unreachable=None))
    filed = SimpleNamespace(id="s2", vm_id="vm2", source=SimpleNamespace())  # no peer counters
    families = {f.name: f for f in _peer_metrics([peer, filed])}  # type: ignore[list-item]
    values = {name: [(s.labels, s.value) for s in f.samples if s.name.endswith("_total") or s.name == name]
              for name, f in families.items()}
    assert values["uffdd_peer_reconnects"] == [({"session": "s1", "vm_id": "vm"}, 2.0)]
    assert values["uffdd_peer_requests_resent"] == [({"session": "s1", "vm_id": "vm"}, 17.0)]
    assert values["uffdd_peer_checksum_failures"] == [({"session": "s1", "vm_id": "vm"}, 1.0)]
    assert values["uffdd_peer_unreachable"] == [({"session": "s1", "vm_id": "vm"}, 0.0)]
