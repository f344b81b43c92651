"""SPEC sections 2-5 through `run_sync`: layout, exactness, selection, groups, type-2, result."""

from __future__ import annotations

import gc
import os
import shlex
import threading
from pathlib import Path
from typing import Any

import pytest
import structlog

from syncpro.config.load import load_config
from syncpro.engine import sync as engine
from syncpro.engine.publish import work_area
from syncpro.engine.response import response_document
from syncpro.engine.tree import Ignore, TreeBuilder
from syncpro.engine.walk import Entry, plan_path
from syncpro.errors import RequestError

from helpers import (
    BASE_NS,
    SERVER_GROUP,
    Dir,
    Fifo,
    File,
    Symlink,
    app,
    config_dict,
    config_source,
    config_target,
    holding,
    inodes,
    make_config,
    program_source,
    program_target,
    snapshot,
    sync,
    wait_until,
    write_config,
    write_tree,
)

SERVER = SERVER_GROUP


def _status(result: Any, key: str, kind: str) -> str:
    outcome = next(a for a in result.apps if a.app_key == key)
    return str(getattr(outcome, kind).status)


# --- layout (SPEC 2) ---


def test_update_0_publishes_program_from_remotecomdir_softdir_app_key_to_softdir_local_name(
    tmp_path: Path,
) -> None:
    config = make_config(tmp_path, SERVER)
    write_tree(config.dirs.remotecomdir / "softdir" / "server1", {"bin/run": "v1"})

    result = sync(config, "server1")

    assert result.ok is False  # its config source is missing
    assert (config.dirs.softdir / "server" / "bin/run").read_text() == "v1"
    assert not (config.dirs.softdir / "server1").exists()


def test_update_0_publishes_config_from_remotecomdir_configuredir_app_key(
    tmp_path: Path,
) -> None:
    config = make_config(tmp_path, SERVER)
    write_tree(config.dirs.remotecomdir / "softdir" / "server1", {"bin/run": "v1"})
    write_tree(config.dirs.remotecomdir / "configuredir" / "server1", {"app.conf": "c1"})

    result = sync(config, "server1")

    assert result.ok
    assert (config.dirs.configuredir / "server" / "server1" / "app.conf").read_text() == "c1"


def test_update_1_publishes_program_from_updatedir_softdir_local_name(tmp_path: Path) -> None:
    config = make_config(tmp_path, SERVER)
    write_tree(config.dirs.updatedir / "softdir" / "server", {"bin/run": "new"})
    write_tree(config.dirs.remotecomdir / "softdir" / "server1", {"bin/run": "downloaded"})

    sync(config, "server1", update=True)

    assert (config.dirs.softdir / "server" / "bin/run").read_text() == "new"


def test_update_1_publishes_config_from_updatedir_configuredir_local_name_app_key(
    tmp_path: Path,
) -> None:
    config = make_config(tmp_path, SERVER)
    write_tree(config.dirs.updatedir / "softdir" / "server", {"bin/run": "new"})
    write_tree(config.dirs.updatedir / "configuredir" / "server" / "server1", {"a.conf": "1"})
    write_tree(config.dirs.updatedir / "configuredir" / "server" / "server2", {"a.conf": "2"})

    result = sync(config, "server", update=True)

    assert result.ok, result.errors
    assert (config.dirs.configuredir / "server" / "server1" / "a.conf").read_text() == "1"
    assert (config.dirs.configuredir / "server" / "server2" / "a.conf").read_text() == "2"


# --- exact copy (SPEC 2) ---


def _rich_tree(outside: Path) -> dict[str, Any]:
    outside.mkdir(parents=True, exist_ok=True)
    (outside / "secret").write_text("outside")
    return {
        "bin/run": File("#!/bin/sh\n", mode=0o755, mtime_ns=BASE_NS + 1),
        "lib/a.jar": File(b"\x00\x01binary", mode=0o640, mtime_ns=BASE_NS + 123_456_789),
        "setuid": File("s", mode=0o4750, mtime_ns=BASE_NS + 7),
        "empty": File("", mode=0o600, mtime_ns=BASE_NS + 9),
        "current": Symlink("lib/a.jar"),
        "dangling": Symlink("does/not/exist"),
        "outside": Symlink(str(outside)),
        "lib": Dir(mode=0o750, mtime_ns=BASE_NS + 5),
        "var/empty": Dir(mode=0o700, mtime_ns=BASE_NS + 11),
        "var": Dir(mode=0o2775, mtime_ns=BASE_NS + 13),
    }


