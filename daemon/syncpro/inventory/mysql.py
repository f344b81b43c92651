"""Read the inventory from the original platform's MySQL/MariaDB table (pre_server_detail)."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

import pymysql  # type: ignore[import-untyped,unused-ignore]  # stubs: types-PyMySQL
import structlog

from syncpro.errors import InventoryError
from syncpro.inventory.apps import App, Inventory, path_component_problem, split_file_list
from syncpro.inventory.settings import InventorySettings

log = structlog.get_logger()

PASSWORD_ENV = "SYNCPRO_DB_PASSWORD"  # noqa: S105 - the variable's name, not a password
DEFAULT_PORT = 3306
SCHEMES = ("mysql", "mariadb")
COLUMNS = ("app_key", "local_name", "auto_deloy", "configure_file_status", "configure_file_list")

_IDENTIFIER = re.compile(r"[A-Za-z0-9_]{1,64}")
# PyMySQL refuses a connect timeout of 0; the config allows it, read as "as short as possible".
_MIN_CONNECT_TIMEOUT = 0.1
_LOST = 2013  # CR_SERVER_LOST: the server went quiet or away mid-conversation


@dataclass(frozen=True)
class MysqlTarget:
    """Where the inventory table lives. The password is kept out of repr on purpose."""

    host: str
    port: int
    user: str
    database: str
    password: str | None = field(default=None, repr=False, compare=False)

    @property
    def where(self) -> str:
        """host:port/database, the way messages name the server (never with credentials)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}/{self.database}"


_URL_FORM = "must look like mysql://user@host:port/database"
_PORT = re.compile(r"[0-9]{1,5}")


class _BadUrl(Exception):
    """What is wrong with an inventory URL, in words that never repeat it."""


def parse_mysql_url(url: str) -> MysqlTarget:
    """Given mysql://user[:password]@host[:port]/database (or mariadb://), return the target,
    with the URL's password if it has one. Raise InventoryError if the URL is not of that form;
    the message never repeats the URL, which may hold a password."""
    try:
        return _parse_url(url)
    except _BadUrl as exc:
        raise InventoryError(f"inventory.url: {exc}; {_URL_FORM}") from None


def url_problem(url: str) -> str | None:
    """Given an inventory URL, return what is wrong with it (never repeating it), or None."""
    try:
        _parse_url(url)
    except _BadUrl as exc:
        return f"{exc}; {_URL_FORM}"
    return None


def _parse_url(url: str) -> MysqlTarget:
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        raise _BadUrl("names no host (an IPv6 address goes in [brackets])") from None
    if parts.scheme.lower() not in SCHEMES:
        raise _BadUrl("scheme must be mysql:// or mariadb://")
    # Read the port here rather than by urlsplit: it takes port 0 and an empty port as "none"
    # and would quietly connect to 3306 instead.
    hostport = parts.netloc.rpartition("@")[2]
    port_text: str | None = None
    if hostport.startswith("["):
        rest = hostport.partition("]")[2]
        if rest:
            port_text = rest[1:] if rest.startswith(":") else rest
    elif ":" in hostport:
        port_text = hostport.partition(":")[2]
    host = parts.hostname
    if not host or any(c.isspace() or c in "/\\" for c in host):
        raise _BadUrl("names no host")
    port = DEFAULT_PORT
    if port_text is not None:
        if not _PORT.fullmatch(port_text) or not 1 <= int(port_text) <= 65535:
            raise _BadUrl("the port must be a number from 1 to 65535")
        port = int(port_text)
    if not parts.username:
        raise _BadUrl("names no user")
    database = unquote(parts.path.lstrip("/"))
    if not database or "/" in database:
        raise _BadUrl("names no database (or more than one)")
    if parts.query or parts.fragment:
        raise _BadUrl("takes no ?query or #fragment")
    return MysqlTarget(
        host=host,
        port=port,
        user=unquote(parts.username),
        database=database,
        password=None if parts.password is None else unquote(parts.password),
    )


