"""What a sync would change (Deploy:Core:diff), per app and target, with nothing written."""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any

from syncpro.config.model import Config
from syncpro.control.protocol import DIFF_ACTION
from syncpro.engine.diff import diff
from syncpro.engine.request import SyncRequest

from helpers import (
    BASE_NS,
    SERVER_GROUP,
    File,
    Symlink,
    app,
    config_source,
    config_target,
    make_config,
    program_source,
    program_target,
    snapshot,
    sync,
    write_tree,
)


def run_diff(config: Config, k: str, *, update: bool = False, **kwargs: Any) -> dict[str, Any]:
    request = SyncRequest(k=k, update=update, action=DIFF_ACTION, origin="control")
    return diff(request, config, config.config_inventory, **kwargs)


def with_sources(tmp_path: Path, apps: Any = SERVER_GROUP) -> Config:
    config = make_config(tmp_path, apps)
    for key in ("server1", "server2"):
        write_tree(
            program_source(config, key),
            {"bin/run.sh": File("#!/bin/sh\n", mode=0o755, mtime_ns=BASE_NS), "lib/a.jar": "a"},
        )
        write_tree(config_source(config, key), {"app.yml": f"node: {key}\n"})
    return config


def test_before_any_sync_every_source_entry_is_to_be_added(tmp_path: Path) -> None:
    config = with_sources(tmp_path)
    doc = run_diff(config, "server1")
    program = doc["diff"]["server1"]["program"]
    assert program["differcount"] == "4,0,0,4"
    assert program["added"] == ["bin", "bin/run.sh", "lib", "lib/a.jar"]
    assert (program["changed"], program["deleted"]) == ([], [])
    assert program["target"] == str(program_target(config, "server1"))
    assert doc["diff"]["server1"]["config"]["differcount"] == "1,0,0,1"
    assert doc["data"]["data"] == {"0": "1", "1": "", "2": ""}


def test_the_ready_marker_is_never_a_difference_since_a_sync_never_publishes_it(
    tmp_path: Path,
) -> None:
    config = make_config(tmp_path, SERVER_GROUP, extra={"watch": {"ready_marker": "READY"}})
    write_tree(program_source(config, "server1"), {"lib/a.jar": "a", "READY": ""})
    write_tree(config_source(config, "server1"), {"app.yml": "x"})
    sync(config, "server1")

    doc = run_diff(config, "server1")

    assert doc["diff"]["server1"]["program"]["differcount"] == "2,0,0,0"
    assert not (program_target(config, "server1") / "READY").exists()


def test_right_after_a_sync_nothing_differs(tmp_path: Path) -> None:
    config = with_sources(tmp_path)
    assert sync(config, "server").ok
    doc = run_diff(config, "server")
    for key in ("server1", "server2"):
        assert doc["diff"][key]["program"]["differcount"] == "4,0,0,0"
        assert doc["diff"][key]["config"]["differcount"] == "1,0,0,0"
    assert doc["data"]["msg"] == "成功"


def test_changed_deleted_and_added_entries_are_told_apart(tmp_path: Path) -> None:
    config = make_config(tmp_path, SERVER_GROUP)
    source = program_source(config, "server1")
    write_tree(
        source,
        {
            "size": File("1", mtime_ns=BASE_NS),
            "mtime": File("same", mtime_ns=BASE_NS),
            "mode": File("same", mode=0o644, mtime_ns=BASE_NS),
            "link": Symlink("size"),
            "gone": "bye",
            "kind": "a file, then a directory",
            "same": File("same", mtime_ns=BASE_NS),
        },
    )
    write_tree(config_source(config, "server1"), {"app.yml": "x"})
    assert sync(config, "server1").ok
    write_tree(source, {"size": File("22", mtime_ns=BASE_NS), "new": "hello"})
    os.utime(source / "mtime", ns=(BASE_NS, BASE_NS + 1))
    os.chmod(source / "mode", 0o600)
    (source / "link").unlink()
    (source / "link").symlink_to("mtime")
    (source / "gone").unlink()
    (source / "kind").unlink()
    write_tree(source, {"kind/inside": "x"})

    program = run_diff(config, "server1")["diff"]["server1"]["program"]
    assert program["changed"] == ["kind", "link", "mode", "mtime", "size"]
    assert program["deleted"] == ["gone"]
    assert program["added"] == ["kind/inside", "new"]
    assert program["differcount"] == "8,5,1,2"


