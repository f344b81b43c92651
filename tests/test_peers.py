"""Who may use the control socket: credentials from the kernel, judged by allow_uids/gids."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from syncpro.config.model import ControlSettings
from syncpro.control.peers import Peer, allowed, peer_of, refusal, user_groups

UNUSED_UID = 2**31 - 7  # no user database names it


def test_the_kernel_names_this_process_as_the_peer_of_a_socketpair() -> None:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with left, right:
        peer = peer_of(left)
    assert (peer.pid, peer.uid, peer.gid) == (os.getpid(), os.geteuid(), os.getegid())
    assert peer.groups is None or set(peer.groups) >= set(os.getgroups()) - {os.getegid()}


def test_supplementary_groups_count_for_allow_gids(tmp_path: Path) -> None:
    settings = ControlSettings(socket=tmp_path / "c.sock", allow_gids=(4242,))
    assert allowed(settings, Peer(pid=1, uid=5000, gid=5000, groups=(100, 4242)))
    assert not allowed(settings, Peer(pid=1, uid=5000, gid=5000, groups=(100,)))
    assert allowed(settings, Peer(pid=1, uid=5000, gid=4242, groups=()))
    assert allowed(settings, Peer(pid=1, uid=0, gid=0, groups=()))
    assert allowed(settings, Peer(pid=1, uid=os.geteuid(), gid=1, groups=()))


def test_a_listed_uid_is_allowed_and_without_allow_gids_no_group_is(tmp_path: Path) -> None:
    settings = ControlSettings(socket=tmp_path / "c.sock", allow_uids=(5000,))
    assert allowed(settings, Peer(pid=1, uid=5000, gid=5000, groups=()))
    assert not allowed(settings, Peer(pid=1, uid=5001, gid=5000, groups=(5000,)))


def test_a_peer_without_kernel_groups_is_judged_by_the_user_database(tmp_path: Path) -> None:
    settings = ControlSettings(socket=tmp_path / "c.sock", allow_gids=(4242,))
    # An unknown uid has no groups there: only its primary gid can let it in.
    assert user_groups(UNUSED_UID) == []
    assert not allowed(settings, Peer(pid=1, uid=UNUSED_UID, gid=5000, groups=None))
    assert allowed(settings, Peer(pid=1, uid=UNUSED_UID, gid=4242, groups=None))


def test_the_refusal_names_the_uid_the_socket_and_the_settings_to_change(tmp_path: Path) -> None:
    text = refusal(Peer(pid=77, uid=5000, gid=5000), tmp_path / "c.sock")
    assert "uid 5000 (pid 77)" in text
    assert str(tmp_path / "c.sock") in text
    assert "control.allow_uids" in text and "control.allow_gids" in text
