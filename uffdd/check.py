"""`uffdd check`: what this kernel and these permissions allow, tried for real."""

from __future__ import annotations

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


def _try_register(hugetlb: bool) -> Check:
    """Create a memfd of the type, map it shared and register MISSING|MINOR, as a VMM's would be."""
    kind = "hugetlbfs 2 MiB" if hugetlb else "shmem 4 KiB"
    size = HUGE if hugetlb else 16 * mmap.PAGESIZE
    try:
        fd = os.memfd_create("uffdd-check", os.MFD_CLOEXEC | (MFD_HUGETLB if hugetlb else 0))
    except OSError as exc:
        return Check(f"{kind} minor faults", False, f"memfd_create failed: {exc.strerror}", required=not hugetlb)
    try:
        os.ftruncate(fd, size)
        try:
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            hint = " (reserve pages: echo N > /proc/sys/vm/nr_hugepages)" if hugetlb else ""
            return Check(f"{kind} minor faults", False, f"mmap failed: {exc.strerror}{hint}", required=not hugetlb)
        import ctypes

        addr = ctypes.addressof(ctypes.c_char.from_buffer(mm))
        try:
            with Userfaultfd.open() as u:
                u.api(abi.FEATURE_MINOR_HUGETLBFS if hugetlb else abi.FEATURE_MINOR_SHMEM)
                ioctls = u.register(addr, size, abi.REGISTER_MODE_MISSING | abi.REGISTER_MODE_MINOR)
                u.unregister(addr, size)
            ok = bool(ioctls & (1 << abi.IOCTL_BIT_CONTINUE))
            detail = "REGISTER MISSING|MINOR ok, CONTINUE allowed" if ok else "CONTINUE not allowed"
            return Check(f"{kind} minor faults", ok, detail, required=not hugetlb)
        except KernelError as exc:
            return Check(f"{kind} minor faults", False, str(exc), required=not hugetlb)
        finally:
            del addr
    finally:
        os.close(fd)


def run_checks() -> list[Check]:
    checks = [Check("kernel", True, f"{platform.release()} {platform.machine()}", required=False)]
    priv = os.geteuid() == 0 or _cap_sys_ptrace()
    checks.append(Check(
        "privileges", True,
        f"euid={os.geteuid()}, CAP_SYS_PTRACE={'yes' if _cap_sys_ptrace() else 'no'}, "
        f"vm.unprivileged_userfaultfd={_read('/proc/sys/vm/unprivileged_userfaultfd')}"
        + ("" if priv else " (faults raised by KVM from kernel mode need CAP_SYS_PTRACE or the sysctl)"),
        required=False))
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
    checks.append(_try_register(hugetlb=False))
    checks.append(_try_register(hugetlb=True))
    checks.append(Check("hugepages reserved", True,
                        f"nr_hugepages={_read('/proc/sys/vm/nr_hugepages')}", required=False))
    return checks


def usable(checks: list[Check]) -> bool:
    """The daemon can serve at least shmem guests here."""
    return all(c.ok for c in checks if c.required)
