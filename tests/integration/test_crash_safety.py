"""Crash safety of the cutover, the rollback and the fence, on the local topology under a write load.

Each fault case kills the switch's process with SIGKILL at a step boundary (topology/faults.py), runs the
documented recovery, and asserts: every acknowledged commit present exactly once on the one node that ends up
writable, never two writable nodes, writes back within the PRD's 30 s. bench/faults.py runs the whole matrix.
"""

from __future__ import annotations

import time
from contextlib import closing

import psycopg2
import pytest

from pgactive_upgrade import config, fencing, switch_state
from pgactive_upgrade.db import Credentials
from pgactive_upgrade.upgrade import PreflightError, Upgrade
from topology import faults
from topology.demo import demo_conf

pytestmark = pytest.mark.integration


@pytest.fixture
def replicating(fresh_databases, monkeypatch):
    """make(**conf overrides) -> (conf, Upgrade in sync), with the load's table replicated."""
    topo = fresh_databases
    monkeypatch.setenv("PGU_PG_BIN_DIRS", str(topo.new_pg.bin_dir))
    faults.add_bench_table(topo)

    def make(**overrides):
        conf = {**demo_conf(topo), "cutover_deadline_seconds": 10, **overrides}
        upgrade = upgrade_of(topo, conf)
        for step in (upgrade.preflight, upgrade.provision_target, upgrade.configure_parameters, upgrade.install,
                     upgrade.build_group):
            step()
        deadline = time.monotonic() + 30
        while not upgrade.lag().within(upgrade.request.lag_threshold_bytes):
            assert time.monotonic() < deadline, upgrade.lag()
            time.sleep(0.2)
        return conf, upgrade

    return topo, make


def upgrade_of(topo, conf: dict) -> Upgrade:
    return Upgrade(config.validate(conf), topo.aws_client("rds"), Credentials("postgres", topo.credentials["postgres"]),
                   Credentials("replicator", topo.credentials["replicator"]),
                   probe=Credentials("prober", topo.credentials["prober"]), dbname="app")


def assert_safe(outcome: faults.Outcome, writer: str) -> None:
    assert outcome.killed, outcome
    assert outcome.writer == writer, outcome
    assert outcome.lost == 0 and outcome.duplicated == 0, outcome
    assert outcome.two_writers_seen == 0, outcome
    assert outcome.outage_s < 30, outcome
    assert outcome.acked > 100, outcome


# Killed inside the fence before the switch was sent: undone; from `switching` on: rolled forward.
@pytest.mark.parametrize("kill_at,writer", [
    ("fenced", "source"), ("caught_up", "source"), ("sequences", "source"), ("reverse_prepared", "source"),
    ("switching", "target"), ("target_unfenced", "target"), ("switched", "target"), ("reverse_started", "target"),
])
def test_cutover_killed_at_each_step_is_settled_by_the_watchdog(replicating, kill_at, writer):
    topo, make = replicating
    conf, upgrade = make()
    assert_safe(faults.run_case(topo, conf, upgrade, "cutover", kill_at, "watchdog"), writer)


@pytest.mark.parametrize("kill_at", ["caught_up", "switched"])
def test_cutover_killed_then_the_rollback_dag_returns_every_write_to_the_source(replicating, kill_at):
    topo, make = replicating
    conf, upgrade = make()
    assert_safe(faults.run_case(topo, conf, upgrade, "cutover", kill_at, "rollback"), "source")


@pytest.mark.parametrize("kill_at,writer", [("sequences", "target"), ("switched", "target")])
def test_cutover_killed_then_cleared_finishes_the_cutover(replicating, kill_at, writer):
    topo, make = replicating
    conf, upgrade = make()
    assert_safe(faults.run_case(topo, conf, upgrade, "cutover", kill_at, "clear"), writer)


@pytest.mark.parametrize("kill_at,writer", [("caught_up", "target"), ("switching", "source"), ("source_unfenced", "source")])
def test_rollback_after_cutover_killed_at_a_step_is_settled(replicating, kill_at, writer):
    topo, make = replicating
    conf, upgrade = make()
    assert_safe(faults.run_case(topo, conf, upgrade, "rollback", kill_at, "watchdog"), writer)


