"""PostgreSQL's own logical replication: forward until cutover, reverse after it.

Bidirectional native replication needs origin filtering on both sides (16+), so with an older source the
target stays read-only for applications until cutover, and the reverse direction starts inside the fence.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time

from psycopg2 import sql

from pgactive_upgrade.catalog import META_SCHEMA, missing_tables, user_tables
from pgactive_upgrade.config import Filters
from pgactive_upgrade.secret_sql import execute_unlogged
from pgactive_upgrade.db import conninfo, execute, libpq_environment, qualified, query, server_major
from pgactive_upgrade.events import emit
from pgactive_upgrade.replication.base import (
    MARKER_TABLE, ApplyErrors, Lag, ReplicationDriver, ReplicationError, counted_beyond,
)
from pgactive_upgrade.tools import find_program


class NativeDriver(ReplicationDriver):
    name = "native"
    active_active = False

    @property
    def forward(self) -> str:
        return f"{self.link.key}_fwd"

    @property
    def reverse(self) -> str:
        return f"{self.link.key}_rev"

    def _published(self):
        tables = [qualified(t.schema, t.name) for t in self.link.tables]
        return tables + [qualified(META_SCHEMA, MARKER_TABLE)]

    def install(self) -> dict:
        with self.source() as source:
            if query(source, "SHOW wal_level")[0][0] != "logical":
                raise ReplicationError(f"{self.link.source.identifier}: wal_level must be 'logical' (set rds.logical_replication=1)")
            self.ensure_marker_table(source)
            self._grant_select(source)
        return {"marker_table": f"{META_SCHEMA}.{MARKER_TABLE}"}

    def _grant_select(self, connection) -> None:
        """The replication role reads each published table in the initial copy, partitions one by one."""
        partitions = self._partitions(connection)
        schemas = {t.schema for t in self.link.tables} | {schema for schema, _ in partitions} | {META_SCHEMA}
        execute(
            connection,
            sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(
                sql.SQL(", ").join(sql.Identifier(s) for s in sorted(schemas)),
                sql.Identifier(self.link.replication.user),
            ),
        )
        execute(
            connection,
            sql.SQL("GRANT SELECT ON {} TO {}").format(
                sql.SQL(", ").join(self._published() + [qualified(*p) for p in partitions]),
                sql.Identifier(self.link.replication.user),
            ),
        )

    def _partitions(self, connection) -> list[tuple[str, str]]:
        tables = self.link.tables
        return query(connection, _PARTITIONS, ([t.schema for t in tables], [t.name for t in tables]))

    def build(self, wait: bool = True) -> dict:
        copied = self.copy_schema()
        with self.source() as source:
            self._ensure_publication(source, self.link.key)
            source_major = server_major(source)
        with self.target() as target:
            created = self._ensure_subscription(
                target, self.forward, self.link.source, self.link.key, source_major, copy_data=True, create_slot=True
            )
        return {"schema_copied": copied, "publication": self.link.key, "subscription": self.forward, "created": created}

    def copy_schema(self) -> bool:
        """Restore the source's schema on the target, unless the target already holds every table."""
        expected = list(self.link.tables)
        with self.target() as target:
            missing = missing_tables(target, expected)
            if not missing and not self._marker_missing(target):
                return False
            present = user_tables(target)
            if present:
                raise ReplicationError(
                    f"{self.link.target.identifier}: target database is neither empty nor a complete copy; "
                    f"missing {missing[:10]}, present {present[:10]}. Drop the partial schema and run the step again."
                )
            major = server_major(target)
        self._dump_and_restore(major)
        return True

    def _marker_missing(self, target) -> bool:
        return not query(target, "SELECT to_regclass(%s)", (f"{META_SCHEMA}.{MARKER_TABLE}",))[0][0]

    def _dump_and_restore(self, major: int) -> None:
        pg_dump, psql = find_program("pg_dump", major), find_program("psql", major)
        selection = dump_selection(self.link.filters)
        if self.link.filters.include_tables:
            self._create_schemas()  # a dump of single tables carries no CREATE SCHEMA
        with tempfile.NamedTemporaryFile(suffix=".sql") as dump:
            source, target = self.link.source.endpoint, self.link.target.endpoint
            self._run(
                [str(pg_dump), "--schema-only", "--no-publications", "--no-subscriptions", "-f", dump.name, *selection],
                self._environment(source),
                "pg_dump of the source schema",
            )
            self._run(
                [str(psql), "-X", "-q", "-v", "ON_ERROR_STOP=1", "--single-transaction", "-f", dump.name],
                self._environment(target),
                "restore of the schema on the target",
            )
        emit("schema_copied", tables=len(self.link.tables), pg_dump=str(pg_dump))

    def _environment(self, endpoint) -> dict[str, str]:
        """The admin's connection (TLS, password or IAM token) for pg_dump and psql, through their environment."""
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("PG") or k.startswith("PGU_")}
        return {**inherited, **libpq_environment(endpoint, self.link.admin), "PGAPPNAME": "pgactive_upgrade"}

    def _create_schemas(self) -> None:
        """With the source's owners: since PostgreSQL 16 the apply workers act as each table's owner."""
        schemas = sorted({t.schema for t in self.link.tables} | {META_SCHEMA})
        with self.source() as source:
            owners = dict(query(source, "SELECT nspname, pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = ANY(%s)", (schemas,)))
        with self.target() as target:
            for schema in schemas:
                execute(target, sql.SQL("CREATE SCHEMA IF NOT EXISTS {} AUTHORIZATION {}").format(
                    sql.Identifier(schema), sql.Identifier(owners.get(schema, self.link.admin.user))
                ))

    @staticmethod
    def _run(command: list[str], env: dict, what: str) -> None:
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise ReplicationError(f"{what} failed ({result.returncode}): {result.stderr.strip()[-800:]}")

    def _ensure_publication(self, connection, name: str) -> None:
        exists = query(connection, "SELECT 1 FROM pg_publication WHERE pubname = %s", (name,))
        verb = "ALTER PUBLICATION {} SET TABLE {}" if exists else "CREATE PUBLICATION {} FOR TABLE {}"
        execute(connection, sql.SQL(verb).format(sql.Identifier(name), sql.SQL(", ").join(self._published())))

    def _ensure_subscription(self, connection, name, publisher, publication, publisher_major: int, *, copy_data,
                             create_slot) -> bool:
        """publisher_major: read by the caller on a connection it already has (the reverse one is made in the
        cutover: no extra connection there)."""
        if query(connection, "SELECT 1 FROM pg_subscription WHERE subname = %s", (name,)):
            return False
        options = sql.SQL("copy_data = {}, create_slot = {}, slot_name = {}").format(
            sql.Literal(copy_data), sql.Literal(create_slot), sql.Literal(name)
        )
        if streams_in_progress(server_major(connection), publisher_major):
            options += sql.SQL(", streaming = on")
        statement = sql.SQL("CREATE SUBSCRIPTION {} CONNECTION {} PUBLICATION {} WITH ({})").format(
            sql.Identifier(name),
            sql.Literal(conninfo(publisher.peer_endpoint, self.link.replication)),
            sql.Identifier(publication),
            options,
        )
        execute_unlogged(connection, statement, self.link.replication.password, f"CREATE SUBSCRIPTION {name}")
        return True

    def lag(self) -> Lag:
        with self.target() as target:
            direction = self.forward if self._subscribed(target, self.forward) else None
        if direction is None:
            return self._reverse_lag()
        with self.source() as source, self.target() as target:
            slot_lag = self._slot_lag(source, self.forward)
            pending = query(
                target,
                "SELECT count(*) FILTER (WHERE r.srsubstate <> 'r'), count(*) FROM pg_subscription_rel r "
                "JOIN pg_subscription s ON s.oid = r.srsubid WHERE s.subname = %s",
                (self.forward,),
            )[0]
            worker = query(target, "SELECT pid IS NOT NULL FROM pg_stat_subscription WHERE subname = %s AND relid IS NULL", (self.forward,))
        running = bool(worker and worker[0][0])
        detail = {"direction": "forward", "tables_syncing": pending[0], "tables": pending[1], "apply_running": running}
        return Lag(slot_lag, synced=pending[0] == 0 and running and slot_lag is not None, detail=detail)

    def _reverse_lag(self) -> Lag:
        with self.target() as target:
            slot_lag = self._slot_lag(target, self.reverse)
        return Lag(slot_lag, synced=slot_lag is not None, detail={"direction": "reverse"})

    @staticmethod
    def _subscribed(connection, name: str) -> bool:
        return bool(query(connection, "SELECT 1 FROM pg_subscription WHERE subname = %s", (name,)))

    @staticmethod
    def _slot_lag(connection, slot: str) -> int | None:
        rows = query(
            connection,
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint FROM pg_replication_slots "
            "WHERE slot_name = %s",
            (slot,),
        )
        return max(0, rows[0][0]) if rows and rows[0][0] is not None else None

    def problems(self, conflicts: bool = True, apply_errors: bool = True) -> list[str]:
        errors = self.apply_errors().named if apply_errors else []
        return super().problems(conflicts, apply_errors) + self._unpublished_tables() + errors

    def apply_errors(self) -> ApplyErrors:
        """Errors counted by pg_stat_subscription_stats (PostgreSQL 15+) for this link's subscriptions beyond the
        baseline's counts. PostgreSQL keeps counts only: the SQLSTATE and message are in the subscriber's server log.
        The marks: [apply_error_count, sync_error_count] per node/subscription (a count below its mark was reset)."""
        named, marks = [], {}
        for node, connect in ((self.link.target, self.target), (self.link.source, self.source)):
            with connect() as connection:
                rows = query(connection, _SUBSCRIPTION_ERRORS, ([self.forward, self.reverse],)) \
                    if server_major(connection) >= 15 else []
            for subscription, apply_count, sync_count in rows:
                key = f"{node.identifier}/{subscription}"
                seen_apply, seen_sync = (self.apply_error_baseline or {}).get(key) or (0, 0)
                new_apply, new_sync = counted_beyond(apply_count, seen_apply), counted_beyond(sync_count, seen_sync)
                marks[key] = [apply_count, sync_count]
                if new_apply or new_sync:
                    named.append(f"{node.identifier}: subscription {subscription}: {new_apply} new apply error(s), "
                                 f"{new_sync} new table sync error(s) ({apply_count} and {sync_count} in all; the "
                                 f"SQLSTATE and message are in {node.identifier}'s server log)")
        return ApplyErrors(named, marks)

    def publishing_nodes(self) -> set[str]:
        with self.target() as target:
            return {"source"} if self._subscribed(target, self.forward) else {"target"}

    def lag_causes(self, lag: Lag) -> list[str]:
        return self._open_transaction_behind(lag)

    def _open_transaction_behind(self, lag: Lag) -> list[str]:
        """An open transaction does not hold back the others' apply (each is sent at its commit, a large one
        streams): only when replication lags is the publisher's oldest write transaction, if it is in this
        database and older than max_open_transaction_seconds, named as the likely cause."""
        limits = self.health_limits
        if lag.bytes is None or lag.bytes <= limits.lag_threshold_bytes:
            return []
        publisher = self.source() if lag.detail.get("direction") == "forward" else self.target()
        with publisher as connection:
            oldest = query(connection, _OLDEST_WRITE_TRANSACTION)
        if not oldest or not oldest[0][3] or oldest[0][2] <= limits.max_open_transaction_seconds:
            return []
        pid, user, age, _ = oldest[0]
        return [f"replication lags {lag.bytes} bytes; likely cause: the transaction of pid {pid} ({user}) open with "
                f"writes for {age} s in this database (over max_open_transaction_seconds "
                f"{limits.max_open_transaction_seconds}); end it (pg_terminate_backend({pid})) or let it commit"]

    def _unpublished_tables(self) -> list[str]:
        """Selected tables created after the build (on both nodes) that the forward publication does not carry."""
        with self.source() as source:
            published = {row[0] for row in query(
                source, "SELECT n.nspname || '.' || c.relname FROM pg_publication_rel r JOIN pg_publication p ON "
                        "p.oid = r.prpubid JOIN pg_class c ON c.oid = r.prrelid JOIN pg_namespace n ON "
                        "n.oid = c.relnamespace WHERE p.pubname = %s", (self.link.key,))}
        if not published:  # not built yet
            return []
        return [f"{t.qualified_name}: selected but not in publication {self.link.key} (created after the build), so "
                f"its rows are not replicated; ALTER PUBLICATION {self.link.key} ADD TABLE {t.qualified_name} on the "
                f"source, then ALTER SUBSCRIPTION {self.forward} REFRESH PUBLICATION on the target"
                for t in self.link.tables if t.qualified_name not in published]

    def before_fence(self) -> None:
        """The reverse publication without a slot captures nothing yet: safe to create before the fence."""
        with self.target() as target:
            self._grant_select(target)
            self._ensure_publication(target, self.reverse)

    def prepare_reverse(self, target_connection=None) -> None:
        if target_connection is None:
            with self.target() as target:
                return self.prepare_reverse(target)
        if not query(target_connection, "SELECT 1 FROM pg_publication WHERE pubname = %s", (self.reverse,)):
            self._grant_select(target_connection)  # before_fence was not called
            self._ensure_publication(target_connection, self.reverse)
        # Always a new slot, created now that the marker has arrived: a slot left by an earlier attempt would send
        # that attempt's rows (this marker among them) back to the source, where they already are.
        self._drop_unread_reverse_slot(target_connection)
        query(target_connection, "SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (self.reverse,))

    def after_switch(self) -> dict:
        with self.target() as target:
            self._drop_subscription(target, self.forward)
            target_major = server_major(target)
        with self.source() as source:
            created = self._ensure_subscription(
                source, self.reverse, self.link.target, self.reverse, target_major, copy_data=False, create_slot=False
            )
        return {"forward_dropped": self.forward, "reverse_subscription": self.reverse, "created": created}

    def abort_cutover(self) -> None:
        with self.target() as target:
            self._drop_unread_reverse_slot(target)
            execute(target, sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(self.reverse)))

    @staticmethod
    def _drop_subscription(connection, name: str) -> None:
        if query(connection, "SELECT 1 FROM pg_subscription WHERE subname = %s", (name,)):
            execute(connection, sql.SQL("DROP SUBSCRIPTION {}").format(sql.Identifier(name)))

    def detach(self) -> dict:
        with self.source() as source:
            self._drop_subscription(source, self.reverse)
            execute(source, sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(self.link.key)))
            self._drop_slot(source, self.forward)
        with self.target() as target:
            self._drop_subscription(target, self.forward)
            execute(target, sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(self.reverse)))
            self._drop_slot(target, self.reverse)
        return {"detached": self.link.source.identifier}

    def _drop_unread_reverse_slot(self, connection, wait_seconds: float = 5.0) -> None:
        """Before the switch nothing reads the reverse slot: a backend holding it is the slot's creator, left running
        by an actor that died meanwhile (the server does not notice a vanished client mid-statement). End it, then
        drop the slot, so the slot cannot pin the target's WAL and the next cutover can create it again."""
        deadline = time.monotonic() + wait_seconds
        while rows := query(connection, "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s",
                            (self.reverse,)):
            holder = rows[0][0]
            if holder is None:
                query(connection, "SELECT pg_drop_replication_slot(%s)", (self.reverse,))
                return
            if time.monotonic() > deadline:
                raise ReplicationError(f"reverse slot {self.reverse} still held by backend {holder} after "
                                       f"{wait_seconds:.0f} s")
            query(connection, "SELECT pg_terminate_backend(%s)", (holder,))
            time.sleep(0.05)

    @staticmethod
    def _drop_slot(connection, slot: str) -> None:
        query(
            connection,
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s AND NOT active",
            (slot,),
        )


