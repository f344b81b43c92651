"""The daemon's lifecycle shell: startup → main loop → shutdown, signals, sd_notify, and the
wiring of its pieces around one shared runtime (runtime.py).

Signal handlers only record the signal; the main loop acts on it. The main loop never blocks
on anything slow (a reload's database read, a server restart that waits for its clients):
that runs in a thread while the loop keeps pinging the watchdog. The pieces, each in a module
of its own: routing (watched path → app keys), runner (syncs, retries), rescanner (re-checks
for lost events), refresher (the database inventory), reloader (the reload transaction),
servers (the listeners) and handler (the control plane's answers).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any, TypeVar

import structlog

from syncpro import __version__
from syncpro.config import environment
from syncpro.config.load import load_config
from syncpro.config.model import Config
from syncpro.daemon.datadirs import make_data_dirs, os_error
from syncpro.daemon.handler import Handler
from syncpro.daemon.metrics import Metrics
from syncpro.daemon.progress import RunningSyncs
from syncpro.daemon.refresher import Refresher
from syncpro.daemon.reloader import Reloader
from syncpro.daemon.reloads import Reloads
from syncpro.daemon.rescanner import Rescanner
from syncpro.daemon.routing import Router, source_root_in
from syncpro.daemon.runner import Runner
from syncpro.daemon.runtime import Piece, Runtime, Snapshot, time_left
from syncpro.daemon.sdnotify import Notifier
from syncpro.daemon.servers import Servers
from syncpro.daemon.state import StateLock, StateStore
from syncpro.daemon.wakeup import Wakeup
from syncpro.daemon.watch import Watcher
from syncpro.engine.publish import next_expiry, sweep
from syncpro.engine.sweeper import sweep_quietly
from syncpro.engine.sync import ignore_for
from syncpro.engine.tree import Ignore
from syncpro.errors import ExitCode, StartupError, SyncproError

log = structlog.get_logger()

_TICK = 1.0
STOP_TIMEOUT = 30.0
"""Seconds shutdown waits in all, for syncs, requests and threads together (one deadline):
the systemd unit's TimeoutStopSec leaves room above it, so no sync is SIGKILLed."""
T = TypeVar("T")

__all__ = ["STOP_TIMEOUT", "Service", "serve"]


