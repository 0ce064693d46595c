"""What the database holds: the tables and sequences an upgrade replicates."""

from __future__ import annotations

from dataclasses import dataclass

from pgactive_upgrade.config import Filters
from pgactive_upgrade.db import query

META_SCHEMA = "pgactive_upgrade"
SYSTEM_SCHEMAS = ("pg_catalog", "information_schema", "pgactive", META_SCHEMA)


@dataclass(frozen=True)
class Table:
    schema: str
    name: str
    primary_key: tuple[str, ...]

    @property
    def qualified_name(self) -> str:
        return f"{self.schema}.{self.name}"


@dataclass(frozen=True)
class Sequence:
    schema: str
    name: str

    @property
    def qualified_name(self) -> str:
        return f"{self.schema}.{self.name}"


_TABLES = """
SELECT n.nspname, c.relname,
       coalesce((SELECT array_agg(a.attname ORDER BY k.ord)
                 FROM pg_index i
                 CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
                 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                 WHERE i.indrelid = c.oid AND i.indisprimary), '{}')
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
  AND n.nspname <> ALL(%s) AND n.nspname NOT LIKE 'pg\\_%%'
  AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = c.oid AND d.deptype = 'e')
ORDER BY 1, 2
"""

_SEQUENCES = """
SELECT n.nspname, c.relname
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'S' AND n.nspname <> ALL(%s) AND n.nspname NOT LIKE 'pg\\_%%'
  AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = c.oid AND d.deptype = 'e')
ORDER BY 1, 2
"""

_SEQUENCE_OWNER_TABLE = """
SELECT n.nspname, c.relname, tn.nspname, t.relname
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_depend d ON d.objid = c.oid AND d.classid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')
JOIN pg_class t ON t.oid = d.refobjid JOIN pg_namespace tn ON tn.oid = t.relnamespace
WHERE c.relkind = 'S'
"""


def tables(connection, filters: Filters) -> list[Table]:
    rows = query(connection, _TABLES, (list(SYSTEM_SCHEMAS),))
    return [Table(schema, name, tuple(pk)) for schema, name, pk in rows if filters.selects(schema, name)]


def sequences(connection, filters: Filters) -> list[Sequence]:
    """Sequences of the selected tables, plus free-standing sequences in selected schemas."""
    owners = {(s, n): (ts, tn) for s, n, ts, tn in query(connection, _SEQUENCE_OWNER_TABLE)}
    selected = []
    for schema, name in query(connection, _SEQUENCES, (list(SYSTEM_SCHEMAS),)):
        owner = owners.get((schema, name))
        if filters.selects(*owner) if owner else _schema_selected(filters, schema):
            selected.append(Sequence(schema, name))
    return selected


def _schema_selected(filters: Filters, schema: str) -> bool:
    if schema in filters.exclude_schemas:
        return False
    if filters.include_tables:
        return any(t.split(".")[0] == schema for t in filters.include_tables)
    return not filters.include_schemas or schema in filters.include_schemas


def missing_tables(connection, expected: list[Table]) -> list[str]:
    present = {(s, n) for s, n, _ in query(connection, _TABLES, (list(SYSTEM_SCHEMAS),))}
    return [t.qualified_name for t in expected if (t.schema, t.name) not in present]


def user_tables(connection) -> list[str]:
    return [f"{s}.{n}" for s, n, _ in query(connection, _TABLES, (list(SYSTEM_SCHEMAS),))]


def total_bytes(connection, tables: list[Table]) -> int:
    """Bytes the tables take on disk with their indexes and TOAST; a partitioned table counts its partitions."""
    if not tables:
        return 0
    return int(query(connection, """
        SELECT coalesce(sum(pg_total_relation_size(l.relid)), 0)
        FROM (SELECT (quote_ident(schema) || '.' || quote_ident(name))::regclass AS root
              FROM unnest(%s::text[], %s::text[]) AS u(schema, name)) t
        CROSS JOIN LATERAL (SELECT relid FROM pg_partition_tree(t.root) WHERE isleaf
                            UNION ALL  -- a plain table has no partition tree
                            SELECT t.root WHERE NOT EXISTS (SELECT 1 FROM pg_partition_tree(t.root))) l
        """, ([t.schema for t in tables], [t.name for t in tables]))[0][0])
