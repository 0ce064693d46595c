"""Preflight on a hostile schema names every risky object; a clean schema passes; materialized views are refreshed
on the target; DDL on the source after the schema copy is named by the health check."""

from __future__ import annotations

import time

import pytest

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
        {"ParameterName": "work_mem", "ParameterValue": "65536", "ApplyMethod": "immediate"}])
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
