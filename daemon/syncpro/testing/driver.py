"""Run the real `syncpro serve` as a subprocess, with a NOTIFY_SOCKET of its own; collect its
JSON log lines and sd_notify messages; wait on them with deadlines (never a sleep); talk to its
control socket; stop it by its pid, killing it if it will not stop, whatever happened."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

Event = dict[str, Any]
T = TypeVar("T")

# A unix socket path must fit in sun_path (108 bytes with its NUL).
_SUN_PATH_MAX = 107


class DaemonWaitError(AssertionError):
    """A wait ran out, or the daemon exited before what was waited for: a test fails with it
    (it is an AssertionError), a benchmark stops with it."""


def wait_until(
    predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.01, what: str = ""
) -> T:
    """Poll predicate until it returns something truthy; return that. Raise DaemonWaitError
    after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise DaemonWaitError(f"condition not met within {timeout} s: {what or predicate}")
        time.sleep(interval)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listened on a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def trash_empty(*target_roots: Path) -> bool:
    """Whether every replaced tree under the target roots (softdir, configuredir) has been
    swept after its grace, and the sweep is over: a tree being retired has left the trash
    for the staging folder, and becomes its target's spare only once stripped."""
    for root in target_roots:
        for folder in ("trash", "staging"):
            path = root / ".syncpro" / folder
            if path.is_dir() and any(path.iterdir()):
                return False
    return True


