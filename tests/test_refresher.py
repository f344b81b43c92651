"""The inventory refresher, in process: a loader that fails stands for the database being
away (the real-MariaDB outage is covered by test_end_to_end); the backoff, the inventory kept
through the outage, the recovery, and a refresh overtaken by a reload."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

import structlog

from syncpro.config.model import Config
from syncpro.daemon.metrics import Metrics
from syncpro.daemon.refresher import Refresher
from syncpro.daemon.runtime import Runtime, Snapshot
from syncpro.daemon.sdnotify import Notifier
from syncpro.engine.sync import ignore_for
from syncpro.errors import InventoryError
from syncpro.inventory.apps import Inventory

from helpers import SERVER_GROUP, make_config


class FlakyDatabase:
    """A loader that fails `failures` times, then returns `inventory`; counts its reads."""

    def __init__(self, failures: int, inventory: Inventory) -> None:
        self.failures = failures
        self.inventory = inventory
        self.reads = 0
        self.during_read: list[object] = []

    def __call__(self, config: Config) -> Inventory:
        self.reads += 1
        for hook in self.during_read:
            assert callable(hook)
            hook()
        if self.reads <= self.failures:
            raise InventoryError(f"database away (read {self.reads})")
        return self.inventory


def _runtime(tmp_path: Path, refresh: float) -> Runtime:
    config = make_config(tmp_path, SERVER_GROUP)
    config = dataclasses.replace(
        config, inventory=dataclasses.replace(config.inventory, source="mysql", refresh=refresh)
    )
    runtime = Runtime(Notifier(""))
    with runtime.lock:
        runtime.set_snapshot_held(Snapshot(config, config.config_inventory, ignore_for(config)))
    return runtime


def _bigger(runtime: Runtime) -> Inventory:
    apps = runtime.snapshot.inventory.apps
    return Inventory((*apps, dataclasses.replace(apps[0], app_key="server3")))


def test_failed_reads_back_off_from_1_s_doubling_up_to_the_refresh_period(
    tmp_path: Path,
) -> None:
    runtime = _runtime(tmp_path, refresh=5.0)
    kept = runtime.snapshot.inventory
    database = FlakyDatabase(failures=5, inventory=_bigger(runtime))
    statuses: list[str | None] = []
    rescans: list[bool] = []
    refresher = Refresher(
        runtime,
        Metrics(),
        on_refreshed=lambda: rescans.append(True),
        on_status=lambda: statuses.append(runtime.inventory_error),
        loader=database,
    )
    backoffs = []
    with structlog.testing.capture_logs() as logs:
        for _ in range(5):
            before = time.monotonic()
            refresher.refresh()
            backoffs.append(refresher.backoff)
            # The next read is planned `backoff` seconds from now, not at once.
            assert refresher.due >= before + refresher.backoff
    assert backoffs == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert runtime.snapshot.inventory is kept  # the last good inventory, through the outage
    assert runtime.inventory_error == "database away (read 5)"
    assert statuses == [f"database away (read {n})" for n in range(1, 6)]
    assert rescans == []
    unavailable = [e for e in logs if e["event"] == "inventory.unavailable"]
    assert [e["log_level"] for e in unavailable] == ["error"] + ["warning"] * 4
    assert [e["retry_in"] for e in unavailable] == backoffs
    assert {e["apps_kept"] for e in unavailable} == {len(kept.apps)}


def test_a_read_that_works_again_adopts_its_inventory_and_ends_the_backoff(
    tmp_path: Path,
) -> None:
    runtime = _runtime(tmp_path, refresh=5.0)
    database = FlakyDatabase(failures=2, inventory=_bigger(runtime))
    rescans: list[bool] = []
    refresher = Refresher(
        runtime, Metrics(), lambda: rescans.append(True), lambda: None, loader=database
    )
    refresher.refresh()
    refresher.refresh()
    assert refresher.backoff == 2.0
    with structlog.testing.capture_logs() as logs:
        before = time.monotonic()
        refresher.refresh()
    assert runtime.inventory_error is None
    assert refresher.backoff == 0.0
    assert refresher.due >= before + 5.0  # back to the refresh period
    assert [a.app_key for a in runtime.snapshot.inventory.apps] == ["server1", "server2", "server3"]
    assert rescans == [True]
    assert [(e["event"], e.get("recovered")) for e in logs] == [("inventory.refreshed", True)]


def test_a_refresh_overtaken_by_a_reload_is_discarded(tmp_path: Path) -> None:
    runtime = _runtime(tmp_path, refresh=5.0)
    reloaded = runtime.snapshot
    database = FlakyDatabase(failures=1, inventory=_bigger(runtime))

    def reload_meanwhile() -> None:
        with runtime.lock:
            runtime.generation += 1

    database.during_read.append(reload_meanwhile)
    refresher = Refresher(runtime, Metrics(), lambda: None, lambda: None, loader=database)
    with structlog.testing.capture_logs() as logs:
        refresher.refresh()  # fails: not about the config now in use
        refresher.refresh()  # works: read for the old config
    assert runtime.inventory_error is None
    assert refresher.backoff == 0.0
    assert runtime.snapshot is reloaded
    assert [(e["event"], e["reason"]) for e in logs] == [
        ("inventory.refresh_discarded", "reloaded"),
        ("inventory.refresh_discarded", "reloaded"),
    ]


def test_its_thread_retries_until_the_database_is_back_and_stops_by_its_deadline(
    tmp_path: Path,
) -> None:
    # A refresh period below 1 s caps the backoff too: the retries come quickly.
    runtime = _runtime(tmp_path, refresh=0.05)
    database = FlakyDatabase(failures=3, inventory=_bigger(runtime))
    recovered = threading.Event()
    refresher = Refresher(runtime, Metrics(), recovered.set, lambda: None, loader=database)
    refresher.begin("database away at start")
    refresher.start()
    try:
        assert recovered.wait(10), f"no recovery after {database.reads} reads"
    finally:
        refresher.stop(time.monotonic() + 5)
    assert database.reads >= 4
    assert runtime.inventory_error is None
    assert len(runtime.snapshot.inventory.apps) == 3


def test_an_inventory_from_the_config_is_never_re_read(tmp_path: Path) -> None:
    runtime = _runtime(tmp_path, refresh=0.05)
    snap = runtime.snapshot
    config = dataclasses.replace(
        snap.config, inventory=dataclasses.replace(snap.config.inventory, source="config")
    )
    with runtime.lock:
        runtime.set_snapshot_held(Snapshot(config, snap.inventory, snap.ignore))
    database = FlakyDatabase(failures=0, inventory=_bigger(runtime))
    refresher = Refresher(runtime, Metrics(), lambda: None, lambda: None, loader=database)
    refresher.begin(None)
    refresher.start()
    try:
        # Well past several refresh periods: the loop has come round and passed.
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline and refresher.due != float("inf"):
            time.sleep(0.01)
        assert refresher.due == float("inf")
    finally:
        refresher.stop(time.monotonic() + 5)
    assert database.reads == 0
