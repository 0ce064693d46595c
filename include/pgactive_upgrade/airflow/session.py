"""Build the domain's Upgrade from a task's context: conf, Airflow connections and provider hooks."""

from __future__ import annotations

from airflow.sdk.exceptions import AirflowFailException

from pgactive_upgrade import config, rds
from pgactive_upgrade.airflow import connections
from pgactive_upgrade.deployment import Deployment, DeploymentError
from pgactive_upgrade.upgrade import Upgrade


def request_from(context) -> config.UpgradeRequest:
    """The run's conf, validated; unknown keys are refused (Airflow itself keeps them silently)."""
    return config.validate(dict(context["dag_run"].conf or {}))


def allowed(request: config.UpgradeRequest) -> Deployment:
    """The deployment's configuration, when the request stays inside it; else the task fails (no retry), naming
    each field that reaches outside it."""
    try:
        deployment = connections.deployment()
    except DeploymentError as error:
        raise AirflowFailException(str(error)) from None
    problems = deployment.request_problems(request)
    if problems:
        raise AirflowFailException("refused by the deployment configuration: " + "; ".join(problems))
    return deployment


# configure_parameters records source and target (their endpoints, tags, versions) once the target is ready; the
# steps after it connect to them from this record instead of asking RDS again.
INSTANCES_TASK_ID, INSTANCES_KEY = "configure_parameters", "instances"


def upgrade_from(context, *, recorded_instances: bool = False) -> Upgrade:
    upgrade = upgrade_from_request(request_from(context))
    if recorded_instances:
        recorded = context["ti"].xcom_pull(task_ids=INSTANCES_TASK_ID, key=INSTANCES_KEY) or {}
        upgrade.known_instances = {role: rds.InstanceInfo.from_dict(info) for role, info in recorded.items()}
    return upgrade


def upgrade_from_conf(conf: dict) -> Upgrade:
    return upgrade_from_request(config.validate(conf))


def upgrade_from_request(request: config.UpgradeRequest) -> Upgrade:
    # Imported here: boto3 and the AWS hooks cost most of a task's DAG-parse time, which delays every task start.
    from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook
    from airflow.providers.amazon.aws.hooks.rds import RdsHook

    deployment = allowed(request)  # before any connection or client is made from the request
    admin, dbname = connections.credentials(request.db_conn_id, deployment,
                                            for_servers=request.replication_driver == "pgactive")
    replication, _ = connections.credentials(request.replication_conn_id, deployment, for_servers=True,
                                             field="replication_conn_id")
    probe, _ = connections.credentials(request.probe_conn_id, deployment, field="probe_conn_id")
    route53 = None
    if request.traffic["controller"] == "route53":
        route53 = LazyClient(lambda: AwsBaseHook(aws_conn_id=request.aws_conn_id, client_type="route53").get_conn())
    return Upgrade(
        request=request,
        rds_client=LazyClient(lambda: RdsHook(aws_conn_id=request.aws_conn_id).conn),
        admin=admin,
        replication=replication,
        probe=probe,
        dbname=dbname,
        deployment=deployment,
        route53_client=route53,
    )


class LazyClient:
    """An AWS client made on first use: creating one costs 0.06-0.2 s of CPU (0.01 s with aws_session.py's shared
    data), and most steps never change traffic (no Route 53 client needed)."""

    def __init__(self, make):
        self._make = make
        self._client = None

    def __getattr__(self, name: str):
        if self._client is None:
            self._client = self._make()
        return getattr(self._client, name)
