"""The image half of ``uffdd demo --image``: the snapshot packed, behind a local HTTP server.

The snapshot is packed with ``uffdd pack`` into a store directory, served by nginx on
loopback (Python's http.server where nginx is not installed), and the daemon's source is
``kind: image`` with a chunk cache in the demo's directory. It has the interface of
uffdd.peer.demo.PeerDemo, so the demo drives either the same way.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from rich.console import Console

from uffdd.images.pack import PackOptions, PackResult, pack
from uffdd.testing.servers import NginxServer, StaticServer


class ImageDemo:
    def __init__(self, page_size: int, deadline: float) -> None:
        self.page_size = page_size
        self.deadline = deadline
        self.server: NginxServer | StaticServer | None = None
        self.packed: PackResult | None = None
        self.failure: str | None = None
        self.cache = Path()
        self._source: Any = None

    async def start(self, snapshot: Path, size: int, console: Console) -> None:
        work = snapshot.parent
        self.cache = work / "chunk-cache"
        with console.status("packing the snapshot (uffdd pack)"):
            self.packed = await pack(str(snapshot), str(work / "store"), PackOptions(
                name="demo", page_size=self.page_size, chunk_size=max(256 << 10, self.page_size)))
        p = self.packed
        console.print(f"packed {size >> 20} MiB into {p.stored_bytes / (1 << 20):.1f} MiB of chunks "
                      f"({p.chunks} chunks, {p.zero_chunks} zero) in {p.seconds:.2f}s")
        if NginxServer.available():
            self.server = NginxServer(work / "store", work / "nginx")
        else:
            self.server = StaticServer(work / "store", work)
        await asyncio.to_thread(self.server.start)
        console.print(f"image served by {type(self.server).__name__.removesuffix('Server').lower()} at "
                      f"{self.server.url}/demo.json")

    def source_config(self) -> dict[str, Any]:
        assert self.server is not None
        return {"kind": "image", "url": f"{self.server.url}/demo.json", "deadline": self.deadline,
                "cache": {"path": str(self.cache), "max_bytes": 4 << 30}}

    def watch(self, sessions: list[Any], done: int, total: int, console: Console) -> bool:
        """True means "give up": the store has failed past its deadline."""
        for s in sessions:
            self._source = s.source
            if s.source.unreachable is not None:
                self.failure = str(s.source.unreachable)
                return True
        return False

    def rows(self) -> list[tuple[str, str]]:
        stats = getattr(self._source, "stats", None)
        if stats is None:
            return []
        return [("image chunks", f"{stats.requests:,} fetched ({stats.bytes_fetched / (1 << 20):,.1f} MiB), "
                 f"{stats.cache_hits:,} from the cache, {stats.checksum_failures} failed their hash")]

    async def close(self) -> None:
        if self.server is not None:
            await asyncio.to_thread(self.server.stop)