def test_a_rerun_cutover_after_an_undone_one_does_not_echo_its_marker(replicating):
    """Scenario 6: the reverse slot of an attempt that was undone must not be reused by the next attempt."""
    topo, make = replicating
    conf, upgrade = make()
    with closing(topo.new_pg.connect("postgres", dbname="app")) as target, target.cursor() as cursor:
        cursor.execute("SELECT pg_create_logical_replication_slot('pgu_orders_db_rev', 'pgoutput')")  # left behind
    target.close()
    upgrade.cutover("second-attempt")
    with topo.new_pg.connect("app", dbname="app") as target, target.cursor() as cursor:
        cursor.execute("INSERT INTO public.bench_log (client, seq) VALUES (7, 1)")
    target.close()
    deadline = time.monotonic() + 15
    while True:
        with topo.old_pg.connect("postgres", dbname="app") as source, source.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM public.bench_log WHERE client = 7")
            arrived = cursor.fetchone()[0]
            cursor.execute("SELECT pid IS NOT NULL FROM pg_stat_subscription WHERE subname = 'pgu_orders_db_rev'")
            apply_running = cursor.fetchone()[0]
        source.close()
        if arrived:
            break
        assert time.monotonic() < deadline, "the reverse apply did not bring the target's write back"
        time.sleep(0.2)
    assert apply_running


@pytest.mark.parametrize("step,kill_at", [("provision_target", "instance_created"),
                                          ("build_group", "subscription_created")])
def test_a_step_killed_mid_way_runs_again_without_creating_anything_twice(fresh_databases, monkeypatch, step, kill_at):
    topo = fresh_databases
    monkeypatch.setenv("PGU_PG_BIN_DIRS", str(topo.new_pg.bin_dir))
    conf = demo_conf(topo)
    upgrade = upgrade_of(topo, conf)
    steps = [upgrade.preflight, upgrade.provision_target, upgrade.configure_parameters, upgrade.install,
             upgrade.build_group]
    for earlier in steps[: [s.__name__ for s in steps].index(step)]:
        earlier()
    code = faults.run_child(faults.child_spec(topo, conf, step, kill_at, "unused"))
    assert code == -9, "the child was to die at " + kill_at
    getattr(upgrade_of(topo, conf), step)()  # the cleared task

    rds = topo.aws_client("rds")
    instances = [i["DBInstanceIdentifier"] for i in rds.describe_db_instances()["DBInstances"]]
    assert sorted(instances) == ["orders-db", "orders-db-pg17"]
    groups = [g["DBParameterGroupName"] for g in rds.describe_db_parameter_groups()["DBParameterGroups"]
              if g["DBParameterGroupName"].startswith("orders-db-pg17")]
    assert groups == ["orders-db-pg17-native"]
    if step == "build_group":
        with closing(topo.new_pg.connect("postgres", dbname="app")) as target, target.cursor() as cursor:
            cursor.execute("SELECT subname FROM pg_subscription")
            assert [r[0] for r in cursor.fetchall()] == ["pgu_orders_db_fwd"]
        deadline = time.monotonic() + 30
        while not upgrade.lag().within(upgrade.request.lag_threshold_bytes):
            assert time.monotonic() < deadline, upgrade.lag()
            time.sleep(0.2)
        with closing(topo.old_pg.connect("postgres", dbname="app")) as source, source.cursor() as cursor:
            # After the initial copy: its temporary per-table sync slots are gone by then.
            cursor.execute("SELECT slot_name FROM pg_replication_slots")
            assert [r[0] for r in cursor.fetchall()] == ["pgu_orders_db_fwd"]
        counts = []
        for server in (topo.old_pg, topo.new_pg):
            with closing(server.connect("postgres", dbname="app")) as connection, connection.cursor() as cursor:
                cursor.execute("SELECT (SELECT count(*) FROM public.orders), (SELECT count(*) FROM billing.invoices)")
                counts.append(cursor.fetchone())
        assert counts[0] == counts[1] and counts[0][0] > 0, counts  # copied once: no duplicate rows, none missing


# --- the fence cannot be bypassed -------------------------------------------------------------------------------

def app_connect(port: int, password: str, **kwargs):
    return psycopg2.connect(host="127.0.0.1", port=port, dbname="app", user="app", password=password,
                            connect_timeout=2, **kwargs)


