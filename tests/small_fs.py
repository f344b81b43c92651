"""A small loop-mounted ext4 for real disk-full and read-only faults; always unmounted."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


def can_mount() -> bool:
    return os.geteuid() == 0 and all(shutil.which(c) for c in ("mkfs.ext4", "mount", "umount"))


@contextlib.contextmanager
def small_ext4(
    where: Path, size_mib: int = 16, inodes: int | None = None, journal: bool = True
) -> Iterator[Path]:
    """Mount a fresh ext4 of size_mib (with that many inodes, if given; without a journal if
    told) at where/mnt for the block; unmount whatever happens."""
    if not can_mount():
        pytest.skip("needs root, mkfs.ext4 and mount for a loop-mounted filesystem")
    image, mnt = where / "fs.img", where / "mnt"
    mnt.mkdir(parents=True)
    with open(image, "wb") as f:
        f.truncate(size_mib << 20)
    extra = ["-N", str(inodes)] if inodes else []
    if not journal:
        extra += ["-O", "^has_journal"]
    subprocess.run(["mkfs.ext4", "-q", "-F", *extra, str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def remount(mnt: Path, mode: str) -> None:
    """Remount mnt read-only ("ro") or read-write ("rw")."""
    subprocess.run(["mount", "-o", f"remount,{mode}", str(mnt)], check=True)


@contextlib.contextmanager
def ramfs(where: Path) -> Iterator[Path]:
    """Mount a ramfs (no extended attributes at all) at where/ram; unmount whatever happens."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root and mount")
    mnt = where / "ram"
    mnt.mkdir(parents=True)
    subprocess.run(["mount", "-t", "ramfs", "ramfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
