"""Compare the program trees of apps of one group: differences mean drift between servers."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from syncpro.engine.ignore import Ignore
from syncpro.engine.walk import Entry, TreePlan, open_beneath, plan_path

_OPEN = os.O_RDONLY | os.O_NONBLOCK
_BLOCK = 1 << 20


def tree_differences(
    a: Path,
    b: Path,
    ignore: Ignore,
    limit: int = 5,
    plans: tuple[TreePlan | None, TreePlan | None] = (None, None),
) -> tuple[int, list[str]]:
    """Given two program trees (and their walks, where already made), return how many paths
    differ and up to `limit` of them, each described. Paths present in only one tree and files
    whose content differs count; mtimes do not. Both trees are walked and read by
    descriptors, as a sync reads them."""
    plan_a = plans[0] or plan_path(a, None, ignore, owners=False)
    plan_b = plans[1] or plan_path(b, None, ignore, owners=False)
    left = {e.rel: e for e in plan_a.entries}
    right = {e.rel: e for e in plan_b.entries}
    differing: list[str] = []
    fd_a = os.open(a, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fd_b = os.open(b, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for rel in sorted(left.keys() | right.keys()):
                if rel not in right:
                    differing.append(f"{rel} (only in {a.name})")
                elif rel not in left:
                    differing.append(f"{rel} (only in {b.name})")
                elif _differs(fd_a, fd_b, left[rel], right[rel]):
                    differing.append(f"{rel} (content differs)")
        finally:
            os.close(fd_b)
    finally:
        os.close(fd_a)
    return len(differing), differing[:limit]


def _differs(fd_a: int, fd_b: int, ea: Entry, eb: Entry) -> bool:
    if stat.S_IFMT(ea.st.st_mode) != stat.S_IFMT(eb.st.st_mode):
        return True
    if stat.S_ISLNK(ea.st.st_mode):
        return ea.link != eb.link
    if not stat.S_ISREG(ea.st.st_mode):
        return False
    if ea.st.st_size != eb.st.st_size:
        return True
    # Always the bytes: mtimes do not count either way (reproducible builds stamp every file
    # with one time), and only the winner's tree is copied, so this read is the drift's cost.
    return not _same_bytes(fd_a, fd_b, ea.rel)


def _same_bytes(fd_a: int, fd_b: int, rel: str) -> bool:
    fa = open_beneath(fd_a, rel, _OPEN)
    try:
        fb = open_beneath(fd_b, rel, _OPEN)
        try:
            if not (stat.S_ISREG(os.fstat(fa).st_mode) and stat.S_ISREG(os.fstat(fb).st_mode)):
                return False
            while True:
                block_a, block_b = os.read(fa, _BLOCK), os.read(fb, _BLOCK)
                if block_a != block_b:
                    return False
                if not block_a:
                    return True
        finally:
            os.close(fb)
    finally:
        os.close(fa)
