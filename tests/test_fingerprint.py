"""The daemon's record of what it published is made of the sync's own walk."""

from __future__ import annotations

from pathlib import Path

from syncpro.daemon.state import fingerprint
from syncpro.engine.sync import ignore_for

from helpers import app, config_source, make_config, program_source, sync, write_tree


def test_a_fingerprint_from_a_syncs_digests_equals_one_walked_afresh(tmp_path: Path) -> None:
    config = make_config(tmp_path, [app("a1", "a"), app("a2", "a")])
    for key in ("a1", "a2"):
        write_tree(program_source(config, key), {"bin": key, "lib/x": "x"})
        write_tree(config_source(config, key), {"c": key})

    result = sync(config, "a")

    ignore = ignore_for(config)
    for key in ("a1", "a2"):
        found = next(a for a in config.apps if a.app_key == key)
        walked = fingerprint(config.dirs, found, False, ignore)
        reused = fingerprint(config.dirs, found, False, ignore, known=result.digests)
        assert walked is not None and walked == reused


def test_a_change_after_the_sync_walked_shows_against_its_digests(tmp_path: Path) -> None:
    config = make_config(tmp_path, [app("a1", "a")])
    write_tree(program_source(config, "a1"), {"bin": "1"})
    write_tree(config_source(config, "a1"), {"c": "1"})
    result = sync(config, "a1")
    (program_source(config, "a1") / "bin").write_text("2")

    ignore = ignore_for(config)
    now = fingerprint(config.dirs, config.apps[0], False, ignore)
    recorded = fingerprint(config.dirs, config.apps[0], False, ignore, known=result.digests)
    assert now is not None and recorded is not None and now.digest != recorded.digest
