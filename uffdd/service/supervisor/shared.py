"""What the parent and its workers share: environment variables, the name of the shared socket,
and the load table that balances accepts."""

from __future__ import annotations

import mmap
import os

WORKER_ENV = "UFFDD_WORKER"
"""Set (to the worker's index) in the environment of the processes the parent starts."""
PARENT_ENV = "UFFDD_WORKER_PARENT"
"""The parent's pid: a worker whose parent is already gone exits at once."""
LOAD_ENV = "UFFDD_WORKER_LOAD"
"""Path of the load table."""
LISTEN_FD_NAME = "vmm"
"""LISTEN_FDNAMES entry of the shared listening socket (not "listen": the worker must not
take it for its own stored socket and unlink its file on stop)."""


def worker_index() -> int | None:
    """Our index if this process is a worker started by the parent, else None."""
    raw = os.environ.get(WORKER_ENV)
    return int(raw) if raw is not None and raw.isdigit() else None


class LoadTable:
    """One little-endian u32 per worker, in a file all of them map: its open connections."""

    def __init__(self, path: str) -> None:
        with open(path, "r+b") as fh:
            self._map = mmap.mmap(fh.fileno(), 0)

    @staticmethod
    def create(path: str, workers: int) -> None:
        with open(path, "wb") as fh:
            fh.write(bytes(4 * workers))

    def __len__(self) -> int:
        return len(self._map) // 4

    def loads(self) -> list[int]:
        return [int.from_bytes(self._map[i:i + 4], "little") for i in range(0, len(self) * 4, 4)]

    def publish(self, index: int, connections: int) -> None:
        if index < len(self):
            self._map[4 * index:4 * index + 4] = connections.to_bytes(4, "little")

    def excess(self, index: int) -> int:
        """How many more connections worker ``index`` serves than the least loaded other one."""
        loads = self.loads()
        others = [n for i, n in enumerate(loads) if i != index]
        mine = loads[index] if index < len(loads) else 0
        return max(mine - min(others), 0) if others else 0
