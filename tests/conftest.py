"""Fixtures: a real daemon (in this process or as a subprocess), snapshots, stand-in VMMs.

Every async test runs on uvloop and on the default asyncio loop. Guests always fault from
another process (the stand-in VMM), and everything a test starts is killed when it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import uvloop
import yaml

from uffdd import logs
from uffdd.config import Config, parse_config
from uffdd.core import Session
from uffdd.service.listener import Listener
from uffdd.testing import VmmProcess, VmmSpec, make_snapshot
from uffdd.testing.waiting import NotYet, eventually, wait_until

HUGE = 2 << 20
logs.configure("json", "warning")


def pytest_asyncio_loop_factories(
        config: pytest.Config, item: pytest.Item) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    return {"uvloop": uvloop.new_event_loop, "asyncio": asyncio.new_event_loop}


@pytest.fixture(scope="session")
def snapshot_4k(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """32 MiB snapshot with 4 KiB-page stamps."""
    path = tmp_path_factory.mktemp("snap") / "guest.mem"
    make_snapshot(path, 32 << 20, seed=11, page_size=4096)
    return path


@pytest.fixture(scope="session")
def snapshot_2m(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """32 MiB snapshot with 2 MiB-page stamps."""
    path = tmp_path_factory.mktemp("snap2m") / "guest.mem"
    make_snapshot(path, 32 << 20, seed=12, page_size=HUGE)
    return path


def hugepages_free() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("HugePages_Free:"):
                return int(line.split()[1])
    return 0


@pytest.fixture
def hugepages() -> Callable[[int], None]:
    """Call with the number of 2 MiB pages a test needs; skips (with the reason) if unavailable."""

    def need(n: int) -> None:
        free = hugepages_free()
        if free < n:
            pytest.skip(f"needs {n} free 2 MiB huge pages, {free} free: echo N > /proc/sys/vm/nr_hugepages "
                        "(./scripts/test reserves them)")

    return need


@dataclass
class Daemon:
    """An in-process daemon: the real listener and sessions on the test's event loop."""

    listener: Listener
    socket: str
    snapshot: Path
    vmms: list[VmmProcess] = field(default_factory=list)
    seen: dict[str, Session] = field(default_factory=dict)
    """Every session started, kept after it ended (the listener tells on each change)."""

    def spec(self, **kw: Any) -> VmmSpec:
        base = VmmSpec(socket=self.socket, snapshot=str(self.snapshot), region_sizes=[8 << 20], threads=4,
                       vm_id="guest", timeout=90)
        return replace(base, **kw)

    def start_vmm(self, **kw: Any) -> VmmProcess:
        vmm = VmmProcess(self.spec(**kw))
        self.vmms.append(vmm)
        return vmm

    async def run_vmm(self, timeout: float = 90, **kw: Any) -> dict[str, Any]:
        vmm = self.start_vmm(**kw)
        return await asyncio.to_thread(vmm.result, timeout)

    async def session(self) -> Session:
        """The first session this daemon started (live or ended), once there is one."""
        found = await eventually(lambda: next(iter(self.seen.values()), None), what="a session started")
        assert found is not None
        return found

    async def wait_idle(self, timeout: float = 10) -> None:
        """Wait until every session has ended and been released."""
        try:
            await asyncio.wait_for(self.listener.wait_sessions(), timeout)
        except TimeoutError:
            raise TimeoutError(f"sessions still open: {sorted(self.listener.sessions)}") from None


async def first_session(listener: Listener, timeout: float = 20) -> Session:
    """The first session the listener runs (waiting for its VMM to connect)."""
    await eventually(lambda: listener.sessions, timeout=timeout, what="a session")
    return next(iter(listener.sessions.values()))


async def wait_pages(s: Session, n: int, timeout: float = 60) -> int:
    """Until the session has installed ``n`` pages (polling its counters: nothing to await on);
    returns how many it has."""
    await eventually(lambda: s.stats.pages_filled >= n, timeout=timeout, max_interval=0.002,
                     what=f"{n} pages installed")
    return s.stats.pages_filled


