"""Compare the program trees of apps of one group: differences mean drift between servers."""

from __future__ import annotations

import filecmp
import os
import stat
from pathlib import Path

from syncpro.engine.tree import Ignore


def _listing(root: Path, ignore: Ignore) -> dict[str, os.stat_result]:
    found: dict[str, os.stat_result] = {}
    stack = [("", str(root))]
    while stack:
        rel, path = stack.pop()
        with os.scandir(path) as entries:
            for entry in entries:
                entry_rel = f"{rel}/{entry.name}" if rel else entry.name
                if ignore(entry.name, entry_rel):
                    continue
                st = entry.stat(follow_symlinks=False)
                found[entry_rel] = st
                if stat.S_ISDIR(st.st_mode):
                    stack.append((entry_rel, entry.path))
    return found


def tree_differences(a: Path, b: Path, ignore: Ignore, limit: int = 5) -> tuple[int, list[str]]:
    """Given two program trees, return how many paths differ and up to `limit` of them, each
    described. Paths present in only one tree and files whose content differs count; mtimes
    do not."""
    left, right = _listing(a, ignore), _listing(b, ignore)
    differing: list[str] = []
    for rel in sorted(left.keys() | right.keys()):
        if rel not in right:
            differing.append(f"{rel} (only in {a.name})")
        elif rel not in left:
            differing.append(f"{rel} (only in {b.name})")
        elif _differs(a / rel, b / rel, left[rel], right[rel]):
            differing.append(f"{rel} (content differs)")
    return len(differing), differing[:limit]


def _differs(pa: Path, pb: Path, sa: os.stat_result, sb: os.stat_result) -> bool:
    if stat.S_IFMT(sa.st_mode) != stat.S_IFMT(sb.st_mode):
        return True
    if stat.S_ISLNK(sa.st_mode):
        return os.readlink(pa) != os.readlink(pb)
    if not stat.S_ISREG(sa.st_mode):
        return False
    if sa.st_size != sb.st_size:
        return True
    # Always the bytes: mtimes do not count either way (reproducible builds stamp every file
    # with one time), and only the winner's tree is copied, so this read is the drift's cost.
    return not filecmp.cmp(pa, pb, shallow=False)
