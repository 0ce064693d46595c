"""The upgrade request: one JSON schema that validates conf and drives the Airflow trigger form."""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any

import jsonschema

from pgactive_upgrade.identifiers import source_key

IDENTIFIER = r"^[A-Za-z_][A-Za-z0-9_$]{0,62}$"
QUALIFIED_TABLE = r"^[A-Za-z_][A-Za-z0-9_$]{0,62}\.[A-Za-z_][A-Za-z0-9_$]{0,62}$"
RDS_IDENTIFIER = r"^(?!.*--)[A-Za-z](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$"
SOURCE_INSTANCE = r"^(arn:aws[a-z-]*:rds:[a-z0-9-]+:[0-9]{12}:db:)?(?!.*--)[A-Za-z](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$"
HOST_PORT = r"^[A-Za-z0-9_.-]+:[0-9]{1,5}$"
CONN_ID = r"^[A-Za-z0-9_.-]{1,250}$"
ENGINE_VERSION = r"^[0-9]{2}(\.[0-9]{1,2})?$"
INSTANCE_CLASS = r"^db\.[a-z0-9]+\.[a-z0-9]+$"
SUBNET_GROUP = r"^[A-Za-z0-9 ._-]{1,255}$"
SECURITY_GROUP = r"^sg-[0-9a-f]{8,17}$"
RUNTIME_API = r"^(/\S+|[A-Za-z0-9_.-]+:[0-9]{1,5})$"
ROUTE_NAME = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,253}$"
SINGLE_STATEMENT = r"^[^;]{1,2000}$"
HOSTED_ZONE = r"^(/hostedzone/)?[A-Z0-9]{1,32}$"

PATTERN_HINTS = {
    IDENTIFIER: "a PostgreSQL identifier (letter or underscore first, then letters, digits, _ or $; at most 63)",
    QUALIFIED_TABLE: "schema.table, each a plain PostgreSQL identifier",
    RDS_IDENTIFIER: "an RDS identifier (letter first, then letters, digits and single hyphens, at most 63, no trailing hyphen)",
    SOURCE_INSTANCE: "an RDS instance identifier or an RDS instance ARN (arn:aws:rds:REGION:ACCOUNT:db:NAME)",
    HOST_PORT: '"host:port"',
    CONN_ID: "an Airflow connection id (letters, digits, _ . -)",
    ENGINE_VERSION: "a PostgreSQL major or major.minor version such as 17 or 17.2",
    INSTANCE_CLASS: "an RDS instance class such as db.r6g.large",
    SUBNET_GROUP: "a DB subnet group name (letters, digits, spaces, . _ -; at most 255)",
    SECURITY_GROUP: "a VPC security group id such as sg-0123456789abcdef0",
    RUNTIME_API: '"host:port" of the HAProxy runtime API or an absolute unix socket path',
    HOSTED_ZONE: "a Route 53 hosted zone id such as Z0123456789ABC",
    ROUTE_NAME: "a HAProxy backend/server name or a DNS name (letters, digits, _ . -)",
    SINGLE_STATEMENT: "one SQL statement of 1 to 2000 characters, without ';'",
}

ROUTE_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": ROUTE_NAME},
        "carries_writes": {"type": "boolean"},
    },
}

TRAFFIC_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["controller"],
    "properties": {
        "controller": {"type": "string", "enum": ["haproxy", "route53"]},
        "haproxy": {
            "type": "object",
            "additionalProperties": False,
            "required": ["runtime_api", "routes"],
            "properties": {
                "runtime_api": {"type": "string", "pattern": RUNTIME_API},
                "routes": {"type": "array", "minItems": 1, "items": ROUTE_SCHEMA},
                "source_server": {"type": "string", "pattern": ROUTE_NAME},
                "target_server": {"type": "string", "pattern": ROUTE_NAME},
                "set_target_address": {"type": "boolean"},
            },
        },
        "route53": {
            "type": "object",
            "additionalProperties": False,
            "required": ["hosted_zone_id", "routes"],
            "properties": {
                "hosted_zone_id": {"type": "string", "pattern": HOSTED_ZONE},
                "ttl": {"type": "integer", "minimum": 1, "maximum": 86400},
                "routes": {"type": "array", "minItems": 1, "items": ROUTE_SCHEMA},
                "source_set_identifier": {"type": "string", "minLength": 1},
                "target_set_identifier": {"type": "string", "minLength": 1},
            },
        },
    },
}

