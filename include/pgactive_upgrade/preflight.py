"""Preflight checks: everything logical replication will not carry, found before anything changes.

Each check takes a Context and returns findings. A blocking finding stops the run and names the object and the
fix; a warning is carried in the run's result and names the step (or the person) that handles it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, UTC
from functools import cached_property
from collections.abc import Callable

from pgactive_upgrade import catalog, fencing, rds
from pgactive_upgrade.config import UpgradeRequest
from pgactive_upgrade.db import query, server_major
from pgactive_upgrade.replication.base import Link

OPERATOR = "operator, before the build"


@dataclass(frozen=True)
class Finding:
    check: str
    message: str
    blocks: bool
    handled_by: str = ""  # a warning's step (or who acts on it)

    def as_dict(self) -> dict:
        return {"check": self.check, "message": self.message, "handled_by": self.handled_by}


def block(check: str, message: str) -> Finding:
    return Finding(check, message, blocks=True)


def warn(check: str, message: str, handled_by: str) -> Finding:
    return Finding(check, message, blocks=False, handled_by=handled_by)


@dataclass
class Context:
    source: object  # admin connection to the source database
    request: UpgradeRequest
    tables: list[catalog.Table]
    source_info: rds.InstanceInfo
    replication_user: str
    application_roles: list[str]
    plan: rds.SourcePlan | None = None
    target: object | None = None  # admin connection to the target database, once the target exists
    target_id: str = ""
    target_parameter_group: str = ""

    @property
    def driver(self) -> str:
        return self.request.replication_driver

    @property
    def filters(self):
        return self.request.filters

    @cached_property
    def relations(self) -> list[Relation]:
        """Every user relation on the source, selected by the filters or not."""
        return [Relation(*row) for row in query(self.source, _RELATIONS, (list(catalog.SYSTEM_SCHEMAS),))]

    def selected(self, *kinds: str) -> list[Relation]:
        return [r for r in self.relations if r.kind in kinds and self.filters.selects(r.schema, r.name)]

    @cached_property
    def selected_oids(self) -> list[int]:
        names = {t.qualified_name for t in self.tables}
        return [r.oid for r in self.relations if r.qualified_name in names]


@dataclass(frozen=True)
class Relation:
    oid: int
    schema: str
    name: str
    kind: str  # pg_class.relkind
    persistence: str  # pg_class.relpersistence
    replica_identity: str  # pg_class.relreplident
    is_partition: bool

    @property
    def qualified_name(self) -> str:
        return f"{self.schema}.{self.name}"


_RELATIONS = """
SELECT c.oid::int, n.nspname, c.relname, c.relkind, c.relpersistence, c.relreplident, c.relispartition
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p', 'm') AND n.nspname <> ALL(%s) AND n.nspname NOT LIKE 'pg\\_%%'
  AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = c.oid AND d.deptype = 'e')
