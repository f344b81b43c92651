"""The tree builder: exact copies, hard-link reuse, special files, type-2 listed copies."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import threading
from pathlib import Path
from typing import Any

import pytest
import structlog

from syncpro.config.model import DEFAULT_IGNORE
from syncpro.engine.tree import Ignore, ListedFileError, TreeBuilder

from helpers import BASE_NS, Dir, Fifo, File, Symlink, inodes, snapshot, write_tree

NOBODY = 65534


def _builder(reuse: Path | None = None, patterns: tuple[str, ...] = DEFAULT_IGNORE) -> TreeBuilder:
    return TreeBuilder(ignore=Ignore(patterns), reuse=reuse, preserve_owner=os.geteuid() == 0)


def _rich(tmp_path: Path) -> Path:
    outside = write_tree(tmp_path / "outside", {"secret": "s"})
    source = write_tree(
        tmp_path / "src",
        {
            "bin/run": File("#!/bin/sh\n", mode=0o755, mtime_ns=BASE_NS + 1),
            "lib/a.jar": File(b"\x00\xff" * 5000, mode=0o640, mtime_ns=BASE_NS + 987_654_321),
            "sticky": File("s", mode=0o1644, mtime_ns=BASE_NS + 3),
            "setgid": File("g", mode=0o2755, mtime_ns=BASE_NS + 4),
            "zero": File("", mode=0o000, mtime_ns=BASE_NS + 5),
            "rel-link": Symlink("lib/a.jar"),
            "dangling": Symlink("no/such/file"),
            "dir-outside": Symlink(str(outside)),
            "bin": Dir(mode=0o711, mtime_ns=BASE_NS + 6),
            "empty/nested": Dir(mode=0o700, mtime_ns=BASE_NS + 7),
            "empty": Dir(mode=0o555, mtime_ns=BASE_NS + 8),
        },
    )
    os.utime(source, ns=(BASE_NS + 9, BASE_NS + 9))
    return source


def test_copy_tree_is_exact_in_content_modes_mtimes_links_and_empty_dirs(
    tmp_path: Path,
) -> None:
    source = _rich(tmp_path)
    builder = _builder()

    builder.copy_tree(source, tmp_path / "dst")

    assert snapshot(tmp_path / "dst") == snapshot(source)
    assert builder.stats.files == 5
    assert builder.stats.symlinks == 3


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give files away")
def test_copy_tree_keeps_owners_when_running_as_root(tmp_path: Path) -> None:
    source = write_tree(tmp_path / "src", {"f": "1", "d/g": "2", "l": Symlink("f")})
    for path in (source / "f", source / "d", source / "d/g"):
        os.chown(path, NOBODY, NOBODY)
    os.lchown(source / "l", NOBODY, 0)

    _builder().copy_tree(source, tmp_path / "dst")

    assert snapshot(tmp_path / "dst") == snapshot(source)
    assert os.lstat(tmp_path / "dst/l").st_uid == NOBODY


def test_a_copied_file_is_given_only_the_owner_and_mode_it_lacks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Created with the source's permission bits, a file the umask lets through needs no
    # chmod, and one already ours no chown; set-id bits and other owners still get both.
    source = write_tree(
        tmp_path / "src",
        {
            "plain": File("1", mode=0o644),
            "masked": File("2", mode=0o666),
            "setuid": File("3", mode=0o4755),
            "none": File("4", mode=0o000),
        },
    )
    foreign = os.geteuid() == 0
    if foreign:
        os.chown(source / "plain", 0, NOBODY)
    calls: dict[str, list[int]] = {"fchmod": [], "fchown": []}
    for name, calls_of in calls.items():
        real = getattr(os, name)

        def counted(fd: int, *args: Any, real: Any = real, calls_of: list[int] = calls_of) -> None:
            calls_of.append(fd)
            real(fd, *args)

        monkeypatch.setattr(os, name, counted)
    old_umask = os.umask(0o022)
    try:
        _builder().copy_tree(source, tmp_path / "dst")
    finally:
        os.umask(old_umask)

    assert snapshot(tmp_path / "dst") == snapshot(source)
    # Two files need their mode set (0666 by the umask's doing, 4755 for its set-id bit),
    # and so does the root folder, made 0700 while being filled; it gets its owner too.
    assert len(calls["fchmod"]) == 2 + 1
    assert len(calls["fchown"]) == (1 + 1 if foreign else 0)


def test_copy_tree_never_modifies_or_links_the_source(tmp_path: Path) -> None:
    source = _rich(tmp_path)
    before = snapshot(source, identity=True)
    first = tmp_path / "dst1"
    _builder().copy_tree(source, first)

    _builder(reuse=first).copy_tree(source, tmp_path / "dst2")

    assert snapshot(source, identity=True) == before


def test_a_source_root_that_is_a_symlink_to_a_directory_is_copied_as_that_directory(
    tmp_path: Path,
) -> None:
    real = write_tree(tmp_path / "real", {"a": "1", "d/b": "2"})
    (tmp_path / "link").symlink_to(real)

    _builder().copy_tree(tmp_path / "link", tmp_path / "dst")

    assert snapshot(tmp_path / "dst") == snapshot(real)


# --- incremental: hard links from the published tree ---


def test_unchanged_files_are_hard_linked_from_the_published_tree(tmp_path: Path) -> None:
    source = write_tree(tmp_path / "src", {f"d/f{i}": f"x{i}" for i in range(50)})
    published = tmp_path / "published"
    _builder().copy_tree(source, published)
    (source / "d/f7").write_text("changed")
    builder = _builder(reuse=published)

    builder.copy_tree(source, tmp_path / "next")

    assert (builder.stats.linked, builder.stats.copied) == (49, 1)
    old, new = inodes(published), inodes(tmp_path / "next")
    assert old.pop("d/f7") != new.pop("d/f7")
    assert old == new
    assert (published / "d/f7").read_text() == "x7"  # the published tree is not touched
    assert snapshot(tmp_path / "next") == snapshot(source)


@pytest.mark.parametrize("change", ["mode", "mtime", "size", "owner"])
def test_a_file_whose_mode_mtime_size_or_owner_differ_is_copied_not_linked(
    tmp_path: Path, change: str
) -> None:
    if change == "owner" and os.geteuid() != 0:
        pytest.skip("only root keeps owners")
    source = write_tree(tmp_path / "src", {"f": File("abc", mode=0o644, mtime_ns=BASE_NS)})
    published = tmp_path / "published"
    _builder().copy_tree(source, published)
    if change == "mode":
        os.chmod(source / "f", 0o600)
    elif change == "mtime":
        os.utime(source / "f", ns=(BASE_NS, BASE_NS + 1))
    elif change == "size":
        write_tree(source, {"f": File("abcd", mode=0o644, mtime_ns=BASE_NS)})
    else:
        os.chown(source / "f", NOBODY, NOBODY)
    builder = _builder(reuse=published)

    builder.copy_tree(source, tmp_path / "next")

    assert (builder.stats.linked, builder.stats.copied) == (0, 1)
    assert snapshot(tmp_path / "next") == snapshot(source)


def test_a_published_symlink_is_never_reused_for_a_regular_file(tmp_path: Path) -> None:
    published = write_tree(tmp_path / "published", {"f": Symlink("/etc/hostname")})
    source = write_tree(tmp_path / "src", {"f": "real"})
    builder = _builder(reuse=published)

    builder.copy_tree(source, tmp_path / "next")

    assert snapshot(tmp_path / "next") == snapshot(source)


def test_a_symlinked_directory_in_the_published_tree_never_links_what_it_points_to(
    tmp_path: Path,
) -> None:
    # The published `lib` was a link to the source's own `reallib`; the source then made `lib`
    # a real directory with the same files. Reusing through the link would hard-link the
    # source's files into the target, and a later write to the source would show there.
    source = write_tree(tmp_path / "src", {"reallib/f": File("v1", mtime_ns=BASE_NS)})
    published = write_tree(
        tmp_path / "published",
        {"reallib/f": File("v1", mtime_ns=BASE_NS), "lib": Symlink(str(source / "reallib"))},
    )
    write_tree(source, {"lib/f": File("v1", mtime_ns=BASE_NS)})
    builder = _builder(reuse=published)

    builder.copy_tree(source, tmp_path / "next")

    assert (builder.stats.linked, builder.stats.copied) == (1, 1)  # reallib/f only
    assert os.stat(tmp_path / "next/lib/f").st_ino not in {
        os.stat(source / "lib/f").st_ino,
        os.stat(source / "reallib/f").st_ino,
    }
    assert snapshot(tmp_path / "next") == snapshot(source)


def test_copy_listed_never_reuses_through_a_symlink_in_the_published_tree(
    tmp_path: Path,
) -> None:
    source = write_tree(tmp_path / "src", {"conf/app.yml": File("a", mtime_ns=BASE_NS)})
    published = write_tree(tmp_path / "published", {"conf": Symlink(str(source / "conf"))})
    builder = _builder(reuse=published)

    builder.copy_listed(source, ["conf/app.yml"], tmp_path / "next")

    assert (builder.stats.linked, builder.stats.copied) == (0, 1)
    assert os.stat(tmp_path / "next/conf/app.yml").st_ino != os.stat(source / "conf/app.yml").st_ino


# --- special files ---


def _guarded(run: Any, fifos: list[Path]) -> None:
    """Run with a deadline; if it blocks on a FIFO, unblock it and fail."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            run()
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(target=target)
    worker.start()
    worker.join(timeout=20)
    if worker.is_alive():
        for fifo in fifos:
            with contextlib.suppress(OSError):
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        worker.join(timeout=5)
        pytest.fail("the copy opened a FIFO and blocked")
    if errors:
        raise errors[0]


