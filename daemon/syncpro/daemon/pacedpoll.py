"""The polling fallback, paced by what a poll costs.

A root is polled when inotify cannot watch it (its watch limit reached, no instance left): the
daemon then takes a snapshot of the whole tree, a stat of every name, every
`watch.poll_interval` seconds. That is the fallback the contract asks for, and on a deploy host
that ran out of inotify watches it is the biggest tree there is: 100,000 names take about a
second to snapshot here, so polling them every 2 s kept half a core busy for as long as the
daemon ran, and a tree that takes longer than the interval was polled without pause.

Here the wait before a poll is at least `POLL_REST` times what the last poll took: polling
takes at most a tenth of a core, and a change in a huge polled tree is seen later instead.
"""

from __future__ import annotations

import time
from typing import Any

from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingEmitter

POLL_REST = 9.0
"""The least wait before a poll, in multiples of the last poll's time."""


class PacedPollingEmitter(PollingEmitter):
    """watchdog's polling emitter, waiting longer between polls that cost more."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.last_poll = 0.0
        """Seconds the last poll took (its snapshot and the events it queued)."""

    def next_wait(self, interval: float) -> float:
        """Given the configured interval, return how long to wait before the next poll."""
        return max(interval, POLL_REST * self.last_poll)

    def queue_events(self, timeout: float) -> None:
        wait = self.next_wait(timeout)
        began = time.monotonic()
        super().queue_events(wait)
        # The wait is watchdog's own, and ends early only when the emitter stops.
        self.last_poll = max(0.0, time.monotonic() - began - wait)


def paced_polling_observer(*, timeout: float) -> BaseObserver:
    """A polling observer whose emitters are PacedPollingEmitter."""
    return BaseObserver(PacedPollingEmitter, timeout=timeout)
