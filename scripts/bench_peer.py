#!/usr/bin/env python3
"""Post-copy over loopback: uffdd against the C floor, the same C guest, alternating rounds.

The floor (scripts/bench/peer_floor.c) is the least work the job allows: a handler that sends
the page offset over TCP and receives the answer straight into the second mapping, and a server
that answers with sendfile(2); no checksums, no authentication, no recovery. uffdd is the real
daemon (``uffdd run``, a ``kind: peer`` source) and the real ``uffdd serve``, each in its own
process. The guest is scripts/bench/guest.c.

1. Demand faults, as the guest's vCPUs see them, at 1 and at 4 vCPUs: every first touch is a
   fault served over the network (one page per fault, no pre-paging, on both). p50, p99 and the
   time per page (elapsed / pages).
2. Installing a whole idle guest (nothing touched, uffdd with its default settings): MB/s of
   guest memory from the handshake until "complete", against the floor's install (CHUNK-byte
   requests, a few in flight, straight into the second mapping) and against a raw TCP stream of
   the same bytes into a fresh memfd.
3. Demand faults while background pre-paging runs: uffdd's p99 with pre-paging on against its
   p99 with pre-paging off (one page per fault, 1 vCPU).

    ./scripts/bench_peer.py [--size 256M] [--fault-size 32M] [--rounds 5] [--secret] [--tls] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BENCH = ROOT / "scripts" / "bench"
FLOOR = BENCH / "build" / "peer_floor"
GUEST = BENCH / "build" / "guest"

from uffdd.cli import parse_size  # noqa: E402
from uffdd.peer.config import make_secret  # noqa: E402
from uffdd.peer.testing import ServeProcess, make_tls_files  # noqa: E402
from uffdd.testing import make_snapshot  # noqa: E402


def wait_path(path: Path, proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{proc.args!r} did not start")
        time.sleep(0.005)


def guest(sock: Path, snap: Path, size: int, threads: int, seed: int, idle: bool = False) -> dict[str, Any]:
    cmd = [str(GUEST), "--socket", str(sock), "--snapshot", str(snap), "--size", str(size), "--threads",
           str(threads), "--seed", str(seed), "--bare"]
    out = subprocess.run([*cmd, "--idle"] if idle else cmd, check=True, capture_output=True, timeout=600).stdout
    res: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    if res["wrong_pages"]:
        raise SystemExit(f"the guest saw {res['wrong_pages']} wrong pages: {res}")
    return res


@contextmanager
def floor_server(snap: Path) -> Iterator[str]:
    proc = subprocess.Popen([str(FLOOR), "serve", "--image", str(snap)], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        yield f"127.0.0.1:{int(proc.stdout.readline())}"
    finally:
        proc.kill()
        proc.wait()


def floor_round(work: Path, server: str, snap: Path, size: int, threads: int, seed: int,
                install: int = 0) -> dict[str, Any]:
    sock = work / f"floor-{seed}.sock"
    cmd = [str(FLOOR), "handle", "--socket", str(sock), "--server", server]
    if install:
        cmd += ["--install", str(install), "--inflight", "4"]
    proc = subprocess.Popen(cmd)
    try:
        wait_path(sock, proc)
        return guest(sock, snap, size, threads, seed, idle=bool(install))
    finally:
        proc.wait(30)


class Daemon:
    """``uffdd run`` with one peer source, in its own process, for the length of the benchmark."""

    def __init__(self, work: Path, name: str, address: str, session: str, source: str) -> None:
        self.sock = work / f"{name}.sock"
        cfg = work / f"{name}.yaml"
        cfg.write_text(f"listen: {self.sock}\nworkers: 1\nlog: {{format: json, level: warning}}\n"
                       f"sources: {{default: {{kind: peer, address: '{address}'{source}}}}}\n"
                       f"session: {{{session}}}\n")
        self.proc = subprocess.Popen([sys.executable, "-m", "uffdd", "run", "-c", str(cfg)],
                                     stderr=open(work / f"{name}.log", "wb"))  # noqa: SIM115
        wait_path(self.sock, self.proc)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def summarize(rows: list[dict[str, Any]], pages: int) -> dict[str, float]:
    return {"p50_us": statistics.median(r["p50_us"] for r in rows),
            "p99_us": statistics.median(r["p99_us"] for r in rows),
            "us_per_page": statistics.median(r["elapsed_s"] for r in rows) / pages * 1e6}


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    size, fsize = parse_size(args.size), parse_size(args.fault_size)
    snap = work / "image.mem"
    make_snapshot(snap, max(size, fsize), seed=5)
    snap.read_bytes()  # in page cache on both sides
    serve_args = ["--image", str(snap), "--listen", "127.0.0.1:0", "--log-level", "info"]
    source = ""
    if args.secret:
        secret = work / "secret"
        secret.write_text(make_secret())
        serve_args += ["--secret-file", str(secret)]
        source += f", secret_file: '{secret}'"
    if args.tls:
        tls = make_tls_files(work)
        serve_args += ["--tls-cert", str(tls.server_cert), "--tls-key", str(tls.server_key), "--listen",
                       "localhost:0"]
        source += f", tls: {{ca: '{tls.ca}'}}"
    serve = ServeProcess(serve_args, work / "serve.log").start()
    out: dict[str, Any] = {}
    try:
        address = f"{serve.address[0]}:{serve.address[1]}"
        one_page = "fault_around: 0, prefetch: {enabled: false}"
        daemons = {"demand": Daemon(work, "demand", address, one_page, source),
                   "background": Daemon(work, "background", address, "fault_around: 0", source),
                   "install": Daemon(work, "install", address, "", source)}
        with floor_server(snap) as floor:
            try:
                out = measure(args, work, snap, size, fsize, floor, daemons)
            finally:
                for d in daemons.values():
                    d.stop()
    finally:
        serve.stop()
    return out


def measure(args: argparse.Namespace, work: Path, snap: Path, size: int, fsize: int, floor: str,
            daemons: dict[str, Daemon]) -> dict[str, Any]:
    rows: dict[str, list[dict[str, Any]]] = {}

    def add(key: str, res: dict[str, Any]) -> None:
        rows.setdefault(key, []).append(res)

    for r in range(args.rounds):
        for vcpus in (1, 4):
            add(f"floor-{vcpus}", floor_round(work, floor, snap, fsize, vcpus, 10 * r + vcpus))
            add(f"uffdd-{vcpus}", guest(daemons["demand"].sock, snap, fsize, vcpus, 10 * r + vcpus))
        add("background", guest(daemons["background"].sock, snap, fsize, 1, 100 + r))
        add("floor-install", floor_round(work, floor, snap, size, 1, 200 + r, install=args.chunk))
        add("uffdd-install", guest(daemons["install"].sock, snap, size, 1, 200 + r, idle=True))
        stream = subprocess.run([str(FLOOR), "stream", "--server", floor, "--size", str(size)], check=True,
                                capture_output=True).stdout
        add("stream", json.loads(stream))
    pages = fsize // 4096
    out: dict[str, Any] = {"pages": pages, "install_bytes": size, "rounds": args.rounds,
                           "secret": args.secret, "tls": args.tls}
    for vcpus in (1, 4):
        f, u = summarize(rows[f"floor-{vcpus}"], pages), summarize(rows[f"uffdd-{vcpus}"], pages)
        out[f"demand_{vcpus}"] = {"floor": f, "uffdd": u, "ratio": {k: u[k] / f[k] for k in f}}
    idle = summarize(rows["uffdd-1"], pages)
    busy = summarize(rows["background"], pages)
    out["background"] = {"idle_p99_us": idle["p99_us"], "background_p99_us": busy["p99_us"],
                         "ratio": busy["p99_us"] / idle["p99_us"]}
    mb = {k: [size / r["elapsed_s"] / 1e6 for r in rows[k]] for k in ("floor-install", "uffdd-install")}
    mb["stream"] = [r["mb_s"] for r in rows["stream"]]
    med = {k: statistics.median(v) for k, v in mb.items()}
    out["install"] = {"mb_s": med, "rounds": {k: [round(x) for x in v] for k, v in mb.items()},
                      "ratio_floor": med["uffdd-install"] / med["floor-install"],
                      "ratio_stream": med["uffdd-install"] / med["stream"]}
    return out


def report(s: dict[str, Any], args: argparse.Namespace) -> None:
    auth = ", shared secret" if s["secret"] else ""
    auth += ", TLS" if s["tls"] else ""
    print(f"post-copy over loopback{auth}: uffdd serve + uffdd run against the C floor, {s['rounds']} alternating "
          "rounds, medians")
    print(f"demand faults, one page per fault, {s['pages']} pages touched in random order")
    for vcpus in (1, 4):
        d = s[f"demand_{vcpus}"]
        label = f"{vcpus} vCPU{'s' if vcpus > 1 else ' '}"
        for who in ("floor", "uffdd"):
            x = d[who]
            print(f"  {label} {who:6s} p50 {x['p50_us']:8.1f} us  p99 {x['p99_us']:8.1f} us"
                  f"  {x['us_per_page']:7.1f} us/page")
        r = d["ratio"]
        print(f"  {label} uffdd / floor: p50 {r['p50_us']:.2f}x  p99 {r['p99_us']:.2f}x"
              f"  time per page {r['us_per_page']:.2f}x")
    b = s["background"]
    print(f"demand faults with background pre-paging (1 vCPU): p99 {b['background_p99_us']:.1f} us against "
          f"{b['idle_p99_us']:.1f} us without: {b['ratio']:.2f}x")
    i = s["install"]
    print(f"installing an idle {s['install_bytes'] >> 20} MiB guest, MB/s of guest memory")
    for k, label in (("stream", "raw TCP stream into a memfd"), ("floor-install", f"C floor ({args.chunk >> 10} KiB "
                     "requests)"), ("uffdd-install", "uffdd, default settings")):
        print(f"  {label:34s} {i['mb_s'][k]:8.0f}  {i['rounds'][k]}")
    print(f"  uffdd / floor: {i['ratio_floor']:.2f}x   uffdd / raw stream: {i['ratio_stream']:.2f}x")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="256M", help="idle guest installed per round (default 256M)")
    ap.add_argument("--fault-size", default="32M", help="guest whose every page faults (default 32M)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--chunk", type=parse_size, default=1 << 20, help="the floor's install request size (1M)")
    ap.add_argument("--secret", action="store_true", help="with a shared secret (authenticated page data)")
    ap.add_argument("--tls", action="store_true", help="over TLS")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    subprocess.run(["make", "-s", "-C", str(BENCH)], check=True)
    with tempfile.TemporaryDirectory(prefix="uffdd-bench-peer-", dir="/var/tmp") as tmp:
        summary = run(args, Path(tmp))
    if args.json:
        print(json.dumps(summary))
    else:
        report(summary, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
