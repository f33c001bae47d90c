"""A stand-in VMM: guest memory in a memfd, a userfaultfd, the handshake, faulting vCPU threads.

Runs as its own process (``python -m uffdd.testing.vmm SPEC_JSON``) because a thread that
faults while holding the GIL would deadlock a handler in the same process. vCPU threads touch
memory through ``ctypes.memmove``, which releases the GIL while the thread waits in the kernel.
Prints one JSON result line on stdout.
"""

from __future__ import annotations

import array
import ctypes
import faulthandler
import json
import mmap
import os
import random
import signal
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from uffdd.kernel import Userfaultfd, abi

VERIFY_CHUNK = 1 << 20


@dataclass
class VmmSpec:
    """What the stand-in VMM does; every field has a JSON-friendly type."""

    socket: str
    snapshot: str
    region_sizes: list[int]
    page_size: int = 4096
    threads: int = 4
    vm_id: str = "demo"
    source: str = "default"
    preregister: bool = False
    """Do UFFDIO_API and REGISTER in the VMM (as Firecracker does) instead of a bare uffd."""
    prepopulate: float = 0.0
    """Fraction of pages written with garbage before the handshake (already in page cache)."""
    region_gap: int = 0
    """Bytes of memory file left unused between regions (offsets are then not contiguous)."""
    same_pages: bool = False
    """All threads touch the same pages in the same order (many vCPUs on one page)."""
    touch_fraction: float = 1.0
    seed: int = 1
    list_form: bool = False
    """Send Firecracker's bare JSON list instead of the object form."""
    split_body: int = 0
    body_padding: int = 0
    """Spaces sent before the JSON (legal whitespace): a long but valid handshake."""
    """Send the body in this many pieces with pauses (a stream socket may deliver it so)."""
    disconnect_after: int = -1
    """Pages touched (by thread 0) before the VMM drops the connection and exits at once."""
    unmap_after_disconnect: bool = False
    """With ``disconnect_after``: keep the userfaultfd, wait until the daemon has closed its end
    of the connection, then unmap the guest's memory (timed: "unmap_s") before exiting."""
    verify: bool = True
    verify_only_touched: bool = False
    """Check only the pages the vCPUs touched (reading the rest would fault them in)."""
    start_delay: float = 0.0
    """Seconds to wait after the daemon's ready line before the vCPUs start."""
    anonymous: bool = False
    """Private anonymous guest memory (MAP_HUGETLB for 2 MiB pages), handed over as [uffd] alone:
    Firecracker's snapshot-restore set-up. Offsets are cumulative into the snapshot."""
    firecracker: bool = False
    """Send the body exactly as Firecracker serializes it: a compact JSON list whose regions
    carry base_host_virt_addr, size, offset, page_size and the deprecated page_size_kib."""
    preregister_features: int = -1
    """Features for UFFDIO_API when ``preregister`` (-1: the minimal ones for the memory type)."""
    dontneed: list[list[int]] = field(default_factory=list)
    """[first page, pages] ranges discarded with MADV_DONTNEED after the workload and read again
    (anonymous memory then reads zeros; shared memory keeps its page cache)."""
    remove_burst: int = 0
    """A balloon thread discards this many random single pages with MADV_DONTNEED while the vCPUs
    fault; those pages must read zeros afterwards (anonymous memory only)."""
    unmap_pages: list[int] = field(default_factory=list)
    """[first page, pages] of region 0 unmapped with munmap while the vCPUs fault elsewhere."""
    remap_region: int = -1
    """Move this region with mremap to a new address before the workload (the daemon follows)."""
    final_touch: int = -1
    """After printing the result, touch this page (of all pages) last: a poisoned page kills the
    process with SIGBUS, which the caller checks."""
    wait_complete: float = 0.0
    """If > 0: after the workload, wait up to this many seconds for the daemon's "complete"
    event; then count pages already present (via /proc/self/pagemap, before touching them)
    and check that the ranges were unregistered."""
    timeout: int = 120
    extra_fds: list[int] = field(default_factory=list)
    listen_only: float = 0.0
    """If > 0: after "ready", close this VMM's copy of the userfaultfd, touch no page and report
    the lines the daemon sends within this many seconds (until a "failed" line or hang-up)."""
    shrink_after: float = -1.0
    """If >= 0: a hostile VMM. This many seconds after "ready" it truncates its memory file to
    nothing while the daemon is filling it, then listens as with ``listen_only`` (30 s)."""
    connect_as: list[int] = field(default_factory=list)
    """[uid, gid]: become that user (no supplementary groups) after creating the memory and the
    userfaultfd, just before connecting: the daemon sees those ids in SO_PEERCRED."""
    wait_ready: bool = True
    """Wait for the daemon's answer before the vCPUs start. Firecracker does not: with False (and
    ``preregister``) they fault at once, and the answer is read after the workload."""
    connected_fd: int = -1
    """An inherited pipe that gets one byte right after connect(): a test times a kill from it."""