class Service:
    """The long-running `syncpro serve`: its pieces, started in order and stopped by one
    deadline."""

    def __init__(self, config_path: str | None, notifier: Notifier | None = None) -> None:
        self.config_path = config_path
        self.notifier = notifier or Notifier()
        self.runtime = Runtime(self.notifier)
        self._wake = Wakeup()  # set by signal handlers: see wakeup.py
        self._hup = False
        self._term = False
        self._interrupts = 0
        self._ping_interval: float | None = None
        self._next_ping = 0.0
        self._previous_handlers: dict[int, Any] = {}
        self._sweeping: threading.Thread | None = None
        self.metrics = Metrics()
        self.syncs_running = RunningSyncs(self.metrics.linked_bytes)
        self.reloads = Reloads(self.metrics.reloaded)
        self.router = Router(self.runtime)
        self.runner = Runner(self.runtime, self.metrics, self.syncs_running)
        self.rescanner = Rescanner(self.runtime, self.runner, self.metrics)
        self.handler = Handler(
            self.runtime,
            self.runner,
            self.metrics,
            self.syncs_running,
            self.reloads,
            self.request_reload,
        )
        self.refresher = Refresher(
            self.runtime,
            self.metrics,
            on_refreshed=lambda: self.rescanner.request("inventory"),
            on_status=lambda: self.notifier.status(self.handler.status_line()),
        )
        self.servers = Servers(self.handler)
        self.reloader = Reloader(
            config_path,
            self.runtime,
            self.refresher,
            self.servers,
            self.reloads,
            new_watcher=self._new_watcher,
            on_state_reset=self._state_reset,
            request_rescan=self.rescanner.request,
            status_line=self.handler.status_line,
            stop_timeout=STOP_TIMEOUT,
        )
        self.metrics.watch_scheduler(self.handler.queue_counts)
        self.metrics.watch_retries(self.runner.retrying)
        self.metrics.watch_health(
            lambda: self.runtime.ready, lambda: bool(self.handler.status()["healthy"])
        )

    # --- lifecycle ---

    def startup(self) -> None:
        """Load config and inventory, sweep leftovers, start syncing, watching and serving."""
        runtime = self.runtime
        # Before READY: a SIGHUP or SIGTERM sent right after it must not find the default
        # handlers, which would kill the process.
        self._install_signals()
        config = load_config(self.config_path)
        # Before anything else: a second daemon on this state is refused before it touches
        # a file or reads the database.
        runtime.state_lock = StateLock(config.dirs.state)
        runtime.state = StateStore(config.dirs.state, self._state_reset)
        inventory, error = self.refresher.load(config, None)
        snap = Snapshot(config, inventory, ignore_for(config))
        with runtime.lock:
            runtime.set_snapshot_held(snap)
            runtime.inventory_error = error
        self.refresher.begin(error)
        make_data_dirs(config.dirs)
        for root in (config.dirs.softdir, config.dirs.configuredir):
            sweep(root)
        self.runner.start()
        runtime.watcher = watcher = self._new_watcher(config)
        watcher.start()
        self.servers.start(config)
        # Catch up on whatever changed while we were down; READY may precede its end. The
        # thread starts after the watcher so that a watcher's trouble at start (inotify limit)
        # and the catch-up make one rescan, not two.
        self.rescanner.request("catch-up")
        self.rescanner.start()
        self.refresher.start()
        log.info(
            "service.started",
            version=__version__,
            config=str(config.path),
            apps=len(snap.inventory.apps),
            roots=[str(r) for r in watcher.roots],
            backends={str(k): v for k, v in watcher.backends.items()},
        )
        self.notifier.ready(self.handler.status_line())
        runtime.ready = True

    def _new_watcher(self, config: Config) -> Watcher:
        dirs = config.dirs
        return Watcher(
            [dirs.remotecomdir, dirs.updatedir],
            ignore=Ignore(config.watch.ignore),
            on_change=self.router.on_change,
            on_temporary=self.router.on_temporary,
            on_trouble=self.rescanner.request,
            source_root_of=lambda path: source_root_in(dirs, path),
            poll_interval=config.watch.poll_interval,
            force_polling=os.environ.get(environment.WATCH_POLLING.name) == "1",
        )

    def _state_reset(self, error: str) -> None:
        """The state database was set aside and rebuilt while in use: nothing is recorded
        any more, so every app counts as changed and is synced again. Not at once as at
        start: an upload may be half way, it settles like any event."""
        self.rescanner.request("state_rebuilt")

    def request_reload(self) -> None:
        self._hup = True
        self._wake.set()

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
        work must see `runtime.stopping` and give up by itself."""
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
        # the process from exiting. It changes nothing once stopping began
        # (runtime.apply_lock).
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
        snap = self.runtime.snapshot
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
                    self._off_loop(self.reloads.around(self.reloader.reload_now), "syncpro-reload")
                except Exception as exc:
                    # Whatever broke half way, the daemon goes on with what it has.
                    log.exception("service.reload_crashed", error=str(exc))
                    self.runtime.ready_unless_stopping(f"reload failed: {exc}")
                if self._term:
                    break
                snap = self.runtime.snapshot
                now = time.monotonic()
                next_rescan = now + snap.config.watch.rescan_interval
            watcher = self.runtime.watcher
            if watcher is not None:
                watcher.check()
            if now >= next_rescan:
                self.rescanner.request("rescan")
                next_rescan = now + snap.config.watch.rescan_interval
            self.runner.submit_due_retries(now)
            self._sweep_expired(snap.config)
            if now >= next_status:
                self.notifier.status(self.handler.status_line())
                next_status = now + 10
        return 0

    def _sweep_expired(self, config: Config) -> None:
        """Retire the replaced trees of both publish roots whose grace period is over, on a
        thread of its own at idle I/O priority: off the main loop (whose watchdog pings must
        not wait for a big tree) and out of the way of syncs. A sweep abandoned at exit is
        safe: it claims each tree by rename first, and the next start finishes the work."""
        if self._sweeping is not None and self._sweeping.is_alive():
            return
        now = time.time()
        roots = [config.dirs.softdir, config.dirs.configuredir]
        expiries = {root: next_expiry(root) for root in roots}
        due = [root for root, at in expiries.items() if at is not None and at <= now]
        if due:
            self._sweeping = threading.Thread(
                target=sweep_quietly, args=(due, now), name="syncpro-sweep", daemon=True
            )
            self._sweeping.start()

    def _begin_stopping(self) -> None:
        """Say at once that the daemon stops; the rest of shutdown may take a while."""
        runtime = self.runtime
        with runtime.notify_lock:
            if runtime.stopping.is_set():
                return
            runtime.stopping.set()
            runtime.ready = False
            # A reload's asker would hold the control server's stop until its deadline.
            self.reloads.release_waiters("abandoned: the daemon is stopping")
            self.notifier.stopping("stopping: finishing running syncs")
        log.info("service.stopping")

    def shutdown(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop taking work, let running syncs finish, release everything: all within one
        deadline `timeout` seconds away, whatever is left then is logged and abandoned."""
        deadline = time.monotonic() + timeout
        self._begin_stopping()
        # A reload applying its config finishes that first; one that has not begun never will.
        applying = not self.runtime.apply_lock.acquire(timeout=time_left(deadline))
        if applying:
            log.warning("service.stop_during_reload")
        try:
            self._release(deadline)
        finally:
            if not applying:
                self.runtime.apply_lock.release()
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
        """Stop the listeners, the watcher and the pieces in order (rescans, syncs, inventory
        refreshes) and close the state, all by one monotonic deadline."""
        runtime = self.runtime
        self.servers.stop(deadline)
        if runtime.watcher is not None:
            runtime.watcher.stop(time_left(deadline))
        pieces: tuple[Piece, ...] = (self.rescanner, self.runner, self.refresher)
        for piece in pieces:  # rescans first: they would only queue work for the runner
            piece.stop(deadline)
        runtime.builds.close()
        for store in [*runtime.retired_states, runtime.state]:
            if store is not None:
                store.close()
        if runtime.state_lock is not None:
            runtime.state_lock.release()

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


def serve(config_path: str | None) -> int:
    """Run the daemon in the foreground until stopped; return its exit code."""
    service = Service(config_path)
    try:
        service.startup()
    except SyncproError as exc:
        service.abort_startup(str(exc))
        raise
    except OSError as exc:
        error = StartupError(f"cannot start: {os_error(exc)}")
        service.abort_startup(str(error))
        raise error from exc
    try:
        code = service.run()
    finally:
        service.shutdown(float(os.environ.get(environment.STOP_TIMEOUT.name, STOP_TIMEOUT)))
    stuck = [t.name for t in threading.enumerate() if t.is_alive() and not t.daemon]
    stuck = [name for name in stuck if name != threading.current_thread().name]
    if stuck:
        # A sync that outlived the stop timeout would keep the process alive for ever; its
        # target is safe (old or new tree), so leave it and exit as systemd asked.
        log.error("service.exit_with_running_threads", threads=stuck)
        os._exit(code)
    return code