def make_config(tmp_path: Path, snapshot: Path, **extra: Any) -> Config:
    data: dict[str, Any] = {
        "listen": str(tmp_path / "uffdd.sock"),
        "sources": {"default": {"kind": "file", "path": str(snapshot)},
                    "byid": {"kind": "file", "path": str(snapshot.parent / "{vm_id}.mem")}},
        "handshake": {"timeout": 2.0},
        # The core fault path alone, unless a test asks for fault-around or pre-paging.
        "session": {"fault_around": 0, "prefetch": {"enabled": False}},
    }
    data.update(extra)
    return parse_config(data)


@contextlib.asynccontextmanager
async def running_daemon(config: Config, snapshot: Path) -> AsyncIterator[Daemon]:
    listener = Listener(config)
    d = Daemon(listener=listener, socket=config.listen, snapshot=snapshot)
    listener.on_change = lambda: d.seen.update(listener.sessions)
    await listener.start()
    try:
        yield d
    finally:
        for v in d.vmms:
            v.kill()
        await listener.close()


def core_session(fault_path: str) -> dict[str, Any]:
    return {"fault_around": 0, "prefetch": {"enabled": False}, "native": fault_path == "c-fast-path"}


# The core tests run on both single-page fault paths: uffdd/kernel/_fastpath.c and Python's.
FAULT_PATHS = ["c-fast-path", "python"]


@pytest.fixture(params=FAULT_PATHS)
async def daemon(request: pytest.FixtureRequest, tmp_path: Path, snapshot_4k: Path) -> AsyncIterator[Daemon]:
    config = make_config(tmp_path, snapshot_4k, session=core_session(request.param))
    async with running_daemon(config, snapshot_4k) as d:
        yield d


@pytest.fixture(params=FAULT_PATHS)
async def daemon_2m(request: pytest.FixtureRequest, tmp_path: Path, snapshot_2m: Path) -> AsyncIterator[Daemon]:
    config = make_config(tmp_path, snapshot_2m, session=core_session(request.param))
    async with running_daemon(config, snapshot_2m) as d:
        yield d


@dataclass
class DaemonProcess:
    """``uffdd run -c FILE`` as a real subprocess, with its JSON log on a file."""

    proc: subprocess.Popen[bytes]
    socket: str
    log_path: Path

    def log_lines(self) -> list[dict[str, Any]]:
        import json

        out = []
        for line in self.log_path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        return self.proc.returncode


def _limit_fds(n: int) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))


@pytest.fixture
def daemon_process(tmp_path: Path, snapshot_4k: Path) -> Iterator[Callable[..., DaemonProcess]]:
    started: list[DaemonProcess] = []

    def start(extra_env: dict[str, str] | None = None, nofile: int | None = None, **config_extra: Any) -> DaemonProcess:
        """``nofile``: the daemon's RLIMIT_NOFILE (an fd flood then reaches it quickly)."""
        sock = str(tmp_path / "d.sock")
        cfg: dict[str, Any] = {"listen": sock, "sources": {"default": {"kind": "file", "path": str(snapshot_4k)}},
                               "log": {"format": "json", "level": "info"}, "workers": 1}
        cfg.update(config_extra)
        cfg_path = tmp_path / "uffdd.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg))
        log_path = tmp_path / "daemon.log"
        env = {**os.environ, **(extra_env or {})}
        with open(log_path, "wb") as log_fh:
            proc = subprocess.Popen([sys.executable, "-m", "uffdd", "run", "-c", str(cfg_path)],
                                    stdout=log_fh, stderr=subprocess.STDOUT, env=env,
                                    preexec_fn=None if nofile is None else lambda: _limit_fds(nofile))
        d = DaemonProcess(proc=proc, socket=sock, log_path=log_path)
        started.append(d)
        with contextlib.suppress(NotYet):
            wait_until(lambda: os.path.exists(sock) or proc.poll() is not None, timeout=15)
        if not os.path.exists(sock):
            raise RuntimeError(f"daemon did not start: {log_path.read_text()[-2000:]}")
        return d

    yield start
    for d in started:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()
