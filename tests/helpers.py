"""Builders shared by the in-process tests (engine, publish, tree, CLI, property): trees of
every kind of entry, snapshots of them, and configs loaded as the CLI loads them. The config
builder and `wait_until` are the harness's (syncpro.testing), re-exported here."""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import stat
import subprocess
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from syncpro.config.load import load_config
from syncpro.config.model import Config
from syncpro.engine import layout
from syncpro.engine.publish import target_lock, work_area
from syncpro.engine.request import SyncRequest
from syncpro.engine.result import SyncResult
from syncpro.engine.sync import run_sync
from syncpro.testing import app as app
from syncpro.testing import config_doc, group, write_doc
from syncpro.testing import wait_until as wait_until

# A fixed past time, so copied mtimes can never be confused with "now".
BASE_NS = 1_600_000_000_000_000_000


@dataclass(frozen=True)
class Symlink:
    """A symbolic link to `target`, written as is (it may dangle or point outside)."""

    target: str


@dataclass(frozen=True)
class File:
    """A regular file with optional mode and mtime (ns)."""

    content: str | bytes = ""
    mode: int | None = None
    mtime_ns: int | None = None


@dataclass(frozen=True)
class Dir:
    """A directory (possibly empty) with optional mode and mtime (ns), applied last."""

    mode: int | None = None
    mtime_ns: int | None = None


@dataclass(frozen=True)
class Fifo:
    """A named pipe: a copy that opened it would block for ever."""


Entry = str | bytes | File | Dir | Symlink | Fifo


SERVER_GROUP = tuple(group("server", "server1", "server2"))
# Two apps in two groups: the daemon tests' `base` fixture holds their sources.
TWO_APPS = [app("server1", "server"), app("web1", "web")]

# The five dirs under var/ next to config.yml, as the shipped config has them.
VAR_DIRS = {
    "remotecomdir": "var/remotecomdir",
    "updatedir": "var/updatedir",
    "softdir": "var/softdir",
    "configuredir": "var/configuredir",
    "state": "var/state",
}


