"""pgactive: an active-active group of the old and the new node, so traffic can move both ways in phases.

pgactive-facts.md explains the traps handled here: readiness is polled from pgactive_nodes (pgactive's own
wait function never notices a failed join), a failed join is cleaned up so the step can run again, a node
missing from the lag rows counts as unhealthy, sequences are not replicated, and pgactive_remove deletes the
conflict history and leaves foreign servers, user mappings and snowflake defaults behind.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from psycopg2 import sql

from pgactive_upgrade import catalog
from pgactive_upgrade.fencing import FENCE_TABLE
from pgactive_upgrade.switch_state import STATE_TABLE
from pgactive_upgrade.catalog import META_SCHEMA
from pgactive_upgrade.config import Filters
from pgactive_upgrade.identifiers import slug
from pgactive_upgrade.secret_sql import execute_unlogged
from pgactive_upgrade.db import Endpoint, connected, execute, qualified, query
from pgactive_upgrade.events import emit
from pgactive_upgrade.replication.base import (
    ApplyErrors, Joining, Lag, Node, ReplicationDriver, ReplicationError, counted_beyond,
)

STATUS_NAMES = {"b": "beginning", "i": "initializing", "c": "catching up", "o": "creating outbound slots",
                "r": "ready", "k": "detached"}
SEQUENCE_MARGIN = 1_000_000_000
_OWNER_GRANTS = (
    "GRANT USAGE ON SCHEMA pgactive TO {}",
    "GRANT SELECT ON pgactive.pgactive_conflict_handlers TO {}",
    "GRANT INSERT ON pgactive.pgactive_conflict_history TO {}",
    "GRANT USAGE ON SEQUENCE pgactive.pgactive_conflict_history_id_seq TO {}",
)


CONFLICT_EXPORT_TABLE = "pgactive_conflict_history_export"
_NEW_CONFLICTS = ("FROM pgactive.pgactive_conflict_history WHERE conflict_id > %s AND conflict_id <= %s "
                  "AND object_schema IS DISTINCT FROM 'pgactive'")
_NEW_CONFLICT_ROWS = ("SELECT conflict_id, conflict_type::text, object_schema, object_name, conflict_resolution::text, "
                      f"local_conflict_time {_NEW_CONFLICTS} ORDER BY conflict_id LIMIT %s")
_NEW_CONFLICT_COUNT = f"SELECT count(*), max(conflict_id) {_NEW_CONFLICTS}"
_NO_MARK = 2**63 - 1
# This database's workers: its per-db worker, and the apply workers whose (sysid, timeline, dboid) is the peer node
# they apply from (an apply worker's dboid is the peer's database, not this one).
_WORKER_ERRORS = (
    "SELECT w.worker_type, n.node_name, w.last_error, w.last_error_time FROM pgactive.pgactive_get_workers_info() w "
    "LEFT JOIN pgactive.pgactive_nodes n ON w.worker_type <> 'per-db' AND (n.node_sysid, n.node_timeline, "
    "n.node_dboid) = (w.sysid, w.timeline, w.dboid) WHERE w.last_error IS NOT NULL AND w.last_error <> 'none' "
    "AND (n.node_name IS NOT NULL OR (w.worker_type = 'per-db' AND w.dboid = "
    "(SELECT oid FROM pg_database WHERE datname = current_database()))) ORDER BY w.last_error_time"
)


# Per peer node: the transactions this database's apply worker from it rolled back. The replication origin of a
# peer is named pgactive_<its sysid>_<its timeline>_<its dboid>_<this dboid>_.
_APPLY_ROLLBACKS = (
    "SELECT n.node_name, s.nr_rollback FROM pgactive.pgactive_get_stats() s JOIN pgactive.pgactive_nodes n ON "
    "s.riremoteid = format('pgactive_%s_%s_%s_%s_', n.node_sysid, n.node_timeline, n.node_dboid, "
    "(SELECT oid FROM pg_database WHERE datname = current_database())) ORDER BY n.node_name"
)


def _named_apply_errors(node: str, newer: dict, failed: dict) -> list[str]:
    """One line per worker: rolled-back applies and/or its last error, whichever is new."""
    lines = []
    for peer in sorted(set(failed) | {peer for kind, peer in newer if kind == "apply" and peer}):
        error = newer.pop(("apply", peer), None)
        last = (f"last error {error[0].splitlines()[0][:100]} at {error[1]:%Y-%m-%d %H:%M:%S%z}" if error
                else "its last error no longer recorded (the worker applied again since)")
        lines.append(f"{node}: apply worker (from {peer}): {failed.get(peer, 0)} failed apply transaction(s), {last}; "
                     f"the message is in {node}'s server log")
    lines += [f"{node}: {kind} worker{f' (from {peer})' if peer else ''}: {error.splitlines()[0][:100]} at "
              f"{when:%Y-%m-%d %H:%M:%S%z}" for (kind, peer), (error, when) in newer.items()]
    return lines


def _time_order(moment: datetime | None) -> datetime:
    return moment or datetime.min.replace(tzinfo=UTC)


class JoinFailed(ReplicationError):
    pass


@dataclass(frozen=True)
class NodeState:
    name: str
    status: str | None  # None: no row for the node


class PgactiveDriver(ReplicationDriver):
    name = "pgactive"
    active_active = True
    ready_timeout_seconds: float = 1500.0  # inside build_replication's 30 min: the join copies the whole database
    poll_seconds: float = 1.0
    failed_join_polls: int = 3  # consecutive polls without the joining node's worker that mean the join died
    sequence_margin: int = SEQUENCE_MARGIN
    lag_threshold_bytes: int | None = None  # when set, problems() reports lag above it
    conflict_baseline: dict[str, int] | None = None  # node -> conflict_id already known; None: any row is new

    # --- names ---------------------------------------------------------------------------------
    @staticmethod
    def node_name(node: Node) -> str:
        return node.identifier

    @staticmethod
    def server_name(node: Node) -> str:
        return f"pgu_{slug(node.identifier)}"

    def node_dsn(self, node: Node) -> str:
        """Resolved on each node through its own foreign server for `node`: no password in pgactive's catalogs."""
        return f"user_mapping={_conninfo_quote(self.link.admin.user)} pgactive_foreign_server={self.server_name(node)}"

    @property
    def nodes(self) -> tuple[Node, Node]:
        return self.link.source, self.link.target

    def _connect(self, node: Node):
        return self.source() if node is self.link.source else self.target()

    # --- install -------------------------------------------------------------------------------
    def install(self) -> dict:
        for node in self.nodes:
            with self._connect(node) as connection:
                self._require_preloaded(connection, node)
                execute(connection, "CREATE EXTENSION IF NOT EXISTS pgactive")
                for peer in self.nodes:
                    self._ensure_server(connection, peer)
        with self.source() as source:
            self.ensure_marker_table(source)
        emit("pgactive_installed", nodes=[n.identifier for n in self.nodes])
        return {"extension": "pgactive", "servers": [self.server_name(n) for n in self.nodes]}

    @staticmethod
    def _require_preloaded(connection, node: Node) -> None:
        preload = query(connection, "SHOW shared_preload_libraries")[0][0]
        if "pgactive" not in [item.strip() for item in preload.split(",")]:
            raise ReplicationError(
                f"{node.identifier}: pgactive is not in shared_preload_libraries "
                "(on RDS set rds.enable_pgactive=1 in the parameter group and reboot)"
            )

    def _ensure_server(self, connection, peer: Node) -> None:
        """The peer as this node's server reaches it (peer_endpoint), with a user mapping for the admin role."""
        server = sql.Identifier(self.server_name(peer))
        options = _server_options(peer.peer_endpoint)
        exists = query(connection, "SELECT 1 FROM pg_foreign_server WHERE srvname = %s", (self.server_name(peer),))
        if exists:
            execute(connection, sql.SQL("ALTER SERVER {} OPTIONS ({})").format(server, _set_options(options)))
        else:
            execute(connection, sql.SQL("CREATE SERVER {} FOREIGN DATA WRAPPER pgactive_fdw OPTIONS ({})").format(
                server, _add_options(options)))
        admin = self.link.admin
        credentials = {"user": admin.user, "password": admin.password}
        mapped = query(connection, "SELECT 1 FROM pg_user_mappings WHERE srvname = %s AND usename = %s",
                       (self.server_name(peer), admin.user))
        verb = "ALTER USER MAPPING FOR {} SERVER {} OPTIONS ({})" if mapped else "CREATE USER MAPPING FOR {} SERVER {} OPTIONS ({})"
        statement = sql.SQL(verb).format(
            sql.Identifier(admin.user), server, (_set_options if mapped else _add_options)(credentials))
        execute_unlogged(connection, statement, admin.password, f"{verb.split(' FOR')[0]} for {admin.user} on "
                         f"{self.server_name(peer)}")

    # --- build ---------------------------------------------------------------------------------
    def build(self, wait: bool = True) -> dict | Joining:
        started = time.monotonic()
        source_name, target_name = self.node_name(self.link.source), self.node_name(self.link.target)
        if self.join_progress() == "ready":
            self.grant_conflict_lookup()
            moved = self.align_sequences()
            return {"group": source_name, "joined": target_name, "created": False, "sequences_moved": len(moved)}
        if not wait and self.join_progress() == "joining":
            return Joining(target_name)  # an earlier attempt's join is still copying
        self._clean_failed_join_if_any()
        created = self._ensure_group()
        excluded = self._exclude_filtered_tables()
        # Before the join: its catch-up applies writes made meanwhile as the tables' owners, who need the grants.
        self.grant_conflict_lookup()
        self._join()
        if not wait:
            emit("pgactive_joining", node=target_name, group=source_name, created=created, excluded=len(excluded))
            return Joining(target_name)
        self.wait_until_ready(started)
        self.grant_conflict_lookup()
        moved = self.align_sequences()
        seconds = round(time.monotonic() - started, 1)
        emit("pgactive_joined", node=target_name, group=source_name, seconds=seconds, excluded=len(excluded),
             sequences_moved=len(moved))
        return {"group": source_name, "joined": target_name, "created": created, "excluded_tables": excluded,
                "sequences_moved": len(moved), "seconds": seconds}

    def join_progress(self) -> str:
        """'ready' once both nodes see the target ready; 'joining' while it copies; 'stalled' while it is joining
        without a worker (a join that died, after a few such polls); 'absent' when it is in no group (or detached)."""
        target = self._local_status(self.link.target)
        if target == "r":
            return "ready" if self._status_seen_from(self.link.source, self.link.target) == "r" else "joining"
        if target in ("b", "i"):
            with self.target() as connection:
                return "joining" if self._perdb_worker_running(connection) else "stalled"
        return "joining" if target in ("c", "o") else "absent"  # catching up, creating its slots

    def _status_seen_from(self, observer: Node, node: Node) -> str | None:
        with self._connect(observer) as connection:
            if not self._extension_present(connection):
                return None
            rows = query(connection, "SELECT node_status::text FROM pgactive.pgactive_nodes WHERE node_name = %s",
                         (self.node_name(node),))
        return rows[0][0] if rows else None

    def _local_status(self, node: Node) -> str | None:
        """The node's own view of its status; None when pgactive is not active in its database."""
        with self._connect(node) as connection:
            if not self._extension_present(connection):
                return None
            rows = query(connection,
                         "SELECT node_status::text FROM pgactive.pgactive_nodes WHERE node_name = %s",
                         (self.node_name(node),))
        return rows[0][0] if rows else None

    @staticmethod
    def _extension_present(connection) -> bool:
        return bool(query(connection, "SELECT 1 FROM pg_extension WHERE extname = 'pgactive'"))

    def _ensure_group(self) -> bool:
        status = self._local_status(self.link.source)
        if status == "k":
            raise ReplicationError(f"{self.link.source.identifier}: the pgactive node is detached; remove it first")
        if status is not None:
            return False
        with self.source() as source:
            query(source, "SELECT pgactive.pgactive_create_group(node_name := %s, node_dsn := %s)",
                  (self.node_name(self.link.source), self.node_dsn(self.link.source)))
        self._wait_for_status(self.link.source, self.link.source, time.monotonic())
        return True

    def _excluded_tables(self) -> list[str]:
        replicated = {t.qualified_name for t in self.link.tables}
        with self.source() as source:
            present = catalog.user_tables(source)
            # Each node keeps its own switch state and fence record: they must never replicate.
            own = [f"{META_SCHEMA}.{name}" for name in (STATE_TABLE, FENCE_TABLE)
                   if query(source, "SELECT to_regclass(%s)", (f"{META_SCHEMA}.{name}",))[0][0]]
        return [name for name in present if name not in replicated] + own

    def _exclude_filtered_tables(self) -> list[str]:
        """Only possible while the source is the group's single node: between create_group and join_group."""
        excluded = self._excluded_tables()
        if not excluded:
            return []
        with self.source() as source:
            if self._live_nodes(source) > 1:
                return excluded
            for name in excluded:
                schema, table = name.split(".", 1)
                query(source, "SELECT pgactive.pgactive_exclude_table_replication_set(format('%%I.%%I', %s, %s)::regclass)",
                      (schema, table))
        return excluded

    @staticmethod
    def _live_nodes(connection) -> int:
        return query(connection, "SELECT count(*) FROM pgactive.pgactive_nodes WHERE node_status <> 'k'")[0][0]

    def _join(self) -> None:
        with self.target() as target:
            if self._extension_present(target) and query(
                target, "SELECT 1 FROM pgactive.pgactive_nodes WHERE node_name = %s", (self.node_name(self.link.target),)
            ):
                return
            present = catalog.user_tables(target)
            if present:
                raise ReplicationError(
                    f"{self.link.target.identifier}: the database to join must be empty; it holds {present[:10]}"
                )
            query(
                target,
                "SELECT pgactive.pgactive_join_group(node_name := %s, node_dsn := %s, join_using_dsn := %s)",
                (self.node_name(self.link.target), self.node_dsn(self.link.target), self.node_dsn(self.link.source)),
            )

    def wait_until_ready(self, started: float | None = None) -> None:
        started = time.monotonic() if started is None else started
        try:
            self._wait_for_status(self.link.target, self.link.target, started)
            self._wait_for_status(self.link.source, self.link.target, started)
        except JoinFailed as error:
            cleaned = self.clean_failed_join()
            raise JoinFailed(f"{error}; cleaned up ({cleaned}): fix the cause and run the step again") from None

    def _wait_for_status(self, observer: Node, node: Node, started: float) -> None:
        """Until `observer` sees `node` ready; a join whose worker keeps dying fails fast."""
        idle_polls = 0
        while True:
            with self._connect(observer) as connection:
                rows = query(connection, "SELECT node_status::text FROM pgactive.pgactive_nodes WHERE node_name = %s",
                             (self.node_name(node),))
                status = rows[0][0] if rows else "absent"
                if status == "r":
                    return
                joining = observer is node and status in ("b", "i")
                idle_polls = idle_polls + 1 if joining and not self._perdb_worker_running(connection) else 0
            if idle_polls >= self.failed_join_polls:
                raise JoinFailed(
                    f"{node.identifier}: pgactive join failed while {STATUS_NAMES.get(status, status)}: the node's "
                    "worker keeps exiting (typically the initial dump/restore failed, e.g. a clashing object in the "
                    "joining database; the server log of the joining node has the error)"
                )
            if time.monotonic() - started > self.ready_timeout_seconds:
                raise ReplicationError(
                    f"{node.identifier}: not ready after {self.ready_timeout_seconds:.0f} s as seen from "
                    f"{observer.identifier} (status {STATUS_NAMES.get(status, status)}); {self._worker_errors(connection_node=observer)}"
                )
            time.sleep(self.poll_seconds)

    @staticmethod
    def _perdb_worker_running(connection) -> bool:
        return bool(query(
            connection,
            "SELECT 1 FROM pgactive.pgactive_get_workers_info() WHERE worker_type = 'per-db' AND pid > 0 "
            "AND dboid = (SELECT oid FROM pg_database WHERE datname = current_database())",
        ))

    def _worker_errors(self, connection_node: Node) -> str:
        try:
            with self._connect(connection_node) as connection:
                errors = self._last_errors(connection)
        except Exception as error:  # the message is a hint only
            return f"worker info unavailable: {type(error).__name__}"
        return f"worker errors: {errors}" if errors else "no worker error recorded"

    @staticmethod
    def _last_errors(connection) -> list[str]:
        return [f"{kind}{f' (from {peer})' if peer else ''}: {error} at {when:%H:%M:%S}"
                for kind, peer, error, when in query(connection, _WORKER_ERRORS)]

    def grant_conflict_lookup(self) -> list[str]:
        """Let the owners of replicated tables resolve and log conflicts, on both nodes.

        pgactive applies changes as the table owner (pgactive.apply_as_table_owner, on by default) and looks up
        conflict handlers and logs the conflict as that role; without these grants every conflict on a table owned
        by a non-superuser becomes `permission denied for table pgactive_conflict_handlers` (then `... for sequence
        pgactive_conflict_history_id_seq`) and stalls the apply worker.
        """
        owners = set()
        for node in self.nodes:
            with self._connect(node) as connection:
                if not self._extension_present(connection):
                    continue  # not joined yet: the join's copy brings these grants from the source
                rows = query(
                    connection,
                    "SELECT DISTINCT pg_get_userbyid(c.relowner) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                    "JOIN pg_roles r ON r.oid = c.relowner WHERE NOT r.rolsuper AND (n.nspname, c.relname) IN "
                    "(SELECT * FROM unnest(%s::text[], %s::text[]))",
                    ([t.schema for t in self.link.tables], [t.name for t in self.link.tables]),
                )
                for (owner,) in rows:
                    role = sql.Identifier(owner)
                    execute(connection, sql.SQL("GRANT USAGE ON SCHEMA pgactive TO {}").format(role))
                    for grant in _OWNER_GRANTS:
                        execute(connection, sql.SQL(grant).format(role))
                    owners.add(owner)
        return sorted(owners)

    # --- failed join clean-up ------------------------------------------------------------------
    def _clean_failed_join_if_any(self) -> None:
        """A previous attempt left the target half-joined: clean it before joining again."""
        status = self._local_status(self.link.target)
        if status in ("b", "i") and self._join_dead():
            self.clean_failed_join()
        elif status == "k":
            # Also what a detached, cut-over target shows: it may hold the only current data. Never drop it here.
            raise ReplicationError(
                f"{self.link.target.identifier}: the target node is detached from a pgactive group (status k); "
                "refusing to rebuild it automatically because it may hold the only current data"
            )

    def _join_dead(self) -> bool:
        for attempt in range(self.failed_join_polls):
            with self.target() as target:
                if self._perdb_worker_running(target):
                    return False
            if attempt + 1 < self.failed_join_polls:
                time.sleep(self.poll_seconds)
        return True

    def clean_failed_join(self) -> dict:
        """Remove the half-joined node, the slot it left on the source and what its restore left behind.

        pgactive cannot undo a partial restore ("drop and recreate this database"), and a join needs an empty
        database: the target database, which held nothing before the join, is recreated empty, then install()
        puts the extension and the connection entries back.
        """
        with self.target() as target:
            removed = self._extension_present(target) and bool(query(target, "SELECT 1 FROM pgactive.pgactive_nodes"))
            if removed:
                query(target, "SELECT pgactive.pgactive_remove(true)")
            self._wait_without_perdb_worker(target)
        recreated = self._recreate_target_database()
        with self.source() as source:
            slots = self._drop_inactive_slots_of(source, self.link.target)
            self._forget_node(source, self.link.target)
        self.install()
        emit("pgactive_join_cleaned", node=self.link.target.identifier, removed=removed, slots_dropped=len(slots),
             database_recreated=recreated)
        return {"node_removed": removed, "slots_dropped": slots, "database_recreated": recreated}

    def _forget_node(self, connection, node: Node) -> None:
        """The source may list the half-joined node; a later join under the same name would be refused."""
        name = self.node_name(node)
        query(connection, "DELETE FROM pgactive.pgactive_connections c USING pgactive.pgactive_nodes n "
                          "WHERE n.node_name = %s AND n.node_status <> 'r' AND (c.conn_sysid, c.conn_timeline, c.conn_dboid) "
                          "= (n.node_sysid, n.node_timeline, n.node_dboid)", (name,))
        query(connection, "DELETE FROM pgactive.pgactive_nodes WHERE node_name = %s AND node_status <> 'r'", (name,))

    def _wait_without_perdb_worker(self, connection, timeout: float = 30.0) -> None:
        """join_group (and DROP EXTENSION) refuse while the database still has a pgactive per-db worker."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._extension_present(connection) or not query(
                connection,
                "SELECT 1 FROM pgactive.pgactive_get_workers_info() WHERE worker_type = 'per-db' "
                "AND dboid = (SELECT oid FROM pg_database WHERE datname = current_database())",
            ):
                return
            time.sleep(0.5)
        raise ReplicationError(f"pgactive's per-db worker did not stop within {timeout:.0f} s")

    def _recreate_target_database(self) -> bool:
        endpoint = self.link.target.endpoint
        maintenance = replace(endpoint, dbname="postgres" if endpoint.dbname != "postgres" else "template1")
        with connected(maintenance, self.link.admin) as connection:
            rows = query(
                connection,
                "SELECT pg_get_userbyid(datdba), pg_encoding_to_char(encoding), datcollate, datctype "
                "FROM pg_database WHERE datname = %s",
                (endpoint.dbname,),
            )
            if not rows:
                return False
            owner, encoding, collate, ctype = rows[0]
            name = sql.Identifier(endpoint.dbname)
            execute(connection, sql.SQL("DROP DATABASE {} WITH (FORCE)").format(name))
            execute(connection, sql.SQL(
                "CREATE DATABASE {} OWNER {} TEMPLATE template0 ENCODING {} LC_COLLATE {} LC_CTYPE {}").format(
                name, sql.Identifier(owner), sql.Literal(encoding), sql.Literal(collate), sql.Literal(ctype)))
        return True

    def _drop_inactive_slots_of(self, connection, node: Node) -> list[str]:
        """pgactive slots on this server whose consumer is `node` (by its sysid, or any unknown node)."""
        rows = query(
            connection,
            "SELECT s.slot_name FROM pg_replication_slots s "
            "CROSS JOIN LATERAL pgactive.pgactive_parse_slot_name(s.slot_name) p "
            "WHERE s.plugin = 'pgactive' AND NOT s.active AND s.database = current_database() "
            "AND NOT EXISTS (SELECT 1 FROM pgactive.pgactive_nodes n WHERE n.node_sysid = p.remote_sysid "
            "AND n.node_timeline = p.remote_timeline AND n.node_dboid = p.remote_dboid AND n.node_status = 'r' "
            "AND n.node_name <> %s)",
            (self.node_name(node),),
        )
        for (slot,) in rows:
            query(connection, "SELECT pg_drop_replication_slot(%s)", (slot,))
        return [slot for (slot,) in rows]

    # --- sequences -----------------------------------------------------------------------------
    def align_sequences(self) -> dict[str, int]:
        """Target sequences past the source's by a margin, so inserts on both writable nodes cannot collide.

        pgactive does not replicate sequences; the joined node starts with the dump-time values. Moving the target
        ahead by `sequence_margin` (or half of what an int4 sequence has left) keeps the two ranges apart while
        both nodes take writes; the cutover moves them past the source again.
        """
        moved = {}
        with self.source() as source, self.target() as target:
            for sequence in catalog.sequences(target, Filters()):
                on_source = _sequence_state(source, sequence)
                on_target = _sequence_state(target, sequence)
                if on_source is None or on_target is None or on_source["increment"] < 0:
                    continue
                base = on_source["last"] if on_source["last"] is not None else on_source["start"] - 1
                wanted = base + max(1, min(self.sequence_margin, (on_source["max"] - base) // 2))
                if on_target["last"] is None or on_target["last"] < wanted:
                    query(target, "SELECT setval(format('%%I.%%I', %s, %s)::regclass, %s, true)",
                          (sequence.schema, sequence.name, wanted))
                    moved[sequence.qualified_name] = wanted
        if moved:
            emit("sequences_moved", count=len(moved), margin=self.sequence_margin)
        return moved

    # --- lag and health ------------------------------------------------------------------------
    def lag(self) -> Lag:
        rows, seen_from = self._lag_rows()
        if rows is None:
            return Lag(None, synced=False, detail={"error": seen_from})
        by_node: dict[str, dict] = {}
        for node_name, active, decoding, to_apply in rows:
            pending = to_apply if to_apply is not None else decoding
            entry = by_node.setdefault(node_name, {"bytes": 0, "active": True})
            entry["bytes"] = None if pending is None or entry["bytes"] is None else entry["bytes"] + max(0, pending)
            entry["active"] = entry["active"] and bool(active)
        expected = [self.node_name(n) for n in self.nodes]
        missing = [name for name in expected if name not in by_node]
        detail = {"seen_from": seen_from, "nodes": by_node, "missing": missing}
        if missing or any(entry["bytes"] is None for entry in by_node.values()):
            return Lag(None, synced=False, detail=detail)
        total = sum(entry["bytes"] for entry in by_node.values())
        synced = all(entry["active"] for entry in by_node.values()) and self._target_ready()
        return Lag(total, synced=synced, detail=detail)

    def _lag_rows(self) -> tuple[list | None, str]:
        errors = []
        for node in self.nodes:
            try:
                with self._connect(node) as connection:
                    rows = query(connection, "SELECT node_name, active, pending_wal_decoding, pending_wal_to_apply "
                                             "FROM pgactive.pgactive_get_replication_lag_info()")
                return rows, node.identifier
            except Exception as error:
                errors.append(f"{node.identifier}: {type(error).__name__}: {str(error).strip()[:200]}")
        return None, "; ".join(errors)

    def _target_ready(self) -> bool:
        try:
            return self._local_status(self.link.target) == "r"
        except Exception:
            return False

    def problems(self, conflicts: bool = True, apply_errors: bool = True) -> list[str]:
        problems = []
        lag = self.lag()
        if lag.bytes is None:
            problems.append(f"replication lag unknown: {lag.detail}")
        else:
            stalled = [name for name, entry in lag.detail["nodes"].items() if not entry["active"]]
            if stalled:
                problems.append(f"pgactive replication towards {stalled} is not active (apply worker stalled or restarting)")
            if self.lag_threshold_bytes is not None and lag.bytes > self.lag_threshold_bytes:
                problems.append(f"replication lag {lag.bytes} bytes above the threshold {self.lag_threshold_bytes}")
        for node in self.nodes:
            try:
                with self._connect(node) as connection:
                    errors = self._last_errors(connection)
                    new_conflicts = self._new_conflicts(connection, node)
            except Exception as error:
                problems.append(f"{node.identifier}: cannot read pgactive state: {type(error).__name__}")
                continue
            if errors and apply_errors:  # otherwise health_check names the new ones (sort_apply_errors)
                problems.append(f"{node.identifier}: pgactive worker errors: {errors}")
            if new_conflicts and conflicts:
                problems.append(f"{node.identifier}: {new_conflicts} new pgactive conflict(s) in pgactive_conflict_history")
        return problems + self.schema_problems()

    def apply_errors(self) -> ApplyErrors:
        """Apply failures on each node after the baseline, per peer it applies from: the transactions its apply
        worker rolled back (pgactive_get_stats' nr_rollback; pgactive decodes committed transactions only, so each
        is a failed apply) and the worker's last error (pgactive_get_workers_info: an error code such as
        pgactive_apply_failure and its time, cleared once the worker applies again). Both live in shared memory; the
        message is in the node's server log. The marks: per node, the newest error time and the rollback counts."""
        named, marks = [], {}
        for node in self.nodes:
            seen = (self.apply_error_baseline or {}).get(node.identifier) or {}
            since = datetime.fromisoformat(seen["error_at"]) if seen.get("error_at") else None
            with self._connect(node) as connection:
                errors = [row for row in query(connection, _WORKER_ERRORS) if row[3] is not None]
                rollbacks = dict(query(connection, _APPLY_ROLLBACKS))
            newer = {(kind, peer): (error, when) for kind, peer, error, when in errors if since is None or when > since}
            failed = {peer: counted_beyond(count, (seen.get("rollbacks") or {}).get(peer, 0))
                      for peer, count in rollbacks.items()}
            newest = max([since, *(row[3] for row in errors)], key=_time_order)
            marks[node.identifier] = {"error_at": newest.isoformat() if newest else "", "rollbacks": rollbacks}
            named += _named_apply_errors(node.identifier, newer, {peer: n for peer, n in failed.items() if n})
        return ApplyErrors(named, marks)

    def conflict_marks(self) -> dict[str, int]:
        """The newest conflict id per node: pass it back as conflict_baseline to only hear of later conflicts."""
        marks = {}
        for node in self.nodes:
            with self._connect(node) as connection:
                marks[node.identifier] = query(
                    connection, "SELECT coalesce(max(conflict_id), 0) FROM pgactive.pgactive_conflict_history")[0][0]
        return marks

    def conflicts(self, up_to: dict[str, int] | None = None, limit: int = 10) -> list[str]:
        """The conflict rows newer than the baseline (up to the marks up_to) on each node, named by node, id, table,
        type and resolution: the first `limit` per node, then one line counting the rest."""
        named = []
        for node in self.nodes:
            window = ((self.conflict_baseline or {}).get(node.identifier, 0),
                      _NO_MARK if up_to is None else up_to.get(node.identifier, 0))
            with self._connect(node) as connection:
                rows = query(connection, _NEW_CONFLICT_ROWS, (*window, limit))
                more, last = query(connection, _NEW_CONFLICT_COUNT, window)[0] if len(rows) == limit else (0, None)
            named += [f"{node.identifier}: conflict_id {conflict_id} {kind} on {schema}.{table}, {resolution}, "
                      f"at {when:%Y-%m-%d %H:%M:%S}" for conflict_id, kind, schema, table, resolution, when in rows]
            if more > limit:
                named.append(f"{node.identifier}: {more - limit} more conflict(s) up to conflict_id {last} "
                             "(pgactive.pgactive_conflict_history)")
        return named

    def _new_conflicts(self, connection, node: Node) -> int:
        baseline = (self.conflict_baseline or {}).get(node.identifier, 0)
        # A join itself logs insert_insert conflicts on pgactive's own catalog (pgactive_nodes): not the application's.
        return query(connection, "SELECT count(*) FROM pgactive.pgactive_conflict_history WHERE conflict_id > %s "
                                 "AND object_schema IS DISTINCT FROM 'pgactive'", (baseline,))[0][0]

    # --- cutover -------------------------------------------------------------------------------
    def prepare_reverse(self, target_connection=None) -> None:
        """Nothing to prepare: pgactive already replicates target -> source."""

    def after_switch(self) -> dict:
        moved = self.align_sequences()
        return {"reverse": "pgactive replicates both ways already", "sequences_moved": len(moved)}

    def abort_cutover(self) -> None:
        """Nothing to undo: prepare_reverse changed nothing."""

    # --- detach and removal --------------------------------------------------------------------
    def detach(self) -> dict:
        history = self.export_conflict_history()
        self._keep_conflict_history(history)
        detached = self._detach_source_from_target()
        removed = {}
        for node in (self.link.target, self.link.source):
            try:
                removed[node.identifier] = self._remove_from(node)
            except Exception as error:
                if node is self.link.target:
                    raise
                # The old node may already be gone (decommissioned) or unreachable: the new one is what matters.
                removed[node.identifier] = {"error": f"{type(error).__name__}: {str(error).strip()[:200]}"}
        emit("pgactive_removed", detached=detached, conflicts=sum(len(rows) for rows in history.values()))
        return {"detached": self.link.source.identifier, "was_attached": detached, "removed": removed,
                "conflict_history": {node: len(rows) for node, rows in history.items()},
                "conflict_history_table": f"{META_SCHEMA}.{CONFLICT_EXPORT_TABLE}"}

    def _keep_conflict_history(self, history: dict[str, list[dict]]) -> None:
        """Conflict rows hold application data: they stay in the new database, not in XCom or logs."""
        table = qualified(META_SCHEMA, CONFLICT_EXPORT_TABLE)
        with self.target() as target:
            execute(target, sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(META_SCHEMA)))
            execute(target, sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (node text NOT NULL, exported_at timestamptz NOT NULL DEFAULT now(), "
                "conflict jsonb NOT NULL)"
            ).format(table))
            for node, rows in history.items():
                for row in rows:
                    execute(target, sql.SQL("INSERT INTO {} (node, conflict) VALUES (%s, %s)").format(table),
                            (node, json.dumps(row)))

    def export_conflict_history(self) -> dict[str, list[dict]]:
        """Both nodes' conflict history (pgactive_remove deletes it): record it in the run before removal."""
        history: dict[str, list[dict]] = {}
        for node in self.nodes:
            try:
                with self._connect(node) as connection:
                    if not self._extension_present(connection):
                        history[node.identifier] = []
                        continue
                    rows = query(connection, "SELECT row_to_json(h)::text FROM pgactive.pgactive_conflict_history h "
                                             "ORDER BY conflict_id")
            except Exception as error:
                history[node.identifier] = [{"unavailable": f"{type(error).__name__}"}]
                continue
            history[node.identifier] = [json.loads(text) for (text,) in rows]
        return history

    def _detach_source_from_target(self) -> bool:
        source_name = self.node_name(self.link.source)
        with self.target() as target:
            if not self._extension_present(target):
                return False
            rows = query(target, "SELECT node_status::text FROM pgactive.pgactive_nodes WHERE node_name = %s", (source_name,))
            if not rows or rows[0][0] == "k":
                return False
            query(target, "SELECT pgactive.pgactive_detach_nodes(ARRAY[%s])", (source_name,))
        return True

    def _remove_from(self, node: Node) -> dict:
        with self._connect(node) as connection:
            removed = False
            if self._extension_present(connection) and query(connection, "SELECT 1 FROM pgactive.pgactive_nodes"):
                self._remove_pgactive(connection, node)
                removed = True
            defaults = self._replace_snowflake_defaults(connection)
            servers = self._drop_servers(connection)
            if self._extension_present(connection):
                self._wait_without_perdb_worker(connection)
                execute(connection, "DROP EXTENSION pgactive")
        return {"pgactive_removed": removed, "snowflake_defaults_replaced": defaults, "servers_dropped": servers}

    def _remove_pgactive(self, connection, node: Node) -> None:
        """pgactive_remove wants the local node detached: the last node detaches itself (force would sleep 5 s)."""
        own = query(connection, "SELECT node_status::text FROM pgactive.pgactive_nodes WHERE "
                                "(node_sysid, node_timeline, node_dboid) = pgactive.pgactive_get_local_nodeid()")
        live_peers = query(connection, "SELECT count(*) FROM pgactive.pgactive_nodes WHERE node_status <> 'k' AND "
                                       "(node_sysid, node_timeline, node_dboid) <> pgactive.pgactive_get_local_nodeid()")[0][0]
        if own and own[0][0] != "k" and live_peers == 0:
            query(connection, "SELECT pgactive.pgactive_detach_nodes(ARRAY[%s])", (self.node_name(node),))
        query(connection, "SELECT pgactive.pgactive_remove(true)")

    @staticmethod
    def _replace_snowflake_defaults(connection) -> list[str]:
        """Column defaults calling pgactive_snowflake_id_nextval(seq) fail after removal: use nextval(seq)."""
        rows = query(
            connection,
            "SELECT n.nspname, c.relname, a.attname, format('%I.%I', sn.nspname, s.relname) FROM pg_attrdef d "
            "JOIN pg_class c ON c.oid = d.adrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
            "JOIN pg_attribute a ON a.attrelid = d.adrelid AND a.attnum = d.adnum "
            "JOIN pg_depend dep ON dep.classid = 'pg_attrdef'::regclass AND dep.objid = d.oid "
            "AND dep.refclassid = 'pg_class'::regclass "
            "JOIN pg_class s ON s.oid = dep.refobjid AND s.relkind = 'S' JOIN pg_namespace sn ON sn.oid = s.relnamespace "
            "WHERE pg_get_expr(d.adbin, d.adrelid) LIKE '%%pgactive_snowflake_id_nextval%%'",
        )
        replaced = []
        for schema, table, column, sequence in rows:
            execute(connection, sql.SQL("ALTER TABLE {} ALTER COLUMN {} SET DEFAULT nextval({}::regclass)").format(
                qualified(schema, table), sql.Identifier(column), sql.Literal(sequence)))
            replaced.append(f"{schema}.{table}.{column}")
        return replaced

    @staticmethod
    def _drop_servers(connection) -> list[str]:
        """Every pgactive_fdw server (ours and any other) with its user mappings: DROP EXTENSION needs them gone."""
        servers = [name for (name,) in query(
            connection,
            "SELECT s.srvname FROM pg_foreign_server s JOIN pg_foreign_data_wrapper w ON w.oid = s.srvfdw "
            "WHERE w.fdwname = 'pgactive_fdw' ORDER BY 1",
        )]
        for server in servers:
            execute(connection, sql.SQL("DROP SERVER {} CASCADE").format(sql.Identifier(server)))
        return servers


def _sequence_state(connection, sequence) -> dict | None:
    rows = query(
        connection,
        "SELECT last_value, start_value, max_value, increment_by FROM pg_sequences "
        "WHERE schemaname = %s AND sequencename = %s",
        (sequence.schema, sequence.name),
    )
    if not rows:
        return None
    last, start, maximum, increment = rows[0]
    return {"last": last, "start": start, "max": maximum, "increment": increment}


def _server_options(endpoint: Endpoint) -> dict[str, str]:
    return {"host": endpoint.host, "port": str(endpoint.port), "dbname": endpoint.dbname}


def _add_options(options: dict[str, str]) -> sql.Composed:
    return sql.SQL(", ").join(sql.SQL("{} {}").format(sql.Identifier(k), sql.Literal(v)) for k, v in options.items())


def _set_options(options: dict[str, str]) -> sql.Composed:
    return sql.SQL(", ").join(sql.SQL("SET {} {}").format(sql.Identifier(k), sql.Literal(v)) for k, v in options.items())


def _conninfo_quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