def _addr(mm: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(mm))


def _answer(lines: Any) -> dict[str, Any]:
    """The daemon's first line on the VMM socket."""
    reply = lines.readline()
    return json.loads(reply) if reply else {"error": "daemon closed the connection"}


def _quantile(sorted_ns: list[int], q: float) -> float:
    if not sorted_ns:
        return 0.0
    return sorted_ns[min(len(sorted_ns) - 1, int(q * len(sorted_ns)))] / 1000.0


class _StandIn:
    """One run of the stand-in VMM, step by step: memory, userfaultfd, handshake, vCPUs, checks."""

    def __init__(self, spec: VmmSpec) -> None:
        self.spec = spec
        self.ps = spec.page_size
        self.rng = random.Random(spec.seed)
        self.offsets: list[int] = []
        off = 0
        for size in spec.region_sizes:
            self.offsets.append(off)
            off += size + spec.region_gap
        self.memfd = -1 if spec.anonymous else os.memfd_create(
            "uffdd-guest", os.MFD_CLOEXEC | (os.MFD_HUGETLB if self.ps > mmap.PAGESIZE else 0))
        if not spec.anonymous:
            os.ftruncate(self.memfd, off)
        self.prepopulated = self._prepopulate(off)
        self.maps = self._map()
        self.bases = [_addr(m) for m in self.maps]

    def _prepopulate(self, total: int) -> int:
        """Pages already in the page cache, with bytes the guest must never see."""
        spec, ps = self.spec, self.ps
        if spec.prepopulate <= 0 or spec.anonymous:
            return 0
        done = 0
        garbage = bytes([0xAB]) * ps
        # Through a throwaway mapping: hugetlbfs has no write(2).
        with mmap.mmap(self.memfd, total, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as whole:
            for roff, size in zip(self.offsets, spec.region_sizes, strict=False):
                for p in range(size // ps):
                    if self.rng.random() < spec.prepopulate:
                        whole[roff + p * ps : roff + (p + 1) * ps] = garbage
                        done += 1
        return done

    def _map(self) -> list[mmap.mmap]:
        spec = self.spec
        if spec.anonymous:
            flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | (_MAP_HUGETLB if self.ps > mmap.PAGESIZE else 0)
            return [mmap.mmap(-1, size, flags, mmap.PROT_READ | mmap.PROT_WRITE) for size in spec.region_sizes]
        return [mmap.mmap(self.memfd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=roff)
                for roff, size in zip(self.offsets, spec.region_sizes, strict=False)]

    def userfaultfd(self) -> Userfaultfd:
        """A bare userfaultfd, or one set up as Firecracker sets it up (``preregister``)."""
        spec = self.spec
        uffd = Userfaultfd.open()
        if spec.preregister:
            feats = spec.preregister_features
            if feats < 0:
                feats = 0 if spec.anonymous else (
                    abi.FEATURE_MINOR_HUGETLBFS if self.ps > mmap.PAGESIZE else abi.FEATURE_MINOR_SHMEM)
            uffd.api(feats)
            mode = abi.REGISTER_MODE_MISSING | (0 if spec.anonymous else abi.REGISTER_MODE_MINOR)
            for base, size in zip(self.bases, spec.region_sizes, strict=False):
                uffd.register(base, size, mode)
        return uffd

    def body(self) -> bytes:
        return b" " * self.spec.body_padding + self._json()

    def _json(self) -> bytes:
        spec, ps = self.spec, self.ps
        if spec.firecracker:
            return json.dumps([{"base_host_virt_addr": b, "size": s, "offset": o, "page_size": ps, "page_size_kib": ps}
                               for b, s, o in zip(self.bases, spec.region_sizes, self.offsets, strict=True)],
                              separators=(",", ":")).encode()
        regions = [{"base_host_virt_addr": b, "size": s, "offset": o, "page_size": ps}
                   for b, s, o in zip(self.bases, spec.region_sizes, self.offsets, strict=False)]
        doc: object = regions if spec.list_form else {"vm_id": spec.vm_id, "source": spec.source, "regions": regions}
        return json.dumps(doc).encode()

    def handshake(self, uffd: Userfaultfd) -> tuple[socket.socket, Any, dict[str, Any] | None]:
        """Connect, send the body (in pieces if asked) with the fds, read the daemon's answer
        (None: not waited for)."""
        spec = self.spec
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if spec.connect_as:
            os.setgroups([])
            os.setgid(spec.connect_as[1])
            os.setuid(spec.connect_as[0])
        sock.connect(spec.socket)
        if spec.connected_fd >= 0:
            os.write(spec.connected_fd, b"c")
            os.close(spec.connected_fd)
        fds = array.array("i", [uffd.fileno(), *([] if spec.anonymous else [self.memfd]), *spec.extra_fds])
        body = self.body()
        step = -(-len(body) // max(1, spec.split_body))
        chunks = [body[i : i + step] for i in range(0, len(body), step)]
        sock.sendmsg([chunks[0]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds.tobytes())])
        for chunk in chunks[1:]:
            time.sleep(0.05)
            sock.sendall(chunk)
        lines = sock.makefile("rb")
        return sock, lines, _answer(lines) if spec.wait_ready else None


class _Workload:
    """The vCPU threads (and the balloon / unmap threads) and what they touched."""

    def __init__(self, vm: _StandIn, sock: socket.socket) -> None:
        spec, ps = vm.spec, vm.ps
        self.spec, self.sock = spec, sock
        self.pages = [(vm.bases[i] + p * ps, vm.offsets[i] + p * ps)
                      for i, size in enumerate(spec.region_sizes) for p in range(size // ps)]
        self.ranges = list(zip(vm.bases, spec.region_sizes, strict=True))
        self.unmapped: set[int] = set()
        if spec.unmap_pages:
            first, count = spec.unmap_pages
            self.unmapped = set(range(first, first + count))
        self.skipped = self.unmapped | ({spec.final_touch} if spec.final_touch >= 0 else set())
        order = [i for i in range(len(self.pages)) if i not in self.skipped]
        vm.rng.shuffle(order)
        keep = int(len(order) * spec.touch_fraction)
        self.order = order[: max(keep, 1 if spec.touch_fraction > 0 else 0)]
        self.shares = ([self.order] * spec.threads if spec.same_pages
                       else [self.order[t :: spec.threads] for t in range(spec.threads)])
        self.latencies: list[array.array[int]] = [array.array("q") for _ in range(spec.threads)]
        self.tids: list[int] = []
        self.zero_pages: set[int] = set()
        self.side = self._side_threads(vm)

    def _side_threads(self, vm: _StandIn) -> list[threading.Thread]:
        spec, pages, side = self.spec, self.pages, []
        if spec.remove_burst:
            victims = vm.rng.sample([i for i in range(len(pages)) if i not in self.skipped], spec.remove_burst)
            self.zero_pages.update(victims)

            def balloon() -> None:
                for i in victims:
                    _madvise(pages[i][0], vm.ps, _MADV_DONTNEED)

            side.append(threading.Thread(target=balloon, name="balloon"))
        if self.unmapped:
            first = min(self.unmapped)
            side.append(threading.Thread(target=_munmap, args=(pages[first][0], len(self.unmapped) * vm.ps),
                                         name="unmap"))
        return side

    def vcpu(self, t: int) -> None:
        self.tids.append(threading.get_native_id())
        lat, buf = self.latencies[t], ctypes.create_string_buffer(8)
        memmove, perf = ctypes.memmove, time.perf_counter_ns
        for n, i in enumerate(self.shares[t]):
            if t == 0 and n == self.spec.disconnect_after:
                # A VMM that goes away mid-run: report, drop the connection, exit at once.
                extra = self._unmap_after_hangup() if self.spec.unmap_after_disconnect else {}
                print(json.dumps({"ok": True, "disconnected_after": n} | extra), flush=True)
                self.sock.close()
                os._exit(0)
            t0 = perf()
            memmove(buf, self.pages[i][0], 8)  # the first touch of the page: a fault the daemon resolves
            lat.append(perf() - t0)

    def _unmap_after_hangup(self) -> dict[str, object]:
        """Hang up, wait for the daemon to close its end, then unmap guest memory (timed)."""
        self.sock.shutdown(socket.SHUT_WR)
        while self.sock.recv(4096):
            pass
        t0 = time.monotonic()
        for base, size in self.ranges:
            _munmap(base, size)
        return {"unmap_s": time.monotonic() - t0}

    def run(self) -> float:
        threads = [threading.Thread(target=self.vcpu, args=(t,), name=f"vcpu{t}") for t in range(self.spec.threads)]
        threads += self.side
        start = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        return time.perf_counter() - start


def run(spec: VmmSpec) -> dict[str, object]:
    vm = _StandIn(spec)
    uffd = vm.userfaultfd()
    sock, lines, answer = vm.handshake(uffd)
    if answer is not None and "error" in answer:
        return {"ok": False, "error": answer["error"], "stage": "handshake"}
    if spec.shrink_after >= 0 or spec.listen_only > 0:
        uffd.close()  # handed over: the daemon's copy is the only one
        return _listen(spec, vm, lines, sock)
    time.sleep(spec.start_delay)
    if spec.remap_region >= 0:
        i = spec.remap_region
        vm.bases[i] = _move(vm.bases[i], spec.region_sizes[i], vm.ps)
    work = _Workload(vm, sock)
    elapsed = work.run()
    if answer is None:  # not waited for: it came while the vCPUs' faults were served
        answer = _answer(lines)
    touched = set(work.order)
    for first, count in spec.dontneed:
        _madvise(work.pages[first][0], count * vm.ps, _MADV_DONTNEED)
        # Anonymous memory reads zeros again. Shared memory keeps what its page cache holds:
        # the snapshot's bytes where the guest had the page, zeros (never the source's bytes,
        # which it never asked for) where it had not.
        work.zero_pages.update(i for i in range(first, first + count) if spec.anonymous or i not in touched)
    extra = _await_completion(spec, lines, sock, vm.bases) if spec.wait_complete > 0 else {}
    wrong: list[int] = []
    which: list[int] = []
    if spec.verify:
        which = work.order if spec.verify_only_touched else [i for i in range(len(work.pages))
                                                              if i not in work.skipped]
        wrong = _verify(spec.snapshot, work.pages, sorted(which), work.zero_pages, vm.ps)
    sock.close()
    result = _report(spec, vm, work, elapsed, wrong, len(which), answer) | extra
    if 0 <= spec.final_touch < len(work.pages):
        # Report first: touching a poisoned page ends the process with SIGBUS, as it would a guest.
        print(json.dumps(result), flush=True)
        ctypes.string_at(work.pages[spec.final_touch][0], 8)
    return result


def _listen(spec: VmmSpec, vm: _StandIn, lines: Any, sock: socket.socket) -> dict[str, object]:
    """The daemon's lines until it hangs up or says "failed" (``shrink_after``: truncate first)."""
    if spec.shrink_after >= 0:
        time.sleep(spec.shrink_after)
        os.ftruncate(vm.memfd, 0)
    events: list[dict[str, object]] = []
    deadline = time.monotonic() + (spec.listen_only or 30)
    while time.monotonic() < deadline and not any(e.get("event") == "failed" for e in events) and (
            more := _next_line(lines, sock, deadline - time.monotonic())):
        events += more
    sock.close()
    return {"ok": True, "shrunk": spec.shrink_after >= 0, "events": events}


def _report(spec: VmmSpec, vm: _StandIn, work: _Workload, elapsed: float, wrong: list[int], checked: int,
            answer: dict[str, Any]) -> dict[str, object]:
    all_ns = sorted(x for lat in work.latencies for x in lat)
    final = {"final_addr": work.pages[spec.final_touch][0]} if 0 <= spec.final_touch < len(work.pages) else {}
    return {
        "ok": not wrong, "pages": len(work.pages), "touched": len(work.order), "threads": spec.threads,
        "prepopulated": vm.prepopulated, "elapsed_s": elapsed,
        "faults_per_s": len(all_ns) / elapsed if elapsed > 0 else 0.0,
        "p50_us": _quantile(all_ns, 0.5), "p99_us": _quantile(all_ns, 0.99),
        "max_us": all_ns[-1] / 1000.0 if all_ns else 0.0,
        "pages_checked": checked, "verify_only_touched": spec.verify_only_touched,
        "wrong_pages": len(wrong), "wrong_sample": wrong[:16], "session": answer.get("session"),
        "zero_pages": len(work.zero_pages), "vcpu_tids": work.tids, **final, "unmapped": len(work.unmapped),
    }


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.mremap.restype = ctypes.c_void_p
_libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_HUGETLB = 0x40000
_MAP_FIXED_NOREPLACE = 0x100000
_MADV_DONTNEED = 4
_MREMAP_MAYMOVE, _MREMAP_FIXED = 1, 2


def _madvise(addr: int, length: int, advice: int) -> None:
    if _libc.madvise(addr, length, advice) != 0:
        raise OSError(ctypes.get_errno(), f"madvise({addr:#x}, {length}, {advice})")


def _munmap(addr: int, length: int) -> None:
    if _libc.munmap(addr, length) != 0:
        raise OSError(ctypes.get_errno(), "munmap")


def _move(addr: int, length: int, ps: int) -> int:
    """mremap a region to a fresh address (the daemon learns it from a REMAP event)."""
    spot = _libc.mmap(None, length + ps, 0, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    target = (spot + ps - 1) // ps * ps
    new = _libc.mremap(addr, length, length, _MREMAP_MAYMOVE | _MREMAP_FIXED, target)
    if new in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), "mremap")
    # Python's mmap object still owns the old address and unmaps it at exit: park an inert
    # mapping there so that nothing else can land in it first.
    _libc.mmap(addr, length, 0, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_FIXED_NOREPLACE, -1, 0)
    return int(new)


def _verify(snapshot: str, pages: list[tuple[int, int]], which: list[int], zero_pages: set[int], ps: int) -> list[int]:
    """Compare guest pages with the snapshot (or zeros where the guest discarded them);
    reads through addresses, which follow a remapped region."""
    wrong: list[int] = []
    zero = bytes(ps)
    with open(snapshot, "rb") as fh, mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ) as snap:
        k = 0
        while k < len(which):
            # Batch pages that are contiguous in both the guest and the snapshot.
            j = k + 1
            while (j < len(which) and j - k < VERIFY_CHUNK // ps and which[j] == which[j - 1] + 1
                   and pages[which[j]][0] == pages[which[j - 1]][0] + ps
                   and pages[which[j]][1] == pages[which[j - 1]][1] + ps
                   and which[j] not in zero_pages and which[k] not in zero_pages):
                j += 1
            a, foff = pages[which[k]]
            n = (j - k) * ps
            got = ctypes.string_at(a, n)
            want = zero if which[k] in zero_pages else snap[foff : foff + n]
            if got != want:
                for m in range(k, j):
                    a2, f2 = pages[which[m]]
                    w2 = zero if which[m] in zero_pages else snap[f2 : f2 + ps]
                    if ctypes.string_at(a2, ps) != w2:
                        wrong.append(f2 // ps)
            k = j
    return wrong


def _pages_present(base: int, size: int, ps: int) -> int:
    """Pages of [base, base+size) mapped in this process, without touching them."""
    present = 0
    with open("/proc/self/pagemap", "rb") as pm:
        for a in range(base, base + size, ps):
            pm.seek((a // mmap.PAGESIZE) * 8)
            present += bool(int.from_bytes(pm.read(8), "little") >> 63)
    return present


def _next_line(lines: Any, sock: socket.socket, timeout: float) -> list[dict[str, object]]:
    """The daemon's next line on the VMM socket, if one comes within ``timeout``."""
    sock.settimeout(timeout)
    try:
        line = lines.readline()
        return [json.loads(line)] if line else []
    except (TimeoutError, OSError):
        return []
    finally:
        sock.settimeout(None)


def _await_completion(spec: VmmSpec, lines: Any, sock: socket.socket, bases: list[int]) -> dict[str, object]:
    events = _next_line(lines, sock, spec.wait_complete)
    present = sum(_pages_present(b, s, spec.page_size) for b, s in zip(bases, spec.region_sizes, strict=True))
    # Registering the ranges on a fresh userfaultfd only works once uffdd has unregistered them.
    unregistered = True
    with Userfaultfd.open() as probe:
        probe.api(abi.FEATURE_MINOR_HUGETLBFS if spec.page_size > mmap.PAGESIZE else abi.FEATURE_MINOR_SHMEM)
        for b, s in zip(bases, spec.region_sizes, strict=True):
            try:
                probe.register(b, s, abi.REGISTER_MODE_MINOR)
                probe.unregister(b, s)
            except OSError:
                unregistered = False
    # Hang up and read what the daemon still says until it closes its end: any further line
    # would be a second "complete".
    sock.shutdown(socket.SHUT_WR)
    while more := _next_line(lines, sock, 10):
        events += more
    return {"events": events, "present_before_touch": present, "unregistered": unregistered}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    spec = VmmSpec(**json.loads(args[0]))
    if spec.final_touch < 0:
        faulthandler.enable()  # a crash prints where it happened
    # Never hang a test run: SIGALRM's default action ends the process.
    signal.alarm(spec.timeout)
    result = run(spec)
    print(json.dumps(result), flush=True)
    if result.get("stage") == "handshake":
        return 2
    return 0 if result["ok"] else 1


def spec_arg(spec: VmmSpec) -> str:
    return json.dumps(asdict(spec))


if __name__ == "__main__":
    sys.exit(main())
