"""Operators: each runs one step of the Upgrade; the step itself is plain Python in pgactive_upgrade."""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Any, cast

from airflow.sdk import BaseOperator, BaseSensorOperator
from airflow.sdk.bases.skipmixin import SkipMixin
from airflow.sdk.exceptions import AirflowFailException

from pgactive_upgrade import config, plan, progress, rds
from pgactive_upgrade.airflow import metrics, state
from pgactive_upgrade.airflow.session import (
    INSTANCES_KEY,
    request_from,
    upgrade_from,
    upgrade_from_conf,
    upgrade_from_request,
)
from pgactive_upgrade.airflow.triggers import (
    JoinTrigger,
    PhaseGateTrigger,
    ReplicationLagTrigger,
    SettleTrigger,
    SwitchWatchdogTrigger,
    previous_phase_outcome,
    switch_verdict,
)
from pgactive_upgrade.cutover import restore_split
from pgactive_upgrade.deployment import DeploymentError
from pgactive_upgrade.events import emit
from pgactive_upgrade.health import HealthReport
from pgactive_upgrade.rollback import early_switch_to_source
from pgactive_upgrade.replication import Joining
from pgactive_upgrade.switch_state import LockBusy
from pgactive_upgrade.upgrade import AlreadySwitchedError, PreflightError, Upgrade

if TYPE_CHECKING:
    from pgactive_upgrade.airflow.gates import ApprovalGateOperator


class UpgradeStepOperator(BaseOperator):
    """Base: refuses to act once a rollback halted the run, records progress, then runs `step`."""

    ui_color = "#e8f4fd"
    # After configure_parameters: source and target as it recorded them, no RDS call (session.upgrade_from).
    recorded_instances = False

    def execute(self, context) -> Any:
        return self.run_step(upgrade_from(context, recorded_instances=self.recorded_instances), context)

    def run_step(self, upgrade: Upgrade, context) -> Any:
        source = upgrade.request.source_identifier
        self.begin(upgrade, context)
        result = self.step(upgrade, context)
        if isinstance(result, rds.Wait):  # an instance is busy: wait in the triggerer, then run the step again
            emit("waiting_for_rds", instance=result.identifier, until=result.until, why=result.why)
            state.record_step(context, source, self.task_id, "waiting", waiting_for=f"{result.identifier}: {result.until}")
            from pgactive_upgrade.airflow.rds_triggers import rds_wait_trigger  # slow to import: only when waiting

            self.defer(trigger=rds_wait_trigger(result, upgrade.request.aws_conn_id, upgrade.request.rds_poll_seconds),
                       method_name="resume_after_wait")
        state.record_step(context, source, self.task_id, "done", **self.progress_fields(result))
        return result

    def begin(self, upgrade: Upgrade, context) -> None:
        """Refuses a plan_only or halted run, then records the step as running."""
        refuse_plan_only(upgrade.request, self.task_id)
        state.check_not_halted(context, upgrade.request.source_identifier)
        state.record_step(context, upgrade.request.source_identifier, self.task_id, "running")

    def resume_after_wait(self, context, event: dict[str, Any] | None = None) -> Any:
        event = checked_event(event, "success", "error")
        if event["status"] != "success":
            raise AirflowFailException(f"waiting for RDS failed: {event.get('message', event)}")
        return self.execute(context)

    def step(self, upgrade: Upgrade, context) -> Any:
        raise NotImplementedError

    def progress_fields(self, result: Any) -> dict:
        return {}


