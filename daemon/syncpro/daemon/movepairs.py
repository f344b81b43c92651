"""watchdog's inotify observer, with a move-pairing queue whose cost per event is constant.

watchdog pairs each IN_MOVED_TO with its IN_MOVED_FROM (same cookie) in a queue that sits
between its inotify reader and its emitter thread, and finds the pair by scanning that queue
from its oldest event, twice per rename. The queue is short while the emitter keeps up, but it
holds its head back for half a second whenever the head is a rename's first half whose second
has not been read yet, and events pile up behind it meanwhile. An rsync upload renames every
file into place: 40,000 files made 45 s of one core's scanning on this host before the app's
sync could even start (the upload itself took 2 s).

Here the unpaired first halves are indexed by cookie, a paired one is left in the queue as a
tombstone (skipped when it reaches the head) instead of being cut out of the middle, and a
reader holding back for a head that gets paired is woken at once. Everything else — which
events come out, in which order, the half-second wait for an unpaired first half, the
watches' own bookkeeping — is watchdog's.

This leans on two names inside watchdog 7.1 (`InotifyWatchGroup._move_event_grouper`, the
emitter's `_inotify_fd` and `_inotify`); `inotify_observer()` falls back to watchdog's own observer,
unchanged, where they are not as expected.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections import deque
from typing import Any

from watchdog.observers.api import BaseObserver
from watchdog.observers.inotify import InotifyEmitter, InotifyObserver, InotifyWatchGroup
from watchdog.observers.inotify_move_event_grouper import (
    GroupedInotifyEvent,
    InotifyMoveEventGrouper,
    PathedInotifyEvent,
)


class _Queued:
    __slots__ = ("at", "event", "held", "live")

    def __init__(self, event: GroupedInotifyEvent, at: float, held: bool) -> None:
        self.event = event
        self.at = at
        self.held = held  # a rename's first half: waits up to `delay` for its second
        self.live = True  # False once paired: the pair travels as one event further back


class PairingQueue(InotifyMoveEventGrouper):
    """What watchdog's move-event grouper does, at a constant cost per event."""

    def __init__(self) -> None:  # no super(): its DelayedQueue is what this replaces
        self._cond = threading.Condition()
        self._events: deque[_Queued] = deque()
        self._unpaired: dict[int, _Queued] = {}  # cookie -> a first half still queued
        self._closed = False

    def put_event(self, event: PathedInotifyEvent) -> None:
        ev = event.ev
        with self._cond:
            grouped: GroupedInotifyEvent = event
            if ev.is_moved_to:
                first = self._unpaired.pop(ev.cookie, None)
                if first is not None:
                    first.live = False
                    grouped = (first.event, event)  # type: ignore[assignment]
            queued = _Queued(grouped, time.monotonic(), ev.is_moved_from)
            self._events.append(queued)
            if ev.is_moved_from:
                self._unpaired[ev.cookie] = queued
            self._cond.notify_all()

    def get_queued_moved_from_event(self, cookie: int) -> PathedInotifyEvent | None:
        with self._cond:
            first = self._unpaired.get(cookie)
            return first.event if first is not None else None  # type: ignore[return-value]

    def read_event(self) -> GroupedInotifyEvent | None:
        """Return the next event (a pair for a whole rename), or None once closed."""
        with self._cond:
            while True:
                queue = self._events
                while queue and not queue[0].live:
                    queue.popleft()
                if self._closed:
                    return None
                if not queue:
                    self._cond.wait()
                    continue
                head = queue[0]
                if head.held:
                    left = head.at + self.delay - time.monotonic()
                    if left > 0:
                        self._cond.wait(left)  # woken early when it is paired
                        continue
                    self._unpaired.pop(head.event.ev.cookie, None)  # type: ignore[union-attr]
                queue.popleft()
                return head.event

    def discard_pending_events(self) -> None:
        with self._cond:
            self._events.clear()
            self._unpaired.clear()
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def __len__(self) -> int:
        with self._cond:
            return sum(1 for queued in self._events if queued.live)


@dataclasses.dataclass
class _WatchGroup(InotifyWatchGroup):
    _move_event_grouper: InotifyMoveEventGrouper = dataclasses.field(
        default_factory=PairingQueue, init=False
    )


class _Emitter(InotifyEmitter):
    def on_thread_start(self) -> None:
        self._inotify = _WatchGroup(
            self._inotify_fd,
            os.fsencode(self.watch.path),
            is_recursive=self.watch.is_recursive,
            event_mask=self.get_event_mask_from_filter(),
            follow_symlink=self.watch.follow_symlink,
        )


def _fits() -> bool:
    """Whether watchdog's inside is what this module was written against."""
    group_fields = {f.name for f in dataclasses.fields(InotifyWatchGroup)}
    emitter_init = InotifyEmitter.__init__.__code__.co_names
    return (
        "_move_event_grouper" in group_fields
        and "_inotify_fd" in emitter_init
        and "_inotify" in emitter_init
        and "_emitter_class" in BaseObserver.__init__.__code__.co_names
    )


FITS = _fits()


def inotify_observer(**kwargs: Any) -> BaseObserver:
    """An inotify observer using PairingQueue, or watchdog's own where it does not fit."""
    observer = InotifyObserver(**kwargs)
    if FITS:
        # Emitters are made by schedule(), from this class: none exists yet.
        observer._emitter_class = _Emitter
    return observer