def test_program_target_is_an_exact_copy_of_its_source(tmp_path: Path) -> None:
    config = make_config(tmp_path, SERVER)
    source = program_source(config, "server1")
    write_tree(source, _rich_tree(tmp_path / "elsewhere"))
    os.utime(source, ns=(BASE_NS + 3, BASE_NS + 3))

    sync(config, "server1")

    assert snapshot(program_target(config, "server1")) == snapshot(source)


def test_symlinks_are_published_as_links_and_never_followed(tmp_path: Path) -> None:
    config = make_config(tmp_path, SERVER)
    source = program_source(config, "server1")
    write_tree(source, _rich_tree(tmp_path / "elsewhere"))

    sync(config, "server1")

    target = program_target(config, "server1")
    assert (target / "outside").is_symlink()
    assert os.readlink(target / "outside") == str(tmp_path / "elsewhere")
    assert os.readlink(target / "dangling") == "does/not/exist"
    assert not any(p.name == "secret" for p in target.rglob("*") if not p.is_symlink())


def test_files_absent_from_the_source_do_not_survive_in_the_target(tmp_path: Path) -> None:
    config = make_config(tmp_path, SERVER)
    source = program_source(config, "server1")
    write_tree(source, {"keep": "1", "gone": "2", "old/dir/file": "3"})
    sync(config, "server1")
    (source / "gone").unlink()
    (source / "old/dir/file").unlink()
    (source / "old/dir").rmdir()

    sync(config, "server1")

    assert snapshot(program_target(config, "server1")) == snapshot(source)
    assert not (program_target(config, "server1") / "gone").exists()


def test_sources_are_never_modified_moved_or_linked(tmp_path: Path) -> None:
    config = make_config(tmp_path, [*SERVER, app("web1", "web", status=1, files="a.yml")])
    outside = tmp_path / "elsewhere"
    for key in ("server1", "server2"):
        write_tree(program_source(config, key), _rich_tree(outside))
        write_tree(config_source(config, key), {"app.conf": key})
    write_tree(program_source(config, "web1"), {"w": "w"})
    write_tree(config_source(config, "web1"), {"a.yml": "a", "b.yml": "b"})
    write_tree(config.dirs.updatedir / "softdir" / "server", _rich_tree(outside))
    before = snapshot(config.dirs.remotecomdir, identity=True)
    before_update = snapshot(config.dirs.updatedir, identity=True)

    for _ in range(2):  # the second run reuses the published tree
        sync(config, "all")
        sync(config, "server", update=True)

    assert snapshot(config.dirs.remotecomdir, identity=True) == before
    assert snapshot(config.dirs.updatedir, identity=True) == before_update


# --- k spellings and selection (SPEC 4) ---


@pytest.mark.parametrize(
    "k",
    [
        "'server'",
        '"server1 server2"',
        "server1,server2",
        " server1 ,  server2,,",
        "'server1, server2'",
        "server2 server1 server2",
    ],
)
def test_every_k_spelling_of_the_seed_selects_the_same_apps(tmp_path: Path, k: str) -> None:
    config = make_config(tmp_path, [*SERVER, app("web1", "web")])

    result = sync(config, k)

    assert [a.app_key for a in result.apps] == ["server1", "server2"]
    assert result.unknown == ()


def test_duplicate_tokens_collapse_and_k_is_echoed_normalised(tmp_path: Path) -> None:
    config = make_config(tmp_path, SERVER)

    result = sync(config, "server1,server1 'server1'")

    assert [a.app_key for a in result.apps] == ["server1"]
    assert response_document(result)["param"]["k"] == "server1"


def test_apps_are_processed_in_inventory_order(tmp_path: Path) -> None:
    config = make_config(tmp_path, [app("b", "g2"), app("a", "g1"), app("c", "g2")])

    result = sync(config, "c a b")

    assert [a.app_key for a in result.apps] == ["b", "a", "c"]


def test_a_token_that_is_both_app_key_and_local_name_selects_both(tmp_path: Path) -> None:
    config = make_config(
        tmp_path, [app("web", "frontend"), app("web1", "web"), app("web2", "web"), app("x", "y")]
    )

    result = sync(config, "web")

    assert [a.app_key for a in result.apps] == ["web", "web1", "web2"]


def test_all_selects_every_auto_deploy_app(tmp_path: Path) -> None:
    config = make_config(
        tmp_path, [*SERVER, app("web1", "web"), app("manual", "web", auto_deploy=False)]
    )

    result = sync(config, "all")

    assert [a.app_key for a in result.apps] == ["server1", "server2", "web1"]


def test_an_app_without_auto_deploy_is_an_unknown_key(tmp_path: Path) -> None:
    config = make_config(tmp_path, [app("manual", "web", auto_deploy=False)])
    write_tree(program_source(config, "manual"), {"f": "1"})

    result = sync(config, "manual")

    assert result.apps == []
    assert result.unknown == ("manual",)
    assert not program_target(config, "manual").exists()