def quote_table(table: str) -> str:
    """Given a table name, return it backquoted for SQL. Raise InventoryError if it is not a
    plain identifier: a table name cannot be a query parameter, so it must be this strict."""
    if not _IDENTIFIER.fullmatch(table):
        raise InventoryError(
            f"inventory.table: {table!r} is not a plain table name (letters, digits and _ only)"
        )
    return f"`{table}`"


def _resolve_password(settings: InventorySettings, target: MysqlTarget) -> MysqlTarget:
    if target.password is not None:
        return target
    if settings.password_file is not None:
        try:
            text = settings.password_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise InventoryError(
                f"cannot read inventory.password_file {settings.password_file}: {reason}"
            ) from None
        return _with_password(target, text.strip())
    if PASSWORD_ENV in os.environ:
        return _with_password(target, os.environ[PASSWORD_ENV])
    return target


def _with_password(target: MysqlTarget, password: str) -> MysqlTarget:
    return MysqlTarget(target.host, target.port, target.user, target.database, password)


def load_mysql_inventory(settings: InventorySettings) -> tuple[Inventory, list[str]]:
    """Given the inventory settings of a mysql source, return the apps of its table in `id`
    order (table order if it has no `id`) and one warning per row that was refused.
    Raise InventoryError, with one line naming host, port and database, if the server cannot be
    reached, refuses the credentials, or lacks the table or one of its columns."""
    if not settings.url:
        raise InventoryError("inventory.url: required when inventory.source is mysql")
    table = quote_table(settings.table)
    target = _resolve_password(settings, parse_mysql_url(settings.url))
    started = time.monotonic()
    try:
        rows, has_id = _fetch(target, table, settings)
    except _Silent as exc:
        raise InventoryError(
            f"cannot read inventory from mysql {target.where}: connected, but no answer within"
            f" {settings.connect_timeout:g}s{exc.hint}"
        ) from None
    except (pymysql.MySQLError, OSError) as exc:
        raise InventoryError(
            f"cannot read inventory from mysql {target.where}: {_reason(exc, target, settings)}"
        ) from None
    except _MissingColumns as exc:
        raise InventoryError(
            f"cannot read inventory from mysql {target.where}: table {settings.table} has no"
            f" column {', '.join(exc.columns)} (is it the original platform's pre_server_detail?)"
        ) from None
    inventory, warnings = _build(rows, has_id, settings.table)
    log.info(
        "inventory.loaded",
        source="mysql",
        server=target.where,
        table=settings.table,
        apps=len(inventory.apps),
        skipped=len(warnings),
        seconds=round(time.monotonic() - started, 3),
    )
    return inventory, warnings


class _MissingColumns(Exception):
    def __init__(self, columns: list[str]) -> None:
        super().__init__(", ".join(columns))
        self.columns = columns


class _Silent(Exception):
    """The server took the connection and then sent nothing within the timeout."""

    def __init__(self, hint: str) -> None:
        super().__init__(hint)
        self.hint = hint


def _timed_out(exc: pymysql.MySQLError) -> bool:
    return len(exc.args) >= 2 and exc.args[0] == _LOST and "timed out" in str(exc.args[1])


