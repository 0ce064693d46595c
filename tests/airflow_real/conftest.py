"""One real local Airflow (api-server, scheduler, triggerer, dag-processor) for the tests in this folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.airflow_real.runs import forget_earlier_upgrades
from topology.airflow_local import LocalAirflow

REPO = Path(__file__).resolve().parents[2]
SENSOR_DAG = '''
from datetime import datetime
from airflow.sdk import DAG
from pgactive_upgrade.airflow.operators import WaitForSyncSensor
from pgactive_upgrade.airflow.params import upgrade_params

with DAG(dag_id="sync_sensor_probe", schedule=None, start_date=datetime(2025, 1, 1), params=upgrade_params()):
    WaitForSyncSensor(task_id="wait_for_sync", timeout=300, poll_interval=1)
'''


@pytest.fixture(scope="package")
def airflow(topology, tmp_path_factory):
    base = tmp_path_factory.mktemp("airflow_real")
    dags, plugins = base / "dags", base / "plugins"
    dags.mkdir()
    plugins.mkdir()
    (dags / "sync_sensor_probe.py").write_text(SENSOR_DAG)
    for dag_file in (REPO / "dags").glob("*.py"):
        (dags / dag_file.name).symlink_to(dag_file)
    for plugin_file in (REPO / "plugins").glob("*.py"):
        (plugins / plugin_file.name).symlink_to(plugin_file)
    instance = LocalAirflow(
        home=base / "home",
        dags_folder=dags,
        plugins_folder=plugins,
        port=topology.ports.airflow_api + 1,
        extra_env={**topology.airflow_connections_env(), "PGU_PG_BIN_DIRS": str(topology.new_pg.bin_dir)},
        python_paths=[REPO / "include", REPO],
    )
    instance.start(timeout=180)
    yield instance
    instance.stop()


@pytest.fixture
def ready(airflow, fresh_databases):
    """Both DAGs parsed and unpaused, fresh databases, and no record of an earlier test's upgrade."""
    airflow.wait_for_dag("pgactive_rolling_upgrade")
    airflow.wait_for_dag("pgactive_upgrade_rollback")
    forget_earlier_upgrades(airflow)
    return airflow, fresh_databases
