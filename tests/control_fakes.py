"""A recording handler for the control socket and HTTP tests, small socket helpers, and the
fixtures of a control server on a short socket path.

pytest finds a fixture by its name in the test module, so a module that uses these binds them:
`sock_dir, handler, server = control_fakes.sock_dir, control_fakes.handler, control_fakes.server`.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from syncpro import testing
from syncpro.config.model import ControlSettings
from syncpro.control.socket_server import ControlServer
from syncpro.engine.request import SyncRequest


def document(ok: bool = True, **extra: Any) -> dict[str, Any]:
    """A canned response document: data.data["0"] is "1" when ok."""
    doc: dict[str, Any] = {
        "code": "0",
        "data": {
            "code": "0" if ok else "1",
            "data": {"0": "1" if ok else "0", "1": "", "2": ""},
            "msg": "成功" if ok else "失败: server1: program source /x is missing",
        },
    }
    doc.update(extra)
    return doc


class FakeHandler:
    """Records every call; answers canned documents, or runs `on_sync` when given."""

    def __init__(self, *, ok: bool = True) -> None:
        self.ok = ok
        self.calls: list[tuple[str, SyncRequest | None]] = []
        self.lock = threading.Lock()
        self.on_sync: Callable[[SyncRequest], dict[str, Any]] | None = None

    def _record(self, name: str, request: SyncRequest | None) -> None:
        with self.lock:
            self.calls.append((name, request))

    def sync(self, request: SyncRequest) -> dict[str, Any]:
        self._record("sync", request)
        if self.on_sync is not None:
            return self.on_sync(request)
        return document(self.ok, param={"action": request.action, "k": request.normalised_k})

    def diff(self, request: SyncRequest) -> dict[str, Any]:
        self._record("diff", request)
        return document(self.ok, diff={})

    def status(self) -> dict[str, Any]:
        self._record("status", None)
        return {"code": "0", "msg": "ok", "version": "test"}

    def reload(self) -> dict[str, Any]:
        self._record("reload", None)
        return {"code": "0", "msg": "reload requested"}

    def health(self) -> dict[str, Any]:
        self._record("health", None)
        return {"code": "0", "msg": "healthy", "healthy": True, "problems": []}


@contextmanager
def short_dir() -> Iterator[Path]:
    """A fresh directory with a short path: a unix socket path must fit in 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="spc-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def ask(path: Path, payload: bytes, timeout: float = 10.0) -> dict[str, Any]:
    """Send payload on the control socket at path; return the one-line answer, parsed."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(payload)
        reply = read_line(sock)
    doc = json.loads(reply)
    assert isinstance(doc, dict)
    return doc


def read_line(sock: socket.socket) -> bytes:
    """One answer, which must be exactly one line."""
    buffer = testing.read_line(sock)
    assert buffer.endswith(b"\n") and buffer.count(b"\n") == 1, buffer
    return buffer


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def client_threads() -> list[threading.Thread]:
    """The control server's per-connection threads still alive in this process."""
    return [t for t in threading.enumerate() if t.name.startswith("syncpro-control-")]


# --- fixtures: bound by name in the test modules that use them ---


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    with short_dir() as path:
        yield path


@pytest.fixture
def handler() -> FakeHandler:
    return FakeHandler()


@pytest.fixture
def server(sock_dir: Path, handler: FakeHandler) -> Iterator[ControlServer]:
    with ControlServer(ControlSettings(socket=sock_dir / "c.sock"), handler) as running:
        yield running