DEFAULT_TRAFFIC = {
    "controller": "haproxy",
    "haproxy": {
        "runtime_api": "127.0.0.1:25469",
        "routes": [
            {"name": "pg_write", "carries_writes": True},
            {"name": "pg_read", "carries_writes": False},
        ],
        "source_server": "source",
        "target_server": "target",
    },
}


SECTIONS = ("What to upgrade", "Replication", "Traffic", "Safety", "Decommission", "Connections", "Rollback")


def _field(schema: dict, default: Any, title: str, description: str, section: str, example: Any = None) -> dict:
    """One conf field, declared once: the Params, the defaults and validation all follow from it."""
    assert section in SECTIONS, section
    return {"schema": schema, "default": default, "title": title, "description": description, "section": section,
            "example": example}


REQUIRED = object()

FIELDS: dict[str, dict] = {
    "source_instance": _field(
        {"type": "string", "pattern": SOURCE_INSTANCE},
        REQUIRED,
        "Source RDS instance",
        "Identifier or ARN of the RDS for PostgreSQL instance to upgrade.",
        "What to upgrade",
        example="orders-db",
    ),
    "target_engine_version": _field(
        {"type": "string", "pattern": ENGINE_VERSION},
        REQUIRED,
        "Target engine version",
        "PostgreSQL version of the new instance, e.g. 17.2 (major must be above the source's).",
        "What to upgrade",
        example="17.2",
    ),
    "target_instance": _field(
        {"type": "string", "pattern": r"^$|" + RDS_IDENTIFIER},
        "",
        "Target instance identifier",
        "Identifier of the new instance; empty: <source>-pg<major>.",
        "What to upgrade",
        example="orders-db-pg17",
    ),
    "instance_class": _field(
        {"type": "string", "pattern": r"^$|" + INSTANCE_CLASS},
        "",
        "Instance class",
        "Class of the new instance, e.g. db.r6g.large; empty: the source's.",
        "What to upgrade",
        example="db.r6g.large",
    ),
    "db_subnet_group": _field(
        {"type": "string", "pattern": r"^$|" + SUBNET_GROUP},
        "",
        "DB subnet group",
        "Subnet group of the new instance; empty: the source's.",
        "What to upgrade",
        example="orders-private",
    ),
    "security_group_ids": _field(
        {"type": "array", "items": {"type": "string", "pattern": SECURITY_GROUP}, "uniqueItems": True},
        [],
        "VPC security groups",
        "Security group ids of the new instance; empty: the source's.",
        "What to upgrade",
        example=["sg-0123456789abcdef0"],
    ),
    "replication_driver": _field(
        {"type": "string", "enum": ["native", "pgactive"]},
        "native",
        "Replication driver",
        "native: PostgreSQL logical replication (one-way, reversed at cutover). pgactive: active-active.",
        "Replication",
    ),
    "include_schemas": _field(
        {"type": "array", "items": {"type": "string", "pattern": IDENTIFIER}, "uniqueItems": True},
        [],
        "Include schemas",
        "Replicate only these schemas; empty: every non-system schema.",
        "Replication",
        example=["billing"],
    ),
    "exclude_schemas": _field(
        {"type": "array", "items": {"type": "string", "pattern": IDENTIFIER}, "uniqueItems": True},
        [],
        "Exclude schemas",
        "Schemas left out of the upgrade.",
        "Replication",
        example=["scratch"],
    ),
    "include_tables": _field(
        {"type": "array", "items": {"type": "string", "pattern": QUALIFIED_TABLE}, "uniqueItems": True},
        [],
        "Include tables",
        "schema.table names to replicate; empty: every table of the included schemas.",
        "Replication",
        example=["billing.invoices"],
    ),
    "exclude_tables": _field(
        {"type": "array", "items": {"type": "string", "pattern": QUALIFIED_TABLE}, "uniqueItems": True},
        [],
        "Exclude tables",
        "schema.table names left out of the upgrade.",
        "Replication",
        example=["billing.audit_log"],
    ),
    "shift_percentages": _field(
        {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 100}, "maxItems": 20},
        [10, 50],
        "Traffic shift phases",
        "Percent of traffic on the new instance in each phase before cutover, strictly increasing.",
        "Traffic",
        example=[10, 50],
    ),
    "phase_settle_seconds": _field(
        {"type": "integer", "minimum": 0, "maximum": 3600},
        60,
        "Settle time per phase (s)",
        "How long each phase holds its split before its health checks run.",
        "Traffic",
    ),
    "shift_mode": _field(
        {"type": "string", "enum": ["percent", "units"]},
        "percent",
        "Shift mode",
        "percent: each movable route carries the phase's share on the new instance. units: whole routes "
        "(sticky units such as one service per record) move, the phase's share of them, in the listed order.",
        "Traffic",
    ),
    "health_probes": _field(
        {"type": "array", "maxItems": 10, "items": {"type": "string", "pattern": SINGLE_STATEMENT}},
        [],
        "Health probe queries",
        "Extra SQL statements (one each, no ';') run on the new instance after each phase inside a READ ONLY "
        "transaction that is rolled back; each must succeed within the probe budget, and is timed on both instances "
        "for the latency comparison.",
        "Safety",
        example=["SELECT count(*) FROM billing.invoices WHERE id < 100"],
    ),
    "probe_budget_ms": _field(
        {"type": "integer", "minimum": 10, "maximum": 60000},
        1000,
        "Probe latency budget (ms)",
        "Connecting to the new instance and each probe query must finish within this many milliseconds.",
        "Safety",
    ),
    "max_latency_ratio": _field(
        {"type": "number", "minimum": 1, "maximum": 100},
        1.5,
        "Largest latency ratio new/old",
        "After each phase the probe queries (and the source's top read-only statements from pg_stat_statements, "
        "where available) are timed on both instances; the phase fails when the new instance's median exceeds the "
        "old one's by more than this factor (and by more than the latency floor).",
        "Safety",
    ),
    "latency_floor_ms": _field(
        {"type": "integer", "minimum": 0, "maximum": 60000},
        5,
        "Latency floor (ms)",
        "Differences of median latency below this many milliseconds never fail a phase (tiny timings are noisy).",
        "Safety",
    ),
    "latency_top_statements": _field(
        {"type": "integer", "minimum": 0, "maximum": 20},
        5,
        "Top statements compared",
        "How many of the source's statements by total time (pg_stat_statements; only SELECTs safe to re-run) are "
        "compared with the probes; 0: the probes only.",
        "Safety",
    ),
    "plan_only": _field(
        {"type": "boolean"},
        False,
        "Plan only",
        "Validate, run preflight and end with the plan (resources, reboots, steps, copy estimate, phases, fence, "
        "rollback path) in the task log and XCom; nothing is created, changed or rebooted.",
        "Safety",
    ),
    "rds_poll_seconds": _field(
        {"type": "integer", "minimum": 1, "maximum": 300},
        30,
        "RDS poll interval (s)",
        "While an instance is created, modified, rebooted or deleted the task waits in the triggerer (no worker slot) "
        "and asks RDS this often; raise it for a large fleet (API rate limits).",
        "Connections",
    ),
    "verify_parallelism": _field(
        {"type": "integer", "minimum": 1, "maximum": 16},
        4,
        "Verify parallelism",
        "Chunk digests run at once on each node during verification (before and after cutover); each holds one "
        "connection per node.",
        "Replication",
    ),
    "analyze_parallelism": _field(
        {"type": "integer", "minimum": 1, "maximum": 16},
        4,
        "ANALYZE parallelism",
        "Tables analyzed at once on the new instance after the initial sync, before any traffic reaches it "
        "(logical replication copies rows, not planner statistics).",
        "Replication",
    ),
    "lag_threshold_bytes": _field(
        {"type": "integer", "minimum": 0, "maximum": 1 << 40},
        1 << 20,
        "Lag threshold (bytes)",
        "Replication counts as in sync below this many bytes of pending WAL.",
        "Replication",
    ),
    "lag_escalation_minutes": _field(
        {"type": "integer", "minimum": 1, "maximum": 1440},
        15,
        "Lag escalation (minutes)",
        "Lag above the threshold for this long after a traffic phase pauses the shifts and asks an operator "
        "(keep waiting, continue, roll back); while waiting for the initial sync it is logged as an escalation.",
        "Replication",
    ),
    "cutover_deadline_seconds": _field(
        {"type": "integer", "minimum": 5, "maximum": 600},
        60,
        "Cutover deadline (s)",
        "The cutover undoes itself if the traffic switch is not reached within this time.",
        "Traffic",
    ),
    "max_open_transaction_seconds": _field(
        {"type": "integer", "minimum": 1, "maximum": 86400},
        300,
        "Longest open transaction (s)",
        "Preflight stops the run while a source transaction with writes has been open longer than this: "
        "replication slot creation and the initial copy wait for it.",
        "Replication",
    ),
    "application_roles": _field(
        {"type": "array", "items": {"type": "string", "pattern": IDENTIFIER}, "uniqueItems": True},
        [],
        "Application roles",
        "Roles whose writes are fenced at cutover; empty: every login role that is not a superuser, "
        "a replication role, an rds* role or the admin.",
        "Traffic",
        example=["orders_app"],
    ),
    "traffic": _field(
        TRAFFIC_SCHEMA,
        DEFAULT_TRAFFIC,
        "Traffic controller",
        "haproxy (runtime API) or route53 (weighted CNAME records) and the routes it moves.",
        "Traffic",
    ),
    "allow_source_reboot": _field(
        {"type": "boolean"},
        False,
        "Allow rebooting the source",
        "The source needs logical replication (or pgactive) in its parameter group; when that takes a reboot "
        "(a brief outage of the production database), the run stops in preflight unless this is true.",
        "Safety",
    ),
    "approve_cutover": _field(
        {"type": "boolean"},
        False,
        "Approve before cutover",
        "The run waits before the cutover until an operator approves (UI Required Actions or the REST API).",
        "Safety",
    ),
    "gate_timeout_minutes": _field(
        {"type": "integer", "minimum": 1, "maximum": 10080},
        120,
        "Gate timeout (minutes)",
        "How long a human gate (approval, lag escalation, conflicts) waits for an answer before gate_timeout_answer applies.",
        "Safety",
    ),
    "gate_timeout_answer": _field(
        {"type": "string", "enum": ["Stop", "Roll back"]},
        "Stop",
        "Answer when a gate times out",
        "Stop: the run fails at the gate, traffic stays where it is. Roll back: pgactive_upgrade_rollback is triggered. "
        "A gate never continues on its own.",
        "Safety",
    ),
    "decommission": _field(
        {"type": "string", "enum": ["keep", "delete"]},
        "keep",
        "Old instance after cutover",
        "keep: stays attached for rollback. delete: detach, final snapshot, delete.",
        "Decommission",
    ),
    "approve_decommission": _field(
        {"type": ["boolean", "null"]},
        None,
        "Approve before decommission",
        "The run waits after the last verification, before detaching the old node, until an operator approves; "
        "empty: on when decommission is delete.",
        "Decommission",
    ),
    "final_snapshot_id": _field(
        {"type": "string", "pattern": r"^$|" + RDS_IDENTIFIER},
        "",
        "Final snapshot identifier",
        "Snapshot taken before deletion; empty: <source>-final-<run date>.",
        "Decommission",
        example="orders-db-final",
    ),
    "endpoint_overrides": _field(
        {
            "type": "object",
            "propertyNames": {"pattern": RDS_IDENTIFIER},
            "additionalProperties": {"type": "string", "pattern": HOST_PORT},
        },
        {},
        "Endpoint overrides",
        'Instance identifier -> "host:port" to connect to instead of the RDS endpoint (tunnels, private endpoints).',
        "Connections",
        example={"orders-db": "10.0.0.5:5432"},
    ),
    "aws_conn_id": _field(
        {"type": "string", "pattern": CONN_ID},
        "pgu_aws",
        "AWS connection",
        "Airflow connection for the RDS and Route 53 APIs.",
        "Connections",
    ),
    "db_conn_id": _field(
        {"type": "string", "pattern": CONN_ID},
        "pgu_db_admin",
        "Database admin connection",
        "Airflow connection whose login, password and schema (database) are used on both instances.",
        "Connections",
    ),
    "replication_conn_id": _field(
        {"type": "string", "pattern": CONN_ID},
        "pgu_replication",
        "Replication connection",
        "Airflow connection of the replication role (login and password only).",
        "Connections",
    ),
    "probe_conn_id": _field(
        {"type": "string", "pattern": CONN_ID},
        "pgu_probe",
        "Health probe connection",
        "Airflow connection of the read-only role the health probes run as (never the admin).",
        "Connections",
    ),
}


