"""Apps and the rules every inventory source applies to them."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

# "all" selects every app; ".syncpro" is the work area inside softdir and configuredir.
RESERVED_KEYS = frozenset({"all", ".syncpro"})


@dataclass(frozen=True)
class App:
    """One deployable application instance of the inventory."""

    app_key: str
    local_name: str
    auto_deploy: bool = True
    configure_file_status: int = 0
    configure_file_list: tuple[str, ...] = ()

    @property
    def config_integrated(self) -> bool:
        """True for a type-2 app: only the listed config files are published."""
        return self.configure_file_status == 1 and bool(self.configure_file_list)


def path_component_problem(value: object) -> str | None:
    """Given an app_key or local_name, return why it is not a safe path component, or None."""
    if not isinstance(value, str):
        return f"must be a string, not {type(value).__name__}"
    if value.strip() == "":
        return "must not be empty"
    if "/" in value or "\0" in value:
        return f"{value!r} is not a safe path component (contains '/' or NUL)"
    if value in (".", ".."):
        return f"{value!r} is not a safe path component"
    if value in RESERVED_KEYS:
        return f"{value!r} is reserved (it selects every app)"
    if value != value.strip() or any(c in value for c in " ,'\"\n\t\r"):
        return f"{value!r} is not a safe path component (spaces, commas and quotes separate keys)"
    return None


def split_file_list(value: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """Given a configure_file_list as stored (comma-separated text or list), return its entries."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    return tuple(item.strip() for item in items if item.strip())


@dataclass(frozen=True)
class Inventory:
    """The apps in inventory order, with fast look-ups by key and group."""

    apps: tuple[App, ...]

    def by_key(self) -> dict[str, App]:
        return self._by_key

    def group(self, local_name: str) -> tuple[App, ...]:
        return self._groups.get(local_name, ())

    # Built once per inventory: the daemon looks apps up for every file event.
    @cached_property
    def _by_key(self) -> dict[str, App]:
        return {app.app_key: app for app in self.apps}

    @cached_property
    def _groups(self) -> dict[str, tuple[App, ...]]:
        groups: dict[str, list[App]] = {}
        for app in self.apps:
            groups.setdefault(app.local_name, []).append(app)
        return {name: tuple(apps) for name, apps in groups.items()}

    @property
    def deployable(self) -> tuple[App, ...]:
        return tuple(app for app in self.apps if app.auto_deploy)
