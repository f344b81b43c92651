"""The MariaDB server of the tests: the original platform's table in a throw-away database."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import pymysql
import pytest

from syncpro.config import InventorySettings

TEST_URL_ENV = "SYNCPRO_TEST_MYSQL_URL"
DEFAULT_TEST_URL = "mysql://root@127.0.0.1:3306"

# The table as the original platform creates it, with a few of its many unrelated columns.
ORIGINAL_TABLE = """
CREATE TABLE pre_server_detail (
    id INT NOT NULL AUTO_INCREMENT PRIMARY KEY,
    app_key VARCHAR(128) NULL,
    server_name VARCHAR(128) NULL,
    network_ip VARCHAR(64) NULL,
    pro_dir VARCHAR(255) NULL,
    config_dir VARCHAR(255) NULL,
    local_name VARCHAR(128) NULL,
    auto_deloy VARCHAR(2) NULL DEFAULT '0',
    configure_file_status INT NULL,
    configure_file_list TEXT NULL,
    is_deloy_dir INT NULL
) DEFAULT CHARSET = utf8mb4
"""


@dataclass(frozen=True)
class Server:
    host: str
    port: int
    user: str
    password: str

    def connect(self, database: str | None = None) -> pymysql.connections.Connection[Any]:
        return pymysql.connect(
            host=self.host,
            port=self.port,
            user=self.user,
            password=self.password,
            database=database,
            connect_timeout=3,
            autocommit=True,
            charset="utf8mb4",
        )

    def url(self, database: str, *, user: str | None = None, password: str | None = None) -> str:
        credentials = quote(user or self.user, safe="")
        secret = self.password if user is None else password
        if secret:
            credentials += ":" + quote(secret, safe="")
        return f"mysql://{credentials}@{self.host}:{self.port}/{database}"


@dataclass
class Database:
    """One throw-away database holding the original table."""

    server: Server
    name: str
    table: str = "pre_server_detail"

    @property
    def url(self) -> str:
        return self.server.url(self.name)

    def execute(self, sql: str, args: Any = None) -> None:
        with self.server.connect(self.name) as conn, conn.cursor() as cursor:
            cursor.execute(sql, args)

    def add(self, *rows: Mapping[str, Any]) -> None:
        with self.server.connect(self.name) as conn, conn.cursor() as cursor:
            for row in rows:
                columns = ", ".join(f"`{name}`" for name in row)
                marks = ", ".join(["%s"] * len(row))
                cursor.execute(
                    f"INSERT INTO `{self.table}` ({columns}) VALUES ({marks})",  # noqa: S608
                    list(row.values()),
                )

    def settings(self, **changes: Any) -> InventorySettings:
        base = InventorySettings(source="mysql", url=self.url, connect_timeout=3.0)
        return replace(base, **changes)


def app_row(key: str, name: str = "server", **fields: Any) -> dict[str, Any]:
    """A row of a deployable app (auto_deloy 1); fields add or override columns."""
    return {"app_key": key, "local_name": name, "auto_deloy": "1", **fields}


def reachable_server() -> Server:
    """The server at $SYNCPRO_TEST_MYSQL_URL (or the default); when it cannot be reached the
    test fails if $CI is set and is skipped otherwise, saying how to point it at a server."""
    parts = urlsplit(os.environ.get(TEST_URL_ENV, DEFAULT_TEST_URL))
    found = Server(
        host=parts.hostname or "127.0.0.1",
        port=parts.port or 3306,
        user=unquote(parts.username or "root"),
        password=unquote(parts.password or ""),
    )
    try:
        found.connect().close()
    except pymysql.MySQLError as exc:
        message = (
            f"no MySQL/MariaDB server for the tests at {found.host}:{found.port}"
            f" ({exc.args[-1]}); start one or point {TEST_URL_ENV} at one"
            f" (mysql://user[:password]@host:port, a user that may create databases and users)"
        )
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return found


@contextmanager
def throwaway_database(server: Server) -> Iterator[Database]:
    """A new database holding the original table, dropped afterwards."""
    name = f"syncpro_test_{uuid.uuid4().hex[:12]}"
    with server.connect() as conn, conn.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
    database = Database(server, name)
    try:
        database.execute(ORIGINAL_TABLE)
        yield database
    finally:
        with server.connect() as conn, conn.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS `{name}`")
