"""The upgrade request schema: every field's rejection, cross-field rules, the built request, and the Airflow Params."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import pytest
from airflow.sdk import Param
from airflow.sdk.exceptions import ParamValidationError

from pgactive_upgrade.airflow.params import upgrade_params
from pgactive_upgrade.config import FIELDS, REQUIRED, Filters, RequestError, UpgradeRequest, validate

MINIMAL = {"source_instance": "orders-db", "target_engine_version": "17.2"}
ARN = "arn:aws:rds:eu-west-1:123456789012:db:orders-db"
RDS_HINT = "expected an RDS identifier"
IDENTIFIER_HINT = "expected a PostgreSQL identifier"
TABLE_HINT = "expected schema.table"
CONN_HINT = "expected an Airflow connection id"


def haproxy(**settings) -> dict:
    block = {"runtime_api": "127.0.0.1:26469", "routes": [{"name": "pg_write"}, {"name": "pg_read", "carries_writes": False}]}
    return {"controller": "haproxy", "haproxy": {**block, **settings}}


def route53(**settings) -> dict:
    block = {"hosted_zone_id": "Z0123456789ABC", "routes": [{"name": "db.example.com"}]}
    return {"controller": "route53", "route53": {**block, **settings}}


@dataclass(frozen=True)
class Rejection:
    field: str  # the FIELDS entry this case covers
    patch: dict  # merged over MINIMAL
    path: str  # the problem must start with "<path>: "
    expected: str  # ... and contain this (what was expected)
    cross_field: bool = False  # only validate() checks it; Airflow Params cannot

    @property
    def id(self) -> str:
        return f"{self.path}={self.patch[self.field]!r}"[:80]


def single(field: str, value, expected: str, path: str | None = None, cross_field: bool = False) -> Rejection:
    return Rejection(field, {field: value}, path or field, expected, cross_field)


REJECTIONS = [
    # source_instance
    single("source_instance", "1orders", "expected an RDS instance identifier or an RDS instance ARN"),
    single("source_instance", "orders--db", "expected an RDS instance identifier or an RDS instance ARN"),
    single("source_instance", "orders-db-", "expected an RDS instance identifier or an RDS instance ARN"),
    single("source_instance", "o" * 64, "expected an RDS instance identifier or an RDS instance ARN"),
    single("source_instance", "arn:aws:rds:eu-west-1:1234:db:orders-db", "expected an RDS instance identifier or an RDS instance ARN"),
    single("source_instance", "arn:aws:rds:eu-west-1:123456789012:cluster:orders",
           "expected an RDS instance identifier or an RDS instance ARN"),
    single("source_instance", 42, "is not of type 'string'"),
    # target_engine_version
    single("target_engine_version", "17.2.1", "expected a PostgreSQL major or major.minor version"),
    single("target_engine_version", "latest", "expected a PostgreSQL major or major.minor version"),
    single("target_engine_version", 17, "is not of type 'string'"),
    # target_instance
    single("target_instance", "-orders", RDS_HINT),
    single("target_instance", "orders_pg17", RDS_HINT),
    single("target_instance", "orders-db", "must differ from the source instance", cross_field=True),
    Rejection("target_instance", {"source_instance": ARN, "target_instance": "orders-db"}, "target_instance",
              "must differ from the source instance", cross_field=True),
    # instance_class
    single("instance_class", "r6g.large", "expected an RDS instance class"),
    # db_subnet_group
    single("db_subnet_group", "subnet/group", "expected a DB subnet group name"),
    # security_group_ids
    single("security_group_ids", ["sg-123"], "expected a VPC security group id", path="security_group_ids[0]"),
    single("security_group_ids", ["sg-0123456789abcdef0", "sg-0123456789abcdef0"], "has non-unique elements"),
    single("security_group_ids", "sg-0123456789abcdef0", "is not of type 'array'"),
    # replication_driver
    single("replication_driver", "bdr", "is not one of ['native', 'pgactive']"),
    # include/exclude schemas and tables
    single("include_schemas", ["1sales"], IDENTIFIER_HINT, path="include_schemas[0]"),
    single("include_schemas", "sales", "is not of type 'array'"),
    single("exclude_schemas", ["audit", "bad-name"], IDENTIFIER_HINT, path="exclude_schemas[1]"),
    Rejection("exclude_schemas", {"include_schemas": ["sales", "audit"], "exclude_schemas": ["audit"]}, "exclude_schemas",
              "['audit'] also listed in include_schemas", cross_field=True),
    single("include_tables", ["orders"], TABLE_HINT, path="include_tables[0]"),
    Rejection("include_tables", {"include_tables": ["audit.log", "sales.orders"], "exclude_schemas": ["audit"]},
              "include_tables", "['audit.log'] lie in excluded schemas", cross_field=True),
    single("exclude_tables", ["sales.orders.x"], TABLE_HINT, path="exclude_tables[0]"),
    Rejection("exclude_tables", {"include_tables": ["sales.orders"], "exclude_tables": ["sales.orders"]}, "exclude_tables",
              "['sales.orders'] also listed in include_tables", cross_field=True),
    # shift_percentages
    single("shift_percentages", [0, 50], "0 is less than the minimum of 1", path="shift_percentages[0]"),
    single("shift_percentages", [10, 101], "101 is greater than the maximum of 100", path="shift_percentages[1]"),
    single("shift_percentages", list(range(1, 22)), "is too long"),
    single("shift_percentages", [50, 10], "expected strictly increasing percentages", cross_field=True),
    single("shift_percentages", [10, 10, 50], "expected strictly increasing percentages", cross_field=True),
    single("shift_percentages", ["10"], "is not of type 'integer'", path="shift_percentages[0]"),
    # shift_mode, health_probes, probe_budget_ms
    single("shift_mode", "gradual", "is not one of"),
    single("health_probes", [""], "expected one SQL statement", path="health_probes[0]"),
    single("health_probes", ["SELECT 1; DELETE FROM t"], "without ';'", path="health_probes[0]"),
    single("health_probes", ["SELECT 1"] * 11, "is too long"),
    single("probe_budget_ms", 5, "less than the minimum of 10"),
    single("verify_parallelism", 0, "less than the minimum of 1"),
    single("rds_poll_seconds", 0, "less than the minimum of 1"),
    single("rds_poll_seconds", 301, "greater than the maximum of 300"),
    single("verify_parallelism", 17, "greater than the maximum of 16"),
    single("allow_source_reboot", "yes", "is not of type 'boolean'"),
    # latency comparison, statistics, plan
    single("max_latency_ratio", 0.9, "less than the minimum of 1"),
    single("max_latency_ratio", "1.5", "is not of type 'number'"),
    single("latency_floor_ms", -1, "less than the minimum of 0"),
    single("latency_top_statements", 21, "greater than the maximum of 20"),
    single("analyze_parallelism", 0, "less than the minimum of 1"),
    single("plan_only", "true", "is not of type 'boolean'"),
    # human gates
    single("approve_cutover", "no", "is not of type 'boolean'"),
    single("approve_decommission", "yes", "is not of type 'boolean', 'null'"),
    single("gate_timeout_minutes", 0, "less than the minimum of 1"),
    single("gate_timeout_minutes", 10081, "greater than the maximum of 10080"),
    single("gate_timeout_answer", "Continue", "is not one of ['Stop', 'Roll back']"),
    # integers
    single("phase_settle_seconds", -1, "less than the minimum of 0"),
    single("phase_settle_seconds", 3601, "greater than the maximum of 3600"),
    single("phase_settle_seconds", "60", "is not of type 'integer'"),
    single("phase_settle_seconds", True, "is not of type 'integer'"),
    single("lag_threshold_bytes", -1, "less than the minimum of 0"),
    single("lag_threshold_bytes", (1 << 40) + 1, "greater than the maximum of 1099511627776"),
    single("lag_escalation_minutes", 0, "less than the minimum of 1"),
    single("lag_escalation_minutes", 1441, "greater than the maximum of 1440"),
    single("cutover_deadline_seconds", 4, "less than the minimum of 5"),
    single("cutover_deadline_seconds", 601, "greater than the maximum of 600"),
    single("max_open_transaction_seconds", 0, "less than the minimum of 1"),
    single("max_open_transaction_seconds", 86401, "greater than the maximum of 86400"),
    # application_roles
    single("application_roles", ["app role"], IDENTIFIER_HINT, path="application_roles[0]"),
    single("application_roles", ["app", "app"], "has non-unique elements"),
    # traffic
    single("traffic", {"controller": "nginx"}, "is not one of ['haproxy', 'route53']", path="traffic.controller"),
    single("traffic", {"haproxy": haproxy()["haproxy"]}, "'controller' is a required property"),
    single("traffic", {**haproxy(), "haproxi": {}}, "unknown key(s) haproxi"),
    single("traffic", haproxy(weight=5), "unknown key(s) weight", path="traffic.haproxy"),
    single("traffic", haproxy(runtime_api="localhost"), "expected \"host:port\"", path="traffic.haproxy.runtime_api"),
    single("traffic", haproxy(routes=[]), "should be non-empty", path="traffic.haproxy.routes"),
    single("traffic", haproxy(routes=[{"name": ""}]), "expected a HAProxy backend/server name", path="traffic.haproxy.routes[0].name"),
    single("traffic", haproxy(routes=[{"name": "pg_write; set server x addr 1.2.3.4"}]), "expected a HAProxy backend/server name",
           path="traffic.haproxy.routes[0].name"),
    single("traffic", haproxy(routes=[{"name": "w", "carries_writes": "yes"}]), "is not of type 'boolean'",
           path="traffic.haproxy.routes[0].carries_writes"),
    single("traffic", haproxy(routes=[{"name": "w", "weight": 1}]), "unknown key(s) weight", path="traffic.haproxy.routes[0]"),
    single("traffic", haproxy(routes=[{"carries_writes": True}]), "'name' is a required property", path="traffic.haproxy.routes[0]"),
    single("traffic", {"controller": "haproxy", "haproxy": {"routes": [{"name": "w"}]}}, "'runtime_api' is a required property",
           path="traffic.haproxy"),
    single("traffic", route53(ttl=0), "less than the minimum of 1", path="traffic.route53.ttl"),
    single("traffic", route53(hosted_zone_id="Z-1"), "expected a Route 53 hosted zone id", path="traffic.route53.hosted_zone_id"),
    single("traffic", {"controller": "haproxy"}, "required when traffic.controller is 'haproxy'", path="traffic.haproxy",
           cross_field=True),
    single("traffic", {"controller": "route53", "haproxy": haproxy()["haproxy"]}, "required when traffic.controller is 'route53'",
           path="traffic.route53", cross_field=True),
    single("traffic", haproxy(routes=[{"name": "pg_write"}, {"name": "pg_write", "carries_writes": False}]),
           "duplicate route names ['pg_write']", path="traffic.haproxy.routes", cross_field=True),
    single("traffic", route53(routes=[{"name": "ro.example.com", "carries_writes": False}]),
           "expected at least one route that carries writes", path="traffic.route53.routes", cross_field=True),
    # decommission, final_snapshot_id
    single("decommission", "destroy", "is not one of ['keep', 'delete']"),
    single("final_snapshot_id", "orders_final", RDS_HINT),
    # endpoint_overrides
    single("endpoint_overrides", {"orders-db": "localhost"}, 'expected "host:port"', path="endpoint_overrides.orders-db"),
    single("endpoint_overrides", {"orders-db": "localhost:123456"}, 'expected "host:port"', path="endpoint_overrides.orders-db"),
    single("endpoint_overrides", {"orders-db": 5432}, "is not of type 'string'", path="endpoint_overrides.orders-db"),
    single("endpoint_overrides", {"orders_db": "localhost:5432"}, RDS_HINT),
    single("endpoint_overrides", {"orders-db": "localhost:70000"}, "port 70000 out of range 1-65535",
           path="endpoint_overrides.orders-db", cross_field=True),
    single("endpoint_overrides", {"orders-db": "localhost:0"}, "port 0 out of range 1-65535",
           path="endpoint_overrides.orders-db", cross_field=True),
    # connection ids
    single("aws_conn_id", "my aws", CONN_HINT),
    single("aws_conn_id", "", CONN_HINT),
    single("db_conn_id", "db/admin", CONN_HINT),
    single("replication_conn_id", "x" * 251, CONN_HINT),
    single("probe_conn_id", "bad id", CONN_HINT),
]


def problems_of(conf) -> list[str]:
    with pytest.raises(RequestError) as caught:
        validate(conf)
    assert str(caught.value) == "invalid upgrade request: " + "; ".join(caught.value.problems)
    return caught.value.problems


def assert_reported(problems: list[str], path: str, expected: str) -> None:
    matching = [p for p in problems if p.startswith(f"{path}: ") and expected in p]
    assert matching, f"no problem '{path}: ...{expected}...' in {problems}"


def test_every_field_has_a_rejection_case():
    covered = {case.field for case in REJECTIONS}
    assert set(FIELDS) - covered == set(), "add a rejection case for each new field"
    assert all(case.path.split(".")[0].split("[")[0] == case.field for case in REJECTIONS)


@pytest.mark.parametrize("case", REJECTIONS, ids=lambda case: case.id)
def test_rejection_names_the_field_and_what_was_expected(case: Rejection):
    problems = problems_of({**MINIMAL, **case.patch})
    assert_reported(problems, case.path, case.expected)


@pytest.mark.parametrize("decommission, approve, asks", [
    ("delete", None, True), ("keep", None, False), ("delete", False, False), ("keep", True, True)])
def test_approval_before_decommission_defaults_to_on_when_the_old_instance_is_deleted(decommission, approve, asks):
    request = validate({**MINIMAL, "decommission": decommission, "approve_decommission": approve})
    assert request.asks_before_decommission is asks
    assert request.approve_cutover is False and request.gate_timeout_answer == "Stop"


def test_minimal_conf_gets_the_defaults():
    request = validate(dict(MINIMAL))
    assert request == UpgradeRequest(source_instance="orders-db", target_engine_version="17.2")
    assert request.target_major == 17


@pytest.mark.parametrize("typo", ["source_instanse", "shift_percentage", "Traffic"])
def test_unknown_top_level_key_is_refused(typo):
    problems = problems_of({**MINIMAL, typo: "x"})
    assert_reported(problems, typo, "unknown field (expected one of: source_instance, target_engine_version")


def test_unknown_key_is_reported_with_the_other_problems():
    problems = problems_of({"source_instanse": "orders-db", "target_engine_version": "17.2"})
    assert_reported(problems, "source_instanse", "unknown field")
    assert_reported(problems, "source_instance", "required")


@pytest.mark.parametrize("missing", [name for name, spec in FIELDS.items() if spec["default"] is REQUIRED])
def test_required_field_missing(missing):
    conf = {k: v for k, v in MINIMAL.items() if k != missing}
    assert problems_of(conf) == [f"{missing}: required, expected {FIELDS[missing]['description']}"]


def test_required_fields_are_the_minimal_ones():
    assert {name for name, spec in FIELDS.items() if spec["default"] is REQUIRED} == set(MINIMAL)


@pytest.mark.parametrize("conf", [None, [], "source_instance=orders-db"])
def test_conf_must_be_an_object(conf):
    assert problems_of(conf) == [f"conf: expected a JSON object, got {type(conf).__name__}"]


def test_several_schema_problems_in_one_error():
    problems = problems_of({**MINIMAL, "source_instance": "1x", "shift_percentages": [0, 200], "decommission": "no",
                            "traffic": haproxy(routes=[{"name": ""}]), "typo": 1})
    assert_reported(problems, "typo", "unknown field")
    assert_reported(problems, "source_instance", "expected an RDS instance identifier")
    assert_reported(problems, "shift_percentages[0]", "minimum of 1")
    assert_reported(problems, "shift_percentages[1]", "maximum of 100")
    assert_reported(problems, "decommission", "is not one of")
    assert_reported(problems, "traffic.haproxy.routes[0].name", "expected a HAProxy backend/server name")
    assert len(problems) == 6


def test_several_cross_field_problems_in_one_error():
    problems = problems_of({**MINIMAL, "target_instance": "orders-db",
                            "shift_percentages": [50, 20], "include_schemas": ["a"], "exclude_schemas": ["a"],
                            "endpoint_overrides": {"orders-db": "h:0"}, "traffic": {"controller": "route53"}})
    assert sorted(p.split(":")[0] for p in problems) == sorted([
        "shift_percentages", "exclude_schemas", "traffic.route53", "endpoint_overrides.orders-db",
        "target_instance"])


def test_schema_and_cross_field_problems_in_one_error():
    problems = problems_of({**MINIMAL, "decommission": "destroy", "shift_percentages": [50, 10]})
    assert_reported(problems, "decommission", "is not one of")
    assert_reported(problems, "shift_percentages", "strictly increasing")


def test_pgactive_driver_is_accepted():
    assert validate({**MINIMAL, "replication_driver": "pgactive"}).replication_driver == "pgactive"


def test_arn_is_accepted_and_source_identifier_strips_it():
    request = validate({**MINIMAL, "source_instance": ARN})
    assert request.source_instance == ARN
    assert request.source_identifier == "orders-db"
    assert validate(dict(MINIMAL)).source_identifier == "orders-db"


@pytest.mark.parametrize("arn", [
    "arn:aws-us-gov:rds:us-gov-west-1:123456789012:db:orders-db",
    "arn:aws-cn:rds:cn-north-1:123456789012:db:orders-db",
])
def test_arn_of_other_partitions_accepted(arn):
    assert validate({**MINIMAL, "source_instance": arn}).source_identifier == "orders-db"


@pytest.mark.parametrize("good", ["o" * 63, "a", "orders-db-2", "Orders-DB"])
def test_rds_identifier_edges_accepted(good):
    assert validate({**MINIMAL, "source_instance": good}).source_instance == good


@pytest.mark.parametrize("phases", [[], [100], [1, 2, 3], list(range(1, 21))])
def test_shift_percentages_accepted(phases):
    assert validate({**MINIMAL, "shift_percentages": phases}).shift_percentages == tuple(phases)


@pytest.mark.parametrize("port", [1, 5432, 65535])
def test_endpoint_override_ports_accepted(port):
    overrides = {"orders-db": f"127.0.0.1:{port}", "orders-db-pg17": f"tunnel.local:{port}"}
    assert validate({**MINIMAL, "endpoint_overrides": overrides}).endpoint_overrides == overrides


def test_full_conf_round_trips_into_upgrade_request():
    traffic = route53(ttl=30, source_set_identifier="blue", target_set_identifier="green",
                      routes=[{"name": "rw.example.com"}, {"name": "ro.example.com", "carries_writes": False}])
    conf = {
        "source_instance": ARN,
        "target_engine_version": "17.2",
        "target_instance": "orders-db-new",
        "instance_class": "db.r6g.large",
        "db_subnet_group": "private subnets",
        "security_group_ids": ["sg-0123456789abcdef0", "sg-89abcdef"],
        "replication_driver": "native",
        "include_schemas": ["sales", "billing"],
        "exclude_schemas": ["audit"],
        "include_tables": ["sales.orders"],
        "exclude_tables": ["billing.tmp"],
        "shift_percentages": [5, 25, 75],
        "shift_mode": "units",
        "allow_source_reboot": True,
        "approve_cutover": True,
        "approve_decommission": False,
        "gate_timeout_minutes": 30,
        "gate_timeout_answer": "Roll back",
        "health_probes": ["SELECT count(*) FROM sales.orders"],
        "probe_budget_ms": 250,
        "verify_parallelism": 8,
        "max_latency_ratio": 2.5,
        "latency_floor_ms": 20,
        "latency_top_statements": 3,
        "analyze_parallelism": 2,
        "plan_only": True,
        "rds_poll_seconds": 5,
        "phase_settle_seconds": 0,
        "lag_threshold_bytes": 1 << 40,
        "lag_escalation_minutes": 1440,
        "cutover_deadline_seconds": 5,
        "max_open_transaction_seconds": 60,
        "application_roles": ["app", "report$ro"],
        "traffic": traffic,
        "decommission": "delete",
        "final_snapshot_id": "orders-db-final",
        "endpoint_overrides": {"orders-db": "127.0.0.1:26415"},
        "aws_conn_id": "aws.prod",
        "db_conn_id": "db-admin",
        "replication_conn_id": "repl_user",
        "probe_conn_id": "probe_ro",
    }
    assert set(conf) == set(FIELDS)
    request = validate(copy.deepcopy(conf))
    assert request == UpgradeRequest(
        source_instance=ARN, target_engine_version="17.2", target_instance="orders-db-new", instance_class="db.r6g.large",
        db_subnet_group="private subnets", security_group_ids=("sg-0123456789abcdef0", "sg-89abcdef"),
        replication_driver="native",
        filters=Filters(include_schemas=("sales", "billing"), exclude_schemas=("audit",), include_tables=("sales.orders",),
                        exclude_tables=("billing.tmp",)),
        shift_percentages=(5, 25, 75), shift_mode="units", allow_source_reboot=True, approve_cutover=True,
        approve_decommission=False, gate_timeout_minutes=30, gate_timeout_answer="Roll back",
        health_probes=("SELECT count(*) FROM sales.orders",), probe_budget_ms=250, verify_parallelism=8,
        max_latency_ratio=2.5, latency_floor_ms=20, latency_top_statements=3, analyze_parallelism=2, plan_only=True,
        rds_poll_seconds=5, phase_settle_seconds=0, lag_threshold_bytes=1 << 40, lag_escalation_minutes=1440,
        cutover_deadline_seconds=5, max_open_transaction_seconds=60, application_roles=("app", "report$ro"), traffic=traffic,
        decommission="delete",
        final_snapshot_id="orders-db-final", endpoint_overrides={"orders-db": "127.0.0.1:26415"}, aws_conn_id="aws.prod",
        db_conn_id="db-admin", replication_conn_id="repl_user", probe_conn_id="probe_ro")
    for name in ("security_group_ids", "shift_percentages", "application_roles", "health_probes"):
        assert type(getattr(request, name)) is tuple
    assert type(request.filters) is Filters
    assert all(type(getattr(request.filters, name)) is tuple for name in ("include_schemas", "exclude_schemas",
                                                                          "include_tables", "exclude_tables"))
    assert request.source_identifier == "orders-db"
    assert request.target_major == 17
    hash(request.filters)  # frozen and made of tuples: usable as a key


def test_validate_does_not_modify_the_conf():
    conf = {**MINIMAL, "include_schemas": ["sales"], "shift_percentages": [10, 20]}
    before = copy.deepcopy(conf)
    validate(conf)
    assert conf == before


class TestFiltersSelects:
    def test_empty_filters_select_everything(self):
        assert Filters().selects("sales", "orders")

    def test_include_schemas_limit_to_those_schemas(self):
        filters = Filters(include_schemas=("sales",))
        assert filters.selects("sales", "orders")
        assert not filters.selects("billing", "invoices")

    def test_exclude_schemas_drop_the_whole_schema(self):
        filters = Filters(exclude_schemas=("audit",))
        assert not filters.selects("audit", "log")
        assert filters.selects("sales", "orders")

    def test_include_tables_select_only_those_tables(self):
        filters = Filters(include_schemas=("sales",), include_tables=("sales.orders", "billing.invoices"))
        assert filters.selects("sales", "orders")
        assert filters.selects("billing", "invoices")
        assert not filters.selects("sales", "customers")

    def test_exclude_tables_drop_only_those_tables(self):
        filters = Filters(include_schemas=("sales",), exclude_tables=("sales.tmp",))
        assert not filters.selects("sales", "tmp")
        assert filters.selects("sales", "orders")

    def test_exclusion_wins_over_inclusion(self):
        filters = Filters(include_tables=("sales.orders",), exclude_tables=("sales.orders",), exclude_schemas=("audit",))
        assert not filters.selects("sales", "orders")
        assert not Filters(include_schemas=("audit",), exclude_schemas=("audit",)).selects("audit", "log")

    def test_matching_is_exact_not_prefix(self):
        filters = Filters(include_schemas=("sales",), exclude_tables=("sales.order",))
        assert filters.selects("sales", "orders")
        assert not filters.selects("sales_archive", "orders")

    def test_validate_builds_the_filters_that_select(self):
        request = validate({**MINIMAL, "include_schemas": ["sales"], "exclude_tables": ["sales.tmp"]})
        assert request.filters.selects("sales", "orders")
        assert not request.filters.selects("sales", "tmp")
        assert not request.filters.selects("public", "anything")


# Bugs found while writing these tests, fixed since; each test states the correct behaviour.

@pytest.mark.parametrize("field, value", [("shift_percentages", [10.0, 50.0]), ("phase_settle_seconds", 60.0),
                                          ("cutover_deadline_seconds", 30.0)])
def test_whole_floats_are_not_integers(field, value):
    path = f"{field}[0]" if isinstance(value, list) else field
    assert_reported(problems_of({**MINIMAL, field: value}), path, "integer")


def test_target_instance_equal_to_source_ignoring_case():
    problems = problems_of({**MINIMAL, "target_instance": "Orders-DB"})
    assert_reported(problems, "target_instance", "must differ from the source instance")


def test_runtime_api_port_out_of_range():
    problems = problems_of({**MINIMAL, "traffic": haproxy(runtime_api="127.0.0.1:99999")})
    assert_reported(problems, "traffic.haproxy.runtime_api", "out of range")


RAW_REGEX_MESSAGES = [
    ("instance_class", "r6g.large"),
    ("db_subnet_group", "subnet/group"),
    ("security_group_ids", ["sg-123"]),
    ("traffic", haproxy(runtime_api="localhost")),
    ("traffic", route53(hosted_zone_id="Z-1")),
]


@pytest.mark.parametrize("field, value", RAW_REGEX_MESSAGES, ids=[f"{f}={v!r}"[:60] for f, v in RAW_REGEX_MESSAGES])
def test_pattern_rejections_explain_in_words(field, value):
    problems = problems_of({**MINIMAL, field: value})
    assert problems and not any("expected the pattern" in p for p in problems), problems


# The Airflow Params: the trigger form validates with the same schema.

@pytest.fixture
def params() -> dict[str, Param]:
    return upgrade_params()


def test_a_param_for_every_field(params):
    assert list(params) == list(FIELDS)
    for name, param in params.items():
        assert param.schema["title"] == FIELDS[name]["title"]
        assert param.description.startswith(FIELDS[name]["description"])
        assert param.schema["section"] == FIELDS[name]["section"]


def test_form_marks_only_the_required_fields_and_groups_them(params):
    # The trigger form puts an asterisk on a field whose type does not admit null.
    required = {name for name, param in params.items() if "null" not in param.schema["type"]}
    assert required == {name for name, spec in FIELDS.items() if spec["default"] is REQUIRED}
    assert len({param.schema["section"] for param in params.values()}) >= 5
    assert "Example: " in params["source_instance"].description


def test_copies_of_the_params_share_the_schema_and_keep_their_own_value(params):
    """Airflow deep-copies the DAG's params into every operator: the copies share the schema (cheap), never a value."""
    copies = copy.deepcopy(params)
    for name, param in params.items():
        clone = copies[name]
        assert type(clone) is Param, "Airflow serializes only plain Params"
        assert clone is not param and clone.schema is param.schema
        assert clone.value == param.value
    assert copies["shift_percentages"].value is not params["shift_percentages"].value
    copies["shift_percentages"].resolve([50])
    assert params["shift_percentages"].value == FIELDS["shift_percentages"]["default"]
    with pytest.raises(ParamValidationError, match="No value passed"):
        copies["source_instance"].resolve()  # a required field stays without a default in every copy


