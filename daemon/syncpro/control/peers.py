"""Who may use the control socket: the peer's credentials as the kernel gives them
(SO_PEERCRED, SO_PEERGROUPS) checked against control.allow_uids and control.allow_gids."""

from __future__ import annotations

import os
import pwd
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

from syncpro.config.model import ControlSettings

_UCRED = struct.Struct("iII")  # struct ucred: pid_t pid; uid_t uid; gid_t gid
_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13
# NGROUPS_MAX: with fewer, a peer in more groups fails SO_PEERGROUPS and its groups are looked
# up in the user database, which (LDAP, sssd) may block the accepting thread.
_MAX_GROUPS = 65536


@dataclass(frozen=True)
class Peer:
    """The process at the other end of a unix socket, as the kernel saw it at connect()."""

    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...] | None = None  # supplementary groups, when the kernel says


def peer_of(conn: socket.socket) -> Peer:
    """Given a connected unix socket, return its peer's credentials (SO_PEERCRED). Raise
    OSError if the kernel cannot tell them (the peer left already)."""
    pid, uid, gid = _UCRED.unpack(
        conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    )
    groups: tuple[int, ...] | None
    try:
        raw = conn.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, 4 * _MAX_GROUPS)
        groups = struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4])
    except OSError:
        groups = None  # an old kernel, or more groups than we asked for: ask the user database
    return Peer(pid, uid, gid, groups)


def allowed(settings: ControlSettings, peer: Peer) -> bool:
    """Given the control settings and a peer, return whether it may use the socket: root, this
    process's user, a listed uid, or a member (primary or supplementary group) of a listed
    gid."""
    if peer.uid in (0, os.geteuid()) or peer.uid in settings.allow_uids:
        return True
    if not settings.allow_gids:
        return False
    if peer.gid in settings.allow_gids:
        return True
    groups = peer.groups if peer.groups is not None else user_groups(peer.uid)
    return any(gid in settings.allow_gids for gid in groups)


def refusal(peer: Peer, path: Path) -> str:
    """Given a peer that is not allowed and the socket's path, return what its answer says."""
    return (
        f"uid {peer.uid} (pid {peer.pid}) is not allowed on the control socket {path}:"
        " add it to control.allow_uids or its group to control.allow_gids"
    )


def user_groups(uid: int) -> list[int]:
    """Given a uid, return its groups from the user database; none for an unknown uid."""
    try:
        user = pwd.getpwuid(uid)
    except KeyError:
        return []
    return os.getgrouplist(user.pw_name, user.pw_gid)
