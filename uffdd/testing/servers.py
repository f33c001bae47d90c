"""Real object servers on loopback for tests, benchmarks and the demo: nginx and an S3 server.

nginx (Debian's package) serves an image directory over HTTP with its own temporary config,
on an unprivileged port of 127.0.0.1, never as the system service. Its access log tells which
objects were read; ``fail_percent`` makes it answer that share of requests with a 500, and
``rate`` slows every answer. moto's server mode stands in for S3 as a separate process.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

_NGINX_CONF = """\
{user}worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    log_format uffdd '$request_method $uri $status $body_bytes_sent';
    access_log {prefix}/access.log uffdd;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    keepalive_timeout 60;
    {split}
    server {{
        listen 127.0.0.1:{port} reuseport;
        root {root};
        location / {{
            {fail}
            {rate}
        }}
    }}
}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str, log: Path, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        if proc.poll() is not None or time.monotonic() > deadline:
            text = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(f"{what} did not start on 127.0.0.1:{port}: {text}")
        time.sleep(0.02)


def _stop_group(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGKILL) -> None:
    """Signal the server's whole process group (nginx workers outlive a killed master)."""
    if proc is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class NginxServer:
    """nginx serving ``root`` on 127.0.0.1; start, kill and restart it like a real server."""

    def __init__(self, root: str | os.PathLike[str], workdir: str | os.PathLike[str], port: int | None = None) -> None:
        self.root = Path(root)
        self.prefix = Path(workdir)
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> bool:
        return shutil.which("nginx") is not None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def access_log(self) -> Path:
        return self.prefix / "access.log"

    def start(self, *, fail_percent: float = 0, rate: str | None = None) -> NginxServer:
        """Start (or restart on the same port); ``fail_percent`` of requests get a 500,
        ``rate`` (e.g. "256k") limits each answer's bytes per second."""
        self.stop()
        (self.prefix / "tmp").mkdir(parents=True, exist_ok=True)
        split = fail = ""
        if fail_percent > 0:
            split = f'split_clients "${{request_id}}" $uffdd_fail {{ {fail_percent:g}% 1; * 0; }}'
            fail = "if ($uffdd_fail) { return 500; }"
        conf = _NGINX_CONF.format(
            user="user root;\n" if os.geteuid() == 0 else "", prefix=self.prefix, port=self.port,
            root=self.root.resolve(), split=split, fail=fail, rate=f"limit_rate {rate};" if rate else "")
        path = self.prefix / "nginx.conf"
        path.write_text(conf)
        nginx = shutil.which("nginx") or "nginx"
        self.proc = subprocess.Popen([nginx, "-p", str(self.prefix), "-c", str(path), "-g", "daemon off;"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        _wait_port(self.port, self.proc, "nginx", self.prefix / "error.log")
        return self

    def kill(self) -> None:
        """Die at once, as a crashed server does: connections reset, nothing answers."""
        _stop_group(self.proc)
        self.proc = None

    def stop(self) -> None:
        self.kill()

    def requests(self, pattern: str = "") -> list[tuple[str, str, int, int]]:
        """(method, path, status, body bytes) of each logged request whose path contains ``pattern``."""
        if not self.access_log.exists():
            return []
        out = []
        for line in self.access_log.read_text().splitlines():
            parts = line.split()
            if len(parts) == 4 and pattern in parts[1]:
                out.append((parts[0], parts[1], int(parts[2]), int(parts[3])))
        return out


class StaticServer:
    """Python's own http.server on 127.0.0.1, for machines without nginx (the demo)."""

    def __init__(self, root: str | os.PathLike[str], workdir: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.log = Path(workdir) / "http.log"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> StaticServer:
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory", str(self.root),
                 str(self.port)], stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        _wait_port(self.port, self.proc, "http.server", self.log)
        return self

    def stop(self) -> None:
        _stop_group(self.proc)
        self.proc = None


class MotoServer:
    """moto's S3-compatible server, a separate process on 127.0.0.1; counts requests from its log."""

    def __init__(self, workdir: str | os.PathLike[str], port: int | None = None) -> None:
        self.workdir = Path(workdir)
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.workdir / "moto.log"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """Environment for an S3 client of this server (credentials are not checked)."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "uffdd-test",
                "AWS_SECRET_ACCESS_KEY": "uffdd-test-secret", "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true"}

    def start(self) -> MotoServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        _wait_port(self.port, self.proc, "moto server", self.log)
        return self

    def create_bucket(self, bucket: str) -> None:
        # moto tells the service apart by the credential scope of a signed request.
        scope = "Credential=uffdd-test/20240101/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=0"
        req = urllib.request.Request(f"{self.endpoint}/{bucket}", method="PUT",
                                     headers={"Authorization": f"AWS4-HMAC-SHA256 {scope}"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            resp.read()

    def requests(self, pattern: str = "") -> list[tuple[str, str, int]]:
        """(method, path, status) of each request in the server's log whose path contains ``pattern``."""
        out = []
        text = re.sub(r"\x1b\[[0-9;]*m", "", self.log.read_text())  # werkzeug colours its log
        for m in re.finditer(r'"(GET|PUT|HEAD|POST|DELETE) (\S+) HTTP/[\d.]+" (\d+)', text):
            if pattern in m.group(2):
                out.append((m.group(1), m.group(2), int(m.group(3))))
        return out

    def kill(self) -> None:
        _stop_group(self.proc)
        self.proc = None

    stop = kill
