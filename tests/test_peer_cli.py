"""`uffdd serve` and `uffdd demo --peer` run as a user runs them: subprocesses, exit codes, output."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from uffdd.peer.testing import ServeProcess


def uffdd_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "uffdd", *args], capture_output=True, text=True,
                          timeout=timeout, check=False, env=env)


def events(text: str) -> list[dict[str, object]]:
    out = []
    for line in text.splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict):
            out.append(doc)
    return out


def test_serve_needs_no_config_file_and_binds_loopback_only_without_a_secret(
        tmp_path: Path, snapshot_4k: Path) -> None:
    serve = ServeProcess(["--image", str(snapshot_4k), "--listen", "0.0.0.0:0"], tmp_path / "serve.log").start()
    try:
        assert serve.address[0] == "127.0.0.1"  # asked for every address, got loopback
        logged = {e["event"]: e for e in serve.log_lines()}
        assert logged["no_secret_loopback_only"]["requested"] == "0.0.0.0"
        assert logged["serving"]["auth"] == "none"
    finally:
        assert serve.stop() == 0  # SIGTERM: a clean exit


def test_serve_refuses_bad_options_with_the_key_named(tmp_path: Path, snapshot_4k: Path) -> None:
    done = uffdd_cli("serve", timeout=30)
    assert done.returncode == 2 and "nothing to serve" in done.stderr
    done = uffdd_cli("serve", "--image", str(tmp_path / "missing.mem"), timeout=30)
    assert done.returncode == 2 and "images.default" in done.stderr and "missing.mem" in done.stderr
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(f"images: {{vm: {snapshot_4k}}}\nlimits: {{max_blocks: 0}}\nbogus: 1\n")
    done = uffdd_cli("serve", "-c", str(cfg), timeout=30)
    assert done.returncode == 2
    assert str(cfg) in done.stderr and "limits.max_blocks" in done.stderr and "bogus: unknown key" in done.stderr
    short = tmp_path / "short.secret"
    short.write_text("abc\n")
    done = uffdd_cli("serve", "--image", str(snapshot_4k), "--secret-file", str(short), timeout=30)
    assert done.returncode == 2 and "secret_file: the shared secret is too weak" in done.stderr
    assert "uffdd secret" in done.stderr


def test_serve_config_file_and_metrics_endpoint(tmp_path: Path, snapshot_4k: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        mport = s.getsockname()[1]
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(f"listen: 127.0.0.1:0\nimages: {{vm-1: {snapshot_4k}}}\nmetrics: {{listen: 127.0.0.1:{mport}}}\n")
    serve = ServeProcess(["-c", str(cfg)], tmp_path / "serve.log").start()
    try:
        import asyncio

        from uffdd.peer.client import ClientOptions, PeerClient
        from uffdd.peer.config import PeerLinkConfig

        async def fetch() -> bytes:
            link = PeerLinkConfig(address=f"{serve.address[0]}:{serve.address[1]}", image="vm-1")
            c = PeerClient(ClientOptions.from_config(link))
            await c.open()
            buf = bytearray(8192)
            await c.fill(4096, memoryview(buf))
            await c.aclose()
            return bytes(buf)

        assert asyncio.run(fetch()) == snapshot_4k.read_bytes()[4096:12288]
        # The endpoint is up before the "serving" line ServeProcess waited for, and the READ was
        # counted when the server received it, before its answer reached us.
        text = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5).read().decode()
        assert re.search(r"^uffdd_serve_reads_total 1\.0$", text, re.M), text
        assert "uffdd_serve_connections_total" in text
    finally:
        serve.stop()


def test_serve_stops_on_sigint_and_tells_connected_clients(tmp_path: Path, snapshot_4k: Path) -> None:
    serve = ServeProcess(["--image", str(snapshot_4k), "--listen", "127.0.0.1:0"], tmp_path / "serve.log").start()
    assert serve.proc is not None
    serve.proc.send_signal(signal.SIGINT)
    assert serve.proc.wait(10) == 0
    assert any(e.get("event") == "stopped" for e in serve.log_lines())


def pages_wrong_zero(stdout: str) -> bool:
    lines = [line for line in stdout.splitlines() if "pages wrong" in line]
    return len(lines) == 1 and re.search(r"pages wrong\W+0\W*$", lines[0]) is not None


@pytest.mark.timeout(180)
def test_demo_peer_runs_end_to_end_over_loopback() -> None:
    done = uffdd_cli("demo", "--peer", "--size", "32M", "--threads", "2")
    assert done.returncode == 0, done.stdout + done.stderr
    assert pages_wrong_zero(done.stdout), done.stdout
    assert "uffdd serve on 127.0.0.1:" in done.stdout


@pytest.mark.timeout(180)
def test_demo_cut_link_shows_the_recovery_and_still_gets_every_page() -> None:
    done = uffdd_cli("demo", "--peer", "--cut-link", "--size", "48M", "--cut-seconds", "0.8")
    assert done.returncode == 0, done.stdout + done.stderr
    assert pages_wrong_zero(done.stdout), done.stdout
    assert "link cut for 0.8s" in done.stdout
    m = re.search(r"reconnects / requests re-sent\W+(\d+) / (\d+)", done.stdout)
    assert m is not None and int(m.group(1)) >= 1, done.stdout


@pytest.mark.timeout(180)
def test_demo_exits_nonzero_when_the_source_stays_unreachable_past_its_deadline() -> None:
    done = uffdd_cli("demo", "--peer", "--cut-link", "--size", "48M", "--cut-seconds", "20",
                     "--peer-deadline", "0.5")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "unreachable past its deadline" in done.stdout
    assert "peer_unreachable" in done.stdout + done.stderr
    assert "pages wrong" not in done.stdout  # no report pretends the run finished


async def test_serve_with_tls_and_secret_from_flags_serves_a_daemon_configured_for_both(
        tmp_path: Path, snapshot_4k: Path) -> None:
    import asyncio

    from tests.conftest import make_config, running_daemon
    from uffdd.peer.testing import make_tls_files

    tls = make_tls_files(tmp_path)
    secret = tmp_path / "peer.secret"
    secret.write_text("tls and a secret, both: 7Hq#Lm2@Vx5!Tz9&\n")
    serve = ServeProcess(["--image", str(snapshot_4k), "--listen", "127.0.0.1:0", "--secret-file", str(secret),
                          "--tls-cert", str(tls.server_cert), "--tls-key", str(tls.server_key),
                          "--tls-client-ca", str(tls.ca)], tmp_path / "serve.log")
    await asyncio.to_thread(serve.start)
    try:
        assert any(e.get("event") == "serving" and e.get("tls") and e.get("client_certs") for e in serve.log_lines())
        src = {"kind": "peer", "address": f"127.0.0.1:{serve.address[1]}", "secret_file": str(secret),
               "tls": {"ca": str(tls.ca), "cert": str(tls.client_cert), "key": str(tls.client_key),
                       "server_name": "localhost"}}
        async with running_daemon(make_config(tmp_path, snapshot_4k, sources={"default": src}), snapshot_4k) as d:
            res = await d.run_vmm(region_sizes=[4 << 20], threads=2)
            assert res["wrong_pages"] == 0 and res["pages_checked"] == res["pages"], res
            no_cert = {**src, "tls": {"ca": str(tls.ca), "server_name": "localhost"}, "open_timeout": 1.0}
        async with running_daemon(make_config(tmp_path, snapshot_4k, sources={"default": no_cert}),
                                  snapshot_4k) as d:
            res = await d.run_vmm(region_sizes=[1 << 20])
            assert res["stage"] == "handshake" and "not reachable" in res["error"]
    finally:
        await asyncio.to_thread(serve.stop)
