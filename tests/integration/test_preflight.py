"""Preflight on a hostile schema names every risky object; a clean schema passes; materialized views are refreshed
on the target; DDL on the source after the schema copy is named by the health check."""

from __future__ import annotations

import contextlib
from contextlib import closing
import threading
import time

import psycopg2
import pytest

from pgactive_upgrade import matviews, preflight
from pgactive_upgrade.upgrade import PreflightError
from tests.integration.integration_parts import replicating, upgrade_of
from topology.hostile import Hostile

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def hostile_preflight(topology):
    """(blocking problems, warnings) of one preflight on the hostile schema, with the target already provisioned
    (as when preflight runs again), so the checks against PostgreSQL 17 run too."""
    topology.up()
    topology.seed_database(rows=2000)
    topology.reset_aws()
    topology.seed_aws()
    topology.haproxy.reset_weights()
    _give_the_source_a_custom_parameter(topology.aws_client("rds"))
    upgrade = upgrade_of(topology, max_open_transaction_seconds=1)
    upgrade.provision_target()
    with Hostile(topology):
        time.sleep(1.5)  # the held transaction is now older than max_open_transaction_seconds
        with pytest.raises(PreflightError) as raised:
            upgrade.preflight()
    return str(raised.value), [w["message"] for w in raised.value.warnings]


def _give_the_source_a_custom_parameter(rds) -> None:
    rds.create_db_parameter_group(DBParameterGroupName="orders-db-tuned", DBParameterGroupFamily="postgres15",
                                  Description="tuned")
    rds.modify_db_parameter_group(DBParameterGroupName="orders-db-tuned", Parameters=[
        {"ParameterName": "work_mem", "ParameterValue": "65536", "ApplyMethod": "immediate"},
        {"ParameterName": "max_worker_processes", "ParameterValue": "32", "ApplyMethod": "pending-reboot"},
        {"ParameterName": "shared_preload_libraries", "ParameterValue": "pg_cron", "ApplyMethod": "pending-reboot"}])
    rds.modify_db_instance(DBInstanceIdentifier="orders-db", DBParameterGroupName="orders-db-tuned",
                           ApplyImmediately=True)


BLOCKED = {
    "table without primary key": "hostile.no_pk",
    "unlogged table": "hostile.unlogged_events: unlogged",
    "replica identity nothing": "hostile.nothing_identity: REPLICA IDENTITY NOTHING",
    "partition outside the selection": "hostile.visits: partitions scratch.visits_2025 are not selected",
    "large object": "large objects",
    "descending sequence": "hostile.countdown: descending",
    "int4 sequence near its end": "hostile.nearly_full: integer sequence has 47483647 values left",
    "default on an unselected sequence": "hostile.tickets.id: its default uses sequence scratch.ticket_numbers",
    "open transaction": "open for",
    "prepared transaction": "prepared transaction 'hostile_prepared'",
    "replication slot capacity": "orders-db: max_replication_slots is 20 with 18 in use",
    "extension missing on the target": "extension adminpack",
    "role missing on the target": "role hostile_app does not exist on orders-db-pg17",
    "library the target's group does not preload": "pg_cron: shared_preload_libraries of orders-db-tuned has it, "
                                                   "orders-db-pg17-native does not",
}

WARNED = {
    "replica identity full": "hostile.full_identity: REPLICA IDENTITY FULL",
    "replica identity index": "hostile.index_identity: replica identity is index hostile.index_identity_code_key",
    "materialized view": "materialized views arrive empty on the target (not replicated): hostile.order_totals",
    "partition leaves": "hostile.readings: published per partition (not through the root), each verified: "
                        "hostile.readings_2024, hostile.readings_2025",
    "free-standing sequence": "scratch.loose_counter: a free-standing sequence",
    "other publication": "publication hostile_pub: not migrated",
    "other subscription": "subscription hostile_sub (database app): not migrated",
    "other consumer's slot": "replication slot hostile_cdc (logical test_decoding, inactive)",
    "replica slots": "physical replication slots hostile_standby_0",
    "spilled transactions": "slot hostile_cdc: 1 transactions",
    "stale collation version": "collation hostile.german: recorded version 1.0",
    "collation refresh": "ALTER COLLATION hostile.german REFRESH VERSION",
    "index to reindex": "REINDEX on the source: hostile.names_by_name",
    "source's custom parameter": "work_mem=65536 (target: default)",
    "source's value of a parameter the driver sets": "max_worker_processes: source 32, target 16",
}


