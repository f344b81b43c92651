"""Turn a request's `k` into the apps it selects (SPEC section 4)."""

from __future__ import annotations

from dataclasses import dataclass

from syncpro.inventory.apps import App, Inventory

ALL = "all"
NOT_AUTO_DEPLOY = "auto_deploy is false"


@dataclass(frozen=True)
class Skipped:
    """A member of a selected group that is not synced, and why."""

    app_key: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"app_key": self.app_key, "reason": self.reason}


@dataclass(frozen=True)
class Selection:
    """The apps a `k` selects, in inventory order, the tokens that matched nothing, and the
    members of selected groups left out (not auto-deployed), in inventory order."""

    apps: tuple[App, ...]
    unknown: tuple[str, ...]
    skipped: tuple[Skipped, ...] = ()


def select(tokens: tuple[str, ...], inventory: Inventory) -> Selection:
    """Given the tokens of `k` and the inventory, return the selected auto-deploy apps.
    A token matches an app_key, a local_name (the whole group), or `all`."""
    deployable = inventory.deployable
    keys = {app.app_key for app in deployable}
    groups = {app.local_name for app in deployable}
    chosen: set[str] = set()
    unknown: list[str] = []
    named_groups: set[str] = set()
    for token in tokens:
        if token == ALL:
            chosen.update(keys)
            continue
        matched = False
        if token in keys:
            chosen.add(token)
            matched = True
        if token in groups:
            chosen.update(app.app_key for app in deployable if app.local_name == token)
            named_groups.add(token)
            matched = True
        if not matched:
            unknown.append(token)
    # A group names its members; one that cannot be synced is said, not silently dropped.
    # (An app named by its own key that is not auto-deployed stays an unknown key.)
    skipped = tuple(
        Skipped(app.app_key, NOT_AUTO_DEPLOY)
        for app in inventory.apps
        if not app.auto_deploy and app.local_name in named_groups
    )
    apps = tuple(app for app in deployable if app.app_key in chosen)
    return Selection(apps, tuple(unknown), skipped)
