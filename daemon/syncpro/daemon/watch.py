"""Watch the source areas with inotify (polling where inotify fails) and report changed paths.

Each event is one of three kinds: a change of a real file (a reason to sync), an event of an
upload's temporary file (a name the ignore patterns match: while it is being written it holds
the app's sync back, since rsync renames each file into place only once it is whole, often
seconds after it began, with no event in between), or nothing at all (a path glob of the
ignore patterns, our own reads, directory listings).

Only events that mean a change are subscribed to (created, deleted, modified, moved, closed
after writing, attributes): the daemon's own reads of the sources (copies, fingerprints, rescan
walks, watchdog's reconcile walk) queue nothing in the kernel, so they can never overflow its
queue. An opened or closed-without-writing event would be two per file read: a rescan of a big
tree would overflow, and the re-check after the overflow would overflow again, for ever.

watchdog only logs an inotify queue overflow and rebuilds its watches; nothing reaches handler
code. We listen to its log records so the daemon can re-check everything after one.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import structlog
from watchdog.events import (
    DirAttribEvent,
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import BaseObserver

from syncpro.daemon.movepairs import inotify_observer
from syncpro.daemon.pacedpoll import paced_polling_observer
from syncpro.engine.tree import Ignore
from syncpro.lifecycle import Lifecycle

log = structlog.get_logger()

# Every reason a watcher gives on_trouble: each says events may have been lost. The rescanner
# re-checks after them at most once per max_wait; the metrics count them.
TROUBLE = frozenset(
    {
        "overflow",
        "watcher_error",
        "watcher_died",
        "inotify_failed",
        "root_missing",
        "root_unavailable",
    }
)
# Reads by our own syncs open and close source files: those events must never trigger.
_QUIET_EVENTS = frozenset({"opened", "closed_no_write"})
CHANGE_EVENTS: list[type[FileSystemEvent]] = [
    FileCreatedEvent,
    DirCreatedEvent,
    FileDeletedEvent,
    DirDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileAttribEvent,
    DirAttribEvent,
]
"""What the watcher subscribes to. watchdog builds the inotify mask from it: IN_CREATE,
IN_DELETE, IN_MODIFY, IN_MOVED_*, IN_CLOSE_WRITE, IN_ATTRIB (and IN_DELETE_SELF), never
IN_OPEN, IN_CLOSE_NOWRITE or IN_ACCESS. A directory's own "modified" event is left out: it
only repeats, for the parent, what the entry's event says."""
_HOST_LIMITS = Path("/proc/sys/fs/inotify")
_NAMESPACE_LIMITS = Path("/proc/sys/user")
_QUEUE_LIMIT = _HOST_LIMITS / "max_queued_events"
# What an event says of a temporary: it is being written, it is done with (closed after
# writing, deleted, renamed away), or only touched (its mode or times set).
WRITING, DONE, TOUCHED = "writing", "done", "touched"
_TEMPORARY_STATES = {"created": WRITING, "modified": WRITING, "closed": DONE, "deleted": DONE}


_libc = ctypes.CDLL(None, use_errno=True)
_IN_CLOEXEC = 0o2000000
_IN_ATTRIB = 0x4


def inotify_problem(path: Path) -> OSError | None:
    """Return why this user cannot add one more inotify watch on path: ENOSPC when the watch
    limit is reached, EMFILE when no inotify instance can be made; None when there is room.

    watchdog 7.1 silently skips subdirectories it cannot watch, so the only way to learn that
    the limit was hit is to try one watch of our own.
    """
    fd = _libc.inotify_init1(_IN_CLOEXEC)
    if fd < 0:
        err = ctypes.get_errno()
        if err in (errno.EMFILE, errno.ENFILE):
            return OSError(err, "cannot create an inotify instance")
        return None
    try:
        failed = _libc.inotify_add_watch(fd, os.fsencode(path), _IN_ATTRIB) < 0
        if failed and ctypes.get_errno() == errno.ENOSPC:
            return OSError(errno.ENOSPC, "inotify watch limit reached")
        return None
    finally:
        os.close(fd)


