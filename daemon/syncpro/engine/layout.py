"""Where an app's sources and targets live (SPEC section 2), and which app a path belongs to."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from syncpro.config.model import Dirs
from syncpro.inventory.apps import App


@dataclass(frozen=True)
class Target:
    """A published tree: `root` is softdir or configuredir, `rel` the tree inside it."""

    root: Path
    rel: str

    @property
    def path(self) -> Path:
        return self.root / self.rel


def program_source(dirs: Dirs, app: App, update: bool) -> Path:
    if update:
        return dirs.updatedir / "softdir" / app.local_name
    return dirs.remotecomdir / "softdir" / app.app_key


def config_source(dirs: Dirs, app: App, update: bool) -> Path:
    if update:
        return dirs.updatedir / "configuredir" / app.local_name / app.app_key
    return dirs.remotecomdir / "configuredir" / app.app_key


def program_target(dirs: Dirs, app: App) -> Target:
    return Target(dirs.softdir, app.local_name)


def config_target(dirs: Dirs, app: App) -> Target:
    return Target(dirs.configuredir, f"{app.local_name}/{app.app_key}")


@dataclass(frozen=True)
class PathOwner:
    """What a changed source path concerns: app keys (or a whole group) in one mode."""

    update: bool
    part: str  # "program" (a softdir source) or "config" (a configuredir source)
    app_key: str | None = None  # one app
    group: str | None = None  # every app of a group (a program under updatedir)
    top: str | None = None  # the first component under softdir/configuredir, for logging


def owner_of(dirs: Dirs, path: Path) -> PathOwner | None:
    """Given a path under remotecomdir or updatedir, return what it concerns, or None when it
    lies outside every app's source (the roots themselves, stray files)."""
    for root, update in ((dirs.remotecomdir, False), (dirs.updatedir, True)):
        try:
            parts = path.relative_to(root).parts
        except ValueError:
            continue
        if len(parts) < 2 or parts[0] not in ("softdir", "configuredir"):
            return None
        area, first = parts[0], parts[1]
        part = "program" if area == "softdir" else "config"
        if not update:
            return PathOwner(update=False, part=part, app_key=first, top=first)
        if area == "softdir":
            return PathOwner(update=True, part=part, group=first, top=first)
        if len(parts) < 3:
            # <updatedir>/configuredir/L itself: every app of the group may have changed.
            return PathOwner(update=True, part=part, group=first, top=first)
        return PathOwner(
            update=True, part=part, app_key=parts[2], group=first, top=f"{first}/{parts[2]}"
        )
    return None
