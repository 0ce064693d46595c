"""The domain's steps on the local topology, without Airflow: cutover undo, sticky units, preflight refusals."""

from __future__ import annotations

import json
import time

import psycopg2
import pytest

from pgactive_upgrade import catalog, fencing, rds
from pgactive_upgrade.cutover import CutoverError
from pgactive_upgrade.deployment import Deployment, DeploymentError
from pgactive_upgrade.upgrade import PreflightError
from integration_parts import replicating
from topology import aws
from topology.slow_rds import SlowRds

pytestmark = pytest.mark.integration


def test_cutover_past_its_deadline_undoes_itself(build):
    topo, make = build
    upgrade = replicating(make(cutover_deadline_seconds=5))
    upgrade.shift(50)
    with topo.new_pg.connect("postgres", dbname="app") as target, target.cursor() as cursor:
        cursor.execute("ALTER SUBSCRIPTION pgu_orders_db_fwd DISABLE")  # the marker can never arrive

    with pytest.raises(CutoverError, match="deadline of 5 s passed"):
        upgrade.cutover("never-arrives")

    assert topo.haproxy.get_weight("pg_write", "target") == 0
    assert topo.haproxy.get_weight("pg_read", "target") == 50, "the previous split is restored"
    with topo.old_pg.connect("postgres", dbname="app") as source:
        assert fencing.fenced_roles(source) == []
    with topo.new_pg.connect("postgres", dbname="app") as target, target.cursor() as cursor:
        assert fencing.read_only_roles(target, "app") == ["app"], "one-way replication: the target stays read-only"
        cursor.execute("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'pgu_orders_db_rev'")
        assert cursor.fetchone()[0] == 0
    app = psycopg2.connect(host="127.0.0.1", port=topo.haproxy.write_port, dbname="app", user="app",
                           password=topo.credentials["app"])
    with app, app.cursor() as cursor:  # writes work again on the source
        cursor.execute("INSERT INTO public.accounts (email, created_at) VALUES ('after-undo@example.com', now())")
        cursor.execute("SELECT inet_server_port()")
        assert cursor.fetchone()[0] == topo.old_pg.port
    app.close()


def test_units_mode_moves_whole_routes_in_order(build):
    topo, make = build
    route53 = topo.aws_client("route53")
    zone = route53.create_hosted_zone(Name="db.example.internal", CallerReference="units-test")["HostedZone"]["Id"]
    routes = [{"name": "writer.db.example.internal", "carries_writes": True}] + [
        {"name": f"svc{n}.db.example.internal", "carries_writes": False} for n in range(4)
    ]
    traffic = {"controller": "route53", "route53": {"hosted_zone_id": zone.split("/")[-1], "ttl": 5, "routes": routes}}
    upgrade = make(traffic=traffic, shift_mode="units")
    upgrade.controller().set_target_percent(0)  # the applications already resolve these weighted records
    replicating(upgrade)

    first = upgrade.shift(25)
    assert first["split"] == {"writer.db.example.internal": 0, "svc0.db.example.internal": 100,
                              "svc1.db.example.internal": 0, "svc2.db.example.internal": 0, "svc3.db.example.internal": 0}
    second = upgrade.shift(60)
    assert [second["split"][f"svc{n}.db.example.internal"] for n in range(4)] == [100, 100, 100, 0]
    assert second["split"]["writer.db.example.internal"] == 0, "one-way replication: writers move only at cutover"


def test_preflight_names_tables_without_primary_key_before_anything_changes(build):
    topo, make = build
    with pytest.raises(PreflightError, match=r"scratch\.import_log"):
        make(exclude_schemas=[]).preflight()
    assert [i["DBInstanceIdentifier"] for i in topo.aws_client("rds").describe_db_instances()["DBInstances"]] == ["orders-db"]


def test_preflight_refuses_a_target_version_that_is_not_newer(build):
    _, make = build
    with pytest.raises(PreflightError, match="target_engine_version: 15.9 is not a newer major"):
        make(target_engine_version="15.9").preflight()


def test_include_tables_replicates_exactly_those_tables(build):
    topo, make = build
    upgrade = replicating(make(include_tables=["billing.invoices", "public.accounts"], exclude_schemas=[]))
    deadline = time.monotonic() + 30
    while not upgrade.lag().within(upgrade.request.lag_threshold_bytes):
        assert time.monotonic() < deadline, upgrade.lag()
        time.sleep(0.2)
    with topo.new_pg.connect("postgres", dbname="app") as target:
        assert sorted(catalog.user_tables(target)) == ["billing.invoices", "public.accounts"]
    upgrade.cutover("include-tables")
    result = upgrade.verify()
    assert result["tables"] == 2 and result["rows"] > 0 and result["sequences"] == 2


def test_rollback_before_the_target_exists_only_returns_the_routes(build):
    topo, make = build
    topo.haproxy.set_weight("pg_read", "target", 50)
    topo.haproxy.set_weight("pg_read", "source", 50)

    result = make().rollback("early")

    assert result == {"after_cutover": False, "target_exists": False, "total_ms": 0.0,
                      "split": {"pg_write": 0, "pg_read": 0}, "writer": "source"}
    assert [i["DBInstanceIdentifier"] for i in topo.aws_client("rds").describe_db_instances()["DBInstances"]] == ["orders-db"]