_PARTITIONS = """
SELECT DISTINCT n.nspname, c.relname
FROM unnest(%s::text[], %s::text[]) AS r(schema, name)
CROSS JOIN LATERAL pg_partition_tree(to_regclass(format('%%I.%%I', r.schema, r.name))) t
JOIN pg_class c ON c.oid = t.relid JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE t.level > 0
ORDER BY 1, 2
"""

# The oldest client transaction with writes on the server: (pid, user, age in s, in this database).
_OLDEST_WRITE_TRANSACTION = """
SELECT pid, usename, extract(epoch FROM now() - xact_start)::int, datname = current_database()
FROM pg_stat_activity
WHERE backend_type = 'client backend' AND backend_xid IS NOT NULL AND pid <> pg_backend_pid()
ORDER BY xact_start LIMIT 1
"""


_SUBSCRIPTION_ERRORS = (
    "SELECT s.subname, st.apply_error_count, st.sync_error_count FROM pg_stat_subscription_stats st "
    "JOIN pg_subscription s ON s.oid = st.subid WHERE s.subname = ANY(%s) "
    "AND s.subdbid = (SELECT oid FROM pg_database WHERE datname = current_database()) ORDER BY s.subname"
)


def streams_in_progress(subscriber_major: int, publisher_major: int) -> bool:
    """Large transactions stream to the subscriber while still open (14+ on both ends), instead of being decoded
    into the publisher's memory and spill files and sent only at commit. 'on' rather than 'parallel': the apply
    stays one worker, as the capacity check counts."""
    return min(subscriber_major, publisher_major) >= 14


def dump_selection(filters: Filters) -> list[str]:
    """pg_dump's switches for the filters; it reads them as patterns that fold case unless quoted."""
    args = [f'--schema="{s}"' for s in filters.include_schemas] + [f'--exclude-schema="{s}"' for s in filters.exclude_schemas]
    args += [f"--table={_quoted(t)}" for t in filters.include_tables]
    args += [f"--exclude-table={_quoted(t)}" for t in filters.exclude_tables]
    if filters.include_tables:  # with --table, pg_dump ignores --schema: name the marker table too
        args.append(f"--table={_quoted(META_SCHEMA + '.' + MARKER_TABLE)}")
    elif filters.include_schemas:
        args.append(f'--schema="{META_SCHEMA}"')
    return args


def _quoted(qualified_name: str) -> str:
    schema, table = qualified_name.split(".")
    return f'"{schema}"."{table}"'
