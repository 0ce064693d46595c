"""The new instance performs like the old one from its first query: statistics and extensions before any traffic
reaches it, and each phase's health check compares latency with the source (local topology, real servers)."""

from __future__ import annotations

import dataclasses
import re
import threading
import time
from contextlib import closing, contextmanager

import pytest

from pgactive_upgrade import statistics
from pgactive_upgrade.db import Credentials, Endpoint
from tests.integration.integration_parts import replicating
from topology.postgres import HOST

pytestmark = pytest.mark.integration

REPLICATED = ["public.accounts", "public.orders", "billing.invoices", "billing.invoice_lines"]
PROBE = "SELECT count(*), max(payload) FROM public.latency_events WHERE k = 42"


def sql(server, statement: str, params=None, dbname: str = "app") -> list[tuple]:
    with closing(server.connect(dbname=dbname)) as connection:
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(statement, params)
            return cursor.fetchall() if cursor.description else []


def with_statistics(server, tables: list[str]) -> set[str]:
    rows = sql(server, "SELECT DISTINCT schemaname || '.' || tablename FROM pg_stats "
                       "WHERE schemaname || '.' || tablename = ANY(%s)", (tables,))
    return {row[0] for row in rows}


def test_prepare_target_gives_every_replicated_table_statistics_and_updates_extensions(build):
    topo, make = build
    upgrade = replicating(make(shift_percentages=[]), in_sync=True)
    # Behind replication's back: no statistics on the target (autovacuum kept off so it cannot add them), and an
    # extension installed there at an older version than the target's default.
    for table in REPLICATED:
        sql(topo.new_pg, f"ALTER TABLE {table} SET (autovacuum_enabled = false)")
    sql(topo.new_pg, "DELETE FROM pg_statistic WHERE starelid = ANY(%s::regclass[])", (REPLICATED,))
    sql(topo.new_pg, "CREATE EXTENSION cube VERSION '1.4'")
    default = sql(topo.new_pg, "SELECT default_version FROM pg_available_extensions WHERE name = 'cube'")[0][0]
    assert default != "1.4"
    assert with_statistics(topo.new_pg, REPLICATED) == set()
    seen = []

    result = upgrade.prepare_target(progress=seen.append)

    assert with_statistics(topo.new_pg, REPLICATED) == set(REPLICATED)
    assert sql(topo.new_pg, "SELECT extversion FROM pg_extension WHERE extname = 'cube'") == [(default,)]
    assert result["extensions_updated"] == [{"name": "cube", "from": "1.4", "to": default}]
    assert result["statistics"]["analyzed"] == len(upgrade.tables()) >= len(REPLICATED)
    assert seen and seen[-1]["done"] == seen[-1]["total"] == result["statistics"]["analyzed"]
    again = upgrade.prepare_target()  # idempotent: nothing left to update
    assert again["extensions_updated"] == []


def analyzed_tables(server, tables: list[str]) -> set[str]:
    rows = sql(server, "SELECT schemaname || '.' || relname FROM pg_stat_all_tables WHERE analyze_count > 0 "
                       "AND schemaname || '.' || relname = ANY(%s)", (tables,))
    return {row[0] for row in rows}


def stats_tables(server) -> list[tuple[str, str]]:
    """Three tables of the admin's, autovacuum off."""
    tables = ["public.stats_a", "public.stats_b", "public.stats_c"]
    for table in tables:
        sql(server, f"DROP TABLE IF EXISTS {table}")
        sql(server, f"CREATE TABLE {table} (id int) WITH (autovacuum_enabled = false)")
        sql(server, f"INSERT INTO {table} SELECT generate_series(1, 1000)")
    return [("public", t.split(".")[1]) for t in tables]


@pytest.fixture
def target_tables(build):
    topo, _ = build
    return topo, Endpoint(HOST, topo.new_pg.port, "app"), stats_tables(topo.new_pg)


