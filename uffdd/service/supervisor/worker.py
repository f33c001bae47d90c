"""The worker side: a plain single-process :class:`~uffdd.service.daemon.Daemon` with its own
control socket and metrics port, that balances accepts against its siblings and reports its
counts to the parent as a structured field."""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import socket
from pathlib import Path
from typing import Any

import structlog

from uffdd.config import Config, ControlConfig, MetricsConfig
from uffdd.configbase import join_hostport
from uffdd.service.daemon import Daemon
from uffdd.service.fdstore import FdStore
from uffdd.service.inflight import OnAccept
from uffdd.service.listener import Listener
from uffdd.service.supervisor.shared import LOAD_ENV, PARENT_ENV, LoadTable
from uffdd.unixsock import wait_readable

log = structlog.get_logger("uffdd.workers")

ACCEPT_DEFER_S = 0.005
"""A worker busier than another waits this long (per connection more) before accepting, so the idle
one takes the VMM."""
ACCEPT_DEFER_MAX_S = 0.05
_PR_SET_PDEATHSIG = 1


def become_worker(index: int, *, pin: bool) -> None:
    """Die with the parent (as systemd's cgroup kill would): a new parent resumes our sessions
    from its store, and two handlers must never serve one userfaultfd. With ``pin``, run on the
    index-th CPU of the set the parent may use (the parent itself stays unpinned)."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if str(os.getppid()) != os.environ.get(PARENT_ENV):
        os._exit(1)  # the parent died before the prctl: nobody would be told about our sessions
    structlog.contextvars.bind_contextvars(worker=index)
    if pin:
        cpus = sorted(os.sched_getaffinity(0))
        try:
            os.sched_setaffinity(0, {cpus[index % len(cpus)]})
        except OSError as exc:  # e.g. the CPU left our cpuset meanwhile: serve unpinned, not die
            log.warning("worker_not_pinned", cpu=cpus[index % len(cpus)], error=str(exc))


def worker_config(config: Config, index: int) -> Config:
    """What worker ``index`` runs: one process, its own control socket and metrics port."""
    ctl = Path(config.control_path)
    update: dict[str, Any] = {"workers": 1,
                              "control": ControlConfig(listen=str(ctl.with_name(f"{ctl.stem}.{index}{ctl.suffix}")))}
    if config.metrics.address is not None:
        host, port = config.metrics.address
        update["metrics"] = MetricsConfig(listen=join_hostport(host, port + index if port else 0))
    return config.model_copy(update=update)


class AcceptBalancer:
    """Every worker is woken by a new VMM; the one already serving more connections than another
    defers its accept(), so a new guest goes to the least loaded worker (the busy one would
    otherwise often win, being awake already)."""

    def __init__(self, index: int, table: LoadTable | None) -> None:
        self.index = index
        self.table = table

    def publish(self, connections: int) -> None:
        if self.table is not None:
            self.table.publish(self.index, connections)

    async def accept(self, sock: socket.socket, on_accept: OnAccept) -> socket.socket:
        while True:
            await wait_readable(sock)
            excess = self.table.excess(self.index) if self.table is not None else 0
            if excess:
                # Longer the busier we are: a loaded host may take a while to schedule the idle one.
                await asyncio.sleep(min(ACCEPT_DEFER_S * excess, ACCEPT_DEFER_MAX_S))
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                continue  # another worker took it
            on_accept(conn)
            return conn


class WorkerDaemon(Daemon):
    """The daemon as worker ``index``: its own config slice, balanced accepts, counts for the parent."""

    def __init__(self, config: Config, *, config_path: str, index: int) -> None:
        super().__init__(worker_config(config, index), config_path=config_path)
        self.index = index
        path = os.environ.get(LOAD_ENV)
        self.balancer = AcceptBalancer(index, LoadTable(path) if path else None)

    def make_listener(self, sock: socket.socket | None, owns_path: bool, store: FdStore) -> Listener:
        return Listener(self.config, sock=sock, owns_path=owns_path, store=store, accept=self.balancer.accept,
                        on_connections=self.balancer.publish)

    def adjust(self, config: Config) -> Config:
        return worker_config(config, self.index)

    def status_lines(self) -> list[str]:
        return [*super().status_lines(), self.counts().encode()]


async def run_worker(config: Config, *, config_path: str, index: int) -> int:
    """The body of worker ``index`` (after :func:`become_worker`)."""
    return await WorkerDaemon(config, config_path=config_path, index=index).serve()
