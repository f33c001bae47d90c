#!/usr/bin/env python3
"""Packed images: pack size and speed, install rate and demand-fault latency, each against a
reference measured in the same run (rounds alternate).

1. pack: a guest-like 1 GiB memory file (uffdd.testing.guestmem: zero, duplicated, text-like
   and random pages) packed with the defaults; the size on the store and the speed. Then the
   same guest with 5% of its pages changed, packed as a diff image of the first (--parent).
   ``--chunk-sizes`` repeats the sizes for other chunk sizes (one round each).
2. install: an idle 1 GiB guest (no vCPU touches anything) installed whole by pre-paging from
   the image behind nginx on loopback.
   cold cache: MB/s of image bytes, against a plain parallel download (obstore, the same
   number of requests in flight) of the same chunk objects from the same nginx;
   warm cache: GB/s of guest memory, against the file source installing the raw memory file
   (in page cache).
3. demand: one vCPU touches 1% of a 256 MiB guest's pages in random order, pre-paging off,
   fault-around as shipped (64 KiB). p50 of those touches (each a demand fault) with a warm
   cache against the file source; with a cold cache against one HTTP GET of one chunk plus
   its decompression (the same client, the same chunks, one at a time; no hash check). This
   guest has no zero pages, so every fault needs a chunk.

    ./scripts/bench_image.py [--size 1G] [--rounds 5] [--chunk-size 256K] [--chunk-sizes 64K,1M]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
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
from uffdd.images.format import chunk_key, unseal  # noqa: E402
from uffdd.images.pack import PackOptions, load_manifest, pack  # noqa: E402
from uffdd.images.store import ObjectStore  # noqa: E402
from uffdd.service.listener import Listener  # noqa: E402
from uffdd.testing import VmmProcess, VmmSpec  # noqa: E402
from uffdd.testing.guestmem import GuestMix, change_pages, make_guest_image  # noqa: E402
from uffdd.testing.servers import NginxServer  # noqa: E402

MIB = 1 << 20
CONCURRENCY = 16
"""Requests in flight: the image source's default, and the plain download's."""


def med(xs: list[float]) -> float:
    return statistics.median(xs)


# --- 1. pack ------------------------------------------------------------------------------
def bench_pack(work: Path, mem: Path, changed: Path, chunk: int, rounds: int) -> dict[str, Any]:
    speeds, res = [], None
    for r in range(rounds):
        store = work / f"pack-{chunk}-{r}"
        res = asyncio.run(pack(str(mem), str(store), PackOptions(name="base", chunk_size=chunk)))
        speeds.append(res.size / res.seconds / 1e6)
        if r < rounds - 1:
            shutil.rmtree(store)
    assert res is not None
    diff = asyncio.run(pack(str(changed), str(work / f"pack-{chunk}-{rounds - 1}"),
                            PackOptions(name="changed", parent="base", chunk_size=chunk)))
    return {"chunk": chunk, "size": res.size, "stored": res.written_bytes, "ratio": res.written_bytes / res.size,
            "mb_s": med(speeds), "rounds": [round(s) for s in speeds], "diff_stored": diff.written_bytes,
            "diff_ratio": diff.written_bytes / res.written_bytes, "chunks": res.chunks, "zero": res.zero_chunks,
            "duplicates": res.duplicates, "store": str(work / f"pack-{chunk}-{rounds - 1}")}


# --- a daemon and a stand-in VMM in a fresh event loop -------------------------------------
def restore(work: Path, mem: Path, source: dict[str, Any], session: dict[str, Any], **spec: Any) -> tuple[
        dict[str, Any], dict[str, Any]]:
    """One guest on a fresh daemon (a new event loop: nothing kept in memory from the last)."""
    async def run() -> tuple[dict[str, Any], dict[str, Any]]:
        sock = work / "bench.sock"
        listener = Listener(parse_config({"listen": str(sock), "sources": {"default": source},
                                          "session": session}))
        await listener.start()
        try:
            vmm = VmmProcess(VmmSpec(socket=str(sock), snapshot=str(mem), vm_id="bench", **spec))
            try:
                res = await asyncio.to_thread(vmm.result, 900)
            finally:
                vmm.kill()
            await listener.wait_sessions()
            return res, listener.ended_totals.as_dict()
        finally:
            await listener.close()
    cpu = time.process_time()
    res, stats = uvloop.run(run())
    stats["daemon_cpu_s"] = time.process_time() - cpu  # the daemon runs in this process
    if res.get("wrong_pages") != 0:
        raise SystemExit(f"wrong pages: {res}")
    return res, stats


def image_source(url: str, cache: Path) -> dict[str, Any]:
    return {"kind": "image", "url": url, "cache": {"path": str(cache), "max_bytes": "8GiB"}}


async def plain_download(url: str, keys: list[tuple[str, int]]) -> float:
    """Every chunk object once, CONCURRENCY requests in flight; MB/s."""
    store = ObjectStore(url)
    sem = asyncio.Semaphore(CONCURRENCY)

    async def one(key: str, size: int) -> int:
        async with sem:
            return len(await store.get(key, size=size, limit=size))
    t0 = time.perf_counter()
    total = sum(await asyncio.gather(*(one(k, n) for k, n in keys)))
    return total / (time.perf_counter() - t0) / 1e6


def direct_install(cache_dir: Path, manifest: Any) -> float:
    """GB/s of a warm image written straight into a memory file by two worker threads: each
    cached chunk read, checked and pwrite()n into a memfd, zero chunks fallocate()d. No event
    loop, no bounce buffer, no UFFDIO_CONTINUE: what a source could reach if the core let it
    write guest memory from its own threads (see the README)."""
    from concurrent.futures import ThreadPoolExecutor

    from uffdd.images.cache import ChunkCache

    cache = ChunkCache(str(cache_dir), 1 << 40)
    cache.open()
    memfd = os.memfd_create("bench-direct", os.MFD_CLOEXEC)
    os.ftruncate(memfd, manifest.size)
    cs = manifest.chunk_size

    def one(i: int) -> None:
        ref = manifest.table[i]
        if ref is None:
            os.posix_fallocate(memfd, i * cs, manifest.chunk_len(i))
            return
        plain = cache.read(ref.name, manifest.chunk_len(i))
        assert plain is not None, "the cache is warm"
        os.pwrite(memfd, plain, i * cs)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(one, range(len(manifest.table))))
    rate = manifest.size / (time.perf_counter() - t0) / 1e9
    os.close(memfd)
    cache.close()
    return rate


# --- 2. install ---------------------------------------------------------------------------
def bench_install(work: Path, mem: Path, server: NginxServer, name: str, rounds: int) -> dict[str, Any]:
    manifest, _ = asyncio.run(load_manifest(f"{server.root}/{name}.json"))
    keys = sorted({(chunk_key(r.name), r.stored) for r in manifest.table if r})
    image_bytes = sum(n for _, n in keys)
    size = manifest.size
    idle = {"region_sizes": [size], "touch_fraction": 0, "wait_complete": 600, "threads": 1}
    session = {"prefetch": {"enabled": True}}
    mem.read_bytes()  # the file source's reference reads from page cache
    cold, plain, warm, file, direct = [], [], [], [], []
    cpu: dict[str, list[float]] = {"cold": [], "warm": [], "file": []}
    for r in range(rounds):
        cache = work / f"cache-{r}"
        _, st = restore(work, mem, image_source(f"{server.url}/{name}.json", cache), session, **idle)
        cold.append(image_bytes / st["complete_s"] / 1e6)
        cpu["cold"].append(st["daemon_cpu_s"])
        plain.append(uvloop.run(plain_download(server.url, keys)))
        _, st = restore(work, mem, image_source(f"{server.url}/{name}.json", cache), session, **idle)
        warm.append(size / st["complete_s"] / 1e9)
        cpu["warm"].append(st["daemon_cpu_s"])
        _, st = restore(work, mem, {"kind": "file", "path": str(mem)}, session, **idle)
        file.append(size / st["complete_s"] / 1e9)
        cpu["file"].append(st["daemon_cpu_s"])
        direct.append(direct_install(cache, manifest))
        shutil.rmtree(cache)
    return {"image_bytes": image_bytes, "size": size, "cold_mb_s": cold, "plain_mb_s": plain,
            "warm_gb_s": warm, "file_gb_s": file, "direct_gb_s": direct, "cpu_s": cpu}


# --- 3. demand faults ---------------------------------------------------------------------
async def one_chunk_round_trips(url: str, name: str, n: int) -> list[float]:
    manifest, _ = await load_manifest(f"{url}/{name}.json")
    refs = [(i, r) for i, r in enumerate(manifest.table) if r is not None]
    store = ObjectStore(url)
    out = []
    for i, ref in random.Random(n).sample(refs, min(n, len(refs))):
        t0 = time.perf_counter()
        blob = await store.get(chunk_key(ref.name), size=ref.stored, limit=ref.stored)
        unseal(blob, ref.name, manifest.chunk_len(i))
        out.append((time.perf_counter() - t0) * 1e6)
    return out


def bench_demand(work: Path, mem: Path, server: NginxServer, name: str, rounds: int) -> dict[str, Any]:
    spec = {"region_sizes": [mem.stat().st_size], "threads": 1, "touch_fraction": 0.01, "verify_only_touched": True}
    session = {"prefetch": {"enabled": False}}
    url = f"{server.url}/{name}.json"
    warm_cache = work / "demand-warm"
    restore(work, mem, image_source(url, warm_cache), {"prefetch": {"enabled": True}},
            region_sizes=spec["region_sizes"], touch_fraction=0, wait_complete=600, threads=1)
    mem.read_bytes()
    out: dict[str, list[float]] = {k: [] for k in ("file", "warm", "cold", "reference", "cold_p99", "warm_p99",
                                                   "file_p99")}
    for r in range(rounds):
        res, _ = restore(work, mem, {"kind": "file", "path": str(mem)}, session, seed=r, **spec)
        out["file"].append(res["p50_us"])
        out["file_p99"].append(res["p99_us"])
        res, _ = restore(work, mem, image_source(url, warm_cache), session, seed=r, **spec)
        out["warm"].append(res["p50_us"])
        out["warm_p99"].append(res["p99_us"])
        cold_cache = work / f"demand-cold-{r}"
        res, _ = restore(work, mem, image_source(url, cold_cache), session, seed=r, **spec)
        out["cold"].append(res["p50_us"])
        out["cold_p99"].append(res["p99_us"])
        shutil.rmtree(cold_cache)
        out["reference"].append(med(uvloop.run(one_chunk_round_trips(server.url, name, 300))))
    return out


# --- report -------------------------------------------------------------------------------
def report(args: argparse.Namespace, out: dict[str, Any]) -> None:
    p = out["pack"][0]
    print(f"pack: {p['size'] >> 20} MiB guest-like memory, {p['chunk'] >> 10} KiB chunks, zstd: "
          f"{p['stored'] / MIB:.1f} MiB on the store ({p['ratio']:.1%}; {p['zero']} of {p['chunks']} chunks zero) "
          f"at {p['mb_s']:.0f} MB/s (median of {p['rounds']})")
    for q in out["pack"]:
        print(f"  {q['chunk'] >> 10:>5} KiB chunks: store {q['ratio']:.1%} of the memory; "
              f"5%-changed diff image {q['diff_stored'] / MIB:.1f} MiB = {q['diff_ratio']:.1%} of the base")
    if "install" in out:
        report_install(args, out["install"])
    if "demand" in out:
        report_demand(args, out["demand"])


def report_install(args: argparse.Namespace, i: dict[str, Any]) -> None:
    cold, plain = med(i["cold_mb_s"]), med(i["plain_mb_s"])
    warm, file = med(i["warm_gb_s"]), med(i["file_gb_s"])
    print(f"install, idle {i['size'] >> 20} MiB guest ({i['image_bytes'] / MIB:.1f} MiB of chunks), "
          f"nginx on loopback, {args.rounds} alternating rounds:")
    print(f"  cold cache: {cold:.0f} MB/s of image bytes {_r(i['cold_mb_s'])}; plain parallel download "
          f"{plain:.0f} MB/s {_r(i['plain_mb_s'])}: ratio {cold / plain:.2f} (goal >= 0.7)")
    print(f"  warm cache: {warm:.2f} GB/s of guest memory {_r(i['warm_gb_s'], 2)}; file source {file:.2f} GB/s "
          f"{_r(i['file_gb_s'], 2)}: ratio {warm / file:.2f} (goal >= 0.8)")
    direct = med(i["direct_gb_s"])
    print(f"  warm cache written straight into a memory file by 2 threads (no core): {direct:.2f} GB/s "
          f"{_r(i['direct_gb_s'], 2)} = {direct / file:.2f}x the file source")
    c = i["cpu_s"]
    print(f"  daemon CPU seconds per restore (median; the restore's whole life): cold cache {med(c['cold']):.2f}, "
          f"warm cache {med(c['warm']):.2f}, file source {med(c['file']):.2f}")


def report_demand(args: argparse.Namespace, d: dict[str, Any]) -> None:
    print(f"demand faults, 1 vCPU, 1% of a {args.latency_size >> 20} MiB guest in random order, "
          f"{args.rounds} alternating rounds (p50 us; p99 in brackets):")
    print(f"  warm cache {med(d['warm']):.0f} [{med(d['warm_p99']):.0f}] {_r(d['warm'])}; file source "
          f"{med(d['file']):.0f} [{med(d['file_p99']):.0f}] {_r(d['file'])}: ratio "
          f"{med(d['warm']) / med(d['file']):.2f} (goal <= 1.2)")
    print(f"  cold cache {med(d['cold']):.0f} [{med(d['cold_p99']):.0f}] {_r(d['cold'])}; one GET + decompress "
          f"{med(d['reference']):.0f} {_r(d['reference'])}: ratio {med(d['cold']) / med(d['reference']):.2f} "
          "(goal <= 1.5)")


def _r(xs: list[float], nd: int = 0) -> str:
    return "[" + ", ".join(f"{x:.{nd}f}" for x in xs) + "]"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=parse_size, default=1 << 30)
    ap.add_argument("--latency-size", type=parse_size, default=256 << 20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--chunk-size", type=parse_size, default=256 << 10)
    ap.add_argument("--chunk-sizes", default="", help="more chunk sizes for the pack sizes, e.g. 64K,1M")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: install, demand (pack: one "
                    "round only)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    logs.configure("json", "error")
    if not NginxServer.available():
        raise SystemExit("nginx is not installed (apt-get install nginx-light)")
    with tempfile.TemporaryDirectory(prefix="uffdd-bench-image-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        mem, changed = work / "guest.mem", work / "changed.mem"
        make_guest_image(mem, args.size, seed=1)
        change_pages(mem, changed, 0.05, seed=2)
        skip = set(args.skip.split(","))
        pack_rounds = 1 if "pack" in skip else args.rounds
        out: dict[str, Any] = {"pack": [bench_pack(work, mem, changed, args.chunk_size, pack_rounds)]}
        for extra in filter(None, args.chunk_sizes.split(",")):
            out["pack"].append(bench_pack(work, mem, changed, parse_size(extra), 1))
        server = NginxServer(out["pack"][0]["store"], work / "nginx").start()
        try:
            if "install" not in skip:
                out["install"] = bench_install(work, mem, server, "base", args.rounds)
            if "demand" not in skip:
                lat = work / "latency.mem"
                make_guest_image(lat, args.latency_size, seed=3,
                                 mix=GuestMix(zero=0, duplicate=0.15, text=0.55, random=0.30))
                asyncio.run(pack(str(lat), out["pack"][0]["store"],
                                 PackOptions(name="latency", chunk_size=args.chunk_size)))
                out["demand"] = bench_demand(work, lat, server, "latency", args.rounds)
        finally:
            server.stop()
    if args.json:
        print(json.dumps(out))
    else:
        report(args, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