ORDER BY 2, 3
"""

Check = Callable[[Context], list[Finding]]


def run(checks: list[Check], context: Context) -> list[Finding]:
    return [finding for check in checks for finding in check(context)]


def _names(items) -> str:
    items = list(items)
    shown = ", ".join(str(i) for i in items[:20])
    return shown + (f" and {len(items) - 20} more" if len(items) > 20 else "")


# --- the request and the instances ------------------------------------------------------------


def target_version(ctx: Context) -> list[Finding]:
    if ctx.source_info.major < ctx.request.target_major:
        return []
    return [block("target_version", f"target_engine_version: {ctx.request.target_engine_version} is not a newer major "
                  f"than the source's {ctx.source_info.engine_version}")]


def deletion_protection(ctx: Context) -> list[Finding]:
    if ctx.request.decommission == "delete" and ctx.source_info.deletion_protection:
        return [block("deletion_protection", f"decommission: 'delete' but {ctx.source_info.identifier} has deletion "
                      "protection; turn it off deliberately or use 'keep'")]
    return []


def logical_decoding(ctx: Context) -> list[Finding]:
    plan, identifier = ctx.plan, ctx.source_info.identifier
    findings = []
    wal_level = query(ctx.source, "SHOW wal_level")[0][0]
    if plan is not None and wal_level != "logical" and not plan.changes and not plan.needs_reboot:
        findings.append(block("wal_level", f"{identifier}: wal_level is '{wal_level}' although its parameter group "
                              "enables logical replication; check the instance's parameters"))
    if plan is not None and plan.needs_reboot and not ctx.request.allow_source_reboot:
        findings.append(block("source_reboot", f"allow_source_reboot: the source needs "
                              f"{plan.changes or 'its pending parameters'} applied with a reboot (a brief outage); "
                              "set allow_source_reboot to true to allow it"))
    return findings


# --- tables ------------------------------------------------------------------------------------


def selected_tables(ctx: Context) -> list[Finding]:
    if not ctx.tables:
        return [block("tables", "include_schemas/include_tables: the filters select no table on the source")]
    found = {t.qualified_name for t in ctx.tables}
    missing = [t for t in ctx.filters.include_tables if t not in found]
    findings = [block("tables", f"include_tables: not found on the source: {missing}")] if missing else []
    no_pk = [t.qualified_name for t in ctx.tables if not t.primary_key]
    if no_pk:
        findings.append(block("primary_keys", f"tables without a primary key cannot be replicated safely: "
                              f"{', '.join(no_pk)} (add a primary key or leave them out with exclude_tables / "
                              "exclude_schemas)"))
    return findings


def unlogged_tables(ctx: Context) -> list[Finding]:
    return [block("unlogged_tables", f"{r.qualified_name}: unlogged, so logical replication cannot carry it; "
                  f"ALTER TABLE {r.qualified_name} SET LOGGED, or leave it out with exclude_tables")
            for r in ctx.selected("r", "p") if r.persistence == "u"]


def replica_identity(ctx: Context) -> list[Finding]:
    findings = []
    indexes = dict(query(ctx.source, "SELECT indrelid::int, indexrelid::regclass::text FROM pg_index "
                                     "WHERE indisreplident AND indrelid = ANY(%s::oid[])", (ctx.selected_oids,)))
    for r in ctx.selected("r", "p"):
        if r.replica_identity == "n":
            findings.append(block("replica_identity", f"{r.qualified_name}: REPLICA IDENTITY NOTHING, so its UPDATEs "
                                  "and DELETEs fail on the source once it is published; ALTER TABLE "
                                  f"{r.qualified_name} REPLICA IDENTITY DEFAULT"))
        elif r.replica_identity == "f":
            findings.append(warn("replica_identity", f"{r.qualified_name}: REPLICA IDENTITY FULL ships whole old rows "
                                 "and slows the apply; set REPLICA IDENTITY DEFAULT (it has a primary key)", OPERATOR))
        elif r.replica_identity == "i" and r.oid in indexes:
            findings.append(warn("replica_identity", f"{r.qualified_name}: replica identity is index "
                                 f"{indexes[r.oid]}, not the primary key; the schema copy keeps it", "build_replication"))
    return findings


def materialized_views(ctx: Context) -> list[Finding]:
    views = [r.qualified_name for r in ctx.selected("m")]
    if not views:
        return []
    return [warn("materialized_views", f"materialized views arrive empty on the target (not replicated): "
                 f"{_names(views)}; refreshed there after the initial sync", "prepare_target")]


def partitions(ctx: Context) -> list[Finding]:
    findings = []
    for root in [r for r in ctx.selected("p") if not r.is_partition]:
        leaves = [(s, n) for s, n in query(ctx.source, _LEAVES, (root.oid,))]
        unselected = [f"{s}.{n}" for s, n in leaves if not ctx.filters.selects(s, n)]
        if unselected:
            findings.append(block("partitions", f"{root.qualified_name}: partitions {_names(unselected)} are not "
                                  "selected, so the schema copy leaves them out and their rows cannot be applied; "
                                  "select them (include_tables / include_schemas) or leave out the parent"))
        else:
            findings.append(warn("partitions", f"{root.qualified_name}: published per partition (not through the "
                                 f"root), each verified: {_names(f'{s}.{n}' for s, n in leaves)}", "build_replication"))
    return findings


_LEAVES = """
SELECT n.nspname, c.relname FROM pg_partition_tree(%s::oid) t
JOIN pg_class c ON c.oid = t.relid JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE t.isleaf ORDER BY 1, 2
"""


def replication_role_reads(ctx: Context) -> list[Finding]:
    """The initial copy reads each table, and each partition, as the replication role: the admin grants that at
    install where it may (superuser, or member of the owner)."""
    leaves = [oid for (oid,) in query(ctx.source, "SELECT t.relid::int FROM unnest(%s::oid[]) r(oid), "
                                      "pg_partition_tree(r.oid) t WHERE t.isleaf AND t.relid <> r.oid",
                                      (ctx.selected_oids,))]
    rows = query(ctx.source, _UNREADABLE, (ctx.selected_oids + leaves, ctx.replication_user))
    return [block("replication_role", f"{name}: role {ctx.replication_user!r} cannot read it and the admin "
                  f"cannot grant it (owner {owner}); GRANT SELECT ON {name} TO {ctx.replication_user}")
            for name, owner in rows]


_UNREADABLE = """
SELECT c.oid::regclass::text, pg_get_userbyid(c.relowner) FROM pg_class c
WHERE c.oid = ANY(%s::oid[]) AND NOT has_table_privilege(%s, c.oid, 'SELECT')
  AND NOT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
  AND NOT pg_has_role(current_user, c.relowner, 'MEMBER')
