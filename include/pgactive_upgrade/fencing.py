"""Write fencing.

Two strengths:
- `fence`: the node stops taking application writes, and no session of the fenced roles can bypass it. The roles
  lose LOGIN (what each had is recorded on the node first, so `unfence` restores exactly that), their sessions are
  ended and watched until their backends exited, and the result is proven: no session of theirs left, none of them can log in, and no
  other session holds a write transaction. Used where every route leaves the node (the source at cutover, the
  target when a rollback returns traffic after cutover).
- `set_read_only`: the roles' sessions default to read-only in one database. Used on the target before cutover,
  where the read routes already connect and only replicated writes may land; sessions keep their LOGIN.
"""

from __future__ import annotations

import time

from psycopg2 import sql
from psycopg2.extensions import TRANSACTION_STATUS_IDLE

from pgactive_upgrade.catalog import META_SCHEMA
from pgactive_upgrade.db import APPLICATION_NAME, execute, qualified, query

FENCE_TABLE = "fenced_role"

_APPLICATION_ROLES = """
SELECT rolname FROM pg_roles
WHERE rolcanlogin AND NOT rolsuper AND NOT rolreplication
  AND rolname NOT LIKE 'pg\\_%%' AND rolname NOT LIKE 'rds%%'
  AND rolname <> current_user AND rolname <> ALL(%s)
  AND NOT pg_has_role(rolname, 'rds_replication', 'MEMBER') IS TRUE
ORDER BY 1
"""

# Roles the connected user may not ALTER: superusers, and (PostgreSQL 16+) roles it holds no ADMIN OPTION on.
_NOT_ALTERABLE = """
SELECT r.rolname, CASE WHEN r.rolsuper THEN 'is a superuser' ELSE 'cannot be altered by ' || current_user END
FROM pg_roles r, pg_roles me
WHERE me.rolname = current_user AND r.rolname = ANY(%s)
  AND (r.rolsuper OR NOT (me.rolsuper OR (me.rolcreaterole AND (
       current_setting('server_version_num')::int < 160000 OR pg_has_role(me.oid, r.oid, 'MEMBER WITH ADMIN OPTION')))))
ORDER BY 1
"""


class FenceError(RuntimeError):
    pass


def application_roles(connection, configured: tuple[str, ...], exclude: tuple[str, ...]) -> list[str]:
    """The roles to fence: the configured ones, else every plain login role except the excluded ones."""
    if configured:
        return list(configured)
    has_rds_replication = query(connection, "SELECT to_regrole('rds_replication') IS NOT NULL")[0][0]
    statement = _APPLICATION_ROLES if has_rds_replication else _APPLICATION_ROLES.replace(
        "  AND NOT pg_has_role(rolname, 'rds_replication', 'MEMBER') IS TRUE\n", ""
    )
    return [row[0] for row in query(connection, statement, (list(exclude),))]


def ensure_record_table(connection) -> None:
    execute(connection, sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(META_SCHEMA)))
    execute(connection, sql.SQL(
        "CREATE TABLE IF NOT EXISTS {} (role name PRIMARY KEY, could_login boolean NOT NULL, "
        "fenced_at timestamptz NOT NULL DEFAULT now())"
    ).format(qualified(META_SCHEMA, FENCE_TABLE)))


def fenceability_problems(connection, roles: list[str]) -> list[str]:
    """Why these roles cannot be fenced here; empty when they can."""
    if not roles:
        return ["no application role to fence: a cutover without a fence could lose writes (set application_roles, "
                "or create the application's login roles)"]
    known = {row[0] for row in query(connection, "SELECT rolname FROM pg_roles WHERE rolname = ANY(%s)", (roles,))}
    problems = [f"role {role!r} does not exist" for role in roles if role not in known]
    problems += [f"role {role!r} {why}" for role, why in query(connection, _NOT_ALTERABLE, (roles,))]
    return problems


def fence(connection, dbname: str, roles: list[str], wait_seconds: float = 5.0) -> int:
    """Fence the roles on this node (see the module); returns the sessions ended. Raises FenceError, leaving the
    fence in place (the caller undoes it with `unfence`), when it cannot prove the node takes no more writes."""
    if connection.get_transaction_status() != TRANSACTION_STATUS_IDLE:
        raise FenceError("the fence needs an autocommit connection outside a transaction: others must see it at once")
    problems = fenceability_problems(connection, roles)
    if problems:
        raise FenceError("cannot fence: " + "; ".join(problems))
    # One transaction: the record of what each role had, then NOLOGIN. A record kept from an earlier fence wins.
    statements = [sql.SQL(
        "INSERT INTO {} (role, could_login) SELECT rolname, rolcanlogin FROM pg_roles WHERE rolname = ANY({}) "
        "ON CONFLICT (role) DO NOTHING"
    ).format(qualified(META_SCHEMA, FENCE_TABLE), sql.Literal(roles))]
    statements += [sql.SQL("ALTER ROLE {} NOLOGIN").format(sql.Identifier(role)) for role in roles]
    execute(connection, sql.SQL("; ").join(statements))
    ended = end_sessions(connection, dbname, roles, wait_seconds)
    _prove_fenced(connection, dbname, roles, wait_seconds)
    return ended


