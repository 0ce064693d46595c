"""Reading runs of a real local Airflow in tests."""

from __future__ import annotations

import json
import time

from psycopg2 import sql

from topology.airflow_local import AirflowApiError, LocalAirflow
from topology.demo import demo_conf

UPGRADE, ROLLBACK = "pgactive_rolling_upgrade", "pgactive_upgrade_rollback"
SOURCE = "orders-db"


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


def record(airflow: LocalAirflow, source: str = SOURCE) -> dict:
    """The upgrade's progress record (the Variable the package keeps per source)."""
    return json.loads(airflow.api("GET", f"variables/pgactive_upgrade__{source}")["value"])


def pending_gates(airflow: LocalAirflow, run_id: str, dag_id: str = UPGRADE) -> list[dict]:
    details = airflow.api("GET", f"dags/{dag_id}/dagRuns/{run_id}/hitlDetails")["hitl_details"]
    return [d for d in details if d["responded_at"] is None]


def answer(airflow: LocalAirflow, run_id: str, task_id: str, option: str, map_index: int = -1,
           dag_id: str = UPGRADE) -> dict:
    """Answers a gate through the REST API, as a person would: not within a fraction of a second of the question.
    An answer that lands before the gate's first process has exited races the executor's event for that process,
    and the scheduler fails the gate task (seen: "finished with state success, but the task instance's state
    attribute is queued")."""
    time.sleep(3)
    return airflow.api("PATCH", f"dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/{map_index}/hitlDetails",
                       {"chosen_options": [option], "params_input": {}})


def audit_of(airflow: LocalAirflow, source: str = SOURCE) -> dict:
    return airflow._request("GET", f"/pgactive-upgrade/audit/{source}", None, token=airflow.token())


def wait_until(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"{what}: not within {timeout} s")


def split_holds_while_the_gate_waits(airflow: LocalAirflow, topo, run_id: str, percent: int) -> None:
    """A few seconds into the decision gate's wait: the next phase has not started, the split stays where it is."""
    time.sleep(3)
    assert states_of(airflow, UPGRADE, run_id).get("traffic_phase.shift[1]") not in ("running", "success")
    assert topo.haproxy.get_weight("pg_read", "target") == percent, "the split holds while the gate waits"


def accept_at_phase_0_and_never_asked_again(airflow: LocalAirflow, run_id: str, timeout: float) -> None:
    """Accept and continue at traffic_phase.decide[0] through the REST API; the run succeeds, and what was accepted is
    not asked about again: phase 1's check found nothing new and its gate did not ask."""
    decide = "traffic_phase.decide"
    answered = answer(airflow, run_id, decide, "Accept and continue", map_index=0)
    assert answered["responded_by"]["name"] == airflow.username
    assert airflow.wait_for_run(UPGRADE, run_id, timeout=timeout) == "success", states_of(airflow, UPGRADE, run_id)
    details = airflow.api("GET", f"dags/{UPGRADE}/dagRuns/{run_id}/hitlDetails")["hitl_details"]
    assert [(d["task_instance"]["task_id"], d["task_instance"]["map_index"]) for d in details] == [(decide, 0)]
    assert states_of(airflow, UPGRADE, run_id)[f"{decide}[1]"] == "success"


def run_whole_upgrade(airflow: LocalAirflow, topo, label: str) -> list[dict]:
    """The demo's upgrade from trigger to success, every row on the target; the task instances that ran."""
    airflow.wait_for_dag(UPGRADE)
    started = time.monotonic()
    run_id = airflow.trigger(UPGRADE, {**demo_conf(topo), "phase_settle_seconds": 1, "approve_decommission": False})
    assert airflow.wait_for_run(UPGRADE, run_id, timeout=600) == "success", states_of(airflow, UPGRADE, run_id)
    print(f"whole DAG {label}: {time.monotonic() - started:.1f} s")
    ran = [ti for ti in airflow.task_instances(UPGRADE, run_id) if ti["start_date"]]
    # Neither approval is asked for: the verifications skip both gates, and every other step succeeds.
    assert {ti["task_id"]: ti["state"] for ti in ran if ti["state"] != "success"} == UNASKED_GATES_SKIPPED, \
        states_of(airflow, UPGRADE, run_id)
    ran = [ti for ti in ran if ti["state"] == "success"]  # a skipped gate has dates but started no process
    assert len(ran) > 10
    assert_every_row_arrived(topo)
    return ran


UNASKED_GATES_SKIPPED = {"approve_cutover": "skipped", "approve_decommission": "skipped"}
DEMO_TABLES = ["public.accounts", "public.orders", "billing.invoices", "billing.invoice_lines"]


def assert_every_row_arrived(topo) -> None:
    source, target = topo.old_pg.connect(dbname="app"), topo.new_pg.connect(dbname="app")
    try:
        for table in DEMO_TABLES:
            on_source, on_target = fingerprint(source, table), fingerprint(target, table)
            assert on_source == on_target and on_source[0] > 0, (table, on_source, on_target)
    finally:
        source.close()
        target.close()


def fingerprint(connection, table: str) -> tuple[int, str]:
    query = sql.SQL("SELECT count(*), md5(coalesce(string_agg(t::text, '|' ORDER BY t::text), '')) FROM {}.{} t")
    with connection.cursor() as cursor:
        cursor.execute(query.format(*map(sql.Identifier, table.split("."))))
        return cursor.fetchone()
