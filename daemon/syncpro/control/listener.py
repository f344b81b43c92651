"""An HTTP server bound on host:port (IPv4 or IPv6) and served by a thread of its own.

The legacy HTTP endpoint and the monitor listener both bind, serve and stop the same way;
this is that shared part. What they answer is their own."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Generic, TypeVar

S = TypeVar("S", bound=ThreadingHTTPServer)


class Listener(Generic[S]):
    """Holds one bound server and its serving thread; start with `_serve`, stop with
    `_stop_serving`, and ask `address` for where it listens."""

    def __init__(self, host_port: tuple[str, int], thread_name: str) -> None:
        self._host_port = host_port
        self._thread_name = thread_name
        self._server: S | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        """The bound host and port (the real port when the settings asked for port 0)."""
        if self._server is None:
            return self._host_port
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def _serve(self, v4: type[S], v6: type[S], handler: type[BaseHTTPRequestHandler]) -> S:
        """Bind host:port with v6 for an IPv6 host, else v4, let `prepare` attach what the
        handlers need, and serve it in a new thread. Return the server. Raise OSError if the
        address cannot be bound."""
        host, port = self._host_port
        server = (v6 if ":" in host else v4)((host, port), handler)
        self.prepare(server)
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name=self._thread_name,
            daemon=False,
        )
        self._thread.start()
        return server

    def prepare(self, server: S) -> None:
        """Attach what the handlers need to a server just bound, before it serves."""

    def _stop_serving(self, deadline: float) -> S | None:
        """Stop accepting, wait (until the monotonic `deadline`) for the serving thread and
        close the socket. Return the server that was stopped, None if none was serving."""
        server, self._server = self._server, None
        thread, self._thread = self._thread, None
        if server is None or thread is None:
            return None
        server.shutdown()
        thread.join(max(0.0, deadline - time.monotonic()))
        server.server_close()
        return server
