"""The replication driver interface: what the DAG asks of any way of replicating old -> new."""

from __future__ import annotations

import logging
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

from psycopg2 import sql

from pgactive_upgrade import schema_drift
from pgactive_upgrade.catalog import META_SCHEMA, Table
from pgactive_upgrade.config import Filters
from pgactive_upgrade.identifiers import slug
from pgactive_upgrade.db import Credentials, Endpoint, connected, execute, qualified, query
from pgactive_upgrade.events import emit

MARKER_TABLE = "cutover_marker"


class ReplicationError(RuntimeError):
    pass


@dataclass(frozen=True)
class Node:
    identifier: str
    endpoint: Endpoint
    peer_endpoint: Endpoint  # how the other database server reaches this one


@dataclass(frozen=True)
class Link:
    source: Node
    target: Node
    admin: Credentials = field(repr=False)
    replication: Credentials = field(repr=False)
    tables: tuple[Table, ...]
    filters: Filters = field(default_factory=Filters)  # what the schema copy selects

    @property
    def key(self) -> str:
        return self.key_of(self.source.identifier)

    @staticmethod
    def key_of(source_identifier: str) -> str:
        return "pgu_" + slug(source_identifier)


@dataclass(frozen=True)
class Joining:
    """The target is joining (copying the database): the step comes back once join_progress() says 'ready'."""
    node: str


@dataclass(frozen=True)
class Lag:
    bytes: int | None  # None: unknown, which counts as unhealthy
    synced: bool
    detail: dict

    def within(self, threshold: int) -> bool:
        return self.synced and self.bytes is not None and self.bytes <= threshold


@dataclass(frozen=True)
class ApplyErrors:
    """Errors the apply (or table sync) workers recorded after apply_error_baseline: `named`, one line per worker
    (node, worker, what the server keeps of the error); `marks`, where each node's error record stood when they were
    read: the baseline once an operator judged them."""
    named: list[str] = field(default_factory=list)
    marks: dict = field(default_factory=dict)


def counted_beyond(count: int, seen: int) -> int:
    """What a counter counted after the mark `seen`; a count below it was reset (a restart, a stats reset)."""
    return count - seen if count >= seen else count


@dataclass(frozen=True)
class HealthLimits:
    """What the health checks hold replication to (the request's settings of the same names)."""
    lag_threshold_bytes: int = 1 << 20
    max_open_transaction_seconds: int = 300


