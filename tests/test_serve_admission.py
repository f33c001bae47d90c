"""`uffdd serve` under a connection flood: connections that never authenticate cannot keep a
real destination out, and the refusals come as summary lines, not one line each."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import pytest

from tests.conftest import make_config, running_daemon
from uffdd.peer import protocol as p
from uffdd.peer.testing import ServeProcess

FLOOD = 300


def _flood(address: tuple[str, int], n: int) -> list[socket.socket]:
    """``n`` connections that never authenticate: every other one sends a HELLO and stops there."""
    socks = []
    for i in range(n):
        s = socket.create_connection(address, timeout=10)
        if i % 2:
            s.sendall(p.encode_frame(p.FrameType.HELLO, p.Hello(p.Role.URGENT, 0, os.urandom(32), "vm").encode()))
        socks.append(s)
    return socks


@pytest.mark.timeout(120)
async def test_300_unauthenticated_connections_do_not_keep_a_peer_restore_out(
        tmp_path: Path, snapshot_4k: Path) -> None:
    secret = tmp_path / "peer.secret"
    secret.write_text("flood test secret: 4Rt#9qL!mZ2@xV7&\n")
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(f"listen: 127.0.0.1:0\nimages: {{vm: {snapshot_4k}}}\nsecret_file: {secret}\n"
                   "limits: {max_unauthenticated: 64, handshake_timeout: 30}\n")
    serve = ServeProcess(["-c", str(cfg)], tmp_path / "serve.log")
    await asyncio.to_thread(serve.start)
    flood: list[socket.socket] = []
    try:
        flood = await asyncio.to_thread(_flood, serve.address, FLOOD)  # kept open throughout
        src = {"kind": "peer", "address": f"127.0.0.1:{serve.address[1]}", "secret_file": str(secret),
               "image": "vm", "open_timeout": 5.0}
        config = make_config(tmp_path, snapshot_4k, sources={"default": src},
                             session={"fault_around": 65536, "prefetch": {"enabled": True}})
        async with running_daemon(config, snapshot_4k) as d:
            res = await d.run_vmm(region_sizes=[8 << 20], threads=2)
        assert res["wrong_pages"] == 0 and res["pages_checked"] == res["pages"], res
    finally:
        for s in flood:
            s.close()
        await asyncio.to_thread(serve.stop)
    events = [e for e in serve.log_lines() if str(e.get("event", "")).startswith("peer_connection")]
    summaries = [e for e in events if e["event"] == "peer_connections_refused"]
    assert len(events) == len(summaries) + sum(e["event"] == "peer_connected" for e in events)
    assert 1 <= len(summaries) <= 2  # 30 s of flood at most: one line per 10 s, plus the last on exit
    assert sum(int(e["count"]) for e in summaries) >= FLOOD - 64
    assert set().union(*(e["by_reason"] for e in summaries)) <= {"BUSY", "SHUTTING_DOWN"}