@pytest.mark.parametrize("expected", BLOCKED.values(), ids=BLOCKED.keys())
def test_hostile_schema_blocks(hostile_preflight, expected):
    problems, _ = hostile_preflight
    assert expected in problems


@pytest.mark.parametrize("expected", WARNED.values(), ids=WARNED.keys())
def test_hostile_schema_warns(hostile_preflight, expected):
    _, warnings = hostile_preflight
    assert any(expected in warning for warning in warnings), warnings


def test_clean_schema_passes_with_the_target_checks_left_for_later(build):
    _, make = build
    result = make().preflight()
    assert [w["check"] for w in result["warnings"]] == ["target"], result["warnings"]


MATVIEWS = """
CREATE MATERIALIZED VIEW public.account_totals AS
    SELECT account_id, sum(amount) AS total FROM public.orders GROUP BY 1;
CREATE UNIQUE INDEX ON public.account_totals (account_id);
CREATE MATERIALIZED VIEW public.top_accounts AS SELECT * FROM public.account_totals ORDER BY total DESC LIMIT 10;
GRANT SELECT ON public.account_totals, public.top_accounts TO replicator;
"""


def test_materialized_views_are_refreshed_on_the_target_dependencies_first(build):
    topo, make = build
    with topo.old_pg.connect(dbname="app") as source, source.cursor() as cursor:
        cursor.execute(MATVIEWS)
    upgrade = replicating(make(), in_sync=True)
    with topo.new_pg.connect(dbname="app") as target, target.cursor() as cursor:
        cursor.execute("SELECT relname FROM pg_class WHERE relkind = 'm' AND NOT relispopulated ORDER BY 1")
        assert cursor.fetchall() == [("account_totals",), ("top_accounts",)], "the schema copy leaves them empty"

    first = upgrade.refresh_materialized_views()
    again = upgrade.refresh_materialized_views()

    assert first == again == {"refreshed": ["public.account_totals", "public.top_accounts"]}
    digest = "SELECT count(*), sum(total) FROM public.account_totals"
    with topo.old_pg.connect(dbname="app") as source, source.cursor() as on_source, \
            topo.new_pg.connect(dbname="app") as target, target.cursor() as on_target:
        on_source.execute(digest)
        on_target.execute(digest)
        assert on_target.fetchone() == on_source.fetchone()


def test_a_materialized_view_reading_another_through_a_plain_view_is_refreshed_after_it(build):
    topo, make = build
    with closing(topo.old_pg.connect(dbname="app")) as connection:
        with connection.cursor() as cursor:  # by name, a_ would come first
            cursor.execute("""
                CREATE MATERIALIZED VIEW public.b_account_totals AS
                    SELECT account_id, sum(amount) AS total FROM public.orders GROUP BY 1 WITH NO DATA;
                CREATE VIEW public.big_accounts AS SELECT * FROM public.b_account_totals WHERE total > 0;
                CREATE MATERIALIZED VIEW public.a_big_account_count AS SELECT count(*) FROM public.big_accounts
                    WITH NO DATA""")
        refreshed = matviews.refresh_all(connection, make().request.filters)
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) > 0 FROM public.a_big_account_count")
            assert cursor.fetchone() == (True,)
    assert refreshed == [("public", "b_account_totals"), ("public", "a_big_account_count")]


def test_ddl_on_the_source_after_the_schema_copy_is_named_by_the_health_check(build):
    topo, make = build
    upgrade = replicating(make(), in_sync=True)
    with topo.old_pg.connect(dbname="app") as source, source.cursor() as cursor:
        cursor.execute("ALTER TABLE public.orders ADD COLUMN coupon text")
    problems, _ = upgrade.health_check()
    assert any("public.orders: column coupon (text) exists on the source only" in p for p in problems), problems


def test_install_refuses_a_target_without_the_application_roles(build):
    topo, make = build
    with topo.old_pg.connect() as source, source.cursor() as cursor:
        cursor.execute("CREATE ROLE stray_app LOGIN")
    try:
        upgrade = make()
        for step in (upgrade.preflight, upgrade.provision_target, upgrade.configure_parameters):
            step()
        with pytest.raises(PreflightError, match="role stray_app does not exist on orders-db-pg17"):
            upgrade.install()
    finally:
        with topo.old_pg.connect() as source, source.cursor() as cursor:
            cursor.execute("DROP ROLE stray_app")


