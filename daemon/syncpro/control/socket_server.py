"""The daemon's control socket: peers checked by SO_PEERCRED, one request line in, one out."""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import selectors
import socket
import stat
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import structlog

from syncpro.config.settings import ControlSettings
from syncpro.control.protocol import (
    DIFF_ACTION,
    HEALTH_ACTION,
    MAX_REQUEST,
    NEEDS_K,
    QUIET_ACTIONS,
    STATUS_ACTION,
    ControlRequest,
    ProtocolError,
    parse_request,
    to_sync_request,
)
from syncpro.engine.request import SYNC_ACTION, SyncRequest
from syncpro.engine.response import refusal_document, text_safe
from syncpro.errors import ControlError, RequestError

log = structlog.get_logger()

REFUSED_CODE = "403"
BUSY_CODE = "503"
FAILED_CODE = "500"
_UCRED = struct.Struct("iII")  # struct ucred: pid_t pid; uid_t uid; gid_t gid
_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13
# NGROUPS_MAX: with fewer, a peer in more groups fails SO_PEERGROUPS and its groups are looked
# up in the user database, which (LDAP, sssd) may block the accepting thread.
_MAX_GROUPS = 65536
_LINE_LIMIT = MAX_REQUEST + 2  # the line, an optional \r, and its \n
_ACCEPT_BATCH = 64
# A refused client may still be sending its request; reading it for this long lets it get to
# the answer rather than a reset.
_LINGER_SECONDS = 2.0


class ControlHandler(Protocol):
    """What the control socket and the HTTP endpoint drive: the daemon, or a test double."""

    def sync(self, request: SyncRequest) -> dict[str, Any]: ...

    def diff(self, request: SyncRequest) -> dict[str, Any]: ...

    def status(self) -> dict[str, Any]: ...

    def reload(self) -> dict[str, Any]: ...

    def health(self) -> dict[str, Any]: ...


def dispatch(handler: ControlHandler, req: ControlRequest, origin: str) -> dict[str, Any]:
    """Given a parsed request, run it on the handler and return its response document, with
    the fields it ignored and, for `sprint`, its stdout. A handler that raises yields a
    refusal document naming the error class; it never escapes."""
    doc = _run(handler, req, origin)
    doc = {**doc, "ignored": list(req.ignored)}
    if req.sprint:
        doc = with_stdout(doc)
    return doc


def with_stdout(doc: dict[str, Any]) -> dict[str, Any]:
    """Given a response document, return it as the original answered `sprint`: print_stdout
    "1" and respon.stdout saying, a line per app, what each target became, then the msg."""
    lines: list[str] = []
    for app in doc.get("apps") or ():
        if not isinstance(app, dict):
            continue
        parts = []
        for kind in ("program", "config"):
            target = app.get(kind)
            if isinstance(target, dict):
                parts.append(f"{kind} {target.get('status')}")
        lines.append(f"{app.get('app_key')}: {', '.join(parts) or 'nothing'}")
    for skipped in doc.get("skipped") or ():
        if isinstance(skipped, dict):
            lines.append(f"{skipped.get('app_key')}: skipped, {skipped.get('reason')}")
    data = doc.get("data")
    if isinstance(data, dict) and isinstance(data.get("msg"), str):
        lines.append(data["msg"])
    respon = doc.get("respon")
    respon = dict(respon) if isinstance(respon, dict) else {}
    respon["stdout"] = "\n".join(lines)
    return {**doc, "print_stdout": "1", "respon": respon}


def _run(handler: ControlHandler, req: ControlRequest, origin: str) -> dict[str, Any]:
    try:
        if req.action == SYNC_ACTION:
            doc = handler.sync(to_sync_request(req, origin))
        elif req.action == DIFF_ACTION:
            doc = handler.diff(to_sync_request(req, origin))
        elif req.action == STATUS_ACTION:
            doc = handler.status()
        elif req.action == HEALTH_ACTION:
            doc = handler.health()
        else:
            doc = handler.reload()
    except RequestError as exc:
        return refusal_document(req.echo(), str(exc))
    except Exception as exc:
        log.exception("control.handler_failed", action=req.action, error=type(exc).__name__)
        reason = f"internal error while running {req.action}: {type(exc).__name__}: {exc}"
        return refusal_document(req.echo(), reason, FAILED_CODE)
    if not isinstance(doc, dict):
        reason = f"internal error: {req.action} answered {type(doc).__name__}, not a document"
        log.error("control.handler_failed", action=req.action, error=reason)
        return refusal_document(req.echo(), reason, FAILED_CODE)
    if "param" not in doc:
        doc = {**doc, "param": req.echo()}
    return doc


