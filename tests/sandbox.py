"""The unit's MemoryDenyWriteExecute= and SystemCallFilter= without systemd: a command prefix that
sets the kernel's equivalents (PR_SET_MDWE; a seccomp filter built with libseccomp from the
unit's own SystemCallFilter= lines, expanded with `systemd-analyze syscall-filter`) and then
execs its command, which keeps both.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).parent.parent / "configs" / "uffdd.service"

SCRIPT = """\
import ctypes, json, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN (Linux 6.3)
    sys.exit(f"PR_SET_MDWE failed: errno {ctypes.get_errno()}")
names = json.loads(open(sys.argv[1]).read())
if names:
    scmp = ctypes.CDLL("libseccomp.so.2")
    scmp.seccomp_init.restype = ctypes.c_void_p
    ctx = ctypes.c_void_p(scmp.seccomp_init(ctypes.c_uint32(0x00050000 | 1)))  # SCMP_ACT_ERRNO(EPERM)
    for name in names:
        nr = scmp.seccomp_syscall_resolve_name(name.encode())
        if nr >= 0:  # not a syscall of this architecture otherwise
            rc = scmp.seccomp_rule_add(ctx, ctypes.c_uint32(0x7FFF0000), nr, 0)  # SCMP_ACT_ALLOW
            if rc < 0:
                sys.exit(f"seccomp_rule_add({name}): {rc}")
    if scmp.seccomp_load(ctx) != 0:
        sys.exit("seccomp_load failed")
os.execv(sys.argv[2], sys.argv[2:])
"""


def _groups() -> dict[str, list[str]]:
    """Every syscall group systemd knows, as `systemd-analyze syscall-filter` lists them."""
    out = subprocess.run(["systemd-analyze", "syscall-filter"], capture_output=True, text=True, check=True,
                         timeout=30).stdout
    groups: dict[str, list[str]] = {}
    current: list[str] = []
    for line in out.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif line.strip() and not line.strip().startswith("#") and line.startswith(" "):
            current.append(line.strip())
    return groups


def _expand(items: list[str], groups: dict[str, list[str]]) -> set[str]:
    out: set[str] = set()
    for item in items:
        out |= _expand(groups[item], groups) if item.startswith("@") else {item}
    return out


def unit_syscalls() -> list[str]:
    """What the unit's SystemCallFilter= lines allow, in systemd's terms: the first line is the
    allow list; a later line starting with ~ takes syscalls out of it, any other puts them in."""
    groups = _groups()
    allowed: set[str] = set()
    lines = [ln.partition("=")[2] for ln in UNIT.read_text().splitlines() if ln.startswith("SystemCallFilter=")]
    for i, value in enumerate(lines):
        deny = value.startswith("~")
        names = _expand(value.lstrip("~").split(), groups)
        assert i or not deny, "the unit's first SystemCallFilter= must be an allow list"
        allowed = allowed - names if deny else allowed | names
    return sorted(allowed)


def unit_sandbox(tmp_path: Path, *, syscalls: bool = True) -> list[str]:
    """The command prefix (skips the test where the kernel or the tools cannot do it)."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is needed to expand the unit's syscall groups")
    names = unit_syscalls() if syscalls else []
    (tmp_path / "syscalls.json").write_text(json.dumps(names))
    (tmp_path / "sandbox.py").write_text(SCRIPT)
    prefix = [sys.executable, str(tmp_path / "sandbox.py"), str(tmp_path / "syscalls.json")]
    probe = subprocess.run([*prefix, sys.executable, "-c", "print('ok')"], capture_output=True, text=True, timeout=30)
    if "PR_SET_MDWE failed" in probe.stderr:
        pytest.skip(f"the kernel has no PR_SET_MDWE (Linux 6.3+): {probe.stderr.strip()}")
    if "libseccomp" in probe.stderr:
        pytest.skip(f"libseccomp is not installed: {probe.stderr.strip()}")
    assert probe.stdout.strip() == "ok", probe.stderr
    return prefix
