"""The walk of a source never leaves it, whatever an uploader swaps in while it runs; and its
"unchanged" answer is the one rule every comparison uses."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from syncpro.engine.ignore import Ignore
from syncpro.engine.tree import TreeBuilder
from syncpro.engine.walk import open_beneath, plan_path

from helpers import wait_until, write_tree

NOBODY = 65534
SECRET = b"-----BEGIN ROOT-ONLY KEY-----"
# Runs as the unprivileged uploader: swaps a folder and a symlink of the source as fast as it
# can, through a descriptor of the source handed over by the test (it may not reach its path).
_SWAPPER = r"""
import ctypes, signal, sys
libc = ctypes.CDLL(None, use_errno=True)
fd, stop, swaps = int(sys.argv[1]), [], 0
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
print("ready", flush=True)
while not stop:
    if libc.renameat2(fd, b"keys", fd, b"zz", 2) == 0:
        swaps += 1
print(swaps, flush=True)
"""


def _system_python() -> str:
    # The venv's interpreter may live under a folder the uploader cannot enter.
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.access(candidate, os.X_OK):
            return candidate
    return sys.executable


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root")
def test_a_symlink_swapped_in_by_an_uploader_never_publishes_a_file_from_outside(
    tmp_path: Path,
) -> None:
    secret = tmp_path / "secret"
    secret.mkdir(mode=0o700)
    (secret / "id_rsa").write_bytes(SECRET)
    os.chmod(secret / "id_rsa", 0o600)
    source = write_tree(tmp_path / "src", {"keys/id_rsa": "public half", "app.jar": "jar"})
    os.symlink("../secret", source / "zz")
    for path in (source, source / "keys", source / "keys/id_rsa"):
        os.chown(path, NOBODY, NOBODY)
    os.lchown(source / "zz", NOBODY, NOBODY)

    src_fd = os.open(source, os.O_RDONLY | os.O_DIRECTORY)
    swapper = subprocess.Popen(
        [
            *("setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups"),
            *(_system_python(), "-c", _SWAPPER, str(src_fd)),
        ],
        pass_fds=(src_fd,),
        stdout=subprocess.PIPE,
        text=True,
    )
    published = failed = 0
    shapes: set[bool] = set()
    try:
        assert swapper.stdout is not None
        assert swapper.stdout.readline().strip() == "ready"
        for trial in range(300):
            dst = tmp_path / f"dst{trial}"
            try:
                TreeBuilder(ignore=Ignore(()), reuse=None, preserve_owner=True).copy_tree(
                    source, dst
                )
            except OSError:
                failed += 1  # a race may fail a sync; it must never leak
                continue
            published += 1
            for folder, _, files in os.walk(dst):
                for name in files:
                    path = Path(folder, name)
                    if not path.is_symlink():
                        assert SECRET not in path.read_bytes(), f"leaked into {path}"
            shapes.add((dst / "keys").is_symlink())
            shutil.rmtree(dst)
    finally:
        swapper.terminate()
        out, _ = swapper.communicate(timeout=30)
        os.close(src_fd)
    swaps = int(out.strip() or 0)
    assert swaps > 1000, "the uploader did not race the walk"
    assert published > 0
    assert shapes == {True, False}, "every sync saw the same shape: no race was exercised"


def test_open_beneath_refuses_a_symlink_in_any_component(tmp_path: Path) -> None:
    root = write_tree(tmp_path / "src", {"a/b/c": "x"})
    os.symlink("a", root / "link")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        inner = open_beneath(fd, "a/b/c", os.O_RDONLY)
        assert os.read(inner, 10) == b"x"
        os.close(inner)
        with pytest.raises(OSError):
            open_beneath(fd, "link/b/c", os.O_RDONLY)
    finally:
        os.close(fd)


def test_a_folder_swapped_between_walk_and_build_fails_the_build(tmp_path: Path) -> None:
    source = write_tree(tmp_path / "src", {"keys/k": "k", "other/o": "o"})
    builder = TreeBuilder(ignore=Ignore(()), reuse=None, preserve_owner=False)
    plan = builder.plan(source)
    os.rename(source / "keys", source / "old")
    os.rename(source / "other", source / "keys")

    with pytest.raises(OSError):
        builder.copy_tree(source, tmp_path / "dst", plan)


def test_a_published_tree_with_an_extra_name_is_not_unchanged(tmp_path: Path) -> None:
    source = write_tree(tmp_path / "src", {"a": "1", "d/b": "2"})
    published = tmp_path / "pub"
    TreeBuilder(ignore=Ignore(()), reuse=None, preserve_owner=False).copy_tree(source, published)
    assert plan_path(source, published, Ignore(()), owners=False).unchanged

    (published / "d/stray").write_text("x")
    wait_until(lambda: (published / "d/stray").exists())

    assert not plan_path(source, published, Ignore(()), owners=False).unchanged
