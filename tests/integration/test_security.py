"""Probes cannot harm, and a statement carrying a password never reaches the server's log (real PostgreSQL)."""

from __future__ import annotations

import uuid
from pathlib import Path

import psycopg2
import pytest
from psycopg2 import sql

from pgactive_upgrade import health
from pgactive_upgrade.db import Credentials, Endpoint, connected
from pgactive_upgrade.secret_sql import SecretStatementFailed, SecretStatementRefused, execute_unlogged
from topology.postgres import HOST

DATABASE = "app"


def endpoint(server) -> Endpoint:
    return Endpoint(HOST, server.port, DATABASE)


def prober(topo) -> Credentials:
    return Credentials("prober", topo.credentials["prober"])


def admin(topo) -> Credentials:
    return Credentials("postgres", topo.credentials["postgres"])


def app_session(topo, server):
    connection = psycopg2.connect(host=HOST, port=server.port, dbname=DATABASE, user="app",
                                  password=topo.credentials["app"])
    connection.autocommit = True
    return connection


def alive(connection) -> bool:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        return True
    except psycopg2.Error:
        return False


def scalar(topo, server, statement, params=None):
    with connected(endpoint(server), admin(topo)) as connection, connection.cursor() as cursor:
        cursor.execute(statement, params)
        return cursor.fetchone()[0]


# --- probes --------------------------------------------------------------------------------------------------

def test_ending_every_session_from_a_probe_ends_none(fresh_databases):
    topo = fresh_databases
    application = app_session(topo, topo.old_pg)
    try:
        problems = health.probe_problems(endpoint(topo.old_pg), prober(topo),
                                         ("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid <> pg_backend_pid()",
                                          "SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE pid <> pg_backend_pid()"),
                                         budget_ms=2000)
        assert alive(application), "the application's session survived"
        assert problems == ["health_probes[0] failed: SQLSTATE 42501 (insufficient_privilege)",
                            "health_probes[1] failed: SQLSTATE 42501 (insufficient_privilege)"], problems
    finally:
        application.close()


def test_copy_to_program_and_server_files_are_refused(fresh_databases, tmp_path):
    topo = fresh_databases
    witness = Path("/tmp") / f"pgu-probe-{uuid.uuid4().hex}"
    probes = (f"COPY (SELECT 1) TO PROGRAM 'touch {witness}'", f"COPY public.accounts TO '{witness}'",
              "SELECT pg_read_file('postgresql.conf')")
    problems = health.probe_problems(endpoint(topo.old_pg), prober(topo), probes, budget_ms=2000)
    assert problems == [f"health_probes[{i}] failed: SQLSTATE 42501 (insufficient_privilege)" for i in range(3)]
    assert not witness.exists()


def test_writes_from_a_probe_are_refused_and_nothing_changes(fresh_databases):
    topo = fresh_databases
    with connected(endpoint(topo.old_pg), admin(topo)) as connection, connection.cursor() as cursor:
        cursor.execute("CREATE OR REPLACE FUNCTION public.probe_writes() RETURNS int LANGUAGE sql "
                       "AS $$ INSERT INTO scratch.import_log (source) VALUES ('probe') RETURNING 1 $$")
        cursor.execute("GRANT EXECUTE ON FUNCTION public.probe_writes() TO prober")
    sequence_before = scalar(topo, topo.old_pg, "SELECT last_value FROM public.orders_id_seq")
    rows_before = scalar(topo, topo.old_pg, "SELECT count(*) FROM scratch.import_log")
    refused = ("SELECT public.probe_writes()", "SELECT nextval('public.orders_id_seq')",
               "SELECT setval('public.orders_id_seq', 1)", "SELECT set_config('transaction_read_only', 'off', false)",
               "UPDATE public.orders SET note = 'probe'")
    rolled_back = ("SELECT lo_create(0)",)  # allowed in a read-only transaction, and gone with its rollback
    problems = health.probe_problems(endpoint(topo.old_pg), prober(topo), refused + rolled_back, budget_ms=2000)
    assert [p.split(" failed: ")[0] for p in problems] == [f"health_probes[{i}]" for i in range(len(refused))], problems
    assert all(" failed: SQLSTATE " in p for p in problems), problems
    assert scalar(topo, topo.old_pg, "SELECT last_value FROM public.orders_id_seq") == sequence_before
    assert scalar(topo, topo.old_pg, "SELECT count(*) FROM scratch.import_log") == rows_before
    assert scalar(topo, topo.old_pg, "SELECT count(*) FROM public.orders WHERE note = 'probe'") == 0
    assert scalar(topo, topo.old_pg, "SELECT count(*) FROM pg_largeobject_metadata") == 0


