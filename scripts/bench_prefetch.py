#!/usr/bin/env python3
"""Background pre-paging and working-set replay, measured against references from the same run.

1. install: a guest with no activity at all, restored from a snapshot file in page cache, is
   fully installed by background pre-paging; the install rate is compared with this machine's
   single-core memcpy bandwidth measured in the same run.
2. replay: a stand-in guest touches a fixed 10% of its memory (same pages, same order); the time
   until its work is done is compared without and with a working-set record of an earlier run.

    ./scripts/bench_prefetch.py [--size 1G] [--ws-size 256M] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
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
from uffdd.service.listener import Listener  # noqa: E402
from uffdd.sources.file import record_path_for  # noqa: E402
from uffdd.testing import VmmProcess, VmmSpec, make_snapshot  # noqa: E402

HUGE = 2 << 20


def memcpy_gbps(size: int = 256 << 20, rounds: int = 5) -> float:
    """Single-core memcpy bandwidth: best of several copies between two resident buffers."""
    src = bytearray(os.urandom(size))
    dst = bytearray(size)
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        memoryview(dst)[:] = src
        best = min(best, time.perf_counter() - t)
    return size / best / 1e9


async def run_session(work: Path, snap: Path, spec_kw: dict[str, Any], session: dict[str, Any]) -> tuple[
        dict[str, Any], dict[str, Any]]:
    """One daemon, one stand-in VMM; returns (vmm result, session stats at the end)."""
    sock = work / "uffdd.sock"
    cfg = parse_config({"listen": str(sock), "sources": {"default": {"kind": "file", "path": str(snap)}},
                        "session": session})
    listener = Listener(cfg)
    await listener.start()
    try:
        spec = VmmSpec(socket=str(sock), snapshot=str(snap), **spec_kw)
        vmm = VmmProcess(spec)
        try:
            res = await asyncio.to_thread(vmm.result, 600)
        finally:
            vmm.kill()
        await listener.wait_sessions()
        return res, listener.ended_totals.as_dict()
    finally:
        await listener.close()


async def bench_install(work: Path, size: int, page_size: int, rounds: int) -> dict[str, Any]:
    snap = work / f"install-{page_size}.mem"
    make_snapshot(snap, size, seed=3, page_size=page_size)
    snap.read_bytes()  # in page cache
    rates = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        res, stats = await run_session(work, snap, {
            "region_sizes": [size], "page_size": page_size, "touch_fraction": 0, "wait_complete": 300,
            "verify": True}, {"fault_around": 0, "prefetch": {"enabled": True}})
        assert res["wrong_pages"] == 0 and res["present_before_touch"] == size // page_size, res
        rates.append(size / stats["complete_s"] / 1e9)
        del t0
    return {"page_size": page_size, "gbps": statistics.median(rates), "rounds": [round(r, 2) for r in rates]}


async def bench_replay(work: Path, size: int, rounds: int) -> dict[str, Any]:
    snap = work / "ws.mem"
    make_snapshot(snap, size, seed=4)
    snap.read_bytes()
    guest = {"region_sizes": [size], "touch_fraction": 0.1, "seed": 5, "threads": 4, "verify_only_touched": True}
    off = {"fault_around": 0, "prefetch": {"enabled": False}}
    await asyncio.to_thread(Path(record_path_for(snap)).unlink, missing_ok=True)
    await run_session(work, snap, guest, {**off, "record": True, "replay": False})
    without, with_ = [], []
    for _ in range(rounds):
        res, _ = await run_session(work, snap, guest, {**off, "replay": False})
        assert res["wrong_pages"] == 0
        without.append(res["elapsed_s"])
        res, stats = await run_session(work, snap, guest, {**off, "replay": True})
        assert res["wrong_pages"] == 0 and stats["pages_replay"] > 0
        with_.append(res["elapsed_s"])
    a, b = statistics.median(without), statistics.median(with_)
    return {"pages_touched": int(size // 4096 * 0.1), "without_s": a, "with_s": b, "speedup": a / b}


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="uffdd-bench-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        out: dict[str, Any] = {"memcpy_gbps": memcpy_gbps()}
        out["install"] = [await bench_install(work, args.size, 4096, args.rounds)]
        if not args.no_huge:
            out["install"].append(await bench_install(work, args.size, HUGE, args.rounds))
        out["memcpy_gbps_after"] = memcpy_gbps()
        out["replay"] = await bench_replay(work, args.ws_size, args.rounds)
        return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=parse_size, default=1 << 30)
    ap.add_argument("--ws-size", type=parse_size, default=256 << 20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-huge", action="store_true", help="skip the 2 MiB-page install run")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    logs.configure("json", "warning")
    out = uvloop.run(main_async(args))
    if args.json:
        print(json.dumps(out))
        return 0
    mc = (out["memcpy_gbps"] + out["memcpy_gbps_after"]) / 2
    print(f"single-core memcpy: {mc:.2f} GB/s (before {out['memcpy_gbps']:.2f}, after {out['memcpy_gbps_after']:.2f})")
    for r in out["install"]:
        kind = "2 MiB hugetlbfs" if r["page_size"] > 4096 else "4 KiB shmem"
        print(f"idle {args.size >> 20} MiB guest, {kind}: installed at {r['gbps']:.2f} GB/s "
              f"(median of {r['rounds']}) = {r['gbps'] / mc:.2f}x memcpy")
    rp = out["replay"]
    print(f"10% working set ({rp['pages_touched']} pages of a {args.ws_size >> 20} MiB guest, 4 threads): "
          f"{rp['without_s'] * 1e3:.1f} ms without record, {rp['with_s'] * 1e3:.1f} ms with = "
          f"{rp['speedup']:.1f}x faster")
    return 0


if __name__ == "__main__":
    sys.exit(main())