def test_every_task_of_the_dag_gets_the_params_as_airflow_serializes_them():
    from airflow.dag_processing.dagbag import DagBag
    from airflow.providers.standard.operators.hitl import HITLOperator
    from airflow.serialization.serialized_objects import BaseSerialization

    dag_file = Path(__file__).resolve().parents[2] / "dags" / "pgactive_rolling_upgrade.py"
    dag = DagBag(dag_folder=str(dag_file)).dags["pgactive_rolling_upgrade"]
    plain = {name: copy.copy(param) for name, param in upgrade_params().items()}  # Param.__copy__: no hook
    expected = BaseSerialization._serialize_params_dict(plain)
    assert BaseSerialization._serialize_params_dict(dag.params) == expected
    for task in dag.tasks:
        if isinstance(task, HITLOperator):
            continue  # a gate's params are the fields of its own form
        assert all(task.params.get_param(name).schema is dag.params.get_param(name).schema for name in plain), task
        assert BaseSerialization._serialize_params_dict(task.params) == [
            (name, {**value, "source": "dag"}) for name, value in expected], task.task_id


def test_null_from_the_form_means_the_default(params):
    assert validate({**MINIMAL, "replication_driver": None, "traffic": None}) == validate(dict(MINIMAL))
    assert params["replication_driver"].resolve(None) is None
    assert problems_of({"source_instance": None, "target_engine_version": "17"}) == [
        "source_instance: required, expected " + FIELDS["source_instance"]["description"]
    ]


