"""The daemon as a real subprocess: watching, debouncing, catch-up, signals, sd_notify."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from syncpro.testing import Daemon, app, group, put, running, tree, wait_until, write_config

from helpers import holding, limit_inotify_instances

pytestmark = pytest.mark.daemon  # every test here starts syncpro as a subprocess

# The conftest's `base` holds the sources of server1 and web1; server2 has none.
APPS = [*group("server", "server1", "server2"), app("web1", "web")]


def tick_past(probe: Path, ctime_ns: int) -> None:
    """File times tick coarsely: wait until a file written now has a later ctime."""
    wait_until(lambda: probe.write_text("x") and probe.stat().st_ctime_ns > ctime_ns)


def test_ready_is_notified_and_the_catch_up_syncs_existing_sources(base: Path) -> None:
    with running(write_config(base, APPS)) as daemon:
        sync = daemon.wait_sync("server1")
        daemon.wait_sync("web1")
        assert sync["response"]["trigger"]["by"] == "catch-up"
        assert sync["response"]["param"] == {
            "action": "Deploy:Core:syncpro",
            "k": "server1",
            "update": "0",
        }
        assert tree(base / "soft/server") == {"bin/run.sh": "v1\n"}
        assert tree(base / "conf/server/server1") == {"app.properties": "node=1\n"}
        assert daemon.stop() == 0


def test_an_rsync_upload_is_published_by_itself(
    base: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    upload = tmp_path_factory.mktemp("upload")
    # A new size: rsync's quick check skips same-size files written within one second.
    put(upload, {"bin/run.sh": "version 2\n", "lib/app.jar": "jar v2\n"})
    with running(write_config(base, APPS)) as daemon:
        daemon.wait_sync("server1")
        subprocess.run(
            ["rsync", "-a", "--delete", f"{upload}/", str(base / "r/softdir/server1")],
            check=True,
        )
        sync = daemon.wait_sync("server1", count=2)
        assert sync["response"]["trigger"]["by"] == "watcher"
        daemon.wait(lambda: tree(base / "soft/server") == tree(upload), what="published upload")
        assert daemon.stop() == 0


def test_a_slow_rsync_upload_is_never_published_half_written(
    base: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    upload = tmp_path_factory.mktemp("upload")
    big = upload / "lib/big.bin"
    big.parent.mkdir(parents=True)
    big.write_bytes(os.urandom(300_000))
    published = base / "soft/server/lib/big.bin"
    seen_sizes: set[int] = set()
    done = threading.Event()

    def watch_target() -> None:
        while not done.is_set():
            with contextlib.suppress(FileNotFoundError):
                seen_sizes.add(published.stat().st_size)
            done.wait(0.02)

    with running(write_config(base, APPS, watch={"settle": 0.2})) as daemon:
        daemon.wait_sync("server1")
        watcher = threading.Thread(target=watch_target)
        watcher.start()
        try:
            # ~3 s at 100 KiB/s: many settle periods pass while rsync writes its temp file.
            subprocess.run(
                ["rsync", "-a", "--bwlimit=100", f"{upload}/", str(base / "r/softdir/server1")],
                check=True,
            )
            daemon.wait(
                lambda: published.exists() and published.read_bytes() == big.read_bytes(),
                what="the whole file published",
            )
        finally:
            done.set()
            watcher.join()
        assert seen_sizes <= {big.stat().st_size}, f"half-written sizes seen: {seen_sizes}"
        assert daemon.stop() == 0


def test_a_burst_of_300_files_costs_one_sync(
    base: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    upload = tmp_path_factory.mktemp("upload")
    put(upload, {f"data/{i:03d}.txt": f"{i}\n" for i in range(300)})
    with running(write_config(base, APPS, watch={"settle": 1.5, "max_wait": 30})) as daemon:
        daemon.wait_sync("server1")
        subprocess.run(["cp", "-a", f"{upload}/data", str(base / "r/softdir/server1/")], check=True)
        sync = daemon.wait_sync("server1", count=2)
        assert len(sync["response"]["apps"][0]["program"]) > 0
        assert sync["response"]["apps"][1 - 1]["app_key"] == "server1"
        # A marker change in another app, made after the burst, syncs after it; by then any
        # second run of server1 would have been due long before.
        put(base / "r/softdir/web1", {"marker": "m\n"})
        daemon.wait_sync("web1", count=2)
        assert len(daemon.syncs("server1")) == 2
        assert len(tree(base / "soft/server/data")) == 300
        assert daemon.stop() == 0


def test_a_restart_syncs_only_what_changed_while_down(base: Path) -> None:
    config = write_config(base, APPS)
    with running(config) as daemon:
        daemon.wait_sync("server1")
        daemon.wait_sync("web1")
        assert daemon.stop() == 0
    put(base / "r/softdir/server1", {"bin/run.sh": "v3 while down\n"})
    with running(config) as daemon:
        rescan = daemon.wait_event("service.rescanned", trigger="catch-up")
        assert rescan["changed"] == [{"app_key": "server1", "update": False, "parts": ["program"]}]
        daemon.wait_sync("server1")
        assert tree(base / "soft/server") == {"bin/run.sh": "v3 while down\n"}
        assert daemon.syncs("web1") == []
        assert daemon.stop() == 0


def test_a_first_start_queues_apps_never_synced_without_walking_their_sources(
    base: Path,
) -> None:
    # Their syncs walk them anyway: a first start of many apps must not walk them twice.
    config = write_config(base, APPS)
    with running(config) as daemon:
        rescan = daemon.wait_event("service.rescanned", trigger="catch-up")
        assert rescan["walked"] == 0
        assert sorted(c["app_key"] for c in rescan["changed"]) == ["server1", "web1"]
        daemon.wait_sync("server1")
        daemon.wait_sync("web1")
        assert daemon.stop() == 0
    # Once recorded, they are compared with the record, which takes a walk.
    with running(config) as daemon:
        rescan = daemon.wait_event("service.rescanned", trigger="catch-up")
        assert rescan["walked"] == 2 and rescan["changed"] == []
        assert daemon.stop() == 0


def test_a_first_start_walks_an_app_with_sources_in_both_modes_to_order_them(
    base: Path,
) -> None:
    # Both modes publish to the same targets: the newest arrival must run last, and only
    # a walk says which arrived last.
    put(base / "u/softdir/web", {"index.html": "update build\n"})
    with running(write_config(base, APPS)) as daemon:
        rescan = daemon.wait_event("service.rescanned", trigger="catch-up")
        web = [c for c in rescan["changed"] if c["app_key"] == "web1"]
        assert [c["update"] for c in web] == [False, True]
        assert rescan["walked"] == 2
        daemon.wait_sync("web1", update=True)
        assert tree(base / "soft/web") == {"index.html": "update build\n"}
        assert daemon.stop() == 0


def test_both_modes_changed_while_down_apply_oldest_arrival_first(
    base: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    upload = tmp_path_factory.mktemp("upload")
    put(upload, {"index.html": "uploaded last, with the uploader's old mtime\n"})
    os.utime(upload / "index.html", (1_000_000, 1_000_000))
    put(base / "u/softdir/web", {"index.html": "newer build\n"})
    put(base / "u/configuredir/web/web1", {"web.conf": "w2\n"})
    build_arrived = max(p.stat().st_ctime_ns for p in (base / "u").rglob("*"))
    # File times tick coarsely: let the clock pass the build's arrival before the upload.
    probe = tmp_path_factory.mktemp("clock") / "probe"
    wait_until(lambda: probe.write_text("x") and probe.stat().st_ctime_ns > build_arrived)
    subprocess.run(["rsync", "-a", f"{upload}/", str(base / "r/softdir/web1")], check=True)
    assert (base / "r/softdir/web1/index.html").stat().st_mtime == 1_000_000
    with running(write_config(base, APPS)) as daemon:
        daemon.wait_sync("web1", update=True)
        daemon.wait_sync("web1", update=False)
        order = [e["update"] for e in daemon.syncs("web1")]
        assert order == [True, False]
        assert tree(base / "soft/web") == {
            "index.html": "uploaded last, with the uploader's old mtime\n"
        }
        assert daemon.stop() == 0


def test_a_catch_up_in_one_group_leaves_each_apps_newest_arrival_published(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    apps = [
        app("C", "other"),
        app("A", "g"),
        app("B", "g"),
    ]
    probe = tmp_path_factory.mktemp("clock") / "probe"
    # Arrival order, oldest first: B's update=1 comes before A's two changes, A's update=0
    # before its update=1, and B's update=0 last of all.
    arrivals = [
        ("r/softdir/C", {"c.txt": "c\n"}),
        ("u/configuredir/g/B", {"b.conf": "B update=1, older\n"}),
        ("r/configuredir/A", {"a.conf": "A update=0, older\n"}),
        ("u/configuredir/g/A", {"a.conf": "A update=1, newest\n"}),
        ("r/configuredir/B", {"b.conf": "B update=0, newest\n"}),
    ]
    for rel, files in arrivals:
        put(tmp_path / rel, files)
        tick_past(probe, max(p.stat().st_ctime_ns for p in (tmp_path / rel).rglob("*")))
    config = write_config(tmp_path, apps, watch={"workers": 1})
    # The one worker is kept busy with C while the catch-up hands in all of group g's keys,
    # so that they are all due together when it frees up.
    held = contextlib.ExitStack()
    lock = held.enter_context(holding(tmp_path / "soft", "other"))
    try:
        with running(config) as daemon:
            daemon.wait(lambda: daemon.waits_for_lock(lock), what="C's sync blocked mid-way")
            daemon.wait_event("service.rescanned", trigger="catch-up")
            held.close()
            keys = {(k, u) for k in "AB" for u in (False, True)}
            daemon.wait(
                lambda: keys <= {(k, e["update"]) for e in daemon.syncs() for k in e["k"].split()},
                what="both modes of A and B synced",
            )
            runs = [(e["k"], e["update"]) for e in daemon.syncs()]
            assert runs == [("C", False), ("B", True), ("A B", False), ("A", True)]
            assert tree(tmp_path / "conf/g") == {
                "A/a.conf": "A update=1, newest\n",
                "B/b.conf": "B update=0, newest\n",
            }
            assert daemon.stop() == 0
    finally:
        held.close()


def test_a_program_build_in_updatedir_syncs_the_whole_group_once(base: Path) -> None:
    put(base / "u/configuredir/server/server1", {"a.conf": "1\n"})
    put(base / "u/configuredir/server/server2", {"a.conf": "2\n"})
    with running(write_config(base, APPS)) as daemon:
        daemon.wait_sync("server1 server2", update=True)
        put(base / "u/softdir/server", {"bin/run.sh": "build 2\n"})
        daemon.wait_sync("server1 server2", update=True, count=2)
        assert tree(base / "soft/server") == {"bin/run.sh": "build 2\n"}
        assert [e["k"] for e in daemon.syncs(update=True)] == ["server1 server2"] * 2
        assert daemon.stop() == 0


def test_sighup_adds_an_app_and_syncs_it(base: Path) -> None:
    config = write_config(base, APPS)
    put(base / "r/softdir/api1", {"api.bin": "api\n"})
    put(base / "r/configuredir/api1", {"api.conf": "a\n"})
    with running(config) as daemon:
        daemon.wait_sync("web1")
        assert daemon.syncs("api1") == []  # api1's files were there before it was known
        write_config(base, [*APPS, app("api1", "api")])
        daemon.signal(signal.SIGHUP)
        daemon.wait_note("RELOADING=1")
        daemon.wait_sync("api1")
        assert tree(base / "soft/api") == {"api.bin": "api\n"}
        assert daemon.notes.count("READY=1") >= 2
        assert daemon.stop() == 0


def test_a_broken_config_on_sighup_keeps_the_old_one_running(base: Path) -> None:
    config = write_config(base, APPS)
    with running(config) as daemon:
        daemon.wait_sync("server1")
        config.write_text("dirs: [unclosed\n", encoding="utf-8")
        daemon.signal(signal.SIGHUP)
        failed = daemon.wait_event("service.reload_failed")
        assert str(config) in failed["error"]
        put(base / "r/softdir/server1", {"bin/run.sh": "after bad reload\n"})
        daemon.wait(
            lambda: tree(base / "soft/server") == {"bin/run.sh": "after bad reload\n"},
            what="the change published with the old config",
        )
        assert daemon.stop() == 0


def test_sigterm_says_stopping_and_exits_zero(base: Path) -> None:
    with running(write_config(base, APPS)) as daemon:
        daemon.wait_sync("server1")
        assert daemon.stop() == 0
        assert "STOPPING=1" in daemon.notes
        assert daemon.find("service.stopped")


def test_watchdog_keepalives_follow_watchdog_usec(base: Path) -> None:
    env = {"WATCHDOG_USEC": "400000"}
    with running(write_config(base, APPS), env=env) as daemon:
        daemon.wait_note("WATCHDOG=1", count=3, timeout=20)
        assert daemon.stop() == 0


def test_paths_of_no_known_app_are_logged_once_and_ignored(base: Path) -> None:
    with running(write_config(base, APPS)) as daemon:
        daemon.wait_sync("server1")
        put(base / "r/softdir/ghost", {"a": "1\n"})
        daemon.wait_event("watch.unknown_app", where="remotecomdir:ghost")
        put(base / "r/softdir/ghost", {"b": "2\n"})
        put(base / "r/softdir/server1", {"bin/run.sh": "v4\n"})
        daemon.wait_sync("server1", count=2)
        assert len(daemon.find("watch.unknown_app", where="remotecomdir:ghost")) == 1
        assert daemon.stop() == 0


def test_temporary_upload_files_neither_trigger_nor_get_published(base: Path) -> None:
    with running(write_config(base, APPS)) as daemon:
        daemon.wait_sync("server1")
        put(base / "r/softdir/server1", {".run.sh.AbC123": "partial", "x.part": "p", "y.tmp": "t"})
        put(base / "r/softdir/web1", {"after.txt": "a\n"})
        daemon.wait_sync("web1", count=2)
        assert len(daemon.syncs("server1")) == 1
        put(base / "r/softdir/server1", {"real.txt": "r\n"})
        daemon.wait(
            lambda: tree(base / "soft/server") == {"bin/run.sh": "v1\n", "real.txt": "r\n"},
            what="the real file published without the temporaries",
        )
        assert daemon.stop() == 0


def test_a_ready_marker_holds_the_sync_until_it_is_written(base: Path) -> None:
    config = write_config(base, APPS, watch={"ready_marker": "READY"})
    with running(config) as daemon:
        daemon.wait_event("sync.waiting_for_marker", app_key="server1")
        assert daemon.syncs("server1") == []
        put(base / "r/softdir/server1", {"READY": ""})
        daemon.wait_sync("server1")
        assert tree(base / "soft/server") == {"bin/run.sh": "v1\n"}
        assert daemon.stop() == 0


def test_a_polling_fallback_still_publishes(base: Path) -> None:
    env = {"SYNCPRO_WATCH_POLLING": "1"}
    with running(write_config(base, APPS, watch={"poll_interval": 0.2}), env=env) as daemon:
        started = daemon.wait_event("service.started")
        assert set(started["backends"].values()) == {"polling"}
        daemon.wait_sync("server1")
        put(base / "r/softdir/server1", {"bin/run.sh": "polled\n"})
        daemon.wait(
            lambda: tree(base / "soft/server") == {"bin/run.sh": "polled\n"},
            what="the change published by polling",
        )
        assert daemon.stop() == 0


def test_a_broken_config_at_start_is_one_message_and_exit_2(tmp_path: Path) -> None:
    config = tmp_path / "config.yml"
    config.write_text(yaml.safe_dump({"dirs": {"softdir": "s"}, "apps": []}), encoding="utf-8")
    daemon = Daemon(config)
    try:
        assert daemon.proc.wait(30) == 2
        daemon.wait(lambda: any("dirs.remotecomdir" in line for line in daemon.raw), 10)
        assert not any("Traceback" in line for line in daemon.raw)
    finally:
        daemon.close()


def test_running_out_of_inotify_watches_names_the_sysctl_and_falls_back_to_polling(
    base: Path,
) -> None:
    # A user namespace of its own gets its own inotify limits: no global setting is touched.
    probe = subprocess.run(
        ["unshare", "-U", "-r", "sh", "-c", "echo 8 > /proc/sys/user/max_inotify_watches"],
        capture_output=True,
        check=False,
    )
    if probe.returncode != 0:
        pytest.fail(f"cannot make a user namespace with its own inotify limit: {probe.stderr!r}")
    for i in range(20):
        (base / f"r/softdir/server1/d{i}").mkdir(parents=True)
    config = write_config(base, APPS, watch={"poll_interval": 0.2})
    wrapper = base / "limited.sh"
    wrapper.write_text(
        'echo 8 > /proc/sys/user/max_inotify_watches && exec "$@"\n', encoding="utf-8"
    )
    wrap = ["unshare", "-U", "-r", "sh", str(wrapper)]
    with running(config, wrap=wrap) as daemon:
        limit = daemon.wait_event("watch.inotify_limit")
        assert "fs.inotify.max_user_watches" in limit["error"]
        started = daemon.wait_event("service.started")
        assert started["backends"][str(base / "r")] == "polling"
        daemon.wait_sync("server1")
        put(base / "r/softdir/server1", {"bin/run.sh": "polled after ENOSPC\n"})
        daemon.wait(
            lambda: tree(base / "soft/server").get("bin/run.sh") == "polled after ENOSPC\n",
            what="the change published by the polling fallback",
        )
        assert daemon.stop() == 0


def test_running_out_of_inotify_instances_names_their_sysctl_and_falls_back_to_polling(
    base: Path,
) -> None:
    probe = subprocess.run(
        ["unshare", "-U", "-r", "sh", "-c", "echo 2 > /proc/sys/user/max_inotify_instances"],
        capture_output=True,
        check=False,
    )
    if probe.returncode != 0:
        pytest.fail(f"cannot make a user namespace with its own inotify limit: {probe.stderr!r}")
    config = write_config(base, APPS, watch={"poll_interval": 0.2})
    wrapper = base / "limited.sh"
    # Two instances: one per watched root, none left for the check of the watch limit.
    wrapper.write_text(
        'echo 2 > /proc/sys/user/max_inotify_instances && exec "$@"\n', encoding="utf-8"
    )
    wrap = ["unshare", "-U", "-r", "sh", str(wrapper)]
    with running(config, wrap=wrap) as daemon:
        limit = daemon.wait_event("watch.inotify_limit")
        assert "fs.inotify.max_user_instances" in limit["error"]
        assert "max_user_watches" not in limit["error"]
        started = daemon.wait_event("service.started")
        assert started["backends"][limit["root"]] == "polling"
        put(base / "u/softdir/web", {"index.html": "polled build\n"})
        daemon.wait(
            lambda: tree(base / "soft/web").get("index.html") == "polled build\n",
            what="the build published by the polling fallback",
        )
        assert daemon.stop() == 0


def test_the_inotify_instance_limit_reached_while_running_is_named_and_polled_around(
    base: Path,
) -> None:
    wrap = ["unshare", "-U", "-r"]  # a user namespace with limits of its own
    with running(write_config(base, APPS, watch={"poll_interval": 0.2}), wrap=wrap) as daemon:
        daemon.wait_sync("server1")
        # Its two roots hold the two instances allowed now: the check of the watch limit
        # cannot make one of its own.
        limit_inotify_instances(daemon.proc.pid, 2)
        limit = daemon.wait_event("watch.inotify_limit")
        assert "fs.inotify.max_user_instances" in limit["error"]
        assert "max_user_watches" not in limit["error"]
        put(base / "r/softdir/server1", {"bin/run.sh": "polled\n"})
        daemon.wait(
            lambda: tree(base / "soft/server").get("bin/run.sh") == "polled\n",
            what="the change published by the polling fallback",
        )
        assert daemon.stop() == 0


def test_directories_created_while_running_are_watched_too(
    base: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    upload = tmp_path_factory.mktemp("upload")
    put(upload, {"a/b/c/deep.txt": "1\n", "top.txt": "t\n"})
    with running(write_config(base, APPS)) as daemon:
        daemon.wait_sync("server1")
        # A whole new app's program arrives in one go, nested directories included.
        subprocess.run(["rsync", "-a", f"{upload}/", str(base / "r/softdir/server2")], check=True)
        daemon.wait_sync("server2")
        # A change deep inside the new tree is only seen if its new directories are watched.
        put(base / "r/softdir/server2", {"a/b/c/deep.txt": "changed later\n"})
        daemon.wait_sync("server2", count=2)
        daemon.wait(
            lambda: tree(base / "soft/server").get("a/b/c/deep.txt") == "changed later\n",
            what="the deep change published",
        )
        assert daemon.stop() == 0


@pytest.mark.parametrize("polling", [False, True], ids=["inotify", "polling"])
def test_a_deleted_watched_root_is_made_again_and_a_later_upload_is_synced(
    base: Path, polling: bool
) -> None:
    env = {"SYNCPRO_WATCH_POLLING": "1"} if polling else {}
    config = write_config(base, APPS, watch={"poll_interval": 0.2})
    with running(config, env=env) as daemon:
        daemon.wait_sync("server1")
        shutil.rmtree(base / "r")
        daemon.wait_event("watch.root_missing", root=str(base / "r"))
        put(base / "r/softdir/server1", {"bin/run.sh": "uploaded again\n"})
        daemon.wait(
            lambda: tree(base / "soft/server") == {"bin/run.sh": "uploaded again\n"},
            what="the upload into the remade root published",
        )
        assert daemon.proc.poll() is None
        assert daemon.stop() == 0


def test_a_target_folder_that_cannot_be_made_is_one_message_and_exit_2(base: Path) -> None:
    (base / "blocker").write_text("a file where a folder should be\n", encoding="utf-8")
    config = write_config(base, APPS, dirs={"softdir": "blocker/soft"})
    daemon = Daemon(config)
    try:
        assert daemon.proc.wait(30) == 2
        daemon.wait(lambda: any("cannot start" in line for line in daemon.raw), 10)
        assert any("blocker" in line for line in daemon.raw)
        assert not any("Traceback" in line for line in daemon.raw)
    finally:
        daemon.close()


def refusal(daemon: Daemon) -> list[str]:
    """Wait for a daemon that must refuse to start; return the lines it printed to stderr."""
    daemon.wait(lambda: daemon.proc.poll() is not None or "READY=1" in daemon.notes, 30, "exit")
    assert "READY=1" not in daemon.notes, "it started"
    assert daemon.wait_exit() == 2
    assert daemon.find("service.started") == []
    return [line for line in daemon.raw if line.startswith("syncpro: ")]


def test_a_second_daemon_on_the_same_state_dir_is_refused_naming_it_and_the_holder(
    base: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    other = tmp_path_factory.mktemp("other")
    second_config = write_config(other, APPS, dirs={"state": str(base / "state")})
    with running(write_config(base, APPS)) as first:
        first.wait_sync("server1")
        second = Daemon(second_config)
        try:
            (message,) = refusal(second)
            assert str(base / "state") in message
            assert f"pid {first.proc.pid}" in message
            assert second.syncs() == []
        finally:
            second.close()
        assert first.proc.poll() is None
        put(base / "r/softdir/server1", {"bin/run.sh": "still served by the first\n"})
        first.wait_sync("server1", count=2)
        assert first.stop() == 0


def test_a_daemon_refused_its_control_socket_logs_that_it_failed_to_start_and_nothing_else(
    base: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    other = tmp_path_factory.mktemp("other")
    first_config = write_config(base, APPS)
    socket_path = str(base / "run/control.sock")
    second_config = write_config(other, APPS, control={"socket": socket_path})
    with running(first_config) as first:
        second = Daemon(second_config)
        try:
            (message,) = refusal(second)
            assert "another server is listening on the control socket" in message
            (failed,) = second.find("service.start_failed")
            assert failed["level"] == "error"
            assert socket_path in failed["error"]
            assert second.find("service.stopping") == second.find("service.stopped") == []
        finally:
            second.close()
        assert first.stop() == 0


def test_data_dirs_missing_at_start_are_made_with_a_warning_naming_each(base: Path) -> None:
    config = write_config(base, APPS)
    with running(config) as daemon:
        daemon.wait_event("service.started")
        made = daemon.find("service.dir_created")
        assert {(e["key"], e["path"], e["level"]) for e in made} == {
            ("dirs.updatedir", str(base / "u"), "warning"),
            ("dirs.softdir", str(base / "soft"), "warning"),
            ("dirs.configuredir", str(base / "conf"), "warning"),
        }
        assert daemon.stop() == 0
    with running(config) as daemon:
        daemon.wait_event("service.started")
        assert daemon.find("service.dir_created") == []
        assert daemon.stop() == 0


def test_a_manual_sync_counts_as_published_for_the_next_catch_up(base: Path) -> None:
    config = write_config(base, APPS, watch={"settle": 60, "max_wait": 120})
    with running(config) as daemon:
        daemon.wait_sync("server1")
        daemon.wait_sync("web1")
        put(base / "r/softdir/server1", {"bin/run.sh": "manual\n"})
        done = subprocess.run(
            [sys.executable, "-m", "syncpro", "ctl", "-k", "server1", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert tree(base / "soft/server") == {"bin/run.sh": "manual\n"}
        assert daemon.stop() == 0
    with running(config) as daemon:
        rescan = daemon.wait_event("service.rescanned", trigger="catch-up")
        assert rescan["changed"] == []
        assert daemon.stop() == 0


def test_a_slow_multi_file_rsync_upload_is_published_once_and_whole(
    base: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    upload = tmp_path_factory.mktemp("upload")
    # rsync renames each file into place once it is whole, seconds apart at this rate.
    put(upload, {f"lib/part{i}.bin": os.urandom(75_000).hex() for i in range(3)})
    old = {"bin/run.sh": "v1\n"}
    new = {**old, **tree(upload)}
    seen: list[dict[str, str]] = []
    done = threading.Event()

    def watch_target() -> None:
        while not done.is_set():
            state = tree(base / "soft/server")
            if state and (not seen or seen[-1] != state):
                seen.append(state)
            done.wait(0.02)

    # Settle well below the 1.5 s a file takes, well above a pause of rsync's between files.
    config = write_config(base, APPS, watch={"settle": 0.5, "max_wait": 30, "workers": 1})
    with running(config) as daemon:
        daemon.wait_sync("server1")
        daemon.wait_sync("web1")
        watcher = threading.Thread(target=watch_target)
        watcher.start()
        try:
            subprocess.run(
                ["rsync", "-a", "--bwlimit=100", f"{upload}/", str(base / "r/softdir/server1")],
                check=True,
            )
            daemon.wait(lambda: tree(base / "soft/server") == new, what="the whole upload")
            # A later change elsewhere syncs after any second run of server1 would have.
            put(base / "r/softdir/web1", {"after.txt": "a\n"})
            daemon.wait_sync("web1", count=2)
        finally:
            done.set()
            watcher.join()
        assert [s for s in seen if s not in (old, new)] == [], "a partial upload was published"
        assert seen[-1] == new
        assert len(daemon.syncs("server1")) == 2  # the catch-up, then the upload, once
        assert daemon.stop() == 0


def test_an_rsync_upload_gives_exactly_one_sync(
    base: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    upload = tmp_path_factory.mktemp("upload")
    put(upload, {"bin/run.sh": "version 2\n", "lib/app.jar": "jar v2\n", "lib/x.so": "so\n"})
    # A settle time no pause of rsync's between two files comes near, even on a busy machine.
    config = write_config(base, APPS, watch={"settle": 1.0, "workers": 1})
    with running(config) as daemon:
        daemon.wait_sync("server1")
        daemon.wait_sync("web1")
        subprocess.run(["rsync", "-a", f"{upload}/", str(base / "r/softdir/server1")], check=True)
        daemon.wait_sync("server1", count=2)
        # One worker: a second run of server1, due a settle time after its last event at the
        # latest, would run before this later change of web1 is even due.
        put(base / "r/softdir/web1", {"after.txt": "a\n"})
        daemon.wait_sync("web1", count=2)
        assert len(daemon.syncs("server1")) == 2
        assert tree(base / "soft/server") == tree(upload)
        assert daemon.stop() == 0


def test_a_ready_marker_written_while_a_sync_runs_is_honoured_by_the_next(base: Path) -> None:
    config = write_config(base, APPS, watch={"ready_marker": "READY"})
    source = base / "r/softdir/server1"
    with running(config) as daemon:
        daemon.wait_event("sync.waiting_for_marker", app_key="server1")
        with holding(base / "conf", "server/server1") as lock:
            put(source, {"READY": "1\n"})
            # The sync built the program and waits on the config target: it is running, and
            # publishes both together once it has them.
            daemon.wait(lambda: daemon.waits_for_lock(lock), what="the sync blocked mid-way")
            assert not (base / "soft/server").exists()
            put(source, {"bin/run.sh": "second upload\n"})
            # The uploader's marker arrives as rsync leaves it: a new file renamed into place.
            put(source, {"READY.new": "2\n"})
            (source / "READY.new").rename(source / "READY")
        daemon.wait_sync("server1")
        daemon.wait(
            lambda: tree(base / "soft/server") == {"bin/run.sh": "second upload\n"},
            timeout=15,
            what="the second upload, behind a marker written during the first sync",
        )
        # Swapped in before its log line: wait for the second sync's line, then check it is
        # the last.
        daemon.wait(lambda: len(daemon.syncs("server1")) >= 2, what="the second sync logged")
        assert len(daemon.syncs("server1")) == 2
        assert daemon.stop() == 0


def test_user_ignore_patterns_add_to_the_defaults(base: Path) -> None:
    # One worker: a run of server1 due with web1's would run before it.
    config = write_config(base, APPS, watch={"ignore": ["*.bak"], "workers": 1})
    with running(config) as daemon:
        daemon.wait_sync("server1")
        daemon.wait_sync("web1")
        put(base / "r/softdir/server1", {"run.sh.bak": "user's", ".run.sh.AbC123": "rsync's"})
        put(base / "r/softdir/web1", {"after.txt": "a\n"})
        daemon.wait_sync("web1", count=2)
        assert len(daemon.syncs("server1")) == 1
        put(base / "r/softdir/server1", {"real.txt": "r\n"})
        daemon.wait(
            lambda: tree(base / "soft/server") == {"bin/run.sh": "v1\n", "real.txt": "r\n"},
            what="the real file published without either kind of ignored file",
        )
        assert daemon.stop() == 0


def test_a_path_glob_in_watch_ignore_never_triggers_a_sync(base: Path) -> None:
    (base / "r/softdir/server1/logs").mkdir()
    config = write_config(base, APPS, watch={"ignore": ["logs/*"], "workers": 1})
    with running(config) as daemon:
        daemon.wait_sync("server1")
        daemon.wait_sync("web1")
        for n in range(5):
            put(base / "r/softdir/server1", {f"logs/app{n}.log": "line\n"})
        put(base / "r/softdir/web1", {"after.txt": "a\n"})
        daemon.wait_sync("web1", count=2)
        assert len(daemon.syncs("server1")) == 1
        put(base / "r/softdir/server1", {"bin/run.sh": "v2\n"})
        daemon.wait_sync("server1", count=2)
        assert tree(base / "soft/server") == {"bin/run.sh": "v2\n"}
        assert daemon.stop() == 0


def test_a_stray_path_beside_softdir_and_configuredir_is_logged_once(base: Path) -> None:
    with running(write_config(base, APPS, watch={"workers": 1})) as daemon:
        daemon.wait_sync("server1")
        daemon.wait_sync("web1")
        put(base / "r", {"stray.txt": "1\n"})
        daemon.wait_event("watch.unknown_app", where="remotecomdir:stray.txt")
        put(base / "r", {"stray.txt": "2\n"})
        put(base / "r/softdir/web1", {"after.txt": "a\n"})
        daemon.wait_sync("web1", count=2)
        assert len(daemon.find("watch.unknown_app", where="remotecomdir:stray.txt")) == 1
        assert daemon.stop() == 0


def test_sigterm_while_a_sync_runs_lets_it_publish_whole_and_exits_zero(base: Path) -> None:
    with running(write_config(base, APPS)) as daemon:
        daemon.wait_sync("server1")
        with holding(base / "soft", "server") as lock:
            put(base / "r/softdir/server1", {"bin/run.sh": "v2\n", "lib/new.jar": "jar\n"})
            daemon.wait(lambda: daemon.waits_for_lock(lock), what="the sync blocked mid-way")
            daemon.signal(signal.SIGTERM)
            daemon.wait_event("service.stopping")
            assert daemon.proc.poll() is None  # still waiting for its sync
        assert daemon.proc.wait(30) == 0
        daemon.wait_event("service.stopped")
        sync = daemon.wait_sync("server1", count=2)
        assert sync["response"]["trigger"]["by"] == "watcher"
        assert tree(base / "soft/server") == {"bin/run.sh": "v2\n", "lib/new.jar": "jar\n"}
        assert daemon.find("service.abandoned") == []
        daemon.close()


def test_the_periodic_rescan_catches_a_change_the_watcher_never_saw(
    base: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # inotify reports a write to the directory it was made through: one through a hard link
    # elsewhere changes the watched file with no event in the watched tree.
    elsewhere = tmp_path_factory.mktemp("elsewhere") / "run.sh"
    os.link(base / "r/softdir/server1/bin/run.sh", elsewhere)
    config = write_config(base, APPS, watch={"rescan_interval": 1})
    with running(config) as daemon:
        daemon.wait_sync("server1")
        with elsewhere.open("a", encoding="utf-8") as out:
            out.write("appended unseen\n")
        daemon.wait(
            lambda: tree(base / "soft/server") == {"bin/run.sh": "v1\nappended unseen\n"},
            what="the unseen change published",
        )
        # The tree is swapped in before the sync's log line is written: wait for that too.
        daemon.wait(
            lambda: daemon.syncs("server1")[-1]["response"]["trigger"]["by"] == "rescan",
            what="the rescan's sync logged",
        )
        triggers = [e["response"]["trigger"]["by"] for e in daemon.syncs("server1")]
        assert "watcher" not in triggers
        assert triggers[-1] == "rescan"
        assert daemon.stop() == 0


def test_a_config_edit_republishes_that_config_only_never_rolling_back_the_program(
    base: Path,
) -> None:
    put(base / "u/softdir/server", {"bin/run.sh": "server 1.5.0\n"})
    put(base / "u/configuredir/server/server1", {"a.conf": "1\n"})
    put(base / "u/configuredir/server/server2", {"a.conf": "2\n"})
    with running(write_config(base, APPS)) as daemon:
        daemon.wait_sync("server1")
        # The catch-up applies the oldest arrival first: the newer build (updatedir) last.
        daemon.wait(
            lambda: (
                tree(base / "soft/server") == {"bin/run.sh": "server 1.5.0\n"}
                and tree(base / "conf/server/server1") == {"a.conf": "1\n"}
            ),
            what="the updatedir build published over remotecomdir's",
        )

        with open(base / "r/configuredir/server1/app.properties", "a") as f:
            f.write("tuned=1\n")
        sync = daemon.wait_sync("server1", count=2)

        app = sync["response"]["apps"][0]
        assert app["program"] is None and app["config"]["status"] == "published"
        assert tree(base / "conf/server/server1") == {"app.properties": "node=1\ntuned=1\n"}
        assert tree(base / "soft/server") == {"bin/run.sh": "server 1.5.0\n"}
        assert daemon.stop() == 0