def config_dict(
    apps: Iterable[Mapping[str, Any]],
    *,
    grace: float = 10,
    fsync: bool = False,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Return a config.yml document with every dir under `var/` next to the file, for the
    in-process engine and the one-shot CLI (no daemon timings)."""
    defaults = {"publish": {"grace": grace, "fsync": fsync}}
    return config_doc(apps, layout=VAR_DIRS, defaults=defaults, **(extra or {}))


write_config = write_doc


def make_config(
    tmp_path: Path,
    apps: Iterable[Mapping[str, Any]],
    *,
    grace: float = 10,
    fsync: bool = False,
    extra: Mapping[str, Any] | None = None,
) -> Config:
    """Write `tmp_path/config.yml` for `apps` and return it loaded, as the CLI would."""
    doc = config_dict(apps, grace=grace, fsync=fsync, extra=extra)
    return load_config(write_config(tmp_path / "config.yml", doc))


def sync(config: Config, k: str, *, update: bool = False) -> SyncResult:
    """Run the engine in-process on the config's own inventory."""
    return run_sync(SyncRequest(k=k, update=update), config, config.config_inventory)


def _app(config: Config, key: str) -> Any:
    return config.config_inventory.by_key()[key]


def program_source(config: Config, key: str, *, update: bool = False) -> Path:
    return layout.program_source(config.dirs, _app(config, key), update)


def config_source(config: Config, key: str, *, update: bool = False) -> Path:
    return layout.config_source(config.dirs, _app(config, key), update)


def program_target(config: Config, key: str) -> Path:
    return layout.program_target(config.dirs, _app(config, key)).path


def config_target(config: Config, key: str) -> Path:
    return layout.config_target(config.dirs, _app(config, key)).path


def write_tree(root: Path, spec: Mapping[str, Entry]) -> Path:
    """Create `root` and the entries of spec (relative path → content or entry). Parents are
    made as needed; Dir metadata is applied after every entry is written."""
    root.mkdir(parents=True, exist_ok=True)
    dirs: list[tuple[Path, Dir]] = []
    for rel, entry in spec.items():
        path = root / rel
        if isinstance(entry, Dir):
            path.mkdir(parents=True, exist_ok=True)
            dirs.append((path, entry))
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(entry, Symlink):
            os.symlink(entry.target, path)
        elif isinstance(entry, Fifo):
            os.mkfifo(path)
        else:
            file = entry if isinstance(entry, File) else File(entry)
            data = file.content.encode() if isinstance(file.content, str) else file.content
            path.write_bytes(data)
            if file.mode is not None:
                os.chmod(path, file.mode)
            if file.mtime_ns is not None:
                os.utime(path, ns=(file.mtime_ns, file.mtime_ns))
    for path, entry in sorted(dirs, key=lambda d: len(d[0].parts), reverse=True):
        if entry.mode is not None:
            os.chmod(path, entry.mode)
        if entry.mtime_ns is not None:
            os.utime(path, ns=(entry.mtime_ns, entry.mtime_ns))
    return root


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISLNK(mode):
        return "link"
    if stat.S_ISFIFO(mode):
        return "fifo"
    return "other"


def snapshot(root: Path, *, identity: bool = False) -> dict[str, tuple[Any, ...]]:
    """Return rel path → (type, mode, content or link target, mtime_ns, uid, gid) for root
    ("." is root itself) and everything under it, never following links or opening specials.
    With identity, add (inode, link count, ctime_ns): proof that nothing was linked, moved
    or modified."""
    found: dict[str, tuple[Any, ...]] = {}

    def record(rel: str, path: str) -> os.stat_result:
        st = os.lstat(path)
        kind = _kind(st.st_mode)
        data: Any = None
        if kind == "file":
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            with os.fdopen(fd, "rb") as handle:
                data = handle.read()
        elif kind == "link":
            data = os.readlink(path)
        row: tuple[Any, ...] = (
            kind,
            stat.S_IMODE(st.st_mode),
            data,
            st.st_mtime_ns,
            st.st_uid,
            st.st_gid,
        )
        if identity:
            row += (st.st_ino, st.st_nlink, st.st_ctime_ns)
        found[rel] = row
        return st

    record(".", str(root))
    stack = [("", str(root))]
    while stack:
        rel, path = stack.pop()
        for name in os.listdir(path):
            entry_rel = f"{rel}/{name}" if rel else name
            entry_path = os.path.join(path, name)
            st = record(entry_rel, entry_path)
            if stat.S_ISDIR(st.st_mode):
                stack.append((entry_rel, entry_path))
    return found


def inodes(root: Path) -> dict[str, int]:
    """Return rel path → inode of every regular file under root."""
    found: dict[str, int] = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                found[os.path.relpath(path, root)] = st.st_ino
    return found


def without_dac_override(*args: str) -> list[str]:
    """A command line that runs as root yet obeys file modes, as a deploy user would."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to drop CAP_DAC_OVERRIDE")
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--", *args]


@contextlib.contextmanager
def holding(root: Path, rel: str) -> Iterator[Path]:
    """Hold the publish lock of the target `rel` under root (softdir or configuredir) as
    another syncpro process would: a sync of it waits, in the middle, until the block ends.
    Yield the lock file, for `Daemon.waits_for_lock`."""
    target = layout.Target(root, rel)
    with target_lock(target):
        yield work_area(root) / "locks" / f"{quote(rel, safe='')}.lock"


def read_terminal(main: int, timeout: float = 60.0) -> bytes:
    """Given the main side of a pseudo-terminal, read all a program writes to its side until
    the last writer has gone; fail if it is still writing after timeout seconds."""
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    while True:
        ready, _, _ = select.select([main], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, f"syncpro did not finish writing to the terminal within {timeout:.0f} s"
        try:
            chunk = os.read(main, 4096)
        except OSError:  # EIO: the last writer of the terminal has gone
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def limit_inotify_instances(pid: int, instances: int) -> None:
    """Set max_inotify_instances in the user namespace of process pid (made by unshare -U)."""
    subprocess.run(
        [
            "nsenter",
            "-U",
            "-t",
            str(pid),
            "sh",
            "-c",
            f"echo {instances} > /proc/sys/user/max_inotify_instances",
        ],
        check=True,
    )
