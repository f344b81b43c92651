"""The daemon's listeners: the control socket, the HTTP endpoint and the monitor, started
from a config, restarted where a reload changes them, and stopped by a deadline."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from syncpro.config.model import Config
from syncpro.daemon.runtime import time_left
from syncpro.errors import SyncproError

if TYPE_CHECKING:
    # The listeners' modules are loaded when a listener starts: a daemon without HTTP or a
    # monitor never imports them.
    from syncpro.control.dispatch import ControlHandler
    from syncpro.daemon.monitor import Monitored

    class Served(ControlHandler, Monitored, Protocol):
        """What the listeners serve: the control plane's requests and the monitor's reads."""


log = structlog.get_logger()


class Servers:
    """The listeners of the running config, all serving one handler."""

    def __init__(self, handler: Served) -> None:
        self.handler = handler
        self.control: Any = None
        self.http: Any = None
        self.monitor: Any = None

    def start(self, config: Config) -> None:
        """Start the listeners of config. Raise the error of the control socket or the HTTP
        endpoint when it cannot start; a monitor that cannot is logged and left off."""
        self._start_control(config)
        self._start_http(config)
        try:
            self._start_monitor(config)
        except SyncproError as exc:  # the port is busy or not allowed
            # Watching and syncing matter more than being watched: run without it (a
            # scraper sees the target down), and a reload that changes monitor.listen retries.
            log.error("monitor.unavailable", error=str(exc))

    def stop(self, deadline: float) -> None:
        """Stop every listener, all by one monotonic deadline."""
        self._stop_http(time_left(deadline))
        self._stop_monitor(time_left(deadline))
        self._stop_control(time_left(deadline))

    def restart(self, old: Config, new: Config, timeout: float) -> None:
        """Serve the control, HTTP and monitor settings of `new` where they differ from
        `old`. Raise the error of a server that cannot start (a busy port), once the servers
        of `old` serve again; when even those cannot, log it: the daemon goes on watching and
        syncing."""
        Step = tuple[Callable[[Config], None], Callable[[float], None]]
        changed: list[Step] = [
            (start, stop)
            for differs, start, stop in (
                (new.control != old.control, self._start_control, self._stop_control),
                (new.http != old.http, self._start_http, self._stop_http),
                (new.monitor != old.monitor, self._start_monitor, self._stop_monitor),
            )
            if differs
        ]
        for _, stop in changed:
            stop(timeout)
        try:
            for start, _ in changed:
                start(new)
        except (SyncproError, OSError):
            for _, stop in changed:
                stop(timeout)
            for start, _ in changed:
                try:
                    start(old)
                except (SyncproError, OSError) as exc:
                    log.error("service.server_not_restored", error=str(exc))
            raise

    def _start_control(self, config: Config) -> None:
        from syncpro.control.socket_server import ControlServer

        control = ControlServer(config.control, self.handler)
        control.start()
        self.control = control

    def _start_http(self, config: Config) -> None:
        if config.http.enabled:
            from syncpro.control.http import HttpServer

            http = HttpServer(config.http, self.handler)
            http.start()
            self.http = http

    def _start_monitor(self, config: Config) -> None:
        if config.monitor.listen:
            from syncpro.daemon.monitor import MonitorServer

            monitor = MonitorServer(config.monitor, self.handler)
            monitor.start()
            self.monitor = monitor

    def _stop_control(self, timeout: float) -> None:
        control, self.control = self.control, None
        if control is not None:
            control.stop(timeout)

    def _stop_http(self, timeout: float) -> None:
        http, self.http = self.http, None
        if http is not None:
            http.stop(timeout)

    def _stop_monitor(self, timeout: float) -> None:
        monitor, self.monitor = self.monitor, None
        if monitor is not None:
            monitor.stop(timeout)
