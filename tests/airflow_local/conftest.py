import os
import time
from pathlib import Path

import pytest

from topology.airflow_local import LocalAirflow

REPO_ROOT = Path(__file__).resolve().parents[2]
AIRFLOW_TEST_PORT = int(os.environ.get("PGU_TEST_BASE", "26400")) + 80

PROBE_DAG = '''
import time
from datetime import timedelta

from airflow.providers.standard.operators.python import PythonOperator
from airflow.providers.standard.sensors.time_delta import WaitSensor
from airflow.sdk import DAG

with DAG(dag_id="deferral_probe", schedule=None, catchup=False) as dag:
    hello = PythonOperator(task_id="hello", python_callable=lambda: print("hello"))
    # WaitSensor measures from the task's start, so it always defers (TimeDeltaSensor measures from
    # the run's start and returns at once without deferring when the scheduler was slow).
    wait = WaitSensor(task_id="wait", time_to_wait=timedelta(seconds=3), deferrable=True)
    hello >> wait

with DAG(dag_id="long_task", schedule=None, catchup=False) as dag:
    PythonOperator(task_id="sleep", python_callable=lambda: time.sleep(600))
'''


def pytest_configure(config):
    config.addinivalue_line("markers", "airflow: needs a real local Airflow (api-server, scheduler, triggerer)")


@pytest.fixture(scope="module")
def airflow_dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("airflow_local")
    dags, plugins = base / "dags", base / "plugins"
    dags.mkdir()
    plugins.mkdir()
    (dags / "probe_dags.py").write_text(PROBE_DAG)
    return base / "home", dags, plugins


@pytest.fixture(scope="module")
def local_airflow(airflow_dirs):
    home, dags, plugins = airflow_dirs
    airflow = LocalAirflow(
        home=home, dags_folder=dags, plugins_folder=plugins, port=AIRFLOW_TEST_PORT,
        python_paths=[REPO_ROOT / "include", REPO_ROOT],
    )
    started = time.monotonic()
    airflow.start(timeout=180)
    print(f"\nLocalAirflow fresh start: {time.monotonic() - started:.1f}s")
    yield airflow
    airflow.stop()