@pytest.mark.parametrize("node", ["new_pg", "old_pg"])  # PostgreSQL 17 (MAINTAIN) and 15 (ownership)
def test_analyze_by_a_login_that_may_not_fails_naming_the_tables_before_analyzing_any(build, node):
    topo, _ = build
    server = getattr(topo, node)
    relations = stats_tables(server)
    # Neither the owner of stats_b and stats_c nor the database's: ANALYZE would only warn "..., skipping it".
    login = Credentials("prober", topo.credentials["prober"])
    sql(server, "ALTER TABLE public.stats_a OWNER TO prober")

    with pytest.raises(statistics.AnalyzeFailed) as failed:
        statistics.analyze(Endpoint(HOST, server.port, "app"), login, relations, parallelism=2)

    assert "public.stats_b, public.stats_c" in str(failed.value) and "stats_a" not in str(failed.value)
    assert analyzed_tables(server, ["public.stats_a", "public.stats_b", "public.stats_c"]) == set()


def test_analyze_skips_a_dropped_table_with_a_note_and_gives_up_on_a_lock_held_too_long(target_tables):
    topo, target, relations = target_tables
    admin = Credentials("postgres", topo.credentials["postgres"])
    result = statistics.analyze(target, admin, relations + [("public", "stats_gone")], parallelism=2)
    assert result["analyzed"] == 3
    assert result["skipped"] == [{"relation": "public.stats_gone", "note": "dropped since listed: not analyzed"}]

    counts = dict(sql(topo.new_pg, "SELECT relname, analyze_count FROM pg_stat_all_tables WHERE relname LIKE 'stats_%'"))
    with closing(topo.new_pg.connect(dbname="app")) as holder, holder.cursor() as cursor:
        holder.autocommit = False
        cursor.execute("LOCK TABLE public.stats_b IN ACCESS EXCLUSIVE MODE")  # held until the rollback
        outcome: list = []
        worker = threading.Thread(target=lambda: outcome.append(_raised(lambda: statistics.analyze(
            target, admin, relations, parallelism=1, lock_timeout_ms=200, lock_tries=2))), daemon=True)
        started = time.monotonic()
        worker.start()
        worker.join(20)
        holder.rollback()
    worker.join(10)
    assert outcome, "ANALYZE waited on the lock for 20 s"
    assert isinstance(outcome[0], statistics.AnalyzeFailed), outcome
    assert "ANALYZE public.stats_b: its lock stayed taken" in str(outcome[0])
    assert time.monotonic() - started < 10
    # One at a time, in order: stats_a analyzed, stats_b given up on, stats_c never started (queued work cancelled).
    time.sleep(1)  # the statistics collector's counters are flushed within a second
    after = dict(sql(topo.new_pg, "SELECT relname, analyze_count FROM pg_stat_all_tables WHERE relname LIKE 'stats_%'"))
    assert (after["stats_a"], after["stats_b"], after["stats_c"]) == (
        counts["stats_a"] + 1, counts["stats_b"], counts["stats_c"]), (counts, after)


def _raised(work):
    try:
        return work()
    except Exception as error:  # the test inspects it
        return error


def test_prepare_target_analyzes_a_materialized_view_in_a_schema_whose_name_has_a_dot(build):
    topo, make = build
    sql(topo.old_pg, 'CREATE SCHEMA IF NOT EXISTS "we.ird"')
    sql(topo.old_pg, 'CREATE MATERIALIZED VIEW IF NOT EXISTS "we.ird"."totals.mv" AS '
                     "SELECT count(*) AS n FROM public.accounts")
    upgrade = replicating(make(shift_percentages=[]), in_sync=True)

    result = upgrade.prepare_target()

    assert result["refreshed"] == ["we.ird.totals.mv"]
    assert result["statistics"]["analyzed"] == len(upgrade.tables()) + 1
    assert analyzed_tables(topo.new_pg, ["we.ird.totals.mv"]) == {"we.ird.totals.mv"}


