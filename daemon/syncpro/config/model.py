"""The settings model: one frozen dataclass per config section, each field with its one default.

Nothing here reads a file: the engine imports this module alone, never the YAML loader.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from syncpro.inventory.apps import App, Inventory
from syncpro.inventory.settings import InventorySettings

DEFAULT_IGNORE = (
    # rsync's temporary .<name>.XXXXXX: a dot, a name, a dot, exactly six letters or digits.
    ".*." + "[A-Za-z0-9]" * 6,
    "*.part",
    "*.tmp",
    "*.swp",
    "*.swx",
    "*~",
    ".#*",
    "4913",  # vim's probe file when checking a directory is writable
)


@dataclass(frozen=True)
class Dirs:
    remotecomdir: Path
    updatedir: Path
    softdir: Path
    configuredir: Path
    state: Path = Path("/var/lib/syncpro")


def default_build_processes() -> int:
    """Processes for first trees: the machine's CPUs, up to four (see engine.buildpool)."""
    return min(4, os.cpu_count() or 1)


@dataclass(frozen=True)
class PublishSettings:
    grace: float = 10.0
    fsync: bool = True
    parallel: int = 2
    processes: int = field(default_factory=default_build_processes)


@dataclass(frozen=True)
class WatchSettings:
    settle: float = 3.0
    max_wait: float = 60.0
    ignore: tuple[str, ...] = DEFAULT_IGNORE
    ready_marker: str | None = None
    rescan_interval: float = 300.0
    workers: int = 4
    poll_interval: float = 2.0


@dataclass(frozen=True)
class ControlSettings:
    socket: Path = Path("/run/syncpro/control.sock")
    mode: int = 0o660
    group: str | None = None
    allow_uids: tuple[int, ...] = ()
    allow_gids: tuple[int, ...] = ()


@dataclass(frozen=True)
class HttpSettings:
    enabled: bool = False
    listen: str = "127.0.0.1:3000"
    token: str | None = field(default=None, repr=False)
    token_file: Path | None = None
    max_body: int = 65536
    cors_origin: str | None = None

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)


@dataclass(frozen=True)
class MonitorSettings:
    listen: str = ""
    """host:port of GET /metrics, /healthz and /readyz; empty: not served."""

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)


@dataclass(frozen=True)
class Config:
    path: Path
    dirs: Dirs
    apps: tuple[App, ...]
    publish: PublishSettings = PublishSettings()
    watch: WatchSettings = WatchSettings()
    control: ControlSettings = ControlSettings()
    http: HttpSettings = HttpSettings()
    monitor: MonitorSettings = MonitorSettings()
    inventory: InventorySettings = field(default_factory=InventorySettings)

    @property
    def config_inventory(self) -> Inventory:
        return Inventory(self.apps)
