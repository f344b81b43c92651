"""Swap a freshly built tree into place atomically, keep the old one for a grace period.

Every target root (softdir, configuredir) gets a hidden work area `.syncpro/` on the same
filesystem: `staging/` for trees being built, `trash/` for replaced trees waiting out their
grace period, `locks/` for the per-target locks shared by every syncpro process.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import structlog

from syncpro.errors import PublishError
from syncpro.layout import Target

log = structlog.get_logger()

WORK_DIR = ".syncpro"
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100

_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = getattr(_libc, "renameat2", None)
_syncfs = getattr(_libc, "syncfs", None)


@dataclass(frozen=True)
class Published:
    """The outcome of one swap: where the replaced tree waits, and until when."""

    target: Path
    replaced: Path | None
    expires: float | None
    unchanged: bool = False


def work_area(root: Path) -> Path:
    return root / WORK_DIR


def _name(target: Target) -> str:
    return quote(target.rel, safe="")


@contextlib.contextmanager
def target_lock(target: Target) -> Iterator[None]:
    """Hold the lock of one target; wait for another process or thread that holds it."""
    locks = work_area(target.root) / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    fd = os.open(locks / f"{_name(target)}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a fresh open file description: threads exclude too
        yield
    finally:
        os.close(fd)


def exchange(a: Path, b: Path) -> None:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE)."""
    if _renameat2 is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    rc = _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(a), None, str(b))


def make_durable(path: Path) -> None:
    """Flush everything written on path's filesystem (one syncfs, not an fsync per file)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _syncfs is None or _syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(
    target: Target,
    build: Callable[[Path, Path | None], None],
    *,
    grace: float,
    durable: bool = True,
    unchanged: Callable[[Path], bool] | None = None,
) -> Published:
    """Given a target and a function that builds the new tree at a staging path (with the
    currently published tree to reuse from, or None), build it and swap it in atomically.
    When `unchanged(current)` says the published tree already is the new one, leave it.
    Raise PublishError (old target intact) if building or swapping fails."""
    area = work_area(target.root)
    staging_dir, trash_dir = area / "staging", area / "trash"
    staging_dir.mkdir(parents=True, exist_ok=True)
    trash_dir.mkdir(parents=True, exist_ok=True)
    staging = staging_dir / f"{os.getpid()}.{os.urandom(4).hex()}.{_name(target)}"
    with target_lock(target):
        final = target.path
        if unchanged is not None and final.is_dir() and not final.is_symlink():
            try:
                if unchanged(final):
                    return Published(final, None, None, unchanged=True)
            except OSError:
                pass  # a source vanishing under the check: the build reports it
        return _build_and_swap(target, build, staging, trash_dir, grace, durable)


def _build_and_swap(
    target: Target,
    build: Callable[[Path, Path | None], None],
    staging: Path,
    trash_dir: Path,
    grace: float,
    durable: bool,
) -> Published:
    final = target.path
    try:
        current = final if final.is_dir() and not final.is_symlink() else None
        try:
            build(staging, current)
            if durable:
                make_durable(staging)
        except BaseException:
            _remove(staging)
            raise
        final.parent.mkdir(parents=True, exist_ok=True)
        if os.path.lexists(final):
            replaced = _swap(staging, final)
            expires = time.time() + grace
            parked = trash_dir / f"{expires:.3f}.{_name(target)}.{os.urandom(4).hex()}"
            os.rename(replaced, parked)
            if durable:
                _fsync_dir(final.parent)
                _fsync_dir(trash_dir)
            return Published(final, parked, expires)
        os.rename(staging, final)
        if durable:
            _fsync_dir(final.parent)
        return Published(final, None, None)
    except OSError as exc:
        raise PublishError(f"cannot publish {final}: {_describe(exc)}") from exc


def _swap(staging: Path, final: Path) -> Path:
    """Swap staging into final; return where the old tree is now."""
    try:
        exchange(staging, final)
        return staging
    except OSError as exc:
        if exc.errno not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
            raise
    # No RENAME_EXCHANGE here: two renames, with a moment where final does not exist.
    aside = staging.with_name(staging.name + ".old")
    os.rename(final, aside)
    os.rename(staging, final)
    return aside


def _describe(exc: OSError) -> str:
    where = f" ({exc.filename})" if exc.filename else ""
    return f"{exc.strerror or exc}{where}"


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep(root: Path, now: float | None = None) -> list[Path]:
    """Given a target root, remove replaced trees whose grace period is over and staging
    trees left by processes that no longer run (a crash, kill -9). Return what was removed."""
    now = time.time() if now is None else now
    area = work_area(root)
    removed: list[Path] = []
    with contextlib.suppress(FileNotFoundError):
        for entry in (area / "trash").iterdir():
            expires = _expiry(entry.name)
            if expires is None or expires <= now:
                _remove(entry)
                removed.append(entry)
    with contextlib.suppress(FileNotFoundError):
        for entry in (area / "staging").iterdir():
            head = entry.name.split(".", 1)[0]
            pid = int(head) if head.isdigit() else 0
            if pid != os.getpid() and not _pid_alive(pid):
                _remove(entry)
                removed.append(entry)
    if removed:
        log.info("publish.swept", root=str(root), removed=[str(p) for p in removed])
    return removed


def next_expiry(root: Path) -> float | None:
    """Return when the next replaced tree under root may be removed, or None if none waits."""
    times: list[float] = []
    with contextlib.suppress(FileNotFoundError):
        for entry in (work_area(root) / "trash").iterdir():
            times.append(_expiry(entry.name) or 0.0)
    return min(times) if times else None


def _expiry(name: str) -> float | None:
    head = name.split(".", 2)
    try:
        return float(f"{head[0]}.{head[1]}")
    except (ValueError, IndexError):
        return None


def sweep_later(roots: list[Path]) -> None:
    """Leave a detached process that removes replaced trees once their grace period ends,
    so a one-shot `syncpro sync` returns at once yet readers keep a whole old tree."""
    pending = [str(r) for r in roots if next_expiry(r) is not None]
    if not pending:
        return
    subprocess.Popen(
        [sys.executable, "-m", "syncpro.sweeper", *pending],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
    )
