"""Build the domain's Upgrade from a task's context: conf, Airflow connections and provider hooks."""

from __future__ import annotations

from airflow.sdk import BaseHook

from pgactive_upgrade import config
from pgactive_upgrade.db import Credentials
from pgactive_upgrade.upgrade import Upgrade


def request_from(context) -> config.UpgradeRequest:
    """The run's conf, validated; unknown keys are refused (Airflow itself keeps them silently)."""
    return config.validate(dict(context["dag_run"].conf or {}))


def credentials(conn_id: str) -> tuple[Credentials, str]:
    connection = BaseHook.get_connection(conn_id)
    if not connection.login or not connection.password:
        raise ValueError(f"connection {conn_id!r}: expected a login and a password")
    return Credentials(connection.login, connection.password), connection.schema or "postgres"


def upgrade_from(context) -> Upgrade:
    return upgrade_from_request(request_from(context))


def upgrade_from_conf(conf: dict) -> Upgrade:
    return upgrade_from_request(config.validate(conf))


def upgrade_from_request(request: config.UpgradeRequest) -> Upgrade:
    # Imported here: boto3 and the AWS hooks cost most of a task's DAG-parse time, which delays every task start.
    from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook
    from airflow.providers.amazon.aws.hooks.rds import RdsHook

    admin, dbname = credentials(request.db_conn_id)
    replication, _ = credentials(request.replication_conn_id)
    route53 = None
    if request.traffic["controller"] == "route53":
        route53 = AwsBaseHook(aws_conn_id=request.aws_conn_id, client_type="route53").get_conn()
    return Upgrade(
        request=request,
        rds_client=RdsHook(aws_conn_id=request.aws_conn_id).conn,
        admin=admin,
        replication=replication,
        dbname=dbname,
        route53_client=route53,
    )
