"""One pass over a source tree by directory file descriptors: the plan of a publish.

Every folder is opened relative to its parent's descriptor with O_NOFOLLOW|O_DIRECTORY and
listed through that descriptor; entries are examined relative to it too. An uploader who swaps
a folder for a symlink between two system calls therefore makes the walk fail, never lead it
outside the source (the earlier path-based walk could be tricked into publishing root-only files).

The same pass compares each entry with the published tree at the same relative path, so one
walk answers three questions: is the published tree already exact (nothing to do), which files
can be hard-linked from it instead of copied, and what the sources looked like (the digest the
daemon records). `same_entry` is the one rule for "unchanged", used wherever trees are compared.
"""

from __future__ import annotations

import errno
import hashlib
import marshal
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from syncpro.engine.ignore import Ignore

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
Xattrs = tuple[tuple[str, bytes], ...]
# Errors that say "this filesystem or this user cannot see extended attributes here".
_NO_XATTRS = frozenset({errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM, errno.EACCES})


@dataclass(slots=True)
class Entry:
    """One name of the source as the walk found it. `reuse` says the published tree holds the
    same regular file at the same path, reached through real folders only."""

    rel: str
    name: str
    depth: int
    st: os.stat_result
    link: str | None = None
    xattrs: Xattrs = ()
    reuse: bool = False
    pub_ino: int = 0  # the published file's inode, for a reused one


@dataclass(frozen=True)
class Manifest:
    """What the build of a published tree compared in full: per relative path of a file or
    folder, its source inode and ctime then and its inode in the tree, whose root is `root`
    (device, inode): a manifest of another tree never applies. And, for a build that reused
    an earlier tree (linked its files), that tree's root and the folders in which the two
    differ (`changed`, relative paths, "" for the root): everywhere else the new tree holds
    the earlier one's very files, which tells the next build what a spare (that earlier tree)
    already has right."""

    root: tuple[int, int]
    entries: dict[str, tuple[int, int, int]]
    reused: tuple[int, int] | None = None
    changed: frozenset[str] = frozenset()

    def save(self, path: Path) -> None:
        """Write the manifest next to the tree's work area, atomically; it is a cache, never
        flushed: lost or stale, the next walk compares in full and the next build fills
        its spare in full."""
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        doc = (_MANIFEST_VERSION, self.root, self.entries, self.reused, self.changed)
        tmp.write_bytes(marshal.dumps(doc))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> Manifest | None:
        """Return the manifest at path, or None if it is missing or unreadable."""
        try:
            # Our own file, in a work area only syncpro's user can write.
            doc = marshal.loads(path.read_bytes())  # noqa: S302
            version, root, entries = doc[:3]
        except (OSError, ValueError, EOFError, TypeError):
            return None
        if version not in (1, _MANIFEST_VERSION) or not isinstance(entries, dict):
            return None
        if version == 1:  # written before the spare's record: still vouches for entries
            return cls(tuple(root), entries)
        reused, changed = doc[3:5]
        return cls(tuple(root), entries, tuple(reused) if reused else None, frozenset(changed))


_MANIFEST_VERSION = 2


@dataclass
class TreePlan:
    """The walk of one source: its root, its entries in pre-order (a folder before what it
    holds, names sorted), whether the published tree already is exactly what a build would
    make, and the digest of what was read."""

    root: os.stat_result
    root_xattrs: Xattrs
    entries: list[Entry]
    unchanged: bool
    digest: str
    newest_ctime: float
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (rel, kind)
    prefix: str = ""  # what every rel starts with (a listed folder's own path), "" for a root
    published_root: tuple[int, int] | None = None  # (device, inode) of the tree compared with
    read_in_full: int = 0  # entries whose attributes had to be read: no manifest vouched
    # The folders where the source and the published tree differ: in what they hold (a name
    # more or less, an entry not the same) or in their own attributes.
    changed: frozenset[str] = frozenset()

    def manifest(self) -> Manifest | None:
        """For a plan that found the published tree unchanged: the manifest of that tree."""
        if not self.unchanged or self.published_root is None:
            return None
        return Manifest(
            self.published_root,
            {
                e.rel: (e.st.st_ino, e.st.st_ctime_ns, e.pub_ino)
                for e in self.entries
                if e.link is None and e.pub_ino
            },
        )


