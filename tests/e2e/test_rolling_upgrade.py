"""A whole run of pgactive_rolling_upgrade (dag.test) on the local topology: 15 -> 17 with nothing lost."""

from __future__ import annotations

import threading
import time
from contextlib import closing

import psycopg2
import pytest
from psycopg2 import sql

from topology.demo import demo_conf
from topology.load import Churn

pytestmark = pytest.mark.e2e

TABLES = ["public.accounts", "public.orders", "billing.invoices", "billing.invoice_lines"]
CHURNED = "public.orders"  # Churn's table


def connect(server, user="postgres", password=None, port=None):
    return psycopg2.connect(host="127.0.0.1", port=port or server.port, dbname="app", user=user, password=password)


def table_fingerprint(connection, table: str) -> tuple[int, str]:
    schema, name = table.split(".")
    with connection.cursor() as cursor:
        cursor.execute(
            sql.SQL("SELECT count(*), md5(coalesce(string_agg(t::text, '|' ORDER BY t::text), '')) FROM {}.{} t").format(
                sql.Identifier(schema), sql.Identifier(name)
            )
        )
        return cursor.fetchone()


def seeded_ids(connection, table: str) -> set[int]:
    """Ids of the rows Churn did not insert (it deletes only those)."""
    with connection.cursor() as cursor:
        cursor.execute(sql.SQL("SELECT id FROM {}.{} WHERE note IS DISTINCT FROM 'churn'").format(
            *map(sql.Identifier, table.split("."))))
        return {row[0] for row in cursor.fetchall()}


def app_dsn(topo) -> str:
    return f"host=127.0.0.1 port={topo.haproxy.write_port} dbname=app user=app password={topo.credentials['app']}"


def sequence_values(connection) -> dict[str, int]:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT schemaname || '.' || sequencename, last_value FROM pg_sequences "
            "WHERE schemaname IN ('public', 'billing') ORDER BY 1"
        )
        return dict(cursor.fetchall())


def run_upgrade(topo, **overrides):
    """dag.test() runs tasks one at a time, so a phase gate would wait forever for the previous phase's
    check: the phases run under a real scheduler (tests/airflow_real), here the rest of the DAG runs."""
    from airflow.dag_processing.dagbag import DagBag

    dag = DagBag(dag_folder="dags").dags["pgactive_rolling_upgrade"]
    # dag.test() builds the DAG callbacks' context without the run's conf, so the required params fail there (Airflow
    # 3.3); the scheduler's dag-processor runs them with it (tests/airflow_real). Task callbacks run as usual.
    dag.on_success_callback = dag.on_failure_callback = None
    dag.has_on_success_callback = dag.has_on_failure_callback = False  # set once at the DAG's creation
    # dag.test() would wait forever at a human gate that asks: the demo conf deletes the old instance, which asks first.
    conf = {**demo_conf(topo), "shift_percentages": [], "approve_decommission": False, **overrides}
    return dag.test(run_conf=conf)


def test_whole_upgrade_moves_every_row_and_sequence_to_17(upgrade_env):
    topo = upgrade_env
    password = topo.credentials["postgres"]
    with connect(topo.old_pg, password=password) as old:
        with old.cursor() as cursor:  # writes after seeding must arrive too
            cursor.execute("INSERT INTO public.accounts (email, created_at) VALUES ('late@example.com', now())")
        old.commit()

    with Churn(app_dsn(topo), rate=300) as churn:  # a busy database all along: verify passes while writes go on
        run = run_upgrade(topo)

    states = {ti.task_id: ti.state for ti in run.get_task_instances()}
    assert run.state == "success", states
    # No approval asked for: each verification skipped its gate, and the steps after the gates ran.
    assert [states[t] for t in ("approve_cutover", "refresh_views_before_cutover", "approve_decommission",
                                "detach_old_node")] == ["skipped", "success", "skipped", "success"], states
    assert churn.committed > 1000, (churn.committed, churn.errors)
    old, new = connect(topo.old_pg, password=password), connect(topo.new_pg, password=password)
    try:
        for table in TABLES:
            if table == CHURNED:  # written on after detach_old_node, which ends replication: only the target has those
                assert seeded_ids(old, table) == seeded_ids(new, table)
                continue
            on_old, on_new = table_fingerprint(old, table), table_fingerprint(new, table)
            assert on_old == on_new, table
            assert on_old[0] > 0, table
        old_sequences, new_sequences = sequence_values(old), sequence_values(new)
        assert old_sequences and set(old_sequences) == set(new_sequences)
        for name, value in old_sequences.items():
            assert new_sequences[name] >= value, name
        with new.cursor() as cursor:
            cursor.execute("SELECT to_regnamespace('scratch')")
            assert cursor.fetchone()[0] is None, "the excluded schema must not be copied"
    finally:
        old.close()
        new.close()

    app_password = topo.credentials["app"]
    for _ in range(20):
        through_haproxy = connect(topo.old_pg, user="app", password=app_password, port=topo.haproxy.write_port)
        with through_haproxy, through_haproxy.cursor() as cursor:
            cursor.execute("SELECT current_setting('server_version_num')::int / 10000, inet_server_port()")
            assert cursor.fetchone() == (17, topo.new_pg.port)
            cursor.execute("INSERT INTO public.accounts (email, created_at) VALUES (%s, now())", (f"new{_}@example.com",))
        through_haproxy.close()

    rds = topo.aws_client("rds")
    remaining = [i["DBInstanceIdentifier"] for i in rds.describe_db_instances()["DBInstances"]]
    assert "orders-db" not in remaining and "orders-db-pg17" in remaining
    snapshots = rds.describe_db_snapshots(DBInstanceIdentifier="orders-db", SnapshotType="manual")["DBSnapshots"]
    finals = [s for s in snapshots if s["DBSnapshotIdentifier"].startswith("orders-db-final-")]
    assert [s["Status"] for s in finals] == ["available"], snapshots


