"""The VMM socket against hostile local clients, each attack on a live daemon with a healthy guest
beside it whose bytes (and, where it matters, waits) are checked."""

from __future__ import annotations

import array
import contextlib
import os
import socket
import statistics
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DaemonProcess
from uffdd.testing import VmmProcess, VmmSpec
from uffdd.testing.waiting import wait_until

pytestmark = pytest.mark.timeout(180)

MIB = 1 << 20
MAX_BYTES = 1 << 20
ITEM = b'{"base_host_virt_addr": 4096, "size": 8192, "offset": 0, "page_size": 4096}, '
PREFIX = b'{"vm_id": "x", "regions": [' + ITEM * (1000 * 1024 // len(ITEM))
"""A valid JSON prefix of about 1 MiB: it never ends, so the daemon must keep reading it."""
PYTHON_PATH = {"fault_around": 0, "prefetch": {"enabled": False}, "native": False}
"""Every fault served on the event loop: what a busy event loop would delay first."""


class Trickler:
    """A hostile VMM: sends :data:`PREFIX` at once, then 3 more bytes of it every 5 ms (each
    its own read in the daemon), never finishing; near ``handshake.max_bytes`` it connects again."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.stop = threading.Event()
        self.connections = 0
        self.trickled = 0
        self.thread = threading.Thread(target=self._run, name="trickler", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            with contextlib.suppress(OSError):
                self._one_connection()

    def _one_connection(self) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(self.path)
            s.sendall(PREFIX)
            self.connections += 1
            sent, k, cycle = len(PREFIX), 0, ITEM * 2
            while sent < MAX_BYTES - 64 and not self.stop.wait(0.005):
                piece = cycle[k : k + 3]
                s.sendall(piece)
                k = (k + 3) % len(ITEM)
                sent += 3
                self.trickled += 3

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)


@contextlib.contextmanager
def tricklers(path: str, n: int) -> Iterator[list[Trickler]]:
    attackers = [Trickler(path) for _ in range(n)]
    try:
        wait_until(lambda: all(a.trickled > 0 for a in attackers), what="every attacker trickling")
        yield attackers
    finally:
        for a in attackers:
            a.close()


def healthy_guest(d: DaemonProcess, snapshot: Path, **kw: Any) -> dict[str, Any]:
    """A guest touching all of its 16 MiB; its bytes must be the snapshot's."""
    spec = VmmSpec(socket=d.socket, snapshot=str(snapshot), region_sizes=[16 * MIB], threads=2,
                   vm_id="healthy", timeout=60, **kw)
    res = VmmProcess(spec).result(60)
    assert res["returncode"] == 0 and res["wrong_pages"] == 0, res
    assert res["pages_checked"] == 4096
    return res


def test_two_clients_trickling_a_megabyte_handshake_do_not_slow_a_healthy_guest(
        daemon_process: Callable[..., DaemonProcess], snapshot_4k: Path) -> None:
    """Total time within 1.5x and longest single wait within 3x of the same guest without the
    attack: medians of 9 runs each, quiet and attacked runs taking turns on the same daemon (so
    that the load of a shared machine falls on both alike).

    The longest wait of one run is the machine's as much as the daemon's: with no attack, and
    even with the C reference handler and the C guest, it ranges from 0.6 to 4 ms on a 2-core
    VM, so the median of nine flips between two modes. An attacked median past 3x therefore
    fails only if it is also past the worst wait of any quiet run: the attack must not make a
    typical run's stall longer than what the machine does on its own at worst."""
    d = daemon_process(session=PYTHON_PATH, handshake={"timeout": 60, "max_bytes": MAX_BYTES})
    healthy_guest(d, snapshot_4k)  # warm: the page cache, the daemon's imports
    quiet: list[dict[str, Any]] = []
    attacked: list[dict[str, Any]] = []
    for _ in range(9):
        quiet.append(healthy_guest(d, snapshot_4k))
        with tricklers(d.socket, 2) as attackers:
            before = sum(a.trickled for a in attackers)
            attacked.append(healthy_guest(d, snapshot_4k))
            assert sum(a.trickled for a in attackers) > before  # the attack went on during the run
    total = statistics.median(r["elapsed_s"] for r in attacked) / statistics.median(r["elapsed_s"] for r in quiet)
    worst = statistics.median(r["max_us"] for r in attacked) / statistics.median(r["max_us"] for r in quiet)
    past_noise = statistics.median(r["max_us"] for r in attacked) / max(r["max_us"] for r in quiet)
    print(f"\nattacked/quiet: total time {total:.2f}x, longest wait {worst:.2f}x "
          f"({past_noise:.2f}x of the worst quiet run's); "
          f"quiet {[round(r['elapsed_s'], 3) for r in quiet]} s, {[round(r['max_us']) for r in quiet]} us; "
          f"attacked {[round(r['elapsed_s'], 3) for r in attacked]} s, {[round(r['max_us']) for r in attacked]} us")
    assert total <= 1.5, total
    assert worst <= 3.0 or past_noise <= 1.0, (worst, past_noise)
    assert d.proc.poll() is None


def _send_with_fds(s: socket.socket, data: bytes, fds: list[int]) -> None:
    s.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())])


