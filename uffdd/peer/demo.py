"""The peer half of ``uffdd demo --peer``: the snapshot behind ``uffdd serve`` on loopback.

``uffdd serve`` runs as its own process, as it would on the migration source; the daemon's
source is ``kind: peer``. With ``--cut-link`` the daemon reaches the server through a
:class:`~uffdd.peer.relay.Relay` that cuts the link once a third of the pages are in, so the
run shows faults waiting, the reconnect, and the re-sent requests.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console

from uffdd.peer.relay import Relay
from uffdd.peer.testing import ServeProcess


class PeerDemo:
    """Starts and stops the source side; watches the run to cut the link and spot a dead source."""

    def __init__(self, *, cut_link: bool, cut_seconds: float, deadline: float, silent_cut: bool = False) -> None:
        self.cut_link = cut_link
        self.cut_seconds = cut_seconds
        self.deadline = deadline
        self.silent_cut = silent_cut
        self.serve: ServeProcess | None = None
        self.relay: Relay | None = None
        self.address = ("127.0.0.1", 0)
        self.cut_at: int | None = None
        self.failure: str | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._source: Any = None

    async def start(self, snapshot: Path, size: int, console: Console) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="uffdd-serve-")
        self.serve = ServeProcess(["--image", f"default={snapshot}", "--listen", "127.0.0.1:0"],
                                  Path(self._tmp.name) / "serve.log")
        with console.status("starting uffdd serve on loopback"):
            await asyncio.to_thread(self.serve.start)
        self.address = self.serve.address
        if self.cut_link:
            self.relay = Relay(*self.serve.address)
            self.address = await self.relay.start()
            # Cut by bytes carried, not by time: it lands mid-migration however fast the run is.
            self.relay.cut_after(size // 3, self.cut_seconds, silent=self.silent_cut)
        console.print(f"page source: uffdd serve (pid {self.serve.proc.pid if self.serve.proc else '?'}) on "
                      f"{self.serve.address[0]}:{self.serve.address[1]}"
                      + (f", reached through a cuttable link on port {self.address[1]}" if self.relay else ""))

    def source_config(self) -> dict[str, Any]:
        return {"kind": "peer", "address": f"{self.address[0]}:{self.address[1]}", "image": "default",
                "deadline": self.deadline, "keepalive": 0.25, "io_timeout": 1.0, "reconnect_max": 0.5,
                "connect_timeout": 1.0}

    def watch(self, sessions: list[Any], done: int, total: int, console: Console) -> bool:
        """Called while the guest runs; True means "give up": the source is gone past its deadline."""
        for s in sessions:
            src = s.source
            unreachable = getattr(src, "unreachable", None)
            self._source = src
            if unreachable is not None:
                self.failure = str(unreachable)
                return True
        if self.relay is not None and self.cut_at is None and self.relay.cuts:
            self.cut_at = done
            console.print(f"[yellow]link cut for {self.cut_seconds:g}s with {done:,} of {total:,} pages in "
                          f"({'silently' if self.silent_cut else 'connections reset'})[/]")
        return False

    def rows(self) -> list[tuple[str, str]]:
        stats = getattr(self._source, "stats", None)
        s: dict[str, Any] = stats.as_dict() if stats is not None else {}
        rows = [("page source", f"uffdd serve on {self.serve.address[0]}:{self.serve.address[1]}"
                 if self.serve else "?")]
        if self.cut_at is not None:
            rows.append(("link cut", f"at {self.cut_at:,} pages, {self.cut_seconds:g}s"))
        if s:
            rows.append(("reconnects / requests re-sent",
                         f"{s.get('reconnects', 0)} / {s.get('requests_resent', 0)}"))
            rows.append(("checksum failures (re-fetched)", str(s.get("checksum_failures", 0))))
        return rows

    async def close(self) -> None:
        if self.relay is not None:
            await self.relay.close()
        if self.serve is not None:
            await asyncio.to_thread(self.serve.stop)
        if self._tmp is not None:
            self._tmp.cleanup()