def open_dir(name: str | Path, dir_fd: int | None = None) -> int:
    """Open a folder relative to dir_fd without following a symlink in its last component."""
    return os.open(name, DIR_FLAGS, dir_fd=dir_fd)


def open_beneath(root_fd: int, rel: str, flags: int) -> int:
    """Given a folder's descriptor and a relative path without '..', open the path with
    `flags` by walking one component at a time, never following a symlink. Raise OSError
    (ELOOP, ENOTDIR, ENOENT) if a component is a symlink or missing."""
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if not parts:
        return os.dup(root_fd)
    here = root_fd
    try:
        for part in parts[:-1]:
            nxt = open_dir(part, here)
            if here != root_fd:
                os.close(here)
            here = nxt
        return os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=here)
    finally:
        if here != root_fd:
            os.close(here)


def read_xattrs(target: int | str) -> Xattrs:
    """Return the extended attributes of an open descriptor or a path (not followed), sorted
    by name; () where the filesystem or this user cannot see any."""
    # An fd refuses the follow_symlinks argument; a path must not be followed.
    follow = isinstance(target, int)
    try:
        names = os.listxattr(target, follow_symlinks=follow)
    except OSError as exc:
        if exc.errno in _NO_XATTRS:
            return ()
        raise
    if not names:
        return ()
    found: list[tuple[str, bytes]] = []
    for name in sorted(names):
        try:
            found.append((name, os.getxattr(target, name, follow_symlinks=follow)))
        except OSError as exc:
            if exc.errno in (errno.ENODATA, *_NO_XATTRS):
                continue  # removed meanwhile, or not ours to read
            raise
    return tuple(found)


def same_entry(
    a: os.stat_result,
    a_link: str | None,
    a_xattrs: Xattrs,
    b: os.stat_result,
    b_link: str | None,
    b_xattrs: Xattrs,
    *,
    owners: bool,
    dir_times: bool = True,
) -> bool:
    """The one rule for "unchanged": type and mode, mtime, size of files, link target, extended
    attributes (ACLs and capabilities are such), and the owner when owners are kept. A
    folder's mtime follows its children: `dir_times=False` leaves it out, to count only what
    changed inside (a diff's classes); a publish keeps it, so that the tree is exact."""
    if a.st_mode != b.st_mode:
        return False
    if a.st_mtime_ns != b.st_mtime_ns and (dir_times or not stat.S_ISDIR(a.st_mode)):
        return False
    if owners and (a.st_uid, a.st_gid) != (b.st_uid, b.st_gid):
        return False
    if stat.S_ISREG(a.st_mode) and a.st_size != b.st_size:
        return False
    return a_link == b_link and a_xattrs == b_xattrs


def special_kind(mode: int) -> str:
    """Name the kind of an entry that is never published."""
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    return "unknown"


@dataclass
class _Frame:
    src: int
    pub: int | None
    rel: str
    depth: int
    names: Iterator[os.DirEntry[str]]
    pub_names: set[str]
    changed: bool = False


def _listing(fd: int) -> list[os.DirEntry[str]]:
    with os.scandir(fd) as entries:
        return sorted(entries, key=lambda e: e.name)


def _names(fd: int | None) -> set[str]:
    if fd is None:
        return set()
    with os.scandir(fd) as entries:
        return {e.name for e in entries}


