"""The daemon as a systemd service, observed on a real notify socket (tests/supervisor.py).

READY/STATUS/STOPPING, the watchdog (pings from the event loop; a stalled loop is restarted),
RELOADING on SIGHUP, socket activation, and the supervisor's own fidelity to sd_notify(3).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import DaemonProcess
from tests.sandbox import unit_sandbox
from tests.supervisor import Supervisor
from tests.test_restart import assert_guest_whole, log_events, start_guest, supervised
from uffdd.service import systemd
from uffdd.testing import VmmProcess, VmmSpec
from uffdd.testing.waiting import wait_until

MIB = 1 << 20


@pytest.mark.timeout(60)
def test_ready_status_watchdog_and_stopping_reach_the_notify_socket(tmp_path: Path, snapshot_4k: Path) -> None:
    with supervised(tmp_path, snapshot_4k, watchdog_sec=1.0) as sup:
        ready = sup.wait_ready(run=1)
        assert ready.fields["STATUS"].startswith("0 session(s)")
        assert ready.fields["MAINPID"] == str(sup.main_pid)
        spec = VmmSpec(socket=str(tmp_path / "uffdd.sock"), snapshot=str(snapshot_4k), region_sizes=[6 * MIB, 2 * MIB],
                       threads=2, vm_id="st", start_delay=0.5, timeout=50)
        res = VmmProcess(spec).result(45)
        assert_guest_whole(res)
        assert sup.wait_for(lambda: "1 served" in sup.status, 10), sup.status
        statuses = [m.fields["STATUS"] for m in sup.messages if "STATUS" in m.fields]
        assert any(s.startswith("1 session(s)") for s in statuses), statuses  # live count while serving
        def pings() -> list[float]:
            return [m.at for m in sup.messages if m.fields.get("WATCHDOG") == "1"]

        assert sup.wait_for(lambda: len(pings()) >= 4, 10), pings()
        gaps = [b - a for a, b in itertools.pairwise(pings())]
        assert all(0.3 < g < 0.8 for g in gaps), gaps  # every WatchdogSec/2 = 0.5 s
        ex = sup.stop()
        assert ex.returncode == 0 and ex.reason == "exit"
        stopping = sup.wait_message("STOPPING", "1")
        assert stopping.run == 1
        assert sup.exits == [ex]  # a clean stop: no restart, no watchdog action
        assert not sup.rejected, sup.rejected


@pytest.mark.timeout(60)
def test_a_stalled_event_loop_stops_the_pings_and_the_watchdog_restarts_the_daemon(
        tmp_path: Path, snapshot_4k: Path) -> None:
    with supervised(tmp_path, snapshot_4k, watchdog_sec=0.6, timeout_abort_sec=0.3) as sup:
        sup.wait_ready(run=1)
        sup.wait_message("WATCHDOG", "1", run=1)
        sup.kill(signal.SIGSTOP)  # the loop stops: no more pings
        sup.wait_ready(run=2, timeout=15)
        assert sup.exits[0].reason == "watchdog"
        res = start_guest(tmp_path, snapshot_4k, seed=2).result(45)
        assert_guest_whole(res)


@pytest.mark.timeout(60)
def test_sighup_reloads_the_config_keeping_live_sessions(tmp_path: Path, snapshot_4k: Path) -> None:
    with supervised(tmp_path, snapshot_4k) as sup:
        sup.wait_ready(run=1)
        spec = VmmSpec(socket=str(tmp_path / "uffdd.sock"), snapshot=str(snapshot_4k), region_sizes=[8 * MIB],
                       threads=2, vm_id="keep", start_delay=1.0, timeout=50)
        live = VmmProcess(spec)
        try:
            assert sup.wait_for(lambda: "s1.desc" in sup.stored_names(), 10)
            cfg = tmp_path / "uffdd.yaml"
            cfg.write_text(cfg.read_text().replace("sources:\n", f"sources:\n  extra:\n    kind: file\n"
                                                               f"    path: {snapshot_4k}\n"))
            before = systemd.monotonic_usec()
            sup.reload()
            reloading = sup.wait_message("RELOADING", "1")
            assert before <= int(reloading.fields["MONOTONIC_USEC"]) <= systemd.monotonic_usec()
            ready_again = [m for m in sup.messages if m.fields.get("READY") == "1"]
            assert sup.wait_for(lambda: len([m for m in sup.messages if m.fields.get("READY") == "1"]) == 2, 10)
            ready_again = [m for m in sup.messages if m.fields.get("READY") == "1"]
            assert ready_again[1].at >= reloading.at
            # The new source serves new guests; the guest that was live keeps its session.
            new = VmmProcess(VmmSpec(socket=str(tmp_path / "uffdd.sock"), snapshot=str(snapshot_4k),
                                     region_sizes=[4 * MIB], threads=2, vm_id="new", source="extra", timeout=50))
            try:
                res_new = new.result(45)
            finally:
                new.kill()
            res_live = live.result(45)
        finally:
            live.kill()
        assert res_new["wrong_pages"] == 0 and res_new["returncode"] == 0, res_new
        assert res_live["wrong_pages"] == 0 and res_live["returncode"] == 0, res_live
        assert len(sup.exits) == 0
        assert "reloaded" in [e.get("event") for e in log_events(tmp_path)]


@pytest.mark.timeout(60)
def test_a_broken_config_on_reload_keeps_the_old_one_and_says_so(tmp_path: Path, snapshot_4k: Path) -> None:
    with supervised(tmp_path, snapshot_4k) as sup:
        sup.wait_ready(run=1)
        (tmp_path / "uffdd.yaml").write_text("listen: [not, a, path]\n")
        sup.reload()
        sup.wait_message("RELOADING", "1")
        assert sup.wait_for(lambda: "reload failed" in sup.status, 10), sup.status
        assert sup.state == "active"
        res = start_guest(tmp_path, snapshot_4k, seed=3).result(45)
        assert_guest_whole(res)


@pytest.mark.timeout(60)
def test_socket_activation_accepts_on_the_passed_socket_instead_of_binding(
        tmp_path: Path, snapshot_4k: Path) -> None:
    activated = tmp_path / "activated.sock"
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(str(activated))
    lsock.listen(16)
    try:
        with supervised(tmp_path, snapshot_4k, sockets=[(lsock, "uffdd.socket")]) as sup:
            sup.wait_ready(run=1)
            assert not (tmp_path / "uffdd.sock").exists()  # the configured path was not bound
            spec = VmmSpec(socket=str(activated), snapshot=str(snapshot_4k), region_sizes=[4 * MIB], threads=2,
                           vm_id="act", timeout=50)
            res = VmmProcess(spec).result(45)
            assert res["wrong_pages"] == 0 and res["returncode"] == 0, res
            assert sup.stop().returncode == 0
        assert activated.exists()  # the socket unit's file is not ours to remove
    finally:
        lsock.close()


def test_watchdog_pid_of_another_process_means_no_pings(
        daemon_process: Callable[..., DaemonProcess], tmp_path: Path) -> None:
    """A daemon that pings sends its first WATCHDOG=1 at once, before READY=1 (see the test
    above): so no ping from start to STOPPING=1, and no "watchdog" decision in the log, means
    it never pinged."""
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as ns:
        ns.bind(path)
        ns.settimeout(15)
        d = daemon_process(extra_env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"})
        got = [ns.recv(4096).decode().splitlines()]
        while "READY=1" not in got[-1]:
            got.append(ns.recv(4096).decode().splitlines())
        d.proc.send_signal(signal.SIGTERM)
        while "STOPPING=1" not in got[-1]:
            got.append(ns.recv(4096).decode().splitlines())
        assert not any("WATCHDOG=1" in lines for lines in got), got
        assert d.proc.wait(10) == 0
        assert not any(e["event"] == "watchdog" for e in d.log_lines())


def test_listen_fds_for_another_pid_are_ignored_and_the_daemon_binds_itself(
        daemon_process: Callable[..., DaemonProcess], snapshot_4k: Path) -> None:
    d = daemon_process(extra_env={"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "uffdd.socket"})
    res = VmmProcess(VmmSpec(socket=d.socket, snapshot=str(snapshot_4k), region_sizes=[4 * MIB], threads=2,
                             vm_id="own", timeout=50)).result(45)
    assert res["wrong_pages"] == 0
    assert d.stop() == 0


# --- the supervisor speaks the protocol as systemd does ---------------------------------------

def _notify_from_child(sup: Supervisor, *lines: str, fd_path: str | None = None) -> None:
    """sd_notify from a separate process (not the service's main pid)."""
    code = ("import os, sys; from uffdd.service import systemd; "
            "fds = (os.open(sys.argv[2], os.O_RDONLY),) if sys.argv[2] else (); "
            "sys.exit(0 if systemd.notify(*sys.argv[1].split('|'), fds=fds) else 1)")
    subprocess.run([sys.executable, "-c", code, "|".join(lines), fd_path or ""], check=True, timeout=30,
                   env={**os.environ, "NOTIFY_SOCKET": sup.notify_path})


@pytest.mark.timeout(60)
def test_supervisor_refuses_notifications_from_other_pids_with_notify_access_main(tmp_path: Path) -> None:
    with Supervisor([sys.executable, "-c", "import time; time.sleep(60)"], notify_access="main") as sup:
        _notify_from_child(sup, "STATUS=from elsewhere", "FDSTORE=1", "FDNAME=x", fd_path=str(tmp_path))
        assert sup.wait_for(lambda: bool(sup.rejected), 10)
        assert sup.status == "" and sup.stored_names() == []
    with Supervisor([sys.executable, "-c", "import time; time.sleep(60)"], notify_access="all") as sup:
        _notify_from_child(sup, "STATUS=hello", "FDSTORE=1", "FDNAME=dir", fd_path=str(tmp_path))
        _notify_from_child(sup, "FDSTORE=1", "FDNAME=bad:name", fd_path=str(tmp_path))
        assert sup.wait_for(lambda: sup.status == "hello" and len(sup.rejected) == 1, 10), sup.rejected
        assert sup.stored_names() == ["dir"]
        _notify_from_child(sup, "FDSTOREREMOVE=1", "FDNAME=dir")
        assert sup.wait_for(lambda: sup.stored_names() == [], 10)


@pytest.mark.timeout(60)
def test_supervisor_passes_stored_fds_from_3_with_names_and_listen_pid_of_the_service(tmp_path: Path) -> None:
    out = tmp_path / "env.json"
    child = ("import json, os, sys, time\n"
             "from uffdd.service import systemd\n"
             "if 'LISTEN_FDS' not in os.environ:\n"
             "    r, w = os.pipe()\n"
             "    systemd.store_fd('pipe', r, poll=False)\n"  # not polled: its writer goes away
             "    systemd.store_fd('pipe', r, poll=False)\n"  # the same open file twice: kept once
             "    systemd.notify('READY=1')\n"
             "    os._exit(3)\n"
             "fds = systemd.listen_fds()\n"
             f"open({str(out)!r}, 'w').write(json.dumps({{'pid': os.getpid(), 'fds': [[f.fd, f.name] for f in fds],"
             " 'env': 'LISTEN_FDS' in os.environ}))\n"
             "systemd.notify('READY=1')\n"
             "time.sleep(60)\n")
    with Supervisor([sys.executable, "-c", child], restart_sec=0.05) as sup:
        sup.wait_ready(run=2)
        doc = json.loads(out.read_text())
        assert doc == {"pid": sup.main_pid, "fds": [[3, "pipe"]], "env": False}
        assert sup.exits[0].returncode == 3


def test_the_unit_sandbox_refuses_what_it_should(tmp_path: Path) -> None:
    """The wrapper the next test runs under really is in force after exec."""
    sandbox = unit_sandbox(tmp_path)
    probe = ("import mmap, os\n"
             "try:\n    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)\n"
             "except PermissionError:\n    print('wx refused')\n"
             "try:\n    os.setuid(0)\n"
             "except PermissionError:\n    print('setuid refused')\n"
             "os.sched_setaffinity(0, os.sched_getaffinity(0))\n"
             "os.setpriority(os.PRIO_PROCESS, 0, 1)\n"
             "print('affinity and priority allowed')\n")
    res = subprocess.run([*sandbox, sys.executable, "-c", probe], capture_output=True, text=True, timeout=30)
    assert res.stdout.split("\n")[:3] == ["wx refused", "setuid refused", "affinity and priority allowed"], res.stderr


@pytest.mark.timeout(120)
def test_daemon_and_serve_restore_a_guest_under_the_units_memory_and_syscall_sandbox(
        tmp_path: Path, snapshot_4k: Path) -> None:
    """MemoryDenyWriteExecute=yes and the unit's SystemCallFilter=: nothing in the daemon (uvloop,
    the C fault path and peer link, pinned workers, bulk threads at a lower priority) nor in
    `uffdd serve` (its C responder) needs W+X memory or a syscall the unit refuses."""
    from uffdd.peer.testing import ServeProcess

    wrapper = unit_sandbox(tmp_path)
    secret = tmp_path / "peer.secret"
    secret.write_text("sandbox test secret: 8Kp#2wQ!vZ7@rL4&\n")
    serve = ServeProcess(["--image", str(snapshot_4k), "--listen", "127.0.0.1:0", "--secret-file", str(secret)],
                         tmp_path / "serve.log", wrapper=wrapper).start()
    cfg = {"listen": str(tmp_path / "d.sock"), "workers": 2, "log": {"format": "json", "level": "info"},
           "sources": {"default": {"kind": "peer", "address": f"127.0.0.1:{serve.address[1]}",
                                   "secret_file": str(secret)}}}
    (tmp_path / "uffdd.yaml").write_text(json.dumps(cfg))
    with open(tmp_path / "daemon.log", "ab") as log_fh:  # O_APPEND: both workers write to it
        daemon = subprocess.Popen([*wrapper, sys.executable, "-m", "uffdd", "run", "-c", str(tmp_path / "uffdd.yaml")],
                                  stdout=log_fh, stderr=subprocess.STDOUT)
    vmm: VmmProcess | None = None
    try:
        wait_until(lambda: (tmp_path / "d.sock").exists() or daemon.poll() is not None, what="the daemon's socket")
        assert daemon.poll() is None, (tmp_path / "daemon.log").read_text()[-2000:]
        vmm = VmmProcess(VmmSpec(socket=str(tmp_path / "d.sock"), snapshot=str(snapshot_4k), region_sizes=[8 * MIB],
                                 threads=2, vm_id="sandboxed"))
        res = vmm.result(90)
        assert res["returncode"] == 0 and res["wrong_pages"] == 0 and res["pages_checked"] == res["pages"], res
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(20) == 0
    finally:
        if vmm is not None:
            vmm.kill()
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        assert serve.stop() == 0
    events = []
    for line in (tmp_path / "daemon.log").read_text().splitlines():
        with contextlib.suppress(ValueError):  # a line the other worker's output cut into
            events.append(json.loads(line))
    end = next(e for e in events if e.get("event") == "session_end")
    assert end["pages_filled"] == end["pages_total"] == 2048
    assert not [e for e in events if e.get("level") in ("warning", "error")], events  # e.g. worker_not_pinned
    assert not [e for e in serve.log_lines() if e.get("level") == "error"]
