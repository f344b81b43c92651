"""Build an exact copy of a source tree in a staging directory, reusing unchanged files.

The source is walked once (`walk.plan_tree`, by folder descriptors); a file the walk found
unchanged in the published tree is hard-linked from it instead of copied, so a sync where one
file of thousands changed costs one walk, links and one copy. Sources are always read, never
linked or modified. Folders are created and filled through descriptors too: a symlink swapped
into the source between the walk and the copy fails the sync, it never leads the copy elsewhere.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import shutil
import stat
import zlib
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from syncpro.engine.copy import clear_inherited, copy_data, finish_metadata
from syncpro.engine.ignore import Ignore
from syncpro.engine.walk import (
    Entry,
    Manifest,
    TreePlan,
    Xattrs,
    open_beneath,
    open_dir,
    open_listed_dir,
    plan_tree,
    read_xattrs,
    special_kind,
)
from syncpro.engine.writeback import Writeback

__all__ = [
    "CopyStats",
    "Ignore",
    "ListedFileError",
    "Share",
    "TreeBuilder",
    "make_root",
    "resolve_listed",
]

log = structlog.get_logger()

_OPEN_SOURCE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_OPEN_TARGET = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW

# A folder's files are one job. It runs on a pool of the build's own, while the walking
# thread goes on making folders, when the files it copies are big: copy_file_range then runs
# long without the interpreter lock, and two threads on two cores copy in less time than one
# (`cp -a` has one). For small files a thread spends its time around a dozen short system
# calls per file, handing the lock back and forth at each, and the pool is slower than the
# walking thread alone. Measured on 2 cores (a fresh tree of 200 MB, pool vs inline): files
# of 16 KiB 1.50x, 64 KiB 1.08x, 256 KiB 0.75x, 1 MiB 0.66x; hence this average.
POOL_MIN_AVERAGE = 128 * 1024
FILE_WORKERS = 2
# Folders whose jobs may be in flight at once: each holds three descriptors until its job ends.
_IN_FLIGHT = 16


Progress = Callable[[str, int, int], None]
"""Told of a build as it goes: ("planned", files, bytes) for the regular files it will make,
then ("copied", 1, size) or ("linked", files, bytes) as they are made, a folder kept whole
from a spare in one call. Called on the building thread. Counts come in bulk because a call
per file cost 6 % of a daemon's sync of 5,000 files with one changed."""


@dataclass
class Tally:
    """What a Progress is told, counted: files and bytes planned and made so far. Not
    locked: its owner counts under its own lock (builds call from several threads)."""

    files_total: int = 0
    bytes_total: int = 0
    files_done: int = 0
    bytes_done: int = 0

    def count(self, event: str, files: int, size: int) -> bool:
        """Count one Progress event; return whether it said files were made."""
        if event == "planned":
            # A tree's files are all planned before the first is made: the total is whole
            # by the time anything is shown with it.
            self.files_total += files
            self.bytes_total += size
            return False
        self.files_done += files
        self.bytes_done += size
        return True


class ListedFileError(Exception):
    """A type-2 config list names files that are missing or outside the source."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


@dataclass
class CopyStats:
    """What building one tree did."""

    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    copied: int = 0
    linked: int = 0
    bytes_copied: int = 0
    hardlinks: int = 0
    skipped: list[str] = field(default_factory=list)
    # Attributes the target filesystem (or this user) could not hold, each named with its path.
    not_kept: list[str] = field(default_factory=list)

    def add(self, other: CopyStats) -> None:
        """Add what another part of the same build did (a job of the file pool)."""
        self.files += other.files
        self.dirs += other.dirs
        self.symlinks += other.symlinks
        self.copied += other.copied
        self.linked += other.linked
        self.bytes_copied += other.bytes_copied
        self.hardlinks += other.hardlinks
        self.skipped.extend(other.skipped)
        self.not_kept.extend(other.not_kept)

    def as_dict(self) -> dict[str, object]:
        doc: dict[str, object] = {
            "files": self.files,
            "dirs": self.dirs,
            "symlinks": self.symlinks,
            "copied": self.copied,
            "linked": self.linked,
            "bytes_copied": self.bytes_copied,
            "skipped": list(self.skipped),
        }
        if self.hardlinks:
            doc["hardlinks"] = self.hardlinks
        if self.not_kept:
            doc["not_kept"] = list(self.not_kept)
        return doc


@dataclass(frozen=True)
class Share:
    """One of `count` builds making one fresh tree at once, on processes of their own: this
    one is number `index`. Each walks the whole source and makes every folder (whichever
    comes first), but only its share of the files: a name's share follows from its path
    alone, so builds whose walks saw different trees (a source changing meanwhile) still
    never both make one name. All names of a multiply linked file are one share, so that
    they become links to one copy. Folders get their attributes from whoever started the
    builds once all are done (see TreeBuilder.finish_folders): only then are they filled."""

    index: int
    count: int

    def owns(self, rel: str, st: os.stat_result | None = None) -> bool:
        """Whether the name rel (of stat st, for a file) is this build's to make."""
        if st is not None and st.st_nlink > 1 and stat.S_ISREG(st.st_mode):
            key = st.st_ino
        else:
            key = zlib.crc32(rel.encode("utf-8", "surrogateescape"))
        return key % self.count == self.index


