"""Database endpoints, credentials and connections (psycopg2)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

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


def connect(endpoint: Endpoint, credentials: Credentials, *, autocommit: bool = True, connect_timeout: int = 10):
    connection = psycopg2.connect(
        host=endpoint.host,
        port=endpoint.port,
        dbname=endpoint.dbname,
        user=credentials.user,
        password=credentials.password,
        connect_timeout=connect_timeout,
        application_name=APPLICATION_NAME,
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
