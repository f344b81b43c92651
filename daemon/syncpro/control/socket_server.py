"""The daemon's control socket: accept a client, keep its Connection until its request line is
whole, then answer the line in a thread of its own through the dispatch contract."""

from __future__ import annotations

import contextlib
import grp
import os
import selectors
import socket
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from syncpro.config.model import ControlSettings
from syncpro.control import peers
from syncpro.control.dispatch import Code, ControlHandler, answer_line, encode
from syncpro.control.peers import Peer
from syncpro.control.protocol import MAX_REQUEST, QUIET_ACTIONS
from syncpro.engine.response import refusal_document
from syncpro.errors import ControlError
from syncpro.lifecycle import Lifecycle

log = structlog.get_logger()

_LINE_LIMIT = MAX_REQUEST + 2  # the line, an optional \r, and its \n
_ACCEPT_BATCH = 64
# A refused client may still be sending its request; reading it for this long lets it get to
# the answer rather than a reset.
_LINGER_SECONDS = 2.0


@dataclass(frozen=True)
class Refuse:
    """What a connection read calls for a refusal: nothing runs, the client is told why."""

    reason: str


@dataclass(frozen=True)
class Drop:
    """What a connection read calls for closing it unanswered (or, once refused, done)."""

    reason: str


class Connection:
    """One accepted client, from accept until its request line is whole (then a thread of its
    own answers it) or it is closed: its socket, its peer, the deadline of its line, what it
    sent so far and a refusal still being written.

    Only the accepting thread touches it: an idle client costs a descriptor, never a thread.
    """

    def __init__(self, conn: socket.socket, peer: Peer, read_timeout: float) -> None:
        self.conn = conn
        self.peer = peer
        self.started = time.monotonic()
        self.deadline = self.started + read_timeout
        self.buffer = bytearray()
        self.out = b""  # a refusal not yet fully written
        self.answered = False  # refused: what still arrives is read and thrown away
        self._event: dict[str, Any] | None = None  # the control.request event, logged once

    def receive(self) -> bytes | Refuse | Drop | None:
        """Read what the client sent; return its whole request line, what to do instead, or
        None while the line is still arriving."""
        try:
            chunk = self.conn.recv(65536)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            return Drop(str(exc))
        if self.answered:
            return None if chunk else Drop("closed after its refusal")
        if not chunk:
            if self.buffer:
                # A request is only whole with its newline: a client that stopped mid-line may
                # have meant something else entirely (update=1 cut off), so nothing runs.
                return Refuse(
                    f"request line lacks its newline: the connection ended after"
                    f" {len(self.buffer)} bytes; end the request with \\n"
                )
            return Drop("closed without a request")
        self.buffer += chunk
        end = self.buffer.find(b"\n")
        if end < 0 and len(self.buffer) <= _LINE_LIMIT:
            return None
        if end < 0 or end + 1 > _LINE_LIMIT:
            return Refuse(f"request over {MAX_REQUEST // 1024} KiB")
        return bytes(self.buffer[: end + 1])

    def refuse(self, reason: str, code: str) -> None:
        """Make the refusal the answer to write, and give the client a moment more to read it."""
        self.answered = True
        self.out = encode(refusal_document({}, reason, code))
        self.deadline = min(self.deadline, time.monotonic() + _LINGER_SECONDS)
        self._event = {
            "action": None,
            "k": None,
            "update": None,
            "uid": self.peer.uid,
            "pid": self.peer.pid,
            "ok": False,
            "code": str(code),
            "error": reason,
        }

    def write(self) -> bool:
        """Write what is left of the refusal without blocking; return whether all of it is
        out (then the writing side is shut). Raise OSError if the client is gone."""
        try:
            sent = self.conn.send(self.out)
        except (BlockingIOError, InterruptedError):
            sent = 0
        self.out = self.out[sent:]
        if self.out:
            return False
        with contextlib.suppress(OSError):
            self.conn.shutdown(socket.SHUT_WR)
        self.log_refusal(delivered=True)
        return True

    def close(self) -> None:
        self.conn.close()
        self.log_refusal(delivered=not self.out)

    def log_refusal(self, *, delivered: bool) -> None:
        event, self._event = self._event, None
        if event is not None:
            seconds = round(time.monotonic() - self.started, 6)
            log.info("control.request", **event, delivered=delivered, seconds=seconds)