def _fetch(
    target: MysqlTarget, table: str, settings: InventorySettings
) -> tuple[Sequence[Sequence[Any]], bool]:
    # One bound for every wait, the greeting included: PyMySQL would otherwise wait for the
    # greeting as long as read_timeout, which defaults to nothing at all. The table is a few
    # hundred rows, so a healthy server never keeps a read waiting that long.
    timeout = max(settings.connect_timeout, _MIN_CONNECT_TIMEOUT)
    try:
        conn = pymysql.connect(
            host=target.host,
            port=target.port,
            user=target.user,
            password=target.password or "",
            database=target.database,
            connect_timeout=timeout,
            read_timeout=timeout,
            write_timeout=timeout,
            charset="utf8mb4",
            autocommit=True,
        )
    except pymysql.MySQLError as exc:
        if _timed_out(exc):
            raise _Silent(" (is it a MySQL/MariaDB server?)") from None
        raise
    try:
        with conn.cursor() as cursor:
            # LIMIT 0 asks only for the column names: the shape is checked before any row is read.
            cursor.execute(f"SELECT * FROM {table} LIMIT 0")  # noqa: S608 - quote_table checked
            present = {str(column[0]).lower() for column in cursor.description or ()}
            missing = [name for name in COLUMNS if name not in present]
            if missing:
                raise _MissingColumns(missing)
            has_id = "id" in present
            columns = ", ".join(f"`{name}`" for name in (("id",) if has_id else ()) + COLUMNS)
            order = " ORDER BY `id`" if has_id else ""
            cursor.execute(f"SELECT {columns} FROM {table}{order}")  # noqa: S608 - fixed names
            rows = cursor.fetchall()
    except pymysql.MySQLError as exc:
        if _timed_out(exc):
            raise _Silent(f" to a query of table {settings.table}") from None
        raise
    finally:
        # After a lost connection PyMySQL has closed it already, and a second close() raises.
        if conn.open:
            conn.close()
    return rows, has_id


def _reason(exc: BaseException, target: MysqlTarget, settings: InventorySettings) -> str:
    args = exc.args
    if isinstance(exc, pymysql.MySQLError) and len(args) >= 2:
        code, message = args[0], str(args[1])
        if code == 2003:
            # "Can't connect to MySQL server on 'h' ([Errno 111] Connection refused)": the part in
            # parentheses is what an operator acts on.
            inner = re.search(r"\((?:\[Errno [-\d]+\] )?([^()]*)\)\s*$", message)
            message = inner.group(1) if inner else message
            if "timed out" in message:
                message = f"timed out after {settings.connect_timeout:g}s"
            message = message[:1].lower() + message[1:]
        else:
            message = f"{message} (error {code})"
    else:
        message = str(exc) or exc.__class__.__name__
    message = " ".join(message.split())
    # Defence in depth: no server message is known to echo a password, but none may ever show.
    if target.password:
        message = message.replace(target.password, "***")
    return message


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", errors="replace")
    return str(value)


def _build(rows: Sequence[Sequence[Any]], has_id: bool, table: str) -> tuple[Inventory, list[str]]:
    apps: list[App] = []
    warnings: list[str] = []
    first_row: dict[str, str] = {}
    for position, row in enumerate(rows, start=1):
        if has_id:
            row_id, values = f"id={row[0]}", row[1:]
        else:
            row_id, values = f"row {position}", row
        key, name, auto, status, listed = (_text(v) for v in values)
        where = f"{table} {row_id}"
        if key is None or key.strip() == "":
            # The original skipped rows without an app_key silently; they are not apps.
            log.debug("inventory.row_without_key", table=table, row=row_id)
            continue
        problem = next(
            (
                f"{column} {problem}"
                for column, value in (("app_key", key), ("local_name", name or ""))
                if (problem := path_component_problem(value)) is not None
            ),
            None,
        )
        if problem is not None:
            warnings.append(f"{where}: {problem}")
            continue
        if key in first_row:
            warnings.append(
                f"{where}: app_key {key!r} duplicates {first_row[key]}; the first row wins"
            )
            continue
        first_row[key] = row_id
        assert name is not None  # an empty local_name was refused above
        if status not in (None, "0", "1"):
            log.debug("inventory.odd_file_status", table=table, row=row_id, value=status)
        apps.append(
            App(
                app_key=key,
                local_name=name,
                auto_deploy=auto == "1",
                configure_file_status=1 if status == "1" else 0,
                configure_file_list=split_file_list(listed),
            )
        )
    return Inventory(tuple(apps)), warnings
