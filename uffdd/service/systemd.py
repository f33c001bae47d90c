"""The sd_notify(3) protocol, stdlib only: one datagram of KEY=VALUE lines to $NOTIFY_SOCKET."""

from __future__ import annotations

import os
import socket


def notify(*lines: str) -> bool:
    """Send ``lines`` (e.g. "READY=1") to the service manager; False if none is listening."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]  # abstract namespace
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.sendto("\n".join(lines).encode(), addr)
        except OSError:
            return False
    return True