def _closed_everywhere(read_end: int) -> bool:
    """EOF on the pipe: no process holds its write end any more."""
    try:
        return os.read(read_end, 1) == b""
    except BlockingIOError:
        return False


def test_descriptors_beyond_two_over_several_reads_are_closed_at_once_and_refused(
        daemon_process: Callable[..., DaemonProcess], snapshot_4k: Path) -> None:
    """1-byte messages with 2 fds each: the daemon must not hold them until the handshake timeout."""
    d = daemon_process(handshake={"timeout": 60})
    guest = VmmProcess(VmmSpec(socket=d.socket, snapshot=str(snapshot_4k), region_sizes=[8 * MIB], threads=2,
                               vm_id="healthy", timeout=60))
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(d.socket)
            s.settimeout(10)  # far below the 60 s handshake timeout
            _send_with_fds(s, b"[", [w, w])
            _send_with_fds(s, b" ", [w, w])
            line = s.makefile("rb").readline()
        assert b"too many file descriptors" in line and b"more than 2" in line, line
        os.close(w)
        w = -1
        wait_until(lambda: _closed_everywhere(r), what="the daemon closed every descriptor it got")
        res = guest.result(60)
        assert res["returncode"] == 0 and res["wrong_pages"] == 0, res
    finally:
        guest.kill()
        os.close(r)
        if w >= 0:
            os.close(w)


def _new_vmm_handshake(path: str) -> tuple[socket.socket, contextlib.ExitStack]:
    """Connect and send a VMM's handshake for 1 MiB of this process's memory (never touched:
    only the daemon's answer matters here)."""
    import ctypes
    import json
    import mmap

    from uffdd.kernel import Userfaultfd

    held = contextlib.ExitStack()
    memfd = os.memfd_create("after-flood", os.MFD_CLOEXEC)
    held.callback(os.close, memfd)
    os.ftruncate(memfd, MIB)
    mem = held.enter_context(mmap.mmap(memfd, MIB, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE))
    addr = ctypes.addressof(ctypes.c_char.from_buffer(mem))
    uffd = held.enter_context(Userfaultfd.open())
    body = json.dumps({"vm_id": "after-flood", "regions": [
        {"base_host_virt_addr": addr, "size": MIB, "offset": 0, "page_size": 4096}]}).encode()
    s = held.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
    s.connect(path)
    _send_with_fds(s, body, [uffd.fileno(), memfd])
    return s, held


