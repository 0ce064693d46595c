"""The whole upgrade DAG with README's fleet setting: the scheduler starts its LocalExecutor workers from a forkserver
that preloads `pgactive_upgrade.airflow.preload`, so each task process inherits the providers' hooks, boto3 and
psycopg2 instead of importing them.

This module's Airflow is its own (another port and home than the package's shared one).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.airflow_real.runs import run_whole_upgrade
from topology.airflow_local import PRELOAD_SETTINGS, LocalAirflow
from topology.procs import pid_cmdline

pytestmark = [pytest.mark.integration, pytest.mark.airflow]

REPO = Path(__file__).resolve().parents[2]
PRELOAD = PRELOAD_SETTINGS["AIRFLOW__SCHEDULER__MP_FORKSERVER_PRELOAD"]


@pytest.fixture(scope="module")
def preloading_airflow(topology, tmp_path_factory):
    topology.up()
    instance = LocalAirflow(
        home=tmp_path_factory.mktemp("airflow_preload") / "home",
        dags_folder=REPO / "dags",
        plugins_folder=REPO / "plugins",
        port=topology.ports.airflow_api + 3,  # the shared Airflow has + 1, the Celery one + 2
        extra_env={**topology.airflow_connections_env(), "PGU_PG_BIN_DIRS": str(topology.new_pg.bin_dir),
                   **PRELOAD_SETTINGS},
        python_paths=[REPO / "include", REPO],
    )
    try:
        instance.start(timeout=300)
        yield instance
    finally:
        instance.stop()


def test_whole_upgrade_runs_in_task_processes_forked_from_the_preloading_forkserver(preloading_airflow,
                                                                                    fresh_databases):
    airflow, topo = preloading_airflow, fresh_databases
    run_whole_upgrade(airflow, topo, "with the forkserver preload")

    scheduler_log = airflow.log_path("scheduler").read_text(errors="replace")
    assert f"Set forkserver preload modules for scheduler: ['{PRELOAD}']" in scheduler_log
    workers = [pid for pid in airflow.processes() if "LocalExecutor" in pid_cmdline(pid)]
    assert workers, "the LocalExecutor's workers are alive while the scheduler runs"
    for parent in {parent_of(pid) for pid in workers}:
        parent_cmdline = pid_cmdline(parent)
        assert "multiprocessing.forkserver" in parent_cmdline and PRELOAD in parent_cmdline, parent_cmdline


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