def test_fenced_roles_cannot_write_by_any_bypass(fresh_databases):
    topo = fresh_databases
    password = topo.credentials["app"]
    held = app_connect(topo.old_pg.port, password)  # opened before the fence, mid-transaction
    held_cursor = held.cursor()
    held_cursor.execute("SET default_transaction_read_only = off")
    held_cursor.execute("INSERT INTO public.accounts (email) VALUES ('in-flight@example.com')")
    with closing(topo.old_pg.connect("postgres", dbname="app")) as admin:
        fencing.ensure_record_table(admin)
        ended = fencing.fence(admin, "app", ["app"])
        assert ended >= 1
        assert fencing.sessions_of(admin, "app", ["app"]) == []
    with pytest.raises(psycopg2.Error):
        held.commit()  # the session was ended: its transaction is gone
    for options in ("", "-c default_transaction_read_only=off"):
        with pytest.raises(psycopg2.OperationalError, match="not permitted to log in"):
            app_connect(topo.old_pg.port, password, options=options)
    with closing(topo.old_pg.connect("postgres", dbname="app")) as admin, admin.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM public.accounts WHERE email = 'in-flight@example.com'")
        assert cursor.fetchone()[0] == 0
        assert fencing.unfence(admin) == ["app"]
    ok = app_connect(topo.old_pg.port, password)
    with ok, ok.cursor() as cursor:  # unfenced: exactly as before
        cursor.execute("BEGIN READ WRITE")
        cursor.execute("INSERT INTO public.accounts (email) VALUES ('after@example.com')")
    ok.close()


def test_unfence_restores_exactly_what_the_fence_took(fresh_databases):
    topo = fresh_databases
    with closing(topo.old_pg.connect("postgres", dbname="app")) as admin, admin.cursor() as cursor:
        cursor.execute("DROP ROLE IF EXISTS dormant; CREATE ROLE dormant NOLOGIN")
        fencing.ensure_record_table(admin)
        fencing.fence(admin, "app", ["app", "dormant"])
        fencing.fence(admin, "app", ["app", "dormant"])  # again: the first record wins
        assert fencing.unfence(admin) == ["app", "dormant"]
        cursor.execute("SELECT rolname, rolcanlogin FROM pg_roles WHERE rolname IN ('app', 'dormant') ORDER BY 1")
        assert cursor.fetchall() == [("app", True), ("dormant", False)]
        cursor.execute("DROP ROLE dormant")


def test_the_fence_refuses_no_roles_a_superuser_and_an_unfenced_writer(fresh_databases):
    topo = fresh_databases
    with closing(topo.old_pg.connect("postgres", dbname="app")) as admin:
        fencing.ensure_record_table(admin)
        with pytest.raises(fencing.FenceError, match="no application role"):
            fencing.fence(admin, "app", [])
        with pytest.raises(fencing.FenceError, match="'postgres' is a superuser"):
            fencing.fence(admin, "app", ["postgres"])
        writer = topo.old_pg.connect("replicator", dbname="app", autocommit=False)  # not fenced, writing
        with writer.cursor() as cursor:
            cursor.execute("CREATE TEMP TABLE t (x int); INSERT INTO t VALUES (1)")
        with pytest.raises(fencing.FenceError, match="replicator pid"):
            fencing.fence(admin, "app", ["app"])
        writer.close()
        fencing.unfence(admin)


def test_preflight_refuses_when_no_role_can_be_fenced(replicating):
    topo, _ = replicating
    conf = {**demo_conf(topo), "application_roles": ["postgres"]}
    with pytest.raises(PreflightError, match="application_roles: role 'postgres' is a superuser"):
        upgrade_of(topo, conf).preflight()


# --- rollback edges ---------------------------------------------------------------------------------------------

def test_rollback_before_cutover_works_with_the_target_down(replicating):
    topo, make = replicating
    _, upgrade = make()
    upgrade.shift(50)
    topo.new_pg.stop()
    try:
        result = upgrade.rollback("target-down")
    finally:
        topo.new_pg.ensure_running()
    assert result["after_cutover"] is False and result["writer"] == "source"
    assert topo.haproxy.get_weight("pg_read", "target") == 0


def test_detach_refuses_unless_the_target_is_the_settled_writer_and_rollback_refuses_after_it(replicating):
    topo, make = replicating
    conf, upgrade = make(decommission="delete")
    with pytest.raises(RuntimeError, match="detach refused"):
        upgrade.detach()
    upgrade.cutover("before-detach")
    upgrade.detach()
    with pytest.raises(Exception, match="detached"):
        upgrade.rollback("too-late")
    assert topo.haproxy.get_weight("pg_write", "target") == 100


def test_a_live_actor_holds_off_a_second_one(replicating):
    _, make = replicating
    _, upgrade = make()
    with upgrade.acting():
        with pytest.raises(switch_state.LockBusy):
            with upgrade.acting(wait_seconds=0.2):
                pass
