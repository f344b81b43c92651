"""The monitor listener: GET /metrics (Prometheus), /healthz and /readyz, apart from /rex."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

import structlog

from syncpro.config.model import MonitorSettings
from syncpro.control.listener import Listener
from syncpro.daemon.metrics import CONTENT_TYPE, Metrics
from syncpro.errors import ControlError

log = structlog.get_logger()

ENDPOINTS = ("/metrics", "/healthz", "/readyz")


class Monitored(Protocol):
    """What the monitor asks of the daemon."""

    ready: bool
    metrics: Metrics

    def status(self) -> Mapping[str, Any]: ...


def problems(status: Mapping[str, Any]) -> list[str]:
    """Given a status document, return why the daemon is unhealthy: an inventory it could
    not read, apps whose last sync failed (each with its errors). Empty when healthy."""
    found: list[str] = []
    inventory = status.get("inventory") or {}
    if inventory.get("error"):
        found.append(f"inventory unavailable: {inventory['error']}")
    for app_key, last in sorted((status.get("apps") or {}).items()):
        if isinstance(last, dict) and last.get("ok") is False:
            errors = "; ".join(last.get("errors") or ()) or "failed"
            found.append(f"last sync of {app_key} failed: {errors}")
    return found


def health(daemon: Monitored) -> tuple[bool, dict[str, Any]]:
    """Given the daemon, return whether it is healthy and the document saying why (not):
    ready, its inventory read, no app's last sync failed."""
    if not daemon.ready:
        return False, {"status": "unhealthy", "ready": False, "problems": ["not ready"]}
    status = daemon.status()
    found = list(status.get("problems") or problems(status))
    doc = {"status": "unhealthy" if found else "ok", "ready": True, "problems": found}
    return not found, doc


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    monitored: Monitored


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    server_version = "syncpro-monitor"
    timeout = 10.0

    def do_GET(self) -> None:
        path = self.path.partition("?")[0]
        daemon = self.server.monitored
        if path == "/metrics":
            self._send(200, daemon.metrics.exposition(), CONTENT_TYPE)
        elif path == "/healthz":
            ok, doc = health(daemon)
            self._json(200 if ok else 503, doc)
        elif path == "/readyz":
            ready = daemon.ready
            self._json(200 if ready else 503, {"status": "ready" if ready else "not ready"})
        else:
            self._json(404, {"error": f"no such endpoint (known: {', '.join(ENDPOINTS)})"})

    def _json(self, status: int, doc: dict[str, Any]) -> None:
        body = json.dumps(doc, ensure_ascii=False).encode("utf-8") + b"\n"
        self._send(status, body, "application/json")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        # Scrapes come every few seconds: at debug, never in the journal by default.
        log.debug("monitor.request", request=self.requestline, client=self.client_address[0])


class MonitorServer(Listener[_Server]):
    """Serves the monitor endpoints in a thread of its own; start() and stop()."""

    def __init__(self, settings: MonitorSettings, daemon: Monitored) -> None:
        super().__init__(settings.host_port, "syncpro-monitor")
        self.settings = settings
        self.daemon = daemon

    def start(self) -> None:
        """Bind monitor.listen and serve. Raise ControlError if it cannot be bound."""
        try:
            self._serve(_Server, _Server6, _Handler)
        except OSError as exc:
            raise ControlError(
                f"monitor.listen: cannot serve {self.settings.listen}: {exc.strerror or exc}"
            ) from None
        host, port = self.address
        log.info("monitor.listening", host=host, port=port)

    def prepare(self, server: _Server) -> None:
        server.monitored = self.daemon

    def stop(self, timeout: float = 30.0) -> None:
        """Stop serving and close the socket; requests under way are cut (they are reads)."""
        if self._stop_serving(time.monotonic() + timeout) is None:
            return
        log.info("monitor.stopped", listen=self.settings.listen)
