"""What the daemon last published, per app and mode, so a restart re-syncs only changes."""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import structlog

from syncpro.config.model import Dirs
from syncpro.engine import layout
from syncpro.engine.ignore import Ignore
from syncpro.engine.request import CONFIG, PROGRAM
from syncpro.engine.walk import plan_path
from syncpro.errors import StartupError
from syncpro.inventory.apps import App

_SCHEMA = """
CREATE TABLE IF NOT EXISTS published (
    app_key TEXT NOT NULL,
    mode INTEGER NOT NULL,
    fingerprint TEXT NOT NULL,
    published_at REAL NOT NULL,
    marker TEXT,
    PRIMARY KEY (app_key, mode)
)
"""
_ABSENT = "-"
T = TypeVar("T")
_IN_USE = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
log = structlog.get_logger()
LOCK_NAME = "serve.lock"


@dataclass(frozen=True)
class Fingerprint:
    """A digest of an app's sources in one mode, per part, and when the newest of them
    arrived. `digest` is what the state records: "<program>|<config>", each part's digest or
    "absent", so that a sync of one part can record that part alone."""

    parts: dict[str, str]
    newest: float
    """The largest ctime in the sources, their folders included: `rsync -a` keeps the
    uploader's mtimes, so only the inode change time says when a file landed here (or, for
    its folder's, when one was deleted)."""
    walked: int = field(default=0, compare=False)
    """Names the fingerprint read (0 for parts a sync had just walked): a cost, not a part
    of what it says."""

    @property
    def digest(self) -> str:
        return f"{self.parts[PROGRAM]}|{self.parts[CONFIG]}"

    def changed_parts(self, recorded: str | None) -> set[str]:
        """The parts whose digest differs from a recorded fingerprint (all for none, or one
        of an older format)."""
        halves = _halves(recorded)
        return {part for part in (PROGRAM, CONFIG) if halves.get(part) != self.parts[part]}

    def merged(self, recorded: str | None, synced: frozenset[str]) -> str:
        """What to record after a sync of `synced` parts only: their digests now, and for the
        other parts what was recorded before ("unknown" if nothing was), never a state of
        theirs that was not published."""
        halves = _halves(recorded)
        return "|".join(
            self.parts[part] if part in synced else halves.get(part, _UNKNOWN)
            for part in (PROGRAM, CONFIG)
        )


def _halves(recorded: str | None) -> dict[str, str]:
    if recorded is None or recorded.count("|") != 1:
        return {}
    program, config = recorded.split("|")
    return {PROGRAM: program, CONFIG: config}


_UNKNOWN = "unknown"


@dataclass(frozen=True)
class Record:
    fingerprint: str
    published_at: float
    """When the sync that published these sources started reading them."""
    marker: str | None = None
    """The ready marker as that sync saw it at its start (`marker_signature`), or None."""


