"""`uffdd check`: what this kernel and these permissions allow, tried for real."""

from __future__ import annotations

import ctypes
import importlib
import mmap
import os
import platform
from dataclasses import dataclass
from typing import Literal

from uffdd.kernel import KernelError, Userfaultfd, abi
from uffdd.kernel.memory import MFD_HUGETLB

CAP_SYS_PTRACE = 19
HUGE = 2 << 20


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    required: bool = True


def _cap_sys_ptrace() -> bool:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> CAP_SYS_PTRACE & 1)
    return False


def _read(path: str) -> str:
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError as exc:
        return f"unreadable ({exc.strerror})"


_IOCTL_NAMES = {abi.IOCTL_BIT_WAKE: "WAKE", abi.IOCTL_BIT_COPY: "COPY", abi.IOCTL_BIT_ZEROPAGE: "ZEROPAGE",
                abi.IOCTL_BIT_CONTINUE: "CONTINUE", 0x08: "POISON"}


def _try_register(kind: str) -> Check:
    """Map memory of one kind as a VMM would, register it as uffdd does, and report the
    range ioctls the kernel then allows. kind: shmem, hugetlbfs, anon, anon-hugetlb."""
    hugetlb = kind in ("hugetlbfs", "anon-hugetlb")
    anonymous = kind.startswith("anon")
    size = HUGE if hugetlb else 16 * mmap.PAGESIZE
    name = {"shmem": "shmem 4 KiB (memfd)", "hugetlbfs": "hugetlbfs 2 MiB (memfd)",
            "anon": "anonymous 4 KiB", "anon-hugetlb": "anonymous 2 MiB (MAP_HUGETLB)"}[kind]
    required = kind == "shmem"
    needed = abi.IOCTL_BIT_COPY if anonymous else abi.IOCTL_BIT_CONTINUE
    fd = -1
    try:
        if anonymous:
            mm = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | (0x40000 if hugetlb else 0))
        else:
            fd = os.memfd_create("uffdd-check", os.MFD_CLOEXEC | (MFD_HUGETLB if hugetlb else 0))
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError as exc:
        hint = " (reserve pages: echo N > /proc/sys/vm/nr_hugepages)" if hugetlb else ""
        return Check(name, False, f"cannot map it: {exc.strerror}{hint}", required=required)
    try:
        addr = ctypes.addressof(ctypes.c_char.from_buffer(mm))
        mode = abi.REGISTER_MODE_MISSING | (0 if anonymous else abi.REGISTER_MODE_MINOR)
        try:
            with Userfaultfd.open() as u:
                u.api((0 if anonymous else abi.FEATURE_MINOR_HUGETLBFS if hugetlb else abi.FEATURE_MINOR_SHMEM)
                      | (abi.FEATURE_EVENT_REMOVE | abi.FEATURE_EVENT_UNMAP | abi.FEATURE_EVENT_REMAP))
                ioctls = u.register(addr, size, mode)
                u.unregister(addr, size)
        except KernelError as exc:
            return Check(name, False, str(exc), required=required)
        allowed = [n for bit, n in _IOCTL_NAMES.items() if ioctls & (1 << bit)]
        ok = bool(ioctls & (1 << needed))
        how = "COPY" if anonymous else "CONTINUE"
        detail = (f"REGISTER {'MISSING' if anonymous else 'MISSING|MINOR'} ok; served with {how}; "
                  f"ioctls: {' '.join(allowed)}; REMOVE/UNMAP/REMAP events on")
        return Check(name, ok, detail if ok else f"{how} not allowed", required=required)
    finally:
        if fd >= 0:
            os.close(fd)


def _memguard() -> Check:
    from uffdd.kernel.memory import MEMGUARD

    if MEMGUARD != "built":
        return Check("guarded copies", False, "not built: copies into guest memory go through a pipe (twice the "
                     "work); reinstall with a C compiler present", required=False)
    return Check("guarded copies", True, "built: a VMM that shrinks its memory file ends its own session, "
                 "never the daemon", required=False)


def _fast_path() -> Check:
    from uffdd.core.native import STATUS, native_available

    if not native_available():
        return Check("C fast path", False, f"{STATUS}: faults are served by the same path in Python (fewer "
                     "faults/s, see scripts/bench_faults.py); reinstall with a C compiler present", required=False)
    return Check("C fast path", True, "built: demand faults (with fault-around) from a file source are served in C",
                 required=False)


def _copier() -> Check:
    from uffdd.core.copier import copier_available

    if not copier_available():
        return Check("background copies in C", False, "not built: a Python thread copies background runs, and a "
                     "vCPU that faults on a page of a run can wait for the whole run; reinstall with a C compiler "
                     "present", required=False)
    return Check("background copies in C", True, "built: background runs from a file source are written without "
                 "the GIL and installed a step at a time", required=False)


def _peer_wire() -> Check:
    name = "peer checksums and tags in C"
    try:
        wire = importlib.import_module("uffdd.peer._wire")
    except ImportError as exc:
        return Check(name, False, f"not built ({exc}): the crc32c and cryptography packages compute the peer "
                     "link's block checksums and frame tags (slower); reinstall with a C compiler present",
                     required=False)
    return Check(name, True, f"built (crc32c with {wire.CRC32C_IMPL}): the peer link's block checksums (`uffdd "
                 "serve`) and frame tags (both ends) are computed in C", required=False)


def _peer_link() -> Check:
    from uffdd.peer.native import STATUS, module

    name = "peer urgent link in C"
    if module is None:
        return Check(name, False, f"{STATUS}: urgent peer connections run in Python at both ends; reinstall "
                     "with a C compiler present", required=False)
    return Check(name, True, "built: urgent peer connections without TLS run in C at both ends (native: true), "
                 "and the C fast path sends its demand fills over them", required=False)


