"""The daemon under real faults: a damaged state, no inotify instance left, a read-only target."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from syncpro.testing import put, running, tree, write_config

from helpers import TWO_APPS as APPS
from helpers import limit_inotify_instances

pytestmark = pytest.mark.daemon  # every test here starts syncpro as a subprocess


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def _garbage(path: Path) -> None:
    path.write_bytes(os.urandom(path.stat().st_size))


def _damage_page_2(path: Path) -> None:
    with path.open("r+b") as db:
        page = int.from_bytes(db.read(18)[16:18], "big")
        db.seek(page)
        db.write(b"\xa5" * page)


@pytest.mark.parametrize(
    "damage", [_truncate, _garbage, _damage_page_2], ids=["truncated", "garbage", "page 2"]
)
def test_a_damaged_state_is_set_aside_and_every_app_caught_up(base: Path, damage: object) -> None:
    config = write_config(base, APPS)
    with running(config) as daemon:
        daemon.wait_sync("server1")
        daemon.wait_sync("web1")
        assert daemon.stop() == 0
    state = base / "state/state.sqlite3"
    assert callable(damage)
    damage(state)
    put(base / "r/softdir/web1", {"index.html": "changed while down\n"})
    with running(config) as daemon:
        aside = daemon.wait_event("state.set_aside")
        assert aside["level"] == "error"
        assert Path(aside["moved_to"]).exists()
        rescan = daemon.wait_event("service.rescanned", trigger="catch-up")
        # Nothing is known any more: every app counts as changed.
        assert {(c["app_key"], c["update"]) for c in rescan["changed"]} == {
            ("server1", False),
            ("web1", False),
        }
        daemon.wait_sync("server1")
        daemon.wait_sync("web1")
        assert tree(base / "soft/web") == {"index.html": "changed while down\n"}
        # Still watching, and recording.
        put(base / "r/softdir/server1", {"bin/run.sh": "v2\n"})
        daemon.wait_sync("server1", count=2)
        assert daemon.stop() == 0
    with running(config) as daemon:
        rescan = daemon.wait_event("service.rescanned", trigger="catch-up")
        assert rescan["changed"] == [], "the rebuilt state was recorded and is read back"
        assert daemon.find("state.set_aside") == []
        assert daemon.stop() == 0


def test_with_no_inotify_instance_left_at_start_every_root_is_polled(base: Path) -> None:
    wrapper = base / "no-inotify.sh"
    # A user namespace of its own, whose instance limit is 0: no global setting is touched.
    wrapper.write_text(
        'echo 0 > /proc/sys/user/max_inotify_instances && exec "$@"\n', encoding="utf-8"
    )
    wrap = ["unshare", "-U", "-r", "sh", str(wrapper)]
    config = write_config(base, APPS, watch={"poll_interval": 0.2})
    with running(config, wrap=wrap) as daemon:
        started = daemon.wait_event("service.started")
        assert set(started["backends"].values()) == {"polling"}
        limits = daemon.find("watch.inotify_limit")
        assert {e["root"] for e in limits} == {str(base / "r"), str(base / "u")}
        error = limits[0]["error"]
        assert "/proc/sys/user/max_inotify_instances = 0 in this user namespace" in error
        assert "fs.inotify.max_user_instances" in error
        daemon.wait_sync("server1")
        put(base / "r/softdir/server1", {"bin/run.sh": "polled\n"})
        daemon.wait(
            lambda: tree(base / "soft/server").get("bin/run.sh") == "polled\n",
            what="the change published by polling",
        )
        assert daemon.stop() == 0


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[Callable[[], None]]:
    """Make folder a read-only bind mount of itself; yield what makes it writable again
    (also done at the end of the block, whatever happens)."""
    subprocess.run(["mount", "--bind", str(folder), str(folder)], check=True)
    mounted = [True]

    def writable() -> None:
        if mounted.pop(0):
            subprocess.run(["umount", str(folder)], check=True)
            mounted.append(False)

    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(folder)], check=True)
        yield writable
    finally:
        if mounted and mounted[0]:
            writable()


def ctl_status(config: Path) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "syncpro", "ctl", "status", "--config", str(config)],
        capture_output=True,
        check=False,
    )
    # 1 while an app's last sync failed, as these tests make happen: the answer still came.
    assert done.returncode in (0, 1), done.stderr
    status: dict[str, Any] = json.loads(done.stdout)
    return status


def test_a_sync_failed_on_a_read_only_target_is_retried_with_backoff_until_it_succeeds(
    base: Path,
) -> None:
    config = write_config(base, APPS)
    with running(config) as daemon:
        daemon.wait_sync("server1")
        daemon.wait_sync("web1")
        with read_only(base / "soft") as writable:
            put(base / "r/softdir/server1", {"bin/run.sh": "v2\n"})
            first = daemon.wait_event("sync.retry_scheduled", app_key="server1")
            assert first["attempt"] == 1 and first["retry_in"] == 5.0
            assert "Read-only file system" in first["error"]
            retrying = ctl_status(config)["retrying"]
            assert [(r["app_key"], r["update"], r["attempts"]) for r in retrying] == [
                ("server1", False, 1)
            ]
            assert 0 < retrying[0]["retry_in"] <= 5.0
            # The same sources failing again wait twice as long.
            second = daemon.wait_event("sync.retry_scheduled", count=2, app_key="server1")
            assert second["attempt"] == 2 and second["retry_in"] == 10.0
            assert daemon.syncs("server1")[-1]["response"]["trigger"]["by"] == "retry"
            writable()
            done = daemon.wait_event("sync.retry_succeeded", app_key="server1", timeout=30)
            assert done["attempts"] == 2
        assert tree(base / "soft/server") == {"bin/run.sh": "v2\n"}
        assert ctl_status(config)["retrying"] == []
        assert daemon.stop() == 0


def test_a_root_made_again_with_no_inotify_instance_left_is_polled(base: Path) -> None:
    wrap = ["unshare", "-U", "-r"]  # a user namespace with limits of its own
    with running(write_config(base, APPS, watch={"poll_interval": 0.2}), wrap=wrap) as daemon:
        daemon.wait_sync("server1")
        # Both roots hold an instance each; none is left for a third.
        limit_inotify_instances(daemon.proc.pid, 2)
        shutil.rmtree(base / "r")
        daemon.wait_event("watch.root_missing", root=str(base / "r"))
        limit = daemon.wait_event("watch.inotify_limit", root=str(base / "r"))
        assert "/proc/sys/user/max_inotify_instances = 2 in this user namespace" in limit["error"]
        daemon.wait(
            lambda: ctl_status(daemon.config)["watched"][str(base / "r")] == "polling",
            what="the root made again polled",
        )
        put(base / "r/softdir/server1", {"bin/run.sh": "after the root came back\n"})
        daemon.wait(
            lambda: tree(base / "soft/server").get("bin/run.sh") == "after the root came back\n",
            what="the change published by polling",
        )
        assert daemon.stop() == 0


@contextlib.contextmanager
def small_filesystem(where: Path, size: str = "4M") -> Iterator[Path]:
    """Mount a small ext4 of its own, loop-mounted from a file, at where, for the block."""
    image = where.with_name(f"{where.name}.img")
    subprocess.run(["truncate", "-s", size, str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)
        image.unlink()


def fill(folder: Path) -> None:
    """Write into folder until its filesystem has not one block left (as root: reserve too)."""
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for chunk in (65536, 1):
            with contextlib.suppress(OSError):
                while os.write(fd, b"\0" * chunk):
                    pass
    finally:
        os.close(fd)


def test_a_state_that_fails_in_use_is_rebuilt_and_the_daemon_goes_on(base: Path) -> None:
    with small_filesystem(base / "state") as state:
        config = write_config(base, APPS)
        with running(config) as daemon:
            daemon.wait_sync("server1")
            daemon.wait_sync("web1")
            fill(state)
            # The next record after this sync finds the disk full.
            put(base / "r/softdir/web1", {"index.html": "while the state disk is full\n"})
            aside = daemon.wait_event("state.set_aside")
            assert aside["level"] == "error"
            daemon.wait_event("state.in_memory")
            # Nothing is recorded any more but what web1's sync recorded in the new one:
            # every other app counts as changed and is synced again.
            rescan = daemon.wait_event("service.rescanned", reasons=["state_rebuilt"])
            assert rescan["changed"] == [
                {"app_key": "server1", "update": False, "parts": ["config", "program"]}
            ]
            daemon.wait_sync("server1", count=2)
            assert ctl_status(config)["state"]["in_memory"] is True
            put(base / "r/softdir/server1", {"bin/run.sh": "still watched\n"})
            daemon.wait(
                lambda: tree(base / "soft/server").get("bin/run.sh") == "still watched\n",
                what="a later change published",
            )
            assert tree(base / "soft/web") == {"index.html": "while the state disk is full\n"}
            assert daemon.stop() == 0
