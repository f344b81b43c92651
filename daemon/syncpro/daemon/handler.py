"""The daemon's answers to the control plane (control's ControlHandler: sync, diff, status,
health, reload) and to the monitor, and its one-line status for systemd."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from syncpro import __version__
from syncpro.control.dispatch import HealthAnswer, ReloadAnswer, StatusAnswer
from syncpro.daemon.metrics import Metrics
from syncpro.daemon.progress import RunningSyncs
from syncpro.daemon.reloads import Reloads
from syncpro.daemon.runner import Runner
from syncpro.daemon.runtime import Runtime, Snapshot
from syncpro.daemon.status import completed_status, health_answer, reload_answer
from syncpro.engine.request import SyncRequest
from syncpro.engine.response import RunDocument, response_document
from syncpro.engine.selection import select
from syncpro.errors import RequestError

RELOAD_WAIT = 120.0
"""Seconds a `reload` request waits for the reload's outcome."""


class Handler:
    """Answers requests from the state of the running daemon; never changes it but through
    a sync or a reload request."""

    def __init__(
        self,
        runtime: Runtime,
        runner: Runner,
        metrics: Metrics,
        running: RunningSyncs,
        reloads: Reloads,
        request_reload: Callable[[], None],
    ) -> None:
        self.runtime = runtime
        self.runner = runner
        self.metrics = metrics
        self.running = running
        self.reloads = reloads
        self.request_reload = request_reload
        self.started = time.time()

    @property
    def ready(self) -> bool:
        """Whether the daemon serves: READY=1 sent, stopping not begun."""
        return self.runtime.ready

    @ready.setter
    def ready(self, value: bool) -> None:
        self.runtime.ready = value

    def _check_known(self, snap: Snapshot, request: SyncRequest) -> None:
        """Raise RequestError when `k` names an app not in the inventory while the inventory
        cannot be read: "unknown key" would be a guess, the reason is the inventory."""
        error = self.runtime.inventory_error
        if error is None:
            return
        unknown = select(request.tokens, snap.inventory).unknown
        if unknown:
            raise RequestError(
                f"inventory unavailable, cannot look up {' '.join(unknown)}: {error}"
            )

    def sync(self, request: SyncRequest) -> RunDocument:
        snap = self.runtime.snapshot
        self._check_known(snap, request)
        apps = select(request.tokens, snap.inventory).apps
        return response_document(self.runner.sync_and_record(snap, request, apps))

    def diff(self, request: SyncRequest) -> RunDocument:
        from syncpro.engine.diff import diff

        snap = self.runtime.snapshot
        self._check_known(snap, request)
        return diff(request, snap.config, snap.inventory)

    def status(self) -> StatusAnswer:
        snap = self.runtime.snapshot
        last = self.runner.last()
        scheduler, watcher, state = (
            self.runtime.scheduler,
            self.runtime.watcher,
            self.runtime.state,
        )
        sched = scheduler.snapshot() if scheduler is not None else None
        doc = {
            "code": "0",
            "msg": "ok",
            "version": __version__,
            "pid": os.getpid(),
            "uptime": round(time.time() - self.started, 3),
            "config": str(snap.config.path),
            "watched": {
                str(root): backend
                for root, backend in (watcher.backends.items() if watcher else [])
            },
            "inventory": {
                "source": snap.config.inventory.source,
                "apps": len(snap.inventory.apps),
                "error": self.runtime.inventory_error,
            },
            "apps": {app.app_key: last.get(app.app_key) for app in snap.inventory.apps},
            "pending": sched["pending"] if sched else [],
            "running": sched["running"] if sched else [],
            "retrying": self.runner.retry_status(),
            "state": {
                "path": str(state.path) if state is not None else None,
                "rebuilt": state.resets if state is not None else 0,
                "in_memory": state.in_memory if state is not None else False,
            },
        }
        return completed_status(doc, ready=self.ready, running=self.running, reloads=self.reloads)

    def health(self) -> HealthAnswer:
        return health_answer(self.status())

    def reload(self) -> ReloadAnswer:
        ticket = self.reloads.ask()
        self.request_reload()
        return reload_answer(self.reloads.wait(ticket, RELOAD_WAIT), RELOAD_WAIT)

    def queue_counts(self) -> tuple[int, int]:
        """How many (app, mode) are pending and running."""
        scheduler = self.runtime.scheduler
        sched = scheduler.snapshot() if scheduler is not None else None
        return (len(sched["pending"]), len(sched["running"])) if sched else (0, 0)

    def status_line(self) -> str:
        """The daemon's state in one line, for systemd's STATUS=."""
        snap = self.runtime.snapshot
        parts = [f"watching {len(snap.inventory.apps)} apps"]
        if self.runtime.inventory_error:
            parts.append(f"inventory unavailable: {self.runtime.inventory_error}")
        scheduler = self.runtime.scheduler
        if scheduler is not None:
            s = scheduler.snapshot()
            parts.append(f"{len(s['running'])} syncing, {len(s['pending'])} pending")
        retrying = self.runner.retrying()
        if retrying:
            parts.append(f"{retrying} failed, retrying")
        return "; ".join(parts)
