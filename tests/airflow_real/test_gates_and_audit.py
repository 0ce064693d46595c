"""Under a real scheduler: human gates answered through the REST API, the progress record's truth, the audit trail."""

from __future__ import annotations

import json
import time

import pytest

from tests.airflow_real.runs import (
    ROLLBACK, SOURCE, UPGRADE, answer, audit_of, pending_gates, record, states_of, wait_for_state, wait_until,
)
from topology.airflow_local import AirflowApiError
from topology.demo import demo_conf

pytestmark = [pytest.mark.integration, pytest.mark.airflow]

FORWARD_SUBSCRIPTION = "pgu_orders_db_fwd"


def test_approval_before_cutover_waits_and_the_run_continues_on_a_rest_answer(ready):
    airflow, topo = ready
    conf = {**demo_conf(topo), "shift_percentages": [], "decommission": "keep", "approve_cutover": True}
    run_id = airflow.trigger(UPGRADE, conf)
    wait_for_state(airflow, UPGRADE, run_id, "approve_cutover", "awaiting_input", timeout=240)

    (gate,) = pending_gates(airflow, run_id)
    assert gate["task_instance"]["task_id"] == "approve_cutover" and gate["options"] == ["Approve", "Roll back", "Stop"]
    assert gate["defaults"] == ["Stop"], "a gate never continues on its own"
    waiting = record(airflow)
    assert waiting["run_state"] == "awaiting_input" and waiting["pending_gate"]["task"] == "approve_cutover"
    time.sleep(3)
    assert states_of(airflow, UPGRADE, run_id).get("cutover") in (None, "none", "scheduled"), "no cutover before approval"
    assert topo.port_behind(topo.haproxy.write_port) == topo.old_pg.port

    answered = answer(airflow, run_id, "approve_cutover", "Approve")
    assert answered["responded_by"]["name"] == airflow.username
    with pytest.raises(AirflowApiError) as twice:
        answer(airflow, run_id, "approve_cutover", "Stop")
    assert twice.value.status == 409

    assert airflow.wait_for_run(UPGRADE, run_id, timeout=300) == "success", states_of(airflow, UPGRADE, run_id)
    assert topo.port_behind(topo.haproxy.write_port) == topo.new_pg.port
    # The DAG's success callback runs in the dag-processor, a few seconds after the run ended.
    done = wait_until(lambda: (r := record(airflow))["run_state"] == "success" and r, 90, "run_state success")
    assert "pending_gate" not in done
    (decision,) = done["gates"]
    assert decision["task"] == "approve_cutover" and decision["answer"] == "Approve"
    assert decision["by"] == airflow.username and not decision["timed_out"]

    trail = audit_of(airflow)
    assert trail["upgrade"]["run_id"] == run_id and trail["upgrade"]["triggered_by"] == airflow.username
    answered_in_log = [e for e in trail["entries"] if e["origin"] == "event_log" and e["what"] == "update_hitl_detail"]
    # Airflow's audit log keeps every request, the refused second answer too; hitlDetails keeps the one that counted.
    assert [(e["who"], e["task_id"], e["request"]["chosen_options"]) for e in answered_in_log] == [
        (airflow.username, "approve_cutover", ["Approve"]), (airflow.username, "approve_cutover", ["Stop"])], trail
    assert any(e["origin"] == "hitl" and e["who"] == airflow.username and e["chosen"] == ["Approve"]
               for e in trail["entries"]), trail
    with pytest.raises(AirflowApiError) as unauthenticated:
        airflow._request("GET", f"/pgactive-upgrade/audit/{SOURCE}", None, token=None)
    assert unauthenticated.value.status == 401


