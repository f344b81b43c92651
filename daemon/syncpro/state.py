"""What the daemon last published, per app and mode, so a restart re-syncs only changes."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from syncpro import layout
from syncpro.config import Dirs
from syncpro.inventory import App
from syncpro.tree import Ignore

_SCHEMA = """
CREATE TABLE IF NOT EXISTS published (
    app_key TEXT NOT NULL,
    mode INTEGER NOT NULL,
    fingerprint TEXT NOT NULL,
    published_at REAL NOT NULL,
    PRIMARY KEY (app_key, mode)
)
"""


@dataclass(frozen=True)
class Fingerprint:
    """A digest of an app's sources in one mode, and the newest change time seen in them."""

    digest: str
    newest: float


@dataclass(frozen=True)
class Record:
    fingerprint: str
    published_at: float


class StateStore:
    """A small sqlite database in dirs.state, safe to share between the daemon's threads."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / "state.sqlite3"
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(_SCHEMA)

    def get(self, app_key: str, update: bool) -> Record | None:
        with self._lock:
            row = self._db.execute(
                "SELECT fingerprint, published_at FROM published WHERE app_key=? AND mode=?",
                (app_key, int(update)),
            ).fetchone()
        return Record(row[0], row[1]) if row else None

    def record(self, app_key: str, update: bool, fingerprint: str, at: float | None = None) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO published VALUES (?, ?, ?, ?)",
                (app_key, int(update), fingerprint, time.time() if at is None else at),
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()


def fingerprint(dirs: Dirs, app: App, update: bool, ignore: Ignore) -> Fingerprint | None:
    """Given an app and a mode, return a digest of its program and config sources (names,
    types, sizes, mtimes, modes, link targets), or None when neither source exists."""
    digest = hashlib.blake2b(digest_size=16)
    newest = 0.0
    found = False
    for kind, root in (
        ("program", layout.program_source(dirs, app, update)),
        ("config", layout.config_source(dirs, app, update)),
    ):
        if not root.is_dir():
            digest.update(f"{kind}:absent\0".encode())
            continue
        found = True
        digest.update(f"{kind}:\0".encode())
        for rel, st, link in _walk(root, ignore):
            newest = max(newest, st.st_mtime)
            digest.update(
                f"{rel}\0{st.st_mode}\0{st.st_size}\0{st.st_mtime_ns}\0{link}\0".encode(
                    "utf-8", "surrogateescape"
                )
            )
    return Fingerprint(digest.hexdigest(), newest) if found else None


def _walk(root: Path, ignore: Ignore) -> list[tuple[str, os.stat_result, str]]:
    found: list[tuple[str, os.stat_result, str]] = []
    stack = [("", str(root))]
    while stack:
        rel, path = stack.pop()
        try:
            with os.scandir(path) as entries:
                listing = sorted(entries, key=lambda e: e.name)
        except OSError:
            continue  # vanished or unreadable: the sync itself reports it
        for entry in listing:
            entry_rel = f"{rel}/{entry.name}" if rel else entry.name
            if ignore(entry.name, entry_rel):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
                link = os.readlink(entry.path) if stat.S_ISLNK(st.st_mode) else ""
            except OSError:
                continue
            found.append((entry_rel, st, link))
            if stat.S_ISDIR(st.st_mode):
                stack.append((entry_rel, entry.path))
    found.sort(key=lambda item: item[0])
    return found
