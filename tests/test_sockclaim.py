"""Claiming a Unix socket path: stale files are replaced, live sockets and other files never."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from uffdd.errors import ConfigError, StartupError
from uffdd.sockclaim import check_unix_path, is_temporary_name, prepare_unix
from uffdd.unixsock import bind_unix


def _stale(path: Path) -> int:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()
    return os.lstat(path).st_ino


def test_a_stale_socket_file_is_replaced_only_when_the_claim_is_committed(tmp_path: Path) -> None:
    path = tmp_path / "d.sock"
    stale = _stale(path)
    claim = prepare_unix(str(path), backlog=4, key="listen")
    assert os.lstat(path).st_ino == stale  # prepared: bound under another name, the old file untouched
    (temp,) = [n for n in os.listdir(tmp_path) if n != "d.sock"]
    assert is_temporary_name(str(tmp_path / temp), str(path))
    sock = claim.commit()
    try:
        assert os.listdir(tmp_path) == ["d.sock"] and os.lstat(path).st_ino != stale
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.connect(str(path))
            conn, _ = sock.accept()
            conn.close()
    finally:
        sock.close()


def test_an_aborted_claim_leaves_the_path_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "d.sock"
    stale = _stale(path)
    prepare_unix(str(path), backlog=4, key="listen").abort()
    assert os.listdir(tmp_path) == ["d.sock"] and os.lstat(path).st_ino == stale


def test_a_socket_whose_backlog_is_full_counts_as_live(tmp_path: Path) -> None:
    path = tmp_path / "d.sock"
    live = bind_unix(str(path), backlog=0, key="listen")
    waiting = []
    try:
        while True:  # fill the backlog: the next connect() would block
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            waiting.append(c)
            try:
                c.connect(str(path))
            except BlockingIOError:
                break
        with pytest.raises(StartupError, match=r"listen: .* is in use: a live process \(its backlog is full\)"):
            check_unix_path(str(path), key="listen")
        live.setblocking(False)
        while True:  # drain it: now a connect() is answered, by the pid that listens
            try:
                live.accept()[0].close()
            except BlockingIOError:
                break
        with pytest.raises(StartupError, match=f"is in use: pid {os.getpid()} answers on it"):
            bind_unix(str(path), backlog=4, key="listen")
        assert os.listdir(tmp_path) == ["d.sock"]
    finally:
        for c in waiting:
            c.close()
        live.close()


def test_a_file_that_is_not_a_socket_is_never_replaced(tmp_path: Path) -> None:
    path = tmp_path / "d.sock"
    path.write_text("mine")
    with pytest.raises(ConfigError, match=r"listen: .* exists and is not a socket"):
        prepare_unix(str(path), backlog=4, key="listen")
    assert path.read_text() == "mine" and os.listdir(tmp_path) == ["d.sock"]