ORDER BY 1
"""


def large_objects(ctx: Context) -> list[Finding]:
    count, sample = query(ctx.source, "SELECT count(*), (array_agg(oid ORDER BY oid))[1:5] FROM pg_largeobject_metadata")[0]
    if not count:
        return []
    return [block("large_objects", f"{count} large objects (oids {sample}...): logical replication does not carry "
                  "them; move them into bytea columns or delete them (lo_unlink) before the upgrade")]


# --- sequences ---------------------------------------------------------------------------------

# int2/int4 sequences need this share of their range left: the cutover moves the target to the source's value,
# pgactive first moves it ahead by half of what is left.
SEQUENCE_HEADROOM = {"native": 0.10, "pgactive": 0.20}

# last_value is NULL both for a sequence never used and for one the admin may not read (readable says which).
_SEQUENCES = """
SELECT s.schemaname, s.sequencename, s.data_type::text, s.increment_by, s.min_value, s.max_value, s.last_value,
       EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = q.oid
               AND d.classid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')) AS owned,
       has_sequence_privilege(q.oid, 'SELECT, USAGE') AS readable
FROM pg_sequences s, LATERAL (SELECT format('%%I.%%I', s.schemaname, s.sequencename)::regclass::oid) q(oid)
WHERE s.schemaname <> ALL(%s) ORDER BY 1, 2
"""

# Column defaults of selected tables calling nextval() on a sequence.
_DEFAULT_SEQUENCES = """
SELECT c.oid::regclass::text, a.attname, n.nspname, s.relname
FROM pg_attrdef ad
JOIN pg_class c ON c.oid = ad.adrelid
JOIN pg_attribute a ON a.attrelid = ad.adrelid AND a.attnum = ad.adnum
JOIN pg_depend d ON d.classid = 'pg_attrdef'::regclass AND d.objid = ad.oid AND d.refclassid = 'pg_class'::regclass
JOIN pg_class s ON s.oid = d.refobjid AND s.relkind = 'S'
JOIN pg_namespace n ON n.oid = s.relnamespace
WHERE ad.adrelid = ANY(%s::oid[]) ORDER BY 1, 2
"""


def sequences(ctx: Context) -> list[Finding]:
    selected = {s.qualified_name for s in catalog.sequences(ctx.source, ctx.filters)}
    findings = []
    for schema, name, data_type, increment, minimum, maximum, last, owned, readable in query(
            ctx.source, _SEQUENCES, (list(catalog.SYSTEM_SCHEMAS),)):
        qualified_name = f"{schema}.{name}"
        if qualified_name not in selected:
            if not owned:
                findings.append(warn("sequences", f"{qualified_name}: a free-standing sequence outside the selected "
                                     "schemas, so the cutover does not move it on the target; select its schema if "
                                     "the application uses it", OPERATOR))
            continue
        if not readable:
            findings.append(_unreadable_sequence(ctx, qualified_name))
        elif increment < 0:
            findings.append(block("sequences", f"{qualified_name}: descending (increment {increment}); the cutover "
                                  "only moves sequences forward: make it ascending or leave out its table"))
        elif data_type in ("smallint", "integer"):
            findings += _headroom(ctx, qualified_name, data_type, minimum, maximum, last)
    for table, column, schema, name in query(ctx.source, _DEFAULT_SEQUENCES, (ctx.selected_oids,)):
        if f"{schema}.{name}" not in selected:
            findings.append(block("sequences", f"{table}.{column}: its default uses sequence {schema}.{name}, which "
                                  "is not selected (the schema copy and the cutover miss it); select its schema"))
    return findings


def _unreadable_sequence(ctx: Context, name: str) -> Finding:
    admin = query(ctx.source, "SELECT current_user")[0][0]
    return block("sequences", f"{name}: the admin role {admin} may not read it, so its headroom cannot be checked "
                 f"and the cutover cannot move it; GRANT SELECT ON SEQUENCE {name} TO {admin} (as its owner)")


def _headroom(ctx: Context, name: str, data_type: str, minimum: int, maximum: int, last: int | None) -> list[Finding]:
    share = SEQUENCE_HEADROOM[ctx.driver]
    left = maximum - (last if last is not None else minimum)
    if left >= share * (maximum - minimum):
        return []
    return [block("sequences", f"{name}: {data_type} sequence has {left} values left of {maximum} (under "
                  f"{share:.0%}, the {ctx.driver} driver's margin); ALTER SEQUENCE {name} AS bigint and widen "
                  "its column before the upgrade")]


# --- source activity ---------------------------------------------------------------------------

# Client sessions' transactions with writes, in every database: creating a logical slot waits until each
# transaction running anywhere on the server has ended (the initial copy then waits only for this database's).
_OLD_TRANSACTIONS = """
SELECT pid, usename, datname, state, extract(epoch FROM now() - xact_start)::int
FROM pg_stat_activity
WHERE backend_type = 'client backend' AND backend_xid IS NOT NULL AND pid <> pg_backend_pid()
  AND xact_start < now() - make_interval(secs => %s)
