"""End to end over the network: a stand-in VMM faults on guest memory, the real daemon fills it
from a ``kind: peer`` source, and ``uffdd serve`` (in this process or as a subprocess) serves the
snapshot. Links are cut, servers restarted, pages corrupted in flight: 0 wrong pages, always."""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import os
import socket
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from tests.conftest import HUGE, first_session, make_config, running_daemon, wait_pages
from uffdd.core import Session
from uffdd.errors import SourceError
from uffdd.peer import protocol as p
from uffdd.peer.client import ClientOptions, PeerClient
from uffdd.peer.config import PeerLinkConfig, ServeLimits, make_secret
from uffdd.peer.image import Image
from uffdd.peer.relay import Relay
from uffdd.peer.serve import VmmHandover
from uffdd.peer.server import PeerServer
from uffdd.peer.testing import DataTamperer, JunkInjector, ServeProcess
from uffdd.sources.peer import PeerSource
from uffdd.testing.waiting import eventually

MIB = 1 << 20
FAST_RECOVERY = {"keepalive": 0.1, "io_timeout": 0.6, "reconnect_min": 0.02, "reconnect_max": 0.2,
                 "connect_timeout": 0.5, "open_timeout": 5.0, "deadline": 30.0}


def assert_all_correct(res: dict[str, Any]) -> None:
    assert res.get("stage") != "handshake", res
    assert res["wrong_pages"] == 0, res
    assert res["pages_checked"] == res["pages"], res
    assert res["returncode"] == 0, res


def peer_config(tmp_path: Path, snapshot: Path, address: tuple[str, int], *, prefetch: bool = False,
                **source: Any) -> Any:
    src = {"kind": "peer", "address": f"{address[0]}:{address[1]}", **FAST_RECOVERY, **source}
    extra: dict[str, Any] = {"sources": {"default": src}}
    if prefetch:
        extra["session"] = {"fault_around": 65536, "prefetch": {"enabled": True, "chunk": 1 << 20}}
    return make_config(tmp_path, snapshot, **extra)


@contextlib.asynccontextmanager
async def peer_server(snapshot: Path, *, secret: bytes | None = None, compression: bool = True, native: bool = True,
                      **limits: Any) -> AsyncIterator[PeerServer]:
    server = PeerServer({"default": Image.from_file("default", str(snapshot))}, ServeLimits(**limits),
                        secret=secret, compression=compression, native=native)
    await server.start("127.0.0.1", 0)
    try:
        yield server
    finally:
        await server.close()


def peer_source(s: Session) -> PeerSource:
    assert isinstance(s.source, PeerSource)
    return s.source


@pytest.fixture(params=[True, False], ids=["c-link", "python-link"])
def native(request: pytest.FixtureRequest) -> bool:
    """Both ends' urgent connection in C (and the C fault path sending to it), or in Python:
    the same protocol, the same guarantees, checked by the same tests."""
    return bool(request.param)


def check_link(s: Session, native: bool) -> PeerSource:
    """The session runs on the link it was configured for."""
    src = peer_source(s)
    if native:
        assert src.native_link() is not None and s.fault_path == "c"
    else:
        assert src.native_link() is None
    return src


async def test_every_page_arrives_correct_with_zero_pages_sent_as_a_flag(
        tmp_path: Path, snapshot_4k: Path, native: bool) -> None:
    async with peer_server(snapshot_4k, native=native) as server, \
            running_daemon(peer_config(tmp_path, snapshot_4k, server.address, native=native), snapshot_4k) as d:
        vmm = d.start_vmm(region_sizes=[8 * MIB, 4 * MIB], region_gap=MIB, threads=4, prepopulate=0.2)
        src = check_link(await first_session(d.listener), native)
        res: dict[str, Any] = await asyncio.to_thread(vmm.result, 90)
        assert_all_correct(res)
        stats = server.collect()
        assert stats.blocks_zero >= res["pages"] // 61 - 2  # every 61st snapshot page is zero: no payload
        assert stats.blocks_raw + stats.blocks_zero + stats.blocks_lz4 >= res["pages"]
        assert src.stats.checksum_failures == 0 and src.stats.reconnects == 0
        assert src.describe().startswith("peer:127.0.0.1:")


