"""``workers: N``: a parent that is the service manager of N worker processes.

The parent runs under tests/supervisor.py (the host's systemd), so what it sends upwards, and
the fd store it mirrors there (names prefixed ``w<i>.``), are observed on a real notify socket.
Guests are stand-in VMMs that check every page against the snapshot at the end.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from array import array
from pathlib import Path
from typing import Any

import pytest

from tests.supervisor import Supervisor
from tests.test_restart import (
    MOMENT,
    PAGES,
    REGIONS,
    assert_guest_whole,
    filled,
    log_events,
    supervised,
)
from uffdd.config import parse_config
from uffdd.errors import ConfigError
from uffdd.service.control import query
from uffdd.service.manager import COUNTS_FIELD, StatusCounts
from uffdd.service.supervisor.notify import Worker, parse_fields, read_messages
from uffdd.testing import VmmProcess, VmmSpec
from uffdd.testing.waiting import NotYet, wait_until

TWO = {"workers": 2}


def guests(tmp_path: Path, snapshot: Path, n: int, *, threads: int = 2, start_delay: float = 1.0) -> list[VmmProcess]:
    return [VmmProcess(VmmSpec(socket=str(tmp_path / "uffdd.sock"), snapshot=str(snapshot), region_sizes=REGIONS,
                               threads=threads, vm_id=f"g{i}", seed=200 + i, start_delay=start_delay, timeout=50))
            for i in range(n)]


def results(vmms: list[VmmProcess], timeout: float = 50) -> list[dict[str, Any]]:
    try:
        return [v.result(timeout) for v in vmms]
    finally:
        for v in vmms:
            v.kill()


def parent_status(tmp_path: Path) -> dict[str, Any]:
    return query(str(tmp_path / "uffdd.ctl"))


def exited(pid: int) -> bool:
    """The process has exited (a zombie not yet reaped by whoever adopted it counts as exited)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def gone(pid: int, timeout: float = 5) -> bool:
    try:
        return wait_until(lambda: exited(pid), timeout=timeout)
    except NotYet:
        return False


def only_sockets_stored(sup: Supervisor) -> bool:
    """No session left in the store: only the listening socket and the workers' notify sockets."""
    names = sup.stored_names()
    return "listen" in names and all(n == "listen" or n.startswith("notify.") for n in names)


def workers_with_sessions(sup: Supervisor) -> dict[int, set[str]]:
    """worker index -> ids of the sessions it stored (mirrored into the supervisor's store)."""
    out: dict[int, set[str]] = {}
    for name in sup.stored_names():
        if name.startswith("w") and name.endswith(".desc"):
            index, sid, _ = name.split(".")
            out.setdefault(int(index[1:]), set()).add(sid)
    return out


@pytest.mark.timeout(90)
def test_guests_at_once_are_spread_over_two_workers_and_get_every_page_right(
        tmp_path: Path, snapshot_4k: Path) -> None:
    with supervised(tmp_path, snapshot_4k, config=TWO) as sup:
        ready = sup.wait_ready(run=1)
        assert ready.fields["MAINPID"] == str(sup.main_pid)
        assert ready.fields["STATUS"].endswith("2/2 worker(s) up"), ready.fields
        workers = parent_status(tmp_path)["workers"]
        pids = {w["pid"] for w in workers}
        assert len(pids) == 2 and sup.main_pid not in pids
        # pin_workers (default): each worker on its own CPU of the parent's set, round-robin.
        cpus = sorted(os.sched_getaffinity(0))
        assert [os.sched_getaffinity(w["pid"]) for w in sorted(workers, key=lambda w: w["index"])] == \
            [{cpus[i % len(cpus)]} for i in range(2)]
        assert sup.main_pid is not None and os.sched_getaffinity(sup.main_pid) == set(cpus)
        vmms = guests(tmp_path, snapshot_4k, 6)
        res = results(vmms)
        for r in res:
            assert_guest_whole(r)
        # Each worker reported its sessions on its own control socket and in the log.
        done = [e for e in log_events(tmp_path) if e.get("event") == "session_complete"]
        by_worker = {e["worker"] for e in done}
        assert len(done) == 6 and by_worker == {0, 1}, [(e.get("worker"), e.get("session")) for e in done]
        assert sup.wait_for(lambda: "6 served" in sup.status, 10), sup.status
        ex = sup.stop()
        assert ex.returncode == 0
        assert sup.wait_message("STOPPING", "1").run == 1
        assert sup.stored_names() == [] and not sup.rejected, (sup.stored_names(), sup.rejected)
        assert not (tmp_path / "uffdd.sock").exists()
        assert all(gone(pid) for pid in pids)


