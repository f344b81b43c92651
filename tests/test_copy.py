"""A published tree is what `cp -a` makes: holes, extended attributes, ACLs, capabilities and
hard links within the tree survive the first copy and the incremental ones."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from syncpro.engine.ignore import Ignore
from syncpro.engine.tree import TreeBuilder
from syncpro.engine.walk import plan_path

from helpers import write_tree

ROOT = os.geteuid() == 0
# security.capability, revision 2, effective, permitting cap_net_bind_service (10): what
# `setcap cap_net_bind_service+ep` writes.
CAPABILITY = struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0)


def _acl(*entries: tuple[int, int, int]) -> bytes:
    """A system.posix_acl_access value: version 2, then (tag, perm, id) entries."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


# user::rw-, user:65534:r--, group::r--, mask::r--, other::---
ACL = _acl(
    (0x01, 6, 0xFFFFFFFF),
    (0x02, 4, 65534),
    (0x04, 4, 0xFFFFFFFF),
    (0x10, 4, 0xFFFFFFFF),
    (0x20, 0, 0xFFFFFFFF),
)


def _builder(reuse: Path | None = None) -> TreeBuilder:
    return TreeBuilder(ignore=Ignore(()), reuse=reuse, preserve_owner=ROOT)


def _xattrs(path: Path) -> dict[str, bytes]:
    return {
        n: os.getxattr(path, n, follow_symlinks=False)
        for n in os.listxattr(path, follow_symlinks=False)
    }


