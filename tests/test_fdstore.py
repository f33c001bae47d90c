"""The fd store's pure pieces, without a service manager: session records and sorting what a
start inherited (tests/test_restart.py runs them end to end)."""

from __future__ import annotations

import array
import contextlib
import json
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from uffdd import handshake as hs_mod
from uffdd.service.fdstore import FdStore, RecordError, SessionRecord, listening_socket, sort_inherited
from uffdd.service.systemd import ListenFd

HS = hs_mod.parse(json.dumps({"vm_id": "vm-7", "source": "snap", "regions": [
    {"base_host_virt_addr": 0x7F0000000000, "size": 8 << 20, "offset": 0, "page_size": 4096},
    {"base_host_virt_addr": 0x7F1000000000, "size": 4 << 20, "offset": 8 << 20, "page_size": 4096}]}))


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@pytest.fixture
def record() -> Iterator[SessionRecord]:
    rec = SessionRecord(session_id="s12", handshake=HS, preinitialized=True, features=0x1A, anonymous=False)
    rec.create()
    yield rec
    rec.close()


def test_a_record_reads_back_as_written_through_another_descriptor(record: SessionRecord) -> None:
    stored = os.dup(record.fd)  # what the service manager keeps and hands to the successor
    back = SessionRecord.read(stored)
    try:
        assert (back.session_id, back.handshake, back.preinitialized, back.features, back.anonymous) == \
            ("s12", HS, True, 0x1A, False)
        assert (back.ready_sent, back.complete) == (False, False)
        assert back.fd == stored  # read() takes the descriptor over
    finally:
        back.close()
    assert not is_open(stored)


def test_update_rewrites_the_same_memfd_so_the_stored_copy_sees_it(record: SessionRecord) -> None:
    stored = os.dup(record.fd)
    fd = record.fd
    record.update(ready_sent=True)
    record.update(complete=True)
    back = SessionRecord.read(stored)
    assert (back.ready_sent, back.complete) == (True, True)
    assert record.fd == fd
    back.close()


def test_update_with_a_longer_handshake_grows_the_record_and_stays_valid(record: SessionRecord) -> None:
    stored = os.dup(record.fd)
    size = os.fstat(record.fd).st_size
    regions = [hs_mod.RegionSpec(start=0x7F0000000000 + i * (4 << 20), size=4 << 20, offset=i * (4 << 20),
                                 page_size=4096) for i in range(40)]
    longer = hs_mod.Handshake(vm_id="vm-7", source="snap", regions=tuple(regions))
    record.update(handshake=longer)
    assert os.fstat(record.fd).st_size > size
    back = SessionRecord.read(stored)
    assert back.handshake == longer
    back.close()
    record.update(handshake=HS)  # shorter again: the rest is blank, still one JSON document
    back = SessionRecord.read(os.dup(record.fd))
    assert back.handshake == HS
    back.close()


def test_update_before_create_only_changes_the_fields() -> None:
    rec = SessionRecord(session_id="s1", handshake=HS)
    rec.update(ready_sent=True)
    assert rec.ready_sent and rec.fd == -1
    rec.close()  # nothing to close


@pytest.mark.parametrize(("content", "needle"), [
    (b'{"version": 99}', "unknown session record version 99"),
    (b"[1, 2]", "unknown session record version None"),
    (b"not json", "unreadable session record"),
    (b'{"version": 1, "session": "s1"}', "unreadable session record"),
    (b'{"version": 1, "session": "s1", "handshake": {"regions": []}, "preinitialized": false, "features": 0, '
     b'"anonymous": false, "ready_sent": false, "complete": false}', "unreadable session record: regions"),
])
def test_a_record_that_cannot_be_read_is_refused_and_the_descriptor_left_to_the_caller(
        content: bytes, needle: str) -> None:
    fd = os.memfd_create("bad-desc")
    try:
        os.write(fd, content)
        with pytest.raises(RecordError, match=needle):
            SessionRecord.read(fd)
        assert is_open(fd)  # the caller keeps it in the store: the guest waits
    finally:
        os.close(fd)


def listening_unix(tmp_path: Path, name: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(tmp_path / name))
    s.listen(1)
    return s