ORDER BY xact_start
"""


def open_transactions(ctx: Context) -> list[Finding]:
    limit = ctx.request.max_open_transaction_seconds
    return [block("open_transactions", f"transaction of pid {pid} ({user} on {db}, {state}) open for {age} s, over "
                  f"max_open_transaction_seconds {limit}: slot creation and the initial copy wait for it; end it "
                  f"(pg_terminate_backend({pid})) or retry after it committed")
            for pid, user, db, state, age in query(ctx.source, _OLD_TRANSACTIONS, (limit,))]


def prepared_transactions(ctx: Context) -> list[Finding]:
    rows = query(ctx.source, "SELECT gid, database, owner, prepared::text FROM pg_prepared_xacts ORDER BY prepared")
    return [block("prepared_transactions", f"prepared transaction {gid!r} ({owner} on {db}, since {since}): slot "
                  f"creation waits for it; COMMIT PREPARED or ROLLBACK PREPARED {gid!r}")
            for gid, db, owner, since in rows]


def existing_replication(ctx: Context) -> list[Finding]:
    """Replication the upgrade does not migrate: what happens to each."""
    ours = own_prefix(ctx)
    findings = [warn("existing_replication", f"publication {name}: not migrated; create it on the target and move "
                     "its subscribers there after cutover", OPERATOR)
                for (name,) in query(ctx.source, "SELECT pubname FROM pg_publication WHERE NOT starts_with(pubname, %s) "
                                                 "ORDER BY 1", (ours,))]
    findings += [warn("existing_replication", f"subscription {name} (database {db}): not migrated; the target does "
                      "not receive its changes: create it on the target (copy_data = false) at cutover", OPERATOR)
                 for name, db in query(ctx.source, "SELECT s.subname, d.datname FROM pg_subscription s JOIN "
                                                   "pg_database d ON d.oid = s.subdbid WHERE NOT starts_with(s.subname, %s) "
                                                   "ORDER BY 1", (ours,))]
    slots = query(ctx.source, "SELECT slot_name, coalesce(plugin, ''), active FROM pg_replication_slots "
                              "WHERE slot_type = 'logical' AND NOT starts_with(slot_name, %s) "
                              "AND NOT starts_with(slot_name, 'pgactive_') ORDER BY 1", (ours,))
    findings += [warn("existing_replication", f"replication slot {name} (logical {plugin}, "
                      f"{'active' if active else 'inactive'}): stays on the old instance and holds its WAL; its "
                      "consumer must move to the target after cutover, then drop the slot", OPERATOR)
                 for name, plugin, active in slots]
    physical = [name for (name,) in query(ctx.source, "SELECT slot_name FROM pg_replication_slots "
                                                      "WHERE slot_type = 'physical' ORDER BY 1")]
    if physical:
        findings.append(warn("existing_replication", f"physical replication slots {_names(physical)}: their replicas "
                             "stay with the old instance; create replicas of the target", OPERATOR))
    return findings


def own_prefix(ctx: Context) -> str:
    """The prefix of the upgrade's own publications, subscriptions and slots."""
    return Link.key_of(ctx.source_info.identifier)