def succeeded(doc: dict[str, Any], action: str | None) -> bool:
    """Given a response document and its action, return whether the request ran and (for a
    sync or diff) every selected app succeeded."""
    if str(doc.get("code")) != "0":
        return False
    if action not in NEEDS_K:
        return True
    data = doc.get("data")
    inner = data.get("data") if isinstance(data, dict) else None
    return isinstance(inner, dict) and inner.get("0") == "1"


def encode(doc: dict[str, Any]) -> bytes:
    """Return a response document as one line of UTF-8 JSON (values JSON cannot hold as
    their str); a document that cannot be encoded at all becomes a refusal saying so."""
    try:
        # text_safe: a lone surrogate (a file name's odd byte) would fail the UTF-8 encoding
        # after the request ran, and its client would get no answer at all.
        text = json.dumps(text_safe(doc), ensure_ascii=False, default=str)
    except (TypeError, ValueError) as exc:
        log.error("control.unencodable_document", error=str(exc))
        reason = f"internal error: the answer could not be encoded: {exc}"
        text = json.dumps(refusal_document({}, reason, FAILED_CODE), ensure_ascii=False)
    return text.encode("utf-8") + b"\n"


@dataclass(frozen=True)
class Peer:
    """The process at the other end of a unix socket, as the kernel saw it at connect()."""

    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...] | None = None  # supplementary groups, when the kernel says


def peer_of(conn: socket.socket) -> Peer:
    """Given a connected unix socket, return its peer's credentials (SO_PEERCRED)."""
    pid, uid, gid = _UCRED.unpack(
        conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    )
    groups: tuple[int, ...] | None
    try:
        raw = conn.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, 4 * _MAX_GROUPS)
        groups = struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4])
    except OSError:
        groups = None  # an old kernel, or more groups than we asked for: ask the user database
    return Peer(pid, uid, gid, groups)


@dataclass(eq=False)
class _Waiting:
    """A connection whose request line is still arriving, or whose refusal is going out.

    Only the accepting thread touches it: an idle client costs a descriptor, never a thread.
    """

    conn: socket.socket
    peer: Peer
    started: float
    deadline: float
    buffer: bytearray = field(default_factory=bytearray)
    out: bytes = b""  # a refusal not yet fully written
    answered: bool = False  # refused: what still arrives is read and thrown away
    event: dict[str, Any] | None = None  # the control.request event, logged once written