def test_unknown_token_is_named_but_known_tokens_still_sync(tmp_path: Path) -> None:
    config = make_config(tmp_path, SERVER)
    write_tree(program_source(config, "server1"), {"f": "1"})
    write_tree(config_source(config, "server1"), {"c": "1"})

    result = sync(config, "server1 nosuch")
    doc = response_document(result)

    assert (program_target(config, "server1") / "f").read_text() == "1"
    assert _status(result, "server1", "program") == "published"
    assert doc["data"]["data"]["0"] == "0"
    assert "nosuch" in doc["data"]["msg"]
    assert doc["unknown"] == ["nosuch"]


@pytest.mark.parametrize("k", ["", "   ", ",, ,", "''", '""'])
def test_an_empty_k_is_an_error(tmp_path: Path, k: str) -> None:
    config = make_config(tmp_path, SERVER)

    with pytest.raises(RequestError):
        sync(config, k)


# --- groups (SPEC 2) ---


def test_last_app_in_inventory_order_whose_program_exists_wins(tmp_path: Path) -> None:
    config = make_config(tmp_path, [*SERVER, app("server3", "server")])
    write_tree(program_source(config, "server1"), {"version": "1"})
    write_tree(program_source(config, "server2"), {"version": "2"})  # server3 has none

    result = sync(config, "server3 server2 server1")

    assert (program_target(config, "server1") / "version").read_text() == "2"
    assert _status(result, "server2", "program") == "published"
    assert _status(result, "server1", "program") == "superseded"
    assert _status(result, "server3", "program") == "missing"


def test_drift_between_program_trees_names_both_apps_and_the_paths(tmp_path: Path) -> None:
    config = make_config(tmp_path, SERVER)
    write_tree(program_source(config, "server1"), {"same": "x", "lib/a": "old", "only1": "1"})
    write_tree(program_source(config, "server2"), {"same": "x", "lib/a": "new", "only2": "2"})

    result = sync(config, "server")
    doc = response_document(result)

    assert len(result.drift) == 1
    drift = doc["drift"][0]
    assert set(drift["apps"]) == {"server1", "server2"}
    assert drift["group"] == "server"
    text = " ".join(drift["paths"])
    assert "lib/a" in text
    assert "only1" in text
    assert "only2" in text
    assert "same" not in text


def test_mtime_only_differences_between_program_trees_are_not_drift(tmp_path: Path) -> None:
    config = make_config(tmp_path, SERVER)
    write_tree(program_source(config, "server1"), {"a": File("same", mtime_ns=BASE_NS)})
    write_tree(program_source(config, "server2"), {"a": File("same", mtime_ns=BASE_NS + 10**9)})

    result = sync(config, "server")

    assert result.drift == []


def test_files_differing_only_in_content_are_drift_even_with_equal_size_and_mtime(
    tmp_path: Path,
) -> None:
    # Reproducible builds stamp every file with one mtime: equal size and time prove nothing.
    config = make_config(tmp_path, SERVER)
    write_tree(program_source(config, "server1"), {"bin/x": File("a", mtime_ns=BASE_NS)})
    write_tree(program_source(config, "server2"), {"bin/x": File("b", mtime_ns=BASE_NS)})

    result = sync(config, "server")

    assert len(result.drift) == 1
    assert any("bin/x" in path for path in response_document(result)["drift"][0]["paths"])


# --- type-2 config (SPEC 2) ---


def test_type_2_config_publishes_only_listed_files_at_their_relative_paths(
    tmp_path: Path,
) -> None:
    config = make_config(
        tmp_path, [app("web1", "web", status=1, files=["config.properties", "conf/app.yml"])]
    )
    write_tree(program_source(config, "web1"), {"bin": "b"})
    write_tree(
        config_source(config, "web1"),
        {"config.properties": "p", "conf/app.yml": "y", "conf/other.yml": "o", "extra": "e"},
    )

    result = sync(config, "web1")

    assert result.ok, result.errors
    target = config.dirs.configuredir / "web" / "web1"
    assert (target / "conf" / "app.yml").read_text() == "y"
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*")) == [
        "conf",
        "conf/app.yml",
        "config.properties",
    ]


def test_type_2_file_list_may_be_a_comma_separated_string(tmp_path: Path) -> None:
    config = make_config(
        tmp_path, [app("web1", "web", status=1, files="config.properties, conf/app.yml")]
    )
    write_tree(program_source(config, "web1"), {"bin": "b"})
    write_tree(config_source(config, "web1"), {"config.properties": "p", "conf/app.yml": "y"})
    write_tree(config_source(config, "web1"), {"not-listed": "n"})

    result = sync(config, "web1")

    assert result.ok, result.errors
    target = config_target(config, "web1")
    assert sorted(os.listdir(target)) == ["conf", "config.properties"]