def decoding_work_mem(ctx: Context) -> list[Finding]:
    if server_major(ctx.source) < 14:  # no pg_stat_replication_slots before
        return []
    work_mem = query(ctx.source, "SHOW logical_decoding_work_mem")[0][0]
    rows = query(ctx.source, "SELECT slot_name, spill_txns, spill_bytes, stream_txns, stream_bytes "
                             "FROM pg_stat_replication_slots WHERE spill_txns > 0 OR stream_txns > 0 ORDER BY spill_bytes DESC")
    return [warn("decoding_work_mem", f"slot {slot}: {spilled} transactions ({spill_bytes} bytes) spilled to disk and "
                 f"{streamed} ({stream_bytes} bytes) streamed, larger than logical_decoding_work_mem {work_mem}; the "
                 "subscription streams them (streaming = on); raise logical_decoding_work_mem if the apply lags",
                 "build_replication")
            for slot, spilled, spill_bytes, streamed, stream_bytes in rows]


def collation_versions(ctx: Context) -> list[Finding]:
    """Collations whose recorded version differs from what the OS provides now: text indexes built under the old
    version may be out of order (a unique one may hold duplicates that then fail the initial copy)."""
    major = server_major(ctx.source)
    findings = [] if major >= 15 else _default_collation_unversioned(ctx, major)
    stale = _STALE_COLLATIONS if major >= 15 else _STALE_COLLATIONS.split("UNION ALL")[1]
    for collation, oid, recorded, actual, fix in query(ctx.source, stale):
        indexes = [i for (i,) in query(ctx.source, _INDEXES_USING, (oid, ctx.selected_oids))]
        if indexes:
            findings.append(warn("collations", f"collation {collation}: recorded version {recorded}, the OS provides "
                                 f"{actual}; REINDEX on the source: {_names(indexes)}; then {fix}", OPERATOR))
    return findings


def _default_collation_unversioned(ctx: Context, major: int) -> list[Finding]:
    """Before 15 the database's default collation records no version: a C library change under it goes unseen."""
    collate = query(ctx.source, "SELECT datcollate FROM pg_database WHERE datname = current_database()")[0][0]
    if collate in ("C", "POSIX"):
        return []
    return [warn("collations", f"database default collation {collate}: PostgreSQL {major} records no version for "
                 "it, so a C library (glibc) change between the source's and the target's OS cannot be detected; "
                 "REINDEX the text indexes on the target after cutover (or compare the two instances' OS libc "
                 "versions first)", OPERATOR)]


_STALE_COLLATIONS = """
SELECT 'database default', 100, datcollversion, pg_database_collation_actual_version(oid),
       format('ALTER DATABASE %I REFRESH COLLATION VERSION', datname)
FROM pg_database WHERE datname = current_database()
  AND datcollversion IS DISTINCT FROM pg_database_collation_actual_version(oid)
UNION ALL
SELECT c.oid::regcollation::text, c.oid::int, c.collversion, pg_collation_actual_version(c.oid),
       format('ALTER COLLATION %s REFRESH VERSION', c.oid::regcollation)
FROM pg_collation c
WHERE c.collversion IS NOT NULL AND c.collversion IS DISTINCT FROM pg_collation_actual_version(c.oid)
"""

