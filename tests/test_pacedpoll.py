"""The polling fallback waits longer between polls that cost more, and still reports changes."""

from __future__ import annotations

import os
import time
from pathlib import Path

from watchdog.events import FileCreatedEvent
from watchdog.observers.api import EventQueue, ObservedWatch

from syncpro.config.model import DEFAULT_IGNORE
from syncpro.daemon.pacedpoll import POLL_REST, PacedPollingEmitter
from syncpro.daemon.watch import Watcher
from syncpro.engine.tree import Ignore

NAMES = 40
STAT = 0.002  # each stat made this slow: a poll of a big tree


def test_a_poll_that_costs_more_waits_longer_and_still_reports_a_change(tmp_path: Path) -> None:
    for i in range(NAMES):
        (tmp_path / f"f{i}").write_text("x", encoding="utf-8")

    def slow_stat(path: str) -> os.stat_result:
        time.sleep(STAT)
        return os.stat(path)

    queue = EventQueue()
    emitter = PacedPollingEmitter(
        queue, ObservedWatch(tmp_path, recursive=True), timeout=0.01, stat=slow_stat
    )
    emitter.on_thread_start()  # the first snapshot, as the emitter's thread takes it
    assert emitter.next_wait(0.01) == 0.01, "nothing polled yet: the configured interval"
    (tmp_path / "new").write_text("y", encoding="utf-8")
    emitter.queue_events(0.01)

    assert emitter.last_poll >= (NAMES + 1) * STAT
    assert emitter.next_wait(0.01) == POLL_REST * emitter.last_poll
    assert emitter.next_wait(3600) == 3600, "a longer interval still holds"
    events = []
    while not queue.empty():
        events.append(queue.get()[0])
    assert FileCreatedEvent(str(tmp_path / "new")) in events


def test_a_polled_root_uses_the_paced_emitter(tmp_path: Path) -> None:
    root = tmp_path / "remotecomdir"
    root.mkdir()
    watcher = Watcher(
        [root],
        ignore=Ignore(DEFAULT_IGNORE),
        on_change=lambda path: None,
        on_trouble=print,
        force_polling=True,
    )
    with watcher:
        assert watcher.backends[root] == "polling"
        (emitter,) = watcher._observers[root].emitters
        assert isinstance(emitter, PacedPollingEmitter)
