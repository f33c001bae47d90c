"""Helpers for tests, benchmarks and the demo: ``uffdd serve`` as a subprocess, TLS material,
and a stream editor that corrupts page payloads in flight (to prove they are never installed).
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crc32c import crc32c

from uffdd.peer import protocol as p


@dataclass
class ServeProcess:
    """``uffdd serve`` in a subprocess (in a network namespace if ``netns`` is set), JSON log to a file.

    Readiness is its ``serving`` log line, so the log level must stay at info or below."""

    args: Sequence[str]
    log_path: Path
    netns: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    wrapper: Sequence[str] = ()
    """A command prefix, e.g. ``("taskset", "-c", "1")``."""
    proc: subprocess.Popen[bytes] | None = None
    address: tuple[str, int] = ("", 0)

    def start(self, timeout: float = 15) -> ServeProcess:
        cmd = [*self.wrapper, sys.executable, "-m", "uffdd", "serve", *self.args, "--log-format", "json"]
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        self.log_path.write_bytes(b"")
        with open(self.log_path, "ab") as log_fh:
            self.proc = subprocess.Popen(cmd, stdout=log_fh, stderr=subprocess.STDOUT,
                                         env={**os.environ, **self.env})
        deadline = time.monotonic() + timeout
        while True:
            for line in self.log_lines():
                if line.get("event") == "serving":
                    host, _, port = str(line["address"]).rpartition(":")
                    self.address = (host, int(port))
                    return self
            if self.proc.poll() is not None or time.monotonic() > deadline:
                text = self.log_path.read_text()[-3000:]
                self.kill()
                raise RuntimeError(f"uffdd serve did not start (exit {self.proc.returncode}): {text}")
            time.sleep(0.02)

    def log_lines(self) -> list[dict[str, Any]]:
        out = []
        with contextlib.suppress(FileNotFoundError):
            for line in self.log_path.read_text().splitlines():
                with contextlib.suppress(ValueError):
                    doc = json.loads(line)
                    if isinstance(doc, dict):
                        out.append(doc)
        return out

    def stop(self, timeout: float = 10) -> int | None:
        """SIGTERM, then SIGKILL if it does not go."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    """A CA that signed nothing here: trusting it alone must fail the TLS handshake."""


def make_tls_files(directory: Path, server_name: str = "localhost", ip: str = "127.0.0.1") -> TlsFiles:
    """A throwaway CA, a server certificate (for ``server_name`` and ``ip``) and a client one (openssl CLI)."""
    d = directory

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    for ca in ("ca", "other-ca"):
        run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
            "-subj", f"/CN=uffdd test {ca}", "-keyout", str(d / f"{ca}.key"), "-out", str(d / f"{ca}.pem"))
    ext = d / "san.cnf"
    ext.write_text(f"subjectAltName=DNS:{server_name},IP:{ip}\n")
    for who in ("server", "client"):
        run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-subj",
            f"/CN={server_name if who == 'server' else 'uffdd-client'}", "-keyout", str(d / f"{who}.key"),
            "-out", str(d / f"{who}.csr"))
        run("x509", "-req", "-in", str(d / f"{who}.csr"), "-CA", str(d / "ca.pem"), "-CAkey", str(d / "ca.key"),
            "-CAcreateserial", "-days", "2", "-out", str(d / f"{who}.pem"), "-extfile", str(ext))
    return TlsFiles(ca=d / "ca.pem", server_cert=d / "server.pem", server_key=d / "server.key",
                    client_cert=d / "client.pem", client_key=d / "client.key", other_ca=d / "other-ca.pem")


class DataTamperer:
    """Edits a server -> client byte stream: flips one byte in the payload of raw blocks at the
    chosen image offsets, ``times`` times each, leaving the framing intact. With ``recompute``
    it also rewrites those blocks' crc32c, as an attacker on the path would: only a tag can
    tell then."""

    def __init__(self, offsets: dict[int, int], *, recompute: bool = False) -> None:
        self.recompute = recompute
        self.remaining = dict(offsets)
        self.flipped: list[int] = []
        self._buf = bytearray()

    def __call__(self, data: bytes) -> bytes:
        self._buf += data
        out = bytearray()
        while len(self._buf) >= p.HEADER_SIZE:
            ftype, _, count, _, offset, length, _ = p.HEADER.unpack_from(self._buf)
            total = p.HEADER_SIZE + length
            if len(self._buf) < total:
                break
            frame = self._buf[:total]
            del self._buf[:total]
            if ftype == p.FrameType.DATA:
                self._edit(frame, offset, count)
            out += frame
        return bytes(out)

    def _edit(self, frame: bytearray, offset: int, count: int) -> None:
        pos = p.HEADER_SIZE + count * p.DESC_SIZE
        for i in range(count):
            _, stored, enc, _ = p.DESC.unpack_from(frame, p.HEADER_SIZE + i * p.DESC_SIZE)
            off = offset + (i << p.BLOCK_SHIFT)
            if enc == p.Encoding.RAW and self.remaining.get(off, 0) > 0:
                self.remaining[off] -= 1
                frame[pos + 100] ^= 0x5A
                if self.recompute:
                    crc = crc32c(bytes(frame[pos : pos + p.BLOCK_SIZE]))
                    struct.pack_into("<I", frame, p.HEADER_SIZE + i * p.DESC_SIZE, crc)
                self.flipped.append(off)
            pos += stored


class JunkInjector:
    """Makes per-connection stream editors that insert ``junk`` before the ``after``-th DATA frame
    of a connection, ``shots`` times in all: a server that misbehaves once, then behaves."""

    def __init__(self, junk: bytes, *, after: int = 3, shots: int = 1) -> None:
        self.junk = junk
        self.after = after
        self.shots = shots
        self.injected = 0

    def editor(self) -> Callable[[bytes], bytes]:
        buf = bytearray()
        seen = 0

        def edit(data: bytes) -> bytes:
            nonlocal seen
            buf.extend(data)
            out = bytearray()
            while len(buf) >= p.HEADER_SIZE:
                ftype = buf[0]
                length = p.HEADER.unpack_from(buf)[5]
                total = p.HEADER_SIZE + length
                if len(buf) < total:
                    break
                if ftype == p.FrameType.DATA:
                    seen += 1
                    if seen == self.after and self.injected < self.shots:
                        self.injected += 1
                        out += self.junk
                out += buf[:total]
                del buf[:total]
            return bytes(out)

        return edit