def test_fifos_sockets_and_devices_are_skipped_with_a_warning_and_never_opened(
    tmp_path: Path,
) -> None:
    source = write_tree(tmp_path / "src", {"pipe": Fifo(), "d/pipe2": Fifo(), "file": "1"})
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(source / "sock"))
    expected_skips = ["d/pipe2", "pipe", "sock"]
    try:
        os.mknod(source / "null", 0o600 | 0o020000, os.makedev(1, 3))
        expected_skips.append("null")
    except PermissionError:
        pass  # no CAP_MKNOD in this container: FIFOs and sockets still cover the rule
    builder = _builder()

    with structlog.testing.capture_logs() as logs:
        _guarded(
            lambda: builder.copy_tree(source, tmp_path / "dst"),
            [source / "pipe", source / "d/pipe2"],
        )

    assert sorted(builder.stats.skipped) == sorted(expected_skips)
    assert sorted(os.listdir(tmp_path / "dst")) == ["d", "file"]
    assert os.listdir(tmp_path / "dst/d") == []
    warned = sorted(os.path.relpath(e["path"], source) for e in logs if e["log_level"] == "warning")
    assert warned == sorted(expected_skips)


def test_a_file_replaced_by_a_fifo_during_the_copy_fails_without_blocking(
    tmp_path: Path,
) -> None:
    source = write_tree(tmp_path / "src", {"a": "1", "swap": "2"})

    class Swapping(TreeBuilder):
        def _file(self, here: Any, entry: Any, staged: str) -> None:
            if entry.name == "swap":  # after the walk saw a regular file
                os.unlink(source / "swap")
                os.mkfifo(source / "swap")
            super()._file(here, entry, staged)

    builder = Swapping(ignore=Ignore(()), reuse=None, preserve_owner=False)

    with pytest.raises(OSError) as caught:
        _guarded(lambda: builder.copy_tree(source, tmp_path / "dst"), [source / "swap"])

    assert caught.value.errno == errno.ESTALE