def test_a_missing_listed_file_fails_only_that_app_and_keeps_its_old_config(
    tmp_path: Path,
) -> None:
    config = make_config(
        tmp_path, [app("web1", "web", status=1, files="a.yml,b.yml"), app("other", "o")]
    )
    write_tree(program_source(config, "web1"), {"bin": "b"})
    write_tree(config_source(config, "web1"), {"a.yml": "old-a", "b.yml": "old-b"})
    write_tree(program_source(config, "other"), {"bin": "1"})
    write_tree(config_source(config, "other"), {"c": "1"})
    assert sync(config, "all").ok
    old = snapshot(config_target(config, "web1"))
    (config_source(config, "web1") / "b.yml").unlink()
    (config_source(config, "web1") / "a.yml").write_text("new-a")
    (program_source(config, "other") / "bin").write_text("2")

    result = sync(config, "all")
    doc = response_document(result)

    assert _status(result, "web1", "config") == "failed"
    assert "b.yml" in doc["data"]["msg"]
    assert doc["data"]["data"]["0"] == "0"
    assert snapshot(config_target(config, "web1")) == old
    assert (program_target(config, "other") / "bin").read_text() == "2"
    assert _status(result, "other", "program") == "published"


@pytest.mark.parametrize(
    ("entry", "words"),
    [
        ("../x", "escapes"),
        ("conf/../../x", "escapes"),
        ("/etc/hostname", "absolute"),
        ("link_out", "symlink"),
        ("dir_out/file", "symlink"),
    ],
)
def test_a_listed_entry_escaping_the_config_source_is_refused(
    tmp_path: Path, entry: str, words: str
) -> None:
    outside = tmp_path / "outside"
    write_tree(outside, {"file": "secret"})
    (tmp_path / "var" / "remotecomdir" / "configuredir").mkdir(parents=True)
    (tmp_path / "var" / "remotecomdir" / "configuredir" / "x").write_text("sibling")
    config = make_config(tmp_path, [app("web1", "web", status=1, files=["ok.yml", entry])])
    write_tree(program_source(config, "web1"), {"bin": "b"})
    write_tree(
        config_source(config, "web1"),
        {
            "ok.yml": "ok",
            "link_out": Symlink(str(outside / "file")),
            "dir_out": Symlink("../../../outside"),
        },
    )

    result = sync(config, "web1")

    assert _status(result, "web1", "config") == "failed"
    error = next(a for a in result.apps if a.app_key == "web1").config.error
    assert entry in error
    assert words in error
    assert not config_target(config, "web1").exists()


def test_status_1_with_an_empty_list_copies_the_whole_config(tmp_path: Path) -> None:
    config = make_config(tmp_path, [app("web1", "web", status=1, files=[])])
    write_tree(program_source(config, "web1"), {"bin": "b"})
    write_tree(config_source(config, "web1"), {"a": "1", "d/b": "2", "e": Dir()})

    assert sync(config, "web1").ok

    assert snapshot(config_target(config, "web1")) == snapshot(config_source(config, "web1"))


def test_a_listed_directory_is_copied_whole_even_when_a_file_inside_is_listed_first(
    tmp_path: Path,
) -> None:
    config = make_config(tmp_path, [app("web1", "web", status=1, files="conf/app.yml,conf")])
    write_tree(program_source(config, "web1"), {"bin": "b"})
    write_tree(config_source(config, "web1"), {"conf/app.yml": "y", "conf/db.yml": "d"})

    assert sync(config, "web1").ok

    target = config_target(config, "web1")
    assert sorted(os.listdir(target / "conf")) == ["app.yml", "db.yml"]


# --- missing sources (SPEC 2, 5) ---


def test_missing_program_and_config_sources_are_reported_and_others_still_sync(
    tmp_path: Path,
) -> None:
    config = make_config(tmp_path, [app("a1", "a"), app("b1", "b"), app("c1", "c")])
    write_tree(config_source(config, "a1"), {"c": "a"})  # a1: no program
    write_tree(program_source(config, "b1"), {"p": "b"})  # b1: no config
    write_tree(program_source(config, "c1"), {"p": "c"})
    write_tree(config_source(config, "c1"), {"c": "c"})

    result = sync(config, "all")
    data = response_document(result)["data"]["data"]

    assert data["0"] == "0"
    assert data["1"] == str(program_source(config, "a1"))
    assert data["2"] == str(config_source(config, "b1"))
    assert (config_target(config, "a1") / "c").read_text() == "a"
    assert (program_target(config, "b1") / "p").read_text() == "b"
    assert (program_target(config, "c1") / "p").read_text() == "c"