def ctl(
    config: Path, *args: str, python: str = sys.executable, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run `syncpro ctl args --config config` as an operator would; return what it did."""
    return subprocess.run(
        [python, "-m", "syncpro", "ctl", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def read_line(sock: socket.socket) -> bytes:
    """Read from sock until a newline or the end: one answer of the control socket."""
    buffer = bytearray()
    while b"\n" not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            break
        buffer += chunk
    return bytes(buffer)


def _control_socket(config: Path) -> Path | None:
    doc = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    name = (doc.get("control") or {}).get("socket")
    return config.parent / name if name else None


class Daemon:
    """A `syncpro serve` subprocess; its JSON log lines and sd_notify messages are collected,
    each with the monotonic time it arrived.

    `env` adds to (or, with None values, removes from) the environment; `wrap` is a command
    line the daemon is started under (`unshare -U -r` for limits of its own).
    """

    def __init__(
        self,
        config: Path,
        env: Mapping[str, str | None] | None = None,
        *,
        wrap: Sequence[str] = (),
        python: str = sys.executable,
    ) -> None:
        self.config = config
        self.events: list[Event] = []
        self.notes: list[str] = []
        self.messages: list[list[str]] = []
        """Every sd_notify datagram, as its lines: fields sent together stay together."""
        self.raw: list[str] = []
        self.ready_at: float | None = None
        """When the first READY=1 arrived (monotonic)."""
        self._arrived: dict[int, float] = {}
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._own_dir: Path | None = None
        self.notify_path = config.parent / "notify.sock"
        if len(os.fsencode(self.notify_path)) > _SUN_PATH_MAX:
            self._own_dir = Path(tempfile.mkdtemp(prefix="spn-", dir="/tmp"))
            self.notify_path = self._own_dir / "notify.sock"
        with contextlib.suppress(FileNotFoundError):
            self.notify_path.unlink()
        self.notify_sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify_sock.bind(str(self.notify_path))
        self.notify_sock.settimeout(0.2)
        full_env = dict(os.environ)
        for name, value in {"NOTIFY_SOCKET": str(self.notify_path), **(env or {})}.items():
            if value is None:
                full_env.pop(name, None)
            else:
                full_env[name] = value
        self.launched = time.monotonic()
        try:
            self.proc = subprocess.Popen(
                [*wrap, python, "-m", "syncpro", "serve", "--config", str(config)],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=full_env,
                cwd=config.parent,
            )
        except BaseException:
            self._close_notify()
            raise
        self._threads = [
            threading.Thread(target=self._read_stdout, name="harness-daemon-stdout", daemon=True),
            threading.Thread(target=self._read_notify, name="harness-daemon-notify", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            text = line.decode("utf-8", "replace").rstrip("\n")
            with self._cond:
                self.raw.append(text)
                with contextlib.suppress(ValueError):
                    event = json.loads(text)
                    if isinstance(event, dict):
                        self.events.append(event)
                        self._arrived[id(event)] = time.monotonic()
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()  # waiters see the exit at once

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
                if "READY=1" in lines and self.ready_at is None:
                    self.ready_at = time.monotonic()
                self.notes.extend(lines)
                self.messages.append(lines)
                self._cond.notify_all()

    # --- waiting on conditions, never sleeping ---

    def tail(self, lines: int = 30) -> str:
        with self._cond:
            return "\n".join(self.raw[-lines:])

    def wait(self, predicate: Callable[[], bool], timeout: float = 30.0, what: str = "") -> None:
        """Wait until predicate() holds; raise DaemonWaitError at the deadline, or soon after
        the daemon exits."""
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
                    code = f" (it exited with {self.proc.returncode})" if exited else ""
                    raise DaemonWaitError(
                        f"timed out waiting for {what}; daemon{code} said:\n"
                        + "\n".join(self.raw[-30:])
                    )
                self._cond.wait(min(remaining, 0.5))

    def find(self, event: str, **match: Any) -> list[Event]:
        with self._cond:
            return [
                e
                for e in self.events
                if e.get("event") == event and all(e.get(k) == v for k, v in match.items())
            ]

    def arrival(self, event: Event) -> float:
        """The monotonic time a collected event was read."""
        with self._cond:
            return self._arrived[id(event)]

    def last_arrival(self) -> float:
        """When the daemon last logged anything (its launch if it never did)."""
        with self._cond:
            return self._arrived[id(self.events[-1])] if self.events else self.launched

    def wait_event(self, event: str, count: int = 1, timeout: float = 30.0, **match: Any) -> Event:
        self.wait(lambda: len(self.find(event, **match)) >= count, timeout, f"{event} {match}")
        return self.find(event, **match)[count - 1]

    def wait_ready(self, timeout: float = 30.0) -> float:
        """Wait for READY=1; return the seconds from launch to it."""
        self.wait(lambda: self.ready_at is not None, timeout, "sd_notify READY=1")
        assert self.ready_at is not None
        return self.ready_at - self.launched

    def syncs(self, k: str | None = None, update: bool | None = None) -> list[Event]:
        """The syncs finished, or those of `k`: for one app key or group, every sync that
        took it, alone or packed with others (a catch-up runs many apps per sync); for a
        request's whole `k` ("a b", "all"), the syncs of exactly that."""
        found = self.find("sync.finished")
        if k is not None and " " not in k:
            found = [e for e in found if k in e["k"].split()]
        elif k is not None:
            found = [e for e in found if e["k"] == k]
        if update is not None:
            found = [e for e in found if e["update"] == update]
        return found

    def wait_sync(
        self, k: str, update: bool = False, count: int = 1, timeout: float = 30.0
    ) -> Event:
        self.wait(lambda: len(self.syncs(k, update)) >= count, timeout, f"sync of {k} #{count}")
        return self.syncs(k, update)[count - 1]

    def synced(self, since: int = 0) -> set[str]:
        """The app keys of the syncs finished after the first `since`, alone or in a batch."""
        return {k for e in self.syncs()[since:] for k in e["k"].split()}

    def wait_synced(self, *app_keys: str, since: int = 0, timeout: float = 30.0) -> Event:
        """Wait until every one of app_keys has had a sync finish (after the first `since`);
        return the sync that completed the set."""
        wanted = set(app_keys)
        self.wait(lambda: wanted <= self.synced(since), timeout, f"syncs of {sorted(wanted)}")
        seen: set[str] = set()
        for event in self.syncs()[since:]:
            seen.update(event["k"].split())
            if wanted <= seen:
                return event
        raise AssertionError("unreachable: the set was complete")

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
                if pid == str(self.pid) and where.rsplit(":", 1)[-1] == str(inode):
                    return True
        return False

    # --- talking to it ---

    def request(self, timeout: float = 60.0, **fields: Any) -> dict[str, Any]:
        """Send one JSON request line on the control socket named by the config; return the
        answer's document."""
        path = _control_socket(self.config)
        if path is None:
            raise DaemonWaitError(f"{self.config} names no control.socket")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(json.dumps(fields).encode() + b"\n")
            buffer = read_line(sock)
        doc = json.loads(buffer)
        if not isinstance(doc, dict):
            raise DaemonWaitError(f"not a response document: {buffer[:500]!r}")
        return doc

    def ctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return ctl(self.config, *args, timeout=timeout)

    # --- what it costs, from /proc ---

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of all its threads."""
        text = Path(f"/proc/{self.pid}/stat").read_text(encoding="ascii")
        fields = text[text.rindex(")") + 2 :].split()  # the command name may hold spaces
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def status_kib(self, key: str) -> int:
        """A /proc/<pid>/status value in KiB, such as VmRSS or VmHWM."""
        for line in Path(f"/proc/{self.pid}/status").read_text(encoding="ascii").splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1])
        raise DaemonWaitError(f"no {key} in /proc/{self.pid}/status")

    # --- lifecycle ---

    def wait_exit(self, timeout: float = 30.0) -> int:
        """Wait for the process to exit and its output to be read; return its exit code."""
        code = self.proc.wait(timeout)
        self._threads[0].join(timeout)
        return code

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM it and return its exit code; killed and cleaned up whatever happens."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.wait_exit(timeout)
        finally:
            self.close()

    def close(self) -> None:
        """Kill it if it still runs, and release the threads, pipe and notify socket."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._stop.set()
        for thread in self._threads:
            thread.join(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._close_notify()

    def _close_notify(self) -> None:
        self.notify_sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.notify_path.unlink()
        if self._own_dir is not None:
            with contextlib.suppress(OSError):
                self._own_dir.rmdir()


@contextlib.contextmanager
def running(
    config: Path,
    env: Mapping[str, str | None] | None = None,
    *,
    wrap: Sequence[str] = (),
    python: str = sys.executable,
    ready_timeout: float = 30.0,
) -> Iterator[Daemon]:
    """A daemon on config, READY; stopped (killed if need be) when the block ends."""
    daemon = Daemon(config, env, wrap=wrap, python=python)
    try:
        daemon.wait_ready(ready_timeout)
        yield daemon
    finally:
        daemon.close()
