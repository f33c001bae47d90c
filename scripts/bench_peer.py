#!/usr/bin/env python3
"""Peer source benchmark over loopback: bulk throughput and demand-fault latency.

1. Bulk: the whole image through the bulk connection (``PeerSource.prefetch``, 4 MiB READs,
   several in flight) from ``uffdd serve`` in its own process, against a plain TCP byte stream
   of the same bytes (``sendfile`` in a subprocess, ``recv_into`` here) measured in the same
   run, rounds alternating; both write into the same already-faulted buffer. The number to
   quote is the ratio of medians (goal >= 0.5).
2. Demand faults: a stand-in VMM with one vCPU thread touches pages in random order; the real
   daemon (pre-paging and fault-around off, so every touch is a demand fault on the urgent
   connection) fills them from ``uffdd serve``. Measured idle, then with background prefetch
   traffic on the bulk connection of the same source. p99 with background should stay within
   3x of idle p99.

    ./scripts/bench_peer.py [--size 256M] [--rounds 7] [--latency-size 32M] [--background-rate MB/s]
                            [--pin] [--nice N] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import mmap
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from uffdd import logs  # noqa: E402
from uffdd.cli import parse_size  # noqa: E402
from uffdd.config import parse_config  # noqa: E402
from uffdd.configbase import join_hostport  # noqa: E402
from uffdd.peer.client import ClientOptions, PeerClient  # noqa: E402
from uffdd.peer.config import PeerLinkConfig  # noqa: E402
from uffdd.peer.testing import ServeProcess  # noqa: E402
from uffdd.service.listener import Listener  # noqa: E402
from uffdd.sources.peer import PeerSource  # noqa: E402
from uffdd.testing import VmmProcess, VmmSpec, make_snapshot  # noqa: E402

MIB = 1 << 20
REQUEST = 4 * MIB

_SENDER = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 0))
s.listen(1)
print(s.getsockname()[1], flush=True)
c, _ = s.accept()
with open(sys.argv[1], "rb") as f:
    c.sendfile(f)
c.close()
"""


def plain_tcp(snap: Path, dest: memoryview) -> float:
    """MB/s of one plain TCP byte stream of the image (kernel sendfile -> recv_into)."""
    size = len(dest)
    sender = subprocess.Popen([sys.executable, "-c", _SENDER, str(snap)], stdout=subprocess.PIPE)
    try:
        assert sender.stdout is not None
        port = int(sender.stdout.readline())
        with socket.create_connection(("127.0.0.1", port)) as s:
            t0 = time.perf_counter()
            got = 0
            while got < size:
                n = s.recv_into(dest[got : got + MIB])
                if not n:
                    raise RuntimeError(f"plain stream ended after {got} bytes")
                got += n
            dt = time.perf_counter() - t0
        sender.wait(30)
    finally:
        if sender.poll() is None:
            sender.kill()
            sender.wait()
        if sender.stdout is not None:
            sender.stdout.close()
    return size / dt / 1e6


async def peer_bulk(client: PeerClient, dest: memoryview, inflight: int) -> float:
    size = len(dest)
    sem = asyncio.Semaphore(inflight)

    async def one(off: int) -> None:
        async with sem:
            await client.prefetch(off, dest[off : off + REQUEST])

    t0 = time.perf_counter()
    await asyncio.gather(*(one(off) for off in range(0, size, REQUEST)))
    return size / (time.perf_counter() - t0) / 1e6


def _same_bytes(snap: Path, buf: mmap.mmap, size: int) -> bool:
    with open(snap, "rb") as fh, mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ) as src:
        return src[:size] == buf[:size]