def test_several_missing_sources_are_comma_joined(tmp_path: Path) -> None:
    config = make_config(tmp_path, [app("a1", "a"), app("b1", "b")])

    data = response_document(sync(config, "all"))["data"]["data"]

    assert data["1"].split(",") == [str(program_source(config, k)) for k in ("a1", "b1")]
    assert data["2"].split(",") == [str(config_source(config, k)) for k in ("a1", "b1")]


# --- the response document (SPEC 5) ---


def _all_strings(value: Any) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and _all_strings(v) for k, v in value.items())
    return isinstance(value, str)


def test_response_document_has_every_key_of_the_seed_with_string_values(
    tmp_path: Path,
) -> None:
    config = make_config(tmp_path, SERVER)
    for key in ("server1", "server2"):
        write_tree(program_source(config, key), {"p": "1"})
        write_tree(config_source(config, key), {"c": key})

    doc = response_document(sync(config, "'server1,server2'"))

    seed = {
        "code": None,
        "data": {"code": None, "data": {"0": None, "1": None, "2": None}, "msg": None},
        "param": {"action": None, "k": None, "update": None},
        "parseparameters": {"code": None, "msg": None, "precmd": None, "requestCmd": None},
        "print_stdout": None,
        "respon": {k: None for k in ("chdir", "cmd", "code", "msg", "ret", "stderr", "stdout")},
        "take": None,
    }

    def check(shape: dict[str, Any], got: dict[str, Any]) -> None:
        for key, inner in shape.items():
            assert key in got, key
            if inner is None:
                assert isinstance(got[key], str), (key, got[key])
            else:
                check(inner, got[key])

    check(seed, doc)
    assert doc["code"] == "0"
    assert doc["data"]["data"] == {"0": "1", "1": "", "2": ""}
    assert doc["data"]["msg"] == "成功"
    assert doc["param"] == {"action": "Deploy:Core:syncpro", "k": "server1 server2", "update": "0"}
    assert doc["take"].isdigit()
    assert doc["take"] == str(int(doc["seconds"]))  # whole seconds elapsed, never rounded up
    # The original leaves a default update=0 out of requestCmd (SPEC's example).
    assert (
        doc["parseparameters"]["requestCmd"] == 'Deploy:Core:syncpro,--k="server1 server2",--w="1"'
    )
    assert shlex.split(doc["respon"]["cmd"]) == [
        "syncpro",
        "sync",
        "--config",
        str(config.path),
        "-k",
        "server1 server2",
    ]


def test_response_of_an_update_run_echoes_update_1_and_its_command_line(tmp_path: Path) -> None:
    config = make_config(tmp_path, SERVER)
    write_tree(config.dirs.updatedir / "softdir" / "server", {"p": "1"})

    doc = response_document(sync(config, "server", update=True))

    assert doc["param"]["update"] == "1"
    assert doc["parseparameters"]["requestCmd"] == (
        'Deploy:Core:syncpro,--k="server",--update="1",--w="1"'
    )
    assert shlex.split(doc["respon"]["cmd"]) == [
        "syncpro",
        "sync",
        "--config",
        str(config.path),
        "-k",
        "server",
        "--update",
    ]


# --- failure isolation (SPEC 8) ---


class _VanishingBuilder(TreeBuilder):
    """Deletes one source file just before copying it: a source vanishing mid-copy."""

    victim = "vanish.bin"

    def _file(self, here: Any, entry: Any, staged: str) -> None:
        if entry.name == self.victim:
            os.unlink(f"/proc/self/fd/{here.src}/{entry.name}")
        super()._file(here, entry, staged)


def test_a_source_vanishing_mid_copy_fails_only_that_app_and_keeps_its_old_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = make_config(tmp_path, [app("a1", "a"), app("b1", "b")])
    write_tree(program_source(config, "a1"), {"a/keep": "old", "vanish.bin": "x"})
    write_tree(config_source(config, "a1"), {"c": "1"})
    write_tree(program_source(config, "b1"), {"p": "old"})
    write_tree(config_source(config, "b1"), {"c": "1"})
    assert sync(config, "all").ok
    old = snapshot(program_target(config, "a1"))
    (program_source(config, "a1") / "a/keep").write_text("new")
    (program_source(config, "a1") / "vanish.bin").write_text("changed, so it must be read")
    (program_source(config, "b1") / "p").write_text("new")
    monkeypatch.setattr(engine, "TreeBuilder", _VanishingBuilder)

    result = sync(config, "all")

    assert _status(result, "a1", "program") == "failed"
    assert "vanish.bin" in next(a for a in result.apps if a.app_key == "a1").program.error
    assert snapshot(program_target(config, "a1")) == old
    assert (program_target(config, "b1") / "p").read_text() == "new"
    assert result.ok is False
    staging = work_area(config.dirs.softdir) / "staging"
    assert os.listdir(staging) == []