@pytest.fixture
def events_table(build):
    """A table large enough that losing its index costs tens of milliseconds, created on the source before the
    schema copy (so it is replicated, with its index)."""
    topo, make = build
    sql(topo.old_pg, "CREATE TABLE public.latency_events (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, "
                     "k int NOT NULL, payload text)")
    sql(topo.old_pg, "INSERT INTO public.latency_events (k, payload) SELECT g % 5000, md5(g::text) "
                     "FROM generate_series(1, 300000) g")
    sql(topo.old_pg, "CREATE INDEX latency_events_k ON public.latency_events (k)")
    sql(topo.old_pg, "ANALYZE public.latency_events")
    upgrade = replicating(make(shift_percentages=[25], health_probes=[PROBE]), in_sync=True)
    upgrade.prepare_target()
    return topo, upgrade


def test_a_probe_made_slow_on_the_target_fails_the_phase_naming_both_timings(events_table):
    topo, upgrade = events_table
    sql(topo.new_pg, "DROP INDEX public.latency_events_k")  # behind replication's back: DDL is not replicated

    problems, _ = upgrade.health_check()

    comparison = upgrade.last_latency
    assert comparison.statements_from.startswith("health_probes only: pg_stat_statements is not available")
    regressed = [p for p in problems if p.startswith("health_probes[0] is slower on the target")]
    assert len(regressed) == 1, problems
    found = re.search(r"median ([0-9.]+) ms there, ([0-9.]+) ms on the source", regressed[0])
    target_ms, source_ms = float(found.group(1)), float(found.group(2))
    assert target_ms > 1.5 * source_ms and target_ms - source_ms > 5, regressed[0]
    assert PROBE in regressed[0]
    [row] = comparison.regressed
    assert (row["source_ms"], row["target_ms"]) == (source_ms, target_ms)
    source_plan, target_plan = "\n".join(row["explain"]["source"]), "\n".join(row["explain"]["target"])
    assert "latency_events_k" in source_plan and "Seq Scan on latency_events" in target_plan
    assert "Seq Scan on latency_events" in comparison.explained()


