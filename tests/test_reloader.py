"""The reload transaction, in process: a new config is adopted whole, or rolled back with the
running snapshot, state, watcher and listeners kept (the SIGHUP path through a real daemon is
covered by test_service_reload)."""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from syncpro.config.load import load_config
from syncpro.config.model import Config
from syncpro.daemon.metrics import Metrics
from syncpro.daemon.refresher import Refresher
from syncpro.daemon.reloader import Reloader
from syncpro.daemon.reloads import Reloads
from syncpro.daemon.runtime import Runtime, Snapshot
from syncpro.daemon.sdnotify import Notifier
from syncpro.daemon.servers import Servers
from syncpro.daemon.state import StateLock, StateStore
from syncpro.daemon.watch import Watcher
from syncpro.engine.sync import ignore_for
from syncpro.errors import InventoryError
from syncpro.inventory.apps import Inventory
from syncpro.testing import write_config

APPS = [{"app_key": "server1", "local_name": "server"}]


class Harness:
    """A running daemon's runtime, listeners and reloader, without its threads of work."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.path = write_config(root, APPS)
        config = load_config(self.path)
        self.runtime = Runtime(Notifier(""))
        self.runtime.state_lock = StateLock(config.dirs.state)
        self.runtime.state = StateStore(config.dirs.state)
        with self.runtime.lock:
            self.runtime.set_snapshot_held(
                Snapshot(config, config.config_inventory, ignore_for(config))
            )
        self.inventory_fails = False
        self.refresher = Refresher(
            self.runtime, Metrics(), lambda: None, lambda: None, loader=self._load
        )
        self.servers = Servers(handler=None)
        self.servers.start(config)
        self.reloads = Reloads()
        self.rescans: list[str] = []
        self.watchers: list[Watcher] = []
        self.reloader = Reloader(
            str(self.path),
            self.runtime,
            self.refresher,
            self.servers,
            self.reloads,
            new_watcher=self._new_watcher,
            on_state_reset=lambda error: None,
            request_rescan=self.rescans.append,
            status_line=lambda: "status",
            stop_timeout=5.0,
        )

    def _load(self, config: Config) -> Inventory:
        if self.inventory_fails:
            raise InventoryError("database away")
        return config.config_inventory

    def _new_watcher(self, config: Config) -> Watcher:
        watcher = Watcher(
            [config.dirs.remotecomdir, config.dirs.updatedir],
            ignore=ignore_for(config),
            on_change=lambda path: None,
            on_temporary=lambda path, state: None,
            on_trouble=lambda reason: None,
            source_root_of=lambda path: None,
            poll_interval=0.5,
            force_polling=True,
        )
        self.watchers.append(watcher)
        return watcher

    def rewrite(self, apps: list[dict[str, Any]] = APPS, **sections: dict[str, Any]) -> None:
        write_config(self.root, apps, **sections)

    def reload(self) -> tuple[bool, Any]:
        ticket = self.reloads.ask()
        ok = self.reloads.around(self.reloader.reload_now)()
        return ok, self.reloads.wait(ticket, 0)

    def close(self) -> None:
        self.servers.stop(time.monotonic() + 5)
        if self.runtime.watcher is not None:
            self.runtime.watcher.stop()
        for store in [*self.runtime.retired_states, self.runtime.state]:
            if store is not None:
                store.close()
        if self.runtime.state_lock is not None:
            self.runtime.state_lock.release()


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    running = Harness(tmp_path)
    try:
        yield running
    finally:
        running.close()


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        try:
            client.connect(str(path))
        except OSError:
            return False
    return True


def _busy_port() -> tuple[socket.socket, int]:
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    return holder, holder.getsockname()[1]


def test_a_new_config_is_adopted_whole_with_a_new_generation(harness: Harness) -> None:
    old = harness.runtime.snapshot
    old_state = harness.runtime.state
    harness.rewrite(
        [*APPS, {"app_key": "server2", "local_name": "server"}],
        dirs={"state": "state2"},
        control={"socket": "run/other.sock"},
    )
    ok, outcome = harness.reload()
    assert ok and outcome.ok
    snap = harness.runtime.snapshot
    assert snap is not old
    assert [a.app_key for a in snap.inventory.apps] == ["server1", "server2"]
    assert harness.runtime.generation == 1
    assert harness.rescans == ["reload"]
    # The new state is in use; the old one waits for shutdown, its lock given up.
    assert harness.runtime.state is not old_state
    assert harness.runtime.retired_states == [old_state]
    StateLock(old.config.dirs.state).release()
    assert _answers(harness.root / "run" / "other.sock")
    assert not (harness.root / "run" / "control.sock").exists()


def test_a_port_in_use_rolls_back_to_the_old_snapshot_state_watcher_and_servers(
    harness: Harness,
) -> None:
    old = harness.runtime.snapshot
    old_state = harness.runtime.state
    old_socket = harness.root / "run" / "control.sock"
    threads = sorted(t.name for t in threading.enumerate())
    holder, port = _busy_port()
    with holder:
        harness.rewrite(
            [*APPS, {"app_key": "server2", "local_name": "server"}],
            dirs={"state": "state2"},
            watch={"settle": 0.5},
            control={"socket": "run/other.sock"},
            http={"enabled": True, "listen": f"127.0.0.1:{port}", "token": "t0ken-for-tests"},
        )
        with structlog.testing.capture_logs() as logs:
            ok, outcome = harness.reload()
    assert not ok and str(port) in outcome.error, outcome
    assert harness.runtime.snapshot is old
    assert harness.runtime.generation == 0
    assert harness.rescans == []
    # What the reload prepared is undone: the new state's lock is free, its watcher stopped.
    assert harness.runtime.state is old_state
    StateLock(harness.root / "state2").release()
    assert harness.runtime.watcher is None
    assert len(harness.watchers) == 1  # it was started, and then stopped:
    assert sorted(t.name for t in threading.enumerate()) == threads
    # The old listeners serve again; the new ones are gone.
    assert harness.servers.http is None
    assert _answers(old_socket)
    assert not (harness.root / "run" / "other.sock").exists()
    failed = [e for e in logs if e["event"] == "service.reload_failed"]
    assert len(failed) == 1 and failed[0]["config_kept"] == str(harness.path)


def test_an_invalid_config_keeps_the_running_one(harness: Harness) -> None:
    old = harness.runtime.snapshot
    harness.path.write_text("dirs: [not, a, mapping]\n", encoding="utf-8")
    ok, outcome = harness.reload()
    assert not ok and outcome.error
    assert harness.runtime.snapshot is old
    assert harness.runtime.generation == 0
    assert _answers(harness.root / "run" / "control.sock")


def test_a_state_another_daemon_holds_is_refused_and_nothing_changes(harness: Harness) -> None:
    old = harness.runtime.snapshot
    other = StateLock(harness.root / "state2")
    try:
        harness.rewrite(dirs={"state": "state2"})
        ok, outcome = harness.reload()
    finally:
        other.release()
    assert not ok and "state2" in outcome.error
    assert harness.runtime.snapshot is old
    assert harness.watchers == []


def test_an_unreadable_inventory_adopts_the_config_with_the_apps_it_had(
    harness: Harness,
) -> None:
    old = harness.runtime.snapshot
    harness.inventory_fails = True
    harness.rewrite(watch={"settle": 0.5})
    before = time.monotonic()
    ok, _ = harness.reload()
    assert ok
    snap = harness.runtime.snapshot
    assert snap.config.watch.settle == 0.5
    assert snap.inventory is old.inventory
    assert harness.runtime.inventory_error == "database away"
    # Read again in 1 s, not after the refresh period.
    assert before + 1.0 <= harness.refresher.due <= time.monotonic() + 1.0


def test_a_stop_begun_before_it_applies_abandons_the_reload(harness: Harness) -> None:
    old = harness.runtime.snapshot
    harness.rewrite(control={"socket": "run/other.sock"})
    harness.runtime.stopping.set()
    assert harness.reloader.reload_now() is False
    assert harness.runtime.snapshot is old
    assert not (harness.root / "run" / "other.sock").exists()


def test_the_snapshot_is_swapped_as_one(harness: Harness) -> None:
    # A frozen dataclass: a sync holding one never sees half a reload.
    with pytest.raises(dataclasses.FrozenInstanceError):
        harness.runtime.snapshot.config = harness.runtime.snapshot.config  # type: ignore[misc]