def _limit(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return "unknown"


def _in_child_user_namespace() -> bool:
    """Whether this process runs in a user namespace other than the host's: there the
    inotify limits that apply are that namespace's own (`/proc/sys/user/max_inotify_*`)."""
    try:
        uid_map = Path("/proc/self/uid_map").read_text().split()
    except OSError:
        return False
    return uid_map != ["0", "0", "4294967295"]


def _applying_limit(kind: str) -> tuple[str, str]:
    """Given "watches" or "instances", return the inotify limit that applies to this process
    with its value, and what to raise: in a user namespace of its own, that namespace's limit
    (`/proc/sys/user/max_inotify_*`) applies, below the host's sysctl."""
    host_name = f"fs.inotify.max_user_{kind}"
    host = _limit(_HOST_LIMITS / f"max_user_{kind}")
    if not _in_child_user_namespace():
        return f"{host_name} = {host}", host_name
    own = _NAMESPACE_LIMITS / f"max_inotify_{kind}"
    return (
        f"{own} = {_limit(own)} in this user namespace; host-wide {host_name} = {host}",
        f"{own} in this user namespace (or {host_name} on the host)",
    )


def limit_message(exc: OSError) -> str | None:
    """Given the error of an inotify call, return what to raise to get past it, or None when
    it is no limit of inotify's."""
    if exc.errno == errno.ENOSPC:
        limit, fix = _applying_limit("watches")
        return f"inotify watch limit reached ({limit}); raise {fix}. Polling this root meanwhile."
    if exc.errno in (errno.EMFILE, errno.ENFILE):
        limit, fix = _applying_limit("instances")
        return (
            f"cannot create an inotify instance: limit of inotify instances reached ({limit})"
            f" or of open files; raise {fix} or the open files limit."
            " Polling this root meanwhile."
        )
    return None


def queue_message() -> str:
    """Return what to say when the kernel's inotify queue overflowed: the sysctl to raise
    and its value now."""
    return (
        f"inotify event queue overflowed (fs.inotify.max_queued_events = {_limit(_QUEUE_LIMIT)}):"
        " events were lost and every app is re-checked. The queue is too small for the"
        " changes arriving at once under this tree: raise fs.inotify.max_queued_events."
    )


SourceRootOf = Callable[[str], str | None]
"""Given a watched path, return the source root of the app it belongs to, or None (both as
strings: it is asked for every event, and pathlib's parsing would cost more than the rest)."""


class _Events(FileSystemEventHandler):
    def __init__(
        self,
        root: Path,
        ignore: Ignore,
        source_root_of: SourceRootOf,
        on_change: Callable[[str], None],
        on_temporary: Callable[[str, str], None],
    ) -> None:
        self.root = str(root)
        self.root_deleted = False
        """Whether the root itself was deleted: watchdog's emitter stops on that."""
        # Name patterns are what uploaders name their temporaries; path globs are trees the
        # user keeps out (a logs/ folder written all the time must not hold anything back).
        self.names = Ignore(p for p in ignore.patterns if "/" not in p)
        self.paths = Ignore(p for p in ignore.patterns if "/" in p)
        self.source_root_of = source_root_of
        self.on_change = on_change
        self.on_temporary = on_temporary

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in _QUIET_EVENTS:
            return
        if event.event_type == "deleted" and os.fsdecode(event.src_path) == self.root:
            self.root_deleted = True
        if event.is_directory and event.event_type == "modified":
            # A directory's entries changed: the entry's own event says which, and an upload's
            # ignored temp file must not trigger a sync through its parent directory.
            return
        # An upload's rename from its temp name to the real one is the signal that the file
        # is complete: the destination counts even though the source is ignored.
        # A folder is never closed after writing: a temporary-named one must not hold.
        writes = not event.is_directory
        state = _TEMPORARY_STATES.get(event.event_type, TOUCHED) if writes else TOUCHED
        paths = [(event.src_path, state)]
        if event.event_type == "moved":
            paths = [(event.src_path, DONE), (event.dest_path, TOUCHED)]
        for raw, state in paths:
            path = raw if isinstance(raw, str) else raw.decode("utf-8", "surrogateescape")
            kind = self.kind(path)
            if kind == "real":
                self.on_change(path)
            elif kind == "temporary":
                self.on_temporary(path, state)

    def kind(self, path: str) -> str:
        """Return "real", "temporary" (a name pattern matches a part of the path) or "excluded"
        (a path glob matches the path relative to its app's source root, or a leading part of
        it: the publisher leaves out a folder's whole tree)."""
        source = self.source_root_of(path)
        base = source if source is not None else self.root
        if path == base or not path.startswith(base + "/"):
            return "real"
        parts = path[len(base) + 1 :].split("/")
        if source is not None and self.paths.patterns:
            for depth in range(1, len(parts) + 1):
                if self.paths("", "/".join(parts[:depth])):
                    return "excluded"
        names = self.names
        return "temporary" if any(names(part) for part in parts) else "real"


class _TroubleLog(logging.Handler):
    """Turns watchdog's own warnings (overflow, failed rebuild) into a call the daemon acts on.

    One overflow makes watchdog log twice (the lost events, then the rebuild of each
    recursive watch): both are counted as one. The advice to raise the queue's sysctl is
    given once per watcher, later overflows only counted."""

    def __init__(self, on_trouble: Callable[[str], None]) -> None:
        super().__init__(logging.WARNING)
        self.on_trouble = on_trouble
        self.overflows = 0
        self._advised = False

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "overflow" not in message.lower():
            log.warning("watch.watchdog_warning", message=message)
            self.on_trouble("watcher_error")
            return
        if "reconciling" in message:
            return  # the second line of the same overflow
        self.overflows += 1
        if not self._advised:
            self._advised = True
            log.error("watch.queue_overflow", error=queue_message(), overflows=self.overflows)
        else:
            log.warning("watch.queue_overflow", overflows=self.overflows)
        self.on_trouble("overflow")


class Watcher(Lifecycle):
    """Observes each root recursively; calls on_change(path) per change of a real file,
    on_temporary(path, state) per event of an upload temporary (WRITING, DONE or TOUCHED),
    each with the path as a string, and on_trouble(reason) whenever events may have been
    lost. `source_root_of` says where the path globs of `ignore` are anchored."""

    def __init__(
        self,
        roots: list[Path],
        *,
        ignore: Ignore,
        on_change: Callable[[str], None],
        on_trouble: Callable[[str], None],
        on_temporary: Callable[[str, str], None] | None = None,
        source_root_of: SourceRootOf | None = None,
        poll_interval: float = 2.0,
        force_polling: bool = False,
    ) -> None:
        self.roots = roots
        self.ignore = ignore
        self.on_change = on_change
        self.on_temporary = on_temporary or (lambda path, state: None)
        self.source_root_of = source_root_of or (lambda path: None)
        self.on_trouble = on_trouble
        self.poll_interval = poll_interval
        self.force_polling = force_polling
        self._observers: dict[Path, BaseObserver] = {}
        self._handlers: dict[Path, _Events] = {}
        self._trouble_log = _TroubleLog(on_trouble)
        self.backends: dict[Path, str] = {}
        """Per root: "inotify", "polling", or "unavailable" while it cannot be watched."""

    def start(self) -> None:
        logging.getLogger("watchdog").addHandler(self._trouble_log)
        for root in self.roots:
            root.mkdir(parents=True, exist_ok=True)
            self._start_root(root, polling=self.force_polling)

    def _start_root(self, root: Path, *, polling: bool) -> None:
        """Watch root with inotify (polling where inotify fails) or by polling. Raise OSError
        if root cannot be watched at all (it is missing or no folder)."""
        handler = _Events(root, self.ignore, self.source_root_of, self.on_change, self.on_temporary)
        self._handlers[root] = handler
        if not polling:
            observer: BaseObserver | None = None
            try:
                # Inside the try: making the observer already opens its inotify instance,
                # which fails when none is left (EMFILE).
                observer = inotify_observer()
                observer.schedule(handler, str(root), recursive=True, event_filter=CHANGE_EVENTS)
                observer.start()
                problem = inotify_problem(root)
                if problem is not None:
                    raise problem
            except OSError as exc:
                if observer is not None:
                    observer.stop()
                    if observer.is_alive():
                        observer.join(timeout=10)
                self._report_failure(root, exc)
            else:
                observer.name = f"syncpro-watch-{root.name}"
                self._observers[root] = observer
                self.backends[root] = "inotify"
                return
        observer = paced_polling_observer(timeout=self.poll_interval)
        observer.schedule(handler, str(root), recursive=True, event_filter=CHANGE_EVENTS)
        observer.start()
        self._observers[root] = observer
        self.backends[root] = "polling"

    def _report_failure(self, root: Path, exc: OSError) -> None:
        message = limit_message(exc)
        if message is not None:
            log.error("watch.inotify_limit", root=str(root), error=message)
        else:
            log.error("watch.inotify_failed", root=str(root), error=str(exc))
        self.on_trouble("inotify_failed")

    def check(self) -> None:
        """Watch again any root that was deleted (made again), that could not be watched
        (retried), whose observer died for another reason or that may have directories left
        unwatched because the inotify limit was reached (both polled from now on: new
        directories keep coming). Never raises."""
        try:
            self._check()
        except Exception:
            # Nothing on disk may stop the daemon: the next tick checks again, and the
            # rescan asked for here catches up on what went unwatched meanwhile.
            log.exception("watch.check_failed")
            self.on_trouble("watcher_error")

    def _check(self) -> None:
        inotify_roots = [r for r, b in self.backends.items() if b == "inotify"]
        full = inotify_problem(inotify_roots[0]) if inotify_roots else None
        for root in self.roots:
            observer = self._observers.get(root)
            if observer is None:
                self._rewatch(root, polling=self.force_polling)
                continue
            dead = not observer.is_alive() or any(not e.is_alive() for e in observer.emitters)
            if not dead and not (full is not None and self.backends[root] == "inotify"):
                continue
            self._stop_observer(root)
            handler = self._handlers.get(root)
            if dead and ((handler is not None and handler.root_deleted) or not root.is_dir()):
                # A known cause, nothing wrong with the backend: the same one, once made again.
                self._rewatch(root, polling=self.force_polling)
                continue
            if dead:
                log.error("watch.observer_died", root=str(root), backend=self.backends[root])
                self.on_trouble("watcher_died")
            elif full is not None:
                self._report_failure(root, full)
            self._rewatch(root, polling=True)

    def _stop_observer(self, root: Path) -> None:
        observer = self._observers.pop(root)
        observer.stop()
        if observer.is_alive():
            observer.join(timeout=10)

    def _rewatch(self, root: Path, *, polling: bool) -> None:
        """Watch root again, making it first if it is missing: an uploader's tool writes
        into it by its path, and a daemon that gave up on it would never publish again.
        When it cannot be made or watched, leave it for the next check."""
        unavailable = self.backends.get(root) == "unavailable"
        missing = not root.is_dir()
        try:
            if missing:
                root.mkdir(parents=True, exist_ok=True)
            self._start_root(root, polling=polling)
        except OSError as exc:
            if not unavailable:  # once per outage: check() runs every second
                log.error("watch.root_unavailable", root=str(root), error=str(exc))
                self.on_trouble("root_unavailable")
            self.backends[root] = "unavailable"
            return
        if missing:
            log.warning("watch.root_missing", root=str(root))
        if missing or unavailable:
            # Whatever landed before the new watches were in place had no event.
            self.on_trouble("root_missing")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop every observer, waiting up to `timeout` seconds in all for their threads."""
        deadline = time.monotonic() + timeout
        logging.getLogger("watchdog").removeHandler(self._trouble_log)
        for observer in self._observers.values():
            observer.stop()
        for observer in self._observers.values():
            if observer.is_alive():
                observer.join(timeout=max(0.0, deadline - time.monotonic()))
        self._observers.clear()
        self._handlers.clear()