def test_a_diff_writes_nothing_anywhere(tmp_path: Path) -> None:
    config = with_sources(tmp_path)
    sync(config, "server")
    write_tree(program_source(config, "server2"), {"lib/b.jar": "b"})
    before = snapshot(tmp_path / "var", identity=True)
    doc = run_diff(config, "all")
    assert doc["diff"]["server1"]["program"]["added"] == ["lib/b.jar"]  # server2's tree wins
    assert snapshot(tmp_path / "var", identity=True) == before


def test_missing_sources_are_reported_as_a_sync_reports_them(tmp_path: Path) -> None:
    config = make_config(tmp_path, [app("web1", "web")])
    doc = run_diff(config, "web1")
    program_missing = str(config.dirs.remotecomdir / "softdir/web1")
    config_missing = str(config.dirs.remotecomdir / "configuredir/web1")
    assert doc["data"]["data"] == {"0": "0", "1": program_missing, "2": config_missing}
    assert doc["diff"]["web1"]["program"]["status"] == "missing"
    assert doc["diff"]["web1"]["program"]["differcount"] == "0,0,0,0"
    assert "program source" in doc["data"]["msg"]
    assert doc["code"] == "0"  # the request ran; its data says it was not complete


def test_unknown_keys_are_named_and_the_known_ones_still_compared(tmp_path: Path) -> None:
    config = with_sources(tmp_path)
    doc = run_diff(config, "server1 nosuch")
    assert "unknown key: nosuch" in doc["data"]["msg"]
    assert doc["unknown"] == ["nosuch"]
    assert doc["data"]["data"]["0"] == "0"
    assert list(doc["diff"]) == ["server1"]


def test_the_groups_program_comes_from_the_last_app_whose_source_exists(tmp_path: Path) -> None:
    config = with_sources(tmp_path)
    write_tree(program_source(config, "server2"), {"only-in-2": "x"})
    doc = run_diff(config, "server")
    first, second = doc["diff"]["server1"]["program"], doc["diff"]["server2"]["program"]
    assert first["winner"] == "server2"
    assert "winner" not in second
    assert first["differcount"] == second["differcount"] == "5,0,0,5"
    assert first["source"] == str(program_source(config, "server1"))


def test_a_missing_program_of_one_app_leaves_the_group_to_the_other(tmp_path: Path) -> None:
    config = with_sources(tmp_path)
    (program_source(config, "server2") / "bin/run.sh").unlink()
    os.rmdir(program_source(config, "server2") / "bin")
    (program_source(config, "server2") / "lib/a.jar").unlink()
    os.rmdir(program_source(config, "server2") / "lib")
    os.rmdir(program_source(config, "server2"))
    doc = run_diff(config, "server")
    assert doc["diff"]["server2"]["program"]["status"] == "missing"
    assert doc["diff"]["server1"]["program"]["differcount"] == "4,0,0,4"
    assert doc["data"]["data"]["1"] == str(program_source(config, "server2"))


