"""`access:` ties vm_ids to the uid/gid the kernel reports for the connecting VMM (SO_PEERCRED):
stand-in VMMs that really run under other ids, against a daemon process, a healthy guest beside."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from uffdd.config import parse_config
from uffdd.errors import ConfigError
from uffdd.testing import VmmProcess, VmmSpec, make_snapshot
from uffdd.testing.waiting import wait_until

MIB = 1 << 20
NOBODY = 65534
RULES = [{"vm_id": "nobody-*", "uids": [NOBODY]}, {"vm_id": "root-*", "uids": [0]},
         {"vm_id": "team-[ab]", "gids": [4242]}]


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory every user may enter (pytest's are root's alone): socket and snapshot go here."""
    path = Path(tempfile.mkdtemp(prefix="uffdd-access-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _start_daemon(d: Path, snapshot: Path) -> subprocess.Popen[bytes]:
    cfg = {"listen": str(d / "d.sock"), "workers": 1, "log": {"format": "json", "level": "info"},
           "sources": {"default": {"kind": "file", "path": str(snapshot)}}, "access": {"rules": RULES}}
    (d / "uffdd.yaml").write_text(yaml.safe_dump(cfg))
    with open(d / "daemon.log", "wb") as log_fh:
        proc = subprocess.Popen([sys.executable, "-m", "uffdd", "run", "-c", str(d / "uffdd.yaml")],
                                stdout=log_fh, stderr=subprocess.STDOUT)
    wait_until(lambda: (d / "d.sock").exists() or proc.poll() is not None, what="the daemon's socket")
    assert proc.poll() is None, (d / "daemon.log").read_text()
    (d / "d.sock").chmod(0o666)  # any user may connect: the policy, not the file mode, decides
    return proc


def _vmm(d: Path, snapshot: Path, vm_id: str, as_ids: tuple[int, int] | None = None, **kw: Any) -> VmmProcess:
    return VmmProcess(VmmSpec(socket=str(d / "d.sock"), snapshot=str(snapshot), region_sizes=[4 * MIB], threads=2,
                              vm_id=vm_id, connect_as=list(as_ids) if as_ids else [], **kw))


def _log(d: Path) -> list[dict[str, Any]]:
    out = []
    for line in (d / "daemon.log").read_text().splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


@pytest.mark.timeout(120)
def test_a_vmm_whose_uid_no_rule_allows_for_its_vm_id_is_refused_and_an_allowed_one_is_served(
        shared_dir: Path) -> None:
    snapshot = shared_dir / "guest.mem"
    make_snapshot(snapshot, 8 * MIB, seed=5)
    snapshot.chmod(0o644)  # the stand-in checks its bytes against it after becoming nobody
    daemon = _start_daemon(shared_dir, snapshot)
    vmms: list[VmmProcess] = []
    try:
        healthy = _vmm(shared_dir, snapshot, "root-1", start_delay=0.5)
        vmms.append(healthy)
        cases = {"wrong-uid": ("root-2", (NOBODY, NOBODY)), "no-rule": ("other", (NOBODY, NOBODY)),
                 "by-uid": ("nobody-1", (NOBODY, NOBODY)), "by-gid": ("team-a", (12345, 4242))}
        started = {name: _vmm(shared_dir, snapshot, vm_id, ids) for name, (vm_id, ids) in cases.items()}
        vmms += started.values()
        res = {name: v.result(90) for name, v in started.items()}
        assert res["wrong-uid"]["stage"] == "handshake"
        assert (f"vm_id 'root-2' may not be claimed by pid {started['wrong-uid'].proc.pid} "
                f"(uid {NOBODY}, gid {NOBODY})") in str(res["wrong-uid"]["error"])
        assert "no access rule matches vm_id 'other'" in str(res["no-rule"]["error"])
        for name in ("by-uid", "by-gid"):
            assert res[name]["wrong_pages"] == 0 and res[name]["returncode"] == 0, res[name]
        healthy_res = healthy.result(90)
        assert healthy_res["wrong_pages"] == 0 and healthy_res["returncode"] == 0
    finally:
        for v in vmms:
            v.kill()
        daemon.terminate()
        daemon.wait(10)
    events = _log(shared_dir)
    starts = {e["vm_id"]: e for e in events if e["event"] == "session_start"}
    assert set(starts) == {"root-1", "nobody-1", "team-a"}
    assert (starts["nobody-1"]["peer_pid"], starts["nobody-1"]["peer_uid"]) == (started["by-uid"].proc.pid, NOBODY)
    assert (starts["team-a"]["peer_uid"], starts["team-a"]["peer_gid"]) == (12345, 4242)
    assert starts["root-1"]["peer_uid"] == 0
    refused = [e for e in events if e["event"] == "handshake_refused"]
    assert len(refused) == 2 and {e["peer_uid"] for e in refused} == {NOBODY}


@pytest.mark.parametrize(("access", "message"), [
    ({"rules": []}, "access.rules: no rules: every VMM would be refused (omit `access` to turn the policy off)"),
    ({"rules": [{"vm_id": "a-*"}]}, "access.rules.0: vm_id 'a-*': give uids, gids or both"),
    ({"rules": [{"vm_id": "a-*", "uids": [-1]}]}, "access.rules.0.uids: -1 is not a uid/gid"),
    ({"rules": [{"vm_id": "", "gids": [1]}]}, "access.rules.0.vm_id: String should have at least 1 character"),
    ({"rules": [{"vm_id": "a", "uid": [1]}]}, "access.rules.0.uid: unknown key"),
])
def test_access_rules_are_validated_with_the_key_named(access: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"access": access}, "uffdd.yaml")
    assert str(info.value).startswith("uffdd.yaml: ") and message in str(info.value)


@pytest.mark.timeout(120)
def test_a_reloaded_policy_applies_to_the_next_handshakes(shared_dir: Path) -> None:
    snapshot = shared_dir / "guest.mem"
    make_snapshot(snapshot, 4 * MIB, seed=6)
    snapshot.chmod(0o644)
    daemon = _start_daemon(shared_dir, snapshot)
    try:
        refused = _vmm(shared_dir, snapshot, "late-1", (NOBODY, NOBODY)).result(60)
        assert "no access rule matches vm_id 'late-1'" in str(refused["error"])
        cfg = yaml.safe_load((shared_dir / "uffdd.yaml").read_text())
        cfg["access"]["rules"].append({"vm_id": "late-*", "gids": [NOBODY]})
        (shared_dir / "uffdd.yaml").write_text(yaml.safe_dump(cfg))
        daemon.send_signal(signal.SIGHUP)
        wait_until(lambda: any(e["event"] == "reloaded" for e in _log(shared_dir)), what="the reload")
        served = _vmm(shared_dir, snapshot, "late-1", (NOBODY, NOBODY)).result(60)
        assert served["wrong_pages"] == 0 and served["returncode"] == 0, served
    finally:
        daemon.terminate()
        daemon.wait(10)
