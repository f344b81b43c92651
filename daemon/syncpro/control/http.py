"""The original platform's HTTP endpoint: `POST /rex?token=...` with the seed's form body.

The request's fields come from one place: the body when it has any (urlencoded, multipart/
form-data or a JSON object), as the original's clients send them; else the query string
(`POST /rex?token=...&action=...&k=...`). When both carry fields the body is the request and
the query string only gives the token. The token is read from both before anything else is
checked, and never leaves this module: answers and log events have it replaced.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
import io
import re
import socket
import socketserver
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import structlog

from syncpro import __version__
from syncpro.config.model import HttpSettings
from syncpro.control.dispatch import Answer, Code, ControlHandler, dispatch, encode, succeeded
from syncpro.control.forms import FormError, body_pairs
from syncpro.control.listener import Listener
from syncpro.control.protocol import (
    QUIET_ACTIONS,
    ProtocolError,
    request_of,
    request_pairs,
    unquote,
)
from syncpro.engine.response import REDACTED, refusal_document
from syncpro.errors import ControlError
from syncpro.lifecycle import Lifecycle

log = structlog.get_logger()

_TOKEN_IN_TEXT = re.compile(r"(token(?:=|%3[dD]))[^&\s'\"]*")
_LINGER_SECONDS = 2.0
_LINGER_BYTES = 16 << 20
_REX_METHODS = "POST, OPTIONS"


class HttpServer(Listener["_Server"], Lifecycle):
    """Serves POST /rex and GET /healthz in its own thread, one thread per request."""

    def __init__(
        self,
        settings: HttpSettings,
        handler: ControlHandler,
        *,
        timeout: float = 10.0,
        max_clients: int = 64,
        slot_wait: float = 1.0,
    ) -> None:
        super().__init__(settings.host_port, "syncpro-http")
        self.settings = settings
        self.handler = handler
        self.timeout = timeout
        self.max_clients = max_clients
        self.slot_wait = slot_wait

    def start(self) -> None:
        """Bind the listen address and start serving. Raise ControlError if it cannot be bound."""
        try:
            self._serve(_Server, _Server6, _Handler)
        except OSError as exc:
            raise ControlError(
                f"cannot serve HTTP on {self.settings.listen}: {exc.strerror or exc}"
            ) from None
        host, port = self.address
        log.info("http.listening", host=host, port=port)

    def prepare(self, server: _Server) -> None:
        server.syncpro = self
        server.slots = threading.BoundedSemaphore(self.max_clients)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop accepting, wait for running requests to be answered, and close the socket."""
        deadline = time.monotonic() + timeout
        server = self._stop_serving(deadline)
        if server is None:
            return
        for thread in server.request_threads():
            thread.join(max(0.0, deadline - time.monotonic()))
        abandoned = [t.name for t in server.request_threads() if t.is_alive()]
        if abandoned:
            log.warning("http.stop_abandoned", requests=abandoned)
        log.info("http.stopped", listen=self.settings.listen)

    def token_ok(self, given: str | None) -> bool:
        """Given the token a client sent, return whether it is the configured one, compared
        in constant time. Without a configured token nothing is allowed."""
        expected = self.settings.token
        if not expected or given is None:
            return False
        return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))

    def check_tokens(self, tokens: list[str | None]) -> str | None:
        """Given every token a request carried (query string and body; None for one that is
        not text), return why it is refused, or None when it may run: one token, or the
        same one repeated, that is the configured one."""
        if not tokens:
            return "token missing"
        if len(set(tokens)) > 1:
            return "token given more than once, with different values"
        return None if self.token_ok(tokens[0]) else "token invalid"

    def redact(self, text: str) -> str:
        """Return text with every token value replaced, for logs."""
        text = _TOKEN_IN_TEXT.sub(rf"\g<1>{REDACTED}", text)
        if self.settings.token:
            text = text.replace(self.settings.token, REDACTED)
        return text

    def carries_token(self, *values: str | None) -> bool:
        """Given a request's field values, return whether any holds the configured token."""
        token = self.settings.token
        if not token:
            return False
        return any(token in value for value in values if value is not None)

    def scrub(self, value: Any) -> Any:
        """Given a document or a log value, return it with the configured token replaced
        wherever it appears: a client may have put it in any field (k=TOKEN), and no answer
        or log line ever carries it."""
        token = self.settings.token
        if not token:
            return value
        if isinstance(value, str):
            return value.replace(token, REDACTED) if token in value else value
        if isinstance(value, dict):
            return {self.scrub(k): self.scrub(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.scrub(v) for v in value]
        return value


class _Server(ThreadingHTTPServer):
    daemon_threads = False
    block_on_close = False  # stop() joins the request threads itself, within its timeout
    # socketserver's 5 resets a burst of clients: connections wait in the kernel's queue
    # while the accepting thread catches up (the kernel caps it at net.core.somaxconn).
    request_queue_size = 1024
    syncpro: HttpServer
    slots: threading.BoundedSemaphore

    def __init__(self, address: tuple[str, int], handler: type[_Handler]) -> None:
        super().__init__(address, handler)
        self._threads_lock = threading.Lock()
        self._request_threads: set[threading.Thread] = set()
        self._count = 0
        self._saturated = False

    def request_threads(self) -> list[threading.Thread]:
        with self._threads_lock:
            return list(self._request_threads)

    def process_request(self, request: Any, client_address: Any) -> None:
        # One thread a connection, but not without end: idle clients would each hold one for
        # the read timeout. At the cap a client waits a moment for a slot, as a burst's
        # requests end in moments; when none came, it and every client after it is told to
        # come back at once, until a slot is free again.
        if self._saturated:
            got = self.slots.acquire(blocking=False)
        else:
            got = self.slots.acquire(timeout=self.syncpro.slot_wait)
        self._saturated = not got
        if not got:
            self._refuse_busy(request)
            return
        with self._threads_lock:
            self._count += 1
            thread = threading.Thread(
                target=self.process_request_thread,
                args=(request, client_address),
                name=f"syncpro-http-request-{self._count}",
                daemon=False,
            )
            self._request_threads.add(thread)
        try:
            thread.start()
        except BaseException:
            with self._threads_lock:
                self._request_threads.discard(thread)
            self.slots.release()
            self.shutdown_request(request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._threads_lock:
                self._request_threads.discard(threading.current_thread())
            self.slots.release()

    def _refuse_busy(self, request: socket.socket) -> None:
        limit = self.syncpro.max_clients
        reason = f"busy: {limit} HTTP connections already open; retry later"
        body = encode(refusal_document({}, reason, Code.BUSY))
        head = (
            f"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json; charset=utf-8"
            f"\r\nContent-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
        )
        with contextlib.suppress(OSError):
            request.settimeout(0.5)  # a few hundred bytes: the socket buffer takes them
            request.sendall(head.encode("ascii") + body)
        self.shutdown_request(request)
        log.warning("http.busy", clients=limit)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN, which can stall on a broken resolver.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that leaves mid-answer is not the server's failure: one log line, no traceback.
        log.warning("http.connection_error", client=str(client_address[0]), exc_info=True)


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = f"syncpro/{__version__}"
    sys_version = ""
    protocol_version = "HTTP/1.0"

    def version_string(self) -> str:
        return self.server_version

    def setup(self) -> None:
        self._started = time.monotonic()
        super().setup()
        # A client that stalls mid-request holds its thread at most this long in all: a
        # per-recv timeout would let one that dribbles a byte now and then hold it for ever.
        deadline = self._started + self.server.syncpro.timeout
        self.rfile = io.BufferedReader(_DeadlineReader(self.connection, deadline), 65536)

    @property
    def _app(self) -> HttpServer:
        return self.server.syncpro

    # --- routes ---

    def do_HEAD(self) -> None:
        self.do_GET()  # the same status and headers; _answer sends no body for HEAD

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path == "/healthz":
            self._answer(200, {"status": "ok"})
        elif path == "/rex":
            self._refuse(405, "use POST /rex?token=... with a form body", extra={"Allow": "POST"})
        else:
            self._refuse(
                404, f"no such endpoint: {self._app.redact(path)} (POST /rex, GET /healthz)"
            )

    def do_OPTIONS(self) -> None:
        path = urlsplit(self.path).path
        if path != "/rex":
            self._refuse(404, f"no such endpoint: {self._app.redact(path)} (OPTIONS /rex)")
            return
        # A preflight: say what a POST may carry, run nothing. Without http.cors_origin no
        # Access-Control-Allow-Origin is sent, and a browser keeps other origins out.
        headers = {"Allow": _REX_METHODS}
        if self._app.settings.cors_origin is not None:
            headers["Access-Control-Allow-Methods"] = _REX_METHODS
            headers["Access-Control-Allow-Headers"] = "Content-Type"
            headers["Access-Control-Max-Age"] = "600"
        self._answer(204, {}, extra=headers)

    def do_POST(self) -> None:
        url = urlsplit(self.path)
        if url.path != "/rex":
            where = self._app.redact(url.path)  # '/rex%3Ftoken=...': an encoded '?' hides one
            self._refuse(404, f"no such endpoint: {where} (POST /rex, GET /healthz)")
            return
        body = self._read_body()
        if body is None:
            return
        # The token first, from the query string and from the body in any form: whatever else
        # is wrong with a request, it is never refused as unauthorised when a good one came.
        tokens: list[str | None] = list(
            parse_qs(url.query, keep_blank_values=True).get("token", [])
        )
        try:
            pairs = body_pairs(self.headers.get("Content-Type"), body)
            if not pairs:
                # http.server decoded the request line as latin-1: these are the bytes as sent.
                pairs = request_pairs(url.query.encode("latin-1", "replace"))
                pairs = [(name, value) for name, value in pairs if name != "token"]
            error: ProtocolError | None = None
        except ProtocolError as exc:
            pairs, error = [], exc
        tokens += [unquote(v) if isinstance(v, str) else None for n, v in pairs if n == "token"]
        param = {"token": REDACTED} if tokens else {}
        if error is not None and not tokens:
            # The token may be in the part that could not be read: say what is wrong instead.
            reason = f"{error.reason}; no token could be read from the request"
            self._answer(400, refusal_document({}, reason, Code.BAD_REQUEST))
            return
        refusal = self._app.check_tokens(tokens)
        if refusal is not None:
            self._answer(403, refusal_document(param, refusal, Code.FORBIDDEN), param=param)
            return
        if isinstance(error, FormError):
            self._answer(400, error.document(Code.BAD_REQUEST), param=param)
            return
        try:
            req = request_of(pairs) if error is None else None
        except ProtocolError as exc:
            req, error = None, exc
        if error is not None or req is None:
            failure = error if error is not None else ProtocolError("invalid request")
            failure.param = {**failure.param, **param}
            # As the original: the request was heard, the document's code says it failed.
            self._answer(200, failure.document(), param=failure.param)
            return
        if self._app.carries_token(req.action, req.k, req.w):
            # What runs is logged by the engine too, beyond this layer's redaction: the token
            # never gets that far.
            reason = "the token was sent in a field other than token; nothing ran"
            self._answer(400, refusal_document(param, reason, Code.BAD_REQUEST), param=param)
            return
        req = dataclasses.replace(req, token=tokens[0])
        doc = dispatch(self._app.handler, req, "http")
        status = 500 if str(doc.get("code")) == Code.INTERNAL else 200
        self._answer(status, doc, param=req.echo(), pretty=req.pretty, action=req.action)

    def _read_body(self) -> bytes | None:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            self._refuse(411, "send the body with a Content-Length, not chunked")
            return None
        raw_length = self.headers.get("Content-Length")
        if raw_length is None:
            return b""  # neither a length nor chunks: the request has no body (RFC 9112 6.3)
        # ASCII digits only (str.isdigit() takes '²'), and not so many that int() refuses them.
        if not re.fullmatch(r"[0-9]{1,18}", raw_length.strip()):
            self._refuse(400, "Content-Length must be a number of bytes")
            return None
        length = int(raw_length)
        limit = self._app.settings.max_body
        if length > limit:
            self._refuse(413, f"request body over {limit} bytes ({length})")
            self._linger(length)
            return None
        try:
            body = self.rfile.read(length)
        except TimeoutError:
            self._refuse(408, f"request body not received within {self._app.timeout:g} s")
            return None
        if len(body) < length:
            self._refuse(400, f"request body ended after {len(body)} of {length} bytes")
            return None
        return body

    def _linger(self, length: int) -> None:
        # Closing with the unread body pending would reset the connection and could destroy the
        # answer before the client reads it: say we are done, then read what it still sends.
        with contextlib.suppress(OSError):
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + _LINGER_SECONDS
            left = min(length, _LINGER_BYTES)
            while left > 0 and (remaining := deadline - time.monotonic()) > 0:
                self.connection.settimeout(remaining)
                chunk = self.connection.recv(min(left, 65536))
                if not chunk:
                    break
                left -= len(chunk)

    # --- answers ---

    def _refuse(self, status: int, reason: str, extra: dict[str, str] | None = None) -> None:
        self._answer(status, refusal_document({}, reason, str(status)), extra=extra)

    def _answer(
        self,
        status: int,
        doc: Answer | dict[str, str],
        *,
        param: dict[str, str] | None = None,
        pretty: bool = False,
        action: str | None = None,
        extra: dict[str, str] | None = None,
    ) -> None:
        doc = self._app.scrub(doc)
        body = encode(doc, pretty=pretty)
        if status == 204:
            body = b""  # a preflight's answer: headers only
        headers = dict(extra or {})
        origin = self._app.settings.cors_origin
        if origin is not None and urlsplit(getattr(self, "path", "")).path == "/rex":
            headers["Access-Control-Allow-Origin"] = origin
            if origin != "*":
                headers["Vary"] = "Origin"
        delivered = True
        # The answer gets the whole timeout of its own, whatever reading the request took.
        self.connection.settimeout(self._app.timeout)
        try:
            self.send_response(status)
            if status != 204:
                self.send_header("Content-Type", "application/json; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("Connection", "close")
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            if getattr(self, "command", None) != "HEAD":
                self.wfile.write(body)
        except OSError:
            delivered = False
        self.close_connection = True
        param = self._app.scrub(param or {})
        path = self._app.redact(urlsplit(getattr(self, "path", "")).path)
        # Monitors poll status and /healthz every few seconds: no news, at debug.
        polled = action in QUIET_ACTIONS or (path == "/healthz" and status == 200)
        emit = log.debug if polled else log.info
        emit(
            "http.request",
            method=getattr(self, "command", None) or "",
            path=path,
            status=status,
            client=self.client_address[0],
            action=self._app.scrub(action) or param.get("action"),
            k=param.get("k"),
            update=param.get("update"),
            # succeeded(): the document's code (and, for a sync, its result), never the status
            # alone: an invalid request is answered 200 with a non-zero code.
            ok=status == 200 and succeeded(doc, action),
            code=doc.get("code"),
            delivered=delivered,
            seconds=round(time.monotonic() - self._started, 6),
        )

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # Malformed request lines, unsupported methods, URIs too long: a JSON document too.
        reason = self._app.redact(message or self.responses.get(code, ("error",))[0])
        self._answer(int(code), refusal_document({}, reason, str(int(code))))

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass  # each request is logged once, by _answer, without its query string

    def log_message(self, format: str, *args: Any) -> None:
        log.warning(
            "http.message",
            message=self._app.redact(format % args),
            client=self.client_address[0],
        )


class _DeadlineReader(io.RawIOBase):
    """A socket's bytes, each read bounded by what is left of one deadline for the request."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock = sock
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the request took longer than its deadline")
        self._sock.settimeout(remaining)
        return self._sock.recv_into(buffer)
