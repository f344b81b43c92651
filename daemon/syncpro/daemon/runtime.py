"""The daemon's shared runtime: the config-and-inventory snapshot, its generation, the state
store, watcher and scheduler in use, the locks that order them, and the start/stop protocol
of the pieces that own threads.

Every piece (runner, rescanner, refresher, reloader, control handler) reads what it needs from
here at the moment it needs it, so a reload that swaps one of them is seen by all at once.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Protocol

from syncpro.config.model import Config
from syncpro.daemon.scheduler import Scheduler
from syncpro.daemon.sdnotify import Notifier
from syncpro.daemon.state import StateLock, StateStore
from syncpro.daemon.watch import Watcher
from syncpro.engine.buildpool import BuildPool
from syncpro.engine.tree import Ignore
from syncpro.inventory.apps import App, Inventory


@dataclass(frozen=True)
class Snapshot:
    """The config and inventory every sync of one moment uses together."""

    config: Config
    inventory: Inventory
    ignore: Ignore

    def app(self, app_key: str) -> App | None:
        app = self.inventory.by_key().get(app_key)
        return app if app is not None and app.auto_deploy else None


class Piece(Protocol):
    """A part of the daemon that owns a thread: started once, stopped by a deadline."""

    def start(self) -> None: ...

    def stop(self, deadline: float) -> None:
        """Stop, waiting at most until `deadline` (time.monotonic()) for the thread."""


def time_left(deadline: float) -> float:
    """Given a monotonic deadline, return the seconds left to it, never negative."""
    return max(0.0, deadline - time.monotonic())


class Runtime:
    """What every piece of the running daemon shares (uvicorn's ServerState, for syncpro)."""

    def __init__(self, notifier: Notifier) -> None:
        self.notifier = notifier
        self.lock = threading.Lock()
        """Guards the snapshot, its generation and the inventory error, which change together:
        a sync takes the snapshot once and uses it to the end, so a reload never mixes two
        configs in one sync. The refresher holds it to adopt what it read."""
        self._snapshot: Snapshot | None = None
        self.generation = 0
        """Counts the reloads adopted, so an inventory refresh begun before one knows that
        what it read (or failed to read) belongs to a config no longer in use."""
        self.inventory_error: str | None = None
        self.apply_lock = threading.Lock()
        """Held while a reload applies its config, and by shutdown: once stopping has begun,
        no reload adopts a new config or starts servers."""
        self.stopping = threading.Event()
        self.notify_lock = threading.Lock()
        """Orders systemd notifications: no READY=1 after STOPPING=1."""
        self.ready = False
        # The parts a reload may swap; each is read once by whoever uses it.
        self.state: StateStore | None = None
        self.state_lock: StateLock | None = None
        self.retired_states: list[StateStore] = []
        """Stores a reload replaced: a running sync may still hold one; closed at shutdown."""
        self.watcher: Watcher | None = None
        self.scheduler: Scheduler | None = None
        self.builds = BuildPool()
        """Processes for first trees, started with the first one (see engine.buildpool)."""

    @property
    def snapshot(self) -> Snapshot:
        with self.lock:
            return self.snapshot_held()

    def snapshot_version(self) -> object:
        """What changes whenever the snapshot is replaced, read without the lock (a reference
        is read at once): for caches of what a snapshot answers."""
        return self._snapshot

    def snapshot_held(self) -> Snapshot:
        """The snapshot, for a caller that holds `lock`."""
        assert self._snapshot is not None, "startup() not called"
        return self._snapshot

    def set_snapshot_held(self, snapshot: Snapshot) -> None:
        """Replace the snapshot, for a caller that holds `lock`."""
        self._snapshot = snapshot

    def ready_unless_stopping(self, status: str) -> None:
        """End a reload with READY=1, unless STOPPING=1 was sent: systemd must not read that
        the daemon serves again while it stops."""
        with self.notify_lock:
            if not self.stopping.is_set():
                self.notifier.ready(status)