async def test_2m_hugetlbfs_guest_over_the_peer(tmp_path: Path, snapshot_2m: Path, hugepages: Any) -> None:
    hugepages(12)
    async with peer_server(snapshot_2m) as server, \
            running_daemon(peer_config(tmp_path, snapshot_2m, server.address), snapshot_2m) as d:
        res = await d.run_vmm(region_sizes=[16 * MIB, 8 * MIB], page_size=HUGE, threads=4, prepopulate=0.3)
        assert_all_correct(res)


async def test_prefetch_uses_the_bulk_connection_and_faults_the_urgent_one(
        tmp_path: Path, snapshot_4k: Path, native: bool) -> None:
    async with peer_server(snapshot_4k, native=native) as server, \
            running_daemon(peer_config(tmp_path, snapshot_4k, server.address, prefetch=True, native=native),
                           snapshot_4k) as d:
        vmm = d.start_vmm(region_sizes=[24 * MIB], threads=2, start_delay=0.3)
        s = await first_session(d.listener)
        res: dict[str, Any] = await asyncio.to_thread(vmm.result, 90)
        assert_all_correct(res)
        assert server.stats.welcomed == {"urgent": 1, "bulk": 1}
        assert s.stats.pages_prefetch > 0
        client = check_link(s, native).client
        if native:  # received into guest memory by the C bulk link's thread
            direct = client.direct()
            assert direct is not None and direct.bulk.stats["blocks"] >= s.stats.pages_prefetch
            assert client.bulk is None
        else:
            assert client.bulk is not None


@pytest.mark.parametrize("silent", [False, True], ids=["reset", "silent-blackhole"])
async def test_link_cut_mid_migration_reconnects_and_resends_with_zero_wrong_pages(
        tmp_path: Path, snapshot_4k: Path, silent: bool, native: bool) -> None:
    async with peer_server(snapshot_4k, native=native) as server:
        relay = Relay(*server.address)
        addr = await relay.start()
        relay.cut_after(4 * MIB, 0.8, silent=silent)
        try:
            async with running_daemon(peer_config(tmp_path, snapshot_4k, addr, native=native), snapshot_4k) as d:
                vmm = d.start_vmm(region_sizes=[16 * MIB], threads=4)
                src = check_link(await first_session(d.listener), native)
                res: dict[str, Any] = await asyncio.to_thread(vmm.result, 90)
        finally:
            await relay.close()
    assert_all_correct(res)
    assert relay.cuts == 1
    assert src.stats.reconnects >= 1
    assert src.stats.requests_resent >= 1  # vCPUs were waiting on in-flight requests when the link broke
    if silent:
        assert any("nothing received" in k for k in src.stats.losses_by_reason)


async def test_server_restart_mid_migration_completes_with_zero_wrong_pages(tmp_path: Path, snapshot_4k: Path) -> None:
    serve = ServeProcess(["--image", str(snapshot_4k), "--listen", "127.0.0.1:0"], tmp_path / "serve.log").start()
    try:
        port = serve.address[1]
        async with running_daemon(peer_config(tmp_path, snapshot_4k, serve.address), snapshot_4k) as d:
            vmm = d.start_vmm(region_sizes=[24 * MIB], threads=2)
            s = await first_session(d.listener)
            await wait_pages(s, 1500)
            src = peer_source(s)
            failures = src.stats.connect_failures
            serve.kill()  # SIGKILL: no goodbye
            killed_at = s.stats.pages_filled
            # The client finds the server gone: its reconnects are refused, again and again...
            await eventually(lambda: src.stats.connect_failures >= failures + 3, what="reconnects refused")
            assert s.stats.pages_filled - killed_at < 16  # ... and meanwhile vCPUs wait, they get no zeros
            serve = ServeProcess(["--image", str(snapshot_4k), "--listen", f"127.0.0.1:{port}"],
                                 tmp_path / "serve2.log")
            await asyncio.to_thread(serve.start)
            res: dict[str, Any] = await asyncio.to_thread(vmm.result, 90)
            assert killed_at < res["pages"]
            assert_all_correct(res)
            assert peer_source(s).stats.reconnects >= 1
    finally:
        serve.kill()


