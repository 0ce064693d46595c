"""The whole upgrade DAG with README's fleet setting: the scheduler starts its LocalExecutor workers from a forkserver
that preloads `pgactive_upgrade.airflow.preload`, so each task process inherits the providers' hooks, boto3 and
psycopg2 instead of importing them.

This module's Airflow is its own (another port and home than the package's shared one).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.airflow_real.runs import UPGRADE, run_whole_upgrade
from tests.conftest import reset_topology
from topology.airflow_local import FLEET_SETTINGS, LocalAirflow
from topology.procs import pid_cmdline

pytestmark = [pytest.mark.integration, pytest.mark.airflow]

REPO = Path(__file__).resolve().parents[2]
PRELOAD = FLEET_SETTINGS["AIRFLOW__SCHEDULER__MP_FORKSERVER_PRELOAD"]


@pytest.fixture(scope="module")
def preloading_airflow(topology, tmp_path_factory):
    topology.up()
    instance = LocalAirflow(
        home=tmp_path_factory.mktemp("airflow_preload") / "home",
        dags_folder=REPO / "dags",
        plugins_folder=REPO / "plugins",
        port=topology.ports.airflow_api + 3,  # the shared Airflow has + 1, the Celery one + 2
        extra_env={**topology.airflow_connections_env(), "PGU_PG_BIN_DIRS": str(topology.new_pg.bin_dir),
                   **FLEET_SETTINGS},
        python_paths=[REPO / "include", REPO],
    )
    try:
        instance.start(timeout=300)
        yield instance
    finally:
        instance.stop()


@pytest.fixture(scope="module")
def whole_run(preloading_airflow, topology) -> list[dict]:
    """One whole upgrade on this Airflow; the task instances that ran."""
    return run_whole_upgrade(preloading_airflow, reset_topology(topology), "with the forkserver preload")


def test_whole_upgrade_runs_in_task_processes_forked_from_the_preloading_forkserver(preloading_airflow, whole_run):
    airflow = preloading_airflow

    scheduler_log = airflow.log_path("scheduler").read_text(errors="replace")
    assert f"Set forkserver preload modules for scheduler: ['{PRELOAD}']" in scheduler_log
    workers = [pid for pid in airflow.processes() if "LocalExecutor" in pid_cmdline(pid)]
    assert workers, "the LocalExecutor's workers are alive while the scheduler runs"
    for parent in {parent_of(pid) for pid in workers}:
        parent_cmdline = pid_cmdline(parent)
        assert "multiprocessing.forkserver" in parent_cmdline and PRELOAD in parent_cmdline, parent_cmdline


# The steps after configure_parameters connect to the instances it recorded: none of them makes an AWS client (the
# demo's traffic goes through HAProxy, so no Route 53 client either), which a fleet's task starts and RDS API spare.
RECORDED_STEPS = {"install_extension", "init_replication_group.build_replication", "wait_for_sync", "prepare_target",
                  "traffic_phase.shift", "traffic_phase.health_check", "verify_before_cutover",
                  "refresh_views_before_cutover", "cutover", "cutover_watchdog", "verify"}
AWS_CLIENT_MADE = "AWS Connection (conn_id='pgu_aws'"  # the provider's hook logs it as it builds a client


def test_steps_after_configure_make_no_aws_client(preloading_airflow, whole_run):
    airflow, ran = preloading_airflow, whole_run

    def log_of(ti: dict) -> str:
        return str(airflow.task_log(UPGRADE, ti["dag_run_id"], ti["task_id"], ti["try_number"], map_index=ti["map_index"]))

    assert AWS_CLIENT_MADE in log_of(next(ti for ti in ran if ti["task_id"] == "configure_parameters"))
    checked = [ti for ti in ran if ti["task_id"] in RECORDED_STEPS]
    assert {ti["task_id"] for ti in checked} == RECORDED_STEPS
    assert [ti["task_id"] for ti in checked if AWS_CLIENT_MADE in log_of(ti)] == []


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
