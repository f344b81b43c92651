"""The plan of a sync: which source feeds which target, what is listed, what is missing.

Worked out once here and used by the sync, by `diff` (so that a diff predicts the sync by
construction) and by anything else that must know where an app's trees come from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from syncpro.config.model import Dirs
from syncpro.engine import layout
from syncpro.inventory.apps import App


@dataclass(frozen=True)
class ProgramPlan:
    """One group's program target and the apps that could feed it, in inventory order. The
    last app whose source exists wins, as the original did; the others are superseded."""

    group: str
    target: layout.Target
    present: tuple[tuple[App, Path], ...]
    missing: tuple[tuple[App, Path], ...]

    @property
    def winner(self) -> tuple[App, Path] | None:
        return self.present[-1] if self.present else None


@dataclass(frozen=True)
class ConfigPlan:
    """One app's config target, its source, and the list of files a type-2 app publishes
    (None: the whole source)."""

    app: App
    source: Path
    target: layout.Target
    exists: bool
    listed: tuple[str, ...] | None


def program_plans(dirs: Dirs, apps: tuple[App, ...] | list[App], update: bool) -> list[ProgramPlan]:
    """Given the selected apps and the mode, return one plan per group, groups in the order
    their first app was selected."""
    groups: dict[str, list[App]] = {}
    for app in apps:
        groups.setdefault(app.local_name, []).append(app)
    plans: list[ProgramPlan] = []
    for group, members in groups.items():
        present: list[tuple[App, Path]] = []
        missing: list[tuple[App, Path]] = []
        for app in members:
            source = layout.program_source(dirs, app, update)
            (present if source.is_dir() else missing).append((app, source))
        plans.append(
            ProgramPlan(
                group, layout.program_target(dirs, members[0]), tuple(present), tuple(missing)
            )
        )
    return plans


def config_plan(dirs: Dirs, app: App, update: bool) -> ConfigPlan:
    """Given an app and the mode, return where its config comes from and goes to."""
    source = layout.config_source(dirs, app, update)
    return ConfigPlan(
        app,
        source,
        layout.config_target(dirs, app),
        source.is_dir(),
        app.configure_file_list if app.config_integrated else None,
    )
