#!/usr/bin/env python3
"""Fault throughput: uffdd against a single-threaded C poll()+pread()+UFFDIO_CONTINUE handler.

Both handlers serve the same C guest (scripts/bench/guest.c: N vCPU threads touching every page
of a shmem memfd once, in random order) from the same snapshot file, which is in page cache.
Rounds alternate between the handlers so that machine noise hits all alike; the ratio of
medians is the number to quote. With --fault-around BYTES (the daemon's default is 64K) both
the C handler and uffdd fill that aligned block around each fault, with one read and one
UFFDIO_CONTINUE; without it, one page per fault.

    ./scripts/bench_faults.py [--size 64M] [--threads 4] [--rounds 7] [--fault-around 64K]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from uffdd.cli import parse_size

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "scripts" / "bench"


def wait_for(path: Path, proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{proc.args!r} did not start listening on {path}")
        time.sleep(0.01)


UFFDD = {"uffdd": True, "uffdd-python": False}
"""The daemon as shipped, and with its C fast path switched off (session.native: false)."""


def start_daemon(work: Path, snap: Path, name: str, native: bool,
                 fault_around: int) -> tuple[subprocess.Popen[bytes], Path]:
    cfg = work / f"{name}.yaml"
    sock = work / f"{name}.sock"
    cfg.write_text(f"listen: {sock}\nsources: {{default: {{kind: file, path: {snap}}}}}\n"
                   "log: {format: json, level: warning}\nworkers: 1\n"
                   # Same work as the C handler: the same block per fault, nothing in the background.
                   f"session: {{fault_around: {fault_around}, prefetch: {{enabled: false}}, "
                   f"native: {str(native).lower()}}}\n")
    return subprocess.Popen([sys.executable, "-m", "uffdd", "run", "-c", str(cfg)]), sock


def cpu_ns(pid: int) -> int:
    """CPU time used so far by a process, its threads and its child processes (a daemon's
    workers), in ns: the first field of each thread's schedstat."""
    total = 0
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/schedstat") as fh:
                total += int(fh.read().split()[0])
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/children") as fh:
                total += sum(cpu_ns(int(c)) for c in fh.read().split())
    return total


def run_guest(sock: Path, snap: Path, size: int, threads: int, seed: int, page_size: int,
              handler_pid: int) -> dict[str, float]:
    """One guest run; adds the handler's CPU time per fault (us) as "cpu_us_per_fault"."""
    before = cpu_ns(handler_pid)
    out = subprocess.run(
        [str(BENCH / "build" / "guest"), "--socket", str(sock), "--snapshot", str(snap), "--size", str(size),
         "--threads", str(threads), "--seed", str(seed), "--page-size", str(page_size)],
        check=True, capture_output=True, timeout=300).stdout
    res: dict[str, float] = json.loads(out.decode().strip().splitlines()[-1])
    res["cpu_us_per_fault"] = (cpu_ns(handler_pid) - before) / res["pages"] / 1000
    if res["wrong_pages"]:
        raise SystemExit(f"guest saw {res['wrong_pages']} wrong pages: {res}")
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="64M")
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--page-size", type=int, default=4096)
    ap.add_argument("--fault-around", type=parse_size, default=0,
                    help="bytes filled around each fault by both handlers (0: one page)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = ap.parse_args()
    size = parse_size(args.size)

    subprocess.run(["make", "-s", "-C", str(BENCH)], check=True)
    with tempfile.TemporaryDirectory(prefix="uffdd-bench-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        snap = work / "snap.mem"
        with open(snap, "wb") as fh:
            fh.write(os.urandom(size))
        snap.read_bytes()  # in page cache, as the workload says
        daemons = {name: start_daemon(work, snap, name, native, args.fault_around) for name, native in UFFDD.items()}
        results: dict[str, list[dict[str, float]]] = {"c": [], **{name: [] for name in UFFDD}}
        try:
            for proc, sock in daemons.values():
                wait_for(sock, proc)
            for r in range(args.rounds):
                hsock = work / f"c{r}.sock"
                handler = subprocess.Popen([str(BENCH / "build" / "handler"), "--socket", str(hsock),
                                            "--snapshot", str(snap), "--fault-around", str(args.fault_around)],
                                           stdout=subprocess.DEVNULL)
                try:
                    wait_for(hsock, handler)
                    results["c"].append(run_guest(hsock, snap, size, args.threads, r, args.page_size, handler.pid))
                    handler.wait(30)
                finally:
                    if handler.poll() is None:
                        handler.kill()
                for name, (proc, sock) in daemons.items():
                    results[name].append(run_guest(sock, snap, size, args.threads, r, args.page_size, proc.pid))
        finally:
            for proc, _ in daemons.values():
                proc.terminate()
            for proc, _ in daemons.values():
                proc.wait(30)

    med = {k: statistics.median(x["faults_per_s"] for x in v) for k, v in results.items()}
    p99 = {k: statistics.median(x["p99_us"] for x in v) for k, v in results.items()}
    cpu = {k: statistics.median(x["cpu_us_per_fault"] for x in v) for k, v in results.items()}
    ratio = med["uffdd"] / med["c"]
    summary = {"pages": size // args.page_size, "fault_around": args.fault_around, "threads": args.threads,
               "rounds": args.rounds,
               "c_faults_per_s": round(med["c"]), "uffdd_faults_per_s": round(med["uffdd"]),
               "uffdd_python_faults_per_s": round(med["uffdd-python"]),
               "ratio": round(ratio, 3), "ratio_python_path": round(med["uffdd-python"] / med["c"], 3),
               "cpu_us_per_fault": {k: round(v, 2) for k, v in cpu.items()},
               "c_p99_us": p99["c"], "uffdd_p99_us": p99["uffdd"], "uffdd_python_p99_us": p99["uffdd-python"],
               "per_round": {k: [round(x["faults_per_s"]) for x in v] for k, v in results.items()}}
    if args.json:
        print(json.dumps(summary))
    else:
        block = (f"{args.fault_around >> 10} KiB fault-around" if args.fault_around > args.page_size
                 else "one page per fault")
        print(f"workload: {summary['pages']} pages of {args.page_size} B, {args.threads} faulting threads, "
              f"file source in page cache, {block}, {args.rounds} alternating rounds")
        print(f"{'handler':<14}{'faults/s (median)':>20}{'p99 us (median)':>18}{'handler CPU us/fault':>22}"
              "   per round")
        for k in results:
            print(f"{k:<14}{med[k]:>20,.0f}{p99[k]:>18.1f}{cpu[k]:>22.2f}"
                  f"   {summary['per_round'][k]}")  # type: ignore[index]
        print(f"ratio uffdd / C: {ratio:.3f}   (with the C fast path off, uffdd-python / C: "
              f"{med['uffdd-python'] / med['c']:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