# --- type-2: listed copies ---


def test_copy_listed_copies_only_the_listed_files_at_their_relative_paths(tmp_path: Path) -> None:
    source = write_tree(
        tmp_path / "src",
        {
            "config.properties": File("p", mode=0o640, mtime_ns=BASE_NS),
            "conf/app.yml": File("y", mode=0o600, mtime_ns=BASE_NS + 1),
            "conf/other.yml": "o",
            "deep/a/b/c.xml": File("c", mtime_ns=BASE_NS + 2),
            "unlisted": "u",
            "conf": Dir(mode=0o750, mtime_ns=BASE_NS + 3),
        },
    )
    builder = _builder()

    builder.copy_listed(
        source, ["config.properties", "conf/app.yml", "deep/a/b/c.xml"], tmp_path / "dst"
    )

    got = snapshot(tmp_path / "dst")
    want = snapshot(source)
    assert sorted(got) == [
        ".",
        "conf",
        "conf/app.yml",
        "config.properties",
        "deep",
        "deep/a",
        "deep/a/b",
        "deep/a/b/c.xml",
    ]
    for rel in ("conf/app.yml", "config.properties", "deep/a/b/c.xml", "conf"):
        assert got[rel] == want[rel], rel


def test_copy_listed_of_a_listed_directory_copies_it_whole(tmp_path: Path) -> None:
    source = write_tree(tmp_path / "src", {"conf/a": "1", "conf/sub/b": "2", "x": "3"})

    _builder().copy_listed(source, ["conf"], tmp_path / "dst")

    assert snapshot(tmp_path / "dst/conf") == snapshot(source / "conf")
    assert not (tmp_path / "dst/x").exists()


def test_copy_listed_names_every_bad_entry_and_copies_nothing(tmp_path: Path) -> None:
    outside = write_tree(tmp_path / "outside", {"secret": "s"})
    source = write_tree(
        tmp_path / "src", {"ok": "1", "out": Symlink(str(outside / "secret")), "in": Symlink("ok")}
    )

    with pytest.raises(ListedFileError) as caught:
        _builder().copy_listed(
            source, ["ok", "in", "missing.yml", "../x", "/abs", "out", "nul\0"], tmp_path / "dst"
        )

    text = "; ".join(caught.value.problems)
    assert len(caught.value.problems) == 5
    for entry in ("missing.yml", "../x", "/abs", "out", "nul\0"):
        assert repr(entry) in text or entry in text
    assert not (tmp_path / "dst").exists()


# --- ignore patterns ---


@pytest.mark.parametrize(
    ("name", "ignored"),
    [
        (".app.jar.AbC123", True),
        (".x.q1W2e3", True),
        ("a.part", True),
        ("a.tmp", True),
        (".a.yml.swp", True),
        ("a.yml~", True),
        ("app.jar", False),
        (".hidden", False),
        ("part", False),
    ],
)
def test_default_ignore_patterns_match_upload_temporaries_only(name: str, ignored: bool) -> None:
    assert Ignore(DEFAULT_IGNORE)(name, f"dir/{name}") is ignored


def test_ignored_names_are_left_out_of_the_copy(tmp_path: Path) -> None:
    source = write_tree(tmp_path / "src", {"a": "1", ".a.AbC123": "2", "d/b.part": "3", "d/c": "4"})

    _builder().copy_tree(source, tmp_path / "dst")

    assert sorted(snapshot(tmp_path / "dst")) == [".", "a", "d", "d/c"]
