"""Handshakes in flight survive SIGKILL: a VMM that does not wait for "ready" loses no guest.

Firecracker registers its userfaultfd itself, sends the handshake and runs the guest at once.
If the daemon dies after accepting such a VMM but before its session is in the fd store, nobody
could ever serve that guest. Here the daemon runs with ``workers`` at its default under
tests/supervisor.py (which keeps the fd store and restarts it); each run kills it at a random
moment 0-50 ms after the stand-in VMM connected, and the guest must still get every page right.
One supervisor serves all the runs, so each costs about one restart.
"""

from __future__ import annotations

import asyncio
import os
import random
import select
import signal
import socket
from array import array
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.supervisor import Supervisor
from tests.test_restart import log_events, supervised
from tests.test_workers import only_sockets_stored
from uffdd.service.control import query
from uffdd.service.inflight import PEEK_LIMIT, SO_PEEK_OFF, peek_handshake
from uffdd.testing import VmmProcess, VmmSpec
from uffdd.testing.waiting import eventually, wait_until
from uffdd.unixsock import close_fds, same_file

MIB = 1 << 20
SMALL = [2 * MIB, 1 * MIB]
SMALL_PAGES = sum(SMALL) // 4096
RUNS = 50
GUEST_TIMEOUT = 10
"""A guest nobody serves hangs: its stand-in VMM gives up after this many seconds."""
DEFAULTS: dict[str, Any] = {"workers": "auto"}  # the default: one worker per CPU


def small_guest(tmp_path: Path, snapshot: Path, vm_id: str, **spec: Any) -> VmmProcess:
    """The small two-thread guest these tests run, on the daemon's socket in ``tmp_path``."""
    return VmmProcess(VmmSpec(socket=str(tmp_path / "uffdd.sock"), snapshot=str(snapshot), region_sizes=SMALL,
                              threads=2, vm_id=vm_id, timeout=GUEST_TIMEOUT, **spec))


def handshake_in_pieces(tmp_path: Path, snapshot: Path, vm_id: str) -> VmmProcess:
    """A VMM that registers its uffd itself and sends its handshake in ten pieces 50 ms apart."""
    return small_guest(tmp_path, snapshot, vm_id, preregister=True, wait_ready=False, split_body=10)


def firecracker_like(tmp_path: Path, snapshot: Path, seed: int, connected_fd: int, split_body: int = 0) -> VmmProcess:
    """A VMM that registers its uffd itself and faults right after sending the handshake (with
    ``split_body``, in that many pieces 50 ms apart)."""
    return small_guest(tmp_path, snapshot, f"fc{seed}", seed=seed, preregister=True, wait_ready=False,
                       connected_fd=connected_fd, split_body=split_body)


def guest_through_a_kill(tmp_path: Path, snapshot: Path, seed: int, delay: float,
                         kill: Callable[[], None], split_body: int = 0) -> dict[str, Any] | str:
    """Start a guest, ``kill`` ``delay`` seconds after it connected; its result, or why it was lost."""
    r, w = os.pipe()
    try:
        vmm = firecracker_like(tmp_path, snapshot, seed, w, split_body)
    finally:
        os.close(w)
    try:
        with os.fdopen(r, "rb", buffering=0) as connected:
            select.select([connected], [], [], 30)
            if connected.read(1) != b"c":
                return f"never connected: {vmm.result(5)}"
        select.select([], [], [], delay)  # the random moment of the kill, not a wait for a state
        kill()
        try:
            return vmm.result(GUEST_TIMEOUT + 10)
        except (RuntimeError, TimeoutError) as exc:
            return f"lost: {exc}"
    finally:
        vmm.kill()


def guest_is_whole(res: dict[str, Any] | str) -> bool:
    return (isinstance(res, dict) and res["returncode"] == 0 and res["wrong_pages"] == 0
            and res["pages_checked"] == SMALL_PAGES)


def kill_main(sup: Supervisor) -> Callable[[], None]:
    def kill() -> None:
        sup.kill(signal.SIGKILL)
    return kill


def early_weighted(rng: random.Random) -> float:
    """0-50 ms, a third of them in the first 2 ms: a handshake is in flight for about that long
    after the connect, and a uniform spread could miss it in every one of 50 runs."""
    return 0.05 * rng.random() ** 3


def uniform(rng: random.Random) -> float:
    """0-50 ms, evenly."""
    return rng.uniform(0.0, 0.05)


def run_kills(tmp_path: Path, snapshot: Path, sup: Supervisor, runs: int, seed: int,
              victim: Callable[[], None], after: Callable[[int], None],
              spread: Callable[[random.Random], float], slow_every: int = 0) -> list[str]:
    """``runs`` guests, each through one kill; what went wrong, one line per lost or bad guest.
    With ``slow_every``, every such run's VMM sends its handshake in 10 pieces over 0.5 s, so
    that its kill, whenever it comes in 0-50 ms, lands while the handshake is in flight."""
    rng = random.Random(seed)
    bad = []
    for run in range(runs):
        delay = spread(rng)
        slow = slow_every > 0 and run % slow_every == slow_every - 1
        res = guest_through_a_kill(tmp_path, snapshot, seed * 1000 + run, delay, victim, 10 if slow else 0)
        if not guest_is_whole(res):
            bad.append(f"run {run} (kill {delay * 1000:.1f} ms after connect): {res}")
        after(run)
    return bad


