"""Waiting on RDS in the triggerer: the Amazon provider's triggers, and ours for "parameters in-sync".

A module of its own: the provider's hooks and aiobotocore take seconds to import, and every task imports the
operators while it parses the DAG; only a task that waits on RDS imports this.
"""

from __future__ import annotations

from pathlib import Path

from airflow.providers.amazon.aws.hooks.rds import RdsHook
from airflow.providers.amazon.aws.triggers.base import AwsBaseWaiterTrigger
from airflow.providers.amazon.aws.triggers.rds import RdsDbAvailableTrigger, RdsDbDeletedTrigger
from airflow.triggers.base import BaseTrigger

from pgactive_upgrade import rds


class UpgradeRdsHook(RdsHook):
    """The provider's RDS hook with this package's own waiters, declared as data in waiters/rds.json."""

    @property
    def waiter_path(self) -> Path:
        return Path(__file__).with_name("waiters") / "rds.json"


class RdsParametersInSyncTrigger(AwsBaseWaiterTrigger):
    """Waits until an instance is available with its parameter group in-sync (after a reboot or a modification)."""

    aws_hook_class = UpgradeRdsHook

    def __init__(self, db_identifier: str, waiter_delay: int, waiter_max_attempts: int, aws_conn_id: str | None,
                 region_name: str | None = None, verify: bool | str | None = None, botocore_config: dict | None = None):
        super().__init__(
            serialized_fields={"db_identifier": db_identifier},
            waiter_name="db_instance_parameters_in_sync",
            waiter_args={"DBInstanceIdentifier": db_identifier},
            failure_message=f"{db_identifier}: failed while waiting for its parameters to be in-sync",
            status_message=f"{db_identifier}: waiting for available and in-sync",
            status_queries=["DBInstances[0].DBInstanceStatus", "DBInstances[0].DBParameterGroups[0].ParameterApplyStatus"],
            return_key="db_identifier",
            return_value=db_identifier,
            waiter_delay=waiter_delay,
            waiter_max_attempts=waiter_max_attempts,
            aws_conn_id=aws_conn_id,
            region_name=region_name,
            verify=verify,
            botocore_config=botocore_config,
        )


RDS_WAIT_MINUTES = {rds.AVAILABLE: 60, rds.IN_SYNC: 60, rds.DELETED: 60}


def rds_wait_trigger(wait: rds.Wait, aws_conn_id: str, poll_seconds: int) -> BaseTrigger:
    """The trigger that waits out `wait`: the provider's for available and deleted, ours for in-sync."""
    attempts = max(1, RDS_WAIT_MINUTES[wait.until] * 60 // poll_seconds)
    if wait.until == rds.AVAILABLE:
        return RdsDbAvailableTrigger(db_identifier=wait.identifier, waiter_delay=poll_seconds, waiter_max_attempts=attempts,
                                     aws_conn_id=aws_conn_id, response={}, db_type="instance")
    if wait.until == rds.DELETED:
        return RdsDbDeletedTrigger(db_identifier=wait.identifier, waiter_delay=poll_seconds, waiter_max_attempts=attempts,
                                   aws_conn_id=aws_conn_id, response={}, db_type="instance")
    return RdsParametersInSyncTrigger(db_identifier=wait.identifier, waiter_delay=poll_seconds,
                                      waiter_max_attempts=attempts, aws_conn_id=aws_conn_id)
