"""The rescanner in process, over real sources and a real state: a periodic rescan rests
between its walks, and anything else asked meanwhile ends the rests."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from syncpro.config.load import load_config
from syncpro.daemon import rescanner as rescanner_module
from syncpro.daemon.metrics import Metrics
from syncpro.daemon.progress import RunningSyncs
from syncpro.daemon.rescanner import PERIODIC_REST, Rescanner
from syncpro.daemon.runner import Runner
from syncpro.daemon.runtime import Runtime, Snapshot
from syncpro.daemon.scheduler import Scheduler
from syncpro.daemon.sdnotify import Notifier
from syncpro.daemon.state import StateStore, fingerprint
from syncpro.engine.sync import ignore_for
from syncpro.testing import app, put, write_config

APPS = 4
WALK = 0.1  # each fingerprint made this slow: the walk of a big source


@pytest.fixture
def rescanner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Rescanner]:
    config = load_config(write_config(tmp_path, [app(f"a{i}", f"g{i}") for i in range(APPS)]))
    for i in range(APPS):
        put(config.dirs.remotecomdir / "softdir" / f"a{i}", {"bin/run": "1\n", "lib/x": "2\n"})
    runtime = Runtime(Notifier(""))
    runtime.set_snapshot_held(Snapshot(config, config.config_inventory, ignore_for(config)))
    runtime.state = StateStore(config.dirs.state)
    for i in range(APPS):  # recorded as published: the rescan must walk them to know
        found = fingerprint(config.dirs, config.config_inventory.apps[i], False, ignore_for(config))
        assert found is not None
        runtime.state.record(f"a{i}", False, found.digest)
    runtime.scheduler = Scheduler(
        lambda batch: None, settle=60, max_wait=120, workers=1, group_of=lambda key: key
    )

    def slow(*args: Any, **kwargs: Any) -> Any:
        time.sleep(WALK)
        return fingerprint(*args, **kwargs)

    monkeypatch.setattr(rescanner_module, "fingerprint", slow)
    metrics = Metrics()
    yield Rescanner(runtime, Runner(runtime, metrics, RunningSyncs()), metrics)
    runtime.state.close()


def test_a_periodic_rescan_rests_twice_as_long_as_it_walks(rescanner: Rescanner) -> None:
    with capture_logs() as logs:
        rescanner.rescan("rescan", ["rescan"], paced=True)
    (event,) = [e for e in logs if e["event"] == "service.rescanned"]
    assert event["walked"] == APPS and event["changed"] == []
    # Each app's program root and its two folders and two files.
    assert event["names"] == APPS * 5
    assert event["seconds"] >= APPS * WALK * (1 + PERIODIC_REST)


def test_any_other_request_ends_a_periodic_rescans_rests(rescanner: Rescanner) -> None:
    asked = threading.Timer(WALK / 2, rescanner.request, args=("overflow",))
    asked.start()
    began = time.monotonic()
    with capture_logs():
        rescanner.rescan("rescan", ["rescan"], paced=True)
    asked.join()
    # The first rest at most, then walks alone: far below the paced total (1.2 s here).
    assert time.monotonic() - began < APPS * WALK * (1 + PERIODIC_REST) - WALK
    # A periodic request itself does not end them.
    rescanner._urgent.clear()
    rescanner.request("rescan")
    assert not rescanner._urgent.is_set()