def end_sessions(connection, dbname: str, roles: list[str], wait_seconds: float = 5.0,
                 poll_seconds: float = 0.001) -> int:
    """End the roles' sessions in dbname and wait until every one of those backends has exited (its transaction
    rolled back); returns how many were ended. Each round signals every session still there, a late login too, in
    one round trip (pg_terminate_backend's own wait sleeps 100 ms per backend, which a fence with hundreds of
    sessions cannot afford); it ends when none is left, or at the deadline."""
    ended: set[int] = set()
    deadline = time.monotonic() + wait_seconds
    while True:
        left = [row[0] for row in query(
            connection,
            # In the select list, not the WHERE clause: only rows that passed every filter are signalled.
            "SELECT pg_stat_clear_snapshot(); SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND usename = ANY(%s) AND pid <> pg_backend_pid()",
            (dbname, roles),
        )]
        ended.update(left)
        if not left or time.monotonic() > deadline:
            return len(ended)
        time.sleep(poll_seconds)


def _prove_fenced(connection, dbname: str, roles: list[str], wait_seconds: float) -> None:
    left = sessions_of(connection, dbname, roles)
    if left:
        raise FenceError(f"sessions of fenced roles still open after {wait_seconds} s: {left[:10]}")
    can_login = [row[0] for row in query(
        connection, "SELECT rolname FROM pg_roles WHERE rolname = ANY(%s) AND rolcanlogin", (roles,))]
    if can_login:
        raise FenceError(f"roles can still log in after the fence: {can_login}")
    writers = unfenced_writers(connection, dbname, roles)
    if writers:
        raise FenceError(
            f"sessions the fence cannot stop are writing to {dbname}: {writers[:10]}; name their roles in "
            "application_roles, or end them before the cutover"
        )


def sessions_of(connection, dbname: str, roles: list[str]) -> list[str]:
    query(connection, "SELECT pg_stat_clear_snapshot()")  # inside a transaction the activity view would be cached
    rows = query(
        connection,
        "SELECT usename || ' pid ' || pid || ' (' || coalesce(application_name, '') || ', ' || coalesce(state, '') "
        "|| coalesce(', waiting on ' || wait_event, '') || ')' FROM pg_stat_activity WHERE datname = %s AND usename = ANY(%s) "
        "AND pid <> pg_backend_pid()",
        (dbname, roles),
    )
    return [row[0] for row in rows]


def unfenced_writers(connection, dbname: str, roles: list[str]) -> list[str]:
    """Other sessions (not the fenced roles', not this package's) inside a transaction that has written."""
    rows = query(
        connection,
        "SELECT usename || ' pid ' || pid || coalesce(' (' || nullif(application_name, '') || ')', '') "
        "FROM pg_stat_activity WHERE datname = %s AND backend_type = 'client backend' AND pid <> pg_backend_pid() "
        "AND usename <> ALL(%s) AND application_name <> %s AND backend_xid IS NOT NULL",
        (dbname, roles, APPLICATION_NAME),
    )
    return [row[0] for row in rows]


def unfence(connection) -> list[str]:
    """Give back exactly what `fence` took (LOGIN to the roles that had it); returns those roles. Idempotent."""
    if not query(connection, "SELECT to_regclass(%s)", (f"{META_SCHEMA}.{FENCE_TABLE}",))[0][0]:
        return []
    recorded = query(connection, sql.SQL("SELECT role, could_login FROM {} ORDER BY 1").format(
        qualified(META_SCHEMA, FENCE_TABLE)))
    if not recorded:
        return []
    statements = [sql.SQL("ALTER ROLE {} LOGIN").format(sql.Identifier(role)) for role, could in recorded if could]
    statements.append(sql.SQL("DELETE FROM {}").format(qualified(META_SCHEMA, FENCE_TABLE)))
    execute(connection, sql.SQL("; ").join(statements))
    return [role for role, _ in recorded]


def fenced_roles(connection) -> list[str]:
    """The roles this node's fence holds (empty: not fenced)."""
    if not query(connection, "SELECT to_regclass(%s)", (f"{META_SCHEMA}.{FENCE_TABLE}",))[0][0]:
        return []
    return [row[0] for row in query(connection, sql.SQL("SELECT role FROM {} ORDER BY 1").format(
        qualified(META_SCHEMA, FENCE_TABLE)))]


def set_read_only(connection, dbname: str, roles: list[str]) -> int:
    """The roles' new sessions in dbname default to read-only; their open sessions are ended."""
    for role in roles:
        execute(connection, sql.SQL("ALTER ROLE {} IN DATABASE {} SET default_transaction_read_only = on").format(
            sql.Identifier(role), sql.Identifier(dbname)))
    return end_sessions(connection, dbname, roles)


def reset_read_only(connection, dbname: str, roles: list[str]) -> None:
    if roles:
        execute(connection, sql.SQL("; ").join(
            sql.SQL("ALTER ROLE {} IN DATABASE {} RESET default_transaction_read_only").format(
                sql.Identifier(role), sql.Identifier(dbname))
            for role in roles
        ))


def read_only_roles(connection, dbname: str) -> list[str]:
    rows = query(
        connection,
        "SELECT r.rolname FROM pg_db_role_setting s JOIN pg_roles r ON r.oid = s.setrole "
        "JOIN pg_database d ON d.oid = s.setdatabase "
        "WHERE d.datname = %s AND 'default_transaction_read_only=on' = ANY(s.setconfig) ORDER BY 1",
        (dbname,),
    )
    return [row[0] for row in rows]