@pytest.mark.timeout(90)
def test_a_worker_killed_mid_migration_is_replaced_and_its_sessions_resume_with_every_page_right(
        tmp_path: Path, snapshot_4k: Path) -> None:
    with supervised(tmp_path, snapshot_4k, config=TWO) as sup:
        sup.wait_ready(run=1)
        vmms = guests(tmp_path, snapshot_4k, 4, threads=3)
        try:
            assert sup.wait_for(lambda: sum(map(len, workers_with_sessions(sup).values())) == 4, 15), \
                sup.stored_names()
            victim, sids = max(workers_with_sessions(sup).items(), key=lambda kv: len(kv[1]))
            states = [sup.stored_fd(f"w{victim}.{sid}.state") for sid in sorted(sids)]
            try:
                wait_until(lambda: min(filled(fd, PAGES) for fd in states) >= PAGES // 5, timeout=20,
                           max_interval=MOMENT, what="a fifth of every guest filled")
                pid = parent_status(tmp_path)["workers"][victim]["pid"]
                os.kill(pid, signal.SIGKILL)
                at_kill = [filled(fd, PAGES) for fd in states]
            finally:
                for fd in states:
                    os.close(fd)
            res = results(vmms)
        finally:
            for v in vmms:
                v.kill()
        for r in res:
            assert_guest_whole(r)
        assert any(n < PAGES for n in at_kill), f"the kill did not land mid-migration: {at_kill}"
        events = log_events(tmp_path)
        died = [e for e in events if e.get("event") == "worker_died"]
        assert [(e["worker"], e["pid"], e["code"]) for e in died] == [(victim, pid, -signal.SIGKILL)]
        resumed = {e["session"] for e in events if e.get("event") == "session_resumed" and e.get("worker") == victim}
        assert resumed == {sid for sid, n in zip(sorted(sids), at_kill, strict=True) if n < PAGES}
        assert sup.exits == []  # the parent itself never went down
        assert parent_status(tmp_path)["workers"][victim]["starts"] == 2
        assert sup.wait_for(lambda: only_sockets_stored(sup), 10), sup.stored_names()


@pytest.mark.timeout(90)
def test_a_killed_parent_takes_its_workers_along_and_the_restarted_one_resumes_every_session(
        tmp_path: Path, snapshot_4k: Path) -> None:
    with supervised(tmp_path, snapshot_4k, config=TWO) as sup:
        sup.wait_ready(run=1)
        old = {w["pid"] for w in parent_status(tmp_path)["workers"]}
        vmms = guests(tmp_path, snapshot_4k, 3, threads=3)
        try:
            assert sup.wait_for(lambda: sum(map(len, workers_with_sessions(sup).values())) == 3, 15)
            name = next(n for n in sup.stored_names() if n.endswith(".state"))
            state = sup.stored_fd(name)
            try:
                wait_until(lambda: filled(state, PAGES) >= PAGES // 4, timeout=20, max_interval=MOMENT,
                           what="a quarter of the guest filled")
                sup.kill(signal.SIGKILL)
            finally:
                os.close(state)
            sup.wait_ready(run=2, timeout=20)
            res = results(vmms)
        finally:
            for v in vmms:
                v.kill()
        for r in res:
            assert_guest_whole(r)
        # PR_SET_PDEATHSIG: no orphan keeps serving a uffd that the successor serves too.
        assert all(gone(pid) for pid in old)
        assert any(e.get("event") == "session_resumed" for e in log_events(tmp_path))


@pytest.mark.timeout(60)
def test_uffdd_status_gathers_the_sessions_of_every_worker(tmp_path: Path, snapshot_4k: Path) -> None:
    with supervised(tmp_path, snapshot_4k, config=TWO) as sup:
        sup.wait_ready(run=1)
        vmms = guests(tmp_path, snapshot_4k, 2, start_delay=3.0)  # connected, waiting to fault
        try:
            assert sup.wait_for(lambda: sum(map(len, workers_with_sessions(sup).values())) == 2, 15)
            cmd = [sys.executable, "-m", "uffdd", "status", "--json", "-c", str(tmp_path / "uffdd.yaml")]
            out = subprocess.run(cmd,
                                 capture_output=True, check=True, timeout=20).stdout
            doc = json.loads(out)
            assert [w["index"] for w in doc["workers"]] == [0, 1]
            assert sorted(r["vm_id"] for r in doc["sessions"]) == ["g0", "g1"], doc["sessions"]
            assert {r["worker"] for r in doc["sessions"]} == {0, 1}
        finally:
            res = results(vmms)
        for r in res:
            assert_guest_whole(r)


@pytest.mark.timeout(60)
def test_workers_1_is_the_single_process_daemon_with_unprefixed_store_names(
        tmp_path: Path, snapshot_4k: Path) -> None:
    with supervised(tmp_path, snapshot_4k, config={"workers": 1}) as sup:
        sup.wait_ready(run=1)
        (vmm,) = guests(tmp_path, snapshot_4k, 1, start_delay=0.5)
        try:
            assert sup.wait_for(lambda: "s1.desc" in sup.stored_names(), 10), sup.stored_names()
            assert query(str(tmp_path / "uffdd.ctl"))["pid"] == sup.main_pid
        finally:
            res = results([vmm])
        assert_guest_whole(res[0])
        assert not any(e.get("event") == "worker_started" for e in log_events(tmp_path))