async def test_corrupted_pages_are_refetched_and_never_installed(
        tmp_path: Path, snapshot_4k: Path, native: bool) -> None:
    targets = {off: 2 for off in (0, 5 * 4096, 700 * 4096, 2000 * 4096, 4095 * 4096)}
    tamper = DataTamperer(targets)
    async with peer_server(snapshot_4k, compression=False, native=native) as server:
        relay = Relay(*server.address, downstream_editor=lambda: tamper)
        addr = await relay.start()
        try:
            async with running_daemon(peer_config(tmp_path, snapshot_4k, addr, native=native), snapshot_4k) as d:
                vmm = d.start_vmm(region_sizes=[16 * MIB], threads=4)
                src = check_link(await first_session(d.listener), native)
                res: dict[str, Any] = await asyncio.to_thread(vmm.result, 90)
        finally:
            await relay.close()
    assert_all_correct(res)  # the guest read every one of those pages: right bytes
    assert sorted(tamper.flipped) == sorted(o for o in targets for _ in range(2))
    assert src.stats.checksum_failures == len(tamper.flipped)


async def test_a_relay_that_rewrites_pages_and_their_checksums_is_caught_by_the_tags(
        tmp_path: Path, snapshot_4k: Path, native: bool) -> None:
    """An attacker on the path who passes the handshake through and rewrites page data, crc and
    all: with a shared secret every frame carries a tag, so the rewritten frames fail it, the
    link is reported as tampered and re-established, and not one wrong byte reaches the guest."""
    secret = make_secret()
    targets = {off: 2 for off in (0, 9 * 4096, 700 * 4096, 1500 * 4096)}
    tamper = DataTamperer(targets, recompute=True)
    async with peer_server(snapshot_4k, secret=secret.encode(), compression=False, native=native) as server:
        relay = Relay(*server.address, downstream_editor=lambda: tamper)
        addr = await relay.start()
        try:
            cfg = peer_config(tmp_path, snapshot_4k, addr, secret=secret, native=native)
            with structlog.testing.capture_logs() as logs:
                async with running_daemon(cfg, snapshot_4k) as d:
                    vmm = d.start_vmm(region_sizes=[8 * MIB], threads=4)
                    src = check_link(await first_session(d.listener), native)
                    res: dict[str, Any] = await asyncio.to_thread(vmm.result, 90)
        finally:
            await relay.close()
    assert_all_correct(res)  # every rewritten page was refused, then fetched again
    assert len(tamper.flipped) == 8
    assert src.stats.tampered == len(tamper.flipped) and src.stats.checksum_failures == 0
    assert src.stats.reconnects >= len(tamper.flipped)
    assert sum(e["event"] == "peer_link_tampered" and e["log_level"] == "error" for e in logs) == 8


HOSTILE_SERVER: list[tuple[str, bytes]] = [
    ("short", p.header(p.FrameType.PONG)[:9]),  # a header cut short, the stream goes on: garbage follows
    ("oversized", struct.pack("<BBHIQII", p.FrameType.ERROR, 0, 0, 0, 0, 1 << 31, 1)),
    ("unknown-type", struct.pack("<BBHIQII", 0x99, 0, 0, 0, 0, 0, 0)),
    ("wrong-id", p.header(p.FrameType.DATA, id=0xDEAD, offset=0, count=1, length=8 + 4096)),
    ("length-lies", p.header(p.FrameType.DATA, id=1, offset=0, count=2, length=16)),
]


