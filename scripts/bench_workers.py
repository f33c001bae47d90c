#!/usr/bin/env python3
"""Many guests at once: uffdd with ``workers: 1`` against ``workers: 2`` in the same run.

Throughput: G concurrent C guests (scripts/bench/guest.c, T vCPU threads each, every page
first-touched once in random order) against one daemon. The number is all the guests' pages over
the time from the first guest's first touch to the last guest's last touch (the guests report
both on the system-wide monotonic clock); the wall time from launching the guests until the
last has checked its memory is printed too. Rounds alternate between the two daemons (both
running, the idle one costs nothing) so machine noise hits both alike.

Noisy neighbour: a light guest (1 thread) alone, and while a heavy guest (T threads, a large
guest) faults on the same daemon; the light guest's own p99 fault latency is compared.

Background pre-paging is off, so that every page is served because a guest touched it.
Fault-around is the daemon's default (64 KiB); ``--fault-around 0`` makes every page one fault.
Both daemons run at the niceness the shipped unit file gives the service (``Nice=`` in
configs/uffdd.service); ``--nice 0`` runs them as an unconfigured process would.

    ./scripts/bench_workers.py [--guests 8] [--threads 4] [--size 32M] [--rounds 5] [--fault-around 65536]
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
from typing import Any

from bench_faults import cpu_ns

from uffdd.cli import parse_size
from uffdd.service.control import query

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "scripts" / "bench"
GUEST = BENCH / "build" / "guest"


def start_guest(sock: Path, snap: Path, size: int, threads: int, seed: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen([str(GUEST), "--socket", str(sock), "--snapshot", str(snap), "--size", str(size),
                             "--threads", str(threads), "--seed", str(seed)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen[bytes], timeout: float = 300) -> dict[str, Any]:
    out, err = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"guest failed ({proc.returncode}): {err.decode()[-500:]}")
    res: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    if res["wrong_pages"]:
        raise SystemExit(f"guest saw {res['wrong_pages']} wrong pages: {res}")
    return res


def idle_s() -> float:
    """Idle time of all CPUs so far, in seconds (/proc/stat)."""
    with open("/proc/stat") as fh:
        fields = fh.readline().split()
    return (int(fields[4]) + int(fields[5])) / os.sysconf("SC_CLK_TCK")


def throughput_round(sock: Path, snap: Path, guests: int, size: int, threads: int, seed: int,
                     daemon_pid: int) -> tuple[float, float, float, float]:
    """(all pages / first touch to last touch over all guests, all pages / wall time including
    the guests' start and page check, the daemon's CPUs busy and all CPUs idle on average over
    the wall time)."""
    cpu0, idle0 = cpu_ns(daemon_pid), idle_s()
    t0 = time.monotonic()
    procs = [start_guest(sock, snap, size, threads, seed + i) for i in range(guests)]
    try:
        res = [finish(p) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    wall = time.monotonic() - t0
    daemon_cpus = (cpu_ns(daemon_pid) - cpu0) / 1e9 / wall
    idle_cpus = (idle_s() - idle0) / wall
    pages = sum(r["pages"] for r in res)
    touching = (max(r["last_touch_ns"] for r in res) - min(r["first_touch_ns"] for r in res)) / 1e9
    return pages / touching, pages / wall, daemon_cpus, idle_cpus


def light_p99(sock: Path, snap: Path, size: int, heavy: tuple[int, int] | None, seed: int) -> float:
    """p99 (us) of a 1-thread guest of ``size``, alone or beside a heavy guest (size, threads)."""
    hp = start_guest(sock, snap, heavy[0], heavy[1], seed + 1000) if heavy else None
    try:
        if hp is not None:
            time.sleep(0.3)  # the heavy guest is connected and faulting
        res = finish(start_guest(sock, snap, size, 1, seed))
        if hp is not None and hp.poll() is not None:
            print("warning: the heavy guest ended before the light one; raise --heavy-size", file=sys.stderr)
    finally:
        if hp is not None:
            finish(hp)
    return float(res["p99_us"])


def unit_nice() -> int:
    """The Nice= of configs/uffdd.service (0 if it sets none)."""
    for line in (ROOT / "configs" / "uffdd.service").read_text().splitlines():
        if line.startswith("Nice="):
            return int(line.split("=", 1)[1])
    return 0


def start_daemon(work: Path, snap: Path, workers: int, fault_around: int,
                 nice: int) -> tuple[subprocess.Popen[bytes], Path]:
    sock = work / f"w{workers}.sock"
    cfg = work / f"w{workers}.yaml"
    cfg.write_text(f"listen: {sock}\nsources: {{default: {{kind: file, path: {snap}}}}}\n"
                   f"log: {{format: json, level: warning}}\nworkers: {workers}\n"
                   f"session: {{fault_around: {fault_around}, prefetch: {{enabled: false}}, replay: false}}\n")
    proc = subprocess.Popen([sys.executable, "-m", "uffdd", "run", "-c", str(cfg)],
                            preexec_fn=lambda: os.setpriority(os.PRIO_PROCESS, 0, nice))
    ctl = work / f"w{workers}.ctl"
    deadline = time.monotonic() + 20
    while True:  # the parent answers once its workers have started; give them a moment to listen
        try:
            doc = query(str(ctl), timeout=1)
            if all(w.get("ready", True) for w in doc.get("workers", [])):
                break
        except (OSError, ValueError):
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"uffdd with workers: {workers} did not start")
        time.sleep(0.05)
    return proc, sock


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--guests", type=int, default=8)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--size", default="32M")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--light-size", default="8M")
    ap.add_argument("--heavy-size", default="256M")
    ap.add_argument("--fault-around", type=int, default=65536, help="bytes; 0: one page per fault")
    ap.add_argument("--nice", type=int, default=unit_nice(), help="the daemons' niceness (default: the unit's)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = ap.parse_args()
    size, light, heavy = parse_size(args.size), parse_size(args.light_size), parse_size(args.heavy_size)

    subprocess.run(["make", "-s", "-C", str(BENCH)], check=True)
    with tempfile.TemporaryDirectory(prefix="uffdd-bench-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        snap = work / "snap.mem"
        with open(snap, "wb") as fh:
            fh.write(os.urandom(max(size, light, heavy)))
        snap.read_bytes()  # in page cache
        daemons = {n: start_daemon(work, snap, n, args.fault_around, args.nice) for n in (1, 2)}
        tput: dict[int, list[float]] = {1: [], 2: []}
        walls: dict[int, list[float]] = {1: [], 2: []}
        cpus: dict[int, list[tuple[float, float]]] = {1: [], 2: []}
        p99: dict[str, list[float]] = {f"{k}_w{n}": [] for k in ("alone", "noisy") for n in (1, 2)}
        try:
            for r in range(args.rounds):
                order = (1, 2) if r % 2 == 0 else (2, 1)
                for n in order:
                    rate, wall, busy, idle = throughput_round(daemons[n][1], snap, args.guests, size,
                                                              args.threads, 10 * r, daemons[n][0].pid)
                    tput[n].append(rate)
                    walls[n].append(wall)
                    cpus[n].append((busy, idle))
                for n in order:
                    sock = daemons[n][1]
                    p99[f"alone_w{n}"].append(light_p99(sock, snap, light, None, 7 * r))
                    p99[f"noisy_w{n}"].append(light_p99(sock, snap, light, (heavy, args.threads), 7 * r))
        finally:
            for proc, _ in daemons.values():
                proc.terminate()
            for proc, _ in daemons.values():
                proc.wait(30)

    med = {n: statistics.median(v) for n, v in tput.items()}
    wmed = {n: statistics.median(v) for n, v in walls.items()}
    busy = {n: statistics.median(b for b, _ in v) for n, v in cpus.items()}
    idle = {n: statistics.median(i for _, i in v) for n, v in cpus.items()}
    pmed = {k: statistics.median(v) for k, v in p99.items()}
    summary = {
        "guests": args.guests, "threads": args.threads, "size": size, "rounds": args.rounds, "cpus": os.cpu_count(),
        "fault_around": args.fault_around, "nice": args.nice,
        "pages_per_s_w1": round(med[1]), "pages_per_s_w2": round(med[2]), "speedup": round(med[2] / med[1], 3),
        "per_round": {f"w{n}": [round(x) for x in v] for n, v in tput.items()},
        "wall_pages_per_s_w1": round(wmed[1]), "wall_pages_per_s_w2": round(wmed[2]),
        "speedup_wall": round(wmed[2] / wmed[1], 3),
        "daemon_cpus": {f"w{n}": round(v, 2) for n, v in busy.items()},
        "idle_cpus": {f"w{n}": round(v, 2) for n, v in idle.items()},
        "light_p99_us": pmed, "noisy_ratio_w1": round(pmed["noisy_w1"] / pmed["alone_w1"], 2),
        "noisy_ratio_w2": round(pmed["noisy_w2"] / pmed["alone_w2"], 2),
    }
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"{args.guests} guests x {args.threads} threads x {args.size}, {args.rounds} alternating rounds, "
          f"{os.cpu_count()} CPUs, fault_around {args.fault_around}, daemons at nice {args.nice}")
    for n in (1, 2):
        print(f"workers: {n}  pages/s first touch to last (median) {med[n]:>10,.0f}   "
              f"per round {summary['per_round'][f'w{n}']}")  # type: ignore[index]
    for n in (1, 2):
        print(f"workers: {n}  pages/s over the wall time, with the guests' start and check (median) {wmed[n]:>10,.0f}")
    for n in (1, 2):
        print(f"workers: {n}  CPUs busy in uffdd {busy[n]:.2f}, idle {idle[n]:.2f}, the rest (guests, other) "
              f"{(os.cpu_count() or 1) - busy[n] - idle[n]:.2f}   (median over the wall time)")
    print(f"speedup workers 2 / 1: {med[2] / med[1]:.2f}x (goal >= 1.5x); over the wall time "
          f"{wmed[2] / wmed[1]:.2f}x")
    for n in (1, 2):
        print(f"workers: {n}  light guest p99: alone {pmed[f'alone_w{n}']:.0f} us, beside a heavy guest "
              f"{pmed[f'noisy_w{n}']:.0f} us ({pmed[f'noisy_w{n}'] / pmed[f'alone_w{n}']:.2f}x; goal <= 2x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