def test_a_sparse_file_is_published_sparse_with_the_same_bytes(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    size = 256 << 20
    with open(source / "disk.img", "wb") as f:
        f.seek(1 << 20)
        f.write(b"eighteen bytes :-)")
        f.seek(100 << 20)
        f.write(b"more")
        f.truncate(size)
    assert os.stat(source / "disk.img").st_blocks * 512 < 1 << 20  # the filesystem made holes

    builder = _builder()
    builder.copy_tree(source, tmp_path / "dst")

    copy = tmp_path / "dst/disk.img"
    st = os.stat(copy)
    assert st.st_size == size
    assert st.st_blocks * 512 <= 1 << 20, "holes were filled in"
    with open(source / "disk.img", "rb") as a, open(copy, "rb") as b:
        for offset in (0, 1 << 20, 100 << 20, size - 4096):
            a.seek(offset)
            b.seek(offset)
            assert a.read(4096) == b.read(4096)
    assert builder.stats.bytes_copied < 1 << 20


def test_a_file_ending_in_data_after_a_hole_keeps_its_tail(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    with open(source / "f", "wb") as f:
        f.seek(8 << 20)
        f.write(b"tail")
    _builder().copy_tree(source, tmp_path / "dst")
    data = (tmp_path / "dst/f").read_bytes()
    assert len(data) == (8 << 20) + 4 and data.endswith(b"tail") and not data[:-4].strip(b"\0")


@pytest.mark.skipif(not ROOT, reason="security.* and ACLs of other users need root")
def test_xattrs_acls_and_capabilities_are_published_on_files_and_folders(tmp_path: Path) -> None:
    source = write_tree(tmp_path / "src", {"bin/server": "#!/bin/sh\n", "conf/a": "x"})
    os.setxattr(source / "bin/server", "user.origin", b"build-42")
    os.setxattr(source / "bin/server", "security.capability", CAPABILITY)
    os.setxattr(source / "conf/a", "system.posix_acl_access", ACL)
    os.setxattr(source / "conf", "user.folder", b"yes")
    os.setxattr(source / "conf", "system.posix_acl_default", ACL)

    builder = _builder()
    builder.copy_tree(source, tmp_path / "dst")

    dst = tmp_path / "dst"
    for rel in ("bin/server", "conf/a", "conf"):
        assert _xattrs(dst / rel) == _xattrs(source / rel), rel
    assert os.getxattr(dst / "bin/server", "security.capability") == CAPABILITY
    assert builder.stats.not_kept == []


@pytest.mark.skipif(not ROOT, reason="ACLs of other users need root")
def test_a_folders_default_acl_is_not_inherited_by_files_that_lack_one(tmp_path: Path) -> None:
    source = write_tree(tmp_path / "src", {"conf/plain": "x"})
    os.setxattr(source / "conf", "system.posix_acl_default", ACL)
    assert "system.posix_acl_access" not in os.listxattr(source / "conf/plain")

    _builder().copy_tree(source, tmp_path / "dst")

    assert _xattrs(tmp_path / "dst/conf/plain") == _xattrs(source / "conf/plain")
    assert os.stat(tmp_path / "dst/conf/plain").st_mode == os.stat(source / "conf/plain").st_mode


def test_a_changed_xattr_alone_is_a_change_and_is_published(tmp_path: Path) -> None:
    source = write_tree(tmp_path / "src", {"a": "1", "b": "2"})
    os.setxattr(source / "a", "user.v", b"1")
    published = tmp_path / "pub"
    _builder().copy_tree(source, published)
    assert plan_path(source, published, Ignore(()), owners=ROOT).unchanged

    st = os.stat(source / "a")
    os.setxattr(source / "a", "user.v", b"2")
    os.utime(source / "a", ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime as before
    plan = plan_path(source, published, Ignore(()), owners=ROOT)
    assert not plan.unchanged
    assert [e.rel for e in plan.entries if e.reuse] == ["b"]

    builder = _builder(reuse=published)
    builder.copy_tree(source, tmp_path / "next", plan)
    assert os.getxattr(tmp_path / "next/a", "user.v") == b"2"
    assert os.getxattr(published / "a", "user.v") == b"1"  # the old tree is never touched
    assert (builder.stats.copied, builder.stats.linked) == (1, 1)


def test_hard_links_within_the_tree_stay_hard_links_also_incrementally(tmp_path: Path) -> None:
    source = write_tree(tmp_path / "src", {"lib/a.jar": "jar", "other": "o"})
    os.link(source / "lib/a.jar", source / "lib/b.jar")
    os.link(source / "lib/a.jar", source / "c.jar")

    first = _builder()
    first.copy_tree(source, tmp_path / "pub")
    pub = tmp_path / "pub"
    inodes = {os.stat(pub / rel).st_ino for rel in ("lib/a.jar", "lib/b.jar", "c.jar")}
    assert len(inodes) == 1
    assert os.stat(pub / "other").st_ino not in inodes
    assert (first.stats.copied, first.stats.hardlinks) == (2, 2)

    plan = plan_path(source, pub, Ignore(()), owners=ROOT)
    assert plan.unchanged
    (source / "other").write_text("changed")
    nxt = _builder(reuse=pub)
    nxt.copy_tree(source, tmp_path / "next")
    again = {os.stat(tmp_path / "next" / rel).st_ino for rel in ("lib/a.jar", "lib/b.jar", "c.jar")}
    assert again == inodes  # linked from the published tree, still one inode


def test_a_published_tree_linking_what_the_source_keeps_apart_is_not_unchanged(
    tmp_path: Path,
) -> None:
    source = write_tree(tmp_path / "src", {"a": "same", "b": "same"})
    st = os.stat(source / "a")
    os.utime(source / "b", ns=(st.st_atime_ns, st.st_mtime_ns))
    published = tmp_path / "pub"
    published.mkdir()
    (published / "a").write_text("same")
    os.link(published / "a", published / "b")
    for rel in ("a",):
        os.utime(published / rel, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.chmod(published / "a", os.stat(source / "a").st_mode & 0o7777)
    os.chmod(published, os.stat(source).st_mode & 0o7777)
    src_root = os.stat(source)
    os.utime(published, ns=(src_root.st_atime_ns, src_root.st_mtime_ns))

    plan = plan_path(source, published, Ignore(()), owners=ROOT)

    assert not plan.unchanged
    _builder(reuse=published).copy_tree(source, tmp_path / "next", plan)
    assert os.stat(tmp_path / "next/a").st_ino != os.stat(tmp_path / "next/b").st_ino


def test_the_manifest_spares_rereading_attributes_yet_an_xattr_change_is_published(
    tmp_path: Path,
) -> None:
    from syncpro.engine.layout import Target
    from syncpro.engine.publish import manifest_path
    from syncpro.engine.walk import Manifest

    from helpers import app, config_source, make_config, program_source, program_target, sync

    config = make_config(tmp_path, [app("a1", "a")])
    source = write_tree(program_source(config, "a1"), {"bin/x": "1", "lib/y": "2"})
    write_tree(config_source(config, "a1"), {"c": "1"})
    os.setxattr(source / "lib/y", "user.v", b"1")
    assert sync(config, "a1").ok
    target = program_target(config, "a1")
    known = Manifest.load(manifest_path(Target(config.dirs.softdir, "a")))
    assert known is not None and set(known.entries) == {"bin", "bin/x", "lib", "lib/y"}

    plan = plan_path(source, target, Ignore(()), owners=ROOT)
    assert plan.unchanged and plan.read_in_full == 4  # no manifest given: all read
    builder = _builder(reuse=target)
    plan = builder.plan(source, known)
    assert plan.unchanged and plan.read_in_full == 0

    st = os.stat(source / "lib/y")
    os.setxattr(source / "lib/y", "user.v", b"2")
    os.utime(source / "lib/y", ns=(st.st_atime_ns, st.st_mtime_ns))
    plan = _builder(reuse=target).plan(source, known)
    assert not plan.unchanged and plan.read_in_full >= 1
    assert sync(config, "a1").ok
    assert os.getxattr(target / "lib/y", "user.v") == b"2"


def test_a_manifest_of_another_tree_is_never_trusted(tmp_path: Path) -> None:
    from syncpro.engine.walk import Manifest

    source = write_tree(tmp_path / "src", {"a": "1"})
    os.setxattr(source / "a", "user.v", b"1")
    published = tmp_path / "pub"
    builder = _builder()
    builder.copy_tree(source, published)
    assert builder.manifest is not None
    os.setxattr(published / "a", "user.v", b"tampered")  # ctime of the source unchanged
    stale = Manifest((0, 0), builder.manifest.entries)

    assert not _builder(reuse=published).plan(source, stale).unchanged
    # The tree's own manifest vouches for the source as it was compared: a change made
    # inside the published tree by hand is the one thing it does not see.
    assert _builder(reuse=published).plan(source, builder.manifest).unchanged


@pytest.mark.skipif(not ROOT, reason="ACLs of other users need root")
def test_a_default_acl_over_the_work_area_reaches_nothing_published(tmp_path: Path) -> None:
    source = write_tree(tmp_path / "src", {"d/f": "x", "g": "y"})
    area = tmp_path / "staging"
    area.mkdir()
    os.setxattr(area, "system.posix_acl_default", ACL)  # an admin's default on the target root

    _builder().copy_tree(source, area / "new")

    for rel in ("", "d", "d/f", "g"):
        assert _xattrs(area / "new" / rel) == _xattrs(source / rel), rel