@pytest.mark.parametrize(("name", "junk"), HOSTILE_SERVER, ids=[h[0] for h in HOSTILE_SERVER])
async def test_malformed_frames_from_the_server_cost_one_connection_and_no_page(
        tmp_path: Path, snapshot_4k: Path, name: str, junk: bytes, native: bool) -> None:
    inject = JunkInjector(junk, after=20)
    async with peer_server(snapshot_4k, native=native) as server:
        relay = Relay(*server.address, downstream_editor=inject.editor)
        addr = await relay.start()
        try:
            async with running_daemon(peer_config(tmp_path, snapshot_4k, addr, native=native), snapshot_4k) as d:
                vmm = d.start_vmm(region_sizes=[8 * MIB], threads=4)
                src = check_link(await first_session(d.listener), native)
                res: dict[str, Any] = await asyncio.to_thread(vmm.result, 90)
        finally:
            await relay.close()
    assert_all_correct(res)
    assert inject.injected == 1
    assert src.stats.protocol_errors == 1 and src.stats.reconnects >= 1


async def test_source_unreachable_past_deadline_is_loud_then_recovers_without_zeros(
        tmp_path: Path, snapshot_4k: Path, native: bool) -> None:
    async with peer_server(snapshot_4k, native=native) as server:
        relay = Relay(*server.address)
        addr = await relay.start()
        try:
            cfg = peer_config(tmp_path, snapshot_4k, addr, deadline=0.4, native=native)
            async with running_daemon(cfg, snapshot_4k) as d:
                vmm = d.start_vmm(region_sizes=[8 * MIB], threads=2, start_delay=0.5)
                s = await first_session(d.listener)
                src = check_link(s, native)
                with structlog.testing.capture_logs() as logs:
                    relay.cut(2.5)  # before the vCPUs start: every fault waits through the outage
                    unreachable = await eventually(lambda: src.unreachable, what="the source declared unreachable")
                    assert "unreachable" in str(unreachable)
                    filled = s.stats.pages_filled
                    res: dict[str, Any] = await asyncio.to_thread(vmm.result, 90)
        finally:
            await relay.close()
    assert filled == 0
    assert_all_correct(res)
    assert src.stats.unreachable >= 1
    assert s.stats.source_errors > 0  # the session saw SourceUnavailable and retried
    assert any(e["event"] == "peer_unreachable" and e["log_level"] == "error" for e in logs)


async def test_a_different_image_after_reconnect_is_refused(tmp_path: Path, snapshot_4k: Path) -> None:
    other = tmp_path / "other.mem"
    other.write_bytes(snapshot_4k.read_bytes())  # same bytes, another file: another image
    async with peer_server(snapshot_4k) as first:
        host, port = first.address
        c = PeerClient(ClientOptions.from_config(PeerLinkConfig(
            address=f"{host}:{port}", keepalive=0.1, io_timeout=0.6, reconnect_min=0.02, reconnect_max=0.2,
            connect_timeout=0.5)))
        await c.open()
        buf = bytearray(4096)
        await c.fill(0, memoryview(buf))
    second = PeerServer({"default": Image.from_file("default", str(other))})
    await second.start(host, port)
    try:
        with pytest.raises(SourceError, match="different image"):
            await asyncio.wait_for(c.fill(4096, memoryview(buf)), 10)
        with pytest.raises(SourceError, match="different image"):
            await c.fill(0, memoryview(buf))
    finally:
        await c.aclose()
        await second.close()


def _hand_over(sock_path: str, body: bytes, fd: int) -> tuple[socket.socket, dict[str, Any]]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sock_path)
    s.settimeout(10)
    s.sendmsg([body], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())])
    return s, json.loads(s.makefile("rb").readline())


