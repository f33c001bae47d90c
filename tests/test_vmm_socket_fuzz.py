"""The VMM socket fuzzed on a live daemon: random bodies, 0-3 descriptors of many kinds, bodies
split over several sends. Every connection gets an error line or a session, the daemon never
dies, and a healthy guest served meanwhile over and over gets every byte right."""

from __future__ import annotations

import array
import contextlib
import ctypes
import itertools
import json
import mmap
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import DaemonProcess
from tests.test_handshake import handshake_like, json_values
from uffdd.kernel import Userfaultfd
from uffdd.testing import VmmProcess, VmmSpec
from uffdd.testing.waiting import wait_until

pytestmark = pytest.mark.timeout(240, method="thread")  # a hang in a page fault ignores signals

MIB = 1 << 20
VALID = b"<valid>"
"""Stands for a valid handshake of 1 MiB of this process's memory (built per case)."""
FD_KINDS = ["uffd", "memfd", "pipe", "socket", "devnull", "eventfd"]

bodies = st.one_of(
    st.binary(max_size=300),
    json_values.map(lambda v: json.dumps(v).encode()),
    handshake_like.map(lambda v: json.dumps(v).encode()),
    st.integers(1, 40).map(lambda n: b"[" * n + b"]" * n),  # around the nesting limit
    st.just(VALID),
)
fd_sets = st.one_of(st.just(["uffd", "memfd"]), st.just(["uffd"]),
                    st.lists(st.sampled_from(FD_KINDS), max_size=3))


def _open_fd(kind: str, held: contextlib.ExitStack) -> int:
    """A descriptor of ``kind``, closed when ``held`` is."""
    if kind == "uffd":
        return held.enter_context(Userfaultfd.open()).fileno()
    if kind == "memfd":
        fd = os.memfd_create("fuzz", os.MFD_CLOEXEC)
        os.ftruncate(fd, MIB)
    elif kind == "pipe":
        fd, w = os.pipe()
        held.callback(os.close, w)
    elif kind == "socket":
        a, b = socket.socketpair()
        held.callback(b.close)
        fd = a.detach()
    elif kind == "devnull":
        fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    else:
        fd = os.eventfd(0, os.EFD_CLOEXEC)
    held.callback(os.close, fd)
    return fd


def _valid_body(held: contextlib.ExitStack) -> tuple[bytes, list[int]]:
    """A handshake a daemon accepts: 1 MiB of a memfd mapped here (never touched).

    Our userfaultfd is closed before the memory is unmapped: an UNMAP event would otherwise
    wait for a reader, and the session reading events may have ended already."""
    memfd = _open_fd("memfd", held)
    mem = held.enter_context(mmap.mmap(memfd, MIB, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE))
    uffd = held.enter_context(Userfaultfd.open())
    addr = ctypes.addressof(ctypes.c_char.from_buffer(mem))
    body = json.dumps({"vm_id": "fuzz", "regions": [
        {"base_host_virt_addr": addr, "size": MIB, "offset": 0, "page_size": 4096}]}).encode()
    return body, [uffd.fileno(), memfd]


def one_case(path: str, body: bytes, kinds: list[str], cuts: list[int], fds_at: int) -> dict[str, Any]:
    """Send ``body`` in pieces (the fds with piece ``fds_at``), hang up our side, and return the
    daemon's first line."""
    with contextlib.ExitStack() as held:
        # The memory first: every userfaultfd that may be registered on it is closed before it
        # is unmapped (an UNMAP event would wait for a reader that has gone).
        body, valid_fds = _valid_body(held) if body == VALID else (body, [])
        fds = [_open_fd(k, held) for k in kinds]
        fds = valid_fds if valid_fds and kinds == ["uffd", "memfd"] else fds
        edges = sorted({0, len(body), *(c for c in cuts if c < len(body))})
        pieces = [body[a:b] for a, b in itertools.pairwise(edges)] or [b""]
        s = held.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
        s.settimeout(10)  # the daemon's handshake timeout is 2 s
        s.connect(path)
        first_fds = min(fds_at, len(pieces) - 1)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # refused early: read why below
            for i, piece in enumerate(pieces):
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
                if fds and i == first_fds:
                    s.sendmsg([piece or b" "], anc)
                elif piece:
                    s.sendall(piece)
            s.shutdown(socket.SHUT_WR)
        line = s.makefile("rb").readline()
    assert line, f"the daemon closed the connection without a line ({body[:80]!r}, fds {kinds})"
    answer: dict[str, Any] = json.loads(line)
    return answer


class HealthyGuests:
    """Guests served one after another while the fuzzing goes on; every one must be right."""

    def __init__(self, d: DaemonProcess, snapshot: Path) -> None:
        self.spec = VmmSpec(socket=d.socket, snapshot=str(snapshot), region_sizes=[8 * MIB], threads=2,
                            vm_id="healthy", timeout=60)
        self.results: list[dict[str, object]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="healthy-guests", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            self.results.append(VmmProcess(self.spec).result(60))

    def close(self) -> list[dict[str, object]]:
        self.stop.set()
        self.thread.join(90)
        return self.results


def test_fuzzed_handshakes_each_get_an_error_line_or_a_session_and_a_healthy_guest_is_right(
        daemon_process: Callable[..., DaemonProcess], snapshot_4k: Path) -> None:
    d = daemon_process(handshake={"timeout": 2})
    outcomes = {"error": 0, "ready": 0}
    guests = HealthyGuests(d, snapshot_4k)
    try:
        wait_until(lambda: guests.results, timeout=30, what="a first healthy guest")

        @settings(max_examples=400, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(body=bodies, kinds=fd_sets, cuts=st.lists(st.integers(1, 300), max_size=4), fds_at=st.integers(0, 4))
        def case(body: bytes, kinds: list[str], cuts: list[int], fds_at: int) -> None:
            answer = one_case(d.socket, body, kinds, cuts, fds_at)
            if "error" in answer:
                assert isinstance(answer["error"], str) and answer["error"]
                outcomes["error"] += 1
            else:
                assert answer["status"] == "ready", answer
                outcomes["ready"] += 1
            assert d.proc.poll() is None, "the daemon died"

        case()
    finally:
        results = guests.close()
    assert outcomes["error"] > 0 and outcomes["ready"] > 0, outcomes
    assert results and all(r["returncode"] == 0 and r["wrong_pages"] == 0 for r in results), results
    assert d.proc.poll() is None
    assert not [e for e in d.log_lines() if e["event"] in ("connection_failed", "server_tasks_failed")]  # no bug hit
