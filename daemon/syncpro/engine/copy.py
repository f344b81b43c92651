"""Copy one file's bytes and metadata as `cp -a` does: holes stay holes, extended attributes
(ACLs and file capabilities among them) follow, owner, mode and times are kept.
"""

from __future__ import annotations

import errno
import os
import stat

from syncpro.engine.walk import Xattrs, read_xattrs

_CHUNK = 1 << 30
# Filesystems or kernels without copy_file_range between these two files.
_NO_COPY_RANGE = frozenset({errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP})
# setxattr errors that mean "the target cannot hold this attribute", reported, not fatal.
_NOT_HELD = frozenset({errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM, errno.EACCES, errno.E2BIG})


def copy_data(fd_in: int, fd_out: int, st: os.stat_result) -> int:
    """Copy the bytes of fd_in (of size st.st_size when opened) to the empty fd_out and return
    how many were written. A file with fewer blocks than its size has holes: only its data
    ranges are copied and the holes stay unallocated. A file that grows meanwhile differs from
    the copy in size or mtime, so the next sync copies it again."""
    if st.st_size and st.st_blocks * 512 < st.st_size:
        try:
            return _copy_sparse(fd_in, fd_out, st.st_size)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENXIO, errno.EOPNOTSUPP):
                raise
            os.lseek(fd_in, 0, os.SEEK_SET)
            os.ftruncate(fd_out, 0)
            os.lseek(fd_out, 0, os.SEEK_SET)
    return _copy_range(fd_in, fd_out, st.st_size, None)


def _copy_sparse(fd_in: int, fd_out: int, size: int) -> int:
    total = 0
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd_in, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                break  # only a hole is left
            raise
        end = min(os.lseek(fd_in, start, os.SEEK_HOLE), size)
        total += _copy_range(fd_in, fd_out, end - start, start)
        pos = end
    os.ftruncate(fd_out, size)  # a trailing hole: the size without the blocks
    return total


def _copy_range(fd_in: int, fd_out: int, length: int, offset: int | None) -> int:
    """Copy `length` bytes (or up to the end) from `offset` (None: from the current positions)
    with copy_file_range; plain reads and writes where the filesystem cannot."""
    total = 0
    try:
        while True:
            want = max(length - total, 0) or _CHUNK
            if offset is None:
                n = os.copy_file_range(fd_in, fd_out, want)
            else:
                n = os.copy_file_range(fd_in, fd_out, want, offset + total, offset + total)
            if n == 0:
                return total
            total += n
            if total >= length:
                # Most files end here: the size was known, so no call that only says EOF.
                return total
    except OSError as exc:
        if exc.errno not in _NO_COPY_RANGE:
            raise
    while offset is None or total < length:
        # A whole file is read to its end (it may have grown); a data range to its end only.
        want = 1 << 20 if offset is None else min(1 << 20, length - total)
        chunk = os.read(fd_in, want) if offset is None else os.pread(fd_in, want, offset + total)
        if not chunk:
            return total
        view = memoryview(chunk)
        written = 0
        while written < len(view):
            if offset is None:
                written += os.write(fd_out, view[written:])
            else:
                written += os.pwrite(fd_out, view[written:], offset + total + written)
        total += len(chunk)
    return total


def apply_xattrs(fd: int, wanted: Xattrs, rel: str, not_kept: list[str]) -> None:
    """Set exactly `wanted` on fd, removing any other attribute it carries (a default ACL of
    its folder, say). What the target cannot hold is added to not_kept, named."""
    have = read_xattrs(fd)
    wanted_names = {name for name, _ in wanted}
    for name, _ in have:
        if name not in wanted_names:
            try:
                os.removexattr(fd, name)
            except OSError as exc:
                if exc.errno not in _NOT_HELD and exc.errno != errno.ENODATA:
                    raise
    current = dict(have)
    for name, value in wanted:
        if current.get(name) == value:
            continue
        try:
            os.setxattr(fd, name, value)
        except OSError as exc:
            if exc.errno not in _NOT_HELD and exc.errno != errno.ENOSPC:
                raise
            not_kept.append(f"{rel or '.'}: {name} ({os.strerror(exc.errno or 0)})")


def finish_metadata(
    fd: int,
    st: os.stat_result,
    xattrs: Xattrs,
    *,
    owners: bool,
    rel: str,
    not_kept: list[str],
    made: os.stat_result | None = None,
) -> None:
    """Give an open file or folder the source's owner, mode, extended attributes and times.
    In this order: chown clears set-id bits and file capabilities, so mode and attributes come
    after it; every change sets the mtime, so the times come last. `made` is the stat of a
    file just created empty (no set-id bits, no attributes yet): an owner or mode it already
    has is not set again, two calls saved on most files of a copy."""
    if owners and (made is None or (made.st_uid, made.st_gid) != (st.st_uid, st.st_gid)):
        os.fchown(fd, st.st_uid, st.st_gid)
    if made is None or stat.S_IMODE(made.st_mode) != stat.S_IMODE(st.st_mode):
        os.fchmod(fd, stat.S_IMODE(st.st_mode))
    # Nothing a build makes inherits attributes (see clear_inherited), so a file or folder
    # the source gives none needs no call at all.
    if xattrs:
        apply_xattrs(fd, xattrs, rel, not_kept)
    os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))


def clear_inherited(fd: int) -> None:
    """Remove what a new tree's root inherited from the work area (a default ACL set on the
    target root, say). Its own folders get their attributes only once filled, so nothing
    below the root can inherit one: files never need checking for inherited attributes."""
    for name, _ in read_xattrs(fd):
        try:
            os.removexattr(fd, name)
        except OSError as exc:
            if exc.errno not in _NOT_HELD and exc.errno != errno.ENODATA:
                raise