class ReplicationDriver(ABC):
    name: ClassVar[str]
    active_active: ClassVar[bool]
    conflict_baseline: dict[str, int] | None = None  # conflicts an operator already saw (active-active drivers)
    apply_error_baseline: dict | None = None  # apply errors an operator already saw (see apply_errors)
    flow_check_seconds: float = 15.0  # how long a marker row may take to reach the other node (flow_problem)
    health_limits: HealthLimits = HealthLimits()

    def __init__(self, link: Link):
        self.link = link

    def source(self):
        return connected(self.link.source.endpoint, self.link.admin)

    def target(self):
        return connected(self.link.target.endpoint, self.link.admin)

    @abstractmethod
    def install(self) -> dict:
        """Prepare both nodes (extension, helper objects); idempotent."""

    @abstractmethod
    def build(self, wait: bool = True) -> dict | Joining:
        """Copy the schema and start replicating source -> target; idempotent. wait=False: a driver whose build
        waits for a join returns Joining instead (the caller waits elsewhere, then calls build again)."""

    def join_progress(self) -> str:
        """'ready', 'joining', 'stalled' (the join's worker is not running) or 'absent', for a driver that joins."""
        return "ready"

    @abstractmethod
    def lag(self) -> Lag:
        """Bytes still to replicate towards the node that does not take writes yet."""

    def before_fence(self) -> None:  # noqa: B027 (optional hook: most drivers have nothing to do here)
        """Cutover work that can happen before writes are fenced (keeps the fence short)."""

    @abstractmethod
    def prepare_reverse(self, target_connection=None) -> None:
        """Inside the write fence, before traffic switches: capture every later write on the target.
        target_connection: the cutover's open admin connection to the target, to use when given."""

    @abstractmethod
    def after_switch(self) -> dict:
        """After traffic switched: replicate target -> source so a rollback loses nothing."""

    @abstractmethod
    def abort_cutover(self) -> None:
        """Undo prepare_reverse when a cutover fails before the switch."""

    @abstractmethod
    def detach(self) -> dict:
        """Stop replicating between the nodes and remove the driver's objects; idempotent."""

    def clean_failed_join(self) -> dict:
        """Remove what a failed join left on the joining node; {} for a driver that does not join."""
        return {}

    def conflict_marks(self) -> dict[str, int]:
        """Where each node's conflict history stands now; {} for a driver that cannot conflict."""
        return {}

    def problems(self, conflicts: bool = True, apply_errors: bool = True) -> list[str]:
        """Health problems of the replication right now; empty when healthy.
        conflicts: False leaves out the conflicts `conflicts()` names (a health check asks an operator about them);
        apply_errors: False leaves out the errors `apply_errors()` names (health_check sorts them: sort_apply_errors)."""
        return self.lag_problems(self.lag()) + self.schema_problems()

    def apply_errors(self) -> ApplyErrors:
        """Errors the apply and sync workers recorded after apply_error_baseline; none for a driver keeping none."""
        return ApplyErrors()

    def flow_problem(self) -> str | None:
        """None when replication flows now: a marker row written on each publishing node reaches the other within
        flow_check_seconds (apply is in commit order, so a worker stuck on an earlier change never applies it);
        otherwise what did not arrive."""
        for side in sorted(self.publishing_nodes()):
            writer, reader = (self.source, self.target) if side == "source" else (self.target, self.source)
            other = self.link.target if side == "source" else self.link.source
            token = f"flow-{uuid.uuid4().hex}"
            with writer() as connection:
                self.write_marker(connection, token)
            deadline = time.monotonic() + self.flow_check_seconds
            with reader() as connection:
                while not self.has_marker(connection, token):
                    if time.monotonic() > deadline:
                        return (f"replication towards {other.identifier} is not flowing: a row written on the {side} "
                                f"did not arrive within {self.flow_check_seconds:.0f} s")
                    time.sleep(0.2)
        return None

    def lag_problems(self, lag: Lag) -> list[str]:
        return [] if lag.bytes is not None else [f"replication lag unknown: {lag.detail}"]

    def lag_causes(self, lag: Lag) -> list[str]:
        """While lag is above the threshold: what likely holds it back, named for the operator."""
        return []

    def conflicts(self, up_to: dict[str, int] | None = None) -> list[str]:
        """Conflicts newer than conflict_baseline (and not past the marks up_to), one line per conflict row;
        [] for a driver that cannot conflict."""
        return []

    def publishing_nodes(self) -> set[str]:
        """The nodes whose changes replicate to the other now: "source", "target" or both."""
        return {"source", "target"}

    def schema_problems(self) -> list[str]:
        """DDL made on one node after the schema copy (no driver replicates DDL) that breaks the apply; drift that
        does not (a nullable column added on the receiving node first) is logged as a warning."""
        tables = list(self.link.tables)
        with self.source() as source, self.target() as target:
            drift = schema_drift.differences(schema_drift.columns(source, tables), schema_drift.columns(target, tables),
                                             self.publishing_nodes())
        for warning in [d for d in drift if not d.breaks_apply]:
            emit("schema_drift_warning", log_level=logging.WARNING, detail=f"DDL after the schema copy: {warning.message}")
        return [f"DDL after the schema copy: {d.message}" for d in drift if d.breaks_apply]

    def ensure_marker_table(self, connection) -> None:
        execute(connection, sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(META_SCHEMA)))
        execute(
            connection,
            sql.SQL("CREATE TABLE IF NOT EXISTS {} (token text PRIMARY KEY, written_at timestamptz DEFAULT now())").format(
                qualified(META_SCHEMA, MARKER_TABLE)
            ),
        )

    def write_marker(self, connection, token: str) -> None:
        execute(
            connection,
            sql.SQL("INSERT INTO {} (token) VALUES (%s) ON CONFLICT DO NOTHING").format(qualified(META_SCHEMA, MARKER_TABLE)),
            (token,),
        )

    def has_marker(self, connection, token: str) -> bool:
        statement = sql.SQL("SELECT 1 FROM {} WHERE token = %s").format(qualified(META_SCHEMA, MARKER_TABLE))
        return bool(query(connection, statement, (token,)))