def assert_some_handshake_was_in_flight(tmp_path: Path) -> None:
    """The kills did land where this test looks: some successor finished a handshake in flight."""
    resumed = [e for e in log_events(tmp_path) if e.get("event") == "handshake_resumed"]
    assert resumed, "no kill landed while a handshake was in flight"


@pytest.mark.timeout(600)
def test_sigkill_0_to_50ms_after_a_vmm_connects_without_waiting_for_ready_loses_no_guest(
        tmp_path: Path, snapshot_4k: Path) -> None:
    with supervised(tmp_path, snapshot_4k, config=DEFAULTS, max_starts=RUNS + 5) as sup:
        sup.wait_ready(run=1)

        def restarted(run: int) -> None:
            sup.wait_ready(run=run + 2, timeout=30)

        bad = run_kills(tmp_path, snapshot_4k, sup, RUNS, 1, kill_main(sup), restarted, early_weighted)
        assert not bad, f"{len(bad)} of {RUNS} guests lost or wrong:\n" + "\n".join(bad)
        assert [e.returncode for e in sup.exits] == [-signal.SIGKILL] * RUNS
        assert sup.wait_for(lambda: only_sockets_stored(sup), 10), sup.stored_names()
    assert_some_handshake_was_in_flight(tmp_path)


@pytest.mark.timeout(600)
def test_workers_sigkilled_0_to_50ms_after_a_vmm_connects_lose_no_guest(tmp_path: Path, snapshot_4k: Path) -> None:
    runs = RUNS // 2
    with supervised(tmp_path, snapshot_4k, config=DEFAULTS) as sup:
        sup.wait_ready(run=1)
        ctl = str(tmp_path / "uffdd.ctl")
        pids: list[int] = [w["pid"] for w in query(ctl)["workers"]]

        def kill_workers() -> None:  # all of them: whichever accepted the VMM dies mid-handshake
            for pid in pids:
                os.kill(pid, signal.SIGKILL)

        def replaced(run: int) -> None:
            def all_new() -> list[int]:
                ws = query(ctl)["workers"]
                return [w["pid"] for w in ws] if all(w["ready"] and w["starts"] == run + 2 for w in ws) else []

            pids[:] = wait_until(all_new, timeout=30, what="every worker replaced and ready")

        bad = run_kills(tmp_path, snapshot_4k, sup, runs, 2, kill_workers, replaced, uniform, slow_every=5)
        assert not bad, f"{len(bad)} of {runs} guests lost or wrong:\n" + "\n".join(bad)
        assert sup.exits == []  # the parent itself never went down
        assert sup.wait_for(lambda: only_sockets_stored(sup), 10), sup.stored_names()
    assert_some_handshake_was_in_flight(tmp_path)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers", [1, 2])
def test_a_handshake_cut_short_by_sigkill_is_finished_by_the_successor_from_the_bytes_still_queued(
        workers: int, tmp_path: Path, snapshot_4k: Path) -> None:
    with supervised(tmp_path, snapshot_4k, config={"workers": workers}) as sup:
        sup.wait_ready(run=1)
        # Ten pieces 50 ms apart: the daemon has read (peeked) a part of the body and its fds.
        vmm = handshake_in_pieces(tmp_path, snapshot_4k, "cut")
        try:
            def in_flight() -> bool:
                names = sup.stored_names()
                return any(n.endswith("s1.conn") for n in names) and not any(n.endswith("s1.desc") for n in names)

            assert sup.wait_for(in_flight, 15), sup.stored_names()
            sup.kill(signal.SIGKILL)
            sup.wait_ready(run=2, timeout=30)
            res = vmm.result(GUEST_TIMEOUT + 10)
        finally:
            vmm.kill()
        assert guest_is_whole(res), res
        assert res["session"] == "s1"
        if workers == 1:
            assert query(str(tmp_path / "uffdd.ctl"))["handshakes_resumed"] == 1
        resumed = [e for e in log_events(tmp_path) if e.get("event") == "handshake_resumed"]
        assert [e["session"] for e in resumed] == ["s1"], resumed
        assert sup.wait_for(lambda: only_sockets_stored(sup), 10), sup.stored_names()


@pytest.mark.timeout(60)
def test_sigterm_during_a_handshake_waits_for_that_guest_as_for_a_live_session(
        tmp_path: Path, snapshot_4k: Path) -> None:
    with supervised(tmp_path, snapshot_4k) as sup:
        sup.wait_ready(run=1)
        vmm = handshake_in_pieces(tmp_path, snapshot_4k, "term")
        try:
            assert sup.wait_for(lambda: "s1.conn" in sup.stored_names(), 15), sup.stored_names()
            sup.kill(signal.SIGTERM)
            res = vmm.result(GUEST_TIMEOUT + 10)
        finally:
            vmm.kill()
        assert guest_is_whole(res), res
        assert sup.wait_for(lambda: len(sup.exits) == 1, 10) and sup.exits[0].returncode == 0, sup.exits
    events = [e.get("event") for e in log_events(tmp_path)]
    assert "waiting_for_sessions" in events and "handshake_refused" not in events