async def bulk(snap: Path, address: tuple[str, int], size: int, rounds: int, inflight: int) -> dict[str, Any]:
    buf = mmap.mmap(-1, size)
    buf.write(b"\x01" * size)  # fault the buffer in once: both contenders write to resident memory
    dest = memoryview(buf)
    client = PeerClient(ClientOptions.from_config(PeerLinkConfig(address=join_hostport(*address))))
    await client.open()
    plain: list[float] = []
    peer: list[float] = []
    try:
        await peer_bulk(client, dest, inflight)  # warm-up: connections, server page cache
        if not await asyncio.to_thread(_same_bytes, snap, buf, size):
            raise SystemExit("peer bulk transfer delivered wrong bytes")
        for _ in range(rounds):
            plain.append(await asyncio.to_thread(plain_tcp, snap, dest))
            peer.append(await peer_bulk(client, dest, inflight))
    finally:
        await client.aclose()
        dest.release()
        buf.close()
    p, q = statistics.median(plain), statistics.median(peer)
    paired = statistics.median(b / a for a, b in zip(plain, peer, strict=True))
    return {"plain_tcp_mb_s": round(p), "peer_bulk_mb_s": round(q), "ratio": round(q / p, 3),
            "paired_ratio": round(paired, 3),
            "plain_rounds": [round(x) for x in plain], "peer_rounds": [round(x) for x in peer],
            "inflight": inflight, "request_bytes": REQUEST}


