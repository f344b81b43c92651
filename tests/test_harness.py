"""The harness itself (syncpro.testing): configs the loader accepts as built, waits that fail
with what they waited for, and a driver that talks to the daemon and always cleans up."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from syncpro.config.load import load_config
from syncpro.testing import (
    DaemonWaitError,
    app,
    config_doc,
    group,
    put,
    running,
    trash_empty,
    tree,
    wait_until,
    write_config,
)

from helpers import TWO_APPS


def test_sections_merge_into_the_defaults_key_by_key_and_the_loader_reads_them(
    tmp_path: Path,
) -> None:
    path = write_config(
        tmp_path,
        [*group("server", "server1", "server2"), app("web1", "web")],
        watch={"settle": 2},
        dirs={"state": "elsewhere"},
    )

    config = load_config(path)

    assert config.watch.settle == 2
    assert config.watch.max_wait == 3  # the default kept beside the override
    assert config.publish.fsync is False
    assert config.dirs.softdir == tmp_path / "soft"
    assert config.dirs.state == tmp_path / "elsewhere"
    assert [a.app_key for a in config.config_inventory.apps] == ["server1", "server2", "web1"]


def test_under_makes_the_dirs_absolute_and_no_defaults_leave_only_what_is_given(
    tmp_path: Path,
) -> None:
    doc = config_doc([], under=tmp_path, defaults={}, publish={"grace": 0})

    assert doc == {
        "dirs": {
            "remotecomdir": str(tmp_path / "r"),
            "updatedir": str(tmp_path / "u"),
            "softdir": str(tmp_path / "soft"),
            "configuredir": str(tmp_path / "conf"),
            "state": str(tmp_path / "state"),
        },
        "publish": {"grace": 0},
        "apps": [],
    }


def test_put_writes_text_and_bytes_and_tree_reads_them_back(tmp_path: Path) -> None:
    put(tmp_path, {"a/b.txt": "text\n", "c.bin": b"bytes"})

    assert tree(tmp_path) == {"a/b.txt": "text\n", "c.bin": "bytes"}


def test_a_wait_that_runs_out_says_what_it_waited_for() -> None:
    with pytest.raises(DaemonWaitError, match="the impossible"):
        wait_until(lambda: False, timeout=0.05, what="the impossible")
    assert wait_until(lambda: 42, timeout=0.05) == 42


def test_trash_empty_waits_for_a_sweep_to_finish_stripping_its_tree(tmp_path: Path) -> None:
    # A sweep claims an expired tree by moving it from trash/ to staging/, strips it, then
    # makes it the spare: a run started before that finds no spare (benchmarks wait here).
    root = tmp_path / "soft"
    put(root / ".syncpro", {"trash/1.000.app.0a1b2c3d/f": "old\n"})
    assert not trash_empty(root)
    os.makedirs(root / ".syncpro" / "staging")
    os.rename(root / ".syncpro/trash/1.000.app.0a1b2c3d", root / ".syncpro/staging/claimed.app")
    assert not trash_empty(root)
    os.rename(root / ".syncpro/staging/claimed.app", root / ".syncpro/spare")
    assert trash_empty(root)
    assert trash_empty(tmp_path / "never-published")


@pytest.mark.daemon
def test_the_driver_asks_on_the_control_socket_and_stops_the_daemon_by_its_pid(
    base: Path, run_dir: Path
) -> None:
    config = write_config(base, TWO_APPS, control={"socket": str(run_dir / "control.sock")})
    with running(config) as daemon:
        assert daemon.ready_at is not None and daemon.ready_at >= daemon.launched
        daemon.wait_synced("server1", "web1")
        answer = daemon.request(action="Deploy:Core:syncpro", k="web1")
        assert answer["data"]["data"]["0"] == "1"
        # The log line is written before the answer but read by the driver's own thread.
        daemon.wait(lambda: daemon.syncs("web1")[-1]["origin"] == "control", 30, "its log")
        assert daemon.syncs("web1")[-1]["origin"] == "control"
        status = daemon.request(action="status")
        assert status["code"] == "0"
        assert daemon.cpu_seconds() > 0
        assert daemon.status_kib("VmRSS") > 0
        pid = daemon.pid
        daemon.signal(signal.SIGSTOP)  # a daemon that will not stop is killed at the block's end
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not daemon.notify_path.exists()
