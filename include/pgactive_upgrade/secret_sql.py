"""Statements that carry a password (a subscription's connection string, a pgactive user mapping) run only where the
server will not write their text anywhere: each setting that would log it is quieted for this session, the effective
values are read back, and the statement is refused, naming the fix, when one stays loud (a role that may not set
it). Its errors are reported without the statement or the secret."""

from __future__ import annotations

import psycopg2
from psycopg2 import sql

from pgactive_upgrade.db import execute, query

# setting -> the value under which a DDL statement's text is never written (missing settings: not loaded).
QUIET = {
    "log_statement": "none",
    "log_min_error_statement": "panic",
    "log_min_messages": "panic",  # an error's own message can quote a value of the statement
    "log_min_duration_statement": "-1",
    "log_min_duration_sample": "-1",
    "log_transaction_sample_rate": "0",
    "debug_print_parse": "off",
    "debug_print_rewritten": "off",
    "debug_print_plan": "off",
    "pgaudit.log": "none",
    "pg_stat_statements.track_utility": "off",
}


class SecretStatementRefused(RuntimeError):
    """The server would keep the statement's text (and its password) in a log; nothing was sent."""


class SecretStatementFailed(RuntimeError):
    """The statement failed; its message is cleaned of the statement and the secret."""

    def __init__(self, message: str, pgcode: str | None):
        super().__init__(message)
        self.pgcode = pgcode


def execute_unlogged(connection, statement: sql.Composable, secret: str, what: str) -> None:
    """Run `statement` (which contains `secret`) with every logging setting quiet for this session, then put the
    settings back. what: names the statement in errors (never its text)."""
    changed = quiet_session(connection, what)
    try:
        execute(connection, statement)
    except psycopg2.Error as error:
        raise SecretStatementFailed(f"{what} failed: {_cleaned(error, secret)}", error.pgcode) from None
    finally:
        _restore(connection, changed)


def quiet_session(connection, what: str) -> dict[str, str]:
    """Quiets each loud setting for the session; returns the previous values. Refuses when one stays loud."""
    changed, loud = {}, []
    for setting, value in _current(connection).items():
        if _is_quiet(setting, value):
            continue
        try:
            _set(connection, setting, QUIET[setting])
            changed[setting] = value
        except psycopg2.Error:
            if not connection.autocommit:
                connection.rollback()
        now = _current(connection, (setting,)).get(setting)
        if not _is_quiet(setting, now):
            loud.append(f"{setting} = {now!r}")
    if loud:
        _restore(connection, changed)
        user = query(connection, "SELECT current_user")[0][0]
        raise SecretStatementRefused(
            f"{what} refused: it carries a password and the server would log it ({', '.join(loud)}), and the role "
            f"{user!r} may not change that for its session. Fix, on the server: set these in its parameter group or "
            "configuration (log_statement = none, log_min_error_statement = panic, log_min_messages = fatal, "
            "log_min_duration_statement = -1, pgaudit.log without ddl), or let the role set them "
            f"(PostgreSQL 15+: GRANT SET ON PARAMETER ... TO {user}); see README, Deployment security")
    return changed


def _current(connection, settings=tuple(QUIET)) -> dict[str, str]:
    rows = query(connection, "SELECT name, current_setting(name, true) FROM unnest(%s::text[]) AS name", (list(settings),))
    return {name: value for name, value in rows if value is not None}


def _is_quiet(setting: str, value: str | None) -> bool:
    if value is None:
        return True
    value = value.strip().lower()
    if setting == "pgaudit.log":
        classes = [c.strip() for c in value.split(",") if c.strip()]
        included = {c for c in classes if not c.startswith("-")}
        excluded = {c[1:] for c in classes if c.startswith("-")}
        return not (included & {"all", "ddl"}) or "ddl" in excluded
    if setting == "log_min_messages":
        return value in ("fatal", "panic")
    if setting in ("log_min_duration_statement", "log_min_duration_sample"):
        return value == "-1"
    if setting == "log_transaction_sample_rate":
        return float(value) == 0
    return value == QUIET[setting]


def _set(connection, setting: str, value: str) -> None:
    query(connection, "SELECT set_config(%s, %s, false)", (setting, value))


def _restore(connection, changed: dict[str, str]) -> None:
    for setting, value in changed.items():
        try:
            _set(connection, setting, value)
        except psycopg2.Error:
            if not connection.autocommit:
                connection.rollback()


def _cleaned(error: psycopg2.Error, secret: str) -> str:
    """SQLSTATE and the server's primary message, the secret masked (a connection string error can quote it)."""
    primary = getattr(error.diag, "message_primary", None) or type(error).__name__
    if secret:
        primary = primary.replace(secret, "********")
    return f"SQLSTATE {error.pgcode}: {primary}"
