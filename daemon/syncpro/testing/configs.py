"""Build a config.yml and the sources it names, under one root: the one config builder of the
tests and the benchmarks."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

Section = Mapping[str, Any]

# The five dirs under the config's own folder, short so that socket paths next to them fit.
SHORT_DIRS: Mapping[str, str] = {
    "remotecomdir": "r",
    "updatedir": "u",
    "softdir": "soft",
    "configuredir": "conf",
    "state": "state",
}

# Timings for a daemon under test: a short grace and settle, no fsync, no periodic rescan in the
# middle of a test, and the control socket next to the config.
DAEMON_DEFAULTS: Mapping[str, Section] = {
    "publish": {"grace": 0.5, "fsync": False},
    "watch": {"settle": 0.3, "max_wait": 3, "rescan_interval": 3600},
    "control": {"socket": "run/control.sock"},
}


def app(
    app_key: str,
    local_name: str,
    *,
    auto_deploy: bool = True,
    status: int = 0,
    files: list[str] | str | None = None,
) -> dict[str, Any]:
    """Return one `apps:` row of config.yml."""
    return {
        "app_key": app_key,
        "local_name": local_name,
        "auto_deploy": auto_deploy,
        "configure_file_status": status,
        "configure_file_list": [] if files is None else files,
    }


def group(local_name: str, *app_keys: str) -> list[dict[str, Any]]:
    """Return the rows of apps that share one program target (one local_name)."""
    return [app(key, local_name) for key in app_keys]


def config_doc(
    apps: Iterable[Mapping[str, Any]],
    *,
    layout: Mapping[str, str] = SHORT_DIRS,
    under: Path | None = None,
    defaults: Mapping[str, Section] = DAEMON_DEFAULTS,
    **sections: Section,
) -> dict[str, Any]:
    """Return a config.yml document: the dirs of `layout`, relative to the config file unless
    `under` makes them absolute; `defaults`; then each of `sections` (`dirs=` too) merged in
    key by key."""
    doc: dict[str, Any] = {
        "dirs": {name: str(under / rel) if under else rel for name, rel in layout.items()},
    }
    for name, values in [*defaults.items(), *sections.items()]:
        doc.setdefault(name, {}).update(values)
    doc["apps"] = [dict(a) for a in apps]
    return doc


def write_doc(path: Path, doc: Mapping[str, Any]) -> Path:
    """Write doc as YAML at path, making its folder; return path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        yaml.safe_dump(dict(doc), allow_unicode=True, sort_keys=False), encoding="utf-8"
    )
    return path


def write_config(
    root: Path,
    apps: Iterable[Mapping[str, Any]],
    *,
    name: str = "config.yml",
    **options: Any,
) -> Path:
    """Write `root/name` for apps (options as for `config_doc`); return its path."""
    return write_doc(root / name, config_doc(apps, **options))


def put(root: Path, files: Mapping[str, str | bytes]) -> None:
    """Write files under root (relative path → text or bytes), making their folders."""
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")


def tree(root: Path) -> dict[str, str]:
    """The text files under root; a swap in the middle of reading gives {} (read again)."""
    try:
        return {
            str(p.relative_to(root)): p.read_text(encoding="utf-8")
            for p in sorted(root.rglob("*"))
            if p.is_file()
        }
    except FileNotFoundError:
        return {}
