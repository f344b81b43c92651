"""Rescans: the re-check that makes up for lost events (catch-up at start, periodic, after a
reload, an inventory change or watcher trouble). It compares each app's sources with what the
state recorded, never adds a run for an app already pending or running, and after watcher
trouble comes at most once per max_wait: a re-check must never feed the trouble it answers."""

from __future__ import annotations

import math
import threading
import time

import structlog

from syncpro.daemon.metrics import Metrics
from syncpro.daemon.runner import Runner
from syncpro.daemon.runtime import Runtime, time_left
from syncpro.daemon.state import fingerprint, present_parts
from syncpro.daemon.watch import TROUBLE
from syncpro.engine.request import BOTH_PARTS
from syncpro.inventory.apps import App

log = structlog.get_logger()


class Rescanner:
    """The rescan thread: many requests meanwhile make one rescan."""

    def __init__(self, runtime: Runtime, runner: Runner, metrics: Metrics) -> None:
        self.runtime = runtime
        self.runner = runner
        self.metrics = metrics
        self._reasons: list[str] = []
        self._lock = threading.Lock()
        """Guards the pending reasons and when trouble was first reported: any thread asks."""
        self._wanted = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_trouble_rescan = -math.inf
        self._trouble_since: float | None = None

    def request(self, reason: str) -> None:
        """Ask for a rescan, saying why; from any thread."""
        self.metrics.rescan_requested(reason)
        with self._lock:
            self._reasons.append(reason)
            if reason in TROUBLE and self._trouble_since is None:
                self._trouble_since = time.monotonic()
        self._wanted.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="syncpro-rescan", daemon=False)
        self._thread.start()

    def stop(self, deadline: float) -> None:
        self._stop.set()
        self._wanted.set()
        if self._thread is not None:
            self._thread.join(time_left(deadline))

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wanted.wait()
            if self._stop.is_set():
                return
            with self._lock:
                trouble_only = all(r in TROUBLE for r in self._reasons)
                since = self._trouble_since
            if trouble_only:
                # Events lost in a storm (an overflow, a watcher rebuilding) are covered by
                # one re-check after it: at most one per max_wait, however many there were.
                # It starts `settle` after the first report at the earliest: watchdog
                # rebuilds its watches right after reporting an overflow, and what lands
                # while it does has no event; a walk that begins later sees it. Whatever
                # else asks meanwhile comes along with it.
                watch = self.runtime.snapshot.config.watch
                start = self._last_trouble_rescan + watch.max_wait
                if since is not None:
                    start = max(start, since + watch.settle)
                delay = start - time.monotonic()
                if delay > 0 and self._stop.wait(delay):
                    return
            self._wanted.clear()
            with self._lock:
                reasons, self._reasons = self._reasons, []
                self._trouble_since = None
            if not reasons:
                continue
            try:
                self.rescan("catch-up" if "catch-up" in reasons else "rescan", reasons)
            except Exception:
                log.exception("service.rescan_failed", reasons=reasons)
            if any(r in TROUBLE for r in reasons):
                # From its end: a long walk must not be followed by another at once.
                self._last_trouble_rescan = time.monotonic()

    def rescan(self, trigger: str, reasons: list[str]) -> None:
        """Given what triggers it and why, submit every (app, mode) whose sources differ from
        the record, a group as soon as its apps are checked (a first start's syncs begin
        while the walk goes on), its oldest change first."""
        snap = self.runtime.snapshot
        state, scheduler = self.runtime.state, self.runtime.scheduler
        if state is None or scheduler is None:
            return
        changed: list[tuple[float, str, bool, set[str]]] = []
        skipped = walked = 0
        groups: dict[str, list[App]] = {}
        for app in snap.inventory.deployable:
            groups.setdefault(app.local_name, []).append(app)
        dirs = snap.config.dirs
        for members in groups.values():
            found: list[tuple[float, str, bool, set[str]]] = []
            present = {
                (m.app_key, u): present_parts(dirs, m, u) for m in members for u in (False, True)
            }
            # The modes with sources in the group: an app never synced can skip its walk only
            # if no run of the other mode must be ordered against it by arrival.
            modes = {u for (_, u), parts in present.items() if parts}
            for app in members:
                pending, running = scheduler.busy()
                for update in (False, True):
                    if self._stop.is_set():
                        return
                    key = (app.app_key, update)
                    if key in pending:
                        # Its run is still to come and reads the sources as they are then.
                        skipped += 1
                        continue
                    if key in running:
                        # The running sync walks these sources itself; what lands after its
                        # walk is checked again when it ends.
                        self.runner.recheck_later(key)
                        skipped += 1
                        continue
                    if not present[key]:
                        continue  # nothing to publish in this mode (a removal keeps targets)
                    record = state.get(app.app_key, update)
                    if record is None and (not update) not in modes:
                        # Never synced: its sync walks the sources anyway, and a first start
                        # of a thousand apps need not walk them all twice. Both parts, as
                        # against no record: an absent config is recorded as such.
                        found.append((0.0, app.app_key, update, set(BOTH_PARTS)))
                        continue
                    fp = fingerprint(dirs, app, update, snap.ignore)
                    walked += 1
                    if fp is None:
                        continue
                    parts = fp.changed_parts(record.fingerprint if record is not None else None)
                    if parts:
                        found.append((fp.newest, app.app_key, update, parts))
            # Oldest arrival first, so that where a group's apps or an app's two modes changed
            # the newest arrival wins (they share targets; other groups need no order).
            found.sort(key=lambda item: item[:3])
            for _, app_key, update, parts in found:
                # At start nothing is being uploaded that we know of: sync at once. Later, an
                # upload may be half way: settle like any event, and wait for its temporaries.
                # Only the parts that changed: a config edit never republishes a program.
                # Both in one submission: the dispatcher could hand the first out alone.
                scheduler.submit(
                    app_key,
                    update,
                    None,
                    trigger,
                    immediate=trigger == "catch-up",
                    part=next(iter(parts)) if len(parts) == 1 else None,
                )
            changed.extend(found)
        log.info(
            "service.rescanned",
            trigger=trigger,
            reasons=sorted(set(reasons)),
            changed=[{"app_key": k, "update": u, "parts": sorted(p)} for _, k, u, p in changed],
            busy=skipped,
            walked=walked,
        )