def test_lag_held_high_after_a_phase_pauses_the_shifts_at_a_gate_and_a_rest_answer_resumes(ready):
    airflow, topo = ready
    conf = {**demo_conf(topo), "shift_percentages": [30, 60], "phase_settle_seconds": 15, "decommission": "keep",
            "lag_threshold_bytes": 65536, "lag_escalation_minutes": 1}
    run_id = airflow.trigger(UPGRADE, conf)
    wait_for_state(airflow, UPGRADE, run_id, "traffic_phase.shift[0]", "success", timeout=240)
    # Replication held back on purpose: the apply stops, and the source writes 1 MB of WAL it never confirms.
    with topo.new_pg.connect("postgres", dbname="app") as target, target.cursor() as cursor:
        cursor.execute(f"ALTER SUBSCRIPTION {FORWARD_SUBSCRIPTION} DISABLE")
    with topo.old_pg.connect("postgres", dbname="app") as source, source.cursor() as cursor:
        cursor.execute("SELECT pg_logical_emit_message(true, 'pgu-test', repeat('x', 1048576))")

    held = time.monotonic()
    wait_for_state(airflow, UPGRADE, run_id, "traffic_phase.decide[0]", "awaiting_input", timeout=180)
    paused_after = time.monotonic() - held
    (gate,) = pending_gates(airflow, run_id)
    assert gate["task_instance"]["map_index"] == 0 and "lag" in gate["subject"].lower()
    assert gate["options"] == ["Keep waiting", "Continue", "Roll back", "Stop"]
    assert record(airflow)["run_state"] == "awaiting_input"
    time.sleep(5)
    states = states_of(airflow, UPGRADE, run_id)
    assert states.get("traffic_phase.shift[1]") not in ("running", "success"), states
    assert topo.haproxy.get_weight("pg_read", "target") == 30, "the shifts pause at the phase's split"

    with topo.new_pg.connect("postgres", dbname="app") as target, target.cursor() as cursor:
        cursor.execute(f"ALTER SUBSCRIPTION {FORWARD_SUBSCRIPTION} ENABLE")
    answer(airflow, run_id, "traffic_phase.decide", "Continue", map_index=0)
    assert airflow.wait_for_run(UPGRADE, run_id, timeout=300) == "success", states_of(airflow, UPGRADE, run_id)
    (decision,) = record(airflow)["gates"]
    assert (decision["task"], decision["kind"], decision["answer"], decision["by"]) == (
        "traffic_phase.decide[0]", "lag", "Continue", airflow.username)
    trail = audit_of(airflow)
    assert any(e["what"] == "update_hitl_detail" and e["who"] == airflow.username and e.get("map_index") == 0
               for e in trail["entries"]), trail
    print(f"lag escalation: gate asked {paused_after:.0f} s after lag was held high (lag_escalation_minutes 1)")


def test_roll_back_answered_at_a_gate_halts_the_run_and_the_audit_names_who(ready):
    airflow, topo = ready
    conf = {**demo_conf(topo), "shift_percentages": [40], "phase_settle_seconds": 1, "decommission": "keep",
            "approve_cutover": True}
    run_id = airflow.trigger(UPGRADE, conf)
    wait_for_state(airflow, UPGRADE, run_id, "approve_cutover", "awaiting_input", timeout=240)
    assert topo.haproxy.get_weight("pg_read", "target") == 40
    earlier = {r["dag_run_id"] for r in airflow.api("GET", f"dags/{ROLLBACK}/dagRuns")["dag_runs"]}
    answer(airflow, run_id, "approve_cutover", "Roll back")

    rollback = wait_until(lambda: [r for r in airflow.api("GET", f"dags/{ROLLBACK}/dagRuns")["dag_runs"]
                                   if r["conf"].get("source_instance") == SOURCE and r["dag_run_id"] not in earlier],
                          60, "the rollback run the answer triggered")[0]
    assert airflow.wait_for_run(ROLLBACK, rollback["dag_run_id"], timeout=120) == "success"
    assert airflow.wait_for_run(UPGRADE, run_id, timeout=120) == "failed"
    assert states_of(airflow, UPGRADE, run_id)["cutover"] != "success"
    assert topo.haproxy.get_weight("pg_read", "target") == 0 and topo.port_behind(topo.haproxy.write_port) == topo.old_pg.port

    halted = record(airflow)
    assert halted["run_state"] == "halted" and halted["halted_by"]["requested_by"] == airflow.username
    trail = audit_of(airflow)
    (rolled,) = trail["rollbacks"]
    assert rolled["requested_by"] == airflow.username and "approve_cutover" in rolled["reason"]
    assert rolled["run_type"] == "operator_triggered" and rolled["triggered_by"] == airflow.username, rolled
    assert [e["who"] for e in trail["entries"] if e["what"] == "halted by rollback"] == [airflow.username]


