"""Run the real daemon as a subprocess with a NOTIFY_SOCKET of the test's own; write and read
the files it syncs."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml

Event = dict[str, Any]


def write_config(root: Path, apps: list[dict[str, Any]], **sections: dict[str, Any]) -> Path:
    """Write a config.yml under root with fast test timings; sections override them."""
    doc: dict[str, Any] = {
        "dirs": {
            "remotecomdir": "r",
            "updatedir": "u",
            "softdir": "soft",
            "configuredir": "conf",
            "state": "state",
        },
        "publish": {"grace": 0.5, "fsync": False},
        "watch": {"settle": 0.3, "max_wait": 3, "rescan_interval": 3600},
        "control": {"socket": "run/control.sock"},
        "apps": apps,
    }
    for name, values in sections.items():
        doc.setdefault(name, {}).update(values)
    path = root / "config.yml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


def put(root: Path, files: dict[str, str]) -> None:
    """Write text files under root, making their directories."""
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content, encoding="utf-8")


def tree(root: Path) -> dict[str, str]:
    """The files under root; a swap in the middle of reading gives {} (read again)."""
    try:
        return {
            str(p.relative_to(root)): p.read_text(encoding="utf-8")
            for p in sorted(root.rglob("*"))
            if p.is_file()
        }
    except FileNotFoundError:
        return {}


class Daemon:
    """A `syncpro serve` subprocess; its JSON log lines and sd_notify messages are collected."""

    def __init__(self, config: Path, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.notify_path = config.parent / "notify.sock"
        with contextlib.suppress(FileNotFoundError):
            self.notify_path.unlink()
        self.notify_sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify_sock.bind(str(self.notify_path))
        self.notify_sock.settimeout(0.2)
        self.events: list[Event] = []
        self.notes: list[str] = []
        self.messages: list[list[str]] = []
        """Every sd_notify datagram, as its lines: fields sent together stay together."""
        self.raw: list[str] = []
        self._cond = threading.Condition()
        full_env = dict(os.environ)
        full_env.pop("NOTIFY_SOCKET", None)
        full_env.update({"NOTIFY_SOCKET": str(self.notify_path), **(env or {})})
        wrap = shlex.split(full_env.pop("SYNCPRO_TEST_WRAP", ""))
        self.proc = subprocess.Popen(
            [*wrap, sys.executable, "-m", "syncpro", "serve", "--config", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=config.parent,
        )
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._read_stdout, name="test-daemon-stdout", daemon=True),
            threading.Thread(target=self._read_notify, name="test-daemon-notify", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            text = line.decode("utf-8", "replace").rstrip("\n")
            with self._cond:
                self.raw.append(text)
                with contextlib.suppress(ValueError):
                    self.events.append(json.loads(text))
                self._cond.notify_all()

    def _read_notify(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.notify_sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._cond:
                lines = data.decode().splitlines()
                self.notes.extend(lines)
                self.messages.append(lines)
                self._cond.notify_all()

    # --- waiting on conditions, never sleeping ---

    def wait(self, predicate: Callable[[], bool], timeout: float = 30.0, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        exited = False
        with self._cond:
            while not predicate():
                if not exited and self.proc.poll() is not None and not self._threads[0].is_alive():
                    # A daemon that died says nothing more: fail soon instead of at the full
                    # deadline, leaving a moment for notifications still in the socket.
                    exited = True
                    deadline = min(deadline, time.monotonic() + 1.0)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    tail = "\n".join(self.raw[-30:])
                    code = f" (it exited with {self.proc.returncode})" if exited else ""
                    raise AssertionError(
                        f"timed out waiting for {what}; daemon{code} said:\n{tail}"
                    )
                self._cond.wait(min(remaining, 0.5))

    def find(self, event: str, **match: Any) -> list[Event]:
        with self._cond:
            return [
                e
                for e in self.events
                if e.get("event") == event and all(e.get(k) == v for k, v in match.items())
            ]

    def wait_event(self, event: str, count: int = 1, timeout: float = 30.0, **match: Any) -> Event:
        self.wait(lambda: len(self.find(event, **match)) >= count, timeout, f"{event} {match}")
        return self.find(event, **match)[count - 1]

    def syncs(self, k: str | None = None, update: bool | None = None) -> list[Event]:
        found = self.find("sync.finished")
        if k is not None:
            found = [e for e in found if e["k"] == k]
        if update is not None:
            found = [e for e in found if e["update"] == update]
        return found

    def wait_sync(
        self, k: str, update: bool = False, count: int = 1, timeout: float = 30.0
    ) -> Event:
        self.wait(lambda: len(self.syncs(k, update)) >= count, timeout, f"sync of {k} #{count}")
        return self.syncs(k, update)[count - 1]

    def wait_note(self, note: str, count: int = 1, timeout: float = 30.0) -> None:
        self.wait(lambda: self.notes.count(note) >= count, timeout, f"sd_notify {note}")

    def has_note(self, prefix: str) -> bool:
        with self._cond:
            return any(n.startswith(prefix) for n in self.notes)

    def notes_after(self, note: str) -> list[str]:
        """The notes that came after the last `note` (all of them if it never came)."""
        with self._cond:
            found = [i for i, n in enumerate(self.notes) if n == note]
            return list(self.notes[found[-1] + 1 :] if found else self.notes)

    def waits_for_lock(self, lock_file: Path) -> bool:
        """Whether the daemon is blocked on the flock of lock_file, as /proc/locks shows."""
        inode = lock_file.stat().st_ino
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            if "->" in fields and len(fields) > 6 and fields[2] == "FLOCK":
                pid, where = fields[5], fields[6]
                if pid == str(self.proc.pid) and where.rsplit(":", 1)[-1] == str(inode):
                    return True
        return False

    # --- lifecycle ---

    def wait_exit(self, timeout: float = 30.0) -> int:
        """Wait for the process to exit and its output to be read; return its exit code."""
        code = self.proc.wait(timeout)
        self._threads[0].join(timeout)
        return code

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._stop.set()
        for thread in self._threads:
            thread.join(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.notify_sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.notify_path.unlink()


@contextlib.contextmanager
def holding(root: Path, rel: str) -> Iterator[Path]:
    """Hold the publish lock of the target `rel` under root (softdir or configuredir) as
    another syncpro process would: a sync of it waits, in the middle, until the block ends.
    Yield the lock file, for `Daemon.waits_for_lock`."""
    from syncpro.engine.layout import Target
    from syncpro.engine.publish import target_lock, work_area

    target = Target(root, rel)
    with target_lock(target):
        yield work_area(root) / "locks" / f"{quote(rel, safe='')}.lock"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def running(config: Path, env: dict[str, str] | None = None) -> Iterator[Daemon]:
    daemon = Daemon(config, env)
    try:
        daemon.wait_note("READY=1", timeout=30)
        yield daemon
    finally:
        daemon.close()
