"""Where the inventory comes from: the config's own apps or a MariaDB table, and how to reach it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class InventorySettings:
    source: str = "config"
    url: str | None = field(default=None, repr=False)  # may hold the database password
    table: str = "pre_server_detail"
    password_file: Path | None = None
    refresh: float = 60.0
    connect_timeout: float = 5.0
