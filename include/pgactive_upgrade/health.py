"""After a phase: the target answers, and each probe query succeeds, within the latency budget.

Probes are SQL from the conf, so they run where they can do no harm: as their own read-only role (probe_conn_id),
refused when that role holds a privilege that acts outside the transaction (signalling other sessions, running
programs, writing files, opening connections elsewhere), in a READ ONLY transaction that is rolled back, under a
statement_timeout. A failing probe is reported by SQLSTATE only: the server's message can quote row values.
"""

from __future__ import annotations

import math
import time

from dataclasses import dataclass, field
from typing import Any

import psycopg2
from psycopg2 import errorcodes

from pgactive_upgrade.db import Credentials, Endpoint, connect, query

# Roles whose members act outside the probe's own rolled-back transaction.
PRIVILEGED_ROLES = (
    "pg_signal_backend", "pg_signal_autovacuum_worker", "pg_execute_server_program", "pg_write_server_files",
    "pg_read_server_files", "pg_write_all_data", "pg_create_subscription", "pg_checkpoint", "rds_superuser",
    "rds_replication", "rds_password",
)
# Functions that reach outside the server's transaction (another connection commits on its own), in any schema.
ESCAPING_FUNCTIONS = ("dblink", "dblink_connect", "dblink_connect_u", "dblink_exec", "dblink_send_query")
ESCAPING_EXECUTABLE = """
SELECT DISTINCT p.proname FROM pg_proc p WHERE p.proname = ANY(%s) AND has_function_privilege(p.oid, 'EXECUTE')
ORDER BY 1
"""

ROLE_PRIVILEGES = """
SELECT r.rolsuper, r.rolcreaterole, r.rolcreatedb, r.rolreplication, r.rolbypassrls,
       ARRAY(SELECT g.rolname FROM pg_roles g WHERE g.rolname = ANY(%s) AND pg_has_role(r.oid, g.oid, 'MEMBER'))
FROM pg_roles r WHERE r.rolname = current_user
"""


@dataclass
class HealthReport:
    """What a phase's health check found, sorted by what happens next:
    problems: the phase fails and traffic returns to the last healthy split;
    lag_high: lag above the threshold is waited for, then an operator decides (lag_causes name what holds it back);
    conflicts: new replication conflicts, one line per row: an operator decides (accept, or roll back);
    conflict_marks: where each node's conflict history stood when they were listed, the baseline once they are judged
    (a conflict logged while the check ran is named by the next check, never taken as seen);
    apply_errors: errors the apply/sync workers recorded after the baseline while replication still flows, one line
    per worker: an operator decides (accept, or roll back); with replication not flowing they are problems instead
    (see Upgrade.health_check); apply_error_marks: the baseline once they are judged."""

    lag: Any
    threshold_bytes: int
    problems: list[str] = field(default_factory=list)
    lag_causes: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    conflict_marks: dict[str, int] = field(default_factory=dict)
    apply_errors: list[str] = field(default_factory=list)
    apply_error_marks: dict = field(default_factory=dict)

    @property
    def lag_high(self) -> bool:
        return self.lag.bytes is not None and self.lag.bytes > self.threshold_bytes

    @property
    def healthy(self) -> bool:
        return not (self.problems or self.lag_high or self.conflicts or self.apply_errors)

    def all_problems(self) -> list[str]:
        lag = [f"replication lag {self.lag.bytes} bytes above the threshold {self.threshold_bytes}"] if self.lag_high else []
        return self.problems + lag + self.lag_causes + self.conflicts + self.apply_errors

    def __iter__(self):
        """(every problem, lag): what health_check returned before the report sorted them."""
        return iter((self.all_problems(), self.lag))


def probe_problems(endpoint: Endpoint, credentials: Credentials, probes: tuple[str, ...], budget_ms: int) -> list[str]:
    """Connecting plus `SELECT 1`, then each probe in a READ ONLY transaction that is rolled back."""
    started = time.monotonic()
    try:
        connection = connect(endpoint, credentials, connect_timeout=max(2, math.ceil(budget_ms / 1000)),
                             statement_timeout_ms=budget_ms)
    except Exception as error:
        return [f"target does not accept connections: {_said(error)}"]
    try:
        connection.set_session(readonly=True, autocommit=False)
        named: list[tuple[str, str, float | None]] = [("connect+SELECT 1", "SELECT 1", started)]
        if probes:
            refused = privilege_problems(connection)
            connection.rollback()
            if refused:
                return [f"health_probes: not run, the probe role {credentials.user!r} {refused}"]
        named += [(f"health_probes[{index}]", probe, None) for index, probe in enumerate(probes)]
        problems = []
        for name, statement, since in named:
            try:
                took = _timed(connection, statement, since or time.monotonic())
            except Exception as error:
                problems.append(f"{name} failed: {_sqlstate(error)}")
                continue
            finally:
                connection.rollback()
            if took > budget_ms:
                problems.append(f"{name} took {took} ms, over the {budget_ms} ms budget")
        return problems
    finally:
        connection.close()


def privilege_problems(connection) -> str:
    """What lets the connected role act beyond a rolled-back read-only transaction ('' when nothing does)."""
    superuser, createrole, createdb, replication, bypassrls, members = query(
        connection, ROLE_PRIVILEGES, (list(PRIVILEGED_ROLES),))[0]
    found = [name for name, held in (("is a superuser", superuser), ("has CREATEROLE", createrole),
                                     ("has CREATEDB", createdb), ("has REPLICATION", replication),
                                     ("has BYPASSRLS", bypassrls)) if held]
    found += [f"is a member of {', '.join(members)}"] if members else []
    escaping = [name for (name,) in query(connection, ESCAPING_EXECUTABLE, (list(ESCAPING_FUNCTIONS),))]
    found += [f"may execute {', '.join(escaping)}"] if escaping else []
    if not found:
        return ""
    return ("is not read-only: it " + "; ".join(found) + ". Give probe_conn_id a role with only SELECT (README, "
            "Deployment security)")


def _timed(connection, statement: str, started: float) -> float:
    query(connection, statement)
    return round((time.monotonic() - started) * 1000, 1)


def _sqlstate(error: Exception) -> str:
    """The error's class, never its text: a probe's error message can quote the rows it read."""
    code = getattr(error, "pgcode", None)
    if code:
        return f"SQLSTATE {code} ({(errorcodes.lookup(code) or 'unknown').lower()})"
    if isinstance(error, psycopg2.OperationalError):
        return "the connection failed (OperationalError)"
    return type(error).__name__


def _said(error: Exception) -> str:
    return f"{type(error).__name__}: {str(error).strip()[:200]}"