def in_sync(upgrade, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not upgrade.lag().within(upgrade.request.lag_threshold_bytes):
        assert time.monotonic() < deadline, upgrade.lag()
        time.sleep(0.2)


def in_sync_after_restart(upgrade) -> dict:
    """In sync again after the source's restart. The restart cost the subscription its publisher, which counts as an
    apply error: it is the baseline here, as the apply errors of the build are in a run."""
    in_sync(upgrade)
    return upgrade.driver().apply_errors().marks


@contextmanager
def preloading_pg_stat_statements(server):
    """The source restarted with pg_stat_statements loaded, and the extension created in the app database."""
    current = sql(server, "SHOW shared_preload_libraries", dbname="postgres")[0][0]
    libraries = ", ".join(filter(None, [current, "pg_stat_statements"]))
    sql(server, "ALTER SYSTEM SET shared_preload_libraries = %s", (libraries,), dbname="postgres")
    server.stop()
    server.ensure_running()
    try:
        sql(server, "CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        sql(server, "SELECT pg_stat_statements_reset()")
        yield
    finally:
        sql(server, "DROP EXTENSION IF EXISTS pg_stat_statements")
        sql(server, "ALTER SYSTEM RESET shared_preload_libraries", dbname="postgres")
        server.stop()
        server.ensure_running()


def test_equal_nodes_pass_and_the_source_s_safe_top_statements_are_compared(events_table):
    topo, upgrade = events_table
    with preloading_pg_stat_statements(topo.old_pg):
        with closing(topo.old_pg.connect(dbname="app")) as app, app.cursor() as cursor:
            for _ in range(30):  # the application's statements, as pg_stat_statements records them
                cursor.execute("SELECT count(*) FROM public.latency_events")  # no constant: runnable
                cursor.execute("SELECT * FROM public.accounts WHERE id = 7")  # becomes id = $1: skipped
                cursor.execute("SELECT id FROM public.accounts ORDER BY id FOR UPDATE")  # a lock: skipped
            app.rollback()
        apply_errors_seen = in_sync_after_restart(upgrade)  # the subscription reconnects after the source's restart

        problems, _ = upgrade.health_check(apply_error_baseline=apply_errors_seen)

    comparison = upgrade.last_latency
    assert problems == [], problems
    assert comparison.regressed == []
    assert "pg_stat_statements" in comparison.statements_from
    compared = {c["name"]: c for c in comparison.compared}
    assert "health_probes[0]" in compared
    from_source = [c for c in comparison.compared if c["name"].startswith("pg_stat_statements queryid")]
    assert any(c["statement"] == "SELECT count(*) FROM public.latency_events" for c in from_source), compared
    for row in comparison.compared:
        assert len(row["source_runs"]) == len(row["target_runs"]) == 5, row
    reasons = {s.get("statement", ""): s["reason"] for s in comparison.skipped}
    assert any("$1" in text and "has parameters" in reason for text, reason in reasons.items()), reasons
    assert any("FOR UPDATE" in text and "contains FOR" in reason for text, reason in reasons.items()), reasons


def test_the_source_s_statements_leak_no_value_and_one_failing_only_on_the_target_fails_the_phase(events_table):
    topo, upgrade = events_table
    for server in (topo.old_pg, topo.new_pg):  # outside the publication: the same rows on both nodes
        sql(server, "CREATE TABLE public.codes (code text)")
        sql(server, "INSERT INTO public.codes VALUES ('123')")
    sql(topo.old_pg, "CREATE TABLE public.old_only (a int)")  # a statement that works on the old node only
    sql(topo.old_pg, "CREATE VIEW public.recent_events AS SELECT * FROM public.latency_events")
    sql(topo.old_pg, "CREATE FUNCTION public.audit_fn(public.latency_events) RETURNS int LANGUAGE sql "
                     "AS 'SELECT 1'")
    with preloading_pg_stat_statements(topo.old_pg):
        with closing(topo.old_pg.connect(dbname="app")) as app, app.cursor() as cursor:
            for _ in range(30):
                cursor.execute("SELECT max(code::int) FROM public.codes")  # fails once a row is not a number
                cursor.execute("SELECT count(*) FROM public.old_only")
                cursor.execute("SELECT count(*) FROM public.recent_events")  # a view: not run again
                cursor.execute("SELECT e.audit_fn FROM public.latency_events e")  # audit_fn(e), attribute notation
            app.rollback()
        for server in (topo.old_pg, topo.new_pg):
            sql(server, "INSERT INTO public.codes VALUES ('s3cret-value')")
        apply_errors_seen = in_sync_after_restart(upgrade)

        problems, _ = upgrade.health_check(apply_error_baseline=apply_errors_seen)

    comparison = upgrade.last_latency
    everything = repr(comparison.as_dict()) + repr(problems)
    assert "s3cret-value" not in everything, everything
    failed = [p for p in problems if "fails on the target" in p]
    assert failed == [next(p for p in failed if "SELECT count(*) FROM public.old_only" in p)], problems
    assert "fails on the target (SQLSTATE 42P01 (undefined_table)) but runs on the source" in failed[0]
    reasons = {s.get("statement", ""): s["reason"] for s in comparison.skipped}
    assert reasons["SELECT max(code::int) FROM public.codes"] == (
        "failed on the source: SQLSTATE 22P02 (invalid_text_representation)"), reasons
    assert "a view" in reasons["SELECT count(*) FROM public.recent_events"], reasons
    assert "audit_fn, a function defined in the database" in reasons[
        "SELECT e.audit_fn FROM public.latency_events e"], reasons


def test_a_connection_lost_during_the_comparison_fails_the_phase(events_table):
    topo, upgrade = events_table
    upgrade.request = dataclasses.replace(upgrade.request, health_probes=("SELECT pg_sleep(0.3)",))
    killed: list = []

    def kill_the_comparison_on_the_target() -> None:
        deadline = time.monotonic() + 20
        while not killed and time.monotonic() < deadline:
            killed.extend(sql(topo.new_pg, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
                                           "usename = 'prober' AND state = 'active' AND query LIKE 'EXPLAIN (ANALYZE%'"))
            time.sleep(0.05)

    killer = threading.Thread(target=kill_the_comparison_on_the_target, daemon=True)
    killer.start()
    problems, _ = upgrade.health_check()
    killer.join(25)

    assert killed, "the comparison's session on the target was never seen"
    # libpq reports the termination with its SQLSTATE or, when the socket closed first, as a lost connection.
    assert problems in (["latency comparison could not run: SQLSTATE 57P01 (admin_shutdown)"],
                        ["latency comparison could not run: the connection failed or was lost (OperationalError)"]), problems


def test_a_timeout_of_the_warm_up_run_on_a_cold_target_does_not_count(events_table):
    topo, upgrade = events_table
    upgrade.request = dataclasses.replace(upgrade.request, health_probes=())
    with preloading_pg_stat_statements(topo.old_pg):
        with closing(topo.old_pg.connect(dbname="app")) as app, app.cursor() as cursor:
            for _ in range(30):
                cursor.execute("SELECT count(*) FROM public.latency_events")
        apply_errors_seen = in_sync_after_restart(upgrade)
        seen: list = []
        with closing(topo.new_pg.connect(dbname="app")) as holder, holder.cursor() as cursor:
            holder.autocommit = False
            cursor.execute("LOCK TABLE public.latency_events IN ACCESS EXCLUSIVE MODE")  # the warm-up run waits

            def release_once_the_warm_up_gave_up() -> None:
                """As soon as the statement first seen waiting is gone (the next run may already wait)."""
                deadline = time.monotonic() + 20
                with closing(topo.new_pg.connect(dbname="app")) as watcher, watcher.cursor() as watch:
                    watcher.autocommit = True
                    while time.monotonic() < deadline:
                        watch.execute("SELECT pid, query_start FROM pg_stat_activity WHERE usename = 'prober' "
                                      "AND wait_event_type = 'Lock'")
                        waiting = watch.fetchall()
                        if seen and seen[0] not in waiting:
                            break
                        if waiting and not seen:
                            seen.append(waiting[0])
                        time.sleep(0.005)
                holder.rollback()

            releaser = threading.Thread(target=release_once_the_warm_up_gave_up, daemon=True)
            releaser.start()
            problems, _ = upgrade.health_check(apply_error_baseline=apply_errors_seen)
            releaser.join(25)

    assert seen, "the warm-up run never waited for the lock"
    assert problems == [], problems
    [row] = [c for c in upgrade.last_latency.compared if c["statement"] == "SELECT count(*) FROM public.latency_events"]
    assert len(row["target_runs"]) == 5 and "target_error" not in row, row


def test_a_statement_whose_plan_reads_a_foreign_partition_is_not_run_again(events_table):
    topo, upgrade = events_table
    sql(topo.old_pg, "CREATE EXTENSION IF NOT EXISTS file_fdw")
    sql(topo.old_pg, "CREATE SERVER IF NOT EXISTS pgu_files FOREIGN DATA WRAPPER file_fdw")
    sql(topo.old_pg, "CREATE TABLE public.parted (id int) PARTITION BY RANGE (id)")
    sql(topo.old_pg, "CREATE TABLE public.parted_local PARTITION OF public.parted FOR VALUES FROM (0) TO (100)")
    sql(topo.old_pg, "CREATE FOREIGN TABLE public.parted_remote PARTITION OF public.parted FOR VALUES FROM (100) "
                     "TO (200) SERVER pgu_files OPTIONS (filename '/dev/null', format 'csv')")
    with preloading_pg_stat_statements(topo.old_pg):
        with closing(topo.old_pg.connect(dbname="app")) as app, app.cursor() as cursor:
            for _ in range(30):  # names neither the foreign table nor a view: only its plan shows the Foreign Scan
                cursor.execute("SELECT count(*) FROM public.parted")
        apply_errors_seen = in_sync_after_restart(upgrade)

        problems, _ = upgrade.health_check(apply_error_baseline=apply_errors_seen)

    assert problems == [], problems
    reasons = {s.get("statement", ""): s["reason"] for s in upgrade.last_latency.skipped}
    assert reasons["SELECT count(*) FROM public.parted"] == (
        "its plan has a Foreign Scan (what it runs is not in the statement)"), reasons