class StateStore:
    """A small sqlite database in dirs.state, safe to share between the daemon's threads.

    It is a cache of what was published, never a reason to stop: a database that cannot be
    opened or used (truncated, overwritten, a damaged page) is set aside under a new name,
    with an error logged, and an empty one takes its place; `on_reset` is then told why, so
    that the daemon re-checks every app (with no record, every app counts as changed). Where
    not even a new file can be made, the state lives in memory until the next start.
    """

    def __init__(self, directory: Path, on_reset: Callable[[str], None] | None = None) -> None:
        """Given dirs.state, open (or rebuild) its database. Raise OSError only if the
        directory cannot be made."""
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / "state.sqlite3"
        self.on_reset = on_reset
        self.resets = 0
        """How many times the database was set aside and rebuilt since it was opened."""
        self.in_memory = False
        self._lock = threading.Lock()
        self._closed = False
        self._db = self._open_or_rebuild()

    def _open_or_rebuild(self) -> sqlite3.Connection:
        try:
            return _open(self.path)
        except sqlite3.DatabaseError as exc:
            self._set_aside(exc)
        try:
            return _open(self.path)
        except (sqlite3.Error, OSError) as exc:
            self.in_memory = True
            log.error(
                "state.in_memory",
                path=str(self.path),
                error=f"cannot make a new state database: {exc}; the state is kept in memory"
                " until the next start, which then re-syncs every app with sources",
            )
            return _open(Path(":memory:"))

    def _set_aside(self, exc: BaseException) -> None:
        """Move the database and its journal files out of the way, keeping them for a look."""
        self.resets += 1
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        aside = self.path.with_name(f"{self.path.name}.damaged-{stamp}-{os.getpid()}-{self.resets}")
        moved: str | None = str(aside)
        for suffix in ("", "-wal", "-shm"):
            source = Path(f"{self.path}{suffix}")
            try:
                source.rename(f"{aside}{suffix}")
            except FileNotFoundError:
                continue
            except OSError as rename_error:
                # The journal of a database we cannot move must not be replayed into the
                # new one: remove what cannot be moved.
                moved = None
                with contextlib.suppress(OSError):
                    source.unlink()
                log.warning("state.set_aside_failed", path=str(source), error=str(rename_error))
        log.error(
            "state.set_aside",
            path=str(self.path),
            moved_to=moved,
            error=f"the state database cannot be used ({exc}): set aside and rebuilt;"
            " every app counts as changed and is synced again",
        )

    def _reset(self, exc: sqlite3.DatabaseError) -> None:
        """Replace a database that failed in use; called with the lock held."""
        with contextlib.suppress(sqlite3.Error):
            self._db.close()
        if self.in_memory:
            log.error("state.in_memory_failed", error=str(exc))
            self._db = _open(Path(":memory:"))
            return
        self._set_aside(exc)
        self._db = self._open_or_rebuild()

    def _use(self, work: Callable[[sqlite3.Connection], T]) -> T | None:
        """Run work on the database; where the database fails, rebuild it, tell `on_reset`
        and run work once more on the new one (None if that fails too)."""
        with self._lock:
            if self._closed:
                return None
            try:
                return work(self._db)
            except sqlite3.DatabaseError as exc:
                if getattr(exc, "sqlite_errorcode", None) in _IN_USE:
                    # Someone else (an operator's sqlite3 shell) holds it: nothing is wrong
                    # with it. Unknown or unrecorded counts as changed: one sync too many.
                    log.warning("state.busy", path=str(self.path), error=str(exc))
                    return None
                failure = exc
                self._reset(exc)
                try:
                    result = work(self._db)
                except sqlite3.DatabaseError:
                    result = None
        if self.on_reset is not None:
            self.on_reset(str(failure))
        return result

    def get(self, app_key: str, update: bool) -> Record | None:
        row = self._use(
            lambda db: db.execute(
                "SELECT fingerprint, published_at, marker FROM published"
                " WHERE app_key=? AND mode=?",
                (app_key, int(update)),
            ).fetchone()
        )
        return Record(row[0], row[1], row[2]) if row else None

    def record(
        self,
        app_key: str,
        update: bool,
        fingerprint: str,
        at: float | None = None,
        marker: str | None = None,
    ) -> None:
        """Record what a sync that started `at` (default now) read: the fingerprint of the
        sources and the signature of the ready marker."""
        when = time.time() if at is None else at
        self._use(
            lambda db: db.execute(
                "INSERT OR REPLACE INTO published"
                " (app_key, mode, fingerprint, published_at, marker) VALUES (?, ?, ?, ?, ?)",
                (app_key, int(update), fingerprint, when, marker),
            )
        )

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._db.close()


def _open(path: Path) -> sqlite3.Connection:
    """Open the database at path and check it whole. Raise sqlite3.DatabaseError if it is
    no database or a damaged one."""
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        # A commit per sync need not wait for the disk: a record lost with a power cut
        # only makes that app sync again (and the WAL keeps the file whole meanwhile).
        db.execute("PRAGMA synchronous=NORMAL")
        # A damaged page is found only by reading it: a lookup by key may never touch it,
        # and would then fail on some later day. The table is small: check it all now.
        problems = [row[0] for row in db.execute("PRAGMA quick_check")]
        if problems != ["ok"]:
            raise sqlite3.DatabaseError(f"damaged: {'; '.join(problems[:3])}")
        db.execute(_SCHEMA)
        columns = {row[1] for row in db.execute("PRAGMA table_info(published)")}
        if "marker" not in columns:  # a state written before ready markers were recorded
            db.execute("ALTER TABLE published ADD COLUMN marker TEXT")
    except BaseException:
        db.close()
        raise
    return db


