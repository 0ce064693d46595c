"""Database endpoints, credentials and connections (psycopg2)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from collections.abc import Iterator

import psycopg2
from psycopg2 import sql

APPLICATION_NAME = "pgactive_upgrade"


@dataclass(frozen=True)
class Credentials:
    user: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    dbname: str

    def __str__(self) -> str:
        return f"{self.host}:{self.port}/{self.dbname}"


def override_endpoint(identifier: str, host: str, port: int, overrides: dict[str, str]) -> tuple[str, int]:
    """The address to use for an instance: its override when one is set, else the RDS endpoint."""
    if identifier in overrides:
        host, port_text = overrides[identifier].rsplit(":", 1)
        return host, int(port_text)
    return host, port


def conninfo(endpoint: Endpoint, credentials: Credentials) -> str:
    """A libpq key/value string for CREATE SUBSCRIPTION and pgactive DSNs (contains the password: never log it)."""
    parts = {
        "host": endpoint.host,
        "port": str(endpoint.port),
        "dbname": endpoint.dbname,
        "user": credentials.user,
        "password": credentials.password,
    }
    return " ".join(f"{key}='{_escape(value)}'" for key, value in parts.items())


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


# A dead peer is noticed within seconds on both ends: the server ends a session whose client vanished (which
# releases the locks it held, such as a cutover's), and the client stops waiting on a server that went away.
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2, "keepalives_count": 3}
SERVER_KEEPALIVES = "-c tcp_keepalives_idle=5 -c tcp_keepalives_interval=2 -c tcp_keepalives_count=3"


def connect(endpoint: Endpoint, credentials: Credentials, *, autocommit: bool = True, connect_timeout: int = 10,
            statement_timeout_ms: int | None = None):
    """statement_timeout_ms: every statement of the session ends by then (connections used inside a fence)."""
    options = SERVER_KEEPALIVES
    if statement_timeout_ms:
        options += f" -c statement_timeout={int(statement_timeout_ms)}"
    connection = psycopg2.connect(
        host=endpoint.host,
        port=endpoint.port,
        dbname=endpoint.dbname,
        user=credentials.user,
        password=credentials.password,
        connect_timeout=connect_timeout,
        application_name=APPLICATION_NAME,
        options=options,
        **KEEPALIVES,
    )
    connection.autocommit = autocommit
    return connection


@contextlib.contextmanager
def connected(endpoint: Endpoint, credentials: Credentials, **kwargs) -> Iterator:
    connection = connect(endpoint, credentials, **kwargs)
    try:
        yield connection
    finally:
        connection.close()


def query(connection, statement, params=None) -> list[tuple]:
    with connection.cursor() as cursor:
        cursor.execute(statement, params)
        return cursor.fetchall() if cursor.description else []


def execute(connection, statement, params=None) -> None:
    with connection.cursor() as cursor:
        cursor.execute(statement, params)


def qualified(schema: str, name: str) -> sql.Composed:
    return sql.SQL(".").join([sql.Identifier(schema), sql.Identifier(name)])


def server_major(connection) -> int:
    return int(query(connection, "SHOW server_version_num")[0][0]) // 10000