_INDEXES_USING = """
SELECT i.indexrelid::regclass::text FROM pg_index i
WHERE %s::oid = ANY(i.indcollation::oid[]) AND i.indrelid = ANY(%s::oid[]) ORDER BY 1
"""


# --- capacity ----------------------------------------------------------------------------------

SYNC_WORKERS = 2  # max_sync_workers_per_subscription's default: table copies at once, each a slot and a sender
CAPACITY_SETTINGS = ("max_replication_slots", "max_wal_senders", "max_worker_processes", "max_logical_replication_workers")
# What each driver creates on each node (native: the reverse direction after cutover included).
DRIVER_NEEDS = {
    "native": {
        "source": {"max_replication_slots": 1 + SYNC_WORKERS, "max_wal_senders": 1 + SYNC_WORKERS,
                   "max_worker_processes": 1, "max_logical_replication_workers": 1},
        "target": {"max_replication_slots": 1, "max_wal_senders": 1,
                   "max_worker_processes": 1 + SYNC_WORKERS, "max_logical_replication_workers": 1 + SYNC_WORKERS},
    },
    "pgactive": {
        node: {"max_replication_slots": 1, "max_wal_senders": 1, "max_worker_processes": 3,
               "max_logical_replication_workers": 0}
        for node in ("source", "target")
    },
}

_IN_USE = """
SELECT (SELECT count(*) FROM pg_replication_slots WHERE NOT starts_with(slot_name, %(ours)s)),
       (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'walsender'),
       (SELECT count(*) FROM pg_stat_activity WHERE backend_type <> ALL(%(core)s)),
       (SELECT count(*) FROM pg_stat_activity WHERE backend_type LIKE 'logical replication %%worker')
"""
_NOT_COUNTED_AS_WORKERS = ["client backend", "autovacuum launcher", "autovacuum worker", "background writer", "checkpointer",
                   "walwriter", "archiver", "startup", "walreceiver", "walsender", "logger", "standalone backend",
                   "walsummarizer", "slotsync worker",
                   "parallel worker"]  # transient: a query's helpers, gone when it ends


def source_capacity(ctx: Context) -> list[Finding]:
    planned = {k: v for k, v in (ctx.plan.changes if ctx.plan else {}).items() if k in CAPACITY_SETTINGS}
    return _capacity(ctx, ctx.source, "source", ctx.source_info.identifier, planned)


def target_capacity(ctx: Context) -> list[Finding]:
    return _capacity(ctx, ctx.target, "target", ctx.target_id, {})


def capacity_in_use(connection, own_prefix: str) -> dict[str, int]:
    """Each capacity setting's share in use now, the upgrade's own slots left out."""
    return dict(zip(CAPACITY_SETTINGS, query(connection, _IN_USE, {"ours": own_prefix, "core": _NOT_COUNTED_AS_WORKERS})[0]))


def _capacity(ctx: Context, connection, node: str, identifier: str, planned: dict) -> list[Finding]:
    limits = dict(query(connection, "SELECT name, setting::int FROM pg_settings WHERE name = ANY(%s)",
                        (list(CAPACITY_SETTINGS),)))
    in_use = capacity_in_use(connection, own_prefix(ctx))
    findings = []
    for name, needed in DRIVER_NEEDS[ctx.driver][node].items():
        limit = max(limits[name], int(planned.get(name, 0)))
        if in_use[name] + needed > limit:
            findings.append(block("capacity", f"{identifier}: {name} is {limit} with {in_use[name]} in use; the "
                                  f"{ctx.driver} driver needs {needed} more: raise it in the parameter group or free "
                                  "some"))
    return findings


# --- the target version ------------------------------------------------------------------------


def target_reachable(ctx: Context) -> list[Finding]:
    if ctx.target is not None:
        return []
    return [warn("target", f"{ctx.target_id} does not exist or answer yet: extensions, database locale, roles and "
                 f"capacity on PostgreSQL {ctx.request.target_major} are checked when it does", "install_extension")]