# --- incremental (issue 2) ---


def test_a_second_sync_links_unchanged_files_and_copies_only_the_changed_one(
    tmp_path: Path,
) -> None:
    config = make_config(tmp_path, SERVER)
    source = program_source(config, "server1")
    write_tree(source, {f"d{i % 7}/f{i:03}": File(f"x{i}", mtime_ns=BASE_NS) for i in range(200)})
    write_tree(config_source(config, "server1"), {"c": "1"})
    sync(config, "server1")
    before = inodes(program_target(config, "server1"))
    (source / "d3/f052").write_text("changed!")

    result = sync(config, "server1")

    stats = result.apps[0].program.stats
    assert (stats.files, stats.linked, stats.copied) == (200, 199, 1)
    after = inodes(program_target(config, "server1"))
    assert after.pop("d3/f052") != before.pop("d3/f052")
    assert after == before
    assert snapshot(program_target(config, "server1")) == snapshot(source)


def test_a_sync_with_nothing_changed_leaves_the_published_tree_in_place(tmp_path: Path) -> None:
    config = make_config(tmp_path, SERVER)
    source = program_source(config, "server1")
    write_tree(source, {f"d{i % 5}/f{i:03}": File(f"x{i}", mtime_ns=BASE_NS) for i in range(50)})
    write_tree(config_source(config, "server1"), {"c": "1"})
    sync(config, "server1")
    target = program_target(config, "server1")
    root_inode = target.stat().st_ino

    result = sync(config, "server1")

    program = result.apps[0].program
    assert program.unchanged and program.as_dict()["unchanged"] is True
    assert result.ok
    assert target.stat().st_ino == root_inode
    assert list((work_area(target.parent) / "trash").iterdir()) == []


@pytest.mark.parametrize(
    "change",
    ["mode", "dir_mode", "mtime", "delete", "add", "relink"],
)
def test_any_difference_from_the_published_tree_rebuilds_it(tmp_path: Path, change: str) -> None:
    config = make_config(tmp_path, SERVER)
    source = program_source(config, "server1")
    write_tree(source, {"d/f": File("x", mtime_ns=BASE_NS), "l": Symlink("d/f"), "g": "y"})
    write_tree(config_source(config, "server1"), {"c": "1"})
    sync(config, "server1")
    if change == "mode":
        (source / "d/f").chmod(0o600)
    elif change == "dir_mode":
        (source / "d").chmod(0o700)
    elif change == "mtime":
        os.utime(source / "d/f", ns=(BASE_NS, BASE_NS + 1))
    elif change == "delete":
        (source / "g").unlink()
    elif change == "add":
        (source / "d/new").write_text("n")
    else:
        (source / "l").unlink()
        (source / "l").symlink_to("g")

    result = sync(config, "server1")

    assert not result.apps[0].program.unchanged
    assert snapshot(program_target(config, "server1")) == snapshot(source)


# --- upload temporaries (SPEC 7, issue 2) ---


@pytest.mark.parametrize(
    "name", [".app.jar.AbC123", "upload.part", "x.tmp", ".app.yml.swp", "notes~", "d/.f.q1W2e3"]
)
def test_upload_temporaries_are_not_published(tmp_path: Path, name: str) -> None:
    config = make_config(tmp_path, SERVER)
    source = program_source(config, "server1")
    write_tree(source, {"real": "1", name: "partial", "d/real": "2"})

    sync(config, "server1")

    target = program_target(config, "server1")
    assert not (target / name).exists()
    assert (target / "real").exists()
    assert (target / "d/real").exists()


@pytest.mark.parametrize("name", [".backup.tar.gz", ".settings/app.config", ".env.a-b.cd"])
def test_a_dotfile_that_only_looks_like_an_rsync_temporary_is_published(
    tmp_path: Path, name: str
) -> None:
    # rsync's temporary is `.name.XXXXXX`: six letters or digits after the last dot, in one
    # file name. These are ordinary files and must survive the copy.
    config = make_config(tmp_path, SERVER)
    source = program_source(config, "server1")
    write_tree(source, {name: "real content"})

    sync(config, "server1")

    assert (program_target(config, "server1") / name).read_text() == "real content"


# --- special files (issue 2) ---