class ValidateRequestOperator(BaseOperator):
    """Refuses bad conf (including unknown keys) before anything is touched; returns the phases to map over."""

    def execute(self, context) -> list[int]:
        try:
            request = request_from(context)
        except config.RequestError as error:
            raise AirflowFailException(str(error)) from None  # bad conf: retrying cannot help
        if not request.plan_only:  # a plan claims nothing: it must not take over the record of a real upgrade
            self._claim(context, request)
        emit("request_valid", source=request.source_instance, target_version=request.target_engine_version,
             driver=request.replication_driver, phases=list(request.shift_percentages), plan_only=request.plan_only)
        return list(request.shift_percentages)

    def _claim(self, context, request: config.UpgradeRequest) -> None:
        """Many sources may upgrade at once, but one source only once at a time: the check and the record are made
        under the upgrade's lock on the source, so two runs triggered together cannot both pass."""
        upgrade = upgrade_from_request(request)
        try:
            with upgrade.acting(wait_seconds=CLAIM_WAIT_SECONDS) as source:
                self._refuse_a_second_upgrade_of_the_same_source(context, request.source_identifier)
                upgrade.check_not_switched(source)
                state.record_step(context, request.source_identifier, self.task_id, "done")
        except (LockBusy, AlreadySwitchedError) as error:
            raise AirflowFailException(f"source_instance: {request.source_identifier}: {error}") from error
        except DeploymentError as error:  # a source the deployment does not allow (by identifier or tags)
            raise AirflowFailException(str(error)) from None

    @staticmethod
    def _refuse_a_second_upgrade_of_the_same_source(context, source: str) -> None:
        record = state.read(progress.record_key(source))
        if not record or record["run_id"] == context["run_id"]:
            return
        if record.get("cut_over"):
            raise AirflowFailException(
                f"source_instance: {source} was already cut over by run {record['run_id']} at {record['cut_over']}; "
                f"a new upgrade of it needs the Variable {progress.record_key(source)} deleted first, after checking "
                "which instance takes the writes"
            )
        other = context["ti"].get_dagrun_state(dag_id=record["dag_id"], run_id=record["run_id"])
        if other in ("running", "queued"):
            raise AirflowFailException(
                f"source_instance: {source} is already being upgraded by run {record['run_id']} ({other}); "
                "wait for it to end or roll it back"
            )


class PreflightOperator(UpgradeStepOperator, SkipMixin):
    """Everything that would stop the upgrade, checked before anything changes. plan_only: makes the plan instead
    (task log, XCom `plan`), records and changes nothing, and skips every later task."""

    inherits_from_skipmixin = True  # the scheduler skips again what this skipped, when it is cleared

    def execute(self, context) -> Any:
        upgrade = upgrade_from(context)
        if not upgrade.request.plan_only:
            return self.run_step(upgrade, context)
        found = self._found_for_plan(upgrade)
        made = upgrade.make_plan(found)
        self.log.info("%s", plan.summary(made))
        ti = context["ti"]
        ti.xcom_push(key="plan", value=made)
        ti.xcom_push(key="return_value", value=found)
        self.skip(ti, context["task"].get_flat_relatives(upstream=False))  # ends the task: the run ends with the plan
        return found

    def _found_for_plan(self, upgrade: Upgrade) -> dict:
        """What blocks the run goes into the plan instead of failing here."""
        try:
            return {**upgrade.preflight(), "blocking": []}
        except PreflightError as error:
            self.log.warning("preflight would stop the run: %s", error)
            return {"blocking": error.problems, "warnings": error.warnings}

    def step(self, upgrade, context):
        return upgrade.preflight()


class ProvisionTargetOperator(UpgradeStepOperator):
    def step(self, upgrade, context):
        return upgrade.provision_target()


class ConfigureParametersOperator(UpgradeStepOperator):
    def step(self, upgrade, context):
        result = upgrade.configure_parameters()
        if not isinstance(result, rds.Wait):
            context["ti"].xcom_push(key=INSTANCES_KEY, value=upgrade.describe_instances())
        return result


class InstallExtensionOperator(UpgradeStepOperator):
    recorded_instances = True

    def step(self, upgrade, context):
        return upgrade.install()


class PrepareTargetOperator(UpgradeStepOperator):
    """After the initial sync, before any traffic reaches the target: updates its extensions, fills its
    materialized views and collects planner statistics. ANALYZE's progress goes into the upgrade's record as
    `statistics_progress`."""
    recorded_instances = True

    def step(self, upgrade, context):
        key = progress.record_key(upgrade.request.source_identifier)
        return upgrade.prepare_target(progress=lambda figures: state.merge(key, {"statistics_progress": figures}))

    def progress_fields(self, result):
        return {"statistics_progress": {**result["statistics"], "done": result["statistics"]["analyzed"]},
                "extensions_updated": result["extensions_updated"]}


class RefreshMaterializedViewsOperator(UpgradeStepOperator):
    """Right before the cutover: the target's materialized views as fresh as the source's refreshes made them."""
    recorded_instances = True

    def step(self, upgrade, context):
        return upgrade.refresh_materialized_views()


