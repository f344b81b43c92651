"""Turn the original platform's config/config.yml into an equivalent syncpro config.yml."""

from __future__ import annotations

import json
import os
import shlex
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

import structlog
import yaml

from syncpro.config import environment
from syncpro.config.load import parse_config
from syncpro.errors import ConfigError, InventoryError
from syncpro.inventory.mysql import parse_mysql_url, quote_table

log = structlog.get_logger()

DEFAULT_TABLE = "pre_server_detail"
PASSWORD_FILE = Path("/etc/syncpro/db.password")
STATE_DIR = Path("/var/lib/syncpro")

# What each key of the original's environment section meant there; the text goes into errors.
PATH_KEYS = {
    "softdir": "pending-release programs",
    "configuredir": "pending-release config",
    "local_prodir": "programs downloaded from the servers",
    "local_confdir": "config downloaded from the servers",
    "update_local_prodir": "programs of new builds",
    "update_local_confdir": "config of new builds",
}
DB_KEYS = {
    "dbhost": "the inventory database's host",
    "dbuser": "the inventory database's user",
    "dbname": "the inventory database",
}
# The database password under the names original files give it; the first one present is used.
PASSWORD_KEYS = ("dbpassword", "dbpass", "dbpwd", "db_password")
# A key whose name says it holds a secret: never copied, and named first among the unused.
_SECRET_WORDS = ("pass", "pwd", "secret", "token", "private_key", "credential")
# Keys of the original with a syncpro counterpart that is not imported: what to do instead.
COUNTERPARTS = {
    "token": "the /rex endpoint's token: put it in a file and set http.token_file",
    "listen": "the /rex endpoint's address: set http.listen (and http.enabled: true)",
}
# Characters YAML (1.1, as PyYAML reads it) takes as line breaks, even inside a comment.
_LINE_BREAKS = frozenset("\n\r\x00\x85\u2028\u2029")


@dataclass(frozen=True)
class _Area:
    """A syncpro source area (remotecomdir or updatedir) and the moves it needs, if any."""

    root: Path
    moves: tuple[tuple[Path, Path], ...]


@dataclass(frozen=True)
class Imported:
    """An imported config: its text, how the original was read, and what of it was not used
    (dotted keys, secrets apart; never a value)."""

    text: str
    nesting: str
    unused_secrets: tuple[str, ...]
    unused: tuple[str, ...]
    unused_sections: tuple[str, ...]

    def notes(self) -> list[str]:
        """Return the lines telling a person what was read and what was left out."""
        lines = [f"read {self.nesting}"]
        if self.unused_secrets:
            lines.append(
                "not used, password-like (never copied): " + ", ".join(self.unused_secrets)
            )
        for key in (*self.unused_secrets, *self.unused):
            hint = COUNTERPARTS.get(key.rpartition(".")[2])
            if hint:
                lines.append(f"not used: {key}, {hint}")
        others = [k for k in self.unused if k.rpartition(".")[2] not in COUNTERPARTS]
        if others:
            lines.append("not used, no syncpro counterpart: " + ", ".join(others))
        if self.unused_sections:
            lines.append(
                "not read: section " + ", ".join(self.unused_sections) + " (another environment:"
                f" --env {self.unused_sections[0]} imports it)"
            )
        return lines


def import_original_config(path: Path, base: Path | None = None, env_key: str | None = None) -> str:
    """Given the original's config/config.yml, return the text of an equivalent syncpro
    config.yml, as import_original does."""
    return import_original(path, base, env_key).text