def test_a_probe_cannot_lift_its_own_timeout_or_read_only_mode_for_the_next(fresh_databases):
    topo = fresh_databases
    probes = ("SELECT set_config('statement_timeout', '0', false)", "SELECT pg_sleep(3)",
              "SELECT set_config('default_transaction_read_only', 'off', false)", "SELECT nextval('public.orders_id_seq')")
    before = scalar(topo, topo.old_pg, "SELECT last_value FROM public.orders_id_seq")
    problems = health.probe_problems(endpoint(topo.old_pg), prober(topo), probes, budget_ms=300)
    assert "health_probes[1] failed: SQLSTATE 57014 (query_canceled)" in problems, problems
    assert problems[1].startswith("health_probes[3] failed: SQLSTATE "), problems
    assert scalar(topo, topo.old_pg, "SELECT last_value FROM public.orders_id_seq") == before


def test_a_probe_error_is_reported_without_the_row_values_it_quotes(fresh_databases):
    topo = fresh_databases
    email = scalar(topo, topo.old_pg, "SELECT email FROM public.accounts ORDER BY id LIMIT 1")
    problems = health.probe_problems(endpoint(topo.old_pg), prober(topo),
                                     ("SELECT email::int FROM public.accounts ORDER BY id LIMIT 1",), budget_ms=2000)
    assert problems == ["health_probes[0] failed: SQLSTATE 22P02 (invalid_text_representation)"]
    assert email not in " ".join(problems)


def test_a_privileged_probe_role_runs_no_probe(fresh_databases):
    topo = fresh_databases
    application = app_session(topo, topo.old_pg)
    try:
        problems = health.probe_problems(endpoint(topo.old_pg), admin(topo),
                                         ("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'app'",),
                                         budget_ms=2000)
        assert alive(application)
        assert len(problems) == 1 and "health_probes: not run, the probe role 'postgres' is not read-only: it is a " \
                                      "superuser" in problems[0], problems
    finally:
        application.close()
    with connected(endpoint(topo.old_pg), admin(topo)) as connection, connection.cursor() as cursor:
        cursor.execute("GRANT pg_signal_backend TO prober")
    try:
        problems = health.probe_problems(endpoint(topo.old_pg), prober(topo), ("SELECT 1",), budget_ms=2000)
        assert problems and "is a member of pg_signal_backend" in problems[0], problems
    finally:
        with connected(endpoint(topo.old_pg), admin(topo)) as connection, connection.cursor() as cursor:
            cursor.execute("REVOKE pg_signal_backend FROM prober")


def test_dblink_reachable_by_the_probe_role_runs_no_probe(fresh_databases):
    topo = fresh_databases
    with connected(endpoint(topo.old_pg), admin(topo)) as connection, connection.cursor() as cursor:
        cursor.execute("CREATE SCHEMA IF NOT EXISTS ext")
        cursor.execute("CREATE EXTENSION IF NOT EXISTS dblink SCHEMA ext")
    try:
        problems = health.probe_problems(endpoint(topo.old_pg), prober(topo),
                                         ("SELECT ext.dblink_exec('dbname=app', 'DELETE FROM public.orders')",),
                                         budget_ms=2000)
        assert len(problems) == 1 and "may execute dblink" in problems[0], problems
    finally:
        with connected(endpoint(topo.old_pg), admin(topo)) as connection, connection.cursor() as cursor:
            cursor.execute("DROP EXTENSION dblink")
            cursor.execute("DROP SCHEMA ext")


def test_plain_read_probes_pass(fresh_databases):
    topo = fresh_databases
    problems = health.probe_problems(endpoint(topo.old_pg), prober(topo),
                                     ("SELECT count(*) FROM billing.invoices WHERE id < 100",), budget_ms=2000)
    assert problems == []


# --- statements carrying a password ----------------------------------------------------------------------------

def server_log(server) -> str:
    return Path(server.log_file).read_text(errors="replace")


