"""Routing a changed path to what it concerns is a pure function: tested without a daemon."""

from __future__ import annotations

from pathlib import Path

import pytest

from syncpro.config.model import Dirs
from syncpro.engine.layout import PathOwner, owner_of

DIRS = Dirs(
    remotecomdir=Path("/r"),
    updatedir=Path("/u"),
    softdir=Path("/pub/soft"),
    configuredir=Path("/pub/conf"),
    state=Path("/state"),
)


@pytest.mark.parametrize(
    ("path", "owner"),
    [
        ("/r/softdir/server1/bin/run", PathOwner(False, "program", "server1", top="server1")),
        ("/r/configuredir/server1/a.yml", PathOwner(False, "config", "server1", top="server1")),
        ("/u/softdir/server/lib/x.jar", PathOwner(True, "program", group="server", top="server")),
        (
            "/u/configuredir/server/server2/c",
            PathOwner(True, "config", "server2", group="server", top="server/server2"),
        ),
        ("/u/configuredir/server", PathOwner(True, "config", group="server", top="server")),
    ],
)
def test_a_changed_path_names_its_mode_part_and_app_or_group(path: str, owner: PathOwner) -> None:
    assert owner_of(DIRS, Path(path)) == owner


@pytest.mark.parametrize("path", ["/r", "/r/softdir", "/r/other/x", "/elsewhere/softdir/a"])
def test_paths_outside_every_apps_source_concern_nothing(path: str) -> None:
    assert owner_of(DIRS, Path(path)) is None