def plan_tree(
    src_fd: int,
    published: Path | None,
    ignore: Ignore,
    *,
    owners: bool,
    rel_prefix: str = "",
    known: Manifest | None = None,
    every_xattr: bool = False,
) -> TreePlan:
    """Given an open source folder, the published tree to compare with (or None) and the
    ignore rules, walk the source once and return its plan. `known` is the manifest the last
    build of the published tree left: an entry whose source inode and ctime and published
    inode are as it records was compared in full then and has not changed since (any change
    of an inode, its extended attributes included, moves its ctime), so its attributes need
    not be read again. Entries carry their extended attributes where they were read (to
    compare them), or all of them with `every_xattr` (a listing for diff). Raise OSError if
    the source cannot be read or changes shape under the walk (a folder swapped for something
    else)."""
    # This loop runs once per file of every sync: it is written for speed (no helper calls
    # where an inline test does, one digest update at the end), and says the same as
    # same_entry(), which stays the rule's definition.
    root = os.fstat(src_fd)
    root_xattrs = read_xattrs(src_fd)
    pub_fd: int | None = None
    if published is not None:
        try:
            pub_fd = open_dir(published)
        except OSError:
            pub_fd = None
    unchanged = pub_fd is not None
    recorded: dict[str, tuple[int, int, int]] = {}
    published_root: tuple[int, int] | None = None
    read_in_full = 0
    if pub_fd is not None:
        pub_root = os.fstat(pub_fd)
        published_root = (pub_root.st_dev, pub_root.st_ino)
        if known is not None and known.root == (pub_root.st_dev, pub_root.st_ino):
            recorded = known.entries
        unchanged = same_entry(
            root, None, root_xattrs, pub_root, None, read_xattrs(pub_fd), owners=owners
        )
    entries: list[Entry] = []
    skipped: list[tuple[str, str]] = []
    material: list[str] = []
    newest = root.st_ctime
    # Hard links: a source inode must map to one published inode and back, else the published
    # tree links what the source does not (or the reverse).
    src_to_pub: dict[tuple[int, int], int] = {}
    pub_to_src: dict[int, tuple[int, int] | Entry] = {}
    frames = [_Frame(src_fd, pub_fd, rel_prefix, 0, iter(_listing(src_fd)), _names(pub_fd))]
    frames[0].changed = not unchanged
    changed: set[str] = set()
    # Bound once: the loop below runs for every name of every sync.
    stat_at, readlink_at = os.stat, os.readlink
    add_material, add_entry = material.append, entries.append
    try:
        while frames:
            frame = frames[-1]
            src, pub, pub_names, base, depth = (
                frame.src,
                frame.pub,
                frame.pub_names,
                frame.rel,
                frame.depth,
            )
            for item in frame.names:  # resumed where it stopped after a subfolder
                name = item.name
                rel = f"{base}/{name}" if base else name
                if ignore(name, rel):
                    continue
                st = item.stat(follow_symlinks=False)
                fmt = _IFMT(st.st_mode)
                if fmt == _LNK:
                    link: str | None = readlink_at(name, dir_fd=src)
                elif fmt in (_REG, _DIR):
                    link = None
                else:
                    # FIFOs, sockets and devices are never opened nor published.
                    skipped.append((rel, special_kind(st.st_mode)))
                    continue
                ctime_ns = st.st_ctime_ns
                if st.st_ctime > newest:
                    newest = st.st_ctime
                # The ctime stands for the extended attributes: setting one moves it.
                add_material(
                    f"{rel}\0{st.st_mode}\0{st.st_size}\0{st.st_mtime_ns}\0{ctime_ns}\0"
                    f"{st.st_uid}:{st.st_gid}\0{link or ''}\0"
                )
                entry = Entry(rel, name, depth, st, link)
                if every_xattr and fmt != _LNK:
                    entry.xattrs = _xattrs_in(src, name)
                add_entry(entry)

                pub_st: os.stat_result | None = None
                same = False
                if pub is not None and name in pub_names:
                    pub_names.discard(name)
                    try:
                        pub_st = stat_at(name, dir_fd=pub, follow_symlinks=False)
                    except OSError:
                        pub_st = None
                    if (
                        pub_st is not None
                        and pub_st.st_mode == st.st_mode
                        and pub_st.st_mtime_ns == st.st_mtime_ns
                        and (fmt != _REG or pub_st.st_size == st.st_size)
                        and (
                            not owners
                            or (pub_st.st_uid == st.st_uid and pub_st.st_gid == st.st_gid)
                        )
                    ):
                        # Only now the calls the stat could not answer.
                        if fmt == _LNK:
                            same = readlink_at(name, dir_fd=pub) == link
                        elif (
                            (known_entry := recorded.get(rel)) is not None
                            and known_entry[0] == st.st_ino
                            and known_entry[1] == ctime_ns
                            and known_entry[2] == pub_st.st_ino
                        ):
                            same = True  # compared in full by the build that made this tree
                        else:
                            read_in_full += 1
                            if not every_xattr:
                                entry.xattrs = _xattrs_in(src, name)
                            same = _xattrs_in(pub, name) == entry.xattrs
                if same:
                    assert pub_st is not None
                    pub_ino = pub_st.st_ino
                    if fmt == _REG:
                        if st.st_nlink > 1:
                            inode = (st.st_dev, st.st_ino)
                            same = (
                                src_to_pub.setdefault(inode, pub_ino) == pub_ino
                                and pub_to_src.setdefault(pub_ino, inode) == inode
                            )
                        else:
                            # A source inode of one name is met once: only its published
                            # inode must be its alone (the entry stands for it, cheaply).
                            same = pub_to_src.setdefault(pub_ino, entry) is entry
                        entry.reuse = same
                    if same:
                        entry.pub_ino = pub_ino
                if not same:
                    unchanged = False
                    frame.changed = True
                if fmt == _DIR:
                    child = _descend(frame, entry, pub_st)
                    child.changed = not same
                    frames.append(child)
                    break
            else:
                if pub_names:
                    unchanged = False  # the published tree holds names the source lost
                    frame.changed = True
                if frame.changed:
                    changed.add(frame.rel)
                frames.pop()
                _close_frame(frame, src_fd, pub_fd)
    finally:
        for frame in frames:
            _close_frame(frame, src_fd, pub_fd)
        if pub_fd is not None:
            os.close(pub_fd)
    digest = hashlib.blake2b("".join(material).encode("utf-8", "surrogateescape"), digest_size=16)
    return TreePlan(
        root,
        root_xattrs,
        entries,
        unchanged,
        digest.hexdigest(),
        newest,
        skipped,
        rel_prefix,
        published_root,
        read_in_full,
        frozenset(changed),
    )


