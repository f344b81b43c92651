"""The daemon: watch → debounce → sync by itself; signals, sd_notify and the control plane.

startup() → run() → shutdown(timeout). Signal handlers only record the signal; the main loop
acts on it. Everything a sync needs (config, inventory) is swapped as one snapshot on reload.
The main loop never blocks on anything slow (a reload's database read, a server restart that
waits for its clients): that runs in a thread while the loop keeps pinging the watchdog.

Lost events are made up for by re-checks (a rescan compares each app's sources with what the
state recorded), which never add a run for an app already pending or running, and after watcher
trouble come at most once per max_wait: a re-check must never feed the trouble it answers. A
failed (app, mode) is tried again after 5 s, doubling up to the rescan interval.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import structlog

from syncpro import __version__
from syncpro.config.settings import Config, Dirs, load_config
from syncpro.control.dispatch import HealthAnswer, ReloadAnswer, StatusAnswer
from syncpro.daemon.metrics import Metrics
from syncpro.daemon.progress import RunningSyncs
from syncpro.daemon.reloads import Reloads
from syncpro.daemon.scheduler import Batch, Scheduler
from syncpro.daemon.sdnotify import Notifier
from syncpro.daemon.state import StateLock, StateStore, fingerprint, marker_is_new, marker_signature
from syncpro.daemon.status import completed_status, health_answer, reload_answer
from syncpro.daemon.watch import DONE, WRITING, Watcher
from syncpro.engine import layout
from syncpro.engine.publish import next_expiry, sweep
from syncpro.engine.request import BOTH_PARTS, CONFIG, SyncRequest, Trigger
from syncpro.engine.response import RunDocument, response_document
from syncpro.engine.result import FAILED, SyncResult
from syncpro.engine.selection import select
from syncpro.engine.sync import ignore_for, run_sync
from syncpro.engine.tree import Ignore
from syncpro.engine.walk import plan_path
from syncpro.errors import (
    ConfigError,
    ExitCode,
    InventoryError,
    RequestError,
    StartupError,
    SyncproError,
)
from syncpro.inventory.apps import App, Inventory
from syncpro.inventory.source import load_inventory

log = structlog.get_logger()

_TICK = 1.0
RETRY_FIRST = 5.0
"""Seconds before the first retry of a failed (app, mode); each retry doubles it, up to the
rescan interval."""
_TROUBLE = frozenset(
    {
        "overflow",
        "watcher_error",
        "watcher_died",
        "inotify_failed",
        "root_missing",
        "root_unavailable",
    }
)
"""Rescan reasons that say events may have been lost: re-checked at most once per max_wait."""
_AREAS = ("softdir", "configuredir")
_DATA_DIRS = ("remotecomdir", "updatedir", "softdir", "configuredir")
RELOAD_WAIT = 120.0
"""Seconds a `reload` request waits for the reload's outcome."""
STOP_TIMEOUT = 30.0
"""Seconds shutdown waits in all, for syncs, requests and threads together (one deadline):
the systemd unit's TimeoutStopSec leaves room above it, so no sync is SIGKILLed."""
T = TypeVar("T")


@dataclass(frozen=True)
class Snapshot:
    """The config and inventory every sync of one moment uses together."""

    config: Config
    inventory: Inventory
    ignore: Ignore

    def app(self, app_key: str) -> App | None:
        app = self.inventory.by_key().get(app_key)
        return app if app is not None and app.auto_deploy else None


@dataclass
class _Retry:
    """A failed (app, mode) waiting for its next try."""

    attempts: int
    delay: float
    due: float
    """Monotonic time of the next try."""
    fingerprint: str | None
    """The sources the failed sync read: a change of them starts the backoff again."""
    error: str


@dataclass
class _Prepared:
    """What a reload opened and started for its new config before giving up the old one."""

    lock: StateLock | None = None
    state: StateStore | None = None
    watcher: Watcher | None = None

    def discard(self) -> None:
        """Undo it all: the reload is not going to use it."""
        if self.watcher is not None:
            self.watcher.stop()
        if self.state is not None:
            self.state.close()
        if self.lock is not None:
            self.lock.release()


def make_data_dirs(dirs: Dirs) -> None:
    """Make each of the data dirs that is missing, with a warning naming it: a typo in the
    config would otherwise create, and watch, an empty tree in silence. Raise OSError if one
    cannot be made."""
    for key in _DATA_DIRS:
        path: Path = getattr(dirs, key)
        if not path.is_dir():
            if os.path.lexists(path):
                # mkdir would say "File exists", which reads as if all were well.
                raise NotADirectoryError(
                    errno.ENOTDIR,
                    f"dirs.{key} is not a directory (a file is in the way)",
                    str(path),
                )
            path.mkdir(parents=True, exist_ok=True)
            log.warning("service.dir_created", key=f"dirs.{key}", path=str(path))


def open_state(directory: Path, on_reset: Callable[[str], None] | None = None) -> StateStore:
    """Given dirs.state, return its store, rebuilt if it was damaged (on_reset is told of a
    rebuild while in use). Raise OSError if the directory cannot be made."""
    return StateStore(directory, on_reset)