def _context(upgrade, source, target=None, application_roles=()) -> preflight.Context:
    """The checks' context on the given connections (another role's, another session's settings)."""
    return preflight.Context(source=source, request=upgrade.request, tables=[], source_info=upgrade.source,
                             replication_user="replicator", application_roles=list(application_roles),
                             target=target, target_id=upgrade.target_id,
                             target_parameter_group=upgrade.parameter_group)


def test_a_library_the_source_preloads_and_the_target_does_not_blocks_naming_it(build):
    topo, make = build
    _restart_preloading(topo.old_pg, "pg_stat_statements")
    try:
        with closing(topo.old_pg.connect(dbname="app")) as source, closing(topo.new_pg.connect(dbname="app")) as target:
            found = preflight.preload_libraries(_context(make(), source, target))
    finally:
        _restart_preloading(topo.old_pg, None)
    assert found == [preflight.block(
        "preload_libraries", "pg_stat_statements: in the source's shared_preload_libraries but not loaded on "
        "orders-db-pg17; add pg_stat_statements to shared_preload_libraries in parameter group orders-db-pg17-native "
        "and reboot the target")]


def _restart_preloading(server, library: str | None) -> None:
    with closing(server.connect()) as connection, connection.cursor() as cursor:
        if library:
            cursor.execute("ALTER SYSTEM SET shared_preload_libraries = %s", (library,))
        else:
            cursor.execute("ALTER SYSTEM RESET shared_preload_libraries")
    server.stop()
    server.ensure_running()


def test_roles_valid_until_compares_the_instant_whatever_each_session_s_time_zone(build):
    topo, make = build
    for server in (topo.old_pg, topo.new_pg):
        with server.connect() as connection, connection.cursor() as cursor:
            cursor.execute("CREATE ROLE expiring_app LOGIN VALID UNTIL '2031-01-01 00:00:00+00'")
    try:
        with topo.old_pg.connect(dbname="app") as source, topo.new_pg.connect(dbname="app") as target:
            source.cursor().execute("SET TimeZone = 'UTC'")
            target.cursor().execute("SET TimeZone = 'Asia/Tokyo'")
            assert preflight.roles(_context(make(), source, target, ["expiring_app"])) == []
            target.cursor().execute("ALTER ROLE expiring_app VALID UNTIL '2031-01-02 00:00:00+00'")
            found = preflight.roles(_context(make(), source, target, ["expiring_app"]))
        assert [f.message for f in found] == [
            "role expiring_app differs on orders-db-pg17: VALID UNTIL 2031-01-01T00:00:00+00:00 vs "
            "2031-01-02T00:00:00+00:00 (source vs target); ALTER ROLE / GRANT it there to match"]
    finally:
        for server in (topo.old_pg, topo.new_pg):
            with server.connect() as connection, connection.cursor() as cursor:
                cursor.execute("DROP ROLE expiring_app")


def test_a_sequence_the_admin_may_not_read_blocks_naming_the_grant(build):
    topo, make = build
    with topo.old_pg.connect(dbname="app") as owner, owner.cursor() as cursor:
        cursor.execute("CREATE SEQUENCE public.invoice_numbers AS integer")
        cursor.execute("SELECT setval('public.invoice_numbers', 2100000000)")  # near its end: unseen when unreadable
        cursor.execute("GRANT USAGE ON SCHEMA public TO app")
    with topo.old_pg.connect(user="app", dbname="app") as not_superuser:
        found = preflight.sequences(_context(make(), not_superuser))
    assert preflight.block("sequences", "public.invoice_numbers: the admin role app may not read it, so its headroom "
                           "cannot be checked and the cutover cannot move it; GRANT SELECT ON SEQUENCE "
                           "public.invoice_numbers TO app (as its owner)") in found


def test_parallel_query_workers_do_not_count_against_max_worker_processes(build):
    topo, make = build
    # closing(), not the connection's own `with`, which would hold a transaction (and its pg_stat_activity snapshot)
    with closing(topo.old_pg.connect(dbname="app")) as busy, closing(topo.old_pg.connect(dbname="app")) as admin:
        idle = preflight.capacity_in_use(admin, "pgu_")
        with _parallel_query_running(busy, admin):
            during = preflight.capacity_in_use(admin, "pgu_")
    assert during["max_worker_processes"] == idle["max_worker_processes"]


