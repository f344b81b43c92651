"""The MariaDB server of the tests: the original platform's table in a throw-away database."""

from __future__ import annotations

import os
import selectors
import socket
import threading
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import pymysql
import pytest

from syncpro.inventory.settings import InventorySettings

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


class TcpProxy:
    """Forwards connections on a local port to the database server. stop() is an outage as
    the daemon sees one: the port refuses connections and open ones are cut; start() again
    brings the same port back."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = int(probe.getsockname()[1])
        self._thread: threading.Thread | None = None
        self._wake: tuple[socket.socket, socket.socket] | None = None

    def start(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self._wake = socket.socketpair()
        self._thread = threading.Thread(
            target=self._serve, args=(listener, self._wake[0]), name="test-tcp-proxy"
        )
        self._thread.start()

    def stop(self) -> None:
        if self._thread is None or self._wake is None:
            return
        self._wake[1].send(b"x")
        self._thread.join(10)
        for sock in self._wake:
            sock.close()
        self._thread = self._wake = None

    def __enter__(self) -> TcpProxy:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _serve(self, listener: socket.socket, wake: socket.socket) -> None:
        partners: dict[socket.socket, socket.socket] = {}
        with selectors.DefaultSelector() as selector, listener:
            selector.register(listener, selectors.EVENT_READ)
            selector.register(wake, selectors.EVENT_READ)
            try:
                while True:
                    for key, _ in selector.select():
                        sock = key.fileobj
                        assert isinstance(sock, socket.socket)
                        if sock is wake:
                            return
                        if sock is listener:
                            self._accept(listener, selector, partners)
                        elif sock in partners:
                            self._pump(sock, selector, partners)
            finally:
                for sock in partners:
                    sock.close()

    def _accept(
        self,
        listener: socket.socket,
        selector: selectors.BaseSelector,
        partners: dict[socket.socket, socket.socket],
    ) -> None:
        client, _ = listener.accept()
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            client.close()
            return
        for one, other in ((client, upstream), (upstream, client)):
            one.settimeout(5)
            partners[one] = other
            selector.register(one, selectors.EVENT_READ)

    @staticmethod
    def _pump(
        sock: socket.socket,
        selector: selectors.BaseSelector,
        partners: dict[socket.socket, socket.socket],
    ) -> None:
        other = partners[sock]
        data = b""
        with suppress(OSError):
            data = sock.recv(65536)
        if data:
            with suppress(OSError):
                other.sendall(data)
                return
        for one in (sock, other):
            selector.unregister(one)
            del partners[one]
            one.close()