class Service:
    """The long-running `syncpro serve`."""

    def __init__(self, config_path: str | None, notifier: Notifier | None = None) -> None:
        self.config_path = config_path
        self.notifier = notifier or Notifier()
        self.started = time.time()
        self._snapshot_lock = threading.Lock()
        self._snapshot: Snapshot | None = None
        self._wake = threading.Event()
        self._hup = False
        self._term = False
        self._stopping = threading.Event()
        self._notify_lock = threading.Lock()
        # Held while a reload applies its config, and by shutdown: once stopping has begun,
        # no reload adopts a new config or starts servers.
        self._apply_lock = threading.Lock()
        # Counts the reloads adopted, so an inventory refresh begun before one knows that
        # what it read (or failed to read) belongs to a config no longer in use.
        self._generation = 0
        self._state_lock: StateLock | None = None
        self._interrupts = 0
        self._rescan_reasons: list[str] = []
        self._rescan_lock = threading.Lock()
        self._rescan_wanted = threading.Event()
        self._rescan_stop = threading.Event()
        self._rescan_thread: threading.Thread | None = None
        self._last_trouble_rescan = -math.inf
        self._trouble_since: float | None = None
        # Per (app, mode) being synced: the fingerprint its sync read at its start.
        self._inflight: dict[tuple[str, bool], str | None] = {}
        self._inflight_lock = threading.Lock()
        # (app, mode) a rescan passed over while its sync ran: checked again when it ends.
        self._recheck: set[tuple[str, bool]] = set()
        self._retries: dict[tuple[str, bool], _Retry] = {}
        self._retry_lock = threading.Lock()
        self._unmapped: set[str] = set()
        self._last: dict[str, dict[str, Any]] = {}
        self._last_lock = threading.Lock()
        self.inventory_error: str | None = None
        self._inventory_due = 0.0
        self._inventory_backoff = 0.0
        self._inventory_thread: threading.Thread | None = None
        self.scheduler: Scheduler | None = None
        self.watcher: Watcher | None = None
        self.state: StateStore | None = None
        self._retired_states: list[StateStore] = []
        self._ping_interval: float | None = None
        self._next_ping = 0.0
        self.control: Any = None
        self.http: Any = None
        self._previous_handlers: dict[int, Any] = {}
        self.ready = False
        self.monitor: Any = None
        self.metrics = Metrics()
        self.syncs_running = RunningSyncs(self.metrics.linked_bytes)
        self.reloads = Reloads(self.metrics.reloaded)
        self.metrics.watch_scheduler(self._queue_counts)
        self.metrics.watch_retries(lambda: len(self._retry_status()))
        self.metrics.watch_health(lambda: self.ready, lambda: bool(self.status()["healthy"]))

    # --- snapshot of config and inventory ---

    @property
    def snapshot(self) -> Snapshot:
        with self._snapshot_lock:
            return self._snapshot_held()

    def _snapshot_held(self) -> Snapshot:
        """The snapshot, for a caller that holds _snapshot_lock."""
        assert self._snapshot is not None, "startup() not called"
        return self._snapshot

    def _load_inventory(
        self, config: Config, previous: Inventory | None
    ) -> tuple[Inventory, str | None]:
        """Return the inventory of config, and why it could not be read (the previous one is
        kept then)."""
        try:
            return load_inventory(config.inventory, config.config_inventory), None
        except InventoryError as exc:
            error = str(exc)
            inventory = previous if previous is not None else Inventory(())
            log.error("inventory.unavailable", error=error, apps_kept=len(inventory.apps))
            return inventory, error

    # --- lifecycle ---

    def startup(self) -> None:
        """Load config and inventory, sweep leftovers, start syncing, watching and serving."""
        # Before READY: a SIGHUP or SIGTERM sent right after it must not find the default
        # handlers, which would kill the process.
        self._install_signals()
        config = load_config(self.config_path)
        # Before anything else: a second daemon on this state is refused before it touches
        # a file or reads the database.
        self._state_lock = StateLock(config.dirs.state)
        self.state = open_state(config.dirs.state, self._state_reset)
        inventory, self.inventory_error = self._load_inventory(config, None)
        self.metrics.inventory_read(len(inventory.apps), self.inventory_error)
        snap = Snapshot(config, inventory, ignore_for(config))
        with self._snapshot_lock:
            self._snapshot = snap
        refresh = config.inventory.refresh
        self._inventory_backoff = 1.0 if self.inventory_error else 0.0
        self._inventory_due = time.monotonic() + (1.0 if self.inventory_error else refresh)
        make_data_dirs(config.dirs)
        for root in (config.dirs.softdir, config.dirs.configuredir):
            sweep(root)
        self.scheduler = self._new_scheduler(config)
        self.scheduler.start()
        self.watcher = self._new_watcher(config)
        self.watcher.start()
        self._start_servers(config)
        # Catch up on whatever changed while we were down; READY may precede its end. The
        # thread starts after the watcher so that a watcher's trouble at start (inotify limit)
        # and the catch-up make one rescan, not two.
        self.request_rescan("catch-up")
        self._rescan_thread = threading.Thread(
            target=self._rescan_loop, name="syncpro-rescan", daemon=False
        )
        self._rescan_thread.start()
        log.info(
            "service.started",
            version=__version__,
            config=str(config.path),
            apps=len(snap.inventory.apps),
            roots=[str(r) for r in self.watcher.roots],
            backends={str(k): v for k, v in self.watcher.backends.items()},
        )
        self.notifier.ready(self._status_line())
        self.ready = True

    def _new_scheduler(self, config: Config) -> Scheduler:
        return Scheduler(
            self._run_batch,
            settle=config.watch.settle,
            max_wait=config.watch.max_wait,
            workers=config.watch.workers,
            group_of=self._group_of,
        )

    def _new_watcher(self, config: Config) -> Watcher:
        dirs = config.dirs
        return Watcher(
            [dirs.remotecomdir, dirs.updatedir],
            ignore=Ignore(config.watch.ignore),
            on_change=self._on_change,
            on_temporary=self._on_temporary,
            on_trouble=self.request_rescan,
            source_root_of=lambda path: source_root_of(dirs, path),
            poll_interval=config.watch.poll_interval,
            force_polling=os.environ.get("SYNCPRO_WATCH_POLLING") == "1",
        )

    def _start_servers(self, config: Config) -> None:
        self._start_control(config)
        self._start_http(config)
        try:
            self._start_monitor(config)
        except SyncproError as exc:  # the port is busy or not allowed
            # Watching and syncing matter more than being watched: run without it (a
            # scraper sees the target down), and a reload that changes monitor.listen retries.
            log.error("monitor.unavailable", error=str(exc))

    def _start_monitor(self, config: Config) -> None:
        if config.monitor.listen:
            from syncpro.daemon.monitor import MonitorServer

            monitor = MonitorServer(config.monitor, self)
            monitor.start()
            self.monitor = monitor

    def _stop_monitor(self, timeout: float = STOP_TIMEOUT) -> None:
        monitor, self.monitor = self.monitor, None
        if monitor is not None:
            monitor.stop(timeout)

    def _start_control(self, config: Config) -> None:
        from syncpro.control.socket_server import ControlServer

        control = ControlServer(config.control, self)
        control.start()
        self.control = control

    def _start_http(self, config: Config) -> None:
        if config.http.enabled:
            from syncpro.control.http import HttpServer

            http = HttpServer(config.http, self)
            http.start()
            self.http = http

    def _stop_control(self, timeout: float = STOP_TIMEOUT) -> None:
        control, self.control = self.control, None
        if control is not None:
            control.stop(timeout)

    def _stop_http(self, timeout: float = STOP_TIMEOUT) -> None:
        http, self.http = self.http, None
        if http is not None:
            http.stop(timeout)

    def _restart_servers(self, old: Config, new: Config) -> None:
        """Serve the control and HTTP settings of `new` where they differ from `old`. Raise
        the error of a server that cannot start (a busy port), once the servers of `old` serve
        again; when even those cannot, log it: the daemon goes on watching and syncing."""
        changed = [
            (start, stop)
            for differs, start, stop in (
                (new.control != old.control, self._start_control, self._stop_control),
                (new.http != old.http, self._start_http, self._stop_http),
                (new.monitor != old.monitor, self._start_monitor, self._stop_monitor),
            )
            if differs
        ]
        if new.control != old.control or new.http != old.http:
            self.reloads.release_waiters()  # their server waits for them to be answered
        for _, stop in changed:
            stop()
        try:
            for start, _ in changed:
                start(new)
        except (SyncproError, OSError):
            for _, stop in changed:
                stop()
            for start, _ in changed:
                try:
                    start(old)
                except (SyncproError, OSError) as exc:
                    log.error("service.server_not_restored", error=str(exc))
            raise

    # --- the watchdog: pinged by the main loop, also while it waits for slow work ---

    def _keepalive(self) -> None:
        if self._ping_interval is None:
            return
        now = time.monotonic()
        if now >= self._next_ping:
            self.notifier.watchdog()
            self._next_ping = now + self._ping_interval

    def _until_ping(self) -> float:
        if self._ping_interval is None:
            return _TICK
        return min(_TICK, max(0.0, self._next_ping - time.monotonic()))

    def _off_loop(self, work: Callable[[], T], name: str) -> T | None:
        """Run work in a thread of its own and return its result (or raise its exception),
        pinging the watchdog meanwhile. On SIGTERM, begin stopping and return None at once:
        work must see `_stopping` and give up by itself."""
        outcome: list[T] = []
        failure: list[BaseException] = []
        done = threading.Event()

        def target() -> None:
            try:
                outcome.append(work())
            except BaseException as exc:
                failure.append(exc)
            finally:
                done.set()
                self._wake.set()

        # A daemon thread: a reload blocked on a database that never answers must not keep
        # the process from exiting. It changes nothing once stopping began (_apply_lock).
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        while not done.is_set():
            if self._term:
                self._begin_stopping()
                return None
            self._wake.wait(max(0.01, self._until_ping()))
            self._wake.clear()
            self._keepalive()
        if failure:
            raise failure[0]
        return outcome[0]

    def run(self) -> int:
        """Serve until SIGTERM or SIGINT; return the exit code."""
        snap = self.snapshot
        next_rescan = time.monotonic() + snap.config.watch.rescan_interval
        self._ping_interval = self.notifier.watchdog_interval()
        self._next_ping = time.monotonic()
        next_status = 0.0
        while not self._term:
            self._wake.wait(self._until_ping())
            self._wake.clear()
            self._keepalive()
            now = time.monotonic()
            if self._term:
                break
            if self._hup:
                self._hup = False
                try:
                    self._off_loop(self.reloads.around(self.reload_now), "syncpro-reload")
                except Exception as exc:
                    # Whatever broke half way, the daemon goes on with what it has.
                    log.exception("service.reload_crashed", error=str(exc))
                    self._ready_unless_stopping(f"reload failed: {exc}")
                if self._term:
                    break
                snap = self.snapshot
                now = time.monotonic()
                next_rescan = now + snap.config.watch.rescan_interval
            if self.watcher is not None:
                try:
                    self.watcher.check()
                except Exception:
                    # Nothing on disk may stop the daemon: the next tick checks again, and
                    # the rescan it asks for catches up on what went unwatched meanwhile.
                    log.exception("watch.check_failed")
                    self.request_rescan("watcher_error")
            if now >= next_rescan:
                self.request_rescan("rescan")
                next_rescan = now + snap.config.watch.rescan_interval
            self._submit_due_retries(now)
            self._sweep_expired(snap.config)
            self._maybe_refresh_inventory(snap.config, now)
            if now >= next_status:
                self.notifier.status(self._status_line())
                next_status = now + 10
        return 0

    def _begin_stopping(self) -> None:
        """Say at once that the daemon stops; the rest of shutdown may take a while."""
        with self._notify_lock:
            if self._stopping.is_set():
                return
            self._stopping.set()
            self.ready = False
            # A reload's asker would hold the control server's stop until its deadline.
            self.reloads.release_waiters("abandoned: the daemon is stopping")
            self.notifier.stopping("stopping: finishing running syncs")
        log.info("service.stopping")

    def _ready_unless_stopping(self, status: str) -> None:
        """End a reload with READY=1, unless STOPPING=1 was sent: systemd must not read that
        the daemon serves again while it stops."""
        with self._notify_lock:
            if not self._stopping.is_set():
                self.notifier.ready(status)

    def shutdown(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop taking work, let running syncs finish, release everything: all within one
        deadline `timeout` seconds away, whatever is left then is logged and abandoned."""
        deadline = time.monotonic() + timeout
        self._begin_stopping()
        # A reload applying its config finishes that first; one that has not begun never will.
        applying = not self._apply_lock.acquire(timeout=max(0.0, deadline - time.monotonic()))
        if applying:
            log.warning("service.stop_during_reload")
        try:
            self._release(deadline)
        finally:
            if not applying:
                self._apply_lock.release()
        log.info("service.stopped")
        self.notifier.close()
        self._restore_signals()

    def abort_startup(self, reason: str) -> None:
        """Given why startup failed, log it and release what it had taken. It never ran, so
        it logs neither stopping nor stopped."""
        log.error("service.start_failed", error=reason)
        self.notifier.status(f"start failed: {reason}")
        self._release(time.monotonic() + 5.0)
        self.notifier.close()
        self._restore_signals()

    def _release(self, deadline: float) -> None:
        def left() -> float:
            return max(0.0, deadline - time.monotonic())

        self._stop_http(left())
        self._stop_monitor(left())
        self._stop_control(left())
        if self.watcher is not None:
            self.watcher.stop(left())
        self._rescan_stop.set()
        self._rescan_wanted.set()
        if self._rescan_thread is not None:
            self._rescan_thread.join(left())
        if self.scheduler is not None:
            abandoned = self.scheduler.stop(left())
            if abandoned:
                log.warning(
                    "service.abandoned",
                    batches=[{"app_keys": list(b.app_keys), "update": b.update} for b in abandoned],
                )
        if self._inventory_thread is not None:
            self._inventory_thread.join(left())
        for store in [*self._retired_states, self.state]:
            if store is not None:
                store.close()
        if self._state_lock is not None:
            self._state_lock.release()

    # --- signals: handlers only record ---

    def _install_signals(self) -> None:
        for signum, handler in (
            (signal.SIGHUP, self._on_hup),
            (signal.SIGTERM, self._on_term),
            (signal.SIGINT, self._on_int),
        ):
            self._previous_handlers[signum] = signal.signal(signum, handler)

    def _restore_signals(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers.clear()

    def _on_hup(self, signum: int, frame: FrameType | None) -> None:
        self._hup = True
        self._wake.set()

    def _on_term(self, signum: int, frame: FrameType | None) -> None:
        self._term = True
        self._wake.set()

    def _on_int(self, signum: int, frame: FrameType | None) -> None:
        self._interrupts += 1
        if self._interrupts > 1:
            os._exit(ExitCode.INTERRUPTED)  # a second Ctrl-C: the operator does not want to wait
        self._term = True
        self._wake.set()

    def request_reload(self) -> None:
        self._hup = True
        self._wake.set()

    # --- reload ---

    def reload_now(self) -> bool:
        """Re-read config and inventory and apply them, or keep the running config whole when
        the new one is broken or cannot be served (state, folders, servers). Everything that
        can fail is opened and started first; only then is the old one given up. Slow (a
        database read, a server waiting for its clients): the main loop runs it in a thread,
        and may stop meanwhile: then nothing new is adopted or started."""
        self.notifier.reloading("reloading configuration")
        old = self.snapshot
        new: Snapshot | None = None
        problem: ConfigError | None = None
        inventory_error: str | None = None
        try:
            config = load_config(self.config_path)
        except ConfigError as exc:
            problem = exc
        else:
            inventory, inventory_error = self._load_inventory(config, old.inventory)
            self.metrics.inventory_read(len(inventory.apps), inventory_error)
            new = Snapshot(config, inventory, ignore_for(config))
        with self._apply_lock:
            if self._stopping.is_set():
                log.info("service.reload_abandoned", reason="stopping")
                return False
            if new is None:
                assert problem is not None
                log.error("service.reload_failed", error=str(problem))
                self.reloads.failed(str(problem))
                first = problem.problems[0]
                self._ready_unless_stopping(f"reload failed, old config kept: {first}")
                return False
            try:
                prepared = self._prepare(old.config, new.config)
            except (SyncproError, OSError) as exc:
                return self._reload_failed(old, exc)
            if self._stopping.is_set():
                prepared.discard()
                log.info("service.reload_abandoned", reason="stopping")
                return False
            try:
                self._restart_servers(old.config, new.config)
            except (SyncproError, OSError) as exc:
                prepared.discard()
                return self._reload_failed(old, exc)
            except BaseException:
                prepared.discard()
                raise
            self._adopt(old, new, inventory_error, prepared)
        return True

    def _reload_failed(self, old: Snapshot, exc: BaseException) -> bool:
        error = str(exc) if not isinstance(exc, OSError) else _os_error(exc)
        log.error("service.reload_failed", error=error, config_kept=str(old.config.path))
        self.reloads.failed(error)
        self._ready_unless_stopping(f"reload failed, old config kept: {error}")
        return False

    def _prepare(self, old: Config, new: Config) -> _Prepared:
        """Open the state and start the watcher `new` needs where they differ from `old`,
        beside the running ones. Raise what made that fail, with nothing left open."""
        prepared = _Prepared()
        try:
            if not _same_dir(new.dirs.state, old.dirs.state):
                prepared.lock = StateLock(new.dirs.state)
                prepared.state = open_state(new.dirs.state, self._state_reset)
            if new.dirs != old.dirs or new.watch != old.watch:
                make_data_dirs(new.dirs)
                prepared.watcher = self._new_watcher(new)
                prepared.watcher.start()
        except BaseException:
            prepared.discard()
            raise
        return prepared

    def _adopt(
        self, old: Snapshot, new: Snapshot, inventory_error: str | None, prepared: _Prepared
    ) -> None:
        """Make new the running config, with what was prepared for it; nothing here fails on
        what the config names."""
        config = new.config
        with self._snapshot_lock:
            self._snapshot = new
            self._generation += 1
            self.inventory_error = inventory_error
            retry = 1.0 if inventory_error else config.inventory.refresh
            self._inventory_due = time.monotonic() + retry
        if prepared.state is not None:
            # A running sync may still hold the old store: it is closed at shutdown. Its
            # lock is not needed any more: another daemon may use that state now.
            if self.state is not None:
                self._retired_states.append(self.state)
            self.state = prepared.state
            if self._state_lock is not None:
                self._state_lock.release()
            self._state_lock = prepared.lock
        if prepared.watcher is not None:
            watcher, self.watcher = self.watcher, prepared.watcher
            if watcher is not None:
                watcher.stop()
        timing = ("settle", "max_wait", "workers")
        if self.scheduler is not None and any(
            getattr(old.config.watch, name) != getattr(config.watch, name) for name in timing
        ):
            # In place: a new scheduler would have to wait for the running syncs first, and
            # the keys pending in the old one would be lost.
            self.scheduler.reconfigure(
                settle=config.watch.settle,
                max_wait=config.watch.max_wait,
                workers=config.watch.workers,
            )
        log.info("service.reloaded", config=str(config.path), apps=len(new.inventory.apps))
        self.request_rescan("reload")
        self._ready_unless_stopping(self._status_line())

    # --- events → scheduler ---

    def _group_of(self, app_key: str) -> str | None:
        app = self.snapshot.app(app_key)
        return app.local_name if app is not None else None

    def _keys_of(self, snap: Snapshot, path: Path) -> tuple[list[str], bool, str | None]:
        """Return the app keys a source path concerns, their mode, and where the path lies
        when it concerns no known app ("remotecomdir:ghost"), None when nothing is amiss."""
        dirs = snap.config.dirs
        owner = layout.owner_of(dirs, path)
        if owner is None:
            for root, name in ((dirs.remotecomdir, "remotecomdir"), (dirs.updatedir, "updatedir")):
                with contextlib.suppress(ValueError):
                    parts = path.relative_to(root).parts
                    if parts and parts[0] not in _AREAS:
                        return [], False, f"{name}:{parts[0]}"  # a stray beside the areas
            return [], False, None  # the roots and their softdir/configuredir folders
        keys: list[str] = []
        if owner.app_key is not None:
            app = snap.app(owner.app_key)
            if app is not None and (owner.group is None or app.local_name == owner.group):
                keys.append(app.app_key)
        elif owner.group is not None:
            keys = [a.app_key for a in snap.inventory.group(owner.group) if a.auto_deploy]
        where = f"{'updatedir' if owner.update else 'remotecomdir'}:{owner.top}"
        return keys, owner.update, None if keys else where

    def _on_change(self, path: Path) -> None:
        scheduler = self.scheduler
        if scheduler is None:
            return
        keys, update, unknown = self._keys_of(self.snapshot, path)
        if unknown is not None and unknown not in self._unmapped:
            self._unmapped.add(unknown)
            log.warning("watch.unknown_app", path=str(path), where=unknown)
        owner = layout.owner_of(self.snapshot.config.dirs, path)
        part = owner.part if owner is not None else None
        for key in keys:
            scheduler.submit(key, update, str(path), "watcher", part=part)

    def _on_temporary(self, path: Path, state: str) -> None:
        scheduler = self.scheduler
        if scheduler is None:
            return
        keys, update, _ = self._keys_of(self.snapshot, path)
        for key in keys:
            if state == WRITING:
                scheduler.hold(key, update, str(path))
            elif state == DONE:
                scheduler.release(key, update, str(path))
            else:
                scheduler.touch(key, update)

    # --- rescans: catch-up at start, periodic, after watcher trouble ---

    def request_rescan(self, reason: str) -> None:
        self.metrics.rescan_requested(reason)
        with self._rescan_lock:
            self._rescan_reasons.append(reason)
            if reason in _TROUBLE and self._trouble_since is None:
                self._trouble_since = time.monotonic()
        self._rescan_wanted.set()

    def _state_reset(self, error: str) -> None:
        """The state database was set aside and rebuilt while in use: nothing is recorded
        any more, so every app counts as changed and is synced again. Not at once as at
        start: an upload may be half way, it settles like any event."""
        self.request_rescan("state_rebuilt")

    def _rescan_loop(self) -> None:
        while not self._rescan_stop.is_set():
            self._rescan_wanted.wait()
            if self._rescan_stop.is_set():
                return
            with self._rescan_lock:
                trouble_only = all(r in _TROUBLE for r in self._rescan_reasons)
                since = self._trouble_since
            if trouble_only:
                # Events lost in a storm (an overflow, a watcher rebuilding) are covered by
                # one re-check after it: at most one per max_wait, however many there were.
                # It starts `settle` after the first report at the earliest: watchdog
                # rebuilds its watches right after reporting an overflow, and what lands
                # while it does has no event; a walk that begins later sees it. Whatever
                # else asks meanwhile comes along with it.
                watch = self.snapshot.config.watch
                start = self._last_trouble_rescan + watch.max_wait
                if since is not None:
                    start = max(start, since + watch.settle)
                delay = start - time.monotonic()
                if delay > 0 and self._rescan_stop.wait(delay):
                    return
            self._rescan_wanted.clear()
            with self._rescan_lock:
                reasons, self._rescan_reasons = self._rescan_reasons, []
                self._trouble_since = None
            if not reasons:
                continue
            try:
                self._rescan("catch-up" if "catch-up" in reasons else "rescan", reasons)
            except Exception:
                log.exception("service.rescan_failed", reasons=reasons)
            if any(r in _TROUBLE for r in reasons):
                # From its end: a long walk must not be followed by another at once.
                self._last_trouble_rescan = time.monotonic()

    def _rescan(self, trigger: str, reasons: list[str]) -> None:
        snap = self.snapshot
        state, scheduler = self.state, self.scheduler
        if state is None or scheduler is None:
            return
        changed: list[tuple[float, str, bool, set[str]]] = []
        skipped = 0
        for app in snap.inventory.deployable:
            pending, running = scheduler.busy()
            for update in (False, True):
                if self._rescan_stop.is_set():
                    return
                key = (app.app_key, update)
                if key in pending:
                    # Its run is still to come and reads the sources as they are then.
                    skipped += 1
                    continue
                if key in running:
                    # The running sync walks these sources itself; what lands after its walk
                    # is checked again when it ends.
                    with self._inflight_lock:
                        self._recheck.add(key)
                    skipped += 1
                    continue
                fp = fingerprint(snap.config.dirs, app, update, snap.ignore)
                if fp is None:
                    continue
                record = state.get(app.app_key, update)
                parts = fp.changed_parts(record.fingerprint if record is not None else None)
                if parts:
                    changed.append((fp.newest, app.app_key, update, parts))
        # Oldest arrival first, so that where both modes changed the newest arrival wins.
        changed.sort(key=lambda item: item[:3])
        for _, app_key, update, parts in changed:
            # At start nothing is being uploaded that we know of: sync at once. Later, an
            # upload may be half way: settle like any event, and wait for its temporaries.
            # Only the parts that changed: a config edit never republishes a program.
            for part in sorted(parts):
                scheduler.submit(
                    app_key, update, None, trigger, immediate=trigger == "catch-up", part=part
                )
        log.info(
            "service.rescanned",
            trigger=trigger,
            reasons=sorted(set(reasons)),
            changed=[{"app_key": k, "update": u, "parts": sorted(p)} for _, k, u, p in changed],
            busy=skipped,
        )

    # --- running a batch (scheduler worker threads) ---

    def _run_batch(self, batch: Batch) -> None:
        snap = self.snapshot
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
        self._sync_and_record(snap, request, apps)

    def _sync_and_record(
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
            with self.syncs_running.track(request, tuple(a.app_key for a in apps)) as progress:
                result = run_sync(request, snap.config, snap.inventory, progress)
        finally:
            with self._inflight_lock:
                for key in keys:
                    self._inflight.pop(key, None)
        now = time.time()
        self.metrics.sync_finished(result, result.seconds)
        known = {**result.digests, **before}
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
            if fp is not None and not failures and self.state is not None:
                recorded = self.state.get(outcome.app_key, request.update)
                self.state.record(
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

    def _recheck_after(self, snap: Snapshot, keys: list[tuple[str, bool]]) -> None:
        """A rescan that passed over a running sync (after an inotify overflow, say) checks
        that (app, mode) now: what landed after the sync's walk is submitted."""
        with self._inflight_lock:
            due = [key for key in keys if key in self._recheck]
            self._recheck.difference_update(due)
        scheduler, state = self.scheduler, self.state
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
            self._retries[key] = _Retry(attempts, delay, time.monotonic() + delay, digest, error)
        log.warning(
            "sync.retry_scheduled",
            app_key=app_key,
            update=update,
            attempt=attempts,
            retry_in=delay,
            error=error,
        )

    def _submit_due_retries(self, now: float) -> None:
        scheduler = self.scheduler
        if scheduler is None:
            return
        snap = self.snapshot
        due: list[tuple[str, bool]] = []
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

    def _marker_ready(self, snap: Snapshot, app: App, update: bool) -> bool:
        """Whether the app's ready marker exists and was written after the last sync of the
        app started (that sync may not have seen what came with it)."""
        marker = snap.config.watch.ready_marker
        if not marker or self.state is None:
            return True
        current = marker_signature(snap.config.dirs, app, update, marker)
        record = self.state.get(app.app_key, update)
        if marker_is_new(current, record.marker if record is not None else None):
            return True
        log.info("sync.waiting_for_marker", app_key=app.app_key, update=update, marker=marker)
        return False

    def _remember(self, app_key: str, update: bool, ok: bool, errors: list[str], at: float) -> None:
        with self._last_lock:
            self._last[app_key] = {"update": update, "ok": ok, "errors": errors, "at": at}

    # --- housekeeping ---

    def _sweep_expired(self, config: Config) -> None:
        now = time.time()
        for root in (config.dirs.softdir, config.dirs.configuredir):
            expiry = next_expiry(root)
            if expiry is not None and expiry <= now:
                sweep(root, now)

    # --- the database inventory: re-read periodically, kept when the database is away ---

    def _maybe_refresh_inventory(self, config: Config, now: float) -> None:
        if config.inventory.source == "config" or now < self._inventory_due:
            return
        if self._inventory_thread is not None and self._inventory_thread.is_alive():
            return
        self._inventory_due = math.inf  # until this refresh says when the next one is
        self._inventory_thread = threading.Thread(
            target=self._refresh_inventory, name="syncpro-inventory", daemon=False
        )
        self._inventory_thread.start()

    def _refresh_inventory(self) -> None:
        with self._snapshot_lock:
            snap = self._snapshot_held()
            generation = self._generation
        refresh = snap.config.inventory.refresh
        try:
            inventory = load_inventory(snap.config.inventory, snap.config.config_inventory)
        except InventoryError as exc:
            self.metrics.inventory_read(None, str(exc))
            with self._snapshot_lock:
                if self._generation != generation:
                    # A reload read its own inventory meanwhile: this error is not about it.
                    log.info("inventory.refresh_discarded", reason="reloaded", error=str(exc))
                    return
                first = self.inventory_error is None
                self.inventory_error = str(exc)
                # Back off from 1 s, doubling, up to the refresh period: a database restart
                # is noticed quickly, a long outage is not hammered.
                self._inventory_backoff = min(max(1.0, self._inventory_backoff * 2), refresh)
                self._inventory_due = time.monotonic() + self._inventory_backoff
            log.log(
                logging.ERROR if first else logging.WARNING,
                "inventory.unavailable",
                error=str(exc),
                apps_kept=len(snap.inventory.apps),
                retry_in=self._inventory_backoff,
            )
            self.notifier.status(self._status_line())
            return
        with self._snapshot_lock:
            if self._generation != generation:
                log.info("inventory.refresh_discarded", reason="reloaded")
                return
            recovered = self.inventory_error is not None
            self.inventory_error = None
            self._inventory_backoff = 0.0
            self._inventory_due = time.monotonic() + refresh
            self._snapshot = Snapshot(snap.config, inventory, snap.ignore)
        self.metrics.inventory_read(len(inventory.apps), None)
        if recovered or inventory.apps != snap.inventory.apps:
            log.info("inventory.refreshed", apps=len(inventory.apps), recovered=recovered)
            self.request_rescan("inventory")
            self.notifier.status(self._status_line())

    def _status_line(self) -> str:
        snap = self.snapshot
        parts = [f"watching {len(snap.inventory.apps)} apps"]
        if self.inventory_error:
            parts.append(f"inventory unavailable: {self.inventory_error}")
        if self.scheduler is not None:
            s = self.scheduler.snapshot()
            parts.append(f"{len(s['running'])} syncing, {len(s['pending'])} pending")
        with self._retry_lock:
            retrying = len(self._retries)
        if retrying:
            parts.append(f"{retrying} failed, retrying")
        return "; ".join(parts)

    # --- the control plane's handler ---

    def _check_known(self, snap: Snapshot, request: SyncRequest) -> None:
        """Raise RequestError when `k` names an app not in the inventory while the inventory
        cannot be read: "unknown key" would be a guess, the reason is the inventory."""
        error = self.inventory_error
        if error is None:
            return
        unknown = select(request.tokens, snap.inventory).unknown
        if unknown:
            raise RequestError(
                f"inventory unavailable, cannot look up {' '.join(unknown)}: {error}"
            )

    def sync(self, request: SyncRequest) -> RunDocument:
        snap = self.snapshot
        self._check_known(snap, request)
        apps = select(request.tokens, snap.inventory).apps
        return response_document(self._sync_and_record(snap, request, apps))

    def diff(self, request: SyncRequest) -> RunDocument:
        from syncpro.engine.diff import diff

        snap = self.snapshot
        self._check_known(snap, request)
        return diff(request, snap.config, snap.inventory)

    def status(self) -> StatusAnswer:
        snap = self.snapshot
        with self._last_lock:
            last = {key: dict(value) for key, value in self._last.items()}
        sched = self.scheduler.snapshot() if self.scheduler is not None else None
        doc = {
            "code": "0",
            "msg": "ok",
            "version": __version__,
            "pid": os.getpid(),
            "uptime": round(time.time() - self.started, 3),
            "config": str(snap.config.path),
            "watched": {
                str(root): backend
                for root, backend in (self.watcher.backends.items() if self.watcher else [])
            },
            "inventory": {
                "source": snap.config.inventory.source,
                "apps": len(snap.inventory.apps),
                "error": self.inventory_error,
            },
            "apps": {app.app_key: last.get(app.app_key) for app in snap.inventory.apps},
            "pending": sched["pending"] if sched else [],
            "running": sched["running"] if sched else [],
            "retrying": self._retry_status(),
            "state": {
                "path": str(self.state.path) if self.state is not None else None,
                "rebuilt": self.state.resets if self.state is not None else 0,
                "in_memory": self.state.in_memory if self.state is not None else False,
            },
        }
        return completed_status(
            doc, ready=self.ready, running=self.syncs_running, reloads=self.reloads
        )

    def health(self) -> HealthAnswer:
        return health_answer(self.status())

    def _queue_counts(self) -> tuple[int, int]:
        sched = self.scheduler.snapshot() if self.scheduler is not None else None
        return (len(sched["pending"]), len(sched["running"])) if sched else (0, 0)

    def _retry_status(self) -> list[dict[str, Any]]:
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

    def reload(self) -> ReloadAnswer:
        ticket = self.reloads.ask()
        self.request_reload()
        return reload_answer(self.reloads.wait(ticket, RELOAD_WAIT), RELOAD_WAIT)


def _same_dir(a: Path, b: Path) -> bool:
    """Whether two paths name one directory: a second lock of our own state would be
    refused as another daemon's."""
    try:
        return a == b or os.path.samefile(a, b)
    except OSError:
        return False


def _os_error(exc: OSError) -> str:
    """Given an OSError, return its reason and the path it concerns, without the errno."""
    where = f" ({exc.filename})" if exc.filename else ""
    return f"{exc.strerror or exc}{where}"


def source_root_of(dirs: Dirs, path: Path) -> Path | None:
    """Given a path under remotecomdir or updatedir, return the source root of the app (or
    group program) it lies in, which path globs of watch.ignore are relative to; None for a
    path outside every source."""
    for root, update in ((dirs.remotecomdir, False), (dirs.updatedir, True)):
        try:
            parts = path.relative_to(root).parts
        except ValueError:
            continue
        # <updatedir>/configuredir/L/A is one app's config; every other source is one level.
        depth = 3 if update and parts[:1] == ("configuredir",) else 2
        if len(parts) < depth or parts[0] not in _AREAS:
            return None
        return root.joinpath(*parts[:depth])
    return None


def serve(config_path: str | None) -> int:
    """Run the daemon in the foreground until stopped; return its exit code."""
    service = Service(config_path)
    try:
        service.startup()
    except SyncproError as exc:
        service.abort_startup(str(exc))
        raise
    except OSError as exc:
        error = StartupError(f"cannot start: {_os_error(exc)}")
        service.abort_startup(str(error))
        raise error from exc
    try:
        code = service.run()
    finally:
        service.shutdown(float(os.environ.get("SYNCPRO_STOP_TIMEOUT", STOP_TIMEOUT)))
    stuck = [t.name for t in threading.enumerate() if t.is_alive() and not t.daemon]
    stuck = [name for name in stuck if name != threading.current_thread().name]
    if stuck:
        # A sync that outlived the stop timeout would keep the process alive for ever; its
        # target is safe (old or new tree), so leave it and exit as systemd asked.
        log.error("service.exit_with_running_threads", threads=stuck)
        os._exit(code)
    return code
