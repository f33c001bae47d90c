"""Who is on the other end of a VMM connection, and whether it may claim the guest it names.

The kernel records the connecting process's pid, uid and gid at connect() (SO_PEERCRED) and its
supplementary groups (SO_PEERGROUPS): nothing the peer sends can change them. With ``access:``
in the config, a handshake is served only if a rule whose ``vm_id`` glob matches allows that
uid, or one of those gids; otherwise it is refused with a line saying why (see AccessConfig).
"""

from __future__ import annotations

import array
import fnmatch
import socket
from dataclasses import dataclass

from uffdd.config import AccessConfig
from uffdd.errors import HandshakeError
from uffdd.unixsock import UCRED

SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
"""Linux 4.13+; the constant is missing from some Python builds."""
_MAX_GROUPS = 65536


@dataclass(frozen=True)
class PeerCred:
    """The connecting process as the kernel saw it at connect()."""

    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...] = ()
    """Supplementary groups (empty where SO_PEERGROUPS is not available)."""

    def fields(self) -> dict[str, int]:
        """For log lines: ``peer_pid``, ``peer_uid``, ``peer_gid``."""
        return {"peer_pid": self.pid, "peer_uid": self.uid, "peer_gid": self.gid}


def _peer_groups(sock: socket.socket) -> tuple[int, ...]:
    size = 64
    while size <= _MAX_GROUPS:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size * 4)
        except OSError as exc:
            if exc.errno == 34:  # ERANGE: more groups than room
                size *= 4
                continue
            return ()
        groups = array.array("I")
        groups.frombytes(raw[: len(raw) - len(raw) % 4])
        return tuple(groups)
    return ()


def peer_cred(sock: socket.socket) -> PeerCred:
    """SO_PEERCRED (and SO_PEERGROUPS) of a connected Unix socket."""
    pid, uid, gid = UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, UCRED.size))
    return PeerCred(pid, uid, gid, _peer_groups(sock))


def check_access(policy: AccessConfig | None, vm_id: str, cred: PeerCred) -> None:
    """Return if ``cred`` may claim ``vm_id`` (always, without a policy); HandshakeError saying
    why not otherwise. The message names the peer as the kernel saw it, never the rules."""
    if policy is None:
        return
    matching = [r for r in policy.rules if fnmatch.fnmatchcase(vm_id, r.vm_id)]
    gids = {cred.gid, *cred.groups}
    if any(cred.uid in r.uids or gids.intersection(r.gids) for r in matching):
        return
    who = f"uid {cred.uid}, gid {cred.gid}" + (f", groups {sorted(set(cred.groups))}" if cred.groups else "")
    if not matching:
        raise HandshakeError(f"access: no access rule matches vm_id {vm_id!r}: it may not be claimed "
                             f"(connecting process: pid {cred.pid}, {who})")
    raise HandshakeError(f"access: vm_id {vm_id!r} may not be claimed by pid {cred.pid} ({who}): "
                         f"the rules for it allow other uids/gids")
