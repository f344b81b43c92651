"""The reload transaction: re-read config and inventory, prepare what the new config needs
beside what runs (state, watcher, servers), then adopt it all at once, or roll back and keep
the running config whole when the new one is broken or cannot be served."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import structlog

from syncpro.config.load import load_config
from syncpro.config.model import Config
from syncpro.daemon.datadirs import make_data_dirs, os_error, same_dir
from syncpro.daemon.refresher import Refresher
from syncpro.daemon.reloads import Reloads
from syncpro.daemon.runtime import Runtime, Snapshot
from syncpro.daemon.servers import Servers
from syncpro.daemon.state import StateLock, StateStore
from syncpro.daemon.watch import Watcher
from syncpro.engine.sync import ignore_for
from syncpro.errors import ConfigError, SyncproError

log = structlog.get_logger()


@dataclass
class Prepared:
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


class Reloader:
    """Applies a new config to the running daemon, whole or not at all."""

    def __init__(
        self,
        config_path: str | None,
        runtime: Runtime,
        refresher: Refresher,
        servers: Servers,
        reloads: Reloads,
        new_watcher: Callable[[Config], Watcher],
        on_state_reset: Callable[[str], None],
        request_rescan: Callable[[str], None],
        status_line: Callable[[], str],
        stop_timeout: float,
    ) -> None:
        """new_watcher makes (but does not start) the watcher of a config; on_state_reset is
        given to a state store the reload opens; stop_timeout bounds each server's stop."""
        self.config_path = config_path
        self.runtime = runtime
        self.refresher = refresher
        self.servers = servers
        self.reloads = reloads
        self.new_watcher = new_watcher
        self.on_state_reset = on_state_reset
        self.request_rescan = request_rescan
        self.status_line = status_line
        self.stop_timeout = stop_timeout

    def reload_now(self) -> bool:
        """Re-read config and inventory and apply them, or keep the running config whole when
        the new one is broken or cannot be served (state, folders, servers). Everything that
        can fail is opened and started first; only then is the old one given up. Slow (a
        database read, a server waiting for its clients): the main loop runs it in a thread,
        and may stop meanwhile: then nothing new is adopted or started."""
        runtime = self.runtime
        runtime.notifier.reloading("reloading configuration")
        old = runtime.snapshot
        new: Snapshot | None = None
        problem: ConfigError | None = None
        inventory_error: str | None = None
        try:
            config = load_config(self.config_path)
        except ConfigError as exc:
            problem = exc
        else:
            inventory, inventory_error = self.refresher.load(config, old.inventory)
            new = Snapshot(config, inventory, ignore_for(config))
        with runtime.apply_lock:
            if runtime.stopping.is_set():
                log.info("service.reload_abandoned", reason="stopping")
                return False
            if new is None:
                assert problem is not None
                log.error("service.reload_failed", error=str(problem))
                self.reloads.failed(str(problem))
                first = problem.problems[0]
                runtime.ready_unless_stopping(f"reload failed, old config kept: {first}")
                return False
            try:
                prepared = self._prepare(old.config, new.config)
            except (SyncproError, OSError) as exc:
                return self._failed(old, exc)
            if runtime.stopping.is_set():
                prepared.discard()
                log.info("service.reload_abandoned", reason="stopping")
                return False
            try:
                self._restart_servers(old.config, new.config)
            except (SyncproError, OSError) as exc:
                prepared.discard()
                return self._failed(old, exc)
            except BaseException:
                prepared.discard()
                raise
            self._adopt(old, new, inventory_error, prepared)
        return True

    def _failed(self, old: Snapshot, exc: BaseException) -> bool:
        error = str(exc) if not isinstance(exc, OSError) else os_error(exc)
        log.error("service.reload_failed", error=error, config_kept=str(old.config.path))
        self.reloads.failed(error)
        self.runtime.ready_unless_stopping(f"reload failed, old config kept: {error}")
        return False

    def _prepare(self, old: Config, new: Config) -> Prepared:
        """Open the state and start the watcher `new` needs where they differ from `old`,
        beside the running ones. Raise what made that fail, with nothing left open."""
        prepared = Prepared()
        try:
            if not same_dir(new.dirs.state, old.dirs.state):
                prepared.lock = StateLock(new.dirs.state)
                prepared.state = StateStore(new.dirs.state, self.on_state_reset)
            if new.dirs != old.dirs or new.watch != old.watch:
                make_data_dirs(new.dirs)
                prepared.watcher = self.new_watcher(new)
                prepared.watcher.start()
        except BaseException:
            prepared.discard()
            raise
        return prepared

    def _restart_servers(self, old: Config, new: Config) -> None:
        if new.control != old.control or new.http != old.http:
            self.reloads.release_waiters()  # their server waits for them to be answered
        self.servers.restart(old, new, self.stop_timeout)

    def _adopt(
        self, old: Snapshot, new: Snapshot, inventory_error: str | None, prepared: Prepared
    ) -> None:
        """Make new the running config, with what was prepared for it; nothing here fails on
        what the config names."""
        runtime, config = self.runtime, new.config
        with runtime.lock:
            runtime.set_snapshot_held(new)
            runtime.generation += 1
            runtime.inventory_error = inventory_error
            self.refresher.rearm_held(config, inventory_error)
        if prepared.state is not None:
            # A running sync may still hold the old store: it is closed at shutdown. Its
            # lock is not needed any more: another daemon may use that state now.
            if runtime.state is not None:
                runtime.retired_states.append(runtime.state)
            runtime.state = prepared.state
            if runtime.state_lock is not None:
                runtime.state_lock.release()
            runtime.state_lock = prepared.lock
        if prepared.watcher is not None:
            watcher, runtime.watcher = runtime.watcher, prepared.watcher
            if watcher is not None:
                watcher.stop()
        timing = ("settle", "max_wait", "workers")
        if runtime.scheduler is not None and any(
            getattr(old.config.watch, name) != getattr(config.watch, name) for name in timing
        ):
            # In place: a new scheduler would have to wait for the running syncs first, and
            # the keys pending in the old one would be lost.
            runtime.scheduler.reconfigure(
                settle=config.watch.settle,
                max_wait=config.watch.max_wait,
                workers=config.watch.workers,
            )
        log.info("service.reloaded", config=str(config.path), apps=len(new.inventory.apps))
        self.request_rescan("reload")
        runtime.ready_unless_stopping(self.status_line())