def import_original(path: Path, base: Path | None = None, env_key: str | None = None) -> Imported:
    """Given the original platform's config/config.yml, the directory its relative paths are
    relative to (default: the file's parent's parent, its install directory) and optionally the
    environment to import (default: its env.key), return an equivalent syncpro config.yml with
    what was read and what was not used. The database password is never copied: the text says
    where to put it. Raise ConfigError naming every missing or unusable key if the file cannot
    be imported."""
    path = Path(path)
    raw = _read(path)
    base = Path(
        os.path.abspath(base if base is not None else Path(os.path.abspath(path)).parent.parent)
    )
    problems: list[str] = []
    env_name, section, db_section = _select_environment(raw, env_key, problems)
    if section is None:
        raise ConfigError(path, problems)

    paths: dict[str, Path] = {}
    for key, meaning in PATH_KEYS.items():
        text = _text(section.get(key))
        if text is None:
            problems.append(f"{env_name}.{key}: missing ({meaning})")
        elif any(c in _LINE_BREAKS for c in text):
            problems.append(f"{env_name}.{key}: a path with a line break or NUL cannot be used")
        else:
            paths[key] = Path(os.path.normpath(os.path.join(base, text)))

    db: dict[str, str] = {}
    for key, meaning in DB_KEYS.items():
        text = _text(section.get(key, db_section.get(key)))
        if text is None:
            problems.append(f"{env_name}.{key} (or db.{key}): missing ({meaning})")
        else:
            db[key] = text
    port_text = _text(section.get("dbport", db_section.get("dbport"))) or "3306"
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        problems.append(f"{env_name}.dbport: must be a port number, not {port_text!r}")
    # Only whether there is one, and under which key, matters; the value itself is never kept.
    password_key = next(
        (
            f"{where}.{key}"
            for key in PASSWORD_KEYS
            for where, values in ((env_name, section), ("db", db_section))
            if _text(values.get(key))
        ),
        None,
    )

    external = _text(section.get("external_status")) == "true"
    table_key = "external_deploy_config_table" if external else "deploy_config_table"
    table = _text(section.get(table_key))
    if table is None and external:
        problems.append(f"{env_name}.{table_key}: missing (external_status is true)")
    table = table or DEFAULT_TABLE
    try:
        quote_table(table)
    except InventoryError:
        problems.append(f"{env_name}.{table_key}: {table!r} is not a plain table name")

    for program, config in (
        ("local_prodir", "local_confdir"),
        ("update_local_prodir", "update_local_confdir"),
    ):
        if program in paths and config in paths and _overlaps(paths[program], paths[config]):
            problems.append(
                f"{env_name}.{config}: {paths[config]} overlaps {env_name}.{program}"
                f" {paths[program]}; syncpro needs program and config apart"
            )
    if problems:
        raise ConfigError(path, problems)

    targets = [paths["softdir"], paths["configuredir"]]
    remote = _area(paths["local_prodir"], paths["local_confdir"], "remotecomdir", targets)
    update = _area(
        paths["update_local_prodir"],
        paths["update_local_confdir"],
        "updatedir",
        [*targets, remote.root],
    )
    url = _url(db["dbuser"], db["dbhost"], int(port_text), db["dbname"])
    text = _render(
        path=path,
        base=base,
        env_name=env_name,
        remote=remote,
        update=update,
        softdir=paths["softdir"],
        configuredir=paths["configuredir"],
        url=url,
        table=table,
        external=external,
        password_key=password_key,
    )
    _check(path, text, url)
    used = {*PATH_KEYS, *DB_KEYS, "dbport", "external_status", table_key}
    unused = [f"{env_name}.{key}" for key in section if key not in used]
    unused += [f"db.{key}" for key in db_section if key not in used or key in section]
    env = raw.get("env")
    if isinstance(env, Mapping):
        unused += [f"env.{key}" for key in env if key != "key"]
    if password_key is not None and password_key in unused:
        unused.remove(password_key)
    unused_sections = [
        str(name)
        for name, value in raw.items()
        if isinstance(value, Mapping) and name not in ("env", "db", env_name)
    ]
    imported = Imported(
        text=text,
        nesting=_nesting(env_name, env_key),
        unused_secrets=tuple(key for key in unused if _secret_like(key, raw)),
        unused=tuple(key for key in unused if not _secret_like(key, raw)),
        unused_sections=tuple(unused_sections),
    )
    # The notes go into the file too: whoever reads it later sees what was left behind.
    notes = "".join(
        f"{line}\n"
        for note in imported.notes()
        for line in textwrap.wrap(note, 98, initial_indent="# ", subsequent_indent="#   ")
    )
    imported = replace(imported, text=f"{text}\n# Imported from the original:\n{notes}")
    log.debug(
        "import_config.done",
        path=str(path),
        environment=env_name,
        moves=len(remote.moves) + len(update.moves),
    )
    return imported