def test_rollback_after_cutover_then_a_second_cutover_is_refused(build):
    topo, make = build
    upgrade = replicating(make())
    deadline = time.monotonic() + 30
    while not upgrade.lag().within(upgrade.request.lag_threshold_bytes):
        assert time.monotonic() < deadline, upgrade.lag()
        time.sleep(0.2)
    upgrade.cutover("first")
    assert upgrade.rollback("back")["after_cutover"] is True

    with pytest.raises(CutoverError, match="rolled back after cutover"):
        upgrade.cutover("again")
    assert topo.haproxy.get_weight("pg_write", "source") == 100 and topo.haproxy.get_weight("pg_write", "target") == 0


class NoRds:
    """An RDS client any use of which fails the test."""

    def __getattr__(self, name):
        raise AssertionError(f"RDS was called ({name}) by a step that has the instances recorded")


def test_steps_after_configure_run_from_the_recorded_instances_without_calling_rds(build):
    topo, make = build
    first = make()
    for step in (first.preflight, first.provision_target, first.configure_parameters):
        step()
    recorded = json.loads(json.dumps(first.describe_instances()))  # as the XCom keeps it
    assert rds.InstanceInfo.from_dict(recorded["target"]) == rds.describe_instance(topo.aws_client("rds"), first.target_id)

    later = make()
    later.rds_client = NoRds()
    later.known_instances = {role: rds.InstanceInfo.from_dict(info) for role, info in recorded.items()}
    later.install()
    later.build_group()
    deadline = time.monotonic() + 60
    while not later.lag().within(later.request.lag_threshold_bytes):
        assert time.monotonic() < deadline, later.lag()
        time.sleep(0.2)
    later.shift(50)
    assert later.cutover("recorded")["split"] == {"pg_write": 100, "pg_read": 100}
    assert later.verify()["rows"] > 0


def test_detach_and_decommission_check_the_source_is_still_allowed_as_rds_describes_it_now(build):
    """The steps between configure_parameters and detach act on the source as it was recorded; the two that end the
    rollback or delete the source ask RDS again, and a source no longer allowed (its allow tag removed) is refused."""
    topo, make = build
    client = topo.aws_client("rds")
    arn = rds.describe_instance(client, "orders-db").arn
    client.add_tags_to_resource(ResourceName=arn, Tags=[{"Key": "upgrade-allowed", "Value": "yes"}])
    upgrade = make(decommission="delete")
    upgrade.deployment = Deployment(connections={}, source_tags={"upgrade-allowed": "yes"})
    upgrade.known_instances = {"source": rds.describe_instance(client, "orders-db")}
    assert upgrade.source.identifier == "orders-db"  # allowed, as recorded

    client.remove_tags_from_resource(ResourceName=arn, TagKeys=["upgrade-allowed"])
    for step in (upgrade.detach, lambda: upgrade.decommission("orders-db-final-refused")):
        with pytest.raises(DeploymentError, match="not an allowed source"):
            step()
    assert rds.describe_instance(client, "orders-db") is not None
    assert client.describe_db_snapshots(DBInstanceIdentifier="orders-db", SnapshotType="manual")["DBSnapshots"] == []


def test_configure_reboots_the_source_while_the_target_is_created_and_waits_for_its_reboot_first(build):
    """Both instances move on in each try: the source's reboot passes while the target is still being created.
    The source's wait comes first, so that it is looked at again only once its parameters are in-sync."""
    topo, make = build
    upgrade = make()
    with SlowRds(topo.moto_url, create_seconds=60, reboot_seconds=2) as slow:
        upgrade.rds_client = aws.client("rds", slow.url)
        upgrade.preflight()
        upgrade.provision_target()
        source, target = upgrade.source.identifier, upgrade.target_id

        first = upgrade.configure_parameters()
        assert (first.identifier, first.until) == (source, rds.IN_SYNC), first
        assert rds.describe_instance(upgrade.rds_client, target).status == "creating"
        deadline = time.monotonic() + 30
        while (info := rds.describe_instance(upgrade.rds_client, source)).status != "available":
            assert time.monotonic() < deadline, info
            time.sleep(0.2)

        second = upgrade.configure_parameters()
        assert (second.identifier, second.until) == (target, rds.AVAILABLE), second
        assert [action for _, action in slow.calls].count("RebootDBInstance") == 1, "the source is rebooted once"


def test_a_target_that_failed_stops_configure_before_the_source_is_touched(build):
    topo, make = build
    upgrade = make()
    with SlowRds(topo.moto_url, create_seconds=0) as slow:
        upgrade.rds_client = aws.client("rds", slow.url)
        upgrade.preflight()
        upgrade.provision_target()
        slow.busy_until[upgrade.target_id] = ("failed", time.monotonic() + 60)
        provisioned = len(slow.calls)

        with pytest.raises(rds.RdsError, match=f"{upgrade.target_id} is in state 'failed'"):
            upgrade.configure_parameters()
    changes = {"ModifyDBInstance", "RebootDBInstance", "CopyDBParameterGroup", "ModifyDBParameterGroup"}
    source_changes = [action for _, action in slow.calls[provisioned:] if action in changes]
    assert source_changes == [], source_changes