@contextlib.contextmanager
def _parallel_query_running(busy, watcher):
    """A query on `busy` with parallel workers, running (asynchronously) while the block runs."""
    with busy.cursor() as cursor:
        cursor.execute("SET max_parallel_workers_per_gather = 2; SET parallel_setup_cost = 0; "
                       "SET parallel_tuple_cost = 0; SET min_parallel_table_scan_size = 0; SET force_parallel_mode = on")
    worker = threading.Thread(target=_ignore_cancel,
                              args=(busy, "SELECT count(*) FROM public.orders WHERE pg_sleep(0.01) IS NOT NULL"))
    worker.start()
    try:
        _wait_for(watcher, "SELECT count(*) > 0 FROM pg_stat_activity WHERE backend_type = 'parallel worker'")
        yield
    finally:
        busy.cancel()
        worker.join()


def _ignore_cancel(connection, statement: str) -> None:
    try:
        connection.cursor().execute(statement)
    except psycopg2.errors.QueryCanceled:
        pass


def _wait_for(connection, condition: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    with connection.cursor() as cursor:
        while cursor.execute(condition) or not cursor.fetchone()[0]:
            assert time.monotonic() < deadline, f"still false after {timeout} s: {condition}"
            time.sleep(0.05)


def test_a_long_write_transaction_in_the_source_database_with_lag_under_the_threshold_is_healthy(build):
    topo, make = build
    upgrade = replicating(make(max_open_transaction_seconds=1), in_sync=True)
    with closing(_open_write_transaction(topo)):
        time.sleep(1.5)  # older than max_open_transaction_seconds
        problems, lag = upgrade.health_check()
    assert lag.bytes <= upgrade.request.lag_threshold_bytes
    assert problems == []


def test_lag_above_the_threshold_names_the_long_write_transaction_in_the_source_database(build):
    topo, make = build
    upgrade = replicating(make(max_open_transaction_seconds=1, lag_threshold_bytes=0), in_sync=True)
    with closing(topo.new_pg.connect(dbname="app")) as target, target.cursor() as cursor:
        cursor.execute(f"ALTER SUBSCRIPTION {upgrade.key}_fwd DISABLE")  # the apply stops: lag builds up
    with closing(topo.old_pg.connect(dbname="app")) as source:
        _wait_for(source, f"SELECT NOT active FROM pg_replication_slots WHERE slot_name = '{upgrade.key}_fwd'")
        source.cursor().execute("UPDATE public.orders SET amount = amount")  # committed, never confirmed
    with closing(_open_write_transaction(topo)) as holder:
        time.sleep(1.5)
        pid = holder.get_backend_pid()
        problems, _ = upgrade.health_check()
    assert any(f"likely cause: the transaction of pid {pid} (app) open with writes" in p
               and f"pg_terminate_backend({pid})" in p for p in problems), problems


def _open_write_transaction(topo):
    """A client transaction with a write, left open (the caller closes the connection)."""
    connection = topo.old_pg.connect(user="app", dbname="app", autocommit=False)
    with connection.cursor() as cursor:
        cursor.execute("UPDATE public.orders SET amount = amount WHERE id = (SELECT min(id) FROM public.orders)")
    return connection


def test_a_nullable_column_added_on_the_target_first_is_not_a_problem_but_one_required_there_is(build):
    topo, make = build
    upgrade = replicating(make(), in_sync=True)
    with topo.new_pg.connect(dbname="app") as target, target.cursor() as cursor:
        cursor.execute("ALTER TABLE public.orders ADD COLUMN coupon text")
    assert upgrade.driver().schema_problems() == []

    with topo.new_pg.connect(dbname="app") as target, target.cursor() as cursor:
        cursor.execute("ALTER TABLE public.orders ADD COLUMN channel text NOT NULL DEFAULT 'web', "
                       "ADD COLUMN region text NOT NULL DEFAULT 'eu'; "
                       "ALTER TABLE public.orders ALTER COLUMN region DROP DEFAULT")
    assert upgrade.driver().schema_problems() == [
        "DDL after the schema copy: public.orders: column region (text) exists on the target only and is NOT NULL "
        "without a default: rows from the source are refused; give it a default or add it on the source"]


def test_a_table_created_on_both_nodes_after_the_build_is_named_until_published(build):
    topo, make = build
    replicating(make(), in_sync=True)
    for server in (topo.old_pg, topo.new_pg):
        with server.connect(dbname="app") as connection, connection.cursor() as cursor:
            cursor.execute("CREATE TABLE public.coupons (id int PRIMARY KEY); GRANT SELECT ON public.coupons TO replicator")
    upgrade = make()  # a later task: its tables read afresh from the source
    problems, _ = upgrade.health_check()
    assert any(p.startswith("public.coupons: selected but not in publication pgu_orders_db") for p in problems), problems