def extensions(ctx: Context) -> list[Finding]:
    available = {name for (name,) in query(ctx.target, "SELECT name FROM pg_available_extensions")}
    installed = query(ctx.source, "SELECT extname, extversion FROM pg_extension ORDER BY 1")
    major = server_major(ctx.target)
    return [block("extensions", f"extension {name} {version}: not available on PostgreSQL {major} ({ctx.target_id}); "
                  f"DROP EXTENSION {name} on the source if unused, or choose a target version that has it")
            for name, version in installed if name not in available]


PRELOAD = "shared_preload_libraries"


def preload_libraries(ctx: Context) -> list[Finding]:
    """Libraries the source loads at start (pg_cron, pgaudit, pg_stat_statements...) that the target does not:
    extensions using them fail there."""
    source, target = _setting(ctx.source, PRELOAD), _setting(ctx.target, PRELOAD)
    if source is None or target is None:
        return [warn("preload_libraries", f"{PRELOAD} cannot be read on the {'source' if source is None else 'target'} "
                     "(the admin role needs pg_read_all_settings); compare it on both instances by hand", OPERATOR)]
    return [block("preload_libraries", f"{lib}: in the source's {PRELOAD} but not loaded on {ctx.target_id}; add "
                  f"{lib} to {PRELOAD} in parameter group {ctx.target_parameter_group} and reboot the target")
            for lib in _libraries(source) if lib not in _libraries(target)]


def _setting(connection, name: str) -> str | None:
    """None when the admin may not read it (pg_settings hides superuser-only settings from others)."""
    rows = query(connection, "SELECT setting FROM pg_settings WHERE name = %s", (name,))
    return rows[0][0] if rows else None


def _libraries(value: str | None) -> list[str]:
    return [lib.strip().strip('"') for lib in (value or "").split(",") if lib.strip().strip('"')]


_LOCALE = """
SELECT d.datcollate, d.datctype, coalesce(to_jsonb(d) ->> 'datlocprovider', 'c'),
       coalesce(to_jsonb(d) ->> 'datlocale', to_jsonb(d) ->> 'daticulocale', '')
FROM pg_database d WHERE d.datname = current_database()
"""


def database_locale(ctx: Context) -> list[Finding]:
    fields = ("LC_COLLATE", "LC_CTYPE", "LOCALE_PROVIDER", "locale")
    source, target = query(ctx.source, _LOCALE)[0], query(ctx.target, _LOCALE)[0]
    differ = [f"{f} {s!r} vs {t!r}" for f, s, t in zip(fields, source, target) if s != t]
    if not differ:
        return []
    return [block("database_locale", f"database locale differs on {ctx.target_id}: {', '.join(differ)} (source vs "
                  "target): text would sort differently; create the target database with the source's locale")]


_ROLE = """
SELECT rolname, rolsuper, rolinherit, rolcreaterole, rolcreatedb, rolcanlogin, rolreplication, rolbypassrls,
       rolconnlimit, extract(epoch FROM rolvaliduntil),  -- an instant, whatever the session's TimeZone
       ARRAY(SELECT g.rolname FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid
             WHERE m.member = r.oid ORDER BY 1)
FROM pg_roles r WHERE rolname = ANY(%s)
"""
_ROLE_FIELDS = ("SUPERUSER", "INHERIT", "CREATEROLE", "CREATEDB", "LOGIN", "REPLICATION", "BYPASSRLS",
                "CONNECTION LIMIT", "VALID UNTIL", "member of")


def roles(ctx: Context) -> list[Finding]:
    """Roles are global, not replicated: the target needs the application and replication roles as they are."""
    names = sorted(set(ctx.application_roles) | {ctx.replication_user})
    source = {row[0]: row[1:] for row in query(ctx.source, _ROLE, (names,))}
    target = {row[0]: row[1:] for row in query(ctx.target, _ROLE, (names,))}
    findings = []
    for name in sorted(source):
        if name not in target:
            findings.append(block("roles", f"role {name} does not exist on {ctx.target_id}; create it there with the "
                                  "source's attributes, memberships and password"))
            continue
        differ = [f"{f} {_shown(f, s)} vs {_shown(f, t)}" for f, s, t in zip(_ROLE_FIELDS, source[name], target[name])
                  if s != t]
        if differ:
            findings.append(block("roles", f"role {name} differs on {ctx.target_id}: {', '.join(differ)} (source vs "
                                  "target); ALTER ROLE / GRANT it there to match"))
    return findings


