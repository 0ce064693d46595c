"""The whole upgrade DAG on the Celery executor: a real `airflow celery worker`, Redis as its broker, and a
PostgreSQL metadata database (which also holds Celery's results) instead of SQLite and the LocalExecutor.

This module's Airflow is its own (another port, home and metadata database than the package's shared one).
"""

from __future__ import annotations

from pathlib import Path

import psycopg2
import pytest

from tests.airflow_real.runs import run_whole_upgrade
from topology.airflow_local import LocalAirflow
from topology.airflow_metadb import drop_metadata_db, provision_metadata_db

pytestmark = [pytest.mark.integration, pytest.mark.airflow]

REPO = Path(__file__).resolve().parents[2]
WORKLOAD_LOGGED = "Executing workload in Celery"


@pytest.fixture(scope="module")
def celery_airflow(topology, tmp_path_factory):
    topology.up()
    metadata_db = provision_metadata_db(topology.new_pg, topology.state_dir)
    instance = LocalAirflow(
        home=tmp_path_factory.mktemp("airflow_celery") / "home",
        dags_folder=REPO / "dags",
        plugins_folder=REPO / "plugins",
        port=topology.ports.airflow_api + 2,  # the package's shared Airflow has + 1
        extra_env={**topology.airflow_connections_env(), "PGU_PG_BIN_DIRS": str(topology.new_pg.bin_dir)},
        python_paths=[REPO / "include", REPO],
        metadata_db=metadata_db,
        celery_broker_port=topology.ports.redis,
    )
    try:
        instance.start(timeout=300)
        yield instance
    finally:
        instance.stop()
        drop_metadata_db(topology.new_pg)
    assert not instance.processes() and not instance.redis.is_running(), "stop() leaves nothing running"


def test_whole_upgrade_runs_on_a_celery_worker_and_moves_every_row(celery_airflow, fresh_databases):
    airflow, topo = celery_airflow, fresh_databases
    ran = run_whole_upgrade(airflow, topo, "on the Celery executor")
    assert_each_ran_on_the_celery_worker(airflow, ran)
    assert celery_results(airflow) >= len(ran), "Celery recorded a result for every task it ran"
    assert_metadata_password_in_no_log(airflow)


def assert_each_ran_on_the_celery_worker(airflow: LocalAirflow, task_instances: list[dict]) -> None:
    worker_log = airflow.log_path("celery-worker").read_text(errors="replace")
    received = [line for line in worker_log.splitlines() if WORKLOAD_LOGGED in line]
    missing = [f"{ti['task_id']}[{ti['map_index']}]" for ti in task_instances
               if not any(ti["id"] in line for line in received)]
    assert not missing, f"not run by the Celery worker: {missing}"
    assert {ti["queue"] for ti in task_instances} == {"default"}, "Celery's default queue"


def celery_results(airflow: LocalAirflow) -> int:
    """Rows of Celery's result backend (its table in the metadata database) for tasks that succeeded."""
    db = airflow.metadata_db
    connection = psycopg2.connect(host=db.host, port=db.port, dbname=db.dbname, user=db.user, password=db.password)
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM celery_taskmeta WHERE status = 'SUCCESS'")
            return cursor.fetchone()[0]
    finally:
        connection.close()


def assert_metadata_password_in_no_log(airflow: LocalAirflow) -> None:
    password = airflow.metadata_db.password.encode()
    logs = [*airflow.run_dir.glob("*.log"), *(airflow.home / "logs").rglob("*"), airflow.redis.log_file]
    leaked = [str(path) for path in logs if path.is_file() and password in path.read_bytes()]
    assert not leaked, f"the metadata database password is in {leaked}"
