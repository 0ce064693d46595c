"""Under a real api-server, scheduler and triggerer: the deferrable sync sensor, and conf refused at trigger."""

from __future__ import annotations

import time

import pytest

from pgactive_upgrade.db import Credentials
from pgactive_upgrade import config
from pgactive_upgrade.upgrade import Upgrade
from tests.airflow_real.runs import wait_for_state
from topology.airflow_local import AirflowApiError
from topology.demo import demo_conf

pytestmark = [pytest.mark.integration, pytest.mark.airflow]



def trigger_log(airflow, run_id: str) -> str:
    """What the triggerer wrote for this run's sensor (Airflow keeps it beside the task's log)."""
    folder = airflow.home / "logs" / "dag_id=sync_sensor_probe" / f"run_id={run_id}" / "task_id=wait_for_sync"
    return "".join(path.read_text() for path in folder.glob("*trigger*"))


def replicating_but_paused(topo, monkeypatch) -> dict:
    """Forward replication built by the domain steps, then paused so the sensor must defer."""
    monkeypatch.setenv("PGU_PG_BIN_DIRS", str(topo.new_pg.bin_dir))
    conf = demo_conf(topo)
    upgrade = Upgrade(
        config.validate(conf),
        topo.aws_client("rds"),
        Credentials("postgres", topo.credentials["postgres"]),
        Credentials("replicator", topo.credentials["replicator"]),
        probe=Credentials("prober", topo.credentials["prober"]),
        dbname="app",
    )
    for step in (upgrade.preflight, upgrade.provision_target, upgrade.configure_parameters, upgrade.install, upgrade.build_group):
        step()
    with topo.new_pg.connect("postgres", dbname="app") as connection, connection.cursor() as cursor:
        cursor.execute("ALTER SUBSCRIPTION pgu_orders_db_fwd DISABLE")
    return conf


def test_sync_sensor_defers_to_the_real_triggerer_and_completes_when_replication_catches_up(
    airflow, fresh_databases, monkeypatch
):
    topo = fresh_databases
    conf = replicating_but_paused(topo, monkeypatch)
    airflow.wait_for_dag("sync_sensor_probe")
    run_id = airflow.trigger("sync_sensor_probe", conf)

    wait_for_state(airflow, "sync_sensor_probe", run_id, "wait_for_sync", "deferred", timeout=90)
    deadline = time.monotonic() + 90
    while "synced=False" not in trigger_log(airflow, run_id):  # the trigger polled while replication was paused
        assert time.monotonic() < deadline, "the trigger never reported a poll"
        time.sleep(0.5)
    states = {ti["task_id"]: ti["state"] for ti in airflow.task_instances("sync_sensor_probe", run_id)}
    assert states["wait_for_sync"] == "deferred"

    with topo.new_pg.connect("postgres", dbname="app") as connection, connection.cursor() as cursor:
        cursor.execute("ALTER SUBSCRIPTION pgu_orders_db_fwd ENABLE")
    assert airflow.wait_for_run("sync_sensor_probe", run_id, timeout=120) == "success"
    assert airflow.saw_deferred("sync_sensor_probe", run_id, "wait_for_sync")
    everything = str(airflow.task_log("sync_sensor_probe", run_id, "wait_for_sync", 1)) + trigger_log(airflow, run_id)
    everything += (airflow.home / "run" / "triggerer.log").read_text()
    assert topo.credentials["postgres"] not in everything and topo.credentials["replicator"] not in everything


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"source_instance": "orders--db"}, "source_instance"),
        ({"shift_percentages": [10, 500]}, "shift_percentages"),
        ({"replication_driver": "bdr"}, "replication_driver"),
        ({"decommission": "destroy"}, "decommission"),
    ],
)
def test_rest_api_refuses_invalid_conf_naming_the_field(airflow, topology, bad, field):
    airflow.wait_for_dag("pgactive_rolling_upgrade")
    with pytest.raises(AirflowApiError) as refused:
        airflow.trigger("pgactive_rolling_upgrade", {**demo_conf(topology), **bad})
    assert refused.value.status == 400
    assert field in str(refused.value)


def test_unknown_conf_key_passes_the_api_but_the_first_task_refuses_it(airflow, topology):
    airflow.wait_for_dag("pgactive_rolling_upgrade")
    run_id = airflow.trigger("pgactive_rolling_upgrade", {**demo_conf(topology), "source_instanse": "typo"})
    assert airflow.wait_for_run("pgactive_rolling_upgrade", run_id, timeout=120) == "failed"
    states = {ti["task_id"]: ti["state"] for ti in airflow.task_instances("pgactive_rolling_upgrade", run_id)}
    assert states["validate_request"] == "failed"
    assert states["preflight"] == "upstream_failed"
    log = str(airflow.task_log("pgactive_rolling_upgrade", run_id, "validate_request", 1))
    assert "source_instanse: unknown field" in log
