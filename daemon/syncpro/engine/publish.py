"""Swap a freshly built tree into place atomically, keep the old one for a grace period.

Every target root (softdir, configuredir) gets a hidden work area `.syncpro/` on the same
filesystem: `staging/` for trees being built, `trash/` for replaced trees waiting out their
grace period, `spare/` for one retired tree per target, `locks/` for the per-target locks
shared by every syncpro process.

A replaced tree whose grace period is over is seen by no reader any more. Rather than removed
it becomes its target's spare: stripped of the files only it held (the old versions, whose
space goes back as the grace period promised), it keeps its folders and its links to the
files the published tree still has. The next publish of the target takes the spare as its
staging tree and brings it up to date in place (tree.TreeBuilder), which for a change of one
file in thousands is one copy instead of a whole tree of folders and links made and removed.
Whoever takes a tree from `trash/` or `spare/` (a publish, a sweep) claims it first by renaming
it, so a tree is never removed under a build.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import hashlib
import os
import shutil
import stat
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import structlog

from syncpro.engine.layout import Target
from syncpro.errors import PublishError

log = structlog.get_logger()

WORK_DIR = ".syncpro"
# Marks a replaced tree set aside by the two-rename fallback; quote(safe="") turns every '+'
# of a target's name into %2B, so no staging name of a target can end like this.
_ASIDE = "+old"
# A quoted name never holds '+' either: this prefix marks a hashed one.
_HASHED = "+h"
# Room left in NAME_MAX (255 bytes) for "<pid>-<start>.<random>." before and "+old" after.
_MAX_NAME = 150
SPARE = "spare"
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100

_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = getattr(_libc, "renameat2", None)
_syncfs = getattr(_libc, "syncfs", None)
_statfs = getattr(_libc, "statfs", None)
_EXT4_MAGIC, _XFS_MAGIC = 0xEF53, 0x58465342
_ORDERED: dict[tuple[int, int], bool] = {}
# Up to this many copied files, fsync each (and the tree's root) rather than syncfs: measured
# here, 100 fsyncs of small files cost 11 ms against 2-3 ms for a syncfs of a quiet
# filesystem (and over 100 ms of one with uploads in flight); at a few files fsync wins.
FSYNC_FILES_MAX = 32


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
    """The name of a target's lock, staging and trash entries: its relative path quoted, or,
    where that would not fit in one file name with the prefixes and suffixes around it, a
    hash (recorded in the work area so a crashed fallback swap can still be put back)."""
    quoted = quote(target.rel, safe="")
    if len(quoted.encode()) <= _MAX_NAME:
        return quoted
    digest = hashlib.blake2b(target.rel.encode("utf-8", "surrogateescape"), digest_size=16)
    return f"{_HASHED}{digest.hexdigest()}"


def manifest_path(target: Target) -> Path:
    """Where the manifest of a target's published tree is kept (see walk.Manifest)."""
    return work_area(target.root) / "manifests" / _name(target)


def _record_name(target: Target, name: str) -> None:
    if not name.startswith(_HASHED):
        return
    names = work_area(target.root) / "names"
    names.mkdir(exist_ok=True)
    path = names / name
    if not path.exists():
        tmp = names / f".{name}.{os.getpid()}"
        tmp.write_bytes(target.rel.encode("utf-8", "surrogateescape"))
        os.replace(tmp, path)


def _target_of(root: Path, name: str) -> Path | None:
    if not name.startswith(_HASHED):
        return root / unquote(name)
    try:
        rel = (work_area(root) / "names" / name).read_bytes()
    except OSError:
        return None
    return root / rel.decode("utf-8", "surrogateescape")


def _owner_tag() -> str:
    """This process as staging names record it: pid and start time, so that a pid reused
    after a reboot or a wrap-around never keeps a dead process's staging alive."""
    return _tag_of(os.getpid())


@functools.lru_cache(maxsize=4)
def _tag_of(pid: int) -> str:
    # Read once per process (a fork has a pid of its own): a catch-up asks per target.
    return f"{pid}-{_start_time(pid)}"


