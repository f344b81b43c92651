"""The daemon on big trees and many apps: its own reads never overflow the kernel's queue, an
overflow costs one coalesced re-check, and one change of an app costs one sync."""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
from datetime import datetime
from pathlib import Path

import pytest

from syncpro.testing import Daemon, app, put, running, tree, write_config

from helpers import holding

pytestmark = pytest.mark.daemon  # every test here starts syncpro as a subprocess


def many_files(root: Path, folders: int, per_folder: int, content: str = "x") -> None:
    """Write folders x per_folder small files under root, quickly."""
    for d in range(folders):
        folder = root / f"d{d:03}"
        folder.mkdir(parents=True, exist_ok=True)
        for f in range(per_folder):
            fd = os.open(folder / f"f{f:03}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, f"{content}{d}/{f}\n".encode())
            finally:
                os.close(fd)


def read_all(root: Path) -> int:
    """Open and read every file under root, as fast as Python can; return how many."""
    count = 0
    for dirpath, _, names in os.walk(root):
        for name in names:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.read(fd, 64)
            finally:
                os.close(fd)
            count += 1
    return count


def watch_masks(pid: int) -> list[int]:
    """The event masks of every inotify watch of process pid."""
    masks = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{name}") != "anon_inode:inotify":
                continue
            info = Path(f"/proc/{pid}/fdinfo/{name}").read_text()
            masks += [
                int(field.split(":", 1)[1], 16)
                for line in info.splitlines()
                if line.startswith("inotify ")
                for field in line.split()
                if field.startswith("mask:")
            ]
    return masks


def trouble(daemon: Daemon) -> list[str]:
    """What the daemon said of lost events."""
    return [
        str(e)
        for name in ("watch.queue_overflow", "watch.watchdog_warning")
        for e in daemon.find(name)
    ]


def test_syncing_and_rescanning_a_20000_file_app_overflows_nothing(tmp_path: Path) -> None:
    many_files(tmp_path / "r/softdir/big", folders=200, per_folder=100)
    put(tmp_path / "r/softdir/small", {"a.txt": "1\n"})
    apps = [
        app("big", "big"),
        app("small", "small"),
    ]
    with running(write_config(tmp_path, apps)) as daemon:
        # The first sync reads all 20,000 files: two events each if reads were watched,
        # past the kernel's default queue of 16,384.
        daemon.wait_sync("big", timeout=180)
        daemon.wait_sync("small")
        daemon.wait_event("service.rescanned", trigger="catch-up")
        daemon.signal(signal.SIGHUP)  # a reload re-checks every app: a walk of it all
        daemon.wait_event("service.rescanned", count=2, timeout=120)
        # Other readers (the deploy step's rsync) read it too, faster than any reader of
        # the queue drains it: 40,000 reads, no event.
        assert read_all(tmp_path / "r/softdir/big") + read_all(tmp_path / "soft/big") == 40_000
        masks = watch_masks(daemon.proc.pid)
        assert len(masks) > 200, "every folder of the source is watched"
        in_access, in_close_nowrite, in_open = 0x1, 0x10, 0x20
        assert [hex(m) for m in masks if m & (in_access | in_close_nowrite | in_open)] == []
        # inotify keeps the order of one instance: once a change made now in the same root
        # is synced, any overflow queued before it has been reported.
        put(tmp_path / "r/softdir/small", {"a.txt": "2\n"})
        daemon.wait_sync("small", count=2)
        assert trouble(daemon) == []
        assert [e["reasons"] for e in daemon.find("service.rescanned")] == [
            ["catch-up"],
            ["reload"],
        ]
        assert len(daemon.syncs("big")) == 1
        assert len(tree(tmp_path / "soft/big")) == 20_000
        assert daemon.stop() == 0


def test_overflows_are_said_once_and_re_checked_at_most_once_per_max_wait(
    tmp_path: Path,
) -> None:
    put(tmp_path / "r/softdir/small", {"a.txt": "1\n"})
    bigs = ["big1", "big2", "big3"]
    apps = [app(key, key) for key in ["small", *bigs]]
    max_wait = 4.0
    config = write_config(tmp_path, apps, watch={"settle": 0.3, "max_wait": max_wait})
    for key in bigs:  # watched from the start: files made in them while stopped are queued
        for d in range(80):
            (tmp_path / "r/softdir" / key / f"d{d:03}").mkdir(parents=True)

    def rechecked_after_overflow(number: int) -> bool:
        """Whether overflow `number` was reported and a re-check followed it."""
        names = [e.get("event") for e in daemon.events]
        seen = [i for i, name in enumerate(names) if name == "watch.queue_overflow"]
        return len(seen) >= number and "service.rescanned" in names[seen[number - 1] :]

    with running(config) as daemon:
        daemon.wait_sync("small")
        for key in bigs:
            daemon.wait_sync(key)
        for number, key in enumerate(bigs, 1):
            # While the daemon is stopped the kernel queues every event of 8,000 new files
            # (created, modified, closed: 24,000), past its queue of 16,384: an overflow.
            daemon.signal(signal.SIGSTOP)
            try:
                many_files(tmp_path / "r/softdir" / key, folders=80, per_folder=100)
            finally:
                daemon.signal(signal.SIGCONT)
            # Past the re-check, watchdog's rebuild of its watches after the overflow is done
            # too: the next files land in watched folders. (Where the rebuild was still going
            # on, the files were never seen and the re-check syncs them.)
            daemon.wait(
                lambda n=number, k=key: rechecked_after_overflow(n) or len(daemon.syncs(k)) > 1,
                timeout=60,
                what=f"overflow {number} re-checked",
            )
        for key in bigs:
            daemon.wait_sync(key, count=2, timeout=120)
        daemon.wait(
            lambda: rechecked_after_overflow(len(daemon.find("watch.queue_overflow"))),
            timeout=60,
            what="the last re-check",
        )
        put(tmp_path / "r/softdir/small", {"a.txt": "2\n"})
        daemon.wait_sync("small", count=2, timeout=60)
        for key in bigs:
            assert len(tree(tmp_path / "soft" / key)) == 8000
            # A re-check never adds a run for an app pending or running: at most one for an
            # app whose events were all lost. (Events delivered while its sync runs give one
            # more run after it: that is the watcher's, not the re-check's.)
            by = [e["response"]["trigger"]["by"] for e in daemon.syncs(key)]
            assert by.count("rescan") <= 1, by
            assert len(by) <= 3, by
        overflows = daemon.find("watch.queue_overflow")
        assert len(overflows) >= 2
        advice = [e for e in overflows if "error" in e]
        assert len(advice) == 1, "the sysctl to raise is said once"
        queued = Path("/proc/sys/fs/inotify/max_queued_events").read_text().strip()
        assert f"fs.inotify.max_queued_events = {queued}" in advice[0]["error"]
        rechecks = [
            datetime.fromisoformat(e["timestamp"]).timestamp()
            for e in daemon.find("service.rescanned")
            if "overflow" in e["reasons"]
        ]
        assert 1 <= len(rechecks) <= 3
        gaps = [b - a for a, b in itertools.pairwise(rechecks)]
        # Stamped when each ends: a re-check's own walk may make a gap a little shorter.
        assert all(gap >= max_wait * 0.75 for gap in gaps), gaps
        assert daemon.stop() == 0


def test_one_change_of_an_app_is_one_sync_during_a_catch_up_and_at_200_apps(
    tmp_path: Path,
) -> None:
    keys = [f"a{i:03}" for i in range(200)]
    for key in keys:
        many_files(tmp_path / "r/softdir" / key, folders=2, per_folder=20, content=key)
    apps = [app(key, key) for key in keys]
    config = write_config(tmp_path, apps, watch={"workers": 1})
    first, changed = keys[0], keys[150]
    held = contextlib.ExitStack()
    lock = held.enter_context(holding(tmp_path / "soft", first))
    try:
        with running(config) as daemon:
            # The catch-up's first sync waits on a lock: every other app is still pending.
            daemon.wait(lambda: daemon.waits_for_lock(lock), what="the first sync blocked")
            daemon.wait_event("service.rescanned", trigger="catch-up")
            put(tmp_path / "r/softdir" / changed, {"d000/f000": "changed in the catch-up\n"})
            put(tmp_path / "r/softdir" / first, {"d000/f000": "changed while syncing\n"})
            held.close()
            daemon.wait(
                lambda: daemon.synced() == set(keys),
                timeout=180,
                what="every app caught up",
            )
            daemon.wait_sync(first, count=2)
            assert len(daemon.syncs(changed)) == 1, "its pending catch-up run took the change"
            assert tree(tmp_path / "soft" / changed)["d000/f000"] == "changed in the catch-up\n"
            before = {key: len(daemon.syncs(key)) for key in keys}
            # One file in each of 200 apps at once.
            for key in keys:
                put(tmp_path / "r/softdir" / key, {"d001/f001": "200 at once\n"})
            daemon.wait(
                lambda: all(len(daemon.syncs(key)) > before[key] for key in keys),
                timeout=180,
                what="all 200 apps synced",
            )
            # A change made after all that, once synced, says no run is left behind.
            put(tmp_path / "r/softdir" / first, {"late.txt": "late\n"})
            daemon.wait_sync(first, count=before[first] + 2)
            assert {key: len(daemon.syncs(key)) - before[key] for key in keys[1:]} == {
                key: 1 for key in keys[1:]
            }
            assert trouble(daemon) == []
            assert daemon.stop() == 0
    finally:
        held.close()


def test_a_re_check_never_syncs_again_an_app_whose_sync_is_running(tmp_path: Path) -> None:
    put(tmp_path / "r/softdir/slow", {"a.txt": "1\n"})
    put(tmp_path / "r/softdir/other", {"b.txt": "1\n"})
    apps = [app("slow", "slow"), app("other", "o")]
    held = contextlib.ExitStack()
    lock = held.enter_context(holding(tmp_path / "soft", "slow"))
    try:
        with running(write_config(tmp_path, apps)) as daemon:
            daemon.wait(lambda: daemon.waits_for_lock(lock), what="the sync of slow blocked")
            daemon.wait_sync("other")
            daemon.signal(signal.SIGHUP)  # a reload re-checks every app
            rescan = daemon.wait_event("service.rescanned", reasons=["reload"])
            assert rescan["changed"] == []
            assert rescan["busy"] == 1
            held.close()
            daemon.wait_sync("slow")
            put(tmp_path / "r/softdir/other", {"b.txt": "2\n"})
            daemon.wait_sync("other", count=2)
            assert len(daemon.syncs("slow")) == 1
            assert tree(tmp_path / "soft/slow") == {"a.txt": "1\n"}
            assert daemon.stop() == 0
    finally:
        held.close()
