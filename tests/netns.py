"""Network namespaces for tests: a source "host" in its own namespace, joined to this one by a
veth pair, with netem delay when the kernel has it, and links that can be cut and restored.

Addresses come from 198.18.0.0/15 (reserved for benchmarking) and exist only on the veth pair
these helpers create; everything is deleted when the context ends, whatever happened.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

_counter = 0


def ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = ["ip", *args] if ns is None else ["ip", "netns", "exec", ns, "ip", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=check)


def tc(*args: str, ns: str | None = None) -> subprocess.CompletedProcess[str]:
    cmd = ["tc", *args] if ns is None else ["ip", "netns", "exec", ns, "tc", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)


def unavailable_reason() -> str | None:
    """Why namespaces cannot be used here, or None if they can (tried for real, then removed)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    name = f"uffdd-probe-{os.getpid()}"
    try:
        done = ip("netns", "add", name, check=False)
        if done.returncode:
            return f"ip netns add refused: {done.stderr.strip()}"
        return None
    except (OSError, subprocess.SubprocessError) as exc:
        return f"cannot run ip: {exc}"
    finally:
        ip("netns", "del", name, check=False)


@dataclass
class Link:
    """A veth pair: ``host_dev`` here, ``ns_dev`` in namespace ``ns``."""

    ns: str
    host_dev: str
    ns_dev: str
    host_ip: str
    ns_ip: str
    delay: str | None
    """The netem delay applied on both ends, or None when this kernel has no netem."""
    delay_error: str = ""

    def cut_here(self) -> None:
        """Take this side's interface down: sends fail at once (no route)."""
        ip("link", "set", self.host_dev, "down")

    def restore_here(self) -> None:
        ip("link", "set", self.host_dev, "up")

    def cut_far(self) -> None:
        """Take the far side's interface down: packets vanish silently, as on a pulled cable."""
        ip("link", "set", self.ns_dev, "down", ns=self.ns)

    def restore_far(self) -> None:
        ip("link", "set", self.ns_dev, "up", ns=self.ns)


@contextlib.contextmanager
def veth_namespace(delay: str = "1ms") -> Iterator[Link]:
    """A fresh namespace with a veth link to this one; removed on exit."""
    global _counter
    _counter += 1
    tag = f"{os.getpid() % 100000}x{_counter}"
    ns = f"uffdd-src-{tag}"
    host_dev, ns_dev = f"ufd{tag}a"[:15], f"ufd{tag}b"[:15]
    subnet = (os.getpid() + _counter) % 200 + 20
    host_ip, ns_ip = f"198.18.{subnet}.2", f"198.18.{subnet}.1"
    try:
        ip("netns", "add", ns)
        ip("link", "add", host_dev, "type", "veth", "peer", "name", ns_dev)
        ip("link", "set", ns_dev, "netns", ns)
        ip("addr", "add", f"{host_ip}/30", "dev", host_dev)
        ip("addr", "add", f"{ns_ip}/30", "dev", ns_dev, ns=ns)
        ip("link", "set", host_dev, "up")
        ip("link", "set", ns_dev, "up", ns=ns)
        ip("link", "set", "lo", "up", ns=ns)
        applied: str | None = delay
        err = ""
        for dev, where in ((host_dev, None), (ns_dev, ns)):
            done = tc("qdisc", "add", "dev", dev, "root", "netem", "delay", delay, ns=where)
            if done.returncode:
                applied, err = None, done.stderr.strip()
                break
        yield Link(ns, host_dev, ns_dev, host_ip, ns_ip, applied, err)
    finally:
        ip("link", "del", host_dev, check=False)
        ip("netns", "del", ns, check=False)