Folder = tuple[str, os.stat_result, Xattrs]
"""A folder of a shared build, its attributes not given yet: its path, the source's stat
and extended attributes."""


@dataclass
class _Dir:
    """A folder being filled: its source, staging and published descriptors."""

    src: int
    dst: int
    pub: int | None
    st: os.stat_result
    xattrs: Xattrs
    rel: str
    staged: str  # its staging path, for the list of files written
    files: list[Entry] = field(default_factory=list)  # its files and symlinks, made by a job
    job: Future[_Made] | None = None
    # In a spare tree brought up to date: what the folder held, name -> (inode, is a folder),
    # and the names of the subfolders the source has. None for a folder made new.
    held: dict[str, tuple[int, bool]] | None = None
    subdirs: list[str] = field(default_factory=list)


@dataclass
class _Made:
    """What one job made: counted apart from the build's totals and added by its thread."""

    stats: CopyStats = field(default_factory=CopyStats)
    written: list[str] = field(default_factory=list)
    manifest: dict[str, tuple[int, int, int]] = field(default_factory=dict)


class TreeBuilder:
    """Copies sources into a new staging tree, hard-linking files unchanged since `reuse`."""

    def __init__(
        self,
        *,
        ignore: Ignore,
        reuse: Path | None,
        preserve_owner: bool,
        progress: Progress | None = None,
        durable: bool = False,
        share: Share | None = None,
    ) -> None:
        self.ignore = ignore
        self.progress = progress
        self.reuse = reuse
        self.preserve_owner = preserve_owner
        # For a publish that will flush the tree: copy_tree writes its data out as it goes.
        self.durable = durable
        self.writeback: Writeback | None = None
        self.stats = CopyStats()
        # The last walk of a whole tree: its digest is what the daemon records as published.
        self.last_plan: TreePlan | None = None
        # Staging paths of the files copied (not linked): what a durable publish must flush.
        self.written: list[str] = []
        # Source inode -> the staging path of its first name and its new inode: later names
        # become hard links.
        self._inodes: dict[tuple[int, int], tuple[str, int]] = {}
        # What this build compared in full, for the next walk against the tree it makes.
        self.manifest: Manifest | None = None
        self._manifest: dict[str, tuple[int, int, int]] = {}
        # The manifest of `reuse`, given to plan(): what its build changed from the tree it
        # reused, which may be the spare this build fills.
        self._known: Manifest | None = None
        self.folders_kept = 0
        """Folders of the spare left as they were, with all they hold (see _keep_subtree)."""
        # A build making its share of a tree into a staging root that exists (see Share):
        # the folders it walked, for finish_folders.
        self.share = share
        self.folders: list[Folder] = []

    # --- whole trees ---

    def plan(self, src: Path, known: Manifest | None = None) -> TreePlan:
        """Given a source directory (and the manifest of `reuse`, if known), walk it once
        against `reuse`. Raise OSError if it cannot be read, NotADirectoryError if it is no
        folder."""
        fd = _open_root(src)
        try:
            reuse = _real_dir_path(self.reuse)
            self._known = known
            self.last_plan = plan_tree(
                fd, reuse, self.ignore, owners=self.preserve_owner, known=known
            )
            return self.last_plan
        finally:
            os.close(fd)

    def forget_entries(self) -> None:
        """Drop the last walk's entries, keeping its digest and counts: a built tree waiting
        for its batch's flush and swap needs only those, and the entries cost about 1 KB a
        name (a batch of 16 targets of 2,000 files held 34 MiB until its commit)."""
        if self.last_plan is not None:
            self.last_plan = dataclasses.replace(self.last_plan, entries=[])

    def copy_tree(self, src: Path, dst: Path, plan: TreePlan | None = None) -> None:
        """Given a source directory, a staging path and the plan of the source against
        `reuse` (walked here when None), make dst an exact copy of src (names matching the
        ignore patterns left out). dst either does not exist or is a spare: a tree this
        target published earlier, past its grace period and seen by no reader, which is
        brought up to date in place (see _fill_tree)."""
        fd = _open_root(src)
        try:
            if plan is None:
                self._known = None
                plan = plan_tree(
                    fd, _real_dir_path(self.reuse), self.ignore, owners=self.preserve_owner
                )
            self.last_plan = plan
            spare = self.share is None and _real_dir(dst) is not None
            self.writeback = Writeback(dst.parent) if self.durable else None
            with self.writeback or contextlib.nullcontext():
                self._build(fd, plan, str(dst), _real_dir_path(self.reuse), str(src), spare=spare)
        finally:
            os.close(fd)

    def _build(
        self,
        src_fd: int,
        plan: TreePlan,
        dst: str,
        reuse: Path | None,
        src: str,
        *,
        spare: bool = False,
    ) -> None:
        """Create dst (or take the spare tree there) and fill it from the plan, walking the
        source by descriptors again. This thread makes the folders in pre-order; each
        folder's files and symlinks are one job (on the file pool for a big tree), and a
        folder gets its own metadata once its job is done."""
        if not plan.prefix:
            # A whole tree starts afresh: a publish that gave up on a spare builds again.
            self.stats, self.written = CopyStats(), []
            self._inodes.clear()
            self._manifest = {}
            self.folders_kept = 0
            self.folders = []
        share = self.share
        for rel, kind in plan.skipped:
            if share is None or share.owns(rel):
                self.stats.skipped.append(rel)
                log.warning("copy.special_file_skipped", path=f"{src}/{rel}", kind=kind)
        if self.progress is not None:  # a loop over every entry, for nobody otherwise
            files = size = 0
            for entry in plan.entries:
                st = entry.st
                if stat.S_ISREG(st.st_mode) and (share is None or share.owns(entry.rel, st)):
                    files += 1
                    size += st.st_size
            self.progress("planned", files, size)
        # A pool per build: its threads start with the first job given to it, if any, and
        # end with the build.
        with ThreadPoolExecutor(FILE_WORKERS, thread_name_prefix="syncpro-files") as pool:
            self._fill_tree(src_fd, plan, dst, reuse, pool, spare)

    def _fill_tree(
        self,
        src_fd: int,
        plan: TreePlan,
        dst: str,
        reuse: Path | None,
        pool: ThreadPoolExecutor,
        spare: bool,
    ) -> None:
        """Fill dst from the plan. A spare tree at dst is brought up to date in place rather
        than built anew: a file it holds that is the very inode the plan found unchanged in
        the published tree stays as it is, anything else in it is replaced or removed, and
        its folders are reused. A sync where one file of thousands changed then costs the
        walk, one copy and the swap: no folder made, no file linked, no old tree removed."""
        share = self.share
        held: dict[str, tuple[int, bool]] | None = None
        if share is not None:
            dst_fd = open_dir(dst)  # made ready by whoever started the shared builds
        elif spare:
            dst_fd = open_dir(dst)
            held = _prepare_spare(dst_fd)
        else:
            dst_fd = make_root(dst)
        made = os.fstat(dst_fd)
        pub_fd: int | None = None
        if reuse is not None:
            try:
                pub_fd = open_dir(reuse)
            except OSError:
                pub_fd = None
        root_xattrs = read_xattrs(src_fd)
        root = _Dir(os.dup(src_fd), dst_fd, pub_fd, plan.root, root_xattrs, "", dst, held=held)
        stack = [root]
        waiting: deque[_Dir] = deque()  # folders walked, in post-order, their jobs submitted
        dirty = self._dirty(plan, made) if spare else None
        entries = plan.entries
        try:
            i, count = 0, len(entries)
            while i < count:
                entry = entries[i]
                i += 1
                while len(stack) > entry.depth + 1:
                    self._walked(stack.pop(), waiting, pool, plan.prefix)
                if not stat.S_ISDIR(entry.st.st_mode):
                    if share is None or share.owns(entry.rel, entry.st):
                        stack[-1].files.append(entry)
                    continue
                if dirty is not None and entry.rel not in dirty:
                    end = i
                    while end < count and entries[end].depth > entry.depth:
                        end += 1
                    if self._keep_subtree(stack[-1], entries[i - 1 : end]):
                        i = end
                        continue
                stack.append(self._enter(stack[-1], entry, dst, plan.prefix))
            while stack:
                self._walked(stack.pop(), waiting, pool, plan.prefix)
            while waiting:
                self._finish(waiting.popleft())
        except BaseException:
            # No job may outlive the descriptors it works in.
            for folder in waiting:
                if folder.job is not None:
                    with contextlib.suppress(BaseException):
                        folder.job.result()
            raise
        finally:
            for folder in (*stack, *waiting):
                _close(folder)
        if not plan.prefix:
            reused = plan.published_root if reuse is not None else None
            self.manifest = Manifest(
                (made.st_dev, made.st_ino),
                self._manifest,
                reused,
                plan.changed if reused is not None else frozenset(),
            )

    def _dirty(self, plan: TreePlan, spare: os.stat_result) -> set[str] | None:
        """Given the plan and the spare's root, the folders of the spare that may not be
        right, with every folder above them; None when any may not be (the spare is not the
        tree the published one was built from, or no record of that build is left).

        A folder the published tree's build found the same as in the tree it reused (the
        spare, now), and this plan the same as in the published tree, holds in the spare
        what the source holds now: the very files (one inode in both trees) and symlinks,
        and the folder's own attributes."""
        known = self._known
        if (
            plan.prefix
            or known is None
            or known.reused != (spare.st_dev, spare.st_ino)
            or known.root != plan.published_root
        ):
            return None
        dirty: set[str] = set()
        for rel in (*known.changed, *plan.changed):
            while rel not in dirty:
                dirty.add(rel)
                rel = rel.rpartition("/")[0] if rel else ""
        return dirty

    def _keep_subtree(self, here: _Dir, entries: list[Entry]) -> bool:
        """Given a folder being filled in place and the plan's entries of one of its
        subfolders (that folder first, then all below it), none of them in a dirty folder:
        leave the subfolder as the spare has it, counting what it holds as kept, and return
        True; or return False (nothing done) when the spare's folders are not as its build
        left them: a folder missing, or whose times, mode or owner differ (a name added or
        removed since moves the mtime; so does the sweep's removal of files only it held)."""
        top = entries[0]
        if here.held is None or here.held.get(top.name, (0, False))[1] is False:
            return False
        cut = len(top.rel) - len(top.name)  # rel[cut:] is a path below `here`
        folders: list[tuple[Entry, int]] = []
        for entry in entries:
            if not stat.S_ISDIR(entry.st.st_mode):
                continue
            try:
                st = os.stat(entry.rel[cut:], dir_fd=here.dst, follow_symlinks=False)
            except OSError:
                return False
            if (
                st.st_mode != entry.st.st_mode
                or st.st_mtime_ns != entry.st.st_mtime_ns
                or (
                    self.preserve_owner
                    and (st.st_uid, st.st_gid) != (entry.st.st_uid, entry.st.st_gid)
                )
            ):
                return False
            folders.append((entry, st.st_ino))
        stats, manifest = self.stats, self._manifest
        for entry, inode in folders:
            manifest[entry.rel] = (entry.st.st_ino, entry.st.st_ctime_ns, inode)
        stats.dirs += len(folders)
        files = size = 0
        for entry in entries:
            mode = entry.st.st_mode
            if stat.S_ISREG(mode):
                # Its staging path only matters to a file of several names (see _kept).
                linked = entry.st.st_nlink > 1
                staged = f"{here.staged}/{entry.rel[cut:]}" if linked else ""
                self._kept(entry, staged, stats, manifest)
                files += 1
                size += entry.st.st_size
            elif stat.S_ISLNK(mode):
                stats.symlinks += 1
        if files and self.progress is not None:
            self.progress("linked", files, size)
        here.subdirs.append(top.name)
        self.folders_kept += len(folders)
        return True

    def _kept(
        self,
        entry: Entry,
        staged: str,
        stats: CopyStats,
        manifest: dict[str, tuple[int, int, int]],
    ) -> None:
        """Count a file the spare already holds as the published file itself (one inode in
        both trees): its staging path `staged` (needed only when it has several names) is
        the first name of its inode. The caller tells the progress."""
        stats.files += 1
        stats.linked += 1
        if entry.st.st_nlink > 1:
            self._inodes.setdefault((entry.st.st_dev, entry.st.st_ino), (staged, entry.pub_ino))
        manifest[entry.rel] = (entry.st.st_ino, entry.st.st_ctime_ns, entry.pub_ino)

    def _enter(self, here: _Dir, entry: Entry, dst: str, prefix: str) -> _Dir:
        old = here.held.get(entry.name) if here.held is not None else None
        reused = old is not None and old[1]  # the spare has this folder: filled in place
        if not reused:
            if old is not None:
                _remove_held(here.dst, entry.name, is_dir=False)  # a file where a folder goes
            try:
                os.mkdir(entry.name, 0o700, dir_fd=here.dst)
            except FileExistsError:
                if self.share is None:
                    raise
                # Made by another share: open_dir below takes nothing but a folder.
        here.subdirs.append(entry.name)
        src = open_listed_dir(entry, here.src)
        try:
            # Read here, from the folder opened: the walk reads attributes only to compare.
            xattrs = read_xattrs(src)
            made = open_dir(entry.name, here.dst)
        except BaseException:
            os.close(src)
            raise
        try:
            held = _prepare_spare(made) if reused else None
            inode = os.fstat(made).st_ino
        except BaseException:
            os.close(src)
            os.close(made)
            raise
        self._manifest[entry.rel] = (entry.st.st_ino, entry.st.st_ctime_ns, inode)
        pub: int | None = None
        if here.pub is not None:
            try:
                pub = open_dir(entry.name, here.pub)
            except OSError:
                pub = None  # not a folder there (or a symlink): nothing to reuse below
        inner = entry.rel[len(prefix) + 1 :] if prefix else entry.rel
        return _Dir(src, made, pub, entry.st, xattrs, entry.rel, f"{dst}/{inner}", held=held)

    def _walked(
        self, folder: _Dir, waiting: deque[_Dir], pool: ThreadPoolExecutor, prefix: str
    ) -> None:
        """A folder's listing is done: have its files made, and finish what is done."""
        if not _worth_a_thread(folder.files):
            if any(e.st.st_nlink > 1 and stat.S_ISREG(e.st.st_mode) for e in folder.files):
                # A file with several names links to the copy of its first name, which must
                # exist: every earlier job ends first.
                while waiting:
                    self._finish(waiting.popleft())
            done: Future[_Made] = Future()
            try:
                done.set_result(self._fill(folder))
            except BaseException:
                _close(folder)
                raise
            folder.job = done
        else:
            try:
                folder.job = pool.submit(self._fill, folder)
            except BaseException:
                _close(folder)
                raise
        waiting.append(folder)
        while waiting and (len(waiting) > _IN_FLIGHT or _job_done(waiting[0])):
            self._finish(waiting.popleft())

    def _finish(self, folder: _Dir) -> None:
        # Metadata last: creating the children changed the directory's mtime, and a default
        # ACL set earlier would have been inherited by files that do not have it.
        try:
            if folder.job is not None:
                made = folder.job.result()
                self.stats.add(made.stats)
                self.written.extend(made.written)
                self._manifest.update(made.manifest)
            if self.share is not None:
                self.folders.append((folder.rel, folder.st, folder.xattrs))
                return
            finish_metadata(
                folder.dst,
                folder.st,
                folder.xattrs,
                owners=self.preserve_owner,
                rel=folder.rel,
                not_kept=self.stats.not_kept,
            )
            self.stats.dirs += 1
        finally:
            _close(folder)

    # --- files ---

    def _fill(self, folder: _Dir) -> _Made:
        """Make a folder's files and symlinks; runs on any thread, touching only its own."""
        made = _Made()
        if folder.held is not None:
            wanted = {e.name for e in folder.files}.union(folder.subdirs)
            for name, (_, is_dir) in folder.held.items():
                if name not in wanted:
                    _remove_held(folder.dst, name, is_dir)
        for entry in folder.files:
            if stat.S_ISREG(entry.st.st_mode):
                self._file(folder, entry, made)
            else:
                self._symlink(folder, entry, made)
        return made

    def _symlink(self, here: _Dir, entry: Entry, made: _Made) -> None:
        assert entry.link is not None
        old = here.held.get(entry.name) if here.held is not None else None
        if old is not None:
            _remove_held(here.dst, entry.name, old[1])
        os.symlink(entry.link, entry.name, dir_fd=here.dst)
        if self.preserve_owner:
            os.chown(
                entry.name, entry.st.st_uid, entry.st.st_gid, dir_fd=here.dst, follow_symlinks=False
            )
        os.utime(
            entry.name,
            ns=(entry.st.st_atime_ns, entry.st.st_mtime_ns),
            dir_fd=here.dst,
            follow_symlinks=False,
        )
        made.stats.symlinks += 1

    def _file(self, here: _Dir, entry: Entry, made: _Made) -> None:
        staged = f"{here.staged}/{entry.name}"
        old = here.held.get(entry.name) if here.held is not None else None
        if old is not None:
            if entry.reuse and not old[1] and old[0] == entry.pub_ino:
                # The spare holds the published file itself (one inode, two names), which
                # the walk found unchanged: nothing to do.
                self._kept(entry, staged, made.stats, made.manifest)
                self._told("linked", entry.st.st_size)
                return
            _remove_held(here.dst, entry.name, old[1])
        made.stats.files += 1
        key = (entry.st.st_dev, entry.st.st_ino)
        if entry.st.st_nlink > 1:
            first = self._inodes.get(key)
            if first is not None and _try_link(first[0], None, entry.name, here.dst):
                made.stats.hardlinks += 1
                made.manifest[entry.rel] = (entry.st.st_ino, entry.st.st_ctime_ns, first[1])
                self._told("linked", entry.st.st_size)
                return
        if (
            entry.reuse
            and here.pub is not None
            and _try_link(entry.name, here.pub, entry.name, here.dst)
        ):
            made.stats.linked += 1
            inode = entry.pub_ino
            how = "linked"
        else:
            fd_in = os.open(entry.name, _OPEN_SOURCE, dir_fd=here.src)
            try:
                inode = self._copy_open(fd_in, entry.name, here.dst, entry.rel, made.stats)
            finally:
                os.close(fd_in)
            made.written.append(staged)
            how = "copied"
        if entry.st.st_nlink > 1:
            self._inodes.setdefault(key, (staged, inode))
        # The walk's stat of the source, not the copy's: a change in between moves the ctime,
        # so the next walk compares that file in full.
        made.manifest[entry.rel] = (entry.st.st_ino, entry.st.st_ctime_ns, inode)
        self._told(how, entry.st.st_size)

    def _told(self, event: str, size: int) -> None:
        """Tell the progress of one file."""
        if self.progress is not None:
            self.progress(event, 1, size)

    def _copy_open(
        self, fd_in: int, name: str, dst_fd: int | None, rel: str, stats: CopyStats
    ) -> int:
        """Copy an open source file to name (in dst_fd), counting it in stats; return the
        copy's inode."""
        st_in = os.fstat(fd_in)
        if not stat.S_ISREG(st_in.st_mode):
            raise OSError(errno.ESTALE, "replaced by a non-regular file during the copy", rel)
        # Created with the source's permission bits (never set-id ones, which must follow
        # the chown): where the umask lets them through, no chmod is needed. The staging
        # tree's folders are 0700 until filled, so no one else can open the file meanwhile.
        fd_out = os.open(name, _OPEN_TARGET, stat.S_IMODE(st_in.st_mode) & 0o777, dir_fd=dst_fd)
        try:
            made = os.fstat(fd_out)
            copied = copy_data(fd_in, fd_out, st_in)
            if self.writeback is not None:
                self.writeback.wrote(copied)
            # The mtime read before copying: if the file changes under us, its newer mtime
            # will differ from ours and the next sync copies it again.
            finish_metadata(
                fd_out,
                st_in,
                read_xattrs(fd_in),
                owners=self.preserve_owner,
                rel=rel,
                not_kept=stats.not_kept,
                made=made,
            )
        finally:
            os.close(fd_out)
        stats.copied += 1
        stats.bytes_copied += copied
        return made.st_ino

    # --- type-2 config: listed files only ---

    def copy_listed(self, src: Path, entries: Iterable[str], dst: Path) -> None:
        """Given a config source, its list of relative entries and a staging path, copy only
        the listed entries to their relative paths. Raise ListedFileError naming every entry
        that is absolute, escapes the source or is missing; nothing is copied then."""
        real_root = os.path.realpath(src)
        chosen = resolve_listed(src, entries)
        self.writeback = None  # a list is a few config files: the final flush is enough
        root_fd = _open_root(Path(real_root))
        try:
            self._copy_listed(root_fd, real_root, chosen, dst)
        finally:
            os.close(root_fd)

    def _copy_listed(
        self, root_fd: int, real_root: str, chosen: list[tuple[str, str]], dst: Path
    ) -> None:
        root_stat = os.fstat(root_fd)
        os.close(make_root(dst))
        made: list[tuple[str, os.stat_result, Xattrs]] = []
        # Shallow entries first: a listed directory is copied whole before any file inside it
        # that is listed too (which then is already there).
        for norm, real in sorted(chosen, key=lambda item: item[0].count("/")):
            # Opened below the root one component at a time: the entry was checked to resolve
            # inside the source, and a symlink swapped in since makes the open fail.
            inside = os.path.relpath(real, real_root)
            parts = norm.split("/")
            for depth in range(1, len(parts)):
                sub = "/".join(parts[:depth])
                target_dir = os.path.join(dst, sub)
                if not os.path.isdir(target_dir):
                    os.mkdir(target_dir, 0o700)
                    real_sub = os.path.relpath(
                        os.path.realpath(os.path.join(real_root, sub)), real_root
                    )
                    sub_fd = open_beneath(root_fd, real_sub, os.O_RDONLY | os.O_DIRECTORY)
                    try:
                        made.append((target_dir, os.fstat(sub_fd), read_xattrs(sub_fd)))
                    finally:
                        os.close(sub_fd)
            target = os.path.join(dst, norm)
            if os.path.lexists(target):
                continue  # listed twice, or inside a listed directory
            fd = open_beneath(root_fd, inside, os.O_RDONLY | os.O_NONBLOCK)
            try:
                st = os.fstat(fd)  # listed files are published as content, links resolved
                if stat.S_ISDIR(st.st_mode):
                    reuse = self._reuse_path(norm, directory=True)
                    plan = plan_tree(
                        fd,
                        Path(reuse) if reuse else None,
                        self.ignore,
                        owners=self.preserve_owner,
                        rel_prefix=norm,
                    )
                    self._build(fd, plan, target, Path(reuse) if reuse else None, real)
                elif stat.S_ISREG(st.st_mode):
                    self.stats.files += 1
                    self._told("planned", st.st_size)
                    reuse = self._reuse_path(norm, directory=False)
                    if reuse is not None and self._link_unchanged(fd, st, reuse, target):
                        self.stats.linked += 1
                        self._told("linked", st.st_size)
                    else:
                        self._copy_open(fd, target, None, norm, self.stats)
                        self.written.append(target)
                        self._told("copied", st.st_size)
                else:
                    self.stats.skipped.append(norm)
                    log.warning(
                        "copy.special_file_skipped", path=real, kind=special_kind(st.st_mode)
                    )
            finally:
                os.close(fd)
        for path, st, xattrs in sorted(made, key=lambda item: item[0].count("/"), reverse=True):
            self._finish_path(path, st, xattrs)
        self._finish_path(str(dst), root_stat, read_xattrs(root_fd))

    def finish_folders(self, dst: Path, folders: Iterable[Folder]) -> None:
        """Given the staging root of a tree that shared builds have filled and the folders
        they walked (a folder walked by several of them may be given once or more), give
        each folder its attributes, the deepest first: a folder's mtime is final once
        nothing more is made in it."""
        latest = {rel: (rel, st, xattrs) for rel, st, xattrs in folders}
        for rel, st, xattrs in sorted(latest.values(), key=_depth, reverse=True):
            self._finish_path(os.path.join(dst, rel) if rel else str(dst), st, xattrs, rel)

    def _finish_path(
        self, path: str, st: os.stat_result, xattrs: Xattrs, rel: str | None = None
    ) -> None:
        fd = open_dir(path)
        try:
            finish_metadata(
                fd,
                st,
                xattrs,
                owners=self.preserve_owner,
                rel=path if rel is None else rel,
                not_kept=self.stats.not_kept,
            )
        finally:
            os.close(fd)
        self.stats.dirs += 1

    def _link_unchanged(self, fd: int, st: os.stat_result, published: str, dst: str) -> bool:
        # `published` was reached through real directories only and its last component is
        # not followed either: a symlink in the published tree never makes us link a file it
        # points to (the source's own file, say) into the new tree.
        try:
            old = os.lstat(published)
        except OSError:
            return False
        same = (
            old.st_mode == st.st_mode
            and old.st_size == st.st_size
            and old.st_mtime_ns == st.st_mtime_ns
            and (not self.preserve_owner or (old.st_uid, old.st_gid) == (st.st_uid, st.st_gid))
            and read_xattrs(published) == read_xattrs(fd)
        )
        return same and _try_link(published, None, dst, None)

    def _reuse_path(self, rel: str, *, directory: bool) -> str | None:
        """Return the published path at `rel`, if every directory on the way is a real one
        (and, for `directory`, rel itself is); else None."""
        here = _real_dir(self.reuse)
        parts = rel.split("/")
        for part in parts[:-1]:
            if here is None:
                return None
            here = _real_dir(os.path.join(here, part))
        if here is None:
            return None
        path = os.path.join(here, parts[-1])
        return _real_dir(path) if directory else path


