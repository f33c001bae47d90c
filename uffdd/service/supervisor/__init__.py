"""`uffdd run` with ``workers: N`` > 1: a small parent that is the service manager of N workers.

Why processes: one event loop is one core, and one guest that faults heavily delays every other
guest on that loop. The parent binds the VMM socket once (or takes it from socket activation)
and hands it to every worker as a socket-activation descriptor, so the kernel spreads the
accept()s over them. Each worker is a plain ``workers: 1`` daemon (:mod:`.worker`) that speaks
sd_notify(3) to its own notify socket in the parent, which does what systemd does for a
Type=notify service (:mod:`.notify`, :mod:`.pool`):

- READY/STATUS/RELOADING/STOPPING/WATCHDOG are recorded (a worker that stops pinging within
  the parent's own WatchdogSec is aborted and replaced); the counts behind STATUS= come as a
  structured field, which the parent adds up;
- FDSTORE/FDSTOREREMOVE: each worker's stored descriptors are kept, and a worker that dies is
  replaced by one that receives the listening socket plus that store through LISTEN_FDS, so it
  resumes the sessions exactly as a restarted daemon does;
- the store is mirrored into the parent's own manager (names prefixed ``w<i>.``), so the
  sessions survive the parent too: a restarted parent gives worker i back the ``w<i>.`` set.

Upwards the parent sends READY=1 once every worker is ready, STATUS= with the sums, STOPPING=1,
and WATCHDOG=1 from its own loop; SIGTERM/SIGINT/SIGHUP are passed on to the workers.
Each worker keeps its own control socket (``<control>.<i>.ctl``) and metrics port (port + i);
the parent's control socket lists the workers, and `uffdd status` gathers their sessions.
"""

from __future__ import annotations

from uffdd.config import Config
from uffdd.service.supervisor.pool import WorkerPool
from uffdd.service.supervisor.shared import worker_index
from uffdd.service.supervisor.worker import become_worker, run_worker, worker_config


async def supervise(config: Config, *, config_path: str, count: int) -> int:
    """Run ``count`` workers until SIGTERM/SIGINT and they have all exited."""
    return await WorkerPool(config, config_path, count).serve()


__all__ = ["WorkerPool", "become_worker", "run_worker", "supervise", "worker_config", "worker_index"]