def test_a_fifo_in_a_source_is_skipped_with_a_warning_and_never_opened(tmp_path: Path) -> None:
    config = make_config(tmp_path, SERVER)
    source = program_source(config, "server1")
    write_tree(source, {"pipe": Fifo(), "file": "1"})
    write_tree(config_source(config, "server1"), {"c": "1"})
    done: list[Any] = []

    def run() -> None:
        with structlog.testing.capture_logs() as logs:
            done.append(sync(config, "server1"))
        done.append(logs)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join(timeout=20)
    if worker.is_alive():  # unblock the copy that opened the FIFO, then fail
        fd = os.open(source / "pipe", os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        worker.join(timeout=5)
        pytest.fail("the sync opened the FIFO and blocked")
    result, logs = done

    assert result.ok, result.errors
    assert not os.path.lexists(program_target(config, "server1") / "pipe")
    assert (program_target(config, "server1") / "file").exists()
    warnings = [e for e in logs if e["log_level"] == "warning" and "pipe" in str(e.get("path"))]
    assert warnings, logs


def test_a_sync_hands_back_the_digest_of_every_source_it_walked_whole(tmp_path: Path) -> None:
    from syncpro.engine.ignore import Ignore
    from syncpro.engine.walk import plan_path

    config = make_config(tmp_path, [app("a1", "a"), app("a2", "a")])
    for key in ("a1", "a2"):
        write_tree(program_source(config, key), {"bin": key})
        write_tree(config_source(config, key), {"c": key})

    result = sync(config, "a")

    ignore = Ignore(config.watch.ignore)
    walked = [
        program_source(config, "a1"),  # the superseded one, walked for drift
        program_source(config, "a2"),
        config_source(config, "a1"),
        config_source(config, "a2"),
    ]
    for source in walked:
        plan = plan_path(source, None, ignore, owners=os.geteuid() == 0)
        assert result.digests[str(source)] == (plan.digest, plan.newest_ctime), source


def test_a_request_for_the_config_part_alone_leaves_the_program_target_as_it_is(
    tmp_path: Path,
) -> None:
    from syncpro.engine.request import CONFIG, PROGRAM, SyncRequest
    from syncpro.engine.sync import run_sync

    config = make_config(tmp_path, [app("a1", "a")])
    write_tree(program_source(config, "a1"), {"bin": "1.4.2"})
    write_tree(config_source(config, "a1"), {"c": "1"})
    assert sync(config, "a1").ok
    (program_source(config, "a1") / "bin").write_text("older, from elsewhere")
    (config_source(config, "a1") / "c").write_text("2")

    result = run_sync(
        SyncRequest(k="a1", parts=frozenset({CONFIG})), config, config.config_inventory
    )

    assert result.ok and result.apps[0].program is None
    assert (program_target(config, "a1") / "bin").read_text() == "1.4.2"
    assert (config_target(config, "a1") / "c").read_text() == "2"
    result = run_sync(
        SyncRequest(k="a1", parts=frozenset({PROGRAM})), config, config.config_inventory
    )
    assert result.ok and result.apps[0].config is None
    assert (program_target(config, "a1") / "bin").read_text() == "older, from elsewhere"


def test_a_failed_sync_is_logged_as_a_warning_so_quiet_mode_still_shows_it(
    tmp_path: Path,
) -> None:
    config = make_config(tmp_path, [app("a1", "a")])
    write_tree(config_source(config, "a1"), {"c": "1"})  # no program source: a failure

    with structlog.testing.capture_logs() as logs:
        result = sync(config, "a1")

    assert not result.ok
    finished = [e for e in logs if e["event"] == "sync.finished"]
    assert [e["log_level"] for e in finished] == ["warning"]


def test_groups_are_built_at_once_up_to_publish_parallel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    config = make_config(tmp_path, [app("a1", "a"), app("b1", "b")])
    for key in ("a1", "b1"):
        write_tree(program_source(config, key), {"bin": key})
        write_tree(config_source(config, key), {"c": key})
    both = threading.Barrier(2, timeout=20)

    class Meeting(TreeBuilder):
        def plan(self, src: Path, known: Any = None) -> Any:
            if src.parent.name == "softdir":  # the two program builds must meet here
                both.wait()
            return super().plan(src, known)

    monkeypatch.setattr(engine, "TreeBuilder", Meeting)
    assert config.publish.parallel >= 2

    result = sync(config, "all")

    assert result.ok, result.errors
    assert [a.app_key for a in result.apps] == ["a1", "b1"]
    assert (program_target(config, "b1") / "bin").read_text() == "b1"


# --- batches of targets ---


def _many_apps(root: Path, count: int, files: int) -> Any:
    keys = [f"a{n:02}" for n in range(count)]
    config = make_config(root, [app(key, key) for key in keys], grace=0, fsync=True)
    for key in keys:
        write_tree(program_source(config, key), {f"d/f{i}": f"{key} {i}" for i in range(files)})
        write_tree(config_source(config, key), {"app.conf": key})
    return config, keys


def test_a_sync_of_many_apps_is_made_durable_by_one_flush_per_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from small_fs import small_ext4
    from syncpro.engine import publish as publish_module

    syncfs: list[int] = []
    with small_ext4(tmp_path) as mnt:
        config, keys = _many_apps(mnt, 20, 10)
        monkeypatch.setattr(publish_module, "_syncfs", lambda fd: syncfs.append(fd) or 0)
        result = sync(config, " ".join(keys))
        assert result.ok
        # 40 targets, one batch: one flush, where target by target it was one each.
        assert len(syncfs) == 1
        assert all((program_target(config, k) / "d/f9").read_text() == f"{k} 9" for k in keys)
        monkeypatch.setattr(engine, "COMMIT_BATCH", 8)
        for key in keys:
            write_tree(program_source(config, key), {f"d/f{i}": "changed" for i in range(10)})
        assert sync(config, " ".join(keys)).ok
        # The 20 programs (then the 20 configs, unchanged) in batches of 8: 8, 8, 4 + 4.
        assert len(syncfs) == 1 + 3
        assert all((program_target(config, k) / "d/f0").read_text() == "changed" for k in keys)


def _blocked_on_flocks() -> int:
    """How many of this process's threads wait on a flock, as /proc/locks shows."""
    lines = Path("/proc/locks").read_text().splitlines()
    return sum(
        1
        for fields in (line.split() for line in lines)
        if "->" in fields and "FLOCK" in fields and str(os.getpid()) in fields
    )


def test_syncs_of_the_same_apps_listed_in_opposite_orders_never_wait_on_each_other(
    tmp_path: Path,
) -> None:
    config, keys = _many_apps(tmp_path, 6, 2)
    # The same apps listed the other way round (another process's config, a reload).
    doc = config_dict([app(key, key) for key in reversed(keys)], grace=0, fsync=True)
    reversed_config = load_config(write_config(tmp_path / "reversed.yml", doc))
    errors: list[BaseException] = []

    def run(config: Any) -> None:
        try:
            assert sync(config, "all").ok
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=run, args=(c,), daemon=True) for c in (config, reversed_config)
    ]
    # A middle target held by another publisher: both syncs stop at it, each holding the
    # locks it took before. Taken in request order, one would hold what the other waits for.
    with holding(config.dirs.softdir, keys[3]):
        for thread in threads:
            thread.start()
        wait_until(lambda: _blocked_on_flocks() >= 2, timeout=20)
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads), "the syncs wait on each other"
    assert errors == []
    assert all((program_target(config, k) / "d/f1").read_text() == f"{k} 1" for k in keys)