class Flood:
    """Connections to the VMM socket that say nothing: each holds an fd of the daemon."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.socks: list[socket.socket] = []

    def more(self, n: int = 16) -> None:
        for _ in range(n):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect(self.path)
            except BlockingIOError:  # the backlog is full
                s.close()
                return
            self.socks.append(s)

    def stop(self) -> None:
        for s in self.socks:
            s.close()
        self.socks.clear()


def test_fd_flood_fails_the_health_check_and_a_new_vmm_is_served_within_1s_after_it(
        daemon_process: Callable[..., DaemonProcess], snapshot_4k: Path, tmp_path: Path) -> None:
    """The daemon runs with RLIMIT_NOFILE 256 and takes 1000 pending handshakes (64, the default,
    keeps such a flood from reaching the limit); a healthy guest faults while the flood holds."""
    import time

    from tests.test_service import _free_port, _uffdd, logged, scrape_until
    from uffdd.service.control import query

    port = _free_port()
    d = daemon_process(nofile=256, handshake={"timeout": 60, "max_pending": 1000},
                       metrics={"listen": f"127.0.0.1:{port}"})
    ctl = str(tmp_path / "d.ctl")
    guest = VmmProcess(VmmSpec(socket=d.socket, snapshot=str(snapshot_4k), region_sizes=[8 * MIB], threads=2,
                               vm_id="healthy", timeout=60, start_delay=1.0))
    flood = Flood(d.socket)
    try:
        wait_until(lambda: logged(d, "session_start"), what="the healthy guest's session")

        def health(want: bool) -> dict[str, Any]:
            """The status snapshot once it says ``healthy: want`` (the flood grows meanwhile)."""
            if not want:
                flood.more()
            doc = query(ctl, timeout=2)
            return doc if doc["healthy"] is want else {}

        doc = wait_until(lambda: health(False), timeout=30, what="the daemon out of fds")
        assert "Too many open files" in doc["accept_error"] and doc["accept_failures"] > 0
        assert _uffdd("status", "--socket", ctl, "--quiet").returncode == 1
        res = guest.result(60)  # its vCPUs faulted while the flood held
        assert res["returncode"] == 0 and res["wrong_pages"] == 0, res
        vmm, held = _new_vmm_handshake(d.socket)  # waits in the backlog
        with held:
            vmm.settimeout(5)
            flood.stop()
            t0 = time.monotonic()
            ready = vmm.makefile("rb").readline()
            served_after = time.monotonic() - t0
        assert b'"ready"' in ready, ready
        assert served_after <= 1.0, served_after
        doc = wait_until(lambda: health(True), what="healthy again")
        assert _uffdd("status", "--socket", ctl, "--quiet").returncode == 0
        lines = [e for e in d.log_lines() if e["event"] == "accept_failed"]
        assert 1 <= len(lines) < doc["accept_failures"]  # one retry every 0.1 s, a line at most every 10 s
        assert logged(d, "accept_recovered")
        text = scrape_until(port, "uffdd_accept_failing 0.0")
        assert f"uffdd_accept_failures_total {float(doc['accept_failures'])}" in text
        assert d.proc.poll() is None
    finally:
        flood.stop()
        guest.kill()


def _live_guest(d: DaemonProcess, snapshot: Path, size: int = 8 * MIB, vm_id: str = "healthy") -> VmmProcess:
    """A healthy guest whose session is up before the test goes on (its vCPUs start a second
    after its ready line, while the test does what it does)."""
    from tests.test_service import logged

    guest = VmmProcess(VmmSpec(socket=d.socket, snapshot=str(snapshot), region_sizes=[size], threads=2,
                               vm_id=vm_id, timeout=60, start_delay=1.0))
    wait_until(lambda: logged(d, "session_start"), what="the healthy guest's session")
    return guest


def _right_bytes(guest: VmmProcess) -> None:
    res = guest.result(60)
    assert res["returncode"] == 0 and res["wrong_pages"] == 0, res


def test_connections_beyond_max_pending_handshakes_get_an_error_line_at_once(
        daemon_process: Callable[..., DaemonProcess], snapshot_4k: Path, tmp_path: Path) -> None:
    from uffdd.service.control import query

    d = daemon_process(handshake={"timeout": 60, "max_pending": 4})
    guest = _live_guest(d, snapshot_4k)
    silent: list[socket.socket] = []
    try:
        for _ in range(4):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(d.socket)
            silent.append(s)
        wait_until(lambda: query(str(tmp_path / "d.ctl"))["handshakes_pending"] == 4, what="4 handshakes pending")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as extra:
            extra.connect(d.socket)
            extra.settimeout(10)  # far below the 60 s handshake timeout
            line = extra.makefile("rb").readline()
            assert extra.recv(1) == b""  # closed at once
        assert b"too many handshakes in progress" in line and b"handshake.max_pending = 4" in line, line
        _right_bytes(guest)
        silent.pop().close()  # a slot is free again: a new VMM is served
        _right_bytes(VmmProcess(VmmSpec(socket=d.socket, snapshot=str(snapshot_4k), region_sizes=[4 * MIB],
                                        threads=2, vm_id="next", timeout=60)))
    finally:
        for s in silent:
            s.close()
        guest.kill()


def test_sessions_and_guest_bytes_beyond_the_limits_are_refused_naming_the_setting(
        daemon_process: Callable[..., DaemonProcess], snapshot_4k: Path, tmp_path: Path) -> None:
    from uffdd.service.control import query

    d = daemon_process(limits={"max_sessions": 2, "max_mapped_bytes": "12MiB"})
    guest = _live_guest(d, snapshot_4k, size=8 * MIB)
    others: list[VmmProcess] = []
    try:
        def vmm(size: int, vm_id: str, start_delay: float = 0.0) -> VmmProcess:
            others.append(VmmProcess(VmmSpec(socket=d.socket, snapshot=str(snapshot_4k), region_sizes=[size],
                                             threads=2, vm_id=vm_id, timeout=60, start_delay=start_delay)))
            return others[-1]

        too_big = vmm(8 * MIB, "too-big").result(60)
        assert too_big["stage"] == "handshake" and "limits.max_mapped_bytes" in str(too_big["error"]), too_big
        fits = vmm(4 * MIB, "fits", start_delay=30)  # 8 + 4 MiB: exactly the limit
        wait_until(lambda: query(str(tmp_path / "d.ctl"))["mapped_bytes"] == 12 * MIB, what="12 MiB admitted")
        third = vmm(4096, "third").result(60)
        assert third["stage"] == "handshake" and "limits.max_sessions" in str(third["error"]), third
        _right_bytes(guest)
        fits.kill()  # its session ends: room for one more
        wait_until(lambda: query(str(tmp_path / "d.ctl"))["mapped_bytes"] == 0, what="every session released")
        _right_bytes(vmm(8 * MIB, "after"))
    finally:
        for v in others:
            v.kill()
        guest.kill()


def test_a_flood_of_silent_connections_within_the_default_max_pending_never_exhausts_the_fds(
        daemon_process: Callable[..., DaemonProcess], snapshot_4k: Path, tmp_path: Path) -> None:
    """RLIMIT_NOFILE 256, 400 silent connections: 64 wait for their handshake timeout, the rest
    are refused at once, and accepting never fails."""
    from uffdd.service.control import query

    d = daemon_process(nofile=256, handshake={"timeout": 60})
    ctl = str(tmp_path / "d.ctl")
    guest = _live_guest(d, snapshot_4k)
    flood = Flood(d.socket)
    try:
        while len(flood.socks) < 400:
            flood.more()
        wait_until(lambda: query(ctl)["handshakes_refused"] == len(flood.socks) - 64, what="all but 64 refused")
        doc = query(ctl)
        assert doc["healthy"] and doc["accept_failures"] == 0 and doc["handshakes_pending"] == 64, doc
        _right_bytes(guest)
    finally:
        flood.stop()
        guest.kill()
