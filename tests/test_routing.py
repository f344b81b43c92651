"""Routing, in process: which app keys, mode and part a watched path concerns, given a
snapshot of config and inventory built here (no daemon, no watcher)."""

from __future__ import annotations

from pathlib import Path

import pytest

from syncpro.daemon.routing import Route, Router, group_of, route, source_root_in
from syncpro.daemon.runtime import Runtime, Snapshot
from syncpro.daemon.sdnotify import Notifier
from syncpro.daemon.watch import WRITING
from syncpro.engine.sync import ignore_for

from helpers import SERVER_GROUP, app, make_config


@pytest.fixture
def snap(tmp_path: Path) -> Snapshot:
    config = make_config(
        tmp_path,
        [*SERVER_GROUP, app("web1", "web"), app("manual", "web", auto_deploy=False)],
    )
    return Snapshot(config, config.config_inventory, ignore_for(config))


def _r(snap: Snapshot) -> Path:
    return snap.config.dirs.remotecomdir


def _u(snap: Snapshot) -> Path:
    return snap.config.dirs.updatedir


def test_a_file_of_one_apps_program_routes_to_that_app_in_install_mode(snap: Snapshot) -> None:
    path = _r(snap) / "softdir" / "server1" / "bin" / "run"
    assert route(snap, path) == Route(("server1",), False, None, "program")


def test_a_file_of_one_apps_config_routes_to_its_config_part(snap: Snapshot) -> None:
    path = _r(snap) / "configuredir" / "web1" / "app.conf"
    assert route(snap, path) == Route(("web1",), False, None, "config")


def test_an_update_program_routes_to_every_auto_deployed_app_of_its_group(
    snap: Snapshot,
) -> None:
    found = route(snap, _u(snap) / "softdir" / "server" / "lib.so")
    assert found == Route(("server1", "server2"), True, None, "program")
    # `manual` shares the web group but is not auto-deployed: never routed to.
    assert route(snap, _u(snap) / "softdir" / "web" / "x").app_keys == ("web1",)


def test_an_update_config_routes_to_the_one_app_named_under_its_group(snap: Snapshot) -> None:
    found = route(snap, _u(snap) / "configuredir" / "server" / "server2" / "c.ini")
    assert found == Route(("server2",), True, None, "config")


def test_an_update_config_group_folder_itself_routes_to_the_whole_group(snap: Snapshot) -> None:
    found = route(snap, _u(snap) / "configuredir" / "server")
    assert found.app_keys == ("server1", "server2")
    assert found.update is True


def test_an_update_config_under_the_wrong_group_is_unknown(snap: Snapshot) -> None:
    found = route(snap, _u(snap) / "configuredir" / "web" / "server1" / "c.ini")
    assert found.app_keys == ()
    assert found.unknown == "updatedir:web/server1"


def test_an_app_not_in_the_inventory_is_unknown_and_says_where(snap: Snapshot) -> None:
    found = route(snap, _r(snap) / "softdir" / "ghost" / "file")
    assert found == Route((), False, "remotecomdir:ghost", "program")


def test_an_app_that_is_not_auto_deployed_is_unknown(snap: Snapshot) -> None:
    assert route(snap, _r(snap) / "softdir" / "manual" / "f").unknown == "remotecomdir:manual"


def test_a_stray_beside_the_areas_is_unknown(snap: Snapshot) -> None:
    found = route(snap, _u(snap) / "stray.txt")
    assert found == Route((), False, "updatedir:stray.txt", None)


@pytest.mark.parametrize("rel", ["", "softdir", "configuredir"])
def test_the_roots_and_their_area_folders_route_nowhere_and_are_not_unknown(
    snap: Snapshot, rel: str
) -> None:
    for root in (_r(snap), _u(snap)):
        assert route(snap, root / rel if rel else root) == Route((), False, None, None)


def test_a_path_outside_both_roots_routes_nowhere(snap: Snapshot, tmp_path: Path) -> None:
    assert route(snap, tmp_path / "elsewhere" / "softdir" / "x") == Route((), False, None, None)


def test_group_of_names_the_group_of_an_auto_deployed_app_only(snap: Snapshot) -> None:
    assert group_of(snap, "server2") == "server"
    assert group_of(snap, "manual") is None
    assert group_of(snap, "ghost") is None


def test_a_source_root_is_one_level_below_an_area_and_two_for_update_configs(
    snap: Snapshot,
) -> None:
    dirs = snap.config.dirs
    r, u = _r(snap), _u(snap)
    expected: dict[Path, Path | None] = {
        r: None,
        u: None,
        r / "softdir": None,
        r / "softdir" / "server1": r / "softdir" / "server1",
        r / "softdir" / "server1" / "a" / "b" / "c": r / "softdir" / "server1",
        r / "configuredir" / "web1" / "x.ini": r / "configuredir" / "web1",
        r / "stray": None,
        u / "softdir" / "server" / "x": u / "softdir" / "server",
        u / "configuredir" / "server": None,
        u / "configuredir" / "server" / "server1": u / "configuredir" / "server" / "server1",
        u / "configuredir" / "server" / "server1" / "c" / "d": (
            u / "configuredir" / "server" / "server1"
        ),
        # A sibling whose name starts with the root's: not under it.
        r.with_name(r.name + "x") / "softdir" / "server1" / "f": None,
        r.parent: None,
    }
    for path, root in expected.items():
        assert source_root_in(dirs, str(path)) == (None if root is None else str(root)), path


class _Submits:
    """Stands in for the scheduler: what the router hands it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, bool]] = []

    def submit(self, key: str, update: bool, path: str, trigger: str, *, part: str) -> None:
        self.calls.append(("submit", key, update))

    def hold(self, key: str, update: bool, path: str) -> None:
        self.calls.append(("hold", key, update))


def test_the_router_sends_every_path_of_a_source_where_the_snapshot_of_the_moment_says(
    snap: Snapshot, tmp_path: Path
) -> None:
    runtime = Runtime(notifier=Notifier())
    runtime.set_snapshot_held(snap)
    submits = _Submits()
    runtime.scheduler = submits  # type: ignore[assignment]
    router = Router(runtime)
    group = _u(snap) / "softdir" / "web"
    router.on_change(str(group / "a" / "b"))
    router.on_temporary(str(group / "a" / ".c.XyZ123"), WRITING)
    assert submits.calls == [("submit", "web1", True), ("hold", "web1", True)]
    # A reload moves web1's program to another group: a route found before is not kept.
    moved = make_config(tmp_path, [app("web1", "server"), app("web2", "web")])
    runtime.set_snapshot_held(Snapshot(moved, moved.config_inventory, ignore_for(moved)))
    submits.calls.clear()
    router.on_change(str(group / "a" / "b"))
    assert submits.calls == [("submit", "web2", True)]
