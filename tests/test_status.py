"""Honest control answers of the real daemon: `ctl reload` waits for its outcome, `ctl status`
carries ISO times, the last reload error, running syncs with their progress, and code "1"
when an app's last sync failed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from syncpro.testing import Daemon, ctl, put, running, wait_until

from helpers import holding


@pytest.fixture
def base(base: Path) -> Path:
    """The shared sources, with a program file big enough for progress to show bytes."""
    put(base / "r/softdir/server1", {"lib/a.jar": "a" * 5000})
    return base


def document(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    doc = json.loads(proc.stdout)
    assert isinstance(doc, dict)
    return doc


def is_iso(text: Any) -> bool:
    return isinstance(text, str) and datetime.fromisoformat(text).tzinfo is not None


def caught_up(daemon: Daemon) -> None:
    daemon.wait_synced("server1", "web1")


@pytest.mark.daemon
def test_ctl_reload_of_a_broken_config_exits_1_with_the_error_and_status_keeps_it(
    base: Path, quiet_config: Callable[..., Path]
) -> None:
    config = quiet_config()
    with running(config) as daemon:
        good = config.read_text()
        doc = yaml.safe_load(good)
        doc["watch"]["settle"] = -1
        config.write_text(yaml.safe_dump(doc))

        proc = ctl(config, "reload")

        assert proc.returncode == 1, proc.stdout
        assert "watch.settle" in proc.stderr
        answer = document(proc)
        assert answer["code"] == "1"
        assert answer["reload"]["ok"] is False
        assert is_iso(answer["reload"]["at"])
        status = document(ctl(config, "status"))
        assert "watch.settle" in status["last_reload_error"]
        assert status["reload"]["ok"] is False

        config.write_text(good)
        fixed = ctl(config, "reload")
        assert fixed.returncode == 0, fixed.stderr
        assert document(fixed)["msg"] == "reloaded"
        # Answered after the reload, not before: its end is already logged.
        assert daemon.find("service.reloaded") != []
        status = document(ctl(config, "status"))
        assert status["last_reload_error"] is None
        assert status["reload"]["ok"] is True
        assert daemon.stop() == 0


@pytest.mark.daemon
def test_status_gives_iso_times_and_code_1_while_an_app_last_failed(
    base: Path, quiet_config: Callable[..., Path]
) -> None:
    config = quiet_config()
    with running(config) as daemon:
        caught_up(daemon)
        proc = ctl(config, "status")
        assert proc.returncode == 0
        status = document(proc)
        assert status["code"] == "0"
        server1 = status["apps"]["server1"]
        assert server1["ok"] is True
        assert is_iso(server1["at"])
        assert status["healthy"] is True
        assert status["last_reload_error"] is None

        shutil.rmtree(base / "conf")
        (base / "conf").write_text("not a folder\n")
        assert ctl(config, "-k", "web1").returncode == 1

        proc = ctl(config, "status")
        assert proc.returncode == 1
        status = document(proc)
        assert status["code"] == "1"
        assert "web1" in status["msg"]
        assert status["apps"]["web1"]["ok"] is False
        assert status["apps"]["web1"]["errors"]
        assert status["healthy"] is False
        # Polls of status are no news: not logged at info, while a sync request is.
        assert daemon.find("control.request", action="status") == []
        assert daemon.find("control.request", action="Deploy:Core:syncpro") != []
        assert daemon.stop() == 0


def progress_done(config: Path) -> dict[str, Any] | None:
    """The running sync whose files are all built, if there is one."""
    for entry in document(ctl(config, "status"))["running"]:
        if entry.get("files_total") and entry["files_done"] == entry["files_total"]:
            return dict(entry)
    return None


@pytest.mark.daemon
def test_a_running_sync_shows_its_files_and_bytes_done_of_the_total(
    base: Path, quiet_config: Callable[..., Path]
) -> None:
    config = quiet_config()
    with running(config) as daemon:
        caught_up(daemon)
        put(base / "r/softdir/server1", {"lib/b.jar": "b" * 3000})
        # The config target's lock held as another publisher would: the sync builds the
        # program tree, then waits in the middle, before the config.
        with subprocess.Popen(
            [sys.executable, "-m", "syncpro", "ctl", "-k", "server1", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ) as sync:
            try:
                with holding(base / "conf", "server/server1"):
                    entry = wait_until(lambda: progress_done(config), timeout=30, interval=0.05)
            finally:
                code = sync.wait(60)
        assert code == 0
        assert entry["app_keys"] == ["server1"]
        assert entry["origin"] == "control"
        assert is_iso(entry["started"])
        assert entry["syncing"] is True
        # bin/run.sh, lib/a.jar and lib/b.jar: the program tree, built whole.
        assert entry["files_total"] == 3
        assert entry["bytes_total"] == 3 + 5000 + 3000
        assert entry["bytes_done"] == entry["bytes_total"]
        [started] = daemon.find("sync.started", origin="control")
        assert started["app_keys"] == ["server1"]
        status = document(ctl(config, "status"))
        assert status["running"] == []
        assert daemon.stop() == 0


def test_a_batch_not_yet_syncing_gets_a_wall_clock_start_and_no_monotonic_time() -> None:
    import time

    from syncpro.daemon.progress import RunningSyncs
    from syncpro.daemon.reloads import Reloads
    from syncpro.daemon.status import completed_status

    raw = {
        "code": "0",
        "msg": "ok",
        "apps": {"server1": {"update": False, "ok": True, "errors": [], "at": time.time()}},
        "inventory": {"error": None},
        "running": [
            {
                "group": "server",
                "update": False,
                "app_keys": ["server1"],
                "since": time.monotonic() - 2,
                "started": True,
            }
        ],
    }
    doc = completed_status(raw, ready=True, running=RunningSyncs(), reloads=Reloads())

    [entry] = doc["running"]
    assert entry["syncing"] is False
    assert "since" not in entry
    started = datetime.fromisoformat(entry["started"]).timestamp()
    assert time.time() - 10 < started < time.time()
    assert (doc["code"], doc["healthy"], doc["reload"]) == ("0", True, None)


@pytest.mark.daemon
def test_a_reload_that_restarts_the_control_socket_answers_its_asker_at_once(
    base: Path, quiet_config: Callable[..., Path]
) -> None:
    config = quiet_config()
    with running(config) as daemon:
        doc = yaml.safe_load(config.read_text())
        doc["control"]["mode"] = "0600"  # the socket is made again, under this very request
        config.write_text(yaml.safe_dump(doc))

        proc = ctl(config, "reload")

        assert proc.returncode == 0, proc.stderr
        answer = document(proc)
        assert answer["msg"].startswith("reload applying")
        daemon.wait_event("service.reloaded")
        # Not held until the old server's stop deadline: that would have logged this.
        assert daemon.find("control.stop_abandoned") == []
        status = document(ctl(config, "status"))
        assert status["reload"]["ok"] is True
        assert daemon.stop() == 0