ROLLBACK_FIELDS: dict[str, dict] = {
    "source_instance": {**FIELDS["source_instance"], "section": "Rollback"},
    "reason": _field(
        {"type": "string", "minLength": 3, "maxLength": 500},
        REQUIRED,
        "Reason",
        "Why the upgrade is rolled back; kept in the run history for the audit trail.",
        "Rollback",
        example="p99 latency doubled after phase 2",
    ),
    "requested_by": _field(
        {"type": "string", "maxLength": 200},
        "",
        "Requested by",
        "Who asks for the rollback; empty: the user who triggered this run.",
        "Rollback",
        example="jane@example.com",
    ),
}


class RequestError(ValueError):
    """Invalid upgrade request; the message names every offending field."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid upgrade request: " + "; ".join(problems))


@dataclass(frozen=True)
class Filters:
    include_schemas: tuple[str, ...] = ()
    exclude_schemas: tuple[str, ...] = ()
    include_tables: tuple[str, ...] = ()
    exclude_tables: tuple[str, ...] = ()

    def selects(self, schema: str, table: str) -> bool:
        qualified = f"{schema}.{table}"
        if schema in self.exclude_schemas or qualified in self.exclude_tables:
            return False
        if self.include_tables:
            return qualified in self.include_tables
        return not self.include_schemas or schema in self.include_schemas


@dataclass(frozen=True)
class UpgradeRequest:
    source_instance: str
    target_engine_version: str
    target_instance: str = ""
    instance_class: str = ""
    db_subnet_group: str = ""
    security_group_ids: tuple[str, ...] = ()
    replication_driver: str = "native"
    filters: Filters = field(default_factory=Filters)
    shift_percentages: tuple[int, ...] = (10, 50)
    shift_mode: str = "percent"
    health_probes: tuple[str, ...] = ()
    probe_budget_ms: int = 1000
    max_latency_ratio: float = 1.5
    latency_floor_ms: int = 5
    latency_top_statements: int = 5
    plan_only: bool = False
    rds_poll_seconds: int = 30
    analyze_parallelism: int = 4
    verify_parallelism: int = 4
    phase_settle_seconds: int = 60
    lag_threshold_bytes: int = 1 << 20
    lag_escalation_minutes: int = 15
    cutover_deadline_seconds: int = 60
    max_open_transaction_seconds: int = 300
    application_roles: tuple[str, ...] = ()
    traffic: dict = field(default_factory=lambda: dict(DEFAULT_TRAFFIC))
    allow_source_reboot: bool = False
    approve_cutover: bool = False
    gate_timeout_minutes: int = 120
    gate_timeout_answer: str = "Stop"
    decommission: str = "keep"
    approve_decommission: bool | None = None
    final_snapshot_id: str = ""
    endpoint_overrides: dict = field(default_factory=dict)
    aws_conn_id: str = "pgu_aws"
    db_conn_id: str = "pgu_db_admin"
    replication_conn_id: str = "pgu_replication"
    probe_conn_id: str = "pgu_probe"

    @property
    def source_identifier(self) -> str:
        return source_key(self.source_instance)

    @property
    def asks_before_decommission(self) -> bool:
        """approve_decommission, or when unset: whether the old instance is deleted."""
        if self.approve_decommission is None:
            return self.decommission == "delete"
        return self.approve_decommission

    @property
    def target_major(self) -> int:
        return int(self.target_engine_version.split(".")[0])


def defaults(fields: dict[str, dict] = FIELDS) -> dict[str, Any]:
    return {name: copy.deepcopy(spec["default"]) for name, spec in fields.items() if spec["default"] is not REQUIRED}


@dataclass(frozen=True)
class RollbackRequest:
    source_instance: str
    reason: str
    requested_by: str = ""

    @property
    def source_identifier(self) -> str:
        return source_key(self.source_instance)


def validate_rollback(conf: Any) -> RollbackRequest:
    return RollbackRequest(**_checked(conf, ROLLBACK_FIELDS, rules=[]))


def validate(conf: Any) -> UpgradeRequest:
    """Check conf against the schema and cross-field rules; raise RequestError naming each bad field."""
    return _build(_checked(conf, FIELDS, _CROSS_FIELD_RULES))


def _checked(conf: Any, fields: dict[str, dict], rules: list) -> dict[str, Any]:
    """conf merged over the defaults, or RequestError naming every bad field. A null value means the default
    (the trigger form sends null for an optional field left empty)."""
    if not isinstance(conf, dict):
        raise RequestError([f"conf: expected a JSON object, got {type(conf).__name__}"])
    unknown = [f"{key}: unknown field (expected one of: {', '.join(fields)})" for key in conf if key not in fields]
    given = {k: v for k, v in conf.items() if k in fields and v is not None}
    merged = {**defaults(fields), **given}
    problems, bad_fields = [], set()
    for name, spec in fields.items():
        found = [f"{name}: required, expected {spec['description']}"] if name not in merged else _schema_problems(
            name, merged[name], spec["schema"]
        )
        if found:
            bad_fields.add(name)
            problems.extend(found)
    problems = unknown + problems + _cross_field_problems(merged, bad_fields, rules)
    if problems:
        raise RequestError(problems)
    return merged


# JSON Schema counts 10.0 as an integer; the traffic and timing code must get real ints.
_StrictValidator = jsonschema.validators.extend(
    jsonschema.Draft7Validator,
    type_checker=jsonschema.Draft7Validator.TYPE_CHECKER.redefine(
        "integer", lambda _checker, value: isinstance(value, int) and not isinstance(value, bool)
    ),
)


def _schema_problems(name: str, value: Any, schema: dict) -> list[str]:
    errors = sorted(_StrictValidator(schema).iter_errors(value), key=lambda e: list(e.absolute_path))
    return [f"{_path(name, error.absolute_path)}: {_describe(error)}" for error in errors]


def _path(name: str, parts) -> str:
    return name + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts)


def _describe(error: jsonschema.ValidationError) -> str:
    value = repr(error.instance)
    if len(value) > 60:
        value = value[:57] + "..."
    if error.validator == "pattern":
        hint = PATTERN_HINTS.get(error.validator_value.removeprefix("^$|")) or f"the pattern {error.validator_value}"
        return f"{value} is not valid, expected {hint}"
    if error.validator == "additionalProperties" and error.validator_value is False:
        return "unknown key(s) " + ", ".join(re.findall(r"'([^']+)'", error.message.split("(", 1)[-1]))
    return error.message


def _cross_field_problems(conf: dict, bad_fields: set[str], rules: list) -> list[str]:
    """Rules across fields; a rule whose fields already failed the schema is skipped."""
    problems = []
    for fields, rule in rules:
        if not bad_fields & set(fields):
            problems.extend(rule(conf))
    return problems


def _phases_increase(conf: dict) -> list[str]:
    phases = conf["shift_percentages"]
    if any(b <= a for a, b in zip(phases, phases[1:])):
        return [f"shift_percentages: expected strictly increasing percentages, got {phases}"]
    return []


def _filters_consistent(conf: dict) -> list[str]:
    problems = []
    for kind in ("schemas", "tables"):
        both = set(conf[f"include_{kind}"]) & set(conf[f"exclude_{kind}"])
        if both:
            problems.append(f"exclude_{kind}: {sorted(both)} also listed in include_{kind}")
    excluded_schema_tables = [t for t in conf["include_tables"] if t.split(".")[0] in conf["exclude_schemas"]]
    if excluded_schema_tables:
        problems.append(f"include_tables: {excluded_schema_tables} lie in excluded schemas")
    return problems


def _ports_in_range(conf: dict) -> list[str]:
    addresses = {f"endpoint_overrides.{key}": value for key, value in conf["endpoint_overrides"].items()}
    haproxy = conf["traffic"].get("haproxy") or {}
    if ":" in haproxy.get("runtime_api", "") and not haproxy["runtime_api"].startswith("/"):
        addresses["traffic.haproxy.runtime_api"] = haproxy["runtime_api"]
    problems = []
    for where, value in addresses.items():
        port = int(value.rsplit(":", 1)[1])
        if not 1 <= port <= 65535:
            problems.append(f"{where}: port {port} out of range 1-65535")
    return problems


def _target_differs(conf: dict) -> list[str]:
    if conf["target_instance"] and source_key(conf["target_instance"]) == source_key(conf["source_instance"]):
        return ["target_instance: must differ from the source instance (RDS identifiers ignore case)"]
    return []


def _traffic_problems(conf: dict) -> list[str]:
    traffic = conf["traffic"]
    controller = traffic["controller"]
    settings = traffic.get(controller)
    if settings is None:
        return [f"traffic.{controller}: required when traffic.controller is {controller!r}"]
    problems = []
    names = [route["name"] for route in settings["routes"]]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        problems.append(f"traffic.{controller}.routes: duplicate route names {duplicates}")
    if not any(route.get("carries_writes", True) for route in settings["routes"]):
        problems.append(f"traffic.{controller}.routes: expected at least one route that carries writes")
    return problems


_CROSS_FIELD_RULES = [
    (("shift_percentages",), _phases_increase),
    (("include_schemas", "exclude_schemas", "include_tables", "exclude_tables"), _filters_consistent),
    (("endpoint_overrides", "traffic"), _ports_in_range),
    (("source_instance", "target_instance"), _target_differs),
    (("traffic",), _traffic_problems),
]


def _build(conf: dict) -> UpgradeRequest:
    filters = Filters(**{k: tuple(conf.pop(k)) for k in ("include_schemas", "exclude_schemas", "include_tables", "exclude_tables")})
    tuples = {k: tuple(conf[k]) for k in ("security_group_ids", "shift_percentages", "application_roles", "health_probes")}
    return UpgradeRequest(**{**conf, **tuples, "filters": filters})
