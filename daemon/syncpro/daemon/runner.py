"""Running the daemon's syncs: a scheduler batch (or a control request) becomes one sync,
whose outcome is recorded per app; a failed (app, mode) is tried again after 5 s, doubling up
to the rescan interval."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import structlog

from syncpro.daemon.metrics import Metrics
from syncpro.daemon.progress import RunningSyncs
from syncpro.daemon.routing import group_of
from syncpro.daemon.runtime import Runtime, Snapshot, time_left
from syncpro.daemon.scheduler import Batch, Scheduler
from syncpro.daemon.state import fingerprint, marker_is_new, marker_signature
from syncpro.engine import layout
from syncpro.engine.request import BOTH_PARTS, CONFIG, SyncRequest, Trigger
from syncpro.engine.result import FAILED, SyncResult
from syncpro.engine.sync import run_sync
from syncpro.engine.walk import plan_path
from syncpro.inventory.apps import App

log = structlog.get_logger()

RETRY_FIRST = 5.0
"""Seconds before the first retry of a failed (app, mode); each retry doubles it, up to the
rescan interval."""

Key = tuple[str, bool]
"""(app_key, update): one app in one mode."""


@dataclass
class Retry:
    """A failed (app, mode) waiting for its next try."""

    attempts: int
    delay: float
    due: float
    """Monotonic time of the next try."""
    fingerprint: str | None
    """The sources the failed sync read: a change of them starts the backoff again."""
    error: str


class Runner:
    """Runs syncs for the scheduler's workers and the control plane, and remembers how each
    app's last one went. Its threads are the scheduler's, which it starts and stops."""

    def __init__(self, runtime: Runtime, metrics: Metrics, running: RunningSyncs) -> None:
        self.runtime = runtime
        self.metrics = metrics
        self.running = running
        # Per (app, mode) being synced: the fingerprint its sync read at its start.
        self._inflight: dict[Key, str | None] = {}
        self._inflight_lock = threading.Lock()
        """Guards _inflight and _recheck: workers and the rescanner meet there."""
        # (app, mode) a rescan passed over while its sync ran: checked again when it ends.
        self._recheck: set[Key] = set()
        self._retries: dict[Key, Retry] = {}
        self._retry_lock = threading.Lock()
        """Guards _retries: workers plan them, the main loop submits them, status reads them."""
        self._last: dict[str, dict[str, Any]] = {}
        self._last_lock = threading.Lock()
        """Guards _last, the last result per app that status shows."""

    def start(self) -> None:
        """Start the scheduler of the running config, whose workers call run_batch."""
        watch = self.runtime.snapshot.config.watch
        scheduler = Scheduler(
            self.run_batch,
            settle=watch.settle,
            max_wait=watch.max_wait,
            workers=watch.workers,
            group_of=lambda app_key: group_of(self.runtime.snapshot, app_key),
            groups_version=self.runtime.snapshot_version,
        )
        self.runtime.scheduler = scheduler
        scheduler.start()

    def stop(self, deadline: float) -> None:
        """Stop taking work and let running batches finish until the deadline; log what was
        left unrun."""
        scheduler = self.runtime.scheduler
        if scheduler is None:
            return
        abandoned = scheduler.stop(time_left(deadline))
        if abandoned:
            # Named for the shutdown it belongs to: names are stable (docs/log-events.md).
            log.warning(
                "service.abandoned",
                batches=[{"app_keys": list(b.app_keys), "update": b.update} for b in abandoned],
            )

    # --- running a batch (scheduler worker threads) ---

    def run_batch(self, batch: Batch) -> None:
        snap = self.runtime.snapshot
        apps = [app for key in batch.app_keys if (app := snap.app(key)) is not None]
        apps = [app for app in apps if self._marker_ready(snap, app, batch.update)]
        if not apps:
            return
        request = SyncRequest(
            k=" ".join(app.app_key for app in apps),
            update=batch.update,
            origin="watcher",
            trigger=Trigger(batch.trigger, tuple(batch.paths)),
            # With a ready marker, its arrival says the app's upload is whole: publish it all
            # (a run held back for the marker dropped what its events had named).
            parts=BOTH_PARTS if snap.config.watch.ready_marker else batch.parts,
        )
        self.sync_and_record(snap, request, apps)

    def sync_and_record(
        self, snap: Snapshot, request: SyncRequest, apps: Iterable[App]
    ) -> SyncResult:
        """Sync, then record per app the fingerprint of the sources as the sync's own walk read
        them (one walk: the sync hands its digests back), for the parts it synced: a change
        that lands after that walk differs from the record and is synced again. The ready
        marker is recorded as it was before the sync: one written during it is honoured next."""
        started = time.time()
        dirs, marker = snap.config.dirs, snap.config.watch.ready_marker
        apps = list(apps)
        keys = [(app.app_key, request.update) for app in apps]
        with self._inflight_lock:
            for key in keys:
                self._inflight.setdefault(key, None)
        try:
            signatures = {
                app.app_key: marker_signature(dirs, app, request.update, marker) if marker else None
                for app in apps
            }
            # A type-2 config is published from its list, not walked whole by the sync: its
            # folder's digest is taken here, before the sync reads it.
            before: dict[str, tuple[str, float]] = {}
            for app in apps:
                if app.config_integrated and CONFIG in request.parts:
                    source = layout.config_source(dirs, app, request.update)
                    with contextlib.suppress(OSError):
                        plan = plan_path(source, None, snap.ignore, owners=False)
                        before[str(source)] = (plan.digest, plan.newest_ctime)
            with self.running.track(request, tuple(a.app_key for a in apps)) as progress:
                result = run_sync(
                    request, snap.config, snap.inventory, progress, self.runtime.builds
                )
        finally:
            with self._inflight_lock:
                for key in keys:
                    self._inflight.pop(key, None)
        now = time.time()
        self.metrics.sync_finished(result, result.seconds)
        known = {**result.digests, **before}
        state = self.runtime.state
        for outcome in result.apps:
            found = snap.app(outcome.app_key)
            fp = (
                fingerprint(dirs, found, request.update, snap.ignore, known=known)
                if found is not None
                else None
            )
            failures = [
                t for t in (outcome.program, outcome.config) if t is not None and t.status == FAILED
            ]
            if fp is not None and not failures and state is not None:
                recorded = state.get(outcome.app_key, request.update)
                state.record(
                    outcome.app_key,
                    request.update,
                    fp.merged(recorded.fingerprint if recorded else None, request.parts),
                    started,
                    signatures.get(outcome.app_key),
                )
            self._remember(outcome.app_key, request.update, outcome.ok, outcome.errors, now)
            digest = fp.digest if fp is not None else None
            error = "; ".join(str(t.error) for t in failures) if failures else None
            self._track_retry(snap, outcome.app_key, request.update, digest, error)
        self._recheck_after(snap, keys)
        return result

    def recheck_later(self, key: Key) -> None:
        """A rescan passed over (app, mode) while its sync ran: check it when that ends."""
        with self._inflight_lock:
            self._recheck.add(key)

    def _recheck_after(self, snap: Snapshot, keys: list[Key]) -> None:
        """A rescan that passed over a running sync (after an inotify overflow, say) checks
        that (app, mode) now: what landed after the sync's walk is submitted."""
        with self._inflight_lock:
            due = [key for key in keys if key in self._recheck]
            self._recheck.difference_update(due)
        scheduler, state = self.runtime.scheduler, self.runtime.state
        if not due or scheduler is None or state is None:
            return
        for app_key, update in due:
            app = snap.app(app_key)
            fp = fingerprint(snap.config.dirs, app, update, snap.ignore) if app else None
            record = state.get(app_key, update)
            if fp is None:
                continue
            for part in sorted(fp.changed_parts(record.fingerprint if record else None)):
                scheduler.submit(app_key, update, None, "rescan", part=part)

    # --- retries of failed syncs: 5 s, doubling, up to the rescan interval ---

    def _track_retry(
        self, snap: Snapshot, app_key: str, update: bool, digest: str | None, error: str | None
    ) -> None:
        """Given the outcome of one (app, mode), forget its retry when it succeeded, or plan
        the next try when it failed: the same sources failing again wait twice as long, new
        sources start again from RETRY_FIRST."""
        key = (app_key, update)
        with self._retry_lock:
            previous = self._retries.pop(key, None)
            if error is None:
                if previous is not None:
                    log.info(
                        "sync.retry_succeeded",
                        app_key=app_key,
                        update=update,
                        attempts=previous.attempts,
                    )
                return
            ceiling = max(RETRY_FIRST, snap.config.watch.rescan_interval)
            if previous is not None and previous.fingerprint == digest:
                attempts, delay = previous.attempts + 1, min(previous.delay * 2, ceiling)
            else:
                attempts, delay = 1, min(RETRY_FIRST, ceiling)
            self._retries[key] = Retry(attempts, delay, time.monotonic() + delay, digest, error)
        log.warning(
            "sync.retry_scheduled",
            app_key=app_key,
            update=update,
            attempt=attempts,
            retry_in=delay,
            error=error,
        )

    def submit_due_retries(self, now: float) -> None:
        """Given the monotonic time, hand the scheduler the failed (app, mode) due again."""
        scheduler = self.runtime.scheduler
        if scheduler is None:
            return
        snap = self.runtime.snapshot
        due: list[Key] = []
        with self._retry_lock:
            for key, retry in list(self._retries.items()):
                if snap.app(key[0]) is None:
                    del self._retries[key]  # no longer an app to sync
                elif retry.due <= now:
                    # Should the run never report (its marker not ready), try again later.
                    retry.due = now + retry.delay
                    due.append(key)
        for app_key, update in due:
            scheduler.submit(app_key, update, None, "retry", immediate=True)

    def retrying(self) -> int:
        """How many (app, mode) wait for a retry."""
        with self._retry_lock:
            return len(self._retries)

    def retry_status(self) -> list[dict[str, Any]]:
        """The retries as `status` shows them, each with the seconds left to its next try."""
        now = time.monotonic()
        with self._retry_lock:
            return [
                {
                    "app_key": app_key,
                    "update": update,
                    "attempts": retry.attempts,
                    "retry_in": round(max(0.0, retry.due - now), 3),
                    "error": retry.error,
                }
                for (app_key, update), retry in sorted(self._retries.items())
            ]

    # --- what waits and what was done ---

    def _marker_ready(self, snap: Snapshot, app: App, update: bool) -> bool:
        """Whether the app's ready marker exists and was written after the last sync of the
        app started (that sync may not have seen what came with it)."""
        marker = snap.config.watch.ready_marker
        state = self.runtime.state
        if not marker or state is None:
            return True
        current = marker_signature(snap.config.dirs, app, update, marker)
        record = state.get(app.app_key, update)
        if marker_is_new(current, record.marker if record is not None else None):
            return True
        log.info("sync.waiting_for_marker", app_key=app.app_key, update=update, marker=marker)
        return False

    def _remember(self, app_key: str, update: bool, ok: bool, errors: list[str], at: float) -> None:
        with self._last_lock:
            self._last[app_key] = {"update": update, "ok": ok, "errors": errors, "at": at}

    def last(self) -> dict[str, dict[str, Any]]:
        """The last result per app key, copied."""
        with self._last_lock:
            return {key: dict(value) for key, value in self._last.items()}
