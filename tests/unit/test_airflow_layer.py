"""The Airflow layer as the Amazon provider tests its own: every trigger serializes to what rebuilds it, and every
method a deferral resumes refuses an event its trigger does not send (None included)."""

from __future__ import annotations

import importlib

import pytest
from airflow.sdk.exceptions import AirflowFailException

from pgactive_upgrade import rds
from pgactive_upgrade.airflow import gates, operators, rds_triggers, triggers

NODE = {"identifier": "orders-db", "host": "127.0.0.1", "port": 5432, "dbname": "app"}
TRIGGERS = [
    triggers.ReplicationLagTrigger(driver="native", source=NODE, target={**NODE, "identifier": "orders-db-pg17"},
                                   db_conn_id="pgu_db_admin", replication_user="replicator", threshold_bytes=1024,
                                   escalate_after_seconds=900, halt_key="pgactive_upgrade__orders-db__halt", run_id="r1"),
    triggers.ReplicationLagTrigger(driver="native", source=NODE, target={**NODE, "identifier": "orders-db-pg17"},
                                   db_conn_id="pgu_db_admin", replication_user="replicator", threshold_bytes=1024,
                                   escalate_after_seconds=60, halt_key="h", run_id="r1", fire_on_escalation=True),
    triggers.PhaseGateTrigger(dag_id="pgactive_rolling_upgrade", run_id="r1", check_task_id="traffic_phase.health_check",
                              previous_index=0, halt_key="h"),
    triggers.SwitchWatchdogTrigger(source=NODE, db_conn_id="pgu_db_admin", key="pgu_orders_db",
                                   dag_id="pgactive_rolling_upgrade", run_id="r1", cutover_task_id="cutover", halt_key="h"),
    triggers.SettleTrigger(seconds=60, halt_key="h", run_id="r1"),
    triggers.JoinTrigger(driver="pgactive", source=NODE, target={**NODE, "identifier": "orders-db-pg17"},
                         db_conn_id="pgu_db_admin"),
    *(rds_triggers.rds_wait_trigger(rds.Wait("orders-db-pg17", until, "why"), "pgu_aws", 30)
      for until in (rds.AVAILABLE, rds.IN_SYNC, rds.DELETED)),
]


@pytest.mark.parametrize("trigger", TRIGGERS, ids=lambda t: type(t).__name__)
def test_every_trigger_round_trips_through_serialize(trigger):
    classpath, kwargs = trigger.serialize()
    module, name = classpath.rsplit(".", 1)
    rebuilt = getattr(importlib.import_module(module), name)(**kwargs)
    assert rebuilt.serialize() == (classpath, kwargs)


def test_rds_waits_use_the_provider_triggers_and_ours_for_in_sync():
    kinds = {until: type(rds_triggers.rds_wait_trigger(rds.Wait("x", until, "why"), "pgu_aws", 10)).__name__
             for until in (rds.AVAILABLE, rds.IN_SYNC, rds.DELETED)}
    assert kinds == {rds.AVAILABLE: "RdsDbAvailableTrigger", rds.IN_SYNC: "RdsParametersInSyncTrigger",
                     rds.DELETED: "RdsDbDeletedTrigger"}
    assert rds_triggers.rds_wait_trigger(rds.Wait("x", rds.AVAILABLE, "why"), "pgu_aws", 10).attempts == 360


def test_our_in_sync_waiter_is_data_the_hook_finds():
    hook = rds_triggers.UpgradeRdsHook(aws_conn_id=None, region_name="us-east-1")
    assert "db_instance_parameters_in_sync" in hook.list_waiters()


RESUMES = [
    (operators.WaitForSyncSensor(task_id="wait_for_sync"), "execute_complete", {"status": "escalated"}),
    (operators.PhaseGateSensor(task_id="gate", check_task_id="check"), "execute_complete", {"status": "queued"}),
    (operators.CutoverWatchdogOperator(task_id="watchdog"), "execute_complete", {"status": "running"}),
    (operators.ConfigureParametersOperator(task_id="configure_parameters"), "resume_after_wait", {"status": "pending"}),
    (operators.PhaseHealthCheckOperator(task_id="check", percent=10), "check_after_settle", {"status": "late"}),
    (operators.BuildReplicationOperator(task_id="build_replication"), "after_join", {"status": "joining"}),
    (operators.PhaseHealthCheckOperator(task_id="check", percent=10), "after_lag_wait", {"status": "settled"}),
    (gates.PhaseDecisionOperator(task_id="decide", check_task_id="check"), "after_waiting", {"status": "settled"}),
]