class ControlServer(Lifecycle):
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
        self._waiting: dict[int, Connection] = {}
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
                        elif (connection := self._waiting.get(key.fd)) is key.data:
                            # (else dropped earlier in this round; its number may be reused)
                            assert connection is not None
                            self._guarded(selector, connection, events)
                    self._expire(selector)
            finally:
                for connection in list(self._waiting.values()):
                    self._drop(selector, connection, "the server is stopping")

    def _guarded(
        self, selector: selectors.BaseSelector, connection: Connection, events: int
    ) -> None:
        # One connection's surprise (no thread to be had, say) must not end the accepting
        # thread: every other client, and every later one, would wait on a dead socket.
        try:
            self._service(selector, connection, events)
        except Exception as exc:
            log.exception("control.connection_failed", socket=str(self.path), error=repr(exc))
            self._drop(selector, connection, f"internal error: {type(exc).__name__}")

    def _select_timeout(self) -> float | None:
        if not self._waiting:
            return None
        soonest = min(c.deadline for c in self._waiting.values())
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
                peer = peers.peer_of(conn)
            except OSError as exc:
                conn.close()
                log.info("control.dropped", socket=str(self.path), reason=str(exc))
                continue
            if len(self._waiting) >= self.max_waiting:
                self._drop_oldest(selector)
            connection = Connection(conn, peer, self.read_timeout)
            self._waiting[conn.fileno()] = connection
            selector.register(conn, selectors.EVENT_READ, connection)
            if not peers.allowed(self.settings, peer):
                self._refuse(selector, connection, peers.refusal(peer, self.path), Code.FORBIDDEN)

    def _drop_oldest(self, selector: selectors.BaseSelector) -> None:
        # Refused peers go first: they were answered already; then the longest-idle client.
        victim = next(
            (c for c in self._waiting.values() if c.answered),
            next(iter(self._waiting.values())),
        )
        reason = f"over {self.max_waiting} connections waiting; dropped the oldest"
        self._drop(selector, victim, reason)

    def _service(
        self, selector: selectors.BaseSelector, connection: Connection, events: int
    ) -> None:
        if events & selectors.EVENT_WRITE and not self._flush(selector, connection):
            return
        if not events & selectors.EVENT_READ:
            return
        step = connection.receive()
        if isinstance(step, bytes):
            self._hand_over(selector, connection, step)
        elif isinstance(step, Refuse):
            self._refuse(selector, connection, step.reason)
        elif isinstance(step, Drop):
            self._drop(selector, connection, step.reason)

    def _hand_over(
        self, selector: selectors.BaseSelector, connection: Connection, line: bytes
    ) -> None:
        with self._lock:
            self._clients = {t for t in self._clients if t.is_alive()}
            busy = len(self._clients) >= self.max_clients
            if not busy:
                self._forget(selector, connection)
                self._count += 1
                thread = threading.Thread(
                    target=self._client,
                    args=(connection, line),
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
            self._refuse(selector, connection, reason, Code.BUSY)

    def _refuse(
        self,
        selector: selectors.BaseSelector,
        connection: Connection,
        reason: str,
        code: str = Code.FAILURE,
    ) -> None:
        """Answer a refusal from this thread without ever blocking on the client, then read
        what it still sends until it leaves: closing with its request unread could reset the
        connection before the client has read why."""
        connection.refuse(reason, code)
        self._flush(selector, connection)

    def _flush(self, selector: selectors.BaseSelector, connection: Connection) -> bool:
        """Write what is left of a refusal; return whether the connection is still open."""
        try:
            done = connection.write()
        except OSError:
            self._close(selector, connection)
            return False
        events = selectors.EVENT_READ if done else selectors.EVENT_READ | selectors.EVENT_WRITE
        selector.modify(connection.conn, events, connection)
        return True

    def _expire(self, selector: selectors.BaseSelector) -> None:
        now = time.monotonic()
        for connection in [c for c in self._waiting.values() if c.deadline <= now]:
            if connection.answered:
                self._close(selector, connection)
            else:
                reason = f"no whole request line within {self.read_timeout:g} s"
                self._drop(selector, connection, reason)

    def _drop(self, selector: selectors.BaseSelector, connection: Connection, reason: str) -> None:
        if not connection.answered:
            log.info("control.dropped", socket=str(self.path), reason=reason)
        self._close(selector, connection)

    def _close(self, selector: selectors.BaseSelector, connection: Connection) -> None:
        self._forget(selector, connection)
        connection.close()

    def _forget(self, selector: selectors.BaseSelector, connection: Connection) -> None:
        fd = connection.conn.fileno()
        if self._waiting.get(fd) is connection:
            del self._waiting[fd]
            selector.unregister(connection.conn)

    # --- one whole request, in a thread of its own ---

    def _client(self, connection: Connection, line: bytes) -> None:
        conn, peer = connection.conn, connection.peer
        with conn:
            reply = answer_line(self.handler, line, "control")
            delivered = _send(conn, encode(reply.doc), self.write_timeout)
        # Monitors poll status and health every few seconds: no news, at debug.
        emit = log.debug if reply.action in QUIET_ACTIONS else log.info
        emit(
            "control.request",
            action=reply.action,
            k=reply.param.get("k"),
            update=reply.param.get("update"),
            uid=peer.uid,
            pid=peer.pid,
            ok=reply.ok,
            code=reply.doc.get("code"),
            error=reply.error,
            delivered=delivered,
            seconds=round(time.monotonic() - connection.started, 6),
        )


def _send(conn: socket.socket, answer: bytes, timeout: float) -> bool:
    try:
        conn.settimeout(timeout)
        conn.sendall(answer)
    except OSError:
        return False  # the client left before its answer: nothing to tell it
    return True
