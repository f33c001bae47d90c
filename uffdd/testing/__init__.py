"""Helpers for tests, benchmarks and the demo: a stand-in VMM process and snapshot images."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict

from uffdd.testing.snapshot import make_snapshot
from uffdd.testing.vmm import VmmSpec

_ENTRY = "import sys; from uffdd.testing.vmm import main; sys.exit(main())"


class VmmProcess:
    """A running stand-in VMM; :meth:`result` waits for its JSON line (killing it on timeout)."""

    def __init__(self, spec: VmmSpec) -> None:
        self.spec = spec
        inherited = [*spec.extra_fds, *([spec.connected_fd] if spec.connected_fd >= 0 else [])]
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _ENTRY, json.dumps(asdict(spec))],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=tuple(inherited),
        )

    def result(self, timeout: float = 60) -> dict[str, object]:
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            out, err = self.proc.communicate()
            raise TimeoutError(f"stand-in VMM did not finish in {timeout}s; stderr: {err.decode()[-2000:]}") from None
        lines = out.decode().strip().splitlines()
        if not lines:
            raise RuntimeError(f"stand-in VMM printed nothing (exit {self.proc.returncode}): {err.decode()[-2000:]}")
        res: dict[str, object] = json.loads(lines[-1])
        res["returncode"] = self.proc.returncode
        return res

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


__all__ = ["VmmProcess", "VmmSpec", "make_snapshot"]