class BuildReplicationOperator(UpgradeStepOperator):
    """Copies the schema and starts replicating; a pgactive join (a copy of the whole database) is waited for
    deferred, then the step runs again to finish (grants, sequences)."""
    recorded_instances = True

    def step(self, upgrade, context):
        record = state.read(progress.record_key(upgrade.request.source_identifier)) or {}
        if record.get("cut_over"):
            raise AirflowFailException(
                f"replication cannot be built again: traffic was cut over to the target at {record['cut_over']}"
            )
        result = upgrade.build_group()
        if isinstance(result, Joining):
            link = upgrade.link()
            emit("waiting_for_join", node=result.node)
            state.record_step(context, upgrade.request.source_identifier, self.task_id, "waiting", waiting_for="join")
            self.defer(trigger=JoinTrigger(driver=upgrade.request.replication_driver, source=_node_spec(link.source),
                                           target=_node_spec(link.target), db_conn_id=upgrade.request.db_conn_id),
                       method_name="after_join")
        # Apply failures during the build (a pgactive join retries its applies) are the package's own, not asked about.
        return {**result, "conflict_baseline": upgrade.conflict_marks(),
                "apply_error_baseline": upgrade.driver().apply_errors().marks}

    def after_join(self, context, event: dict[str, Any] | None = None) -> Any:
        event = checked_event(event, "ready", "failed")
        if event["status"] == "failed":
            upgrade = upgrade_from(context, recorded_instances=True)
            cleaned = upgrade.driver().clean_failed_join()
            raise AirflowFailException(f"the target's join failed ({event['message']}); cleaned up ({cleaned}): the "
                                       "joining node's server log has the cause; fix it and clear this task")
        return self.execute(context)

    def progress_fields(self, result):
        return {"conflict_baseline": result["conflict_baseline"],
                "apply_error_baseline": result.get("apply_error_baseline") or {}}


class WaitForSyncSensor(BaseSensorOperator):
    """Deferrable: the trigger measures lag in the triggerer, holding no worker slot."""

    def __init__(self, *, poll_interval: float = 5.0, **kwargs):
        super().__init__(**kwargs)
        self.poll_interval = poll_interval

    def execute(self, context) -> Any:
        upgrade = upgrade_from(context, recorded_instances=True)
        request = upgrade.request
        state.check_not_halted(context, request.source_identifier)
        state.record_step(context, request.source_identifier, self.task_id, "waiting")
        lag = upgrade.lag()
        state.record_lag(request.source_identifier, context["run_id"], lag.bytes)
        if lag.within(request.lag_threshold_bytes):
            emit("in_sync", lag_bytes=lag.bytes, detail=lag.detail)
            return {"lag_bytes": lag.bytes, "deferred": False}
        self.defer(
            trigger=lag_trigger(upgrade, context, self.poll_interval),
            method_name="execute_complete",
            timeout=self.timeout if self.timeout is None else timedelta(seconds=float(self.timeout)),
        )

    def execute_complete(self, context, event: dict[str, Any] | None = None) -> dict:
        event = checked_event(event, "halted", "synced")
        if event.get("status") == "halted":
            raise AirflowFailException(f"halted by rollback while waiting for sync: {event['halt']}")
        if event.get("status") != "synced":
            raise RuntimeError(f"replication did not reach sync: {event}")
        emit("in_sync", lag_bytes=event["lag_bytes"], polls=event["polls"])
        request = request_from(context)
        state.record_step(context, request.source_identifier, self.task_id, "done")
        state.record_lag(request.source_identifier, context["run_id"], event["lag_bytes"])
        return {"lag_bytes": event["lag_bytes"], "deferred": True, "polls": event["polls"]}


def lag_trigger(upgrade: Upgrade, context, poll_interval: float, fire_on_escalation: bool = False) -> ReplicationLagTrigger:
    """Waits for the lag to come under lag_threshold_bytes; past lag_escalation_minutes it logs an escalation, or
    with fire_on_escalation ends the wait so an operator decides."""
    request, link = upgrade.request, upgrade.link()
    return ReplicationLagTrigger(
        driver=request.replication_driver,
        source=_node_spec(link.source),
        target=_node_spec(link.target),
        db_conn_id=request.db_conn_id,
        replication_user=upgrade.replication.user,
        threshold_bytes=request.lag_threshold_bytes,
        escalate_after_seconds=request.lag_escalation_minutes * 60,
        halt_key=progress.halt_key(request.source_identifier),
        run_id=context["run_id"],
        poll_interval=poll_interval,
        source_identifier=request.source_identifier,
        fire_on_escalation=fire_on_escalation,
    )


def _node_spec(node) -> dict:
    endpoint = node.endpoint
    return {"identifier": node.identifier, **endpoint.as_dict()}