def _user_mode_only_refuses_kernel_faults() -> str:
    """Show, on a real user-mode-only userfaultfd, what a VMM opening one gets: a kernel-mode
    access (as KVM's) to a registered page fails at once instead of waiting for the handler."""
    fd = os.memfd_create("uffdd-check", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, mmap.PAGESIZE)
        with mmap.mmap(fd, mmap.PAGESIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as mm, \
                Userfaultfd.open(user_mode_only=True) as u, open("/dev/zero", "rb", buffering=0) as zero:
            u.api(abi.FEATURE_MINOR_SHMEM)
            u.register(ctypes.addressof(ctypes.c_char.from_buffer(mm)), mmap.PAGESIZE,
                       abi.REGISTER_MODE_MISSING | abi.REGISTER_MODE_MINOR)
            try:
                os.readv(zero.fileno(), [mm])  # the kernel writes into the page: a kernel-mode fault
            except OSError as exc:
                return f"a kernel-mode access to a registered page failed at once with {exc.strerror}"
            return "a kernel-mode access to a registered page did not fail"
    except OSError as exc:
        return f"not shown ({exc.strerror})"
    finally:
        os.close(fd)


def _unprivileged_vmms() -> Check:
    """Whether a VMM without privileges can open a userfaultfd that serves KVM's faults."""
    sysctl = _read("/proc/sys/vm/unprivileged_userfaultfd")
    try:
        st = os.stat("/dev/userfaultfd")
        device = f"/dev/userfaultfd (mode {st.st_mode & 0o777:o}, uid {st.st_uid}, gid {st.st_gid}) gives full " \
                 "ones to who may open it read/write"
    except OSError:
        device = "/dev/userfaultfd is missing"
    if sysctl == "1":
        return Check("KVM faults for unprivileged VMMs", True, "vm.unprivileged_userfaultfd=1: userfaultfd(2) "
                     f"gives any VMM userfaultfds that serve KVM's faults; {device}", required=False)
    return Check(
        "KVM faults for unprivileged VMMs", False,
        f"vm.unprivileged_userfaultfd={sysctl}: userfaultfd(2) gives a VMM without CAP_SYS_PTRACE only "
        "UFFD_USER_MODE_ONLY userfaultfds, whose KVM faults fail with EFAULT (uffdd cannot tell them apart; "
        f"{_user_mode_only_refuses_kernel_faults()}); {device}", required=False)


def run_checks() -> list[Check]:
    checks = [Check("kernel", True, f"{platform.release()} {platform.machine()}", required=False)]
    priv = os.geteuid() == 0 or _cap_sys_ptrace()
    checks.append(Check(
        "privileges", True,
        f"euid={os.geteuid()}, CAP_SYS_PTRACE={'yes' if _cap_sys_ptrace() else 'no'}, "
        f"vm.unprivileged_userfaultfd={_read('/proc/sys/vm/unprivileged_userfaultfd')}"
        + ("" if priv else " (faults raised by KVM from kernel mode need CAP_SYS_PTRACE or the sysctl)"),
        required=False))
    checks.append(_fast_path())
    checks.append(_copier())
    checks.append(_memguard())
    checks.append(_peer_wire())
    checks.append(_peer_link())
    checks.append(_unprivileged_vmms())
    opened = False
    vias: tuple[Literal["syscall", "device"], ...] = ("syscall", "device")
    for via in vias:
        try:
            with Userfaultfd.open(via=via):
                pass
            checks.append(Check(f"userfaultfd via {via}", True, "opened", required=False))
            opened = True
        except KernelError as exc:
            checks.append(Check(f"userfaultfd via {via}", False, str(exc), required=False))
    checks.append(Check("userfaultfd available", opened,
                        "at least one way to open a userfaultfd works" if opened else "no way works"))
    if not opened:
        return checks
    with Userfaultfd.open() as u:
        feats = u.api(0).features
    checks.append(Check("features", True, " ".join(abi.feature_names(feats)), required=False))
    for bit in (abi.FEATURE_MINOR_SHMEM, abi.FEATURE_MINOR_HUGETLBFS):
        checks.append(Check(f"feature {abi.FEATURE_NAMES[bit]}", bool(feats & bit),
                            "supported" if feats & bit else "missing: kernel too old (needs >= 5.13)",
                            required=bit == abi.FEATURE_MINOR_SHMEM))
    for kind in ("shmem", "hugetlbfs", "anon", "anon-hugetlb"):
        checks.append(_try_register(kind))
    for bit, what in ((abi.FEATURE_EVENT_REMOVE, "balloon / MADV_DONTNEED (REMOVE events)"),
                      (abi.FEATURE_EVENT_UNMAP, "munmap (UNMAP events)"),
                      (abi.FEATURE_EVENT_REMAP, "mremap (REMAP events)"),
                      (abi.FEATURE_EVENT_FORK, "fork (FORK events, needs CAP_SYS_PTRACE; not served)"),
                      (abi.FEATURE_POISON, "poisoned pages (UFFDIO_POISON)"),
                      (abi.FEATURE_THREAD_ID, "vCPU attribution (THREAD_ID)"),
                      (abi.FEATURE_EXACT_ADDRESS, "exact fault addresses")):
        checks.append(Check(what, bool(feats & bit), "supported" if feats & bit else "not offered by this kernel",
                            required=False))
    checks.append(Check("hugepages reserved", True,
                        f"nr_hugepages={_read('/proc/sys/vm/nr_hugepages')}", required=False))
    return checks


def usable(checks: list[Check]) -> bool:
    """The daemon can serve at least shmem guests here."""
    return all(c.ok for c in checks if c.required)