def test_a_target_failing_in_a_batch_fails_alone(tmp_path: Path) -> None:
    config, keys = _many_apps(tmp_path, 3, 2)
    blocked = config_target(config, keys[1])
    blocked.parent.parent.mkdir(parents=True, exist_ok=True)
    blocked.parent.write_text("a file where its group's config folder goes\n")

    result = sync(config, " ".join(keys))

    assert _status(result, keys[1], "config") == "failed"
    failed = next(a for a in result.apps if a.app_key == keys[1]).config
    assert failed is not None and str(blocked.parent) in str(failed.error)
    for key in keys:
        assert _status(result, key, "program") == "published"
    for key in (keys[0], keys[2]):
        assert _status(result, key, "config") == "published"
        assert (config_target(config, key) / "app.conf").read_text() == key
    # Its staged tree did not stay behind: the staging area holds nothing.
    assert os.listdir(work_area(config.dirs.configuredir) / "staging") == []


# --- memory ---


def test_built_trees_waiting_for_their_batchs_flush_hold_no_walk_entries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A batch holds its targets built until one flush and the swaps: their walks' entries,
    # about 1 KB a name, must be gone by then; only each walk's digest is still needed.
    apps = [app(f"a{i}", f"g{i}") for i in range(3)]
    config = make_config(tmp_path, apps)
    for i in range(3):
        write_tree(program_source(config, f"a{i}"), {f"d/f{n}": f"{i}.{n}" for n in range(50)})
        write_tree(config_source(config, f"a{i}"), {"a.ini": "x"})
    alive: list[int] = []
    real_commit = engine.commit

    def counting(*args: Any, **kwargs: Any) -> Any:
        gc.collect()
        alive.append(sum(isinstance(o, Entry) for o in gc.get_objects()))
        return real_commit(*args, **kwargs)

    monkeypatch.setattr(engine, "commit", counting)
    result = sync(config, "a0,a1,a2")

    assert result.ok and alive == [0]
    program = config.dirs.remotecomdir / "softdir"
    for i in range(3):
        walked = plan_path(program / f"a{i}", None, Ignore(config.watch.ignore), owners=False)
        assert result.digests[str(program / f"a{i}")] == (walked.digest, walked.newest_ctime)
