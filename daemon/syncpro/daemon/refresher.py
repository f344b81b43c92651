"""The database inventory: read at start and on reload, re-read every inventory.refresh
seconds by a thread of its own, and kept when the database is away (retried from 1 s, doubling
up to the refresh period: a database restart is noticed quickly, a long outage is not
hammered)."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable

import structlog

from syncpro.config.model import Config
from syncpro.daemon.metrics import Metrics
from syncpro.daemon.runtime import Runtime, Snapshot, time_left
from syncpro.errors import InventoryError
from syncpro.inventory.apps import Inventory
from syncpro.inventory.source import load_inventory

log = structlog.get_logger()

Loader = Callable[[Config], Inventory]
"""Given a config, return its inventory; raise InventoryError when it cannot be read."""


def read_inventory(config: Config) -> Inventory:
    """The inventory config names, from its apps or its database."""
    return load_inventory(config.inventory, config.config_inventory)


def load_or_keep(
    config: Config, previous: Inventory | None, loader: Loader = read_inventory
) -> tuple[Inventory, str | None]:
    """Return the inventory of config, and why it could not be read (the previous one is
    kept then, or none at start)."""
    try:
        return loader(config), None
    except InventoryError as exc:
        error = str(exc)
        inventory = previous if previous is not None else Inventory(())
        log.error("inventory.unavailable", error=error, apps_kept=len(inventory.apps))
        return inventory, error


class Refresher:
    """Re-reads the inventory of the running config when it is due, and adopts it into the
    runtime's snapshot unless a reload came first."""

    def __init__(
        self,
        runtime: Runtime,
        metrics: Metrics,
        on_refreshed: Callable[[], None],
        on_status: Callable[[], object],
        loader: Loader = read_inventory,
    ) -> None:
        """on_refreshed is called when the apps changed or the database is back (a rescan is
        due), on_status when the status line has news."""
        self.runtime = runtime
        self.metrics = metrics
        self.on_refreshed = on_refreshed
        self.on_status = on_status
        self.loader = loader
        # Both guarded by runtime.lock: a reload sets them with the snapshot it adopts.
        self._due = math.inf
        """Monotonic time of the next read."""
        self.backoff = 0.0
        """Seconds the last failed read waited before the next: 0 when the last read worked."""
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def load(self, config: Config, previous: Inventory | None) -> tuple[Inventory, str | None]:
        """The inventory of config for a start or a reload, or previous with why not."""
        inventory, error = load_or_keep(config, previous, self.loader)
        self.metrics.inventory_read(len(inventory.apps), error)
        return inventory, error

    def begin(self, error: str | None) -> None:
        """At start, given why the first read failed (None: it worked): plan the next one."""
        with self.runtime.lock:
            self.backoff = 1.0 if error else 0.0
            self.rearm_held(self.runtime.snapshot_held().config, error)

    def rearm_held(self, config: Config, error: str | None) -> None:
        """Given the config just adopted and why its inventory failed (None: it worked), read
        again in 1 s or after the refresh period. The caller holds runtime.lock."""
        self._due = time.monotonic() + (1.0 if error else config.inventory.refresh)
        self._wake.set()

    @property
    def due(self) -> float:
        with self.runtime.lock:
            return self._due

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="syncpro-inventory", daemon=False)
        self._thread.start()

    def stop(self, deadline: float) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(time_left(deadline))

    def _loop(self) -> None:
        while not self._stop.is_set():
            with self.runtime.lock:
                wait = self._due - time.monotonic()
                due = wait <= 0
                if due:
                    self._due = math.inf  # until this refresh says when the next one is
                source = self.runtime.snapshot_held().config.inventory.source
            if not due:
                self._wake.wait(None if math.isinf(wait) else wait)
                self._wake.clear()
                continue
            if source != "config":
                self.refresh()

    def refresh(self) -> None:
        """Read the inventory once and adopt it, or keep the one in use and back off."""
        with self.runtime.lock:
            snap = self.runtime.snapshot_held()
            generation = self.runtime.generation
        refresh = snap.config.inventory.refresh
        try:
            inventory = self.loader(snap.config)
        except InventoryError as exc:
            self._failed(snap, generation, str(exc), refresh)
            return
        with self.runtime.lock:
            if self.runtime.generation != generation:
                log.info("inventory.refresh_discarded", reason="reloaded")
                return
            recovered = self.runtime.inventory_error is not None
            self.runtime.inventory_error = None
            self.backoff = 0.0
            self._due = time.monotonic() + refresh
            self.runtime.set_snapshot_held(Snapshot(snap.config, inventory, snap.ignore))
        self.metrics.inventory_read(len(inventory.apps), None)
        if recovered or inventory.apps != snap.inventory.apps:
            log.info("inventory.refreshed", apps=len(inventory.apps), recovered=recovered)
            self.on_refreshed()
            self.on_status()

    def _failed(self, snap: Snapshot, generation: int, error: str, refresh: float) -> None:
        self.metrics.inventory_read(None, error)
        with self.runtime.lock:
            if self.runtime.generation != generation:
                # A reload read its own inventory meanwhile: this error is not about it.
                log.info("inventory.refresh_discarded", reason="reloaded", error=error)
                return
            first = self.runtime.inventory_error is None
            self.runtime.inventory_error = error
            self.backoff = min(max(1.0, self.backoff * 2), refresh)
            self._due = time.monotonic() + self.backoff
            backoff = self.backoff
        log.log(
            logging.ERROR if first else logging.WARNING,
            "inventory.unavailable",
            error=error,
            apps_kept=len(snap.inventory.apps),
            retry_in=backoff,
        )
        self.on_status()
