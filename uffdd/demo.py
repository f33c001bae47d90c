"""`uffdd demo`: restore a stand-in guest from a generated snapshot, end to end, on this host.

The daemon runs here on uvloop; the stand-in VMM is a separate process that creates guest
memory and a userfaultfd, does the handshake exactly as a real VMM would, touches every page
from several threads in random order and checks every byte against the snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import uvloop
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from uffdd import logs
from uffdd.config import parse_config
from uffdd.core.session import Session
from uffdd.core.stats import SessionStats
from uffdd.images.demo import ImageDemo
from uffdd.peer.demo import PeerDemo
from uffdd.service.listener import Listener
from uffdd.testing import VmmProcess, VmmSpec, make_snapshot
from uffdd.testing.guestmem import make_guest_image


@dataclass
class DemoOptions:
    size: int = 256 << 20
    page_size: int = 4096
    threads: int = 4
    regions: int = 2
    prepopulate: float = 0.05
    workdir: str | None = None
    peer: bool = False
    """Serve the snapshot with ``uffdd serve`` on loopback and use a ``kind: peer`` source."""
    cut_link: bool = False
    cut_seconds: float = 1.5
    peer_deadline: float = 30.0
    image: bool = False
    """Pack guest-like memory with ``uffdd pack``, serve it over HTTP and use a ``kind: image`` source."""


def _region_sizes(size: int, regions: int, page_size: int) -> list[int]:
    """Split ``size`` into ``regions`` page-aligned pieces (the first one largest)."""
    pages = size // page_size
    if pages < regions:
        raise SystemExit(f"uffdd demo: {size} bytes is fewer than {regions} pages of {page_size}")
    share = pages // regions
    sizes = [share * page_size] * regions
    sizes[0] += (pages - share * regions) * page_size
    return sizes


def _remote_source(opts: DemoOptions) -> PeerDemo | ImageDemo | None:
    """The source side, when the snapshot is not read as a local file."""
    if opts.peer:
        return PeerDemo(cut_link=opts.cut_link, cut_seconds=opts.cut_seconds, deadline=opts.peer_deadline)
    return ImageDemo(opts.page_size, opts.peer_deadline) if opts.image else None


async def _run(opts: DemoOptions, work: Path, console: Console) -> int:
    snap = work / "demo.mem"
    sock = work / "uffdd.sock"
    with console.status(f"writing a {opts.size >> 20} MiB snapshot image to {snap}"):
        await asyncio.to_thread(make_guest_image if opts.image else make_snapshot, snap, opts.size, seed=7,
                                page_size=opts.page_size)
    peer = _remote_source(opts)
    if peer is not None:
        await peer.start(snap, opts.size, console)
    source = peer.source_config() if peer is not None else {"kind": "file", "path": str(work / "{vm_id}.mem")}
    listener = Listener(parse_config({"listen": str(sock), "sources": {"default": source}}))
    await listener.start()
    spec = VmmSpec(socket=str(sock), snapshot=str(snap), vm_id="demo",
                   region_sizes=_region_sizes(opts.size, opts.regions, opts.page_size),
                   page_size=opts.page_size, threads=opts.threads, prepopulate=opts.prepopulate, seed=7)
    vmm = VmmProcess(spec)
    result_task = asyncio.create_task(asyncio.to_thread(vmm.result, 600))
    try:
        session = await _watch(listener, peer, result_task, opts.size // opts.page_size, console)
        if peer is not None and peer.failure:
            vmm.kill()
            console.print(f"[red]page source unreachable past its deadline, giving up: {peer.failure}[/]")
            with contextlib.suppress(Exception):
                await result_task
            return 1
        result = await result_task
    finally:
        vmm.kill()
        await listener.close()
        if peer is not None:
            await peer.close()
    return _report(opts, result, session.stats if session is not None else None, peer, console)


async def _watch(listener: Listener, peer: PeerDemo | ImageDemo | None, result: asyncio.Task[dict[str, object]],
                 pages: int, console: Console) -> Session | None:
    """Show pages installed as they are, until the guest is done (or the remote source fails)."""
    t0 = time.perf_counter()
    latest: Session | None = None
    with Progress(TextColumn("[bold]guest pages installed"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), console=console) as progress:
        bar = progress.add_task("pages", total=pages, rate="")
        while not result.done():
            for s in listener.sessions.values():
                latest = s
            done = latest.stats.pages_filled if latest is not None else 0
            el = max(time.perf_counter() - t0, 1e-6)
            progress.update(bar, completed=done, rate=f"{done / el:,.0f} pages/s")
            if peer is not None and peer.watch(list(listener.sessions.values()), done, pages, progress.console):
                break
            await asyncio.sleep(0.05)
        if latest is not None:
            progress.update(bar, completed=latest.stats.pages_filled)
    return latest


def _report(opts: DemoOptions, result: dict[str, object], stats: SessionStats | None, peer: PeerDemo | ImageDemo | None,
            console: Console) -> int:
    if "error" in result:
        console.print(f"[red]handshake refused: {result['error']}[/]")
        return 1
    elapsed = float(result["elapsed_s"])  # type: ignore[arg-type]
    wrong = int(result["wrong_pages"])  # type: ignore[call-overload]
    rows = [
        ("guest memory", f"{opts.size >> 20} MiB in {opts.regions} region(s), {opts.page_size // 1024} KiB pages"
         + (" (hugetlbfs)" if opts.page_size > 4096 else " (shmem memfd)")),
        ("vCPU threads", str(opts.threads)),
        ("pages", f"{result['pages']:,} ({result['prepopulated']:,} pre-populated with stale bytes)"),
        ("faults served", f"{stats.fault_msgs:,} ({stats.fills_inline:,} filled inline, {stats.fills_async:,} "
         "after waiting for the source)" if stats else "?"),
        ("pages by path", f"demand {stats.pages_demand:,}, fault-around {stats.pages_fault_around:,}, "
         f"pre-paging {stats.pages_prefetch:,}" if stats else "?"),
        ("fault service p50 / p99",
         f"<= {stats.latency_quantile(0.5):.0f} us / <= {stats.latency_quantile(0.99):.0f} us"
         " (fault read -> page mapped)" if stats else "?"),
        ("vCPU touch p50 / p99", f"{result['p50_us']:.1f} us / {result['p99_us']:.1f} us (every first touch, "
         "faulting or not)"),
        ("guest work time", f"{elapsed * 1e3:,.0f} ms for {int(result['touched']):,} first touches "  # type: ignore[call-overload]
         f"({opts.size / elapsed / (1 << 20):,.0f} MiB/s)"),
        ("install complete", f"{stats.complete_s * 1e3:,.0f} ms after the handshake" if stats and stats.complete_s
         else "not yet"),
        *(peer.rows() if peer is not None else []),
        ("pages checked", f"{result['pages_checked']:,}"),
        ("pages wrong", f"[{'green' if wrong == 0 else 'red'}]{wrong}[/]"),
    ]
    table = Table(title="uffdd demo report", show_header=False)
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)
    if wrong:
        console.print(f"[red]wrong pages (first ones): {result['wrong_sample']}[/]")
    return 0 if wrong == 0 and result.get("returncode") == 0 else 1


def main(opts: DemoOptions) -> int:
    console = Console()
    logs.configure("console", "warning")
    if opts.workdir:
        work = Path(opts.workdir)
        work.mkdir(parents=True, exist_ok=True)
        return uvloop.run(_run(opts, work, console))
    # The snapshot lives on disk (not tmpfs) when it can, as a real one would.
    base = "/var/tmp" if os.path.isdir("/var/tmp") else None
    with tempfile.TemporaryDirectory(prefix="uffdd-demo-", dir=base) as tmp:
        return uvloop.run(_run(opts, Path(tmp), console))