def _start_time(pid: int) -> str:
    """The kernel's start time of a process (clock ticks since boot), or "" if unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return ""
    return fields[19].decode() if len(fields) > 19 else ""  # field 22 of proc(5)


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


def make_durable(paths: Sequence[Path], written: Sequence[Sequence[str] | None]) -> None:
    """Make the trees at `paths` durable, built by one batch of publishes. Given the files
    each build wrote (the rest of a tree being folders, symlinks and hard links to durable
    files), few of them in all, and filesystems whose journal commits metadata in order
    (ext4, XFS), fsync exactly those files and then each tree's root: a root's metadata was
    set last, so its commit carries every folder and link made before it. Otherwise, or for
    many files, one syncfs per filesystem for the whole batch: it flushes the filesystem's
    other writers too (uploads in flight), a price worth paying only when much is new.
    Batches running at once share their syncfs calls (see FlushBarrier)."""
    files = [name for names in written if names is not None for name in names]
    every_list_known = all(names is not None for names in written)
    if (
        every_list_known
        and len(files) <= FSYNC_FILES_MAX
        and all(_journal_in_order(path) for path in paths)
    ):
        for name in files:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        for path in paths:
            _fsync_dir(path)
        return
    one_per_filesystem = {os.stat(path).st_dev: path for path in paths}
    for path in one_per_filesystem.values():
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            barrier_of("syncfs", os.fstat(fd)).flush(fd)
        finally:
            os.close(fd)


class FlushBarrier:
    """Group commit of one flush (a filesystem's syncfs, a folder's fsync): a caller is done
    once a flush that started after its call has finished. While one runs, every caller
    arriving waits for the next, which one of them runs for all: a catch-up of many apps on a
    few workers costs a flush per round of publishes, not one per target (each of which
    would also wait for every other build's dirty data and force a journal commit)."""

    def __init__(self, flush: Callable[[int], None]) -> None:
        self._flush = flush
        self._cv = threading.Condition()
        self._started = 0  # flushes begun
        self._done = 0  # the last begun one that has finished
        self._running = False
        self._failed: dict[int, OSError] = {}  # by number, the flushes that failed
        self.flushes = 0  # how many ran, and callers waiting now: for tests and benchmarks
        self.waiting = 0

    def flush(self, fd: int) -> None:
        """Return once what was written before this call is flushed, by a flush of fd or of
        another descriptor of the same file (or filesystem, for syncfs). Raise the flush's
        OSError, to every caller it was to serve, if it failed."""
        with self._cv:
            # Flushes run one at a time and are numbered: the one numbered `ticket`, the next
            # to begin, is the one that serves this call.
            ticket = self._started + 1
            while self._done < ticket:
                if self._running:
                    self.waiting += 1
                    self._cv.wait()
                    self.waiting -= 1
                    continue
                self._running = True
                self._started += 1
                mine = self._started
                error: OSError | None = None
                self._cv.release()
                try:
                    self._flush(fd)
                except OSError as exc:
                    error = exc
                finally:
                    self._cv.acquire()
                    self._running = False
                    self._done = mine
                    self.flushes += 1
                    if error is not None:
                        self._failed[mine] = error
                    for old in [n for n in self._failed if n < mine - _FAILURES_KEPT]:
                        del self._failed[old]
                    self._cv.notify_all()
            failed = self._failed.get(ticket)
        if failed is not None:
            # Each caller its own exception: one object raised in several threads would
            # share (and tangle) its traceback.
            raise OSError(failed.errno, failed.strerror, failed.filename)


# Failed flushes remembered for callers not yet awake; far more than could be waiting.
_FAILURES_KEPT = 1000
_barriers: dict[tuple[str, int, int], FlushBarrier] = {}
_barriers_lock = threading.Lock()


def barrier_of(kind: str, st: os.stat_result) -> FlushBarrier:
    """The process's barrier of one flush: "syncfs" of st's filesystem, or "fsync" of the
    file or folder st describes."""
    key = (kind, st.st_dev, 0 if kind == "syncfs" else st.st_ino)
    with _barriers_lock:
        barrier = _barriers.get(key)
        if barrier is None:
            # Looked up at each flush, not now: the function named is the one that runs.
            def flush(fd: int) -> None:
                if kind == "syncfs":
                    syncfs_or_sync(fd)
                else:
                    os.fsync(fd)

            barrier = _barriers[key] = FlushBarrier(flush)
        return barrier


def syncfs_or_sync(fd: int) -> None:
    """syncfs of fd's filesystem, raising its error: since Linux 5.8 it reports a failed
    writeback (EIO, ENOSPC on thin storage), so a tree it could not flush is never reported
    published. sync() where the C library or the kernel has no syncfs."""
    if _syncfs is None:
        os.sync()
        return
    if _syncfs(fd) != 0:
        err = ctypes.get_errno()
        if err != errno.ENOSYS:
            raise OSError(err, f"syncfs: {os.strerror(err)}")
        os.sync()


def _journal_in_order(path: Path) -> bool:
    """Whether path's filesystem is one whose fsync of a folder commits all metadata written
    before it: XFS, and ext4 with its journal (by statfs's f_type). An ext4's answer is
    remembered by its fsid, which comes from its UUID: a device number is reused by the next
    filesystem mounted on it, which may not be alike."""
    buf = ctypes.create_string_buffer(256)
    if _statfs is None or _statfs(os.fsencode(path), buf) != 0:
        return False
    kind, *_, fsid_low, fsid_high = struct.unpack_from("l6Q2i", buf)
    if kind != _EXT4_MAGIC:
        return bool(kind == _XFS_MAGIC)
    known = _ORDERED.get((fsid_low, fsid_high))
    if known is None:
        known = _ORDERED[(fsid_low, fsid_high)] = ext4_journaled(os.stat(path).st_dev)
    return known


def ext4_journaled(dev: int) -> bool:
    """Whether the ext4 on device `dev` keeps a journal. One made without (`mkfs.ext4 -O
    ^has_journal`, as some VM images are) writes each folder back on its own, so an fsync of
    the tree's root would not carry the rest. Unknown counts as no journal: syncfs is always
    safe."""
    name = os.path.basename(os.path.realpath(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}"))
    try:
        with open(f"/sys/fs/ext4/{name}/journal_task", encoding="ascii") as f:
            return f.read().strip() != "<none>"
    except OSError:
        pass
    try:  # kernels before 5.11 have no journal_task: jbd2 lists the journals it runs
        return any(entry.startswith(f"{name}-") for entry in os.listdir("/proc/fs/jbd2"))
    except OSError:
        return False


def make_public_dirs(path: Path) -> None:
    """Create path and its missing parents as mode 0755 whatever the umask: the deploy step,
    often another user, must get through a target root and a group's config folder to the
    trees inside, which keep their sources' own modes. Folders that exist are left as they are."""
    missing: list[Path] = []
    here = path
    while not here.is_dir():
        missing.append(here)
        if here.parent == here:
            break
        here = here.parent
    for folder in reversed(missing):
        try:
            os.mkdir(folder)
        except FileExistsError:
            if not folder.is_dir():
                raise NotADirectoryError(
                    errno.ENOTDIR, "Not a directory (a file is in the way)", str(folder)
                ) from None
            continue  # made meanwhile by another process: theirs
        os.chmod(folder, 0o755)  # noqa: S103 - readable by the deploy step is the point


def _fsync_dir(path: Path) -> None:
    # Publishes into one folder (every program target shares its root) share the fsync.
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        barrier_of("fsync", os.fstat(fd)).flush(fd)
    finally:
        os.close(fd)


def publish(
    target: Target,
    build: Callable[[Path, Path | None], object],
    *,
    grace: float,
    durable: bool = True,
    unchanged: Callable[[Path], bool] | None = None,
    spare: bool = False,
) -> Published:
    """Given a target and a function that builds the new tree at a staging path (with the
    currently published tree to reuse from, or None), build it and swap it in atomically.
    When `unchanged(current)` says the published tree already is the new one, leave it.
    With `spare`, the staging path may hold the target's spare tree for the build to bring
    up to date; should that fail, the build runs again on a fresh staging path.
    Raise PublishError (old target intact) if building or swapping fails."""
    with locks_held() as take:
        take(target)
        staged = stage(target, build, unchanged=unchanged, spare=spare)
        if isinstance(staged, Published):
            return staged
        (done,) = commit([staged], grace=grace, durable=durable)
    if isinstance(done, PublishError):
        raise done
    return done


def lock_order(target: Target) -> tuple[str, str]:
    """The order in which every syncpro process takes the locks of several targets, one
    after the other, so that two batches sharing targets never wait on each other crosswise:
    by name, then root, which puts a group's program target before its apps' configs."""
    return (_name(target), str(target.root))


@contextlib.contextmanager
def locks_held() -> Iterator[Callable[[Target], None]]:
    """Yield a function that takes a target's lock (waiting for its holder) and keeps it until
    the block ends. Take several in `lock_order`. It raises PublishError when the target's
    work area cannot hold the lock."""
    with contextlib.ExitStack() as held:

        def take(target: Target) -> None:
            try:
                # Made readable first: the lock's folder would make the root with the umask's.
                make_public_dirs(target.root)
                held.enter_context(target_lock(target))
            except OSError as exc:
                raise _unusable(target, exc) from exc

        yield take


@dataclass
class Staged:
    """A target's new tree, built and waiting to be swapped in by `commit`."""

    target: Target
    staging: Path
    written: list[str] | None
    """The files the build copied, when it said (see make_durable)."""


def stage(
    target: Target,
    build: Callable[[Path, Path | None], object],
    *,
    unchanged: Callable[[Path], bool] | None = None,
    spare: bool = False,
) -> Staged | Published:
    """The first half of a publish, under the target's lock (locks_held), which the caller
    holds until `commit`: build the new tree at a staging path, or return an unchanged
    Published when `unchanged(current)` says the published tree already is the new one (see
    publish). Raise PublishError (old target intact) if the work area or the build fails."""
    area = work_area(target.root)
    final = target.path
    try:
        (area / "staging").mkdir(parents=True, exist_ok=True)
        (area / "trash").mkdir(parents=True, exist_ok=True)
        name = _name(target)
        _record_name(target, name)
        staging = _staging_path(area / "staging", name)
        if unchanged is not None and final.is_dir() and not final.is_symlink():
            try:
                if unchanged(final):
                    return Published(final, None, None, unchanged=True)
            except OSError:
                pass  # a source vanishing under the check: the build reports it
        claimed = spare and _claim_spare(area, name, staging)
    except OSError as exc:
        raise _unusable(target, exc) from exc
    try:
        current = final if final.is_dir() and not final.is_symlink() else None
        try:
            written = _build_at(build, staging, current)
        except OSError as exc:
            if not claimed:
                raise
            # Something in the spare stood in the way (a file we may not remove, say): it was
            # only ever a shortcut, so build the tree anew.
            log.warning("publish.spare_failed", target=str(final), error=_describe(exc))
            staging = _staging_path(staging.parent, name)
            written = _build_at(build, staging, current)
    except OSError as exc:
        raise _failure(target, exc) from exc
    # A build that returns the list of files it wrote lets make_durable flush just those.
    return Staged(target, staging, written if isinstance(written, list) else None)


def commit(
    staged: Sequence[Staged], *, grace: float, durable: bool
) -> list[Published | PublishError]:
    """The second half of a batch of publishes, their locks still held: make every staged
    tree durable at once, swap each into place, keep each replaced tree `grace` seconds,
    then make the swaps durable. Return per staged tree its Published, or the PublishError
    that left its old tree in place (a failed flush fails the whole batch)."""
    results: list[Published | PublishError] = []
    if durable and staged:
        try:
            make_durable([s.staging for s in staged], [s.written for s in staged])
        except OSError as exc:
            for item in staged:
                _remove_failed(item.staging)
            return [_failure(item.target, exc) for item in staged]
    swapped: list[tuple[int, Path]] = []
    for item in staged:
        try:
            results.append(_swap_in(item, grace))
            swapped.append((len(results) - 1, item.target.path.parent))
        except OSError as exc:
            results.append(_failure(item.target, exc))
    if durable:
        # The trash needs no flush of its own: a replaced tree a crash leaves in the staging
        # area is removed by the next start all the same.
        for parent, indexes in _parents_to_flush(swapped).items():
            try:
                _fsync_dir(parent)
            except OSError as exc:
                for i in indexes:
                    results[i] = _failure(staged[i].target, exc)
    return results


def _swap_in(item: Staged, grace: float) -> Published:
    final = item.target.path
    try:
        make_public_dirs(final.parent)
        if not os.path.lexists(final):
            os.rename(item.staging, final)
            return Published(final, None, None)
        replaced = _swap(item.staging, final)
    except OSError:
        # Nothing was swapped: the new tree would wait in staging for ever, its owner (this
        # process, a daemon) alive for the sweep.
        _remove_failed(item.staging)
        raise
    # The new tree is published from here on, whatever becomes of the old one.
    return _park(item.target, replaced, grace)


def _park(target: Target, replaced: Path, grace: float) -> Published:
    """Move a tree just replaced (now at `replaced`, in the staging area) to the trash, where
    it waits out the grace period; make the trash folder if it has gone. Where it cannot be
    moved (the trash is no folder, say), it stays in the staging area, which the sweep
    clears once this process has ended: logged, but the publish has succeeded."""
    final = target.path
    expires = time.time() + grace
    trash = work_area(target.root) / "trash"
    parked = trash / f"{expires:.3f}.{_name(target)}.{os.urandom(4).hex()}"
    try:
        try:
            os.rename(replaced, parked)
        except FileNotFoundError:
            trash.mkdir(exist_ok=True)
            os.rename(replaced, parked)
    except OSError as exc:
        log.warning(
            "publish.park_failed",
            target=str(final),
            replaced=str(replaced),
            trash=str(trash),
            error=_describe(exc),
        )
        return Published(final, None, None)
    return Published(final, parked, expires)


def _parents_to_flush(swapped: Sequence[tuple[int, Path]]) -> dict[Path, list[int]]:
    """The folders whose fsync makes the swaps durable, each with the swaps it covers. On a
    filesystem whose journal commits in order, one: the folder of its last swap, whose
    commit carries every rename before it. Elsewhere, every folder a swap renamed into."""
    flush: dict[Path, list[int]] = {}
    last_in_order: dict[int, Path] = {}
    by_device: dict[int, list[int]] = {}
    for index, parent in swapped:
        if _journal_in_order(parent):
            device = os.stat(parent).st_dev
            last_in_order[device] = parent
            by_device.setdefault(device, []).append(index)
        else:
            flush.setdefault(parent, []).append(index)
    for device, parent in last_in_order.items():
        flush.setdefault(parent, []).extend(by_device[device])
    return flush


def _unusable(target: Target, exc: OSError) -> PublishError:
    area = work_area(target.root)
    return PublishError(
        f"cannot publish {target.path}: its work area {area} is unusable: {_describe(exc)}"
    )


def _failure(target: Target, exc: OSError) -> PublishError:
    error = PublishError(
        f"cannot publish {target.path}: {_describe(exc)}{_space_hint(exc, target)}"
    )
    error.__cause__ = exc
    return error


def _staging_path(staging_dir: Path, name: str) -> Path:
    return staging_dir / f"{_owner_tag()}.{os.urandom(4).hex()}.{name}"


def _claim_spare(area: Path, name: str, staging: Path) -> bool:
    """Move a spare tree of the target named `name` to staging: the one a sweep retired,
    else a replaced tree of it whose grace period is over. Return whether one was moved."""
    if _claim(area / SPARE / name, staging):
        return True
    now = time.time()
    for entry in _entries(area / "trash"):
        expires = _expiry(entry.name)
        expired = expires is not None and expires <= now
        if expired and _trashed_name(entry.name) == name and _claim(entry, staging):
            return True
    return False


def _claim(tree: Path, to: Path) -> bool:
    """Take a tree by renaming it: of all who try at once, one succeeds."""
    try:
        os.rename(tree, to)
    except FileNotFoundError:
        return False
    except OSError as exc:
        log.warning("publish.spare_unusable", path=str(tree), error=_describe(exc))
        return False
    return True


def _trashed_name(entry: str) -> str | None:
    """The target name in a trash entry's name, <expiry seconds>.<ms>.<name>.<random>."""
    parts = entry.split(".", 2)
    return parts[2].rpartition(".")[0] or None if len(parts) == 3 else None


def _build_at(
    build: Callable[[Path, Path | None], object], staging: Path, current: Path | None
) -> object:
    """Run a build; remove what it leaves if it fails."""
    try:
        return build(staging, current)
    except BaseException:
        _remove_failed(staging)
        raise


def _remove_failed(staging: Path) -> None:
    try:
        _remove(staging)
    except OSError as cleanup:
        # The build's own error is the one to report; the next sweep retries this.
        log.warning("publish.cleanup_failed", path=str(staging), error=_describe(cleanup))


def _space_hint(exc: OSError, target: Target) -> str:
    """For a full filesystem (or quota), name it, what is free and what a publish needs."""
    if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
        return ""
    try:
        vfs = os.statvfs(target.root)
    except OSError:
        return ""
    free = vfs.f_bavail * vfs.f_frsize
    return (
        f"; the filesystem of {target.root} has {free // (1 << 20)} MiB and {vfs.f_favail}"
        " inodes free for this user, and must hold the new tree next to the old one, kept"
        " for the grace period (files unchanged since the last publish are hard links and"
        " take no room)"
    )


def _swap(staging: Path, final: Path) -> Path:
    """Swap staging into final; return where the old tree is now."""
    try:
        exchange(staging, final)
        return staging
    except OSError as exc:
        if exc.errno not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
            raise
    # No RENAME_EXCHANGE here: two renames, with a moment where final does not exist.
    aside = staging.with_name(staging.name + _ASIDE)
    os.rename(final, aside)
    os.rename(staging, final)  # a crash right before this: the sweep puts `aside` back
    return aside


def _describe(exc: OSError) -> str:
    where = f" ({exc.filename})" if exc.filename else ""
    return f"{exc.strerror or exc}{where}"


def _remove(path: Path) -> None:
    """Remove a tree of ours, including read-only directories in it (a source's mode 0555
    directory is published as such; without write permission its entries cannot go)."""
    with contextlib.suppress(FileNotFoundError):
        if path.is_dir() and not path.is_symlink():
            if sys.version_info >= (3, 12):
                shutil.rmtree(path, onexc=_unprotect_and_retry)
            else:
                shutil.rmtree(path, onerror=lambda f, p, info: _unprotect_and_retry(f, p, info[1]))
        else:
            path.unlink()


def _unprotect_and_retry(func: Callable[..., Any], path: str, exc: BaseException) -> None:
    if isinstance(exc, FileNotFoundError):
        return
    if not isinstance(exc, PermissionError):
        raise exc
    parent = os.path.dirname(path)
    os.chmod(parent, stat.S_IMODE(os.lstat(parent).st_mode) | stat.S_IRWXU)
    if func in (os.unlink, os.remove, os.rmdir):
        func(path)
        return
    # The directory itself could not be opened or listed: open it up and remove it whole.
    os.chmod(path, stat.S_IMODE(os.lstat(path).st_mode) | stat.S_IRWXU)
    _remove(Path(path))


def _owner_alive(tag: str) -> bool:
    pid_text, _, started = tag.partition("-")
    if not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return started in ("", _start_time(pid))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    return not started or _start_time(pid) in ("", started)


def sweep(root: Path, now: float | None = None) -> list[Path]:
    """Given a target root, retire replaced trees whose grace period is over (each becomes
    its target's spare, or is removed where the target has one), remove spares of targets
    that are gone and staging trees left by processes that no longer run (a crash, kill -9);
    a tree the two-rename fallback had set aside when its process died is put back where its
    target is missing. Return what was retired, removed or restored. Never raises: what
    cannot be removed is logged and retried by the next sweep."""
    now = time.time() if now is None else now
    area = work_area(root)
    removed: list[Path] = []
    expired = [e for e in _entries(area / "trash") if (_expiry(e.name) or 0.0) <= now]
    if expired:
        try:
            # Where a tree is claimed before it is retired; a fresh work area may lack it.
            (area / "staging").mkdir(exist_ok=True)
        except OSError as exc:
            log.warning("publish.sweep_failed", path=str(area / "staging"), error=_describe(exc))
            expired = []
    for entry in expired:
        if _retire(area, entry):
            removed.append(entry)
    for entry in _entries(area / SPARE):
        final = _target_of(root, entry.name)
        if final is None or not os.path.lexists(final):
            claimed = _staging_path(area / "staging", entry.name)
            # The spare folder exists, so its work area's staging folder does too.
            if _claim(entry, claimed) and _try_remove(claimed):
                removed.append(entry)
    for entry in _entries(area / "staging"):
        if _owner_alive(entry.name.split(".", 1)[0]):
            continue
        aside = entry.name.endswith(_ASIDE)
        if _restore_aside(root, entry) if aside else _try_remove(entry):
            removed.append(entry)
    if removed:
        log.info("publish.swept", root=str(root), removed=[str(p) for p in removed])
    return removed


def _retire(area: Path, tree: Path) -> bool:
    """Make a replaced tree past its grace period its target's spare, stripped of the files
    no other tree shares; remove it instead where the target has a spare already. Return
    whether the tree left the trash."""
    name = _trashed_name(tree.name)
    claimed = _staging_path(area / "staging", name or "tree")
    if not _claim(tree, claimed):
        return False  # a publish took it as its spare, or another sweep has it
    spare = area / SPARE / name if name else None
    if spare is not None and not os.path.lexists(spare) and _prune(claimed):
        try:
            spare.parent.mkdir(exist_ok=True)
            os.rename(claimed, spare)
            return True
        except OSError:
            pass  # another sweep retired one first: ours goes
    return _try_remove(claimed)


def _prune(tree: Path) -> bool:
    """Remove the files of a tree that no other tree links to (its link count is one): the
    old versions, what the grace period was for. Symlinks stay (they hold no data, and a
    removal would move their folder's mtime, which makes the next build fill that folder
    again: see TreeBuilder._keep_subtree). Return whether all went; if not, the caller
    removes the whole tree."""

    def fail(exc: OSError) -> None:
        raise exc

    try:
        for _, _, files, dir_fd in os.fwalk(tree, onerror=fail, follow_symlinks=False):
            for name in files:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                if st.st_nlink == 1 and not stat.S_ISLNK(st.st_mode):
                    os.unlink(name, dir_fd=dir_fd)
    except OSError as exc:
        log.warning("publish.prune_failed", path=str(tree), error=_describe(exc))
        return False
    return True


def _entries(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except FileNotFoundError:
        return []
    except OSError as exc:
        log.warning("publish.sweep_failed", path=str(folder), error=_describe(exc))
        return []


def _try_remove(path: Path) -> bool:
    try:
        _remove(path)
    except OSError as exc:
        log.warning("publish.sweep_failed", path=str(path), error=_describe(exc))
        return False
    return True


def _restore_aside(root: Path, aside: Path) -> bool:
    """Put back an old tree the two-rename fallback had moved aside, if its target is
    missing (the process died between the renames); else remove it. Return whether done."""
    parts = aside.name[: -len(_ASIDE)].split(".", 2)
    if len(parts) < 3:
        return _try_remove(aside)
    final = _target_of(root, parts[2])
    if final is None or os.path.lexists(final):
        return _try_remove(aside)
    try:
        os.rename(aside, final)
    except OSError as exc:
        log.warning("publish.restore_failed", path=str(aside), error=_describe(exc))
        return False
    log.warning("publish.restored", target=str(final), tree=str(aside))
    return True


def next_expiry(root: Path) -> float | None:
    """Return when the next replaced tree under root may be removed, or None if none waits."""
    times: list[float] = []
    # A root that is missing or no folder holds nothing to remove: the sync reports it.
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in (work_area(root) / "trash").iterdir():
            times.append(_expiry(entry.name) or 0.0)
    return min(times) if times else None


def _expiry(name: str) -> float | None:
    head = name.split(".", 2)
    try:
        return float(f"{head[0]}.{head[1]}")
    except (ValueError, IndexError):
        return None


def sweep_later(roots: list[Path]) -> int | None:
    """Leave a detached process that removes replaced trees once their grace period ends,
    so a one-shot `syncpro sync` returns at once yet readers keep a whole old tree. Return
    its pid, or None when nothing waits. Raise OSError if it cannot be started."""
    pending = [str(r) for r in roots if next_expiry(r) is not None]
    if not pending:
        return None
    # posix_spawn, not Popen: nobody waits for this process, and a Popen object dropped while
    # its child runs is a ResourceWarning in the caller.
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        return os.posix_spawn(
            sys.executable,
            [sys.executable, "-m", "syncpro.engine.sweeper", *pending],
            dict(os.environ),
            file_actions=[(os.POSIX_SPAWN_DUP2, null, fd) for fd in (0, 1, 2)],
            setsid=True,
        )
    finally:
        os.close(null)
