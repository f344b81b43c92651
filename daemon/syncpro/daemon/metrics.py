"""The daemon's Prometheus metrics: one registry of its own, and the calls that update it."""

from __future__ import annotations

import platform
import time
from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from syncpro import __version__
from syncpro.daemon.watch import TROUBLE
from syncpro.engine.result import SyncResult

CONTENT_TYPE = CONTENT_TYPE_LATEST
# From a no-op sync of a small app (milliseconds) to a multi-gigabyte copy (minutes).
_DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    """What `GET /metrics` shows. A registry per instance, never the global one: daemons run
    in one test process must not add to each other's counters."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.syncs = Counter(
            "syncpro_syncs",
            "Syncs of an app, by mode (program source area), origin and outcome",
            ["app", "mode", "origin", "outcome"],
            registry=r,
        )
        self.sync_seconds = Histogram(
            "syncpro_sync_duration_seconds",
            "Seconds one sync request took, by origin",
            ["origin"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.files = Counter(
            "syncpro_files",
            "Files put into published trees, copied or hard-linked from the previous tree",
            ["how"],
            registry=r,
        )
        self.bytes = Counter(
            "syncpro_bytes",
            "Bytes of the files put into published trees, copied or hard-linked",
            ["how"],
            registry=r,
        )
        self.last_success = Gauge(
            "syncpro_last_success_timestamp_seconds",
            "Unix time of the end of the app's last successful sync",
            ["app"],
            registry=r,
        )
        self.last_failed = Gauge(
            "syncpro_app_last_sync_failed",
            "1 when the app's last sync failed, 0 when it succeeded",
            ["app"],
            registry=r,
        )
        self.pending = Gauge("syncpro_pending", "(app, mode) keys waiting to sync", registry=r)
        self.running = Gauge("syncpro_running", "Groups syncing now", registry=r)
        self.retrying = Gauge(
            "syncpro_retrying", "(app, mode) whose last sync failed, waiting to retry", registry=r
        )
        self.overflows = Counter(
            "syncpro_watch_overflows",
            "Times the kernel's inotify event queue overflowed (events lost, rescan follows)",
            registry=r,
        )
        self.watch_trouble = Counter(
            "syncpro_watch_trouble",
            "Watcher trouble that asked for a rescan, by reason",
            ["reason"],
            registry=r,
        )
        self.rescans = Counter(
            "syncpro_rescans", "Rescans asked for, by reason", ["reason"], registry=r
        )
        self.inventory_errors = Counter(
            "syncpro_inventory_errors", "Failed reads of the inventory", registry=r
        )
        self.inventory_refresh = Gauge(
            "syncpro_inventory_last_refresh_timestamp_seconds",
            "Unix time the inventory was last read successfully",
            registry=r,
        )
        self.inventory_apps = Gauge(
            "syncpro_inventory_apps", "Apps in the inventory in use", registry=r
        )
        self.reloads = Counter(
            "syncpro_reloads", "Config reloads, by outcome", ["outcome"], registry=r
        )
        self.ready = Gauge(
            "syncpro_ready", "1 once the daemon serves, 0 while stopping", registry=r
        )
        self.healthy = Gauge("syncpro_healthy", "1 when GET /healthz answers 200", registry=r)
        self.started = Gauge(
            "syncpro_start_time_seconds", "Unix time the daemon started", registry=r
        )
        self.build = Info("syncpro_build", "The running syncpro", registry=r)
        self.build.info({"version": __version__, "python": platform.python_version()})
        self.started.set(time.time())
        for how in ("copied", "linked"):
            self.files.labels(how)
            self.bytes.labels(how)

    def watch_scheduler(self, counts: Callable[[], tuple[int, int]]) -> None:
        """Given a function returning (pending, running), read them at every scrape."""
        self.pending.set_function(lambda: counts()[0])
        self.running.set_function(lambda: counts()[1])

    def watch_retries(self, waiting: Callable[[], int]) -> None:
        """Given a function counting the (app, mode) waiting to retry, read it at every
        scrape."""
        self.retrying.set_function(lambda: float(waiting()))

    def watch_health(self, ready: Callable[[], bool], healthy: Callable[[], bool]) -> None:
        """Given functions saying whether the daemon is ready and healthy, read them at
        every scrape."""
        self.ready.set_function(lambda: 1.0 if ready() else 0.0)
        self.healthy.set_function(lambda: 1.0 if healthy() else 0.0)

    def rescan_requested(self, reason: str) -> None:
        """Given why a rescan is asked for, count it; an overflow counts as one too."""
        self.rescans.labels(reason).inc()
        if reason == "overflow":
            self.overflows.inc()
        if reason in TROUBLE:
            self.watch_trouble.labels(reason).inc()

    def inventory_read(self, apps: int | None, error: str | None) -> None:
        """Given the outcome of one read of the inventory, count it."""
        if error is not None:
            self.inventory_errors.inc()
            return
        self.inventory_refresh.set(time.time())
        if apps is not None:
            self.inventory_apps.set(apps)

    def sync_finished(self, result: SyncResult, seconds: float) -> None:
        """Given a sync's result and how long it took, count its apps and files."""
        request = result.request
        mode = "update" if request.update else "remote"
        origin = request.origin or "unknown"
        self.sync_seconds.labels(origin).observe(seconds)
        now = time.time()
        for app in result.apps:
            outcome = "ok" if app.ok else "failed"
            self.syncs.labels(app.app_key, mode, origin, outcome).inc()
            self.last_failed.labels(app.app_key).set(0 if app.ok else 1)
            if app.ok:
                self.last_success.labels(app.app_key).set(now)
            for target in (app.program, app.config):
                stats = target.stats if target is not None else None
                if stats is None:
                    continue
                self.files.labels("copied").inc(stats.copied)
                self.files.labels("linked").inc(stats.linked + stats.hardlinks)
                self.bytes.labels("copied").inc(stats.bytes_copied)

    def linked_bytes(self, size: int) -> None:
        self.bytes.labels("linked").inc(size)

    def reloaded(self, error: str | None) -> None:
        self.reloads.labels("ok" if error is None else "failed").inc()

    def exposition(self) -> bytes:
        """Return every metric in the Prometheus text format."""
        return generate_latest(self.registry)
