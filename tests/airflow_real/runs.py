"""Reading runs of a real local Airflow in tests."""

from __future__ import annotations

import time

from topology.airflow_local import AirflowApiError, LocalAirflow


def states_of(airflow: LocalAirflow, dag_id: str, run_id: str) -> dict[str, str | None]:
    return {_key(ti): ti["state"] for ti in airflow.task_instances(dag_id, run_id)}


def _key(ti: dict) -> str:
    return ti["task_id"] if ti.get("map_index", -1) == -1 else f"{ti['task_id']}[{ti['map_index']}]"


def wait_for_state(airflow: LocalAirflow, dag_id: str, run_id: str, task: str, wanted: str, timeout: float) -> None:
    deadline, states = time.monotonic() + timeout, {}
    while time.monotonic() < deadline:
        states = states_of(airflow, dag_id, run_id)
        if states.get(task) == wanted:
            return
        assert states.get(task) not in ("failed", "upstream_failed") or wanted in ("failed", "upstream_failed"), states
        time.sleep(0.2)
    raise AssertionError(f"{task} never reached {wanted}: {states}")


def forget_earlier_upgrades(airflow: LocalAirflow) -> None:
    """Fresh databases: the record of an earlier test's cutover of the same source no longer applies."""
    for key in ("pgactive_upgrade__orders-db", "pgactive_upgrade__orders-db__halt"):
        try:
            airflow.api("DELETE", f"variables/{key}")
        except AirflowApiError as error:
            assert error.status == 404, error
