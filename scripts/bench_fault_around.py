#!/usr/bin/env python3
"""Choose the fault-around block: guest time to first-touch every page (random order, 4 vCPU
threads, C guest), for several block sizes, pre-paging off, rounds interleaved.

    ./scripts/bench_fault_around.py [--size 64M] [--rounds 5]
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
BLOCKS = [4096, 16384, 65536, 262144]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=64 << 20)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    subprocess.run(["make", "-s", "-C", str(BENCH)], check=True)
    times: dict[int, list[float]] = {b: [] for b in BLOCKS}
    p99: dict[int, list[float]] = {b: [] for b in BLOCKS}
    with tempfile.TemporaryDirectory(prefix="uffdd-fa-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        snap = work / "snap.mem"
        snap.write_bytes(os.urandom(args.size))
        daemons = {}
        try:
            for b in BLOCKS:
                cfg = work / f"{b}.yaml"
                sock = work / f"{b}.sock"
                cfg.write_text(f"listen: {sock}\nsources: {{default: {{kind: file, path: {snap}}}}}\n"
                               f"log: {{format: json, level: warning}}\nworkers: 1\n"
                               f"session: {{fault_around: {b}, prefetch: {{enabled: false}}}}\n")
                daemons[b] = (subprocess.Popen([sys.executable, "-m", "uffdd", "run", "-c", str(cfg)]), sock)
            for _, sock in daemons.values():
                while not sock.exists():
                    time.sleep(0.01)
            for r in range(args.rounds):
                for b, (_, sock) in daemons.items():
                    out = subprocess.run([str(BENCH / "build" / "guest"), "--socket", str(sock), "--snapshot",
                                          str(snap), "--size", str(args.size), "--threads", "4", "--seed", str(r)],
                                         check=True, capture_output=True, timeout=300).stdout
                    res = json.loads(out.decode().strip().splitlines()[-1])
                    assert res["wrong_pages"] == 0, res
                    times[b].append(res["elapsed_s"])
                    p99[b].append(res["p99_us"])
        finally:
            for proc, _ in daemons.values():
                proc.terminate()
                proc.wait(30)
    base = statistics.median(times[BLOCKS[0]])
    print(f"{args.size >> 20} MiB guest, 4 KiB pages, 4 vCPU threads touching every page in random order, "
          f"{args.rounds} rounds")
    print(f"{'fault_around':>14}{'time ms (median)':>18}{'speed-up':>10}{'first-touch p99 us':>20}")
    for b in BLOCKS:
        t = statistics.median(times[b])
        print(f"{b // 1024:>11} KiB{t * 1e3:>18.1f}{base / t:>10.2f}{statistics.median(p99[b]):>20.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