def test_sort_inherited_groups_sessions_and_tells_our_socket_from_activated_ones(tmp_path: Path) -> None:
    ours, activated, second_listen = (listening_unix(tmp_path, n) for n in ("a.sock", "b.sock", "c.sock"))
    pipes = [os.pipe() for _ in range(5)]
    fds = [ListenFd(ours.fileno(), "listen"), ListenFd(activated.fileno(), "uffdd.socket"),
           ListenFd(second_listen.fileno(), "listen"),
           ListenFd(pipes[0][0], "s3.uffd"), ListenFd(pipes[1][0], "s3.desc"), ListenFd(pipes[2][0], "s10.conn"),
           ListenFd(pipes[3][0], "s3.uffd"),  # a duplicate name: the first one wins, this one is closed
           ListenFd(pipes[4][0], "stray")]  # no listening socket, no session kind
    try:
        inherited = sort_inherited(fds)
        assert inherited.stored_listener == ours.fileno()
        assert [lf.name for lf in inherited.listeners] == ["uffdd.socket", "listen"]
        assert inherited.sessions == {"s3": {"uffd": pipes[0][0], "desc": pipes[1][0]}, "s10": {"conn": pipes[2][0]}}
        assert not is_open(pipes[3][0])
        assert inherited.last_session_number == 10
        assert [lf.name for lf in inherited.unknown] == ["stray"]
        inherited.close_unknown()
        assert not is_open(pipes[4][0]) and inherited.unknown == []
    finally:
        for s in (ours, activated, second_listen):
            s.close()
        for r, w in pipes:
            for fd in (r, w):
                if is_open(fd):
                    os.close(fd)


def test_sort_inherited_of_nothing_has_no_sessions() -> None:
    inherited = sort_inherited([])
    assert inherited.sessions == {} and inherited.last_session_number == 0 and inherited.stored_listener is None


def test_a_stored_socket_whose_file_is_gone_is_dropped_for_a_new_bind(tmp_path: Path) -> None:
    kept = listening_unix(tmp_path, "kept.sock")
    gone = listening_unix(tmp_path, "gone.sock")
    os.unlink(tmp_path / "gone.sock")
    store = FdStore(enabled=False)
    sock, owns = listening_socket(sort_inherited([ListenFd(kept.detach(), "listen")]), "/x.sock", store)
    assert sock is not None and owns and sock.getsockname() == str(tmp_path / "kept.sock")
    sock.close()
    fd = gone.detach()
    assert listening_socket(sort_inherited([ListenFd(fd, "listen")]), "/x.sock", store) == (None, True)
    assert not is_open(fd)


@pytest.fixture
def manager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A service manager's notify socket, which nobody reads until the test does."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    yield sock
    sock.close()


def _received(manager: socket.socket) -> tuple[bytes, list[int]]:
    data, anc, _, _ = manager.recvmsg(4096, socket.CMSG_SPACE(16))
    fds = [fd for _, _, raw in anc for fd in array.array("i", raw)]
    return data, fds


def test_an_accepted_connection_is_stored_by_one_sendmsg_on_a_socket_kept_open(manager: socket.socket) -> None:
    store = FdStore(enabled=True)
    r, w = os.pipe()
    try:
        before = len(os.listdir("/proc/self/fd"))
        assert store.store_conn("s3", r)
        assert len(os.listdir("/proc/self/fd")) == before + 1, "the socket stays open for the next one"
        assert store.store_conn("s4", r)
        assert len(os.listdir("/proc/self/fd")) == before + 1, "and the next message uses it"
        for sid in ("s3", "s4"):
            data, fds = _received(manager)
            assert data == f"FDSTORE=1\nFDNAME={sid}.conn".encode() and len(fds) == 1
            assert os.fstat(fds[0]).st_ino == os.fstat(r).st_ino
            os.close(fds[0])
    finally:
        store.close()
        os.close(r)
        os.close(w)


def test_a_manager_whose_queue_is_full_gets_the_connection_once_it_reads_again(manager: socket.socket) -> None:
    """The kept socket never blocks: when the manager's queue is full the store waits (as every
    other notify message does) instead of losing the connection."""
    filler = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
    queued = 0
    with contextlib.suppress(BlockingIOError):
        while True:
            filler.sendto(b"X=1", manager.getsockname())
            queued += 1
    filler.close()
    reader = threading.Timer(0.2, lambda: [manager.recv(64) for _ in range(queued)])
    reader.start()
    store = FdStore(enabled=True)
    r, w = os.pipe()
    try:
        assert store.store_conn("s5", r)
        reader.join()
        data, fds = _received(manager)
        assert data == b"FDSTORE=1\nFDNAME=s5.conn" and len(fds) == 1
        os.close(fds[0])
    finally:
        store.close()
        os.close(r)
        os.close(w)