def test_param_defaults_are_valid_and_match_validate(params):
    request = validate(dict(MINIMAL))
    for name, spec in FIELDS.items():
        if spec["default"] is REQUIRED:
            with pytest.raises(ParamValidationError, match="No value passed"):
                params[name].resolve()
        else:
            assert params[name].resolve() == spec["default"]
    assert request.shift_percentages == tuple(params["shift_percentages"].resolve())


AGREEMENT = [
    ("source_instance", "orders--db"),
    ("source_instance", "1orders"),
    ("shift_percentages", [10, 101]),
    ("shift_percentages", [0]),
    ("replication_driver", "bdr"),
    ("traffic", {**haproxy(), "haproxi": {}}),
    ("traffic", haproxy(weight=5)),
    ("endpoint_overrides", {"orders-db": "localhost"}),
    ("endpoint_overrides", {"orders-db": "localhost:123456"}),
]


@pytest.mark.parametrize("field, value", AGREEMENT, ids=[f"{f}={v!r}"[:60] for f, v in AGREEMENT])
def test_param_and_validate_both_reject(params, field, value):
    with pytest.raises(ParamValidationError):
        params[field].resolve(copy.deepcopy(value))
    assert any(p.startswith(field) for p in problems_of({**MINIMAL, field: value}))


@pytest.mark.parametrize("case", [c for c in REJECTIONS if not c.cross_field and set(c.patch) == {c.field}],
                         ids=lambda case: case.id)
def test_param_rejects_every_schema_rejection(params, case: Rejection):
    with pytest.raises(ParamValidationError):
        params[case.field].resolve(copy.deepcopy(case.patch[case.field]))


@pytest.mark.parametrize("field, value", [
    ("source_instance", ARN),
    ("source_instance", "orders-db"),
    ("shift_percentages", [1, 100]),
    ("replication_driver", "native"),
    ("traffic", route53(ttl=60)),
    ("endpoint_overrides", {"orders-db": "127.0.0.1:26415"}),
])
def test_param_and_validate_both_accept(params, field, value):
    assert params[field].resolve(copy.deepcopy(value)) == value
    assert validate({**MINIMAL, field: value}) is not None