class StateLock:
    """An exclusive flock on a file in dirs.state, held by one `serve` for its lifetime: two
    daemons sharing one state would each sync every change, and record over each other.

    The file holds the holder's pid, for the message that refuses a second one. The kernel
    drops the lock when the holder's process ends, however it ends: nothing is ever stale.
    """

    def __init__(self, directory: Path) -> None:
        """Given the state directory, take its lock (making the directory if needed). Raise
        StartupError naming the directory and the holder's pid when another process holds
        it, OSError when the file cannot be opened."""
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.path = directory / LOCK_NAME
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            who = f"syncpro serve (pid {holder})" if holder else "another syncpro serve"
            raise StartupError(
                f"{who} already uses the state directory {directory}: every daemon needs a"
                " dirs.state of its own, or both would sync every change"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        # Best effort: the lock is what excludes, the pid only names the holder.
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd: int | None = fd

    def release(self) -> None:
        """Let another daemon use the directory; later calls do nothing."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


def fingerprint(
    dirs: Dirs,
    app: App,
    update: bool,
    ignore: Ignore,
    known: Mapping[str, tuple[str, float]] | None = None,
) -> Fingerprint | None:
    """Given an app and a mode, return a digest of its program and config sources (what a
    sync's walk reads: names, types, sizes, times, modes, owners, link targets) and their
    newest ctime (of the source folders too), or None when neither source exists. `known`
    holds the digests a sync just made of source folders (`SyncResult.digests`): those are
    not walked again."""
    parts: dict[str, str] = {}
    newest = 0.0
    names = 0
    for part, root in (
        (PROGRAM, layout.program_source(dirs, app, update)),
        (CONFIG, layout.config_source(dirs, app, update)),
    ):
        walked = (known or {}).get(str(root))
        if walked is None:
            try:
                plan = plan_path(root, None, ignore, owners=False)
            except OSError:
                # Absent, not a folder, or changing under the walk: the sync reports it.
                parts[part] = "absent"
                continue
            walked = (plan.digest, plan.newest_ctime)
            names += len(plan.entries) + 1
        # A deletion leaves no entry behind whose ctime could say when: only the ctime of
        # the folder it was in does, and the walk counts every folder's, the root's too.
        newest = max(newest, walked[1])
        parts[part] = walked[0]
    if all(digest == "absent" for digest in parts.values()):
        return None
    return Fingerprint(parts, newest, names)


def present_parts(dirs: Dirs, app: App, update: bool) -> set[str]:
    """Given an app and a mode, return the parts (program, config) whose source folder is
    there."""
    roots = ((PROGRAM, layout.program_source), (CONFIG, layout.config_source))
    return {part for part, source in roots if source(dirs, app, update).is_dir()}


def marker_signature(dirs: Dirs, app: App, update: bool, marker: str) -> str:
    """Given an app, a mode and the ready marker's name, return what identifies the marker
    files of its program and config sources as they are now (inode, mtime, ctime; "-" for
    one that is absent). Comparing two signatures needs no clock: a marker rewritten or
    replaced in between differs, whatever times its uploader gave it."""
    parts = []
    for root in (
        layout.program_source(dirs, app, update),
        layout.config_source(dirs, app, update),
    ):
        try:
            st = os.stat(root / marker)
        except OSError:
            parts.append(_ABSENT)
            continue
        parts.append(f"{st.st_ino}:{st.st_mtime_ns}:{st.st_ctime_ns}")
    return "|".join(parts)


def marker_is_new(current: str, recorded: str | None) -> bool:
    """Given the marker's signature now and the one recorded by the last sync (None if none
    was), return whether a marker exists that the last sync did not see at its start."""
    now = current.split("|")
    before = recorded.split("|") if recorded is not None else []
    before += [_ABSENT] * (len(now) - len(before))
    return any(part != _ABSENT and part != old for part, old in zip(now, before, strict=True))