async def test_live_guest_memfd_handed_over_by_the_source_vmm_is_served(tmp_path: Path, snapshot_4k: Path) -> None:
    data = snapshot_4k.read_bytes()
    memfd = os.memfd_create("source-guest", os.MFD_CLOEXEC)
    os.write(memfd, data)
    server = PeerServer({})
    await server.start("127.0.0.1", 0)
    handover = VmmHandover(str(tmp_path / "serve-vmm.sock"), server)
    await handover.start()
    held: list[socket.socket] = []
    try:
        regions = [{"base_host_virt_addr": 0x7F0000000000, "size": 16 * MIB, "offset": 0, "page_size": 4096}]
        body = json.dumps({"vm_id": "guest", "regions": regions}).encode()
        vmm_conn, answer = await asyncio.to_thread(_hand_over, handover.path, body, memfd)
        held.append(vmm_conn)
        os.close(memfd)  # the server holds its own copy of the fd now
        assert answer["status"] == "serving" and answer["image"] == "guest"
        cfg = peer_config(tmp_path, snapshot_4k, server.address, image="{vm_id}")
        async with running_daemon(cfg, snapshot_4k) as d:
            assert_all_correct(await d.run_vmm(region_sizes=[16 * MIB], vm_id="guest", threads=4))
            # Outside the handed-over regions nothing is served.
            res = await d.run_vmm(region_sizes=[16 * MIB, 4 * MIB], vm_id="guest")
            assert res["stage"] == "handshake" and "page source" in res["error"]
        vmm_conn.close()  # the source VMM goes away: its memory is withdrawn
        await eventually(lambda: "guest" not in server.images, what="the live image withdrawn")
    finally:
        for c in held:
            c.close()
        await handover.close()
        await server.close()


async def test_vmm_handshake_is_refused_with_the_reason_when_the_source_cannot_be_reached(
        tmp_path: Path, snapshot_4k: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()
    cfg = peer_config(tmp_path, snapshot_4k, dead, open_timeout=0.5)
    async with running_daemon(cfg, snapshot_4k) as d:
        res = await d.run_vmm(region_sizes=[1 * MIB])
        assert res["stage"] == "handshake"
        assert "not reachable within 0.5s" in res["error"] and "111" in res["error"]  # ECONNREFUSED, named
    async with peer_server(snapshot_4k, secret=b"the server's own secret: Hq8#Lm2@Vx5!Tz9&Rp4") as server:
        cfg = peer_config(tmp_path, snapshot_4k, server.address, secret="a different one, 3fK!w8Zq@Lr5#Nv2&Ty7")
        async with running_daemon(cfg, snapshot_4k) as d:
            res = await d.run_vmm(region_sizes=[1 * MIB])
            assert res["stage"] == "handshake" and "shared secret" in res["error"]


def test_peer_source_config_refuses_bad_values_naming_the_key(tmp_path: Path, snapshot_4k: Path) -> None:
    from uffdd.errors import ConfigError

    bad: list[tuple[dict[str, Any], str]] = [
        ({"address": "h:99999"}, "port"), ({"address": "h:1", "secret": "short"}, "secret"),
        ({"address": "h:1", "keepalive": 5, "io_timeout": 1}, "io_timeout"),
        ({"address": "h:1", "bogus": 1}, "unknown key"),
        ({"address": "h:1", "secret_file": str(tmp_path / "nope")},
         r"sources\.default.*secret_file: cannot read .*nope"),
        ({"address": "h:1", "tls": {"ca": str(tmp_path / "ca.pem")}}, r"sources\.default\.tls.*ca: cannot read")]
    for spec, needle in bad:
        with pytest.raises(ConfigError, match=needle):
            make_config(tmp_path, snapshot_4k, sources={"default": {"kind": "peer", **spec}})


async def test_fill_of_a_partly_unreadable_range_raises_and_leaves_nothing_half_done(snapshot_4k: Path) -> None:
    """A fill that cannot complete raises; it never returns with the destination partly written."""
    async with peer_server(snapshot_4k) as server:
        c = PeerClient(ClientOptions.from_config(PeerLinkConfig(address=f"{server.address[0]}:{server.address[1]}")))
        await c.open()
        buf = bytearray(8 * 4096)
        with pytest.raises(SourceError, match="past the end"):
            await c.fill((32 * MIB) - 4096, memoryview(buf))
        await c.aclose()
    assert p.BLOCK_SIZE == 4096
