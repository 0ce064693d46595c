"""Write fencing: application roles become read-only in one database, and their sessions are ended."""

from __future__ import annotations

from psycopg2 import sql

from pgactive_upgrade.db import execute, query

_APPLICATION_ROLES = """
SELECT rolname FROM pg_roles
WHERE rolcanlogin AND NOT rolsuper AND NOT rolreplication
  AND rolname NOT LIKE 'pg\\_%%' AND rolname NOT LIKE 'rds%%'
  AND rolname <> current_user AND rolname <> ALL(%s)
  AND NOT pg_has_role(rolname, 'rds_replication', 'MEMBER') IS TRUE
ORDER BY 1
"""


def application_roles(connection, configured: tuple[str, ...], exclude: tuple[str, ...]) -> list[str]:
    """The roles to fence: the configured ones, else every plain login role except the excluded ones."""
    if configured:
        return list(configured)
    has_rds_replication = query(connection, "SELECT to_regrole('rds_replication') IS NOT NULL")[0][0]
    statement = _APPLICATION_ROLES if has_rds_replication else _APPLICATION_ROLES.replace(
        "  AND NOT pg_has_role(rolname, 'rds_replication', 'MEMBER') IS TRUE\n", ""
    )
    return [row[0] for row in query(connection, statement, (list(exclude),))]


def fence(connection, dbname: str, roles: list[str]) -> int:
    """Make the roles read-only in dbname and end their sessions there; returns sessions ended."""
    for role in roles:
        execute(
            connection,
            sql.SQL("ALTER ROLE {} IN DATABASE {} SET default_transaction_read_only = on").format(
                sql.Identifier(role), sql.Identifier(dbname)
            ),
        )
    return end_sessions(connection, dbname, roles)


def unfence(connection, dbname: str, roles: list[str]) -> None:
    for role in roles:
        execute(
            connection,
            sql.SQL("ALTER ROLE {} IN DATABASE {} RESET default_transaction_read_only").format(
                sql.Identifier(role), sql.Identifier(dbname)
            ),
        )


def end_sessions(connection, dbname: str, roles: list[str]) -> int:
    rows = query(
        connection,
        "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE datname = %s AND usename = ANY(%s) AND pid <> pg_backend_pid()",
        (dbname, roles),
    )
    return rows[0][0]


def fenced_roles(connection, dbname: str) -> list[str]:
    rows = query(
        connection,
        "SELECT r.rolname FROM pg_db_role_setting s JOIN pg_roles r ON r.oid = s.setrole "
        "JOIN pg_database d ON d.oid = s.setdatabase "
        "WHERE d.datname = %s AND 'default_transaction_read_only=on' = ANY(s.setconfig) ORDER BY 1",
        (dbname,),
    )
    return [row[0] for row in rows]
