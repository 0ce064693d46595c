"""What a run may touch is the deployment's to say; logins come through the Postgres provider's hook, with TLS.

No servers here: the deployment's rules, the connection parameters handed to libpq, and the IAM path (an RDS auth
token is a presigned URL computed locally by botocore from the AWS connection's keys, no request is made).
"""

from __future__ import annotations

import json
from urllib.parse import parse_qs, urlsplit

import pytest
from airflow.sdk.exceptions import AirflowFailException

from pgactive_upgrade import config
from pgactive_upgrade.airflow import connections, session
from pgactive_upgrade.db import Credentials, Endpoint, Tls, conninfo
from pgactive_upgrade.deployment import VARIABLE, Deployment, DeploymentError, parse

RDS_HOST = "orders-db.abc123.us-east-1.rds.amazonaws.com"
ALLOWED = {
    "connections": {"db_conn_id": ["pgu_db_admin"], "replication_conn_id": ["pgu_replication"],
                    "probe_conn_id": ["pgu_probe"], "aws_conn_id": ["pgu_aws"]},
    "endpoint_override_targets": ["10.0.1.*:5432", "tunnel.internal.example.com:*"],
    "sources": {"identifiers": ["orders-db", "billing-*"], "tags": {"upgrade-allowed": "yes"}},
    "tls": {"root_cert": "/etc/ssl/rds-global-bundle.pem"},
}


def request(**conf) -> config.UpgradeRequest:
    return config.validate({"source_instance": "orders-db", "target_engine_version": "17.2", **conf})


def deployment(**changes) -> Deployment:
    return parse(json.dumps({**ALLOWED, **changes}))


# --- the deployment configuration ---------------------------------------------------------------------------

def test_without_the_variable_every_run_is_refused_naming_the_variable_and_the_readme_section():
    for raw in (None, ""):
        with pytest.raises(DeploymentError) as error:
            parse(raw)
        assert VARIABLE in str(error.value) and "Deployment security" in str(error.value)


@pytest.mark.parametrize("document, names", [
    ("{not json", "not JSON"),
    (json.dumps({**ALLOWED, "connections": {"db_conn_id": ["x"]}}), "connections: 'replication_conn_id' is a required"),
    (json.dumps({**ALLOWED, "tls": {"require_auth": "trust"}}), "tls.require_auth: 'trust' is not one of"),
    (json.dumps({**ALLOWED, "endpoint_overides": []}), "Additional properties are not allowed ('endpoint_overides'"),
])
def test_a_bad_deployment_configuration_is_refused_naming_the_field(document, names):
    with pytest.raises(DeploymentError, match="pgactive_upgrade_deployment") as error:
        parse(document)
    assert names in str(error.value)


def test_a_request_inside_the_deployment_passes():
    assert deployment().request_problems(request(endpoint_overrides={"orders-db": "10.0.1.17:5432"})) == []


@pytest.mark.parametrize("conf, field", [
    ({"db_conn_id": "someone_elses_admin"}, "db_conn_id: 'someone_elses_admin' is not allowed"),
    ({"replication_conn_id": "pgu_db_admin"}, "replication_conn_id: 'pgu_db_admin' is not allowed"),
    ({"probe_conn_id": "pgu_db_admin"}, "probe_conn_id: 'pgu_db_admin' is not allowed"),
    ({"aws_conn_id": "other_account"}, "aws_conn_id: 'other_account' is not allowed"),
    ({"endpoint_overrides": {"orders-db": "evil.example.com:5432"}},
     "endpoint_overrides.orders-db: 'evil.example.com:5432' is not an allowed override target"),
    ({"endpoint_overrides": {"orders-db": "10.0.1.17:5433"}}, "endpoint_overrides.orders-db: '10.0.1.17:5433'"),
    ({"endpoint_overrides": {"orders-db": "10.0.2.17:5432"}}, "endpoint_overrides.orders-db: '10.0.2.17:5432'"),
])
def test_each_redirect_through_the_conf_is_refused_naming_the_field(conf, field):
    problems = deployment().request_problems(request(**conf))
    assert len(problems) == 1 and problems[0].startswith(field), problems