def _secret_like(key: str, raw: Mapping[str, Any]) -> bool:
    """Given a dotted key of the original, return whether it looks like it holds a secret: its
    name says so and its value is not a mere switch (pass_auth: "true" holds none)."""
    section, _, name = key.partition(".")
    if not any(word in name.lower() for word in _SECRET_WORDS):
        return False
    value = _text(raw[section].get(name))
    return (value or "").lower() not in ("true", "false", "on", "off", "yes", "no", "0", "1", "")


def _nesting(env_name: str, env_key: str | None) -> str:
    chosen = "--env" if env_key is not None else "env.key"
    return (
        f"section {env_name} (chosen by {chosen}) for the folders and tables, and the database"
        f" keys from {env_name}, else from section db"
    )


def _read(path: Path) -> Mapping[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(path, [f"cannot read: {reason}"]) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(path, [f"not valid YAML: {_yaml_problem(exc)}"]) from None
    if not isinstance(raw, Mapping):
        raise ConfigError(path, ["the document must be a mapping of sections (env, dev, ...)"])
    return raw


def _yaml_problem(exc: yaml.YAMLError) -> str:
    # str(exc) quotes the offending line, which may be the one holding dbpassword.
    if isinstance(exc, yaml.MarkedYAMLError):
        where = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "syntax error"
        if where is not None:
            return f"{problem} at line {where.line + 1}, column {where.column + 1}"
        return problem
    return exc.__class__.__name__


def _select_environment(
    raw: Mapping[str, Any], env_key: str | None, problems: list[str]
) -> tuple[str, Mapping[str, Any] | None, Mapping[str, Any]]:
    db_section = raw.get("db")
    if not isinstance(db_section, Mapping):
        db_section = {}
    sections = [
        str(name)
        for name, value in raw.items()
        if isinstance(value, Mapping) and name not in ("env", "db")
    ]
    found = ", ".join(sections) or "none"
    suggest = f"; pass --env NAME to import one of them ({found})" if sections else ""
    if env_key is not None:
        section = raw.get(env_key)
        if not isinstance(section, Mapping):
            state = "missing" if section is None else "not a mapping"
            problems.append(
                f"{env_key}: {state} (the environment section --env selects;"
                f" environment sections found: {found})"
            )
            return env_key, None, db_section
        return env_key, section, db_section
    env = raw.get("env")
    env_key = _text(env.get("key")) if isinstance(env, Mapping) else None
    if env_key is None:
        if _text(env) is not None:
            why = f"env is the plain value {_text(env)!r}, not a section with a key"
        elif flat := [key for key in PATH_KEYS if key in raw]:
            why = (
                f"{', '.join(flat)} sit at the top level, but the original reads them from the"
                " section env.key names (env: {key: NAME}, NAME: {softdir: ...})"
            )
        else:
            why = "it names the environment section to import"
        problems.append(f"env.key: missing ({why}){suggest}")
        return "", None, db_section
    section = raw.get(env_key)
    if not isinstance(section, Mapping):
        state = "missing" if section is None else "not a mapping"
        problems.append(f"{env_key}: {state} (the environment section env.key selects){suggest}")
        return env_key, None, db_section
    return env_key, section, db_section


def _text(value: Any) -> str | None:
    """Given a scalar of the original, return it as stripped text, None if absent or empty.
    The original is Perl: numbers and strings are the same thing there."""
    if value is None or isinstance(value, Mapping | list | bool):
        return None
    text = str(value).strip()
    return text or None


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def _area(prodir: Path, confdir: Path, name: str, avoid: list[Path]) -> _Area:
    if prodir.parent == confdir.parent:
        root = prodir.parent
    else:
        root = Path(os.path.commonpath([prodir, confdir]))
    layout_matches = (prodir, confdir) == (root / "softdir", root / "configuredir")
    # A shared parent that also holds the pending-release dirs (the install dir, say) cannot be
    # a watched source: publishing into it would trigger syncs. A fresh subdirectory can.
    if not layout_matches and any(_overlaps(root, other) for other in avoid):
        root = root / name
    moves = tuple(
        (source, root / expected)
        for source, expected in ((prodir, "softdir"), (confdir, "configuredir"))
        if source != root / expected
    )
    return _Area(root, moves)


def _url(user: str, host: str, port: int, database: str) -> str:
    host_part = f"[{host}]" if ":" in host else quote(host, safe=".-_")
    return f"mysql://{quote(user, safe='')}@{host_part}:{port}/{quote(database, safe='')}"


def _q(value: object) -> str:
    """A YAML double-quoted scalar; JSON's ASCII escapes are valid YAML escapes."""
    return json.dumps(str(value), ensure_ascii=True)


def _move_comment(key: str, area: _Area, original: tuple[str, str]) -> list[str]:
    if not area.moves:
        return []
    lines = [
        f"  # ACTION NEEDED before syncpro starts: syncpro reads {key}/softdir and",
        f"  # {key}/configuredir, but the original's {original[0]} and {original[1]}",
        "  # are elsewhere. Move each directory below and leave a symlink at its old place, so",
        "  # the original keeps writing into it. Do not symlink the other way round: the watcher",
        "  # does not follow a symlink into its tree, so the real directory must be in it.",
    ]
    for source, target in area.moves:
        src, dst = shlex.quote(str(source)), shlex.quote(str(target))
        parent = shlex.quote(str(target.parent))
        lines.append(f"  #   mkdir -p {parent} && mv -T {src} {dst} && ln -s {dst} {src}")
    return lines


def _render(
    *,
    path: Path,
    base: Path,
    env_name: str,
    remote: _Area,
    update: _Area,
    softdir: Path,
    configuredir: Path,
    url: str,
    table: str,
    external: bool,
    password_key: str | None,
) -> str:
    lines = [
        "# syncpro configuration imported from the original platform's config",
        f"#   file {_q(os.path.abspath(path))}, environment {_q(env_name)}.",
        f"# Its relative paths were taken relative to {_q(base)};",
        "# here every path is absolute.",
        "# Check it with: syncpro check-config --config <this file>",
        "",
        "dirs:",
        "  # downloads from the servers (the original's local_prodir and local_confdir)",
        *_move_comment("remotecomdir", remote, ("local_prodir", "local_confdir")),
        f"  remotecomdir: {_q(remote.root)}",
        "  # new builds (the original's update_local_prodir and update_local_confdir)",
        *_move_comment("updatedir", update, ("update_local_prodir", "update_local_confdir")),
        f"  updatedir: {_q(update.root)}",
        "  # pending release, read by the deploy step (the original's softdir and configuredir)",
        f"  softdir: {_q(softdir)}",
        f"  configuredir: {_q(configuredir)}",
        f"  state: {_q(STATE_DIR)}",
        "",
        "# The apps stay in the original platform's table: registering an app changes nothing.",
        "inventory:",
        "  source: mysql",
        f"  url: {_q(url)}",
    ]
    if external:
        lines.append("  # the original's external_status was true: it read the external table")
    lines.append(f"  table: {_q(table)}")
    if password_key is not None:
        lines += [
            "  # The database password is not copied here. Write the original's"
            f" {password_key} into",
            "  # this file, readable by the syncpro user only, e.g.:",
            f"  #   install -m 0600 /dev/null {PASSWORD_FILE} && editor {PASSWORD_FILE}",
            f"  # (or set {environment.DB_PASSWORD.name} in the service's environment and drop"
            " this line)",
            f"  password_file: {_q(PASSWORD_FILE)}",
        ]
    else:
        lines += [
            "  # The original had no database password. If yours needs one, write it into a",
            f"  # file readable by the syncpro user only and add: password_file: {PASSWORD_FILE}",
        ]
    return "\n".join(lines) + "\n"


def _check(path: Path, text: str, url: str) -> None:
    """Refuse to hand out a config syncpro itself would reject (overlapping dirs, say)."""
    try:
        parse_config(yaml.safe_load(text), path.with_name("syncpro-config.yml"))
        parse_mysql_url(url)
    except ConfigError as exc:
        raise ConfigError(
            path, [f"the imported config would be invalid: {p}" for p in exc.problems]
        ) from None
    except InventoryError as exc:
        raise ConfigError(path, [f"the imported config would be invalid: {exc}"]) from None