def _shown(field: str, value):
    if field == "VALID UNTIL" and value is not None and math.isfinite(value):
        return datetime.fromtimestamp(float(value), UTC).isoformat()
    return value


# --- the tooling and the application roles -----------------------------------------------------


def replication_role(ctx: Context) -> list[Finding]:
    rows = query(
        ctx.source,
        "SELECT r.rolreplication OR EXISTS (SELECT 1 FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid "
        "WHERE m.member = r.oid AND g.rolname = 'rds_replication') FROM pg_roles r WHERE r.rolname = %s",
        (ctx.replication_user,),
    )
    if not rows:
        return [block("replication_role", f"replication_conn_id: role {ctx.replication_user!r} does not exist on the "
                      "source")]
    if not rows[0][0]:
        return [block("replication_role", f"replication_conn_id: role {ctx.replication_user!r} lacks REPLICATION "
                      "(or rds_replication)")]
    return []


def fenceable_roles(ctx: Context) -> list[Finding]:
    return [block("application_roles", f"application_roles: {problem}")
            for problem in fencing.fenceability_problems(ctx.source, ctx.application_roles)]


def parameter_findings(source_custom: dict[str, str], target: dict[str, str], driver_sets: dict[str, str],
                       source_group: str, target_group: str) -> list[Finding]:
    """The source's custom parameters against the target's group (which carries the driver's settings)."""
    own = {k: v for k, v in source_custom.items() if k not in driver_sets and k != PRELOAD}
    overridden = {k: v for k, v in source_custom.items() if k in driver_sets}
    return (preload_parameter(source_custom, target, source_group, target_group)
            + parameter_differences(own, target, target_group) + driver_overrides(overridden, target, target_group))


def preload_parameter(source_custom: dict[str, str], target: dict[str, str], source_group: str,
                      target_group: str) -> list[Finding]:
    """Before the target runs: the libraries the source's group preloads that the target's group does not."""
    missing = [lib for lib in _libraries(source_custom.get(PRELOAD)) if lib not in _libraries(target.get(PRELOAD))]
    return [block("preload_libraries", f"{lib}: {PRELOAD} of {source_group} has it, {target_group} does not "
                  f"(extensions using it fail on the target); add {lib} to {PRELOAD} in {target_group} (create the "
                  "group with the target's family before provision_target if it does not exist)")
            for lib in missing]


def driver_overrides(source_values: dict[str, str], target: dict[str, str], target_group: str) -> list[Finding]:
    """Parameters the driver sets on the target's group that the source sets to another value itself."""
    listed = _listed_differences(source_values, target, "{name}: source {value}, target {target}")
    return [warn("parameters", f"parameters the upgrade sets on {target_group} that the source sets otherwise: "
                 f"{listed}; set the source's value there after cutover if the workload needs it (the driver's "
                 "steps reset them until then)", OPERATOR)] if listed else []


def parameter_differences(source_custom: dict[str, str], target: dict[str, str], target_group: str) -> list[Finding]:
    """The source's custom parameters that the target's group does not carry."""
    listed = _listed_differences(source_custom, target, "{name}={value} (target: {target})")
    return [warn("parameters", f"the source's custom parameters not in {target_group}: {listed}; set them there "
                 "(RDS refuses those the new major removed)", OPERATOR)] if listed else []


def _listed_differences(source_values: dict[str, str], target: dict[str, str], item: str) -> str:
    return ", ".join(item.format(name=name, value=value, target=target.get(name, "default"))
                     for name, value in sorted(source_values.items()) if target.get(name) != value)


SOURCE_CHECKS: list[Check] = [
    target_version, deletion_protection, logical_decoding, selected_tables, unlogged_tables, replica_identity,
    materialized_views, partitions, replication_role, replication_role_reads, large_objects, sequences,
    open_transactions, prepared_transactions, existing_replication, decoding_work_mem, collation_versions,
    source_capacity, fenceable_roles, target_reachable,
]
TARGET_CHECKS: list[Check] = [extensions, preload_libraries, database_locale, roles, target_capacity]


def checks_for(context: Context) -> list[Check]:
    return SOURCE_CHECKS + (TARGET_CHECKS if context.target is not None else [])
