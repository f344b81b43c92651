"""The daemon's persistent state: fingerprints of sources, and what says when they changed."""

from __future__ import annotations

from pathlib import Path

from syncpro.daemon.state import fingerprint
from syncpro.engine.tree import Ignore

from helpers import app, make_config, program_source, wait_until


def test_a_deletion_directly_in_a_source_folder_counts_as_its_newest_arrival(
    tmp_path: Path,
) -> None:
    config = make_config(tmp_path, [app("server1", "server")])
    source = program_source(config, "server1")
    (source / "lib").mkdir(parents=True)
    (source / "lib/app.jar").write_text("jar\n", encoding="utf-8")
    (source / "old.txt").write_text("old\n", encoding="utf-8")
    server1 = config.config_inventory.by_key()["server1"]
    before = fingerprint(config.dirs, server1, False, Ignore(()))
    assert before is not None
    probe = tmp_path / "probe"
    # File times tick coarsely: let the clock pass everything written so far.
    wait_until(lambda: probe.write_text("x") and probe.stat().st_ctime > before.newest)
    deleted_after = probe.stat().st_ctime
    (source / "old.txt").unlink()
    after = fingerprint(config.dirs, server1, False, Ignore(()))
    assert after is not None
    assert after.digest != before.digest
    # Only the folder's own ctime says when: the deleted file left nothing else behind.
    assert after.newest >= deleted_after
