"""Property: the shares of a first tree, each made by a build of its own (as the daemon's build
processes make them at once), then its folders finished, give the tree one build makes."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncpro.engine.tree import Folder, Ignore, Share, TreeBuilder, make_root

from helpers import BASE_NS, File, Symlink, snapshot, write_tree

folders = st.lists(st.sampled_from(["d1", "d2", "d3"]), max_size=3).map("/".join)
leaves = st.sampled_from(["f1", "f2", "f3", "f4", "s1", "x.tmp"])
contents = st.tuples(st.binary(max_size=24), st.sampled_from([0o644, 0o755, 0o600, 0o4755]))
trees = st.dictionaries(st.tuples(folders, leaves), contents, max_size=24)
links = st.lists(st.tuples(st.integers(0, 23), st.integers(0, 23)), max_size=6)
folder_modes = st.dictionaries(
    folders.filter(bool), st.sampled_from([0o755, 0o500, 0o700, 0o2775]), max_size=4
)


def _builder(share: Share | None = None) -> TreeBuilder:
    return TreeBuilder(
        ignore=Ignore(["*.tmp"]), reuse=None, preserve_owner=os.geteuid() == 0, share=share
    )


def _write(root: Path, tree: dict[tuple[str, str], tuple[bytes, int]]) -> list[Path]:
    """Write the tree; return its regular files, in order."""
    spec: dict[str, File | Symlink] = {}
    for (folder, leaf), (data, mode) in sorted(tree.items()):
        rel = f"{folder}/{leaf}" if folder else leaf
        spec[rel] = Symlink(data.hex()[:6] or ".") if leaf.startswith("s") else File(data, mode)
    write_tree(root, spec)
    return [root / rel for rel, entry in spec.items() if isinstance(entry, File)]


@settings(max_examples=80, deadline=None)
@given(tree=trees, pairs=links, modes=folder_modes, count=st.integers(2, 4))
def test_shares_built_one_after_another_make_the_tree_one_build_makes(
    tree: dict[tuple[str, str], tuple[bytes, int]],
    pairs: list[tuple[int, int]],
    modes: dict[str, int],
    count: int,
) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        base = Path(scratch)
        files = _write(base / "src", tree)
        for a, b in pairs if files else []:  # the b-th file becomes another name of the a-th
            first, other = files[a % len(files)], files[b % len(files)]
            if first != other:
                other.unlink()
                os.link(first, other)
        for folder, mode in sorted(modes.items(), key=lambda m: -m[0].count("/")):
            if (base / "src" / folder).is_dir():
                os.chmod(base / "src" / folder, mode)
                os.utime(base / "src" / folder, ns=(BASE_NS, BASE_NS + len(folder)))
        one = _builder()
        one.copy_tree(base / "src", base / "one")

        os.close(make_root(base / "shared"))
        walked: list[Folder] = []
        finisher = _builder()
        for index in range(count):
            share = _builder(Share(index, count))
            share.copy_tree(base / "src", base / "shared")
            finisher.stats.add(share.stats)
            walked.extend(share.folders)
        finisher.finish_folders(base / "shared", walked)

        assert snapshot(base / "shared") == snapshot(base / "one")
        for path in (base / "one").rglob("*"):
            twin = base / "shared" / path.relative_to(base / "one")
            assert twin.lstat().st_nlink == path.lstat().st_nlink, twin
        assert finisher.stats.dirs == one.stats.dirs
        assert finisher.stats.files == one.stats.files
        assert finisher.stats.hardlinks == one.stats.hardlinks
        assert finisher.stats.symlinks == one.stats.symlinks
        assert sorted(finisher.stats.skipped) == sorted(one.stats.skipped)
        for folder in (base / "one", base / "shared"):  # read-only folders, removable
            for path in [folder, *folder.rglob("*")]:
                if path.is_dir() and not path.is_symlink():
                    os.chmod(path, 0o700)


@pytest.mark.parametrize("folder_first", [True, False])
def test_a_name_a_folder_to_one_share_and_a_file_to_another_fails_the_build(
    tmp_path: Path, folder_first: bool
) -> None:
    source = write_tree(tmp_path / "src", {"a/f": "1", "b": "2"})
    staging = tmp_path / "staging"
    os.mkdir(staging, 0o700)
    owner = next(i for i in range(2) if Share(i, 2).owns("a"))  # of "a" as a file
    as_file = _builder(Share(owner, 2))
    as_folder = _builder(Share(1 - owner, 2))

    def make_a_file() -> None:
        shutil.rmtree(source / "a")
        (source / "a").write_text("a file now")

    if folder_first:
        as_folder.copy_tree(source, staging)
        make_a_file()
        with pytest.raises(FileExistsError):
            as_file.copy_tree(source, staging)
    else:
        make_a_file()
        as_file.copy_tree(source, staging)
        (source / "a").unlink()
        write_tree(source, {"a/f": "1"})
        with pytest.raises(NotADirectoryError):
            as_folder.copy_tree(source, staging)
    assert (staging / "a").is_file() != folder_first