def test_table_without_primary_key_stops_the_run_before_anything_changes(upgrade_env):
    topo = upgrade_env
    run = run_upgrade(topo, exclude_schemas=[])

    states = {ti.task_id: ti.state for ti in run.get_task_instances()}
    assert run.state == "failed"
    assert states["preflight"] == "failed"
    assert states["provision_target"] in ("upstream_failed", None)
    rds = topo.aws_client("rds")
    assert [i["DBInstanceIdentifier"] for i in rds.describe_db_instances()["DBInstances"]] == ["orders-db"]


def test_a_row_changed_on_the_target_stops_the_run_before_cutover_naming_its_table(upgrade_env, capfd):
    topo = upgrade_env
    tampered = threading.Event()

    def change_a_row_behind_replication() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not tampered.is_set():
            try:
                with connect(topo.new_pg, password=topo.credentials["postgres"]) as target, target.cursor() as cursor:
                    cursor.execute("SELECT count(*) = 0 FROM pg_subscription_rel WHERE srsubstate <> 'r'")
                    copied = cursor.fetchone()[0]
                    cursor.execute("SELECT 1 FROM pg_subscription")
                    if copied and cursor.fetchone():
                        cursor.execute("UPDATE billing.invoices SET total = total + 1 WHERE id = 3")
                        tampered.set()
            except psycopg2.Error:
                pass  # the schema is not there yet
            time.sleep(0.05)

    tamper = threading.Thread(target=change_a_row_behind_replication, daemon=True)
    tamper.start()
    with Churn(app_dsn(topo), rate=300):
        run = run_upgrade(topo)
    tamper.join(timeout=5)

    states = {ti.task_id: ti.state for ti in run.get_task_instances()}
    assert tampered.is_set()
    assert run.state == "failed", states
    assert states["verify_before_cutover"] == "failed", states
    assert states["cutover"] == "upstream_failed", states
    output = capfd.readouterr()
    assert "billing.invoices: 1 row(s) differ in key range id from start to end (e.g. 3)" in output.out + output.err
    with connect(topo.old_pg, user="app", password=topo.credentials["app"], port=topo.haproxy.write_port) as app:
        with app.cursor() as cursor:
            cursor.execute("SELECT inet_server_port()")
            assert cursor.fetchone()[0] == topo.old_pg.port, "no cutover: writes stay on the source"


CATALOG = {
    "relations": "SELECT n.nspname, c.relname, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                 "WHERE n.nspname NOT LIKE 'pg\\_%' ORDER BY 1, 2",
    "roles": "SELECT rolname, rolcanlogin, rolconfig::text FROM pg_roles ORDER BY 1",
    "extensions": "SELECT extname, extversion FROM pg_extension ORDER BY 1",
    "publications": "SELECT pubname FROM pg_publication ORDER BY 1",
    "subscriptions": "SELECT subname FROM pg_subscription ORDER BY 1",
    "slots": "SELECT slot_name FROM pg_replication_slots ORDER BY 1",
    "databases": "SELECT datname FROM pg_database ORDER BY 1",
    "role_settings": "SELECT setdatabase, setrole, setconfig::text FROM pg_db_role_setting ORDER BY 1, 2",
}