class PhaseGateSensor(BaseSensorOperator):
    """Phase n waits here, deferred, until phase n-1's health check succeeded: mapped instances have no order
    of their own, and a failed instance does not stop the next one."""

    def __init__(self, *, check_task_id: str, poll_interval: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.check_task_id = check_task_id
        self.poll_interval = poll_interval

    def execute(self, context) -> None:
        source = request_from(context).source_identifier
        state.check_not_halted(context, source)
        ti = context["ti"]
        if ti.map_index <= 0:
            return
        outcome = previous_phase_outcome(
            ti.get_ti_count, dag_id=ti.dag_id, run_id=context["run_id"], check_task_id=self.check_task_id,
            index=ti.map_index - 1,
        )
        if outcome is None:
            self.defer(
                trigger=PhaseGateTrigger(
                    dag_id=ti.dag_id, run_id=context["run_id"], check_task_id=self.check_task_id,
                    previous_index=ti.map_index - 1, halt_key=progress.halt_key(source), poll_interval=self.poll_interval,
                ),
                method_name="execute_complete",
                timeout=None if self.timeout is None else timedelta(seconds=float(self.timeout)),
            )
        self._open_or_fail(outcome, ti.map_index)

    def execute_complete(self, context, event: dict[str, Any] | None = None) -> None:
        event = checked_event(event, "halted", "success", "failed", "upstream_failed", "skipped", "removed")
        if event["status"] == "halted":
            raise AirflowFailException(f"halted by rollback: {event['halt']}")
        self._open_or_fail(event["status"], context["ti"].map_index)

    @staticmethod
    def _open_or_fail(outcome: str, index: int) -> None:
        if outcome != "success":
            raise AirflowFailException(f"phase {index - 1} ended {outcome}: phase {index} does not start")


class ShiftPhaseOperator(UpgradeStepOperator):
    recorded_instances = True

    template_fields = ("percent",)

    def __init__(self, *, percent: Any, **kwargs):
        super().__init__(**kwargs)
        self.percent = percent

    def step(self, upgrade, context):
        with upgrade.acting(halted_check(context, upgrade)) as source:
            upgrade.check_not_switched(source)
            result = upgrade.shift(int(self.percent))
        metrics.phase(upgrade.request.source_identifier, result["percent"], result["split"])
        return result

    def progress_fields(self, result):
        return {"phase": self.task_id, "percent": result["percent"], "split": result["split"]}


class PhaseHealthCheckOperator(UpgradeStepOperator):
    """Settle, then check. A failed check: back to the last healthy split and stop the run for an operator. Lag above
    the threshold: waited for (deferred) up to lag_escalation_minutes, then, like new conflicts, handed to the
    phase's decision gate (the task after this one), the split held meanwhile."""
    recorded_instances = True

    template_fields = ("percent",)

    def __init__(self, *, percent: Any, shift_task_id: str | None = None, poll_interval: float = 5.0, **kwargs):
        super().__init__(**kwargs)
        self.percent = percent
        self.shift_task_id = shift_task_id  # the phase's shift, right before this check
        self.poll_interval = poll_interval

    def execute(self, context) -> Any:
        upgrade = upgrade_from(context, recorded_instances=True)
        request = upgrade.request
        self.begin(upgrade, context)
        if not self._just_shifted(context):
            self._hold_phase_split(upgrade, context)
        if request.phase_settle_seconds > 0:  # the split settles while the task waits in the triggerer
            self.defer(trigger=SettleTrigger(seconds=request.phase_settle_seconds, run_id=context["run_id"],
                                             halt_key=progress.halt_key(request.source_identifier)),
                       method_name="check_after_settle")
        return self.check_after_settle(context, {"status": "settled"})

    def check_after_settle(self, context, event: dict[str, Any] | None = None) -> Any:
        checked_event(event, "settled", "halted")  # halted: check_not_halted below names the rollback
        upgrade = upgrade_from(context, recorded_instances=True)
        state.check_not_halted(context, upgrade.request.source_identifier)
        result = self.step(upgrade, context)
        state.record_step(context, upgrade.request.source_identifier, self.task_id, "done", **self.progress_fields(result))
        return result

    def after_lag_wait(self, context, event: dict[str, Any] | None = None) -> Any:
        event = checked_event(event, "halted", "synced", "escalated")
        if event["status"] == "halted":
            raise AirflowFailException(f"halted by rollback while waiting for lag: {event['halt']}")
        if event["status"] == "synced":  # check everything again: other problems may have appeared meanwhile
            return self.check_after_settle(context, {"status": "settled"})
        upgrade = upgrade_from(context, recorded_instances=True)
        emit("lag_escalated", percent=int(self.percent), lag_bytes=event["lag_bytes"], waited_s=event["waited_s"])
        causes = upgrade.driver().lag_causes(upgrade.lag())
        result = {"percent": int(self.percent), "healthy": False, "gate": "lag", "lag_bytes": event["lag_bytes"],
                  "waited_s": event["waited_s"], "lag_causes": causes[:5]}
        state.record_step(context, upgrade.request.source_identifier, self.task_id, "done", **self.progress_fields(result))
        return result

    def step(self, upgrade, context):
        source = upgrade.request.source_identifier
        record = state.read(progress.record_key(source)) or {}
        baseline = record.get("conflict_baseline")
        report = upgrade.health_check(baseline, record.get("apply_error_baseline"))
        state.record_lag(source, context["run_id"], report.lag.bytes)  # a failing check's lag belongs in the chart too
        _report_conflicts(upgrade, baseline)
        comparison = upgrade.last_latency
        if comparison is not None:
            self.log.info("Latency, target against source (%s):\n%s", comparison.statements_from,
                          "\n".join(f"  {c['name']}: source {c['source_ms']} ms, target {c['target_ms']} ms"
                                    for c in comparison.compared) or "  nothing compared")
        if report.problems:
            if comparison is not None and comparison.regressed:
                self.log.error("Plans of the statements slower on the target:\n%s", comparison.explained())
            # The failed task's result: what regressed, with both plans side by side.
            context["ti"].xcom_push(key="latency", value=comparison.as_dict() if comparison else None)
            self._fail_phase(upgrade, context, report)
        if report.conflicts or report.apply_errors:  # the operator judges them at the decision gate; only newer
            # ones count afterwards. Apply errors reach this far only while replication flows (sort_apply_errors).
            state.record_step(context, source, self.task_id, "running", conflict_baseline=report.conflict_marks,
                              apply_error_baseline=report.apply_error_marks)
            if report.conflicts:
                emit("conflicts_found", percent=int(self.percent), conflicts=len(report.conflicts),
                     first=report.conflicts[0])
            if report.apply_errors:
                emit("apply_errors_found", percent=int(self.percent), apply_errors=len(report.apply_errors),
                     first=report.apply_errors[0])
            return {"percent": int(self.percent), "healthy": False, "gate": decision_kind(report),
                    "lag_bytes": report.lag.bytes, "conflicts": report.conflicts,  # bounded by the driver: the
                    "apply_errors": report.apply_errors}  # first rows per node, then a count; one line per worker
        if report.lag_high:
            emit("lag_high", percent=int(self.percent), lag_bytes=report.lag.bytes, causes=report.lag_causes)
            self.defer(trigger=lag_trigger(upgrade, context, self.poll_interval, fire_on_escalation=True),
                       method_name="after_lag_wait",
                       timeout=timedelta(minutes=upgrade.request.lag_escalation_minutes + 10))
        return {"percent": int(self.percent), "healthy": True, "lag_bytes": report.lag.bytes,
                "latency": comparison.as_dict() if comparison else None}

    def _fail_phase(self, upgrade: Upgrade, context, report: HealthReport) -> None:
        source, problems = upgrade.request.source_identifier, report.all_problems()
        # Conflicts reported now are the operator's to judge: a cleared check fails again only on newer ones.
        state.record_step(context, source, self.task_id, "failed", conflict_baseline=report.conflict_marks,
                          apply_error_baseline=report.apply_error_marks)
        with upgrade.acting(halted_check(context, upgrade)) as connection:  # a rollback owns the traffic once halted
            upgrade.check_not_switched(connection)
            restored = self._restore_last_healthy(upgrade, context)
        emit("phase_failed", percent=int(self.percent), problems=problems, restored=restored)
        raise AirflowFailException(
            f"health checks failed at {self.percent} %: {'; '.join(problems)}; traffic restored to {restored}. "
            "Fix the cause and clear the failed tasks (only_failed), or trigger pgactive_upgrade_rollback."
        )

    def progress_fields(self, result):
        return {}

    def _just_shifted(self, context) -> bool:
        """The first try right after its phase's shift ran (its result says so) finds the split where it must be:
        nothing else moves it until this phase's gate lets the next phase go (a rollback halts this check)."""
        ti = context["ti"]
        if self.shift_task_id is None or ti.try_number != 1:
            return False
        shifted = ti.xcom_pull(task_ids=self.shift_task_id, map_indexes=ti.map_index) or {}
        return shifted.get("percent") == int(self.percent)

    def _hold_phase_split(self, upgrade: Upgrade, context) -> None:
        """A check cleared after a failure (or a shift marked done without running) runs at its own phase's split,
        not at the one it restored."""
        with upgrade.acting(halted_check(context, upgrade)) as source:
            upgrade.check_not_switched(source)
            upgrade.shift(int(self.percent))

    def _restore_last_healthy(self, upgrade: Upgrade, context) -> dict:
        index = context["ti"].map_index
        if index > 0:
            return upgrade.shift(upgrade.request.shift_percentages[index - 1])["split"]
        before = context["ti"].xcom_pull(task_ids="preflight") or {}
        controller = upgrade.controller()
        restore_split(controller, before.get("split") or {r.name: 0 for r in controller.routes})
        return controller.read_split()


class CutoverOperator(UpgradeStepOperator):
    recorded_instances = True

    def step(self, upgrade, context):
        record = state.read(progress.record_key(upgrade.request.source_identifier)) or {}
        if record.get("detached"):
            emit("cutover_skipped", reason="the old node is already detached: the cutover is done")
            return {"already_done": True, "detached": record["detached"]}
        self._refuse_unwatched(context)
        token = f"{context['run_id']}#{context['ti'].try_number}"
        result = upgrade.cutover(token, halted=lambda: state.check_not_halted(context, upgrade.request.source_identifier))
        metrics.cutover(upgrade.request.source_identifier, result.get("write_unavailable_ms"), result.get("split"))
        return result

    def progress_fields(self, result):
        fields = {"phase": "cutover", "percent": 100, "split": result.get("split"), "cut_over": progress.now()}
        if result.get("write_unavailable_ms") is not None:
            fields["write_unavailable_ms"] = result["write_unavailable_ms"]
        return fields

    @staticmethod
    def _refuse_unwatched(context) -> None:
        """A cutover whose process dies must be settled by the watchdog: cleared alone, it would run unwatched."""
        if under_dag_test(context):
            return
        ti = context["ti"]
        watching = ti.get_ti_count(dag_id=ti.dag_id, run_ids=[context["run_id"]], task_ids=[WATCHDOG_TASK_ID],
                                   states=["scheduled", "queued", "running", "deferred", "up_for_reschedule"])
        if not watching:
            raise AirflowFailException(
                f"{WATCHDOG_TASK_ID} is not watching: clear it together with cutover (select both in the UI, or "
                "task_ids [cutover, cutover_watchdog] in clearTaskInstances), so a death mid-switch is settled at once"
            )


class VerifyOperator(UpgradeStepOperator, SkipMixin):
    """Every selected row equal on both nodes while writes go on; before cutover (the run stops before the switch
    when it fails) and after it. Its progress goes into the upgrade's record as `verify_progress`. The approval gate
    after it (gate_task_id) is skipped when the conf asks for no approval."""
    recorded_instances = True
    inherits_from_skipmixin = True  # the scheduler skips the gate again when it alone is cleared

    def __init__(self, *, gate_task_id: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self.gate_task_id = gate_task_id

    def execute(self, context) -> Any:
        upgrade = upgrade_from(context, recorded_instances=self.recorded_instances)
        result = self.run_step(upgrade, context)
        if self.gate_task_id is None:
            return result
        gate = cast("ApprovalGateOperator", self.dag.get_task(self.gate_task_id))
        if not gate.asks(upgrade.request):
            skip_unasked_gate(self, context, self.gate_task_id, result)
        return result

    def step(self, upgrade, context):
        key = progress.record_key(upgrade.request.source_identifier)
        result = upgrade.verify(progress=lambda figures: state.merge(key, {"verify_progress": {"task": self.task_id, **figures}}))
        metrics.verify_rate(upgrade.request.source_identifier, self.task_id, result["rows_per_second"])
        return result

    def progress_fields(self, result: Any) -> dict:
        return {"verify_progress": {"task": self.task_id, "chunks_done": result["chunks"], "chunks": result["chunks"],
                                    "rows": result["rows"], "rows_per_second": result["rows_per_second"]}}


class CutoverWatchdogOperator(BaseOperator):
    """Runs beside the cutover and waits in the triggerer: if the cutover's process dies mid-switch (its lock on the
    source is then free while the switch state is unsettled), it settles the switch within seconds, so writes
    resume on exactly one node without anyone acting. Ends when the cutover task ends."""

    ui_color = "#fdf3e8"

    def __init__(self, *, cutover_task_id: str = "cutover", poll_interval: float = 1.0,
                 upgrade_from_record: bool = False, **kwargs):
        """upgrade_from_record: in the rollback DAG, whose conf names only the source, the upgrade's own conf."""
        super().__init__(**kwargs)
        self.cutover_task_id = cutover_task_id
        self.poll_interval = poll_interval
        self.upgrade_from_record = upgrade_from_record

    def _upgrade(self, context) -> Upgrade:
        if not self.upgrade_from_record:
            return upgrade_from(context, recorded_instances=True)
        ask = config.validate_rollback(dict(context["dag_run"].conf or {}))
        record = state.read(progress.record_key(ask.source_identifier))
        if not record:
            raise AirflowFailException(f"source_instance: no upgrade of {ask.source_identifier!r} is recorded here")
        return upgrade_from_conf(record["conf"])

    def execute(self, context) -> dict | None:
        if under_dag_test(context):
            # dag.test() runs one task at a time (a deferred one inline): nothing runs beside it to watch.
            emit("watchdog_not_started", reason="dag.test runs one task at a time")
            return {"status": "not watched: dag.test"}
        upgrade = self._upgrade(context)
        request = upgrade.request
        # Checked here first: a deferral whose trigger fires within a second races the scheduler (it may take the
        # executor's first "success" for a stale event and fail the task), and a cutover may well be over by now.
        try:
            verdict = switch_verdict(upgrade.endpoint(upgrade.source), upgrade.admin, upgrade.key)
        except Exception as error:  # the source unreachable for a moment: the trigger keeps asking
            emit("watchdog_precheck_failed", error=type(error).__name__)
            verdict = "acting"
        if verdict == "abandoned":
            return self.execute_complete(context, {"status": "abandoned"})
        if verdict != "acting" and context["ti"].get_ti_count(
                dag_id=context["ti"].dag_id, task_ids=[self.cutover_task_id], run_ids=[context["run_id"]],
                states=["success", "failed", "upstream_failed", "skipped"]):
            return {"status": "finished", "switch": verdict}
        self.defer(
            trigger=SwitchWatchdogTrigger(
                source=_node_spec(upgrade.link().source),
                db_conn_id=request.db_conn_id,
                key=upgrade.key,
                dag_id=context["ti"].dag_id,
                run_id=context["run_id"],
                cutover_task_id=self.cutover_task_id,
                halt_key=progress.halt_key(request.source_identifier),
                poll_interval=self.poll_interval,
            ),
            method_name="execute_complete",
            timeout=None if self.execution_timeout is None else self.execution_timeout,
        )

    def execute_complete(self, context, event: dict[str, Any] | None = None) -> dict:
        event = checked_event(event, "abandoned", "finished", "halted")
        if event.get("status") != "abandoned":
            return event
        upgrade = self._upgrade(context)
        try:
            result = upgrade.recover_switch(token=f"watchdog:{context['run_id']}")
        except LockBusy:
            emit("watchdog_stood_down", reason="a live process took the switch over")
            return {**event, "recovered": False}
        emit("switch_recovered", by="watchdog", before=result["before"], after=result["after"])
        after = result["after"] or {}
        writer = "target" if after.get("direction") == "cutover" and after.get("phase") == "done" else "source"
        fields = {"writer": writer, "switch": after}
        if writer == "target":  # the cutover task never reported it: later runs and the rollback must know
            fields["cut_over"] = progress.now()
        state.merge(progress.record_key(upgrade.request.source_identifier), fields)
        return {**event, "recovered": True, **result}


class DetachOldNodeOperator(UpgradeStepOperator):
    recorded_instances = True

    def step(self, upgrade, context):
        return upgrade.detach(halted_check(context, upgrade))

    def progress_fields(self, result):
        return {} if result.get("skipped") else {"detached": progress.now()}


class DecommissionSourceOperator(UpgradeStepOperator):
    def step(self, upgrade, context):
        return upgrade.decommission(final_snapshot_id(upgrade.request, context))


def refuse_plan_only(request: config.UpgradeRequest, task_id: str) -> None:
    """Preflight skips every later task of a plan_only run; one cleared or run by hand must not act either."""
    if request.plan_only:
        raise AirflowFailException(f"{task_id}: this run is plan_only: it makes a plan and changes nothing")


def skip_unasked_gate(step: SkipMixin, context, gate_task_id: str, result: Any) -> None:
    """The gate after this step has nothing to ask: Airflow skips it at once, without a task process of its own (each
    costs a fleet about 0.4 s of CPU and a pool slot); the step ends there, its result kept. Unmapped steps only:
    Airflow does not skip from a task of a mapped group."""
    emit("gate_skipped", gate=gate_task_id, reason="nothing to ask")
    ti = context["ti"]
    ti.xcom_push(key="return_value", value=result)  # skip() ends the task before its result would be pushed
    step.skip(ti, [context["task"].dag.get_task(gate_task_id)])


def final_snapshot_id(request: config.UpgradeRequest, context) -> str:
    if request.final_snapshot_id:
        return request.final_snapshot_id
    stamp = context["dag_run"].run_after.strftime("%Y%m%d%H%M%S")
    return f"{request.source_identifier[:40]}-final-{stamp}"


class RollbackOperator(BaseOperator):
    """Halts the upgrade run of the named source, returns every route to the source, keeps replication running."""

    def execute(self, context) -> dict:
        ask = config.validate_rollback(dict(context["dag_run"].conf or {}))
        key = progress.record_key(ask.source_identifier)
        record = state.read(key)
        if not record:
            raise AirflowFailException(f"source_instance: no upgrade of {ask.source_identifier!r} is recorded here")
        if record.get("detached"):
            raise AirflowFailException(
                f"source_instance: the old node {ask.source_identifier} was detached from replication at "
                f"{record['detached']}; it no longer receives writes, and returning traffic to it would lose them"
            )
        request = config.validate(record["conf"])
        triggered_by = _triggering_user(context)  # the authenticated user of this run, whatever requested_by says
        requested_by = ask.requested_by or triggered_by
        halt = progress.halt_record(
            run_id=record["run_id"], requested_by=requested_by, reason=ask.reason, rollback_run_id=context["run_id"],
            triggered_by=triggered_by,
        )
        state.write(progress.halt_key(ask.source_identifier), halt)
        emit("rollback_requested", upgrade_run=record["run_id"], by=requested_by, triggered_by=triggered_by,
             run_type=str(getattr(context["dag_run"], "run_type", "")), reason=ask.reason, step=record.get("step"))
        record = state.read(key) or record  # read again after the halt: a step may have ended (or begun) meanwhile
        early = record.get("step") not in CUTOVER_OR_LATER and early_switch_to_source(request.traffic)
        upgrade = upgrade_from_conf(record["conf"])
        try:
            # Takes the upgrade's lock on the source: a live step finishes first (it stops on the halt flag); a dead
            # one left the lock free and its unfinished switch is settled before anything else.
            result = upgrade.rollback(token=f"rollback:{context['run_id']}#{context['ti'].try_number}")
        except LockBusy as error:
            moved = "; every route was already sent back to the source" if early else ""
            raise AirflowFailException(f"the rollback set the halt flag{moved}, and then: {error}") from error
        state.merge(key, {"state": "rolled_back", "run_state": progress.HALTED, "halted_by": halt, "rollback": halt,
                          "split": result["split"], "writer": "source"})
        metrics.rollback(ask.source_identifier, result["total_ms"], result["split"])
        emit("rolled_back", upgrade_run=record["run_id"], total_ms=result["total_ms"], after_cutover=result["after_cutover"])
        return {"upgrade_run_id": record["run_id"], "requested_by": requested_by, "triggered_by": triggered_by,
                "reason": ask.reason,
                "switched_before_waiting": early, **result}


DAG_TEST_USER = "dag_test"  # the triggering user dag.test() records on its runs
WATCHDOG_TASK_ID = "cutover_watchdog"


def under_dag_test(context) -> bool:
    return getattr(context["dag_run"], "triggering_user_name", None) == DAG_TEST_USER
CUTOVER_OR_LATER = ("cutover", "verify", "approve_decommission", "detach_old_node", "decommission_source")
CLAIM_WAIT_SECONDS = 15


def halted_check(context, upgrade: Upgrade):
    return lambda: state.check_not_halted(context, upgrade.request.source_identifier)


def _triggering_user(context) -> str:
    return getattr(context["dag_run"], "triggering_user_name", None) or "unknown"


def _report_conflicts(upgrade: Upgrade, baseline: dict | None) -> None:
    """The conflicts metric; reading the conflict history must not change what the health check decides."""
    try:
        count = new_conflicts(baseline, upgrade.conflict_marks()) if baseline else 0
    except Exception as error:
        emit("conflicts_not_counted", error=type(error).__name__)
        return
    metrics.conflicts(upgrade.request.source_identifier, count)


def decision_kind(report: HealthReport) -> str:
    """What the phase's decision gate asks about: conflicts, apply_errors or conflicts_and_apply_errors."""
    return "_and_".join(kind for kind, found in (("conflicts", report.conflicts), ("apply_errors", report.apply_errors))
                        if found)


def new_conflicts(baseline: dict | None, marks: dict) -> int:
    """Conflicts logged since the baseline an operator saw (conflict ids grow by one per conflict per node)."""
    return sum(max(0, int(mark) - int((baseline or {}).get(node, 0))) for node, mark in marks.items())


def checked_event(event: dict[str, Any] | None, *statuses: str) -> dict[str, Any]:
    """A trigger's event, refused unless it carries one of the statuses its trigger sends."""
    if not isinstance(event, dict) or event.get("status") not in statuses:
        raise AirflowFailException(f"unexpected trigger event {event!r}: expected a status among {list(statuses)}")
    return event