def test_type_2_apps_compare_only_their_listed_config_files(tmp_path: Path) -> None:
    config = make_config(tmp_path, [app("svc1", "svc", status=1, files="conf/app.yml")])
    write_tree(program_source(config, "svc1"), {"svc.jar": "jar"})
    write_tree(config_source(config, "svc1"), {"conf/app.yml": "a", "conf/other.yml": "o"})
    doc = run_diff(config, "svc1")
    assert doc["diff"]["svc1"]["config"]["added"] == ["conf", "conf/app.yml"]
    assert sync(config, "svc1").ok
    (config_target(config, "svc1") / "stray.txt").write_text("left by hand")
    config_doc = run_diff(config, "svc1")["diff"]["svc1"]["config"]
    assert config_doc["differcount"] == "2,0,1,0"
    assert config_doc["deleted"] == ["stray.txt"]


def test_a_missing_listed_file_fails_that_apps_config_and_is_named(tmp_path: Path) -> None:
    config = make_config(tmp_path, [app("svc1", "svc", status=1, files=["conf/app.yml", "x.yml"])])
    write_tree(program_source(config, "svc1"), {"svc.jar": "jar"})
    write_tree(config_source(config, "svc1"), {"conf/app.yml": "a"})
    doc = run_diff(config, "svc1")
    config_doc = doc["diff"]["svc1"]["config"]
    assert config_doc["status"] == "failed"
    assert "x.yml is missing" in config_doc["error"]
    assert doc["data"]["data"]["0"] == "0"
    assert "x.yml" in doc["data"]["msg"]


def test_upload_temporaries_are_neither_counted_nor_listed(tmp_path: Path) -> None:
    config = with_sources(tmp_path)
    write_tree(program_source(config, "server1"), {"lib/.b.jar.Ab12Cd": "half", "x.part": "p"})
    doc = run_diff(config, "server1")
    assert doc["diff"]["server1"]["program"]["differcount"] == "4,0,0,4"


def test_update_1_compares_the_updatedir_sources(tmp_path: Path) -> None:
    config = make_config(tmp_path, SERVER_GROUP)
    write_tree(config.dirs.updatedir / "softdir/server", {"new.jar": "n"})
    write_tree(config.dirs.updatedir / "configuredir/server/server1", {"app.yml": "u"})
    doc = run_diff(config, "server1", update=True)
    assert doc["diff"]["server1"]["program"]["added"] == ["new.jar"]
    assert doc["diff"]["server1"]["config"]["added"] == ["app.yml"]
    assert doc["param"] == {"action": DIFF_ACTION, "k": "server1", "update": "1"}
    assert shlex.split(doc["respon"]["cmd"]) == [
        *("syncpro", "ctl", "diff", "--config", str(config.path)),
        *("-k", "server1", "--update"),
    ]


def test_the_answer_is_a_response_document(tmp_path: Path) -> None:
    doc = run_diff(with_sources(tmp_path), "server1")
    assert set(doc) >= {
        "code",
        "data",
        "param",
        "parseparameters",
        "print_stdout",
        "respon",
        "take",
    }
    assert doc["parseparameters"]["code"] == "0"
    assert doc["parseparameters"]["requestCmd"].startswith("Deploy:Core:diff,--k=")
    assert doc["origin"] == "control"


def test_listed_paths_are_capped_while_the_counts_stay_exact(tmp_path: Path) -> None:
    config = with_sources(tmp_path)
    write_tree(program_source(config, "server1"), {f"many/{n:03}": "x" for n in range(30)})
    program = run_diff(config, "server1", limit=10)["diff"]["server1"]["program"]
    assert program["differcount"] == "35,0,0,35"
    assert len(program["added"]) == 10
    assert program["truncated"] == 10


def test_a_groups_members_that_are_not_auto_deployed_are_reported_as_a_sync_does(
    tmp_path: Path,
) -> None:
    from syncpro.engine.response import response_document

    from helpers import app, make_config, sync

    config = make_config(tmp_path, [app("s1", "grp"), app("s2", "grp", auto_deploy=False)])
    doc = run_diff(config, "grp")

    assert doc["skipped"] == [{"app_key": "s2", "reason": "auto_deploy is false"}]
    assert doc["skipped"] == response_document(sync(config, "grp"))["skipped"]