def test_sources_are_allowed_by_identifier_pattern_or_by_every_listed_tag():
    allowed = deployment()
    assert allowed.source_problems("orders-db", {}) == []
    assert allowed.source_problems("billing-eu", {}) == []
    assert allowed.source_problems("payroll", {"upgrade-allowed": "yes", "team": "hr"}) == []
    refused = allowed.source_problems("payroll", {"upgrade-allowed": "no"})
    assert refused and refused[0].startswith("source_instance: 'payroll' is not an allowed source"), refused


def test_tls_defaults_to_verify_full_with_the_ca_bundle_and_scram_only():
    tls = deployment().tls(iam=False)
    assert tls.libpq() == {"sslmode": "verify-full", "sslrootcert": "/etc/ssl/rds-global-bundle.pem",
                           "require_auth": "scram-sha-256"}
    assert tls.peer_sslmode == "require"
    assert deployment(tls={}).tls(iam=False).sslrootcert == "/opt/airflow/certs/rds-global-bundle.pem"
    assert deployment().tls(iam=True).require_auth == "password", "an IAM token is sent as a password, over verify-full"


def test_the_local_only_opt_out_never_reaches_a_server_off_this_machine():
    local = deployment(tls={"local_only_no_tls": True}, endpoint_override_targets=["*:*"])
    assert local.request_problems(request(endpoint_overrides={"orders-db": "127.0.0.1:5432"})) == []
    problems = local.request_problems(request(endpoint_overrides={"orders-db": "10.0.1.17:5432"}))
    assert problems and "endpoint_overrides.orders-db: '10.0.1.17:5432' is not a loopback address" in problems[0]
    login = Credentials("postgres", "pw", local.tls(iam=False))
    assert login.libpq(Endpoint("127.0.0.1", 5432, "app"))["sslmode"] == "prefer"
    with pytest.raises(ValueError, match="loopback addresses only"):
        login.libpq(Endpoint(RDS_HOST, 5432, "app"))  # an instance without an override: its RDS endpoint
    with pytest.raises(DeploymentError, match="IAM database authentication needs TLS"):
        local.tls(iam=True)
    compose = deployment(tls={"local_only_no_tls": True, "local_hosts": ["pg-old"]}, endpoint_override_targets=["*:*"])
    assert compose.request_problems(request(endpoint_overrides={"orders-db": "pg-old:5432"})) == []
    assert compose.request_problems(request(endpoint_overrides={"orders-db": "pg-evil:5432"}))
    compose_login = Credentials("postgres", "pw", compose.tls(iam=False))
    assert compose_login.libpq(Endpoint("pg-old", 5432, "app"))["host"] == "pg-old"
    with pytest.raises(ValueError, match="loopback addresses only"):
        compose_login.libpq(Endpoint("pg-evil", 5432, "app"))


def test_an_override_given_as_an_address_still_checks_the_servers_own_name():
    endpoint = Endpoint("10.0.1.17", 6432, "app", server_host=RDS_HOST, server_port=5432)
    assert endpoint.libpq() == {"host": RDS_HOST, "hostaddr": "10.0.1.17", "port": "6432", "dbname": "app"}
    by_name = Endpoint("tunnel.internal.example.com", 6432, "app", server_host=RDS_HOST, server_port=5432)
    assert by_name.libpq()["host"] == "tunnel.internal.example.com"  # its certificate must name the tunnel
    assert Endpoint.from_dict(endpoint.as_dict()) == endpoint