@pytest.fixture
def logging_everything(fresh_databases):
    """log_statement = all (and every statement's duration) for every session on the old server."""
    topo = fresh_databases
    with connected(endpoint(topo.old_pg), admin(topo)) as connection, connection.cursor() as cursor:
        cursor.execute("ALTER SYSTEM SET log_statement = 'all'")
        cursor.execute("ALTER SYSTEM SET log_min_duration_statement = 0")
        cursor.execute("SELECT pg_reload_conf()")
    yield topo
    with connected(endpoint(topo.old_pg), admin(topo)) as connection, connection.cursor() as cursor:
        cursor.execute("ALTER SYSTEM RESET log_statement")
        cursor.execute("ALTER SYSTEM RESET log_min_duration_statement")
        cursor.execute("SELECT pg_reload_conf()")


def secret_statement(secret: str) -> sql.Composed:
    return sql.SQL("COMMENT ON ROLE app IS {}").format(sql.Literal(secret))


def test_a_statement_with_a_secret_is_kept_out_of_a_server_logging_everything(logging_everything):
    topo = logging_everything
    secret, control = f"secret-{uuid.uuid4().hex}", f"control-{uuid.uuid4().hex}"
    with connected(endpoint(topo.old_pg), admin(topo)) as connection:
        execute_unlogged(connection, secret_statement(secret), secret, "COMMENT ON ROLE app")
        with connection.cursor() as cursor:
            cursor.execute(secret_statement(control))  # the same session logs again afterwards
            cursor.execute("SHOW log_statement")
            assert cursor.fetchone()[0] == "all", "the session's settings are put back"
    log = server_log(topo.old_pg)
    assert control in log, "the server does log statements"
    assert secret not in log


def test_a_failing_statement_with_a_secret_reports_neither_statement_nor_secret(logging_everything):
    topo = logging_everything
    secret = f"secret-{uuid.uuid4().hex}"
    statement = sql.SQL("SELECT {}::int").format(sql.Literal(secret))  # the error quotes the value
    with connected(endpoint(topo.old_pg), admin(topo)) as connection:
        with pytest.raises(SecretStatementFailed) as error:
            execute_unlogged(connection, statement, secret, "the test statement")
    assert str(error.value) == ('the test statement failed: SQLSTATE 22P02: invalid input syntax for type integer: '
                                '"********"')
    assert error.value.__suppress_context__, "the original error (with the statement) is not chained"
    assert secret not in server_log(topo.old_pg)


def test_a_role_that_may_not_quiet_the_log_is_refused_before_sending_the_secret(fresh_databases):
    topo = fresh_databases
    password = uuid.uuid4().hex
    with connected(endpoint(topo.old_pg), admin(topo)) as connection, connection.cursor() as cursor:
        cursor.execute("DROP ROLE IF EXISTS noisy_admin")
        cursor.execute("CREATE ROLE noisy_admin LOGIN PASSWORD %s", (password,))
        cursor.execute("GRANT CONNECT ON DATABASE app TO noisy_admin")
        cursor.execute("ALTER ROLE noisy_admin SET log_statement = 'all'")  # as a managed service's default might
    noisy = Credentials("noisy_admin", password)
    secret = f"secret-{uuid.uuid4().hex}"
    statement = sql.SQL("SELECT {}").format(sql.Literal(secret))
    try:
        with connected(endpoint(topo.old_pg), noisy) as connection:
            with pytest.raises(SecretStatementRefused) as error:
                execute_unlogged(connection, statement, secret, "CREATE SUBSCRIPTION pgu_x")
        message = str(error.value)
        assert "log_statement = 'all'" in message and "log_min_error_statement = 'error'" in message, message
        assert "GRANT SET ON PARAMETER" in message and "Deployment security" in message
        assert secret not in server_log(topo.old_pg), "nothing was sent"
        with connected(endpoint(topo.old_pg), admin(topo)) as connection, connection.cursor() as cursor:
            cursor.execute("GRANT SET ON PARAMETER log_statement, log_min_error_statement, log_min_messages, "
                           "log_min_duration_statement TO noisy_admin")  # the fix the message names (15+)
        with connected(endpoint(topo.old_pg), noisy) as connection:
            execute_unlogged(connection, statement, secret, "CREATE SUBSCRIPTION pgu_x")
        assert secret not in server_log(topo.old_pg)
    finally:
        with connected(endpoint(topo.old_pg), admin(topo)) as connection, connection.cursor() as cursor:
            cursor.execute("REVOKE SET ON PARAMETER log_statement, log_min_error_statement, log_min_messages, "
                           "log_min_duration_statement FROM noisy_admin")
            cursor.execute("REVOKE CONNECT ON DATABASE app FROM noisy_admin")
            cursor.execute("DROP ROLE noisy_admin")