def test_a_failed_step_is_recorded_failed_with_its_error_line(ready):
    airflow, topo = ready
    # A target version preflight refuses: the run stops at preflight after validate_request claimed the source.
    conf = {**demo_conf(topo), "shift_percentages": [], "decommission": "keep", "target_engine_version": "15.9"}
    run_id = airflow.trigger(UPGRADE, conf)
    assert airflow.wait_for_run(UPGRADE, run_id, timeout=180) == "failed"
    failed = wait_until(lambda: (r := record(airflow)).get("run_state") == "failed" and r, 60, "the failure recorded")
    assert failed["run_id"] == run_id and failed["step"] == "preflight" and failed["state"] == "failed", failed
    assert failed["error"].startswith("PreflightError: preflight failed:") and "\n" not in failed["error"], failed
    assert topo.credentials["postgres"] not in json.dumps(failed)

    # Who cleared or marked which task: Airflow's audit log, in the upgrade's audit trail.
    airflow.api("POST", f"dags/{UPGRADE}/clearTaskInstances",
                {"dag_run_id": run_id, "task_ids": ["preflight"], "only_failed": True, "dry_run": False})
    # The run is running again until preflight's second try fails: the next test's upgrade of the same source
    # would be refused meanwhile (one upgrade per source).
    wait_until(lambda: (ti := airflow.api("GET", f"dags/{UPGRADE}/dagRuns/{run_id}/taskInstances/preflight"))
               ["try_number"] == 2 and ti["state"] == "failed", 180, "preflight's second try failed")
    assert airflow.wait_for_run(UPGRADE, run_id, timeout=180) == "failed"
    airflow.api("PATCH", f"dags/{UPGRADE}/dagRuns/{run_id}/taskInstances/provision_target", {"new_state": "skipped"})
    acted = [(e["what"], e["who"]) for e in audit_of(airflow)["entries"] if e["origin"] == "event_log"]
    assert acted == [("post_clear_task_instances", airflow.username), ("patch_task_instance", airflow.username)], acted


def test_a_gate_that_times_out_applies_the_safe_default(ready):
    airflow, topo = ready
    conf = {**demo_conf(topo), "shift_percentages": [], "decommission": "keep", "approve_cutover": True,
            "gate_timeout_minutes": 1}
    run_id = airflow.trigger(UPGRADE, conf)
    wait_for_state(airflow, UPGRADE, run_id, "approve_cutover", "awaiting_input", timeout=240)
    assert airflow.wait_for_run(UPGRADE, run_id, timeout=180) == "failed"
    assert states_of(airflow, UPGRADE, run_id)["cutover"] in ("upstream_failed", None)
    assert topo.port_behind(topo.haproxy.write_port) == topo.old_pg.port
    stopped = record(airflow)
    (decision,) = stopped["gates"]
    assert decision["answer"] == "Stop" and decision["timed_out"] and decision["by"] == "timeout"
    assert stopped["run_state"] == "failed" and "stopped by timeout" in stopped["error"], stopped


def test_a_verification_marked_skipped_by_hand_skips_the_cutover(ready):
    """An approval gate with nothing to ask is skipped by its verification. A skip by anyone else must not let the
    run go on: verify_before_cutover marked skipped skips its gate, the refresh and the cutover; writes stay."""
    airflow, topo = ready
    conf = {**demo_conf(topo), "shift_percentages": [], "decommission": "keep"}
    run_id = airflow.trigger(UPGRADE, conf)
    wait_for_state(airflow, UPGRADE, run_id, "validate_request", "success", timeout=120)
    airflow.api("PATCH", f"dags/{UPGRADE}/dagRuns/{run_id}/taskInstances/verify_before_cutover",
                {"new_state": "skipped"})
    airflow.wait_for_run(UPGRADE, run_id, timeout=300)
    states = states_of(airflow, UPGRADE, run_id)
    assert states["prepare_target"] == "success", states
    assert [states[t] for t in ("approve_cutover", "refresh_views_before_cutover", "cutover", "detach_old_node")] == \
        ["skipped"] * 4, states
    assert topo.port_behind(topo.haproxy.write_port) == topo.old_pg.port
