"""The filesystem a benchmark runs on: what it is, and a fresh journaled ext4 to run on.

Why it matters here: an ext4 made without a journal (this kind of VM's root filesystem is one)
checks, for every new inode, whether the free inodes before it were deleted in the last
minute (six, while their inode table block is still dirty), and skips those. After a big
removal (a baseline's copy, a reset target), every create then scans thousands of them: the
same `cp -a` of 100,000 files took 3.5 s in one round and 43 s in another. A deploy host's
filesystem keeps a journal (ext4's default, XFS always), where the kernel does no such scan.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from syncpro.engine.publish import ext4_journaled

_NOT_LAZY = "lazy_itable_init=0,lazy_journal_init=0"


def describe(path: Path) -> str:
    """The type of path's filesystem, and for ext4 whether it keeps a journal."""
    found = subprocess.run(
        ["findmnt", "-n", "-o", "FSTYPE", "-T", str(path)], capture_output=True, text=True
    )
    kind = found.stdout.strip() or "unknown"
    if kind != "ext4":
        return kind
    return "ext4" if ext4_journaled(os.stat(path).st_dev) else "ext4 without a journal"


def warning(path: Path) -> str | None:
    """A line for the report when figures taken on path's filesystem mislead."""
    if describe(path) == "ext4 without a journal":
        return (
            "warning: this ext4 has no journal: for minutes after a big removal, creating"
            " files is several times slower, for whoever creates them; --loop-ext4 GIB runs"
            " on a journaled ext4 instead"
        )
    return None


@contextlib.contextmanager
def loop_ext4(size_gib: int, beside: Path | None = None) -> Iterator[Path]:
    """A fresh ext4 (with its journal, as mkfs makes it) of size_gib GiB, loop-mounted for the
    block, its image a sparse file in `beside` (the system's temporary dir by default);
    unmounted and removed whatever happens. Needs root."""
    work = Path(tempfile.mkdtemp(prefix="syncpro-bench-fs.", dir=beside))
    image, mnt = work / "fs.img", work / "mnt"
    mnt.mkdir()
    mounted = False
    try:
        with open(image, "wb") as f:
            f.truncate(size_gib << 30)
        # Inode tables made now, not by the kernel's lazy-init thread while contenders run.
        subprocess.run(["mkfs.ext4", "-q", "-F", "-E", _NOT_LAZY, str(image)], check=True)
        subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
        mounted = True
        yield mnt
    finally:
        if mounted:
            subprocess.run(["umount", str(mnt)], check=False)
        image.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            mnt.rmdir()
            work.rmdir()