def test_a_subscriptions_connection_string_carries_the_peer_sslmode_and_never_an_iam_token():
    login = Credentials("replicator", "s3cret", Tls(peer_sslmode="require"))
    assert conninfo(Endpoint(RDS_HOST, 5432, "app"), login).endswith("password='s3cret' sslmode='require'")
    with pytest.raises(ValueError, match="needs a password"):
        conninfo(Endpoint(RDS_HOST, 5432, "app"), Credentials("replicator", token=lambda *a: "token"))


# --- logins through PostgresHook ----------------------------------------------------------------------------

@pytest.fixture
def airflow_connections(monkeypatch):
    monkeypatch.setenv(f"AIRFLOW_VAR_{VARIABLE.upper()}", json.dumps(ALLOWED))
    monkeypatch.setenv("AIRFLOW_CONN_PGU_AWS_IAM", json.dumps({
        "conn_type": "aws", "login": "AKIAIAMTESTKEY000001", "password": "iam-test-secret-key",
        "extra": {"region_name": "us-east-1"}}))
    monkeypatch.setenv("AIRFLOW_CONN_PGU_DB_IAM", json.dumps({
        "conn_type": "postgres", "host": RDS_HOST, "port": 5432, "login": "upgrade_admin", "schema": "app",
        "extra": {"iam": True, "aws_conn_id": "pgu_aws_iam"}}))
    monkeypatch.setenv("AIRFLOW_CONN_PGU_DB_ADMIN", json.dumps({
        "conn_type": "postgres", "host": RDS_HOST, "port": 5432, "login": "postgres", "password": "admin-pw",
        "schema": "app"}))


def test_a_password_login_comes_from_the_connection_with_the_deployments_tls(airflow_connections):
    login, dbname = connections.credentials("pgu_db_admin", connections.deployment())
    assert (login.user, dbname, login.token) == ("postgres", "app", None)
    args = login.libpq(Endpoint(RDS_HOST, 5432, dbname))
    assert args["password"] == "admin-pw"
    assert (args["sslmode"], args["require_auth"]) == ("verify-full", "scram-sha-256")


def test_iam_asks_rds_for_a_token_through_the_aws_connection_for_the_servers_own_name(airflow_connections):
    login, _ = connections.credentials("pgu_db_iam", connections.deployment())
    assert login.password == "" and login.token is not None
    endpoint = Endpoint("10.0.1.17", 6432, "app", server_host=RDS_HOST, server_port=5432)  # through an override
    args = login.libpq(endpoint)
    token = urlsplit("https://" + args["password"])
    assert token.netloc == f"{RDS_HOST}:5432", "the token names the instance, not the tunnel"
    fields = parse_qs(token.query)
    assert fields["Action"] == ["connect"] and fields["DBUser"] == ["upgrade_admin"]
    assert fields["X-Amz-Credential"][0].startswith("AKIAIAMTESTKEY000001/"), "signed with the AWS connection's key"
    assert "/us-east-1/rds-db/aws4_request" in fields["X-Amz-Credential"][0]
    assert (args["sslmode"], args["require_auth"], args["hostaddr"]) == ("verify-full", "password", "10.0.1.17")


def test_a_login_kept_by_the_servers_for_replication_may_not_use_iam(airflow_connections):
    with pytest.raises(ValueError, match="replication_conn_id: connection 'pgu_db_iam' uses IAM"):
        connections.credentials("pgu_db_iam", connections.deployment(), for_servers=True,
                                field="replication_conn_id")


def test_an_unlisted_connection_is_refused_before_any_connection_is_read(airflow_connections):
    with pytest.raises(AirflowFailException, match="db_conn_id: 'no_such_connection' is not allowed"):
        session.upgrade_from_request(request(db_conn_id="no_such_connection"))


def test_without_the_variable_the_task_fails_without_retrying(airflow_connections, monkeypatch):
    monkeypatch.delenv(f"AIRFLOW_VAR_{VARIABLE.upper()}")
    with pytest.raises(AirflowFailException, match="no deployment configuration: an admin sets the Airflow Variable "
                                                   "pgactive_upgrade_deployment"):
        session.upgrade_from_request(request())
