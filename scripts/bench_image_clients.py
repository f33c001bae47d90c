#!/usr/bin/env python3
"""Which client fetches chunk objects fastest: obstore against aiohttp and httpx over HTTP
(nginx on loopback), and against aiobotocore over the S3 API (moto's server on loopback).

The objects are the chunks of a packed guest-like image. For each client, in alternating
rounds: the latency of one GET (p50 over one-at-a-time requests) and the throughput of all
objects with 16 requests in flight. The other clients come with the ``bench`` extra:
``pip install -e '.[bench]'``.

    ./scripts/bench_image_clients.py [--size 256M] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from uffdd.cli import parse_size  # noqa: E402
from uffdd.images.format import chunk_key  # noqa: E402
from uffdd.images.pack import PackOptions, load_manifest, pack  # noqa: E402
from uffdd.images.store import ObjectStore  # noqa: E402
from uffdd.testing.guestmem import make_guest_image  # noqa: E402
from uffdd.testing.servers import MotoServer, NginxServer  # noqa: E402

Get = Callable[[str], Awaitable[Any]]
SIZES: dict[str, int] = {}
"""Object sizes, known from the manifest as the image source knows them."""


async def measure(get: Get, keys: list[str], total: int) -> tuple[float, float]:
    """(p50 us of one GET at a time, MB/s with 16 in flight)."""
    await get(keys[0])
    lat = []
    for k in keys[:200]:
        t0 = time.perf_counter()
        await get(k)
        lat.append((time.perf_counter() - t0) * 1e6)
    sem = asyncio.Semaphore(16)

    async def one(k: str) -> int:
        async with sem:
            return len(await get(k))
    t0 = time.perf_counter()
    got = sum(await asyncio.gather(*(one(k) for k in keys)))
    assert got == total, (got, total)
    return statistics.median(lat), total / (time.perf_counter() - t0) / 1e6


async def http_clients(url: str, keys: list[str], total: int, rounds: int) -> dict[str, list[tuple[float, float]]]:
    import aiohttp
    import httpx

    obs = ObjectStore(url)
    out: dict[str, list[tuple[float, float]]] = {"obstore": [], "aiohttp": [], "httpx": []}
    sizes = SIZES
    async with aiohttp.ClientSession(base_url=url) as ah, httpx.AsyncClient(base_url=url) as hx:
        async def ah_get(k: str) -> bytes:
            async with ah.get(f"/{k}") as resp:
                return await resp.read()

        async def hx_get(k: str) -> bytes:
            return (await hx.get(f"/{k}")).content

        async def ob_get(k: str) -> Any:  # as the image source reads a chunk: one range of its known size
            return await obs.get(k, size=sizes[k], limit=sizes[k])
        for _ in range(rounds):
            for name, get in (("obstore", ob_get), ("aiohttp", ah_get), ("httpx", hx_get)):
                out[name].append(await measure(get, keys, total))
    return out


async def s3_clients(server: MotoServer, store: Path, keys: list[str], total: int,
                     rounds: int) -> dict[str, list[tuple[float, float]]]:
    from aiobotocore.session import get_session

    server.create_bucket("uffdd-bench")
    obs = ObjectStore("s3://uffdd-bench/images")
    for k in keys:
        await obs.put(k, (store / k).read_bytes())
    out: dict[str, list[tuple[float, float]]] = {"obstore": [], "aiobotocore": []}
    async with get_session().create_client("s3", endpoint_url=server.endpoint) as s3:
        async def bc_get(k: str) -> bytes:
            resp = await s3.get_object(Bucket="uffdd-bench", Key=f"images/{k}")
            async with resp["Body"] as body:
                data: bytes = await body.read()
                return data

        async def ob_get(k: str) -> Any:
            return await obs.get(k, size=SIZES[k], limit=SIZES[k])
        for _ in range(rounds):
            for name, get in (("obstore", ob_get), ("aiobotocore", bc_get)):
                out[name].append(await measure(get, keys, total))
    return out


def show(title: str, res: dict[str, list[tuple[float, float]]]) -> None:
    print(title)
    for name, runs in res.items():
        p50 = statistics.median(r[0] for r in runs)
        mbs = statistics.median(r[1] for r in runs)
        print(f"  {name:<12} one GET p50 {p50:7.0f} us   16 in flight {mbs:6.0f} MB/s   "
              f"per round {[round(r[1]) for r in runs]}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=parse_size, default=256 << 20)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="uffdd-bench-clients-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        make_guest_image(work / "guest.mem", args.size, seed=1)
        asyncio.run(pack(str(work / "guest.mem"), str(work / "store"), PackOptions(name="guest")))
        manifest, _ = asyncio.run(load_manifest(str(work / "store" / "guest.json")))
        keys = sorted({chunk_key(r.name) for r in manifest.table if r})
        SIZES.update({k: (work / "store" / k).stat().st_size for k in keys})
        total = sum(SIZES.values())
        print(f"{len(keys)} chunk objects, {total / (1 << 20):.1f} MiB, {args.rounds} alternating rounds")
        nginx = NginxServer(work / "store", work / "nginx").start()
        try:
            show("HTTP (nginx on loopback):", uvloop.run(http_clients(nginx.url, keys, total, args.rounds)))
        finally:
            nginx.stop()
        moto = MotoServer(work / "moto").start()
        try:
            os.environ.update(moto.env())
            show("S3 API (moto server on loopback):",
                 uvloop.run(s3_clients(moto, work / "store", keys, total, args.rounds)))
        finally:
            moto.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
