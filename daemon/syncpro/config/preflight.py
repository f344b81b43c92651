"""Preflight: what a valid config still needs to run, checked on this host by `check-config`.

A config can be valid and still unable to run: a source folder with a typo, a password file
that is not there, a database that cannot be reached. Each check names its dotted key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from syncpro.config import environment
from syncpro.config.model import Config
from syncpro.errors import InventoryError

OK, WARNING, FAILED = "ok", "warning", "failed"
PASSWORD_ENV = environment.DB_PASSWORD.name


@dataclass(frozen=True)
class Check:
    """The outcome of one check: the key it is about, ok / warning / failed, and why."""

    key: str
    status: str
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"key": self.key, "status": self.status, "message": self.message}


def _source_dir(key: str, path: Path, strict: bool) -> Check:
    if not path.exists():
        status = FAILED if strict else WARNING
        return Check(key, status, f"{path} is missing: nothing to sync from it; a typo?")
    if not path.is_dir():
        return Check(key, FAILED, f"{path} is not a folder")
    if not os.access(path, os.R_OK | os.X_OK):
        return Check(key, FAILED, f"{path} is not readable by uid {os.geteuid()}")
    return Check(key, OK, f"{path} is a readable folder")


def _target_dir(key: str, path: Path, strict: bool) -> Check:
    if not path.exists():
        status = FAILED if strict else WARNING
        return Check(key, status, f"{path} is missing: made at the first sync")
    if not path.is_dir():
        return Check(key, FAILED, f"{path} is not a folder")
    if not os.access(path, os.W_OK | os.X_OK):
        # Only a warning: check-config may run as another user than the daemon.
        return Check(key, WARNING, f"{path} is not writable by uid {os.geteuid()}")
    return Check(key, OK, f"{path} is a writable folder")


def check_dirs(config: Config, *, strict: bool = False) -> list[Check]:
    """Given a config, return a check per folder: sources readable, targets writable. A missing
    folder is a warning, or a failure when `strict`."""
    dirs = config.dirs
    return [
        _source_dir("dirs.remotecomdir", dirs.remotecomdir, strict),
        _source_dir("dirs.updatedir", dirs.updatedir, strict),
        _target_dir("dirs.softdir", dirs.softdir, strict),
        _target_dir("dirs.configuredir", dirs.configuredir, strict),
    ]


def _readable_file(key: str, path: Path, what: str) -> Check:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return Check(key, FAILED, f"{path} does not exist; it should hold {what}")
    except OSError as exc:
        return Check(key, FAILED, f"cannot read {path}: {exc.strerror or exc}")
    except UnicodeDecodeError:
        return Check(key, FAILED, f"{path} is not UTF-8 text")
    if not text.strip():
        return Check(key, FAILED, f"{path} is empty; it should hold {what}")
    return Check(key, OK, f"{path} is readable")


def check_files(config: Config) -> list[Check]:
    """Given a config, return a check per file it names (the token file, the password file) and
    for a database password that is given nowhere."""
    checks: list[Check] = []
    if config.http.token_file is not None:
        checks.append(_readable_file("http.token_file", config.http.token_file, "the token"))
    inventory = config.inventory
    if inventory.password_file is not None:
        if inventory.source != "mysql":
            checks.append(
                Check("inventory.password_file", WARNING, "unused: inventory.source is config")
            )
        else:
            checks.append(
                _readable_file(
                    "inventory.password_file", inventory.password_file, "the database password"
                )
            )
    elif inventory.source == "mysql" and not _url_has_password(inventory.url or ""):
        if os.environ.get(PASSWORD_ENV):
            checks.append(Check("inventory.url", OK, f"the password comes from ${PASSWORD_ENV}"))
        else:
            checks.append(
                Check(
                    "inventory.url",
                    WARNING,
                    "no database password: not in the url, no inventory.password_file,"
                    f" ${PASSWORD_ENV} not set; connecting without one",
                )
            )
    return checks


def _url_has_password(url: str) -> bool:
    from syncpro.inventory.mysql import parse_mysql_url

    try:
        return parse_mysql_url(url).password is not None
    except InventoryError:
        return False  # the loader reported the URL already


def check_inventory(config: Config) -> Check:
    """Given a config, load its inventory as the daemon would (reaching the database and
    reading the table when it lives there) and return how that went."""
    from syncpro.inventory.source import load_inventory

    settings = config.inventory
    try:
        inventory = load_inventory(settings, config.config_inventory)
    except InventoryError as exc:
        return Check("inventory", FAILED, str(exc))
    apps = len(inventory.apps)
    deployable = len(inventory.deployable)
    where = "the config" if settings.source == "config" else f"table {settings.table}"
    return Check("inventory", OK, f"{apps} apps ({deployable} auto-deploy) read from {where}")


def preflight(config: Config, *, strict: bool = False, connect: bool = False) -> list[Check]:
    """Given a valid config, return every preflight check: folders, files, and with `connect`
    the inventory read from its source."""
    checks = [*check_dirs(config, strict=strict), *check_files(config)]
    if connect:
        checks.append(check_inventory(config))
    return checks
