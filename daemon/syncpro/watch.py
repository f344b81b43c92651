"""Watch the source areas with inotify (polling where inotify fails) and report changed paths.

watchdog only logs an inotify queue overflow and rebuilds its watches; nothing reaches handler
code. We listen to its log records so the daemon can re-check everything after one.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
from collections.abc import Callable
from pathlib import Path

import structlog
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from syncpro.tree import Ignore

log = structlog.get_logger()

# Reads by our own syncs open and close source files: those events must never trigger.
_QUIET_EVENTS = frozenset({"opened", "closed_no_write"})
_WATCHES_LIMIT = Path("/proc/sys/fs/inotify/max_user_watches")


_libc = ctypes.CDLL(None, use_errno=True)
_IN_CLOEXEC = 0o2000000
_IN_ATTRIB = 0x4


def inotify_room_left(path: Path) -> bool:
    """Return False when this user cannot add one more inotify watch (ENOSPC).

    watchdog 7.1 silently skips subdirectories it cannot watch, so the only way to learn that
    the limit was hit is to try one watch of our own.
    """
    fd = _libc.inotify_init1(_IN_CLOEXEC)
    if fd < 0:
        return ctypes.get_errno() not in (errno.EMFILE, errno.ENOSPC)
    try:
        wd = _libc.inotify_add_watch(fd, os.fsencode(path), _IN_ATTRIB)
        return wd >= 0 or ctypes.get_errno() != errno.ENOSPC
    finally:
        os.close(fd)


def _watch_limit() -> str:
    try:
        return _WATCHES_LIMIT.read_text().strip()
    except OSError:
        return "unknown"


class _Events(FileSystemEventHandler):
    def __init__(self, root: Path, ignore: Ignore, on_change: Callable[[Path], None]) -> None:
        self.root = root
        self.ignore = ignore
        self.on_change = on_change

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in _QUIET_EVENTS:
            return
        if event.is_directory and event.event_type == "modified":
            # A directory's entries changed: the entry's own event says which, and an upload's
            # ignored temp file must not trigger a sync through its parent directory.
            return
        paths = [event.src_path]
        if event.event_type == "moved":
            # An upload's rename from its temp name to the real one is the signal that the
            # file is complete: the destination counts even though the source is ignored.
            paths.append(event.dest_path)
        for raw in paths:
            path = Path(raw if isinstance(raw, str) else raw.decode("utf-8", "surrogateescape"))
            if not self._ignored(path):
                self.on_change(path)

    def _ignored(self, path: Path) -> bool:
        try:
            parts = path.relative_to(self.root).parts
        except ValueError:
            return False
        return any(self.ignore(part) for part in parts)


class _TroubleLog(logging.Handler):
    """Turns watchdog's own warnings (overflow, failed rebuild) into a call the daemon acts on."""

    def __init__(self, on_trouble: Callable[[str], None]) -> None:
        super().__init__(logging.WARNING)
        self.on_trouble = on_trouble

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        log.warning("watch.watchdog_warning", message=message)
        reason = "overflow" if "overflow" in message.lower() else "watcher_error"
        self.on_trouble(reason)


class Watcher:
    """Observes each root recursively; calls on_change(path) per relevant event and
    on_trouble(reason) whenever events may have been lost."""

    def __init__(
        self,
        roots: list[Path],
        *,
        ignore: Ignore,
        on_change: Callable[[Path], None],
        on_trouble: Callable[[str], None],
        poll_interval: float = 2.0,
        force_polling: bool = False,
    ) -> None:
        self.roots = roots
        self.ignore = ignore
        self.on_change = on_change
        self.on_trouble = on_trouble
        self.poll_interval = poll_interval
        self.force_polling = force_polling
        self._observers: dict[Path, BaseObserver] = {}
        self._trouble_log = _TroubleLog(on_trouble)
        self.backends: dict[Path, str] = {}

    def start(self) -> None:
        logging.getLogger("watchdog").addHandler(self._trouble_log)
        for root in self.roots:
            root.mkdir(parents=True, exist_ok=True)
            self._start_root(root, polling=self.force_polling)

    def _start_root(self, root: Path, *, polling: bool) -> None:
        handler = _Events(root, self.ignore, self.on_change)
        if not polling:
            observer: BaseObserver = Observer()
            try:
                observer.schedule(handler, str(root), recursive=True)
                observer.start()
                if not inotify_room_left(root):
                    raise OSError(errno.ENOSPC, "inotify watch limit reached")
            except OSError as exc:
                observer.stop()
                if observer.is_alive():
                    observer.join(timeout=10)
                self._report_failure(root, exc)
            else:
                observer.name = f"syncpro-watch-{root.name}"
                self._observers[root] = observer
                self.backends[root] = "inotify"
                return
        observer = PollingObserver(timeout=self.poll_interval)
        observer.schedule(handler, str(root), recursive=True)
        observer.start()
        self._observers[root] = observer
        self.backends[root] = "polling"

    def _report_failure(self, root: Path, exc: OSError) -> None:
        if exc.errno == errno.ENOSPC:
            log.error(
                "watch.inotify_limit",
                root=str(root),
                error=f"inotify watch limit reached ({_watch_limit()}); raise"
                " fs.inotify.max_user_watches. Polling this root meanwhile.",
            )
        else:
            log.error("watch.inotify_failed", root=str(root), error=str(exc))
        self.on_trouble("inotify_failed")

    def check(self) -> None:
        """Poll, from now on, any root whose observer died or that may have directories left
        unwatched because the inotify limit was reached (new directories keep coming)."""
        inotify_roots = [r for r, b in self.backends.items() if b == "inotify"]
        full = bool(inotify_roots) and not inotify_room_left(inotify_roots[0])
        for root, observer in list(self._observers.items()):
            dead = not observer.is_alive() or any(not e.is_alive() for e in observer.emitters)
            if not dead and not (full and self.backends[root] == "inotify"):
                continue
            observer.stop()
            if observer.is_alive():
                observer.join(timeout=10)
            if dead:
                log.error("watch.observer_died", root=str(root), backend=self.backends[root])
                self.on_trouble("watcher_died")
            else:
                self._report_failure(root, OSError(errno.ENOSPC, "inotify watch limit reached"))
            self._start_root(root, polling=True)

    def stop(self) -> None:
        logging.getLogger("watchdog").removeHandler(self._trouble_log)
        for observer in self._observers.values():
            observer.stop()
        for observer in self._observers.values():
            if observer.is_alive():
                observer.join(timeout=10)
        self._observers.clear()

    def __enter__(self) -> Watcher:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
