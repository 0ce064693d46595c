"""A whole run with both servers logging every statement leaves no password anywhere; a conf that reaches outside the
deployment (another host, another connection, another source) is refused before anything is touched."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import pytest

from pgactive_upgrade import progress
from tests.e2e.test_rolling_upgrade import connect, run_upgrade

pytestmark = pytest.mark.e2e

SECRET_ROLES = ("postgres", "replicator", "prober")  # the admin, replication and probe passwords


def secrets_of(topo) -> dict[str, str]:
    return {role: topo.credentials[role] for role in SECRET_ROLES}


def found_in(text: str, secrets: dict[str, str]) -> list[str]:
    return [role for role, secret in secrets.items() if secret in text]


def set_on_both(topo, statement: str) -> None:
    for server in (topo.old_pg, topo.new_pg):
        connection = connect(server, password=topo.credentials["postgres"])
        connection.autocommit = True  # ALTER SYSTEM runs outside a transaction block
        try:
            with connection.cursor() as cursor:
                cursor.execute(statement)
                cursor.execute("SELECT pg_reload_conf()")
        finally:
            connection.close()


@pytest.fixture
def logging_every_statement(upgrade_env):
    topo = upgrade_env
    set_on_both(topo, "ALTER SYSTEM SET log_statement = 'all'")
    offsets = {server.name: Path(server.log_file).stat().st_size for server in (topo.old_pg, topo.new_pg)}
    yield topo, offsets
    set_on_both(topo, "ALTER SYSTEM RESET log_statement")


def metadata_dump() -> dict[str, str]:
    """Every row of every table of Airflow's metadata database, as text."""
    from sqlalchemy import MetaData, select

    from airflow import settings

    metadata = MetaData()
    metadata.reflect(bind=settings.engine)
    dump = {}
    with settings.engine.connect() as connection:
        for table in metadata.sorted_tables:
            rows = connection.execute(select(table)).fetchall()
            dump[table.name] = "\n".join(repr(tuple(row)) for row in rows)
    return dump


def files_under(directory: Path) -> dict[str, bytes]:
    return {str(path): path.read_bytes() for path in directory.rglob("*") if path.is_file()}


def test_no_password_reaches_a_server_log_a_task_log_xcom_the_metadata_database_or_the_progress_record(
        logging_every_statement, capfd):
    topo, offsets = logging_every_statement
    secrets = secrets_of(topo)
    run = run_upgrade(topo, shift_percentages=[100],
                      health_probes=["SELECT count(*) FROM billing.invoices WHERE id < 100"])
    states = {ti.task_id: ti.state for ti in run.get_task_instances()}
    assert run.state == "success", states
    output = capfd.readouterr()
    task_logs = output.out + output.err

    for server in (topo.old_pg, topo.new_pg):
        with open(server.log_file, "rb") as log:
            log.seek(offsets[server.name])
            written = log.read().decode(errors="replace")
        assert written.count("statement: ") > 50, f"{server.name}: the server logged the run's statements"
        assert not found_in(written, secrets), f"{server.name}'s log holds a password"
        assert "CREATE SUBSCRIPTION" not in written, f"{server.name}: the subscription (with its password) was kept out"
    with open(topo.old_pg.log_file, "rb") as log:
        log.seek(offsets[topo.old_pg.name])
        old_log = log.read().decode(errors="replace")
    assert "CREATE PUBLICATION" in old_log, "DDL of the run was logged"

    assert "health_checked" in task_logs and "phase_shifted" in task_logs, "the phase and its probes ran"
    assert not found_in(task_logs, secrets), "a task log holds a password"

    dump = metadata_dump()
    assert dump.get("xcom"), "the run's XCom is in the dump"
    assert "health_probes" in dump["dag_run"], "the run's conf is in the dump"
    leaks = {table: found_in(text, secrets) for table, text in dump.items() if found_in(text, secrets)}
    assert not leaks, f"metadata tables hold a password: {leaks}"
    home = Path(os.environ["AIRFLOW_HOME"])
    leaking_files = [path for path, content in files_under(home).items()
                     if any(secret.encode() in content for secret in secrets.values())]
    assert not leaking_files, f"files under AIRFLOW_HOME (logs, the SQLite metadata database) hold a password: {leaking_files}"

    from airflow.models import Variable

    record = Variable.get(progress.record_key("orders-db"))
    assert '"cut_over"' in record
    assert not found_in(record, secrets), "the progress record holds a password"


class Listener:
    """A server on a loopback address the deployment does not list: counts who connects to it."""

    def __init__(self, host: str = "127.0.0.2"):
        self.socket = socket.create_server((host, 0))
        self.address = f"{host}:{self.socket.getsockname()[1]}"
        self.accepted = 0
        self.socket.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self.socket.accept()
            except OSError:
                continue
            self.accepted += 1
            connection.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.socket.close()


@pytest.fixture
def listener():
    server = Listener()
    yield server
    server.close()


ATTACKS = {
    "endpoint override to an unlisted host": (lambda topo, listener: {"endpoint_overrides": {
        **topo.endpoint_overrides(), "orders-db": listener.address}}, "endpoint_overrides.orders-db: '127.0.0.2:"),
    "another admin connection": (lambda topo, listener: {"db_conn_id": "pgu_replication"},
                                 "db_conn_id: 'pgu_replication' is not allowed"),
    "another AWS account": (lambda topo, listener: {"aws_conn_id": "pgu_aws_other"},
                            "aws_conn_id: 'pgu_aws_other' is not allowed"),
    "probes as the admin": (lambda topo, listener: {"probe_conn_id": "pgu_db_admin"},
                            "probe_conn_id: 'pgu_db_admin' is not allowed"),
    "an unlisted source": (lambda topo, listener: {"source_instance": "payroll-db"},
                           "source_instance: 'payroll-db' is not an allowed source"),
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_a_conf_reaching_outside_the_deployment_is_refused_before_anything(attack, upgrade_env, listener, capfd,
                                                                            monkeypatch):
    topo = upgrade_env
    rds = topo.aws_client("rds")
    rds.create_db_instance(DBInstanceIdentifier="payroll-db", Engine="postgres", EngineVersion="15.8",
                           DBInstanceClass="db.t3.micro", AllocatedStorage=20, MasterUsername="postgres",
                           MasterUserPassword="payroll-password")
    monkeypatch.setenv("AIRFLOW_CONN_PGU_AWS_OTHER", '{"conn_type": "aws", "login": "x", "password": "y", '
                       f'"extra": {{"endpoint_url": "http://{listener.address}", "region_name": "us-east-1"}}}}')
    instances_before = sorted(i["DBInstanceIdentifier"] for i in rds.describe_db_instances()["DBInstances"])
    conf, refusal = ATTACKS[attack]

    run = run_upgrade(topo, **conf(topo, listener))

    states = {ti.task_id: ti.state for ti in run.get_task_instances()}
    assert run.state == "failed" and states["validate_request"] == "failed", states
    assert states["preflight"] in ("upstream_failed", None), states
    output = capfd.readouterr()
    assert refusal in output.out + output.err
    assert listener.accepted == 0, "nothing connected to the unlisted address"
    assert sorted(i["DBInstanceIdentifier"] for i in rds.describe_db_instances()["DBInstances"]) == instances_before
