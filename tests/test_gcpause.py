"""The cyclic collector stays off while any walk or build runs, and comes back as it was."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from syncpro.engine import gcpause
from syncpro.engine.request import SyncRequest
from syncpro.engine.sync import run_sync

from helpers import SERVER_GROUP, config_source, make_config, program_source, write_tree


@pytest.fixture(autouse=True)
def _collector_on() -> Iterator[None]:
    was = gc.isenabled()
    gc.enable()
    yield
    if not was:
        gc.disable()


def test_overlapping_pauses_on_two_threads_end_with_the_last() -> None:
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen: list[bool] = []

    def second() -> None:
        with gcpause.paused():
            second_in.set()
            assert first_out.wait(10)
            seen.append(gc.isenabled())  # the first has ended; this one still holds it off

    with gcpause.paused():
        first_in.set()
        thread = threading.Thread(target=second)
        thread.start()
        assert second_in.wait(10)
    first_out.set()
    thread.join(10)

    assert seen == [False]
    assert gc.isenabled()


def test_a_collector_that_was_off_stays_off() -> None:
    gc.disable()
    with gcpause.paused():
        pass
    assert not gc.isenabled()


def test_a_sync_walks_and_builds_with_the_collector_off_and_restores_it(tmp_path: Path) -> None:
    config = make_config(tmp_path, SERVER_GROUP)
    write_tree(program_source(config, "server1"), {f"f{i}": str(i) for i in range(5)})
    write_tree(config_source(config, "server1"), {"c": "1"})
    during: list[bool] = []

    def progress(what: str, files: int, size: int) -> None:
        during.append(gc.isenabled())

    result = run_sync(SyncRequest(k="server1"), config, config.config_inventory, progress)

    assert result.ok
    assert during and not any(during)
    assert gc.isenabled()