def test_workers_key_accepts_a_count_or_auto_and_refuses_zero() -> None:
    assert parse_config({}).worker_count == len(os.sched_getaffinity(0))  # default: one per usable CPU
    assert parse_config({"workers": 1}).worker_count == 1
    assert parse_config({"workers": 3}).worker_count == 3
    assert parse_config({"workers": "auto"}).worker_count == len(os.sched_getaffinity(0))
    with pytest.raises(ConfigError, match="workers"):
        parse_config({"workers": 0})


# --- the structured status a worker sends its parent ---------------------------------------------

def test_counts_travel_as_one_json_field_and_read_back_equal() -> None:
    counts = StatusCounts(sessions=2, pages_to_go=10, served=5, faults=100, resumed=1, unresumed=1)
    key, _, value = counts.encode().partition("=")
    assert key == COUNTS_FIELD and key.startswith("X_")  # sd_notify(3): a service's own fields
    assert StatusCounts.decode(value) == counts
    assert counts.line() == "2 session(s), 10 page(s) to go; 5 served; 100 faults; 1 resumed; 1 NOT resumed (see log)"
    assert StatusCounts().line() == "0 session(s), 0 page(s) to go; 0 served; 0 faults"


@pytest.mark.parametrize(("value", "needle"), [
    ("[1, 2]", "expected a JSON object"),
    ('{"sessions": -1}', "sessions must be a count"),
    ('{"faults": true}', "faults must be a count"),
    ('{"served": "5"}', "served must be a count"),
    ("sessions=3", "Expecting value"),
])
def test_counts_that_are_not_counts_are_refused(value: str, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        StatusCounts.decode(value)


def test_counts_from_a_newer_worker_keep_what_this_parent_knows() -> None:
    assert StatusCounts.decode('{"sessions": 3, "wings": 2}') == StatusCounts(sessions=3)


def worker(index: int) -> Worker:
    return Worker(index=index, notify=socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM), notify_path="")


def test_the_parent_adds_up_the_workers_counts_and_keeps_the_last_good_ones() -> None:
    ws = [worker(0), worker(1)]
    try:
        msg = parse_fields(b"READY=1\nSTATUS=words nobody parses\n" +
                           StatusCounts(sessions=1, pages_to_go=7, served=4, faults=9).encode().encode())
        assert ws[0].apply(msg, watchdog_usec=None) == (True, True)
        assert ws[0].status == "words nobody parses"
        ws[1].apply(parse_fields(StatusCounts(sessions=2, served=3, faults=1, resumed=2).encode().encode()),
                    watchdog_usec=None)
        changed, ready = ws[1].apply({COUNTS_FIELD: "garbage"}, watchdog_usec=None)  # logged, not applied
        assert (changed, ready) == (False, False)
        assert sum((w.counts for w in ws), StatusCounts()) == \
            StatusCounts(sessions=3, pages_to_go=7, served=7, faults=10, resumed=2)
    finally:
        for w in ws:
            w.close()


def test_a_workers_stored_descriptors_are_kept_until_it_removes_them() -> None:
    w = worker(3)
    r, wr = os.pipe()
    try:
        w.keep_fds(parse_fields(b"FDSTORE=1\nFDNAME=s1.conn"), [r], mirror=False)
        w.keep_fds(parse_fields(b"FDSTORE=1\nFDNAME=bad:name"), [wr], mirror=False)  # refused, closed
        assert [(s.name, s.fd) for s in w.store] == [("s1.conn", r)]
        with pytest.raises(OSError):
            os.fstat(wr)
        w.keep_fds(parse_fields(b"FDSTOREREMOVE=1\nFDNAME=s1.conn"), [], mirror=False)
        assert w.store == []
        with pytest.raises(OSError):
            os.fstat(r)
    finally:
        w.close()


def test_a_notify_datagram_stays_queued_until_its_descriptors_are_kept() -> None:
    """A parent killed while it handles a worker's FDSTORE leaves it to the next parent."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    w = worker(0)
    r, wr = os.pipe()
    try:
        theirs.sendmsg([b"FDSTORE=1\nFDNAME=s1.conn"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, bytes(array("i", [r])))])
        os.close(r)
        ours.setblocking(False)
        messages = read_messages(ours, lambda pid: True, lambda pid, flags: None)
        fields, fds = next(messages)
        assert ours.recv(64, socket.MSG_PEEK) == b"FDSTORE=1\nFDNAME=s1.conn"  # still queued while handled
        w.keep_fds(fields, fds, mirror=False)
        assert list(messages) == []
        with pytest.raises(BlockingIOError):
            ours.recv(64)
        # The same datagram read again (by the next parent) stores nothing twice.
        again = os.dup(w.store[0].fd)
        w.keep_fds(fields, [again], mirror=False)
        assert [s.name for s in w.store] == ["s1.conn"]
        with pytest.raises(OSError):
            os.fstat(again)
        os.close(wr)
    finally:
        w.close()
        ours.close()
        theirs.close()
