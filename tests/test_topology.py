import json
import time

import psycopg2
import pytest

from pgactive_upgrade.deployment import parse
from topology.procs import pid_alive, port_open

pytestmark = pytest.mark.integration

TABLES = ("public.accounts", "public.orders", "billing.invoices", "billing.invoice_lines", "scratch.import_log")


def query_one(server, query, user="postgres", dbname="postgres", params=None):
    connection = server.connect(user=user, dbname=dbname)
    try:
        with connection.cursor() as cursor:
            cursor.execute(query, params)
            return cursor.fetchone()
    finally:
        connection.close()


def table_counts(server):
    connection = server.connect(dbname="app")
    try:
        with connection.cursor() as cursor:
            counts = {}
            for table in TABLES:
                cursor.execute(f"SELECT count(*) FROM {table}")
                counts[table] = cursor.fetchone()[0]
            return counts
    finally:
        connection.close()


def test_up_twice_is_harmless_and_fast(topology):
    pids_before = topology.pids()
    started = time.monotonic()
    topology.up().up()
    elapsed = time.monotonic() - started

    assert topology.pids() == pids_before
    assert all(pids_before.values())
    assert elapsed < 2.0


def test_servers_run_the_expected_major_versions(topology):
    old_version = int(query_one(topology.old_pg, "SHOW server_version_num")[0])
    new_version = int(query_one(topology.new_pg, "SHOW server_version_num")[0])

    assert (old_version // 10000, topology.old_pg.major) == (15, 15)
    assert (new_version // 10000, topology.new_pg.major) == (17, 17)
    assert query_one(topology.old_pg, "SHOW wal_level") == ("logical",)
    assert query_one(topology.new_pg, "SHOW track_commit_timestamp") == ("on",)


@pytest.mark.parametrize("server_name", ["old_pg", "new_pg"])
def test_roles_are_not_superusers_and_replicator_may_replicate(topology, server_name):
    server = getattr(topology, server_name)
    attributes = {
        role: query_one(server, "SELECT rolsuper, rolreplication, rolcanlogin FROM pg_roles WHERE rolname = %s",
                        params=(role,))
        for role in ("replicator", "app")
    }

    assert attributes == {"replicator": (False, True, True), "app": (False, False, True)}
    assert query_one(server, "SELECT current_user", user="replicator") == ("replicator",)


def test_password_is_required(topology):
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        psycopg2.connect(host="127.0.0.1", port=topology.old_pg.port, user="app", password="wrong", dbname="postgres")


def test_haproxy_routes_to_old_server_by_default_and_follows_weights(fresh_databases):
    topology = fresh_databases
    haproxy = topology.haproxy

    assert {topology.port_behind(haproxy.write_port) for _ in range(6)} == {topology.old_pg.port}
    assert {topology.port_behind(haproxy.read_port) for _ in range(6)} == {topology.old_pg.port}

    haproxy.set_weight("pg_write", "source", 0)
    haproxy.set_weight("pg_write", "target", 100)
    try:
        assert {topology.port_behind(haproxy.write_port) for _ in range(6)} == {topology.new_pg.port}
        assert {topology.port_behind(haproxy.read_port) for _ in range(6)} == {topology.old_pg.port}
    finally:
        haproxy.reset_weights()
    assert haproxy.get_weight("pg_write", "target") == 0


def test_moto_describes_the_seeded_source_instance(fresh_databases):
    topology = fresh_databases
    rds = topology.aws_client("rds")

    instance = rds.describe_db_instances(DBInstanceIdentifier="orders-db")["DBInstances"][0]

    assert (instance["Engine"], instance["EngineVersion"], instance["DBInstanceClass"]) == (
        "postgres", "15.8", "db.t3.medium")
    assert (instance["AllocatedStorage"], instance["MasterUsername"], instance["DBName"]) == (100, "postgres", "app")
    assert instance["DBSubnetGroup"]["DBSubnetGroupName"] == "app-subnets"
    assert [g["VpcSecurityGroupId"] for g in instance["VpcSecurityGroups"]] == topology.aws_seed["security_group_ids"]
    assert topology.seed_aws() == topology.aws_seed


def test_seed_is_idempotent(fresh_databases):
    topology = fresh_databases
    first = table_counts(topology.old_pg)
    topology.seed_database(rows=2000)
    second = table_counts(topology.old_pg)

    assert first == second
    assert second["public.orders"] >= 900 and second["scratch.import_log"] >= 10
    accounts_seq = query_one(topology.old_pg, "SELECT last_value FROM accounts_id_seq", dbname="app")[0]
    assert accounts_seq > second["public.accounts"]
    assert query_one(topology.old_pg, "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                     "WHERE nspname IN ('public', 'billing', 'scratch') AND pg_get_userbyid(relowner) <> 'app'",
                     dbname="app") == (0,)
    assert query_one(topology.new_pg, "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'app'") == (
        "app",)
    assert query_one(topology.new_pg, "SELECT count(*) FROM pg_tables WHERE schemaname NOT IN "
                     "('pg_catalog', 'information_schema')", dbname="app") == (0,)


def test_replicator_can_feed_a_subscription_and_reseed_cleans_it_up(fresh_databases):
    topology = fresh_databases
    old, new = topology.old_pg, topology.new_pg
    publisher = old.connect(user="app", dbname="app")
    publisher.cursor().execute("CREATE PUBLICATION accounts_pub FOR TABLE public.accounts")
    publisher.close()
    subscriber = new.connect(dbname="app")
    with subscriber.cursor() as cursor:
        cursor.execute("CREATE TABLE public.accounts (id bigint PRIMARY KEY, email text, created_at timestamptz)")
        cursor.execute("CREATE SUBSCRIPTION accounts_sub CONNECTION %s PUBLICATION accounts_pub",
                       (old.dsn(user="replicator", dbname="app"),))
    subscriber.close()

    expected = table_counts(old)["public.accounts"]
    deadline = time.monotonic() + 20
    while query_one(new, "SELECT count(*) FROM public.accounts", dbname="app")[0] != expected:
        assert time.monotonic() < deadline, "initial copy did not finish"
        time.sleep(0.1)

    topology.seed_database(rows=2000)

    assert query_one(old, "SELECT count(*) FROM pg_replication_slots") == (0,)
    assert query_one(new, "SELECT count(*) FROM pg_subscription") == (0,)


def test_airflow_connections_and_endpoint_overrides(topology):
    env = topology.airflow_connections_env()

    assert set(env) == {"AIRFLOW_CONN_PGU_AWS", "AIRFLOW_CONN_PGU_DB_ADMIN", "AIRFLOW_CONN_PGU_REPLICATION",
                        "AIRFLOW_CONN_PGU_PROBE", "AIRFLOW_VAR_PGACTIVE_UPGRADE_DEPLOYMENT"}
    deployment = parse(env["AIRFLOW_VAR_PGACTIVE_UPGRADE_DEPLOYMENT"])
    assert deployment.local_only_no_tls and deployment.endpoint_override_targets == ("127.0.0.1:*",)
    assert json.loads(env["AIRFLOW_CONN_PGU_PROBE"])["login"] == "prober"
    assert topology.moto_url in env["AIRFLOW_CONN_PGU_AWS"]
    assert topology.endpoint_overrides() == {
        "orders-db": f"127.0.0.1:{topology.old_pg.port}",
        "orders-db-pg17": f"127.0.0.1:{topology.new_pg.port}",
    }


def test_down_leaves_no_process_and_up_restores(topology):
    pids = topology.pids()
    ports = [topology.old_pg.port, topology.new_pg.port, topology.ports.moto, topology.haproxy.write_port,
             topology.haproxy.read_port, topology.haproxy.runtime_port]

    topology.down()
    topology.down()

    assert [pid for pid in pids.values() if pid_alive(pid)] == []
    assert [port for port in ports if port_open(port)] == []
    assert not any(topology.pids().values())

    topology.up()
    assert all(topology.pids().values())
