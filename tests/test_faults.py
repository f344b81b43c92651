"""Real faults under a real sync: a full filesystem, holes that must not fill it."""

from __future__ import annotations

import os
from pathlib import Path

from small_fs import ramfs, remount, small_ext4
from syncpro.config.load import load_config
from syncpro.config.model import Config
from syncpro.engine.response import response_document

from helpers import (
    app,
    config_dict,
    config_source,
    program_source,
    program_target,
    snapshot,
    sync,
    write_config,
    write_tree,
)


def _app_on(mnt: Path, tmp_path: Path) -> tuple[Config, Path]:
    """A config whose targets lie on mnt, app a1's sources made (empty) outside it; return the
    config and a1's program source."""
    doc = config_dict([app("a1", "a")], grace=30)
    doc["dirs"]["softdir"] = str(mnt / "softdir")
    doc["dirs"]["configuredir"] = str(mnt / "configuredir")
    config = load_config(str(write_config(tmp_path / "config.yml", doc)))
    program_source(config, "a1").mkdir(parents=True)
    config_source(config, "a1").mkdir(parents=True)
    return config, program_source(config, "a1")


def test_a_full_target_filesystem_fails_the_publish_keeps_the_old_tree_and_says_why(
    tmp_path: Path,
) -> None:
    with small_ext4(tmp_path) as mnt:
        config, source = _app_on(mnt, tmp_path)
        (source / "big.bin").write_bytes(os.urandom(7 << 20))
        assert sync(config, "a1").ok
        old = snapshot(program_target(config, "a1"))

        (source / "big.bin").write_bytes(os.urandom(7 << 20))  # old + new do not fit
        result = sync(config, "a1")

        program = result.apps[0].program
        assert program is not None and program.status == "failed"
        assert "No space left" in (program.error or "")
        assert f"the filesystem of {mnt / 'softdir'}" in (program.error or "")
        assert "grace period" in (program.error or "")
        assert snapshot(program_target(config, "a1")) == old
        assert os.listdir(mnt / "softdir/.syncpro/staging") == []


def test_a_sparse_file_bigger_than_the_target_filesystem_publishes_sparse(
    tmp_path: Path,
) -> None:
    with small_ext4(tmp_path) as mnt:
        config, source = _app_on(mnt, tmp_path)
        with open(source / "disk.img", "wb") as f:
            f.seek(100 << 20)
            f.write(b"eighteen bytes :-)")
            f.truncate(256 << 20)

        result = sync(config, "a1")

        assert result.ok, result.errors
        published = program_target(config, "a1") / "disk.img"
        assert published.stat().st_size == 256 << 20
        with open(published, "rb") as f:
            f.seek(100 << 20)
            assert f.read(18) == b"eighteen bytes :-)"


def test_running_out_of_inodes_fails_the_publish_and_keeps_the_old_tree(tmp_path: Path) -> None:
    with small_ext4(tmp_path, inodes=128) as mnt:
        config, source = _app_on(mnt, tmp_path)
        write_tree(source, {f"f{i}": "x" for i in range(40)})
        assert sync(config, "a1").ok
        old = snapshot(program_target(config, "a1"))

        write_tree(source, {f"new{i}": "x" for i in range(200)})
        result = sync(config, "a1")

        program = result.apps[0].program
        assert program is not None and program.status == "failed"
        assert "inodes free" in (program.error or "")
        assert snapshot(program_target(config, "a1")) == old


def test_a_read_only_target_filesystem_fails_the_sync_and_the_next_one_converges(
    tmp_path: Path,
) -> None:
    with small_ext4(tmp_path) as mnt:
        config, source = _app_on(mnt, tmp_path)
        write_tree(source, {"v": "1"})
        assert sync(config, "a1").ok
        (source / "v").write_text("2")

        remount(mnt, "ro")
        try:
            result = sync(config, "a1")
            assert not result.ok
            assert "Read-only file system" in " ".join(result.errors)
            assert (program_target(config, "a1") / "v").read_text() == "1"
        finally:
            remount(mnt, "rw")

        assert sync(config, "a1").ok
        assert (program_target(config, "a1") / "v").read_text() == "2"


def test_attributes_a_target_filesystem_cannot_hold_are_named_and_the_rest_published(
    tmp_path: Path,
) -> None:
    with ramfs(tmp_path) as mnt:
        config, source = _app_on(mnt, tmp_path)
        write_tree(source, {"bin/run": "1", "plain": "2"})
        os.setxattr(source / "bin/run", "user.origin", b"build-42")

        result = sync(config, "a1")

        assert result.ok, result.errors
        program = result.apps[0].program
        assert program is not None and program.stats is not None
        assert program.stats.not_kept == ["bin/run: user.origin (Operation not supported)"]
        assert (program_target(config, "a1") / "bin/run").read_text() == "1"
        message = response_document(result)["data"]["msg"]
        assert message.startswith("成功: ") and "could not keep bin/run: user.origin" in message