ROW_COUNTS = ("SELECT schemaname, relname, (xpath('/row/c/text()', query_to_xml(format('SELECT count(*) AS c FROM %I.%I', "
              "schemaname, relname), false, true, '')))[1]::text FROM pg_stat_user_tables ORDER BY 1, 2")


def catalog_snapshot(server, password) -> dict:
    snapshot = {}
    for dbname in ("app", "postgres"):
        with closing(psycopg2.connect(host="127.0.0.1", port=server.port, dbname=dbname, user="postgres",
                                      password=password)) as connection, connection.cursor() as cursor:
            for name, statement in CATALOG.items():
                cursor.execute(statement)
                snapshot[f"{dbname}.{name}"] = cursor.fetchall()
            cursor.execute(ROW_COUNTS)
            snapshot[f"{dbname}.rows"] = cursor.fetchall()
    return snapshot


def aws_snapshot(topo) -> dict:
    rds = topo.aws_client("rds")
    groups = rds.describe_db_parameter_groups()["DBParameterGroups"]
    return {
        # LatestRestorableTime: "now" as moto computes it at each call, not a change
        "instances": [{k: v for k, v in i.items() if k != "LatestRestorableTime"}
                      for i in rds.describe_db_instances()["DBInstances"]],
        "groups": groups,
        "parameters": {g["DBParameterGroupName"]: rds.describe_db_parameters(
            DBParameterGroupName=g["DBParameterGroupName"], Source="user")["Parameters"] for g in groups},
        "snapshots": rds.describe_db_snapshots()["DBSnapshots"],
    }


def haproxy_weights(topo) -> dict:
    return {(backend, server): topo.haproxy.get_weight(backend, server)
            for backend in ("pg_write", "pg_read") for server in ("source", "target")}


def test_plan_only_prints_the_plan_and_changes_nothing(upgrade_env, capfd):
    topo = upgrade_env
    password = topo.credentials["postgres"]
    from airflow.models import Variable
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with closing(psycopg2.connect(app_dsn(topo))) as app:  # a session the cutover's fence would end
        app.autocommit = True
        with app.cursor() as cursor:
            cursor.execute("SELECT 1")
        before = (aws_snapshot(topo), catalog_snapshot(topo.old_pg, password), catalog_snapshot(topo.new_pg, password),
                  haproxy_weights(topo))

        run = run_upgrade(topo, plan_only=True, shift_percentages=[25, 50, 100])

        after = (aws_snapshot(topo), catalog_snapshot(topo.old_pg, password), catalog_snapshot(topo.new_pg, password),
                 haproxy_weights(topo))
    states = {ti.task_id: ti.state for ti in run.get_task_instances()}
    assert run.state == "success", states
    assert {k: v for k, v in states.items() if v != "skipped"} == {
        "validate_request": "success", "preflight": "success"}, states
    for name, was, now in zip(("moto", "source catalog", "target catalog", "HAProxy weights"), before, after):
        for part in was:
            assert now[part] == was[part], f"plan_only changed {name}: {part}"
    assert Variable.get("pgactive_upgrade__orders-db", default_var=None) is None, "a plan records no upgrade"

    with create_session() as session:
        row = session.scalars(XComModel.get_many(run_id=run.run_id, dag_ids=run.dag_id, task_ids="preflight",
                                                 key="plan")).first()
        plan = XComModel.deserialize_value(row)
    assert plan["plan_only"] is True and plan["preflight"]["blocking"] == []
    actions = {(r["kind"], r["name"]): r["action"] for r in plan["resources"]}
    assert actions[("DB instance", "orders-db-pg17")] == "create"
    assert actions[("DB parameter group", "orders-db-pg17-native")] == "create"
    assert actions[("DB instance", "orders-db")] == "delete"  # the demo conf decommissions the source
    assert [r["role"] for r in plan["reboots"]] == ["source"]
    assert [(p["percent"], p["routes"]) for p in plan["phases"]] == [(25, ["pg_read"]), (50, ["pg_read"]),
                                                                    (100, ["pg_read"])]
    assert plan["cutover"]["fence_roles"] == ["app"]
    assert any(s.startswith("app pid ") for s in plan["cutover"]["sessions_ended_now"]), plan["cutover"]
    estimate = plan["copy_estimate"]
    assert estimate["tables"] == 4 and estimate["bytes"] > 0 and estimate["seconds"] >= 1
    assert len(plan["rollback"]) >= 6
    output = capfd.readouterr()
    assert "PLAN for orders-db" in output.out + output.err
    assert "Nothing was created, changed or rebooted" in output.out + output.err
