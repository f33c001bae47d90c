"""Migration between network namespaces: ``uffdd serve`` in its own namespace behind a veth
link (netem delay where the kernel has it), the daemon and the stand-in VMM here, and the link
cut for real in the middle of the run."""

from __future__ import annotations

import asyncio
import warnings
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import first_session, make_config, running_daemon, wait_pages
from tests.netns import Link, unavailable_reason, veth_namespace
from uffdd.peer.testing import ServeProcess
from uffdd.sources.peer import PeerSource
from uffdd.testing import make_snapshot

MIB = 1 << 20
_REASON = unavailable_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"network namespaces unavailable: {_REASON}")


@pytest.fixture(scope="module")
def snapshot_256m(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("snap256") / "guest.mem"
    make_snapshot(path, 256 * MIB, seed=21)
    return path


def note_delay(link: Link) -> None:
    if link.delay is None:
        warnings.warn(f"netem is not available in this kernel ({link.delay_error}); the link has no added "
                      "delay, everything else (namespaces, veth, cuts) is real", stacklevel=2)


def daemon_config(tmp_path: Path, snap: Path, link: Link, secret_file: Path, **session: Any) -> Any:
    src = {"kind": "peer", "address": f"{link.ns_ip}:7447", "secret_file": str(secret_file),
           "keepalive": 0.1, "io_timeout": 0.6, "reconnect_min": 0.02, "reconnect_max": 0.25,
           "connect_timeout": 0.5, "open_timeout": 10.0, "deadline": 60.0}
    return make_config(tmp_path, snap, sources={"default": src}, session=session or
                       {"fault_around": 0, "prefetch": {"enabled": False}})


@pytest.mark.timeout(400)
async def test_256mib_guest_from_another_namespace_survives_two_link_cuts(
        tmp_path: Path, snapshot_256m: Path) -> None:
    secret = tmp_path / "peer.secret"
    secret.write_text("a shared secret for the namespace test: 7Hq#Lm2@Vx5!Tz9&\n")
    with veth_namespace() as link:
        note_delay(link)
        serve = ServeProcess(["--image", str(snapshot_256m), "--listen", f"{link.ns_ip}:7447",
                              "--secret-file", str(secret)], tmp_path / "serve.log", netns=link.ns).start()
        try:
            # Demand faults plus rate-limited background pre-paging, so the run lasts long enough
            # for both cuts to land while pages are still missing.
            cfg = daemon_config(tmp_path, snapshot_256m, link, secret, fault_around=65536,
                                prefetch={"enabled": True, "chunk": 1 << 20, "rate": 40})
            async with running_daemon(cfg, snapshot_256m) as d:
                vmm = d.start_vmm(region_sizes=[192 * MIB, 64 * MIB], threads=8, timeout=300)
                s = await first_session(d.listener)
                src = s.source
                assert isinstance(src, PeerSource)
                total = s.stats.pages_total
                cut_at = [await wait_pages(s, total // 5, timeout=120)]
                link.cut_here()  # our interface down: the route is gone
                await asyncio.sleep(1.0)
                link.restore_here()
                cut_at.append(await wait_pages(s, total // 2, timeout=120))
                link.cut_far()  # the far end goes dark: only silence tells
                await asyncio.sleep(1.0)
                link.restore_far()
                res = await asyncio.to_thread(vmm.result, 300)
        finally:
            serve.stop()
    assert res["wrong_pages"] == 0 and res["pages_checked"] == res["pages"] == 65536, res
    assert res["returncode"] == 0
    assert all(c < total for c in cut_at), cut_at  # both cuts happened mid-migration
    assert src.stats.reconnects >= 2, src.stats
    assert src.stats.requests_resent >= 1, src.stats
    assert src.stats.unreachable == 0


@pytest.mark.timeout(120)
async def test_non_loopback_serve_requires_a_secret_and_authenticates_clients(tmp_path: Path) -> None:
    snap = tmp_path / "small.mem"
    make_snapshot(snap, 4 * MIB, seed=3)
    with veth_namespace() as link:
        # Without a secret, a non-loopback --listen is narrowed to loopback, and says so.
        open_serve = ServeProcess(["--image", str(snap), "--listen", f"{link.ns_ip}:7447"], tmp_path / "a.log",
                                  netns=link.ns).start()
        try:
            assert open_serve.address[0] == "127.0.0.1"
            assert any(e.get("event") == "no_secret_loopback_only" for e in open_serve.log_lines())
            with pytest.raises(OSError):  # nothing listens on the veth address
                await asyncio.wait_for(asyncio.open_connection(link.ns_ip, 7447), 5)
        finally:
            open_serve.stop()
        secret = tmp_path / "s"
        secret.write_text("another namespace secret: 4Kp@Zq8!Rm3#Wx6&\n")
        serve = ServeProcess(["--image", str(snap), "--listen", f"{link.ns_ip}:7447", "--secret-file", str(secret)],
                             tmp_path / "b.log", netns=link.ns).start()
        try:
            assert serve.address == (link.ns_ip, 7447)
            wrong = tmp_path / "wrong"
            wrong.write_text("fedcba9876543210fedc\n")
            cfg = daemon_config(tmp_path, snap, link, wrong)
            async with running_daemon(cfg, snap) as d:
                res = await d.run_vmm(region_sizes=[2 * MIB])
                assert res["stage"] == "handshake" and "shared secret" in res["error"]
            cfg = daemon_config(tmp_path, snap, link, secret)
            async with running_daemon(cfg, snap) as d:
                res = await d.run_vmm(region_sizes=[4 * MIB], threads=2)
                assert res["wrong_pages"] == 0 and res["pages_checked"] == res["pages"], res
        finally:
            serve.stop()