async def latency(snap: Path, address: tuple[str, int], size: int, background: bool, work: Path,
                  seed: int, rate_mb_s: float = 0.0) -> dict[str, Any]:
    sock = work / f"uffdd-{seed}.sock"
    cfg = parse_config({
        "listen": str(sock),
        "sources": {"default": {"kind": "peer", "address": f"{address[0]}:{address[1]}"}},
        "session": {"fault_around": 0, "prefetch": {"enabled": False}},
    })
    listener = Listener(cfg)
    await listener.start()
    spec = VmmSpec(socket=str(sock), snapshot=str(snap), region_sizes=[size], threads=1, vm_id="bench",
                   seed=seed, timeout=600, start_delay=0.3 if background else 0.0)
    vmm = VmmProcess(spec)
    stop = asyncio.Event()
    moved = 0
    bg: list[asyncio.Task[None]] = []
    try:
        if background:
            src: PeerSource | None = None
            for _ in range(2000):
                sessions = list(listener.sessions.values())
                if sessions:
                    assert isinstance(sessions[0].source, PeerSource)
                    src = sessions[0].source
                    break
                await asyncio.sleep(0.005)
            if src is None:
                raise SystemExit("no session started")
            image = src.size
            scratch = [bytearray(REQUEST) for _ in range(2)]

            async def pump(k: int) -> None:
                nonlocal moved
                off = k * REQUEST
                while not stop.is_set():
                    await src.prefetch(off % (image - REQUEST), memoryview(scratch[k]))
                    moved += REQUEST
                    if rate_mb_s:  # each of the two pumps takes half of the rate
                        await asyncio.sleep(2 * REQUEST / (rate_mb_s * 1e6))
                    off += 2 * REQUEST

            bg = [asyncio.create_task(pump(k)) for k in range(2)]
        t0 = time.perf_counter()
        res: dict[str, Any] = await asyncio.to_thread(vmm.result, 600)
        dt = time.perf_counter() - t0
    finally:
        stop.set()
        for t in bg:
            t.cancel()
        await asyncio.gather(*bg, return_exceptions=True)
        vmm.kill()
        await listener.close()
    if res.get("wrong_pages") != 0 or res.get("returncode") != 0:
        raise SystemExit(f"latency run failed: {res}")
    return {"p50_us": round(float(res["p50_us"]), 1), "p99_us": round(float(res["p99_us"]), 1),
            "faults": res["touched"], "background_mb_s": round(moved / dt / 1e6) if background else 0}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    size, lat_size = parse_size(args.size), parse_size(args.latency_size)
    with tempfile.TemporaryDirectory(prefix="uffdd-bench-peer-", dir=args.workdir) as tmp:
        work = Path(tmp)
        snap = work / "image.mem"
        make_snapshot(snap, max(size, lat_size), seed=5)
        snap.read_bytes()  # in page cache on both paths
        wrapper: tuple[str, ...] = ()
        if args.pin:
            # Source and destination are different hosts in real life: give the server its own CPU.
            cpus = sorted(os.sched_getaffinity(0))
            if len(cpus) < 2:
                raise SystemExit("--pin needs at least 2 CPUs")
            os.sched_setaffinity(0, set(cpus[:-1]))
            wrapper = ("taskset", "-c", str(cpus[-1]))
        serve = ServeProcess(["--image", str(snap), "--listen", "127.0.0.1:0", "--log-level", "info"],
                             work / "serve.log", wrapper=wrapper)
        await asyncio.to_thread(serve.start)
        try:
            b = await bulk(snap, serve.address, size, args.rounds, args.inflight)
            idle = [await latency(snap, serve.address, lat_size, False, work, 100 + r) for r in range(args.lat_rounds)]
            busy = [await latency(snap, serve.address, lat_size, True, work, 200 + r, args.background_rate)
                    for r in range(args.lat_rounds)]
        finally:
            serve.stop()

    def med(rows: list[dict[str, Any]], key: str) -> float:
        return round(statistics.median(float(r[key]) for r in rows), 1)

    lat = {"idle_p50_us": med(idle, "p50_us"), "idle_p99_us": med(idle, "p99_us"),
           "background_p50_us": med(busy, "p50_us"), "background_p99_us": med(busy, "p99_us"),
           "background_mb_s": med(busy, "background_mb_s"), "faults_per_run": idle[0]["faults"]}
    lat["p99_ratio"] = round(lat["background_p99_us"] / lat["idle_p99_us"], 2)
    return {"bulk": b, "latency": lat, "image_bytes": size, "cpus": os.cpu_count(), "pinned": args.pin,
            "nice": os.nice(0)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="256M", help="bytes moved per bulk round (default 256M)")
    ap.add_argument("--rounds", type=int, default=7, help="bulk rounds, alternating plain/peer (default 7)")
    ap.add_argument("--inflight", type=int, default=4, help="bulk READs of 4 MiB in flight (default 4)")
    ap.add_argument("--latency-size", default="32M", help="guest size for the fault-latency runs (default 32M)")
    ap.add_argument("--lat-rounds", type=int, default=3, help="latency runs per condition (default 3)")
    ap.add_argument("--background-rate", type=float, default=0.0,
                    help="cap the background prefetch at this many MB/s (default 0: as fast as it goes)")
    ap.add_argument("--workdir", default="/var/tmp" if os.path.isdir("/var/tmp") else None,
                    help="where the image is written (default /var/tmp: on disk, then in page cache)")
    ap.add_argument("--pin", action="store_true",
                    help="run uffdd serve on the last CPU and everything else on the others (two hosts in one)")
    ap.add_argument("--nice", type=int, default=0,
                    help="run the benchmark (and all it starts) at this nice value, e.g. -10 on a shared box")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a report")
    args = ap.parse_args()
    if args.nice:
        os.nice(args.nice)  # children inherit it: server, plain sender, stand-in VMM
    logs.configure("json", "error")
    summary = uvloop.run(run(args))
    if args.json:
        print(json.dumps(summary))
        return 0
    b, lat = summary["bulk"], summary["latency"]
    print(f"bulk over loopback, {summary['image_bytes'] >> 20} MiB per round, {args.rounds} alternating rounds, "
          f"{summary['cpus']} CPUs")
    print(f"  plain TCP stream (sendfile -> recv_into): {b['plain_tcp_mb_s']:>6} MB/s  {b['plain_rounds']}")
    print(f"  peer bulk connection ({b['inflight']} x 4 MiB READs): {b['peer_bulk_mb_s']:>6} MB/s  {b['peer_rounds']}")
    print(f"  ratio peer / plain: {b['ratio']:.2f} of medians, {b['paired_ratio']:.2f} median of round pairs "
          "(goal >= 0.5)")
    print(f"demand faults over loopback, 1 vCPU, {lat['faults_per_run']} faults per run, median of "
          f"{args.lat_rounds} runs (as the vCPU sees them)")
    print(f"  idle:                    p50 {lat['idle_p50_us']:>7.1f} us   p99 {lat['idle_p99_us']:>7.1f} us")
    print(f"  with background prefetch: p50 {lat['background_p50_us']:>7.1f} us   "
          f"p99 {lat['background_p99_us']:>7.1f} us   ({lat['background_mb_s']:.0f} MB/s of prefetch meanwhile)")
    print(f"  p99 ratio background / idle: {lat['p99_ratio']:.2f} (goal <= 3)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