class ControlServer:
    """Serves the control socket: one thread accepts and reads request lines, and a whole
    line goes to a thread of its own (at most `max_clients` at once).

    Use as a context manager, or call start() and stop(). Peers are checked against
    ControlSettings.allow_uids / allow_gids (root and this process's user always allowed)
    as they are accepted; others are answered a refusal at once and nothing runs. A client
    that connects and sends nothing holds a descriptor until `read_timeout`; past
    `max_waiting` such connections the oldest is dropped.
    """

    def __init__(
        self,
        settings: ControlSettings,
        handler: ControlHandler,
        *,
        read_timeout: float = 10.0,
        write_timeout: float = 60.0,
        max_clients: int = 64,
        max_waiting: int = 128,
        backlog: int = 1024,
    ) -> None:
        self.settings = settings
        # Connections wait in the kernel's queue while the accepting thread catches up: a
        # burst of clients must find room there (the kernel caps it at net.core.somaxconn).
        self.backlog = backlog
        self.handler = handler
        self.read_timeout = read_timeout
        self.write_timeout = write_timeout
        self.max_clients = max_clients
        self.max_waiting = max_waiting
        self._listener: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._inode: int | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._clients: set[threading.Thread] = set()
        # Oldest first: dict order is accept order, which is what the cap drops by.
        self._waiting: dict[int, _Waiting] = {}
        self._stopping = threading.Event()
        self._count = 0

    @property
    def path(self) -> Path:
        return self.settings.socket

    @property
    def waiting(self) -> int:
        """How many connections are still sending their request or being refused."""
        return len(self._waiting)

    # --- lifecycle ---

    def start(self) -> None:
        """Bind the socket with its mode and group and start serving. Raise ControlError if
        the group is unknown, another server answers on the path, or the path cannot be bound."""
        gid = self._group_id()
        path = self.path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ControlError(
                f"cannot create {path.parent} for the control socket: {exc}"
            ) from None
        self._clear_stale(path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        bound = False
        try:
            listener.bind(str(path))
            bound = True
            # Permissions before listen(): nobody can connect to a socket that is not listening.
            os.chmod(path, self.settings.mode)
            if gid is not None:
                os.chown(path, -1, gid)
            listener.listen(self.backlog)
            listener.setblocking(False)
            self._inode = os.stat(path).st_ino
        except OSError as exc:
            listener.close()
            if bound:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            raise ControlError(f"cannot serve the control socket {path}: {exc}") from None
        self._listener = listener
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._stopping.clear()
        self._thread = threading.Thread(target=self._serve, name="syncpro-control", daemon=False)
        self._thread.start()
        log.info(
            "control.listening",
            socket=str(path),
            mode=f"{self.settings.mode:04o}",
            group=self.settings.group,
        )

    def stop(self, timeout: float = 30.0) -> None:
        """Stop accepting, drop clients still sending their request, wait up to `timeout` s
        for running requests to be answered, and remove the socket."""
        if self._thread is None:
            return
        deadline = time.monotonic() + timeout
        self._stopping.set()
        if self._wake_w is not None:
            with contextlib.suppress(OSError):
                self._wake_w.send(b"x")
        self._thread.join(max(0.0, deadline - time.monotonic()))
        self._close_listener()
        with self._lock:
            clients = list(self._clients)
        for thread in clients:
            thread.join(max(0.0, deadline - time.monotonic()))
        abandoned = [t.name for t in clients if t.is_alive()]
        if abandoned:
            log.warning("control.stop_abandoned", clients=abandoned)
        for sock in (self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        self._wake_r = self._wake_w = None
        self._thread = None
        log.info("control.stopped", socket=str(self.path))

    def __enter__(self) -> ControlServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _group_id(self) -> int | None:
        group = self.settings.group
        if group is None:
            return None
        if group.isdigit():
            return int(group)
        try:
            return grp.getgrnam(group).gr_gid
        except KeyError:
            raise ControlError(
                f"control.group: no group named {group!r} for the control socket {self.path}"
            ) from None

    def _clear_stale(self, path: Path) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlError(
                f"{path} exists and is not a socket: remove it or choose another control.socket"
            )
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(2.0)
        try:
            probe.connect(str(path))
        except ConnectionRefusedError:
            os.unlink(path)  # nobody listens: left over by a daemon that died
            log.info("control.stale_socket_removed", socket=str(path))
            return
        except OSError as exc:
            raise ControlError(f"cannot probe the existing control socket {path}: {exc}") from None
        finally:
            probe.close()
        raise ControlError(
            f"another server is listening on the control socket {path}: is syncpro serve"
            " already running? Stop it or choose another control.socket"
        )

    def _close_listener(self) -> None:
        listener, self._listener = self._listener, None
        if listener is None:
            return
        listener.close()
        # Only our own socket file: a successor may already have bound the path again.
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)

    # --- the accepting thread: accept, check the peer, read whole request lines ---

    def _serve(self) -> None:
        assert self._listener is not None and self._wake_r is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self._listener, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            try:
                while not self._stopping.is_set():
                    for key, events in selector.select(self._select_timeout()):
                        if key.fileobj is self._wake_r:
                            return
                        if key.fileobj is self._listener:
                            self._accept(selector)
                        elif (waiting := self._waiting.get(key.fd)) is key.data:
                            # (else dropped earlier in this round; its number may be reused)
                            assert waiting is not None
                            self._guarded(selector, waiting, events)
                    self._expire(selector)
            finally:
                for waiting in list(self._waiting.values()):
                    self._drop(selector, waiting, "the server is stopping")

    def _guarded(self, selector: selectors.BaseSelector, waiting: _Waiting, events: int) -> None:
        # One connection's surprise (no thread to be had, say) must not end the accepting
        # thread: every other client, and every later one, would wait on a dead socket.
        try:
            self._service(selector, waiting, events)
        except Exception as exc:
            log.exception("control.connection_failed", socket=str(self.path), error=repr(exc))
            self._drop(selector, waiting, f"internal error: {type(exc).__name__}")

    def _select_timeout(self) -> float | None:
        if not self._waiting:
            return None
        soonest = min(w.deadline for w in self._waiting.values())
        return max(0.0, soonest - time.monotonic())

    def _accept(self, selector: selectors.BaseSelector) -> None:
        assert self._listener is not None
        # A batch per wake-up: a flood of connections cannot starve those already waiting.
        for _ in range(_ACCEPT_BATCH):
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # Out of file descriptors, most likely: back off instead of spinning on select().
                log.error("control.accept_failed", socket=str(self.path), error=str(exc))
                self._stopping.wait(0.5)
                return
            conn.setblocking(False)
            try:
                peer = peer_of(conn)
            except OSError as exc:
                conn.close()
                log.info("control.dropped", socket=str(self.path), reason=str(exc))
                continue
            if len(self._waiting) >= self.max_waiting:
                self._drop_oldest(selector)
            now = time.monotonic()
            waiting = _Waiting(conn, peer, started=now, deadline=now + self.read_timeout)
            self._waiting[conn.fileno()] = waiting
            selector.register(conn, selectors.EVENT_READ, waiting)
            if not self.allowed(peer):
                reason = (
                    f"uid {peer.uid} (pid {peer.pid}) is not allowed on the control socket"
                    f" {self.path}: add it to control.allow_uids or its group to"
                    " control.allow_gids"
                )
                self._refuse(selector, waiting, reason, REFUSED_CODE)

    def _drop_oldest(self, selector: selectors.BaseSelector) -> None:
        # Refused peers go first: they were answered already; then the longest-idle client.
        victim = next(
            (w for w in self._waiting.values() if w.answered),
            next(iter(self._waiting.values())),
        )
        reason = f"over {self.max_waiting} connections waiting; dropped the oldest"
        self._drop(selector, victim, reason)

    def _service(self, selector: selectors.BaseSelector, waiting: _Waiting, events: int) -> None:
        if events & selectors.EVENT_WRITE and not self._flush(selector, waiting):
            return
        if not events & selectors.EVENT_READ:
            return
        try:
            chunk = waiting.conn.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._drop(selector, waiting, str(exc))
            return
        if waiting.answered:
            if not chunk:
                self._close(selector, waiting)
            return
        if not chunk:
            if waiting.buffer:
                # A request is only whole with its newline: a client that stopped mid-line may
                # have meant something else entirely (update=1 cut off), so nothing runs.
                reason = (
                    f"request line lacks its newline: the connection ended after"
                    f" {len(waiting.buffer)} bytes; end the request with \\n"
                )
                self._refuse(selector, waiting, reason)
            else:
                self._drop(selector, waiting, "closed without a request")
            return
        waiting.buffer += chunk
        end = waiting.buffer.find(b"\n")
        if end < 0 and len(waiting.buffer) <= _LINE_LIMIT:
            return
        if end < 0 or end + 1 > _LINE_LIMIT:
            self._refuse(selector, waiting, f"request over {MAX_REQUEST // 1024} KiB")
            return
        self._hand_over(selector, waiting, bytes(waiting.buffer[: end + 1]))

    def _hand_over(self, selector: selectors.BaseSelector, waiting: _Waiting, line: bytes) -> None:
        with self._lock:
            self._clients = {t for t in self._clients if t.is_alive()}
            busy = len(self._clients) >= self.max_clients
            if not busy:
                self._forget(selector, waiting)
                self._count += 1
                thread = threading.Thread(
                    target=self._client,
                    args=(waiting.conn, waiting.peer, line, waiting.started),
                    name=f"syncpro-control-{self._count}",
                    daemon=False,
                )
                self._clients.add(thread)
                try:
                    thread.start()
                except BaseException:
                    self._clients.discard(thread)  # stop() must never join an unstarted thread
                    raise
        if busy:
            log.warning("control.busy", clients=self.max_clients)
            reason = f"busy: {self.max_clients} requests already in progress; retry later"
            self._refuse(selector, waiting, reason, BUSY_CODE)

    def _refuse(
        self,
        selector: selectors.BaseSelector,
        waiting: _Waiting,
        reason: str,
        code: str = "1",
    ) -> None:
        """Answer a refusal from this thread without ever blocking on the client, then read
        what it still sends until it leaves: closing with its request unread could reset the
        connection before the client has read why."""
        waiting.answered = True
        waiting.out = encode(refusal_document({}, reason, code))
        waiting.deadline = min(waiting.deadline, time.monotonic() + _LINGER_SECONDS)
        waiting.event = {
            "action": None,
            "k": None,
            "update": None,
            "uid": waiting.peer.uid,
            "pid": waiting.peer.pid,
            "ok": False,
            "code": code,
            "error": reason,
        }
        self._flush(selector, waiting)

    def _flush(self, selector: selectors.BaseSelector, waiting: _Waiting) -> bool:
        """Write what is left of a refusal; return whether the connection is still open."""
        try:
            sent = waiting.conn.send(waiting.out)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._close(selector, waiting)
            return False
        waiting.out = waiting.out[sent:]
        if waiting.out:
            selector.modify(waiting.conn, selectors.EVENT_READ | selectors.EVENT_WRITE, waiting)
            return True
        selector.modify(waiting.conn, selectors.EVENT_READ, waiting)
        with contextlib.suppress(OSError):
            waiting.conn.shutdown(socket.SHUT_WR)
        self._log_refusal(waiting, delivered=True)
        return True

    def _expire(self, selector: selectors.BaseSelector) -> None:
        now = time.monotonic()
        for waiting in [w for w in self._waiting.values() if w.deadline <= now]:
            if waiting.answered:
                self._close(selector, waiting)
            else:
                reason = f"no whole request line within {self.read_timeout:g} s"
                self._drop(selector, waiting, reason)

    def _drop(self, selector: selectors.BaseSelector, waiting: _Waiting, reason: str) -> None:
        if not waiting.answered:
            log.info("control.dropped", socket=str(self.path), reason=reason)
        self._close(selector, waiting)

    def _close(self, selector: selectors.BaseSelector, waiting: _Waiting) -> None:
        self._forget(selector, waiting)
        waiting.conn.close()
        self._log_refusal(waiting, delivered=not waiting.out)

    def _forget(self, selector: selectors.BaseSelector, waiting: _Waiting) -> None:
        fd = waiting.conn.fileno()
        if self._waiting.get(fd) is waiting:
            del self._waiting[fd]
            selector.unregister(waiting.conn)

    def _log_refusal(self, waiting: _Waiting, *, delivered: bool) -> None:
        event, waiting.event = waiting.event, None
        if event is not None:
            seconds = round(time.monotonic() - waiting.started, 6)
            log.info("control.request", **event, delivered=delivered, seconds=seconds)

    # --- one whole request, in a thread of its own ---

    def _client(self, conn: socket.socket, peer: Peer, line: bytes, started: float) -> None:
        with conn:
            doc, action, param, error = self._answer(line)
            delivered = self._send(conn, doc, self.write_timeout)
        # Monitors poll status and health every few seconds: no news, at debug.
        emit = log.debug if action in QUIET_ACTIONS else log.info
        emit(
            "control.request",
            action=action,
            k=param.get("k"),
            update=param.get("update"),
            uid=peer.uid,
            pid=peer.pid,
            ok=succeeded(doc, action),
            code=doc.get("code"),
            error=error,
            delivered=delivered,
            seconds=round(time.monotonic() - started, 6),
        )

    def _answer(self, line: bytes) -> tuple[dict[str, Any], str | None, dict[str, str], str | None]:
        try:
            req = parse_request(line)
        except ProtocolError as exc:
            return (
                exc.document(),
                exc.param.get("action"),
                exc.param,
                exc.reason,
            )
        doc = dispatch(self.handler, req, "control")
        error = None if str(doc.get("code")) == "0" else _msg(doc)
        return doc, req.action, req.echo(), error

    def allowed(self, peer: Peer) -> bool:
        """Given a peer, return whether it may use the socket: root, this process's user, a
        listed uid, or a member (primary or supplementary group) of a listed gid."""
        settings = self.settings
        if peer.uid in (0, os.geteuid()) or peer.uid in settings.allow_uids:
            return True
        if not settings.allow_gids:
            return False
        if peer.gid in settings.allow_gids:
            return True
        groups = peer.groups if peer.groups is not None else _user_groups(peer.uid)
        return any(gid in settings.allow_gids for gid in groups)

    @staticmethod
    def _send(conn: socket.socket, doc: dict[str, Any], timeout: float) -> bool:
        try:
            conn.settimeout(timeout)
            conn.sendall(encode(doc))
        except OSError:
            return False  # the client left before its answer: nothing to tell it
        return True


def _msg(doc: dict[str, Any]) -> str | None:
    data = doc.get("data")
    if isinstance(data, dict) and isinstance(data.get("msg"), str):
        return str(data["msg"])
    return str(doc.get("msg")) if doc.get("msg") is not None else None


def _user_groups(uid: int) -> list[int]:
    try:
        user = pwd.getpwuid(uid)
    except KeyError:
        return []
    return os.getgrouplist(user.pw_name, user.pw_gid)
