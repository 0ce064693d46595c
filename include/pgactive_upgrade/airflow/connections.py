"""Database logins through the Postgres provider's hook (secrets backends, IAM database authentication), and the
deployment's configuration, read where the Airflow layer needs them (tasks and the triggerer)."""

from __future__ import annotations

import copy

from airflow.sdk import Variable

from pgactive_upgrade import deployment as deployment_config
from pgactive_upgrade.db import Credentials


def deployment() -> deployment_config.Deployment:
    return deployment_config.parse(Variable.get(deployment_config.VARIABLE, default=None))


def credentials(conn_id: str, deployment: deployment_config.Deployment, *, for_servers: bool = False,
                field: str = "db_conn_id") -> tuple[Credentials, str]:
    """The connection's login as Credentials, and its database. With the extra `iam` set, the password is an RDS
    IAM token made by PostgresHook for each server when connecting (through the extra's aws_conn_id).
    for_servers: the login is also handed to a server that reconnects with it for as long as replication runs
    (a subscription's connection string, a pgactive user mapping): a password, never an expiring token."""
    from airflow.providers.postgres.hooks.postgres import PostgresHook  # its import is slow: only when connecting

    hook = PostgresHook(postgres_conn_id=conn_id)
    connection = hook.connection
    iam = bool(connection.extra_dejson.get("iam", False))
    if iam and for_servers:
        raise ValueError(f"{field}: connection {conn_id!r} uses IAM authentication, but this role's login is kept by "
                         "the servers for replication and needs a password (README, Deployment security)")
    if not connection.login or not (iam or connection.password):
        raise ValueError(f"{field}: connection {conn_id!r}: expected a login and a password (or the extra iam)")
    token = _token_maker(hook, connection) if iam else None
    login = Credentials(connection.login, "" if iam else connection.password, deployment.tls(iam), token)
    return login, connection.schema or "postgres"


def _token_maker(hook, connection):
    def token(host: str, port: int, user: str) -> str:
        """An RDS IAM token for this server, through the AWS connection named in the extra (aws_conn_id)."""
        for_server = copy.copy(connection)
        for_server.host, for_server.port, for_server.login = host, port, user
        return hook.get_iam_token(for_server)[1]

    return token
