"""Build an exact copy of a source tree in a staging directory, reusing unchanged files.

A file whose size, mtime and mode equal the already published file at the same path is
hard-linked from the published tree instead of copied: a sync where one file of thousands
changed costs a walk and one copy. Sources are always read, never linked or modified.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

log = structlog.get_logger()

_CHUNK = 1 << 30
_OPEN_SOURCE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_OPEN_TARGET = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW


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
    skipped: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {
            "files": self.files,
            "dirs": self.dirs,
            "symlinks": self.symlinks,
            "copied": self.copied,
            "linked": self.linked,
            "bytes_copied": self.bytes_copied,
            "skipped": list(self.skipped),
        }


class Ignore:
    """Glob patterns for upload temporaries. A pattern without '/' matches a name; one with
    '/' matches the path relative to the source root."""

    def __init__(self, patterns: Iterable[str]) -> None:
        self.patterns = tuple(patterns)
        self._names = _compile(p for p in self.patterns if "/" not in p)
        self._paths = _compile(p for p in self.patterns if "/" in p)

    def __call__(self, name: str, rel: str = "") -> bool:
        if self._names is not None and self._names.match(name):
            return True
        return bool(rel and self._paths is not None and self._paths.match(rel))


def _compile(patterns: Iterable[str]) -> re.Pattern[str] | None:
    joined = "|".join(fnmatch.translate(p) for p in patterns)
    return re.compile(joined) if joined else None


class TreeBuilder:
    """Copies sources into a new staging tree, hard-linking files unchanged since `reuse`."""

    def __init__(self, *, ignore: Ignore, reuse: Path | None, preserve_owner: bool) -> None:
        self.ignore = ignore
        self.reuse = reuse
        self.preserve_owner = preserve_owner
        self.stats = CopyStats()

    # --- whole trees ---

    def copy_tree(self, src: Path, dst: Path) -> None:
        """Given a source directory and a staging path that does not exist, make dst an exact
        copy of src (names matching the ignore patterns left out)."""
        root_stat = os.stat(src)  # the source root may itself be a symlink to a directory
        if not stat.S_ISDIR(root_stat.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(src))
        os.mkdir(dst, 0o700)
        self._fill_dir(str(src), str(dst), "", _real_dir(self.reuse))
        self._finish_dir(str(dst), root_stat)

    def _fill_dir(self, src: str, dst: str, rel: str, reuse: str | None) -> None:
        """Copy the entries of src into dst; `reuse` is the published directory at the same
        relative path, only ever reached through real directories, or None."""
        with os.scandir(src) as entries:
            listing = sorted(entries, key=lambda e: e.name)
        for entry in listing:
            entry_rel = f"{rel}/{entry.name}" if rel else entry.name
            if self.ignore(entry.name, entry_rel):
                continue
            # f-strings, not os.path.join: this runs once per file and join costs as much as
            # a syscall here.
            self._copy_entry(
                entry.path,
                f"{dst}/{entry.name}",
                entry_rel,
                None if reuse is None else f"{reuse}/{entry.name}",
            )

    def _copy_entry(self, src: str, dst: str, rel: str, reuse: str | None) -> None:
        st = os.lstat(src)
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            os.mkdir(dst, 0o700)
            self._fill_dir(src, dst, rel, _real_dir(reuse))
            self._finish_dir(dst, st)
        elif stat.S_ISREG(mode):
            self._copy_file(src, dst, st, reuse)
        elif stat.S_ISLNK(mode):
            os.symlink(os.readlink(src), dst)
            if self.preserve_owner:
                os.lchown(dst, st.st_uid, st.st_gid)
            os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
            self.stats.symlinks += 1
        else:
            # FIFOs, sockets and devices are never opened: a FIFO would block the copy forever.
            self.stats.skipped.append(rel)
            log.warning("copy.special_file_skipped", path=src, kind=_kind(mode))

    def _finish_dir(self, dst: str, st: os.stat_result) -> None:
        # Metadata last: creating the children changed the directory's mtime.
        if self.preserve_owner:
            os.chown(dst, st.st_uid, st.st_gid)
        os.chmod(dst, stat.S_IMODE(st.st_mode))
        os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
        self.stats.dirs += 1

    # --- files ---

    def _copy_file(self, src: str, dst: str, st: os.stat_result, reuse: str | None) -> None:
        self.stats.files += 1
        if reuse is not None and self._link_unchanged(dst, reuse, st):
            self.stats.linked += 1
            return
        fd_in = os.open(src, _OPEN_SOURCE)
        try:
            st_in = os.fstat(fd_in)
            if not stat.S_ISREG(st_in.st_mode):
                raise OSError(errno.ESTALE, "replaced by a non-regular file during the copy", src)
            fd_out = os.open(dst, _OPEN_TARGET, 0o600)
            try:
                copied = _copy_bytes(fd_in, fd_out, st_in.st_size)
                if self.preserve_owner:
                    os.fchown(fd_out, st_in.st_uid, st_in.st_gid)
                os.fchmod(fd_out, stat.S_IMODE(st_in.st_mode))
                # The mtime read before copying: if the file changes under us, its newer mtime
                # will differ from ours and the next sync copies it again.
                os.utime(fd_out, ns=(st_in.st_atime_ns, st_in.st_mtime_ns))
            finally:
                os.close(fd_out)
        finally:
            os.close(fd_in)
        self.stats.copied += 1
        self.stats.bytes_copied += copied

    def _link_unchanged(self, dst: str, published: str, st: os.stat_result) -> bool:
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
        )
        if not same:
            return False
        try:
            os.link(published, dst, follow_symlinks=False)
        except OSError:
            return False  # too many links, or hardlinks protected: copying still works
        return True

    # --- type-2 config: listed files only ---

    def copy_listed(self, src: Path, entries: Iterable[str], dst: Path) -> None:
        """Given a config source, its list of relative entries and a staging path, copy only
        the listed entries to their relative paths. Raise ListedFileError naming every entry
        that is absolute, escapes the source or is missing; nothing is copied then."""
        real_root = os.path.realpath(src)
        chosen = resolve_listed(src, entries)
        root_stat = os.stat(real_root)
        os.mkdir(dst, 0o700)
        made: list[tuple[str, os.stat_result]] = []
        # Shallow entries first: a listed directory is copied whole before any file inside it
        # that is listed too (which then is already there).
        for norm, real in sorted(chosen, key=lambda item: item[0].count("/")):
            parts = norm.split("/")
            for depth in range(1, len(parts)):
                sub = "/".join(parts[:depth])
                target_dir = os.path.join(dst, sub)
                if not os.path.isdir(target_dir):
                    os.mkdir(target_dir, 0o700)
                    made.append((target_dir, os.stat(os.path.join(real_root, sub))))
            target = os.path.join(dst, norm)
            if os.path.lexists(target):
                continue  # listed twice, or inside a listed directory
            st = os.stat(real)  # listed files are published as content, links resolved
            if stat.S_ISDIR(st.st_mode):
                os.mkdir(target, 0o700)
                self._fill_dir(real, target, norm, self._reuse_path(norm, directory=True))
                made.append((target, st))
            elif stat.S_ISREG(st.st_mode):
                self._copy_file(real, target, st, self._reuse_path(norm, directory=False))
            else:
                self.stats.skipped.append(norm)
                log.warning("copy.special_file_skipped", path=real, kind=_kind(st.st_mode))
        for path, st in sorted(made, key=lambda item: item[0].count("/"), reverse=True):
            self._finish_dir(path, st)
        self._finish_dir(str(dst), root_stat)

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


def tree_matches(src: Path, published: Path, ignore: Ignore, preserve_owner: bool) -> bool:
    """Given a source tree and the tree published from it, return True when a build would
    produce exactly the published tree (names, types, modes, sizes, mtimes, link targets, and
    owners when they are preserved), so the publish can be skipped."""

    def same(a: os.stat_result, b: os.stat_result) -> bool:
        if a.st_mode != b.st_mode or a.st_mtime_ns != b.st_mtime_ns:
            return False
        if preserve_owner and (a.st_uid, a.st_gid) != (b.st_uid, b.st_gid):
            return False
        return stat.S_ISDIR(a.st_mode) or a.st_size == b.st_size

    if not same(os.stat(src), os.lstat(published)):
        return False
    stack = [(str(src), str(published), "")]
    while stack:
        src_dir, pub_dir, rel = stack.pop()
        with os.scandir(src_dir) as entries:
            wanted: dict[str, os.DirEntry[str]] = {}
            for entry in entries:
                entry_rel = f"{rel}/{entry.name}" if rel else entry.name
                if not ignore(entry.name, entry_rel):
                    wanted[entry.name] = entry
        with os.scandir(pub_dir) as entries:
            have = {entry.name: entry for entry in entries}
        for name, entry in wanted.items():
            st = entry.stat(follow_symlinks=False)
            if not (
                stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)
            ):
                continue  # never published
            old = have.pop(name, None)
            if old is None or not same(st, old.stat(follow_symlinks=False)):
                return False
            if stat.S_ISLNK(st.st_mode) and os.readlink(entry.path) != os.readlink(old.path):
                return False
            if stat.S_ISDIR(st.st_mode):
                entry_rel = f"{rel}/{name}" if rel else name
                stack.append((entry.path, old.path, entry_rel))
        if have:
            return False  # the published tree has names the source no longer has
    return True


def _copy_bytes(fd_in: int, fd_out: int, size: int) -> int:
    """Copy fd_in to fd_out, up to `size` (fd_in's size when opened) or its end. A file that
    grows meanwhile differs from the copy in size, so the next sync copies it again."""
    total = 0
    try:
        while True:
            n = os.copy_file_range(fd_in, fd_out, _CHUNK)
            if n == 0:
                return total
            total += n
            if total == size:
                # Most files end here: the size was known, so no call that only says EOF.
                return total
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
    # Filesystems without copy_file_range: plain reads and writes from where we stopped.
    while chunk := os.read(fd_in, 1 << 20):
        view = memoryview(chunk)
        while view:
            written = os.write(fd_out, view)
            view = view[written:]
        total += len(chunk)
    return total


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    return "unknown"