def _open_root(src: Path) -> int:
    """Open a source root; the configured path itself may be a symlink to a folder."""
    fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(src))
    except BaseException:
        os.close(fd)
        raise
    return fd


def make_root(dst: str | Path) -> int:
    """Create a new tree's root at dst, 0700 until it is filled and carrying nothing
    inherited (see clear_inherited); return it open."""
    os.mkdir(dst, 0o700)
    fd = open_dir(dst)
    try:
        clear_inherited(fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _try_link(src: str, src_fd: int | None, dst: str, dst_fd: int | None) -> bool:
    try:
        os.link(src, dst, src_dir_fd=src_fd, dst_dir_fd=dst_fd, follow_symlinks=False)
    except OSError:
        return False  # too many links, or hardlinks protected: copying still works
    return True


def _prepare_spare(fd: int) -> dict[str, tuple[int, bool]]:
    """Ready a spare tree's folder to be filled as a new one is: writable by us, carrying no
    attribute its new entries could inherit (a default ACL); return what it holds, name ->
    (inode, is a folder), from its listing alone (no stat per entry)."""
    os.fchmod(fd, 0o700)
    clear_inherited(fd)
    with os.scandir(fd) as entries:
        return {e.name: (e.inode(), e.is_dir(follow_symlinks=False)) for e in entries}


def _remove_held(dir_fd: int, name: str, is_dir: bool) -> None:
    """Remove what a spare tree holds at name, in the folder open as dir_fd."""
    if is_dir:
        shutil.rmtree(name, dir_fd=dir_fd)
    else:
        os.unlink(name, dir_fd=dir_fd)


def _depth(folder: Folder) -> int:
    return folder[0].count("/") + 1 if folder[0] else 0


def _worth_a_thread(files: list[Entry]) -> bool:
    """Whether a folder's job should run on the file pool: the files it copies are big on
    average, and none has other names (a file with several names links to the copy of its
    first name, which an earlier job must have made)."""
    copies = size = 0
    for entry in files:
        if stat.S_ISREG(entry.st.st_mode):
            if entry.st.st_nlink > 1:
                return False
            if not entry.reuse:
                copies += 1
                size += entry.st.st_size
    return copies > 0 and size >= copies * POOL_MIN_AVERAGE


def _job_done(folder: _Dir) -> bool:
    return folder.job is None or folder.job.done()


def _close(folder: _Dir) -> None:
    for fd in (folder.src, folder.dst, folder.pub):
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


def _real_dir_path(path: Path | None) -> Path | None:
    real = _real_dir(path)
    return None if real is None else Path(real)


def _real_dir(path: str | Path | None) -> str | None:
    """Return path as str when it is a directory and not a symlink; else None."""
    if path is None:
        return None
    try:
        return str(path) if stat.S_ISDIR(os.lstat(path).st_mode) else None
    except OSError:
        return None


def resolve_listed(src: Path, entries: Iterable[str]) -> list[tuple[str, str]]:
    """Given a config source and its listed entries, return (normalised relative path, real
    path) for each, in list order. Raise ListedFileError naming every entry that is absolute,
    escapes the source (by '..' or through a symlink) or is missing."""
    real_root = os.path.realpath(src)
    chosen: list[tuple[str, str]] = []
    problems: list[str] = []
    for entry in entries:
        if "\0" in entry:  # a database row can hold one; no path can
            problems.append(f"listed config {entry!r} contains a NUL byte")
            continue
        norm = os.path.normpath(entry)
        if os.path.isabs(entry):
            problems.append(f"listed config {entry!r} is an absolute path")
            continue
        if norm in (".", "..") or norm.startswith("../"):
            problems.append(f"listed config {entry!r} escapes the config source {src}")
            continue
        real = os.path.realpath(os.path.join(real_root, norm))
        if real != real_root and not real.startswith(real_root + os.sep):
            problems.append(
                f"listed config {entry!r} escapes the config source {src} through a symlink"
            )
            continue
        if not os.path.exists(real):
            problems.append(f"listed config file {src / norm} is missing")
            continue
        chosen.append((norm, real))
    if problems:
        raise ListedFileError(problems)
    return chosen
