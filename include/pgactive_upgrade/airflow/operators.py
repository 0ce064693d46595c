"""Operators: each runs one step of the Upgrade; the step itself is plain Python in pgactive_upgrade."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

from airflow.sdk import BaseOperator, BaseSensorOperator

from pgactive_upgrade import config
from pgactive_upgrade.airflow.session import request_from, upgrade_from
from pgactive_upgrade.airflow.triggers import ReplicationLagTrigger
from pgactive_upgrade.cutover import restore_split
from pgactive_upgrade.events import emit
from pgactive_upgrade.upgrade import Upgrade


class UpgradeStepOperator(BaseOperator):
    """Base: builds the Upgrade from the run's conf and connections, then runs `step`."""

    ui_color = "#e8f4fd"

    def execute(self, context) -> Any:
        return self.step(upgrade_from(context), context)

    def step(self, upgrade: Upgrade, context) -> Any:
        raise NotImplementedError


class ValidateRequestOperator(BaseOperator):
    """Refuses bad conf (including unknown keys) before anything is touched."""

    def execute(self, context) -> dict:
        request = request_from(context)
        emit("request_valid", source=request.source_instance, target_version=request.target_engine_version,
             driver=request.replication_driver, phases=list(request.shift_percentages))
        return {"source_instance": request.source_instance, "target_engine_version": request.target_engine_version}


class PreflightOperator(UpgradeStepOperator):
    def step(self, upgrade, context):
        return upgrade.preflight()


class ProvisionTargetOperator(UpgradeStepOperator):
    def step(self, upgrade, context):
        return upgrade.provision_target()


class ConfigureParametersOperator(UpgradeStepOperator):
    def step(self, upgrade, context):
        return upgrade.configure_parameters()


class InstallExtensionOperator(UpgradeStepOperator):
    def step(self, upgrade, context):
        return upgrade.install()


class BuildReplicationOperator(UpgradeStepOperator):
    def step(self, upgrade, context):
        return upgrade.build_group()


class WaitForSyncSensor(BaseSensorOperator):
    """Deferrable: the trigger measures lag in the triggerer, holding no worker slot."""

    def __init__(self, *, poll_interval: float = 5.0, **kwargs):
        super().__init__(**kwargs)
        self.poll_interval = poll_interval

    def execute(self, context) -> Any:
        upgrade = upgrade_from(context)
        request = upgrade.request
        lag = upgrade.lag()
        if lag.within(request.lag_threshold_bytes):
            emit("in_sync", lag_bytes=lag.bytes, detail=lag.detail)
            return {"lag_bytes": lag.bytes, "deferred": False}
        link = upgrade.link()
        self.defer(
            trigger=ReplicationLagTrigger(
                driver=request.replication_driver,
                source=_node_spec(link.source),
                target=_node_spec(link.target),
                db_conn_id=request.db_conn_id,
                replication_user=upgrade.replication.user,
                threshold_bytes=request.lag_threshold_bytes,
                escalate_after_seconds=request.lag_escalation_minutes * 60,
                poll_interval=self.poll_interval,
            ),
            method_name="execute_complete",
            timeout=self.timeout if self.timeout is None else timedelta(seconds=float(self.timeout)),
        )

    def execute_complete(self, context, event: dict[str, Any]) -> dict:
        if event.get("status") != "synced":
            raise RuntimeError(f"replication did not reach sync: {event}")
        emit("in_sync", lag_bytes=event["lag_bytes"], polls=event["polls"])
        return {"lag_bytes": event["lag_bytes"], "deferred": True, "polls": event["polls"]}


def _node_spec(node) -> dict:
    endpoint = node.endpoint
    return {"identifier": node.identifier, "host": endpoint.host, "port": endpoint.port, "dbname": endpoint.dbname}


class ShiftTrafficOperator(UpgradeStepOperator):
    """Runs the phases in order; after each: settle, health checks; on a failure, back to the last healthy split."""

    def step(self, upgrade, context):
        controller = upgrade.controller()
        healthy_split = controller.read_split()
        phases = []
        for percent in upgrade.request.shift_percentages:
            phase = upgrade.shift(percent)
            time.sleep(upgrade.request.phase_settle_seconds)
            problems = upgrade.health_problems()
            if problems:
                restore_split(controller, healthy_split)
                emit("phase_failed", percent=percent, problems=problems, restored=healthy_split)
                raise RuntimeError(
                    f"health checks failed at {percent} %: {'; '.join(problems)}; traffic restored to {healthy_split}. "
                    "Fix the cause and clear this task, or trigger pgactive_upgrade_rollback."
                )
            healthy_split = phase["split"]
            phases.append(phase)
        return {"phases": phases, "split": healthy_split}


class CutoverOperator(UpgradeStepOperator):
    def step(self, upgrade, context):
        token = f"{context['run_id']}#{context['ti'].try_number}"
        return upgrade.cutover(token)


class VerifyOperator(UpgradeStepOperator):
    def step(self, upgrade, context):
        return upgrade.verify()


class DetachOldNodeOperator(UpgradeStepOperator):
    def step(self, upgrade, context):
        return upgrade.detach()


class DecommissionSourceOperator(UpgradeStepOperator):
    def step(self, upgrade, context):
        return upgrade.decommission(final_snapshot_id(upgrade.request, context))


def final_snapshot_id(request: config.UpgradeRequest, context) -> str:
    if request.final_snapshot_id:
        return request.final_snapshot_id
    stamp = context["dag_run"].run_after.strftime("%Y%m%d%H%M%S")
    return f"{request.source_identifier[:40]}-final-{stamp}"