@pytest.mark.parametrize("operator, method, unknown", RESUMES, ids=lambda v: getattr(v, "task_id", str(v)))
def test_every_resume_refuses_none_and_an_unknown_status(operator, method, unknown):
    for event in (None, {}, unknown):
        with pytest.raises(AirflowFailException, match="unexpected trigger event"):
            getattr(operator, method)({}, event)


def test_failed_and_halted_events_fail_the_task_naming_why():
    with pytest.raises(AirflowFailException, match="waiting for RDS failed: DB went incompatible"):
        operators.ConfigureParametersOperator(task_id="c").resume_after_wait({}, {"status": "error",
                                                                               "message": "DB went incompatible"})
    with pytest.raises(AirflowFailException, match="halted by rollback while waiting for sync"):
        operators.WaitForSyncSensor(task_id="w").execute_complete({}, {"status": "halted", "halt": {"by": "sre"}})
    with pytest.raises(AirflowFailException, match="phase 0 ended failed: phase 1 does not start"):
        operators.PhaseGateSensor(task_id="g", check_task_id="c")._open_or_fail("failed", 1)


def test_new_conflicts_count_from_the_baseline_an_operator_saw():
    from pgactive_upgrade.airflow.operators import new_conflicts

    assert new_conflicts({"orders-db": 4, "orders-db-pg17": 2}, {"orders-db": 7, "orders-db-pg17": 2}) == 3
    assert new_conflicts(None, {"orders-db": 2}) == 2
    assert new_conflicts({"orders-db": 9}, {"orders-db": 3}) == 0, "a history cleaned meanwhile counts nothing"


def test_apply_errors_get_their_own_kind_and_are_named_in_the_question_with_the_accept_options():
    from pgactive_upgrade.health import HealthReport

    errors = ["orders-db: apply worker (node orders-db-pg17): pgactive_apply_failure at 2026-11-30 13:50:01+0000"]
    conflicts = ["orders-db: conflict_id 4 insert_insert on billing.invoice_lines, last_update_wins_keep_local, at ..."]
    kinds = {(bool(c), bool(e)): operators.decision_kind(HealthReport(lag=None, threshold_bytes=0, conflicts=c,
                                                                      apply_errors=e))
             for c in ([], conflicts) for e in ([], errors) if c or e}
    assert kinds == {(True, False): "conflicts", (False, True): "apply_errors",
                     (True, True): "conflicts_and_apply_errors"}
    question = gates._accept_question({"gate": "apply_errors", "apply_errors": errors, "conflicts": []},
                                      "phase 1 (50 %)", "orders-db")
    assert question.kind == "apply_errors"
    assert question.subject == "Replication apply errors after phase 1 (50 %) of orders-db"
    assert f"- {errors[0]}" in question.body and "conflict" not in question.body
    assert question.options == (gates.ACCEPT, gates.ROLL_BACK, gates.STOP)
    both = gates._accept_question({"gate": "conflicts_and_apply_errors", "apply_errors": errors, "conflicts": conflicts},
                                  "phase 0 (10 %)", "orders-db")
    assert both.subject == "Replication conflicts and apply errors after phase 0 (10 %) of orders-db"
    assert f"- {conflicts[0]}" in both.body and f"- {errors[0]}" in both.body


def test_gates_are_the_providers_hitl_operator_and_accept_every_answer_they_may_offer():
    from airflow.providers.standard.operators.hitl import HITLOperator

    for gate in (gates.ApprovalGateOperator(task_id="approve_cutover", before="cutover"),
                 gates.PhaseDecisionOperator(task_id="decide", check_task_id="check")):
        assert isinstance(gate, HITLOperator)
        gate.validate_chosen_options([gates.STOP])
        with pytest.raises(ValueError):
            gate.validate_chosen_options(["Proceed anyway"])
    with pytest.raises(ValueError, match="before: expected cutover or decommission"):
        gates.ApprovalGateOperator(task_id="approve", before="verify")