@pytest.mark.timeout(60)
def test_what_workers_stored_with_a_parent_that_never_read_it_reaches_the_next_parent(
        tmp_path: Path, snapshot_4k: Path) -> None:
    with supervised(tmp_path, snapshot_4k, config={"workers": 2}) as sup:
        sup.wait_ready(run=1)
        assert sup.main_pid is not None
        os.kill(sup.main_pid, signal.SIGSTOP)  # reads nothing from its workers from now on
        vmm = small_guest(tmp_path, snapshot_4k, "held", start_delay=1.0)
        try:
            def serving() -> bool:  # the worker stored the session (in the parent's queue) and serves it
                return any(s["vm_id"] == "held" for i in (0, 1)
                           for s in query(str(tmp_path / f"uffdd.{i}.ctl"))["sessions"])

            wait_until(serving, timeout=15, what="a worker serving the guest")
            assert not any(n.endswith(".conn") for n in sup.stored_names())  # nothing reached the manager
            sup.kill(signal.SIGKILL)
            sup.wait_ready(run=2, timeout=30)
            res = vmm.result(GUEST_TIMEOUT + 10)
        finally:
            vmm.kill()
        assert guest_is_whole(res), res
        assert sup.wait_for(lambda: only_sockets_stored(sup), 10), sup.stored_names()
    events = [e.get("event") for e in log_events(tmp_path)]
    assert "worker_notify_backlog" in events and "session_resumed" in events


async def test_peek_handshake_reads_a_body_in_pieces_and_leaves_it_and_its_fds_queued() -> None:
    ours, vmm = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    r, w = os.pipe()
    got: list[int] = []
    try:
        ours.setblocking(False)
        vmm.sendmsg([b'{"regions": '], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, bytes(array("i", [r, w])))])
        reading = asyncio.ensure_future(peek_handshake(ours, max_bytes=4096, timeout=5))
        await eventually(lambda: ours.getsockopt(socket.SOL_SOCKET, SO_PEEK_OFF) == 12, what="first piece peeked")
        assert not reading.done()  # it waits for the rest, which has not been sent yet
        vmm.sendall(b'[1]}')
        body, got = await reading
        assert body == b'{"regions": [1]}' and len(got) == 2 and same_file(got[0], r)
        # A successor reads the same handshake again: nothing was consumed.
        again, more = await peek_handshake(ours, max_bytes=4096, timeout=5)
        got += more
        assert again == body and same_file(more[1], w)
        assert ours.recv(64) == b'{"regions": '  # what the session's EOF watch drops (with the fds)
    finally:
        close_fds([r, w, *got])
        ours.close()
        vmm.close()


@pytest.mark.timeout(60)
def test_a_handover_during_a_handshake_leaves_it_to_the_next_start(tmp_path: Path, snapshot_4k: Path) -> None:
    with supervised(tmp_path, snapshot_4k, config={"shutdown": {"on_sigterm": "handover"}},
                    fd_store_preserve=True) as sup:
        sup.wait_ready(run=1)
        vmm = handshake_in_pieces(tmp_path, snapshot_4k, "handed")
        try:
            assert sup.wait_for(lambda: "s1.conn" in sup.stored_names(), 15), sup.stored_names()
            assert sup.stop().returncode == 0
            assert "s1.conn" in sup.stored_names() and "s1.desc" not in sup.stored_names()
            sup.start_again()
            sup.wait_ready(run=2)
            res = vmm.result(GUEST_TIMEOUT + 10)
        finally:
            vmm.kill()
        assert guest_is_whole(res), res
    events = [e.get("event") for e in log_events(tmp_path)]
    assert "handshake_resumed" in events and "handshake_refused" not in events


def test_a_handshake_too_long_to_peek_is_read_for_real_and_served(
        daemon_process: Callable[..., Any], snapshot_4k: Path) -> None:
    """Peeked bytes stay queued and a stream socket queues only so much: a valid handshake of
    150 KiB (leading whitespace) would never fit. Past PEEK_LIMIT it is read for real (its fds
    not doubled) and the guest is served with every byte right; the log says it was not durable."""
    d = daemon_process(session={"fault_around": 0, "prefetch": {"enabled": False}})
    res = VmmProcess(VmmSpec(socket=d.socket, snapshot=str(snapshot_4k), region_sizes=[4 << 20], threads=2,
                             body_padding=150 << 10)).result(60)
    assert res["wrong_pages"] == 0 and res["returncode"] == 0, res
    d.stop()
    assert [e["bytes"] >= PEEK_LIMIT for e in d.log_lines() if e["event"] == "handshake_not_durable"] == [True]
