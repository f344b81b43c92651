"""Rescans: the re-check that makes up for lost events (catch-up at start, periodic, after a
reload, an inventory change or watcher trouble). It compares each app's sources with what the
state recorded, never adds a run for an app already pending or running, and after watcher
trouble comes at most once per max_wait: a re-check must never feed the trouble it answers.

A periodic rescan is a safety net for what inotify cannot see (a write through a hard link
outside the watched tree, a write through a memory map), and it stats every name of every
source: some 5 us a name, so 30 s of a core for 300 apps of 20,000 files. It takes its time:
it rests twice as long as each walk took (leaving the interpreter to syncs and the watcher),
any other request ends the rests, and the next periodic one comes `rescan_interval` after the
last rescan of any kind ended, not while one still runs."""

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

PERIODIC_REST = 2.0
"""How long a periodic rescan rests after each walk, in multiples of that walk's time."""


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
        self._urgent = threading.Event()
        """Set by any request but the periodic one, and by stop: it ends a paced walk's rests."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_trouble_rescan = -math.inf
        self._trouble_since: float | None = None
        self._last_end = -math.inf

    def request(self, reason: str) -> None:
        """Ask for a rescan, saying why; from any thread."""
        self.metrics.rescan_requested(reason)
        with self._lock:
            self._reasons.append(reason)
            if reason in TROUBLE and self._trouble_since is None:
                self._trouble_since = time.monotonic()
        if reason != "rescan":
            self._urgent.set()
        self._wanted.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="syncpro-rescan", daemon=False)
        self._thread.start()

    def stop(self, deadline: float) -> None:
        self._stop.set()
        self._urgent.set()
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
            self._urgent.clear()
            with self._lock:
                reasons, self._reasons = self._reasons, []
                self._trouble_since = None
            if not reasons:
                continue
            periodic = all(r == "rescan" for r in reasons)
            interval = self.runtime.snapshot.config.watch.rescan_interval
            if periodic and time.monotonic() - self._last_end < interval:
                continue  # a rescan ended less than an interval ago: asked again later
            try:
                self.rescan(
                    "catch-up" if "catch-up" in reasons else "rescan", reasons, paced=periodic
                )
            except Exception:
                log.exception("service.rescan_failed", reasons=reasons)
            self._last_end = time.monotonic()
            if any(r in TROUBLE for r in reasons):
                # From its end: a long walk must not be followed by another at once.
                self._last_trouble_rescan = self._last_end

    def rescan(self, trigger: str, reasons: list[str], *, paced: bool = False) -> None:
        """Given what triggers it and why, submit every (app, mode) whose sources differ from
        the record, a group as soon as its apps are checked (a first start's syncs begin
        while the walk goes on), its oldest change first. `paced` rests after each walk
        (a periodic rescan), until another request comes."""
        snap = self.runtime.snapshot
        state, scheduler = self.runtime.state, self.runtime.scheduler
        if state is None or scheduler is None:
            return
        started = time.monotonic()
        changed: list[tuple[float, str, bool, set[str]]] = []
        skipped = walked = names = 0
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
                    walk_began = time.monotonic()
                    fp = fingerprint(dirs, app, update, snap.ignore)
                    walked += 1
                    if paced:
                        # Another request (trouble, a reload) ends the rest: it must not
                        # wait behind a safety net's slow walk.
                        self._urgent.wait(PERIODIC_REST * (time.monotonic() - walk_began))
                    if fp is None:
                        continue
                    names += fp.walked
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
            names=names,
            seconds=round(time.monotonic() - started, 3),
        )