_IFMT = stat.S_IFMT
_REG, _DIR, _LNK = stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK


def _xattrs_in(dir_fd: int, name: str) -> Xattrs:
    # Most files carry none: one listxattr and no tuple building for them.
    path = f"/proc/self/fd/{dir_fd}/{name}"
    try:
        if not os.listxattr(path, follow_symlinks=False):
            return ()
    except OSError as exc:
        if exc.errno in _NO_XATTRS:
            return ()
        raise
    return read_xattrs(path)


def open_listed_dir(entry: Entry, parent: int) -> int:
    """Open the folder `entry` names in the open folder `parent`; raise OSError (ESTALE) if
    what is there now is not the folder the walk listed (swapped meanwhile)."""
    child = open_dir(entry.name, parent)
    try:
        opened = os.fstat(child)
        if (opened.st_dev, opened.st_ino) != (entry.st.st_dev, entry.st.st_ino):
            raise OSError(errno.ESTALE, "replaced during the sync", entry.rel)
    except BaseException:
        os.close(child)
        raise
    return child


def _descend(frame: _Frame, entry: Entry, pub_st: os.stat_result | None) -> _Frame:
    """Open a folder the walk found, checking it is the one it listed, and its published twin."""
    child = open_listed_dir(entry, frame.src)
    try:
        listing = _listing(child)
    except BaseException:
        os.close(child)
        raise
    child_pub: int | None = None
    if pub_st is not None and stat.S_ISDIR(pub_st.st_mode) and frame.pub is not None:
        try:
            child_pub = open_dir(entry.name, frame.pub)
        except OSError:
            child_pub = None
    return _Frame(child, child_pub, entry.rel, frame.depth + 1, iter(listing), _names(child_pub))


def _close_frame(frame: _Frame, src_root: int, pub_root: int | None) -> None:
    if frame.src != src_root:
        os.close(frame.src)
    if frame.pub is not None and frame.pub != pub_root:
        os.close(frame.pub)


def plan_path(
    source: Path,
    published: Path | None,
    ignore: Ignore,
    *,
    owners: bool,
    rel_prefix: str = "",
    every_xattr: bool = False,
) -> TreePlan:
    """plan_tree for a source given by path. The source root itself may be a symlink to a
    folder (a configured path); nothing below it is followed. Raise NotADirectoryError if it
    is not a folder."""
    try:
        fd = os.open(source, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except NotADirectoryError:
        raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(source)) from None
    try:
        return plan_tree(
            fd, published, ignore, owners=owners, rel_prefix=rel_prefix, every_xattr=every_xattr
        )
    finally:
        os.close(fd)
