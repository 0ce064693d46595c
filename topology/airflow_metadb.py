"""A PostgreSQL metadata database for a local Airflow on one of the topology's servers.

Its own role and database (``airflow_meta`` by default). The role's password is generated once per state dir and
kept there (mode 0600) beside the topology's other credentials; the server only ever receives its SCRAM verifier,
so the password is in no statement a server log could show.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path

from psycopg2 import sql

from topology.airflow_local import PostgresMetadataDb
from topology.postgres import Server

DEFAULT_NAME = "airflow_meta"
SCRAM_ITERATIONS = 4096


def provision_metadata_db(server: Server, state_dir: Path, name: str = DEFAULT_NAME) -> PostgresMetadataDb:
    """The role (password as stored in the state dir) and its database exist on `server`; idempotent."""
    password = _stored_password(Path(state_dir) / f"{name}.credentials.json")
    connection = server.connect()
    try:
        with connection.cursor() as cursor:
            _ensure_role(cursor, name, password)
            _ensure_database(cursor, name)
    finally:
        connection.close()
    return PostgresMetadataDb(host=server.host, port=server.port, dbname=name, user=name, password=password)


def drop_metadata_db(server: Server, name: str = DEFAULT_NAME) -> None:
    """Remove the database and its role: the server is also an upgrade's target, whose login roles an upgrade
    discovers as application roles."""
    connection = server.connect()
    try:
        with connection.cursor() as cursor:
            cursor.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
            cursor.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))
    finally:
        connection.close()


def scram_verifier(password: str, salt: bytes | None = None) -> str:
    """What PostgreSQL stores for a SCRAM-SHA-256 password (RFC 5803 format)."""
    salt = salt or os.urandom(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, SCRAM_ITERATIONS)
    stored_key = hashlib.sha256(hmac.digest(salted, b"Client Key", "sha256")).digest()
    server_key = hmac.digest(salted, b"Server Key", "sha256")
    b64 = lambda raw: base64.b64encode(raw).decode()  # noqa: E731
    return f"SCRAM-SHA-256${SCRAM_ITERATIONS}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def _stored_password(path: Path) -> str:
    if path.exists():
        return json.loads(path.read_text())["password"]
    password = secrets.token_urlsafe(24)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        json.dump({"password": password}, file)
    return password


def _ensure_role(cursor, name: str, password: str) -> None:
    cursor.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,))
    verb = "ALTER" if cursor.fetchone() else "CREATE"
    cursor.execute(sql.SQL("{} ROLE {} LOGIN PASSWORD {}").format(
        sql.SQL(verb), sql.Identifier(name), sql.Literal(scram_verifier(password))))


def _ensure_database(cursor, name: str) -> None:
    cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
    if not cursor.fetchone():
        cursor.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(name), sql.Identifier(name)))
