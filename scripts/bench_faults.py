#!/usr/bin/env python3
"""Fault throughput: uffdd against a single-threaded C poll()+pread()+UFFDIO_CONTINUE handler.

Both handlers serve the same C guest (scripts/bench/guest.c: N vCPU threads touching every page
of a shmem memfd once, in random order) from the same snapshot file, which is in page cache.
Rounds alternate between the two so that machine noise hits both alike; the ratio of medians
is the number to quote.

    ./scripts/bench_faults.py [--size 64M] [--threads 4] [--rounds 7]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "scripts" / "bench"


def wait_for(path: Path, proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{proc.args!r} did not start listening on {path}")
        time.sleep(0.01)


def run_guest(sock: Path, snap: Path, size: int, threads: int, seed: int, page_size: int) -> dict[str, float]:
    out = subprocess.run(
        [str(BENCH / "build" / "guest"), "--socket", str(sock), "--snapshot", str(snap), "--size", str(size),
         "--threads", str(threads), "--seed", str(seed), "--page-size", str(page_size)],
        check=True, capture_output=True, timeout=300).stdout
    res: dict[str, float] = json.loads(out.decode().strip().splitlines()[-1])
    if res["wrong_pages"]:
        raise SystemExit(f"guest saw {res['wrong_pages']} wrong pages: {res}")
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="64M")
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--page-size", type=int, default=4096)
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = ap.parse_args()
    size = int(args.size[:-1]) << {"K": 10, "M": 20, "G": 30}[args.size[-1].upper()] \
        if args.size[-1].isalpha() else int(args.size)

    subprocess.run(["make", "-s", "-C", str(BENCH)], check=True)
    with tempfile.TemporaryDirectory(prefix="uffdd-bench-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        snap = work / "snap.mem"
        with open(snap, "wb") as fh:
            fh.write(os.urandom(size))
        snap.read_bytes()  # in page cache, as the workload says
        cfg = work / "uffdd.yaml"
        dsock = work / "uffdd.sock"
        cfg.write_text(f"listen: {dsock}\nsources: {{default: {{kind: file, path: {snap}}}}}\n"
                       "log: {format: json, level: warning}\n"
                       # Same work as the C handler: one page per fault, nothing in the background.
                       "session: {fault_around: 0, prefetch: {enabled: false}}\n")
        daemon = subprocess.Popen([sys.executable, "-m", "uffdd", "run", "-c", str(cfg)])
        results: dict[str, list[dict[str, float]]] = {"c": [], "uffdd": []}
        try:
            wait_for(dsock, daemon)
            for r in range(args.rounds):
                hsock = work / f"c{r}.sock"
                handler = subprocess.Popen([str(BENCH / "build" / "handler"), "--socket", str(hsock),
                                            "--snapshot", str(snap)], stdout=subprocess.DEVNULL)
                try:
                    wait_for(hsock, handler)
                    results["c"].append(run_guest(hsock, snap, size, args.threads, r, args.page_size))
                    handler.wait(30)
                finally:
                    if handler.poll() is None:
                        handler.kill()
                results["uffdd"].append(run_guest(dsock, snap, size, args.threads, r, args.page_size))
        finally:
            daemon.terminate()
            daemon.wait(30)

    med = {k: statistics.median(x["faults_per_s"] for x in v) for k, v in results.items()}
    p99 = {k: statistics.median(x["p99_us"] for x in v) for k, v in results.items()}
    ratio = med["uffdd"] / med["c"]
    summary = {"pages": size // args.page_size, "threads": args.threads, "rounds": args.rounds,
               "c_faults_per_s": round(med["c"]), "uffdd_faults_per_s": round(med["uffdd"]),
               "ratio": round(ratio, 3), "c_p99_us": p99["c"], "uffdd_p99_us": p99["uffdd"],
               "per_round": {k: [round(x["faults_per_s"]) for x in v] for k, v in results.items()}}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"workload: {summary['pages']} pages of {args.page_size} B, {args.threads} faulting threads, "
              f"file source in page cache, {args.rounds} alternating rounds")
        print(f"{'handler':<10}{'faults/s (median)':>20}{'p99 us (median)':>18}   per round")
        for k in ("c", "uffdd"):
            print(f"{k:<10}{med[k]:>20,.0f}{p99[k]:>18.1f}   {summary['per_round'][k]}")  # type: ignore[index]
        print(f"ratio uffdd / C: {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
