"""
### Rolling major-version upgrade of RDS for PostgreSQL

With `plan_only: true` the run stops after preflight with a plan of everything it would do, changing nothing.
Otherwise it provisions a new instance of the target major version, replicates the source into it, shifts traffic in
phases with health checks, verifies every row while writes go on, cuts over with a fenced, deadline-bound
switch, verifies every row and sequence again,
then (when the conf says `decommission: delete`) detaches the old node and deletes it after a final snapshot.

Human gates (Required Actions in the UI, or the REST API's hitlDetails): after each phase when lag stayed high or
conflicts appeared, before the cutover (`approve_cutover`) and before decommissioning (`approve_decommission`).

Every task can be cleared and re-run: each step first checks whether its work is already done.
Roll back at any time with the DAG `pgactive_upgrade_rollback`. See README.md for every conf field.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from typing import Any

from airflow.sdk import DAG, TaskGroup, chain, task_group

from pgactive_upgrade.airflow.callbacks import record_run_failure, record_run_success, record_task_failure
from pgactive_upgrade.airflow.gates import ApprovalGateOperator, PhaseDecisionOperator
from pgactive_upgrade.airflow.operators import (
    BuildReplicationOperator,
    ConfigureParametersOperator,
    CutoverOperator,
    CutoverWatchdogOperator,
    DecommissionSourceOperator,
    DetachOldNodeOperator,
    InstallExtensionOperator,
    PhaseGateSensor,
    PhaseHealthCheckOperator,
    PreflightOperator,
    PrepareTargetOperator,
    ProvisionTargetOperator,
    RefreshMaterializedViewsOperator,
    ShiftPhaseOperator,
    ValidateRequestOperator,
    VerifyOperator,
    WaitForSyncSensor,
)
from pgactive_upgrade.airflow.params import upgrade_params

# Every step that defers gets retries: when its trigger fires before a busy scheduler has handled the exit of the
# deferring process, Airflow 3.3 fails the resumed try (apache/airflow#67287, #72716; a fleet of upgrades made it
# happen, tests/airflow_real/test_deferral_race.py reproduces it). These steps start over safely, and their real
# failures raise AirflowFailException, which Airflow never retries.
DEFERS: dict[str, Any] = {"retries": 2, "retry_delay": timedelta(seconds=10)}
# Many upgrades on one Airflow: the deployment may cap how many of their steps compute at once with a pool of its
# own, named here through the environment (README: "A fleet of upgrades"). Deferred steps hold no slot of it; the
# cutover's watchdog and the rollback DAG never wait behind it.
STEP_POOL = os.environ.get("PGACTIVE_UPGRADE_POOL") or "default_pool"

with DAG(
    dag_id="pgactive_rolling_upgrade",
    description="Upgrade RDS PostgreSQL to a new major version with seconds of downtime",
    doc_md=__doc__,
    schedule=None,
    start_date=datetime(2025, 1, 1),
    catchup=False,
    # Upgrades of different sources run side by side (a run mostly waits deferred, holding no worker slot);
    # validate_request refuses a second one of the same source.
    max_active_runs=64,
    params=upgrade_params(),
    tags=["postgres", "rds", "upgrade"],
    # The progress record says how each step and the run ended, whatever ended them.
    default_args={"retries": 0, "pool": STEP_POOL, "on_failure_callback": record_task_failure},
    on_success_callback=record_run_success,
    on_failure_callback=record_run_failure,
) as dag:
    # Only reads (conf, RDS): a busy worker (bench/fleet.py: 20 runs starting at once) may take long, so retry.
    validate_request = ValidateRequestOperator(
        task_id="validate_request", execution_timeout=timedelta(minutes=3), retries=2, retry_delay=timedelta(seconds=15)
    )
    # plan_only: the plan is made here and every later task is skipped.
    preflight = PreflightOperator(task_id="preflight", execution_timeout=timedelta(minutes=5))
    provision_target = ProvisionTargetOperator(
        task_id="provision_target", execution_timeout=timedelta(minutes=15), retries=2, retry_delay=timedelta(seconds=30)
    )
    # The PRD's 5 min covers the parameter change; a new instance still being created and two reboots
    # (target, and the source when allowed) take longer on RDS.
    configure_parameters = ConfigureParametersOperator(
        task_id="configure_parameters", execution_timeout=timedelta(minutes=45), retries=2, retry_delay=timedelta(seconds=30)
    )
    install_extension = InstallExtensionOperator(task_id="install_extension", execution_timeout=timedelta(minutes=3))
    with TaskGroup("init_replication_group") as init_replication_group:
        # pgactive's join copies the whole database: waited for deferred, within this timeout
        BuildReplicationOperator(task_id="build_replication", execution_timeout=timedelta(hours=24), **DEFERS)
    wait_for_sync = WaitForSyncSensor(
        task_id="wait_for_sync", timeout=timedelta(hours=24).total_seconds(), poll_interval=5, **DEFERS
    )
    prepare_target = PrepareTargetOperator(task_id="prepare_target", execution_timeout=timedelta(hours=1))

    @task_group(group_id="traffic_phase")
    def traffic_phase(percent):
        """One phase: wait for the previous phase's decision, move the split, settle and check, and ask an operator
        when the check escalated lag or found conflicts."""
        chain(
            # Waits (deferred, free) as long as the previous phase's gate may: gate_timeout_minutes is at most 7 days.
            PhaseGateSensor(
                task_id="wait_for_previous_phase", check_task_id="traffic_phase.decide", timeout=timedelta(days=8),
                **DEFERS,
            ),
            ShiftPhaseOperator(task_id="shift", percent=percent, execution_timeout=timedelta(minutes=10)),
            PhaseHealthCheckOperator(
                task_id="health_check", percent=percent, shift_task_id="traffic_phase.shift",
                execution_timeout=timedelta(minutes=5) + timedelta(hours=1), **DEFERS,
            ),  # the settle time (at most 1 h) plus the PRD's 5 min of checks; a lag wait defers with its own timeout
            PhaseDecisionOperator(task_id="decide", check_task_id="traffic_phase.health_check", **DEFERS),
        )

    traffic_phases = traffic_phase.expand(percent=validate_request.output)
    # none_failed: with no phases configured the mapped group expands to nothing and is skipped.
    verify_before_cutover = VerifyOperator(
        task_id="verify_before_cutover", gate_task_id="approve_cutover", execution_timeout=timedelta(hours=2),
        trigger_rule="none_failed",
    )
    # Runs only with approve_cutover (verify_before_cutover skips it otherwise); the approver sees its figures.
    approve_cutover = ApprovalGateOperator(task_id="approve_cutover", before="cutover", **DEFERS)
    # After verify_before_cutover succeeded and approve_cutover approved, or was skipped by it (no approval asked
    # for). A verification marked skipped by hand skips the gate, this step and the cutover: at least one success.
    refresh_views_before_cutover = RefreshMaterializedViewsOperator(
        task_id="refresh_views_before_cutover", execution_timeout=timedelta(hours=1),
        trigger_rule="none_failed_min_one_success",
    )
    # The cutover undoes itself at its own deadline (cutover_deadline_seconds); this is only the backstop.
    cutover = CutoverOperator(task_id="cutover", execution_timeout=timedelta(minutes=11))
    # Beside the cutover, deferred: settles the switch within seconds if the cutover's process dies holding the fence.
    cutover_watchdog = CutoverWatchdogOperator(
        task_id="cutover_watchdog", execution_timeout=timedelta(hours=6), pool="default_pool", **DEFERS
    )
    verify = VerifyOperator(task_id="verify", gate_task_id="approve_decommission", execution_timeout=timedelta(hours=2))
    # Runs when approve_decommission, or by default when decommission is delete (verify skips it otherwise).
    approve_decommission = ApprovalGateOperator(task_id="approve_decommission", before="decommission", **DEFERS)
    # As refresh_views_before_cutover: after verify succeeded and approve_decommission approved or was skipped by it.
    detach_old_node = DetachOldNodeOperator(
        task_id="detach_old_node", execution_timeout=timedelta(minutes=5), trigger_rule="none_failed_min_one_success"
    )
    decommission_source = DecommissionSourceOperator(
        task_id="decommission_source", execution_timeout=timedelta(minutes=10), **DEFERS
    )

    chain(
        validate_request,
        preflight,
        provision_target,
        configure_parameters,
        install_extension,
        init_replication_group,
        wait_for_sync,
        prepare_target,
        traffic_phases,
        verify_before_cutover,
        approve_cutover,
        refresh_views_before_cutover,
        [cutover, cutover_watchdog],
        verify,
        approve_decommission,
        detach_old_node,
        decommission_source,
    )
    verify_before_cutover >> refresh_views_before_cutover
    verify >> detach_old_node
