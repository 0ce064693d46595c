"""DDL during the upgrade: neither driver replicates it, so a change made on one node after the schema copy stalls
(native) or silently splits (pgactive) replication. The selected tables' columns are compared between the nodes."""

from __future__ import annotations

from pgactive_upgrade.catalog import Table
from pgactive_upgrade.db import query

_COLUMNS = """
SELECT t.schema || '.' || t.name, a.attname, format_type(a.atttypid, a.atttypmod)
FROM unnest(%s::text[], %s::text[]) AS t(schema, name)
JOIN pg_namespace n ON n.nspname = t.schema
JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = t.name
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
"""


def columns(connection, tables: list[Table]) -> dict[str, dict[str, str]]:
    """table -> column -> type, for each table (a table missing on this node has no columns)."""
    found: dict[str, dict[str, str]] = {t.qualified_name: {} for t in tables}
    for table, column, type_name in query(connection, _COLUMNS, ([t.schema for t in tables], [t.name for t in tables])):
        found[table][column] = type_name
    return found


def differences(source: dict[str, dict[str, str]], target: dict[str, dict[str, str]]) -> list[str]:
    found = []
    for table in sorted(source):
        on_source, on_target = source[table], target.get(table, {})
        found += [f"{table}: column {c} ({on_source[c]}) exists on the source only" for c in sorted(on_source.keys() - on_target.keys())]
        found += [f"{table}: column {c} ({on_target[c]}) exists on the target only" for c in sorted(on_target.keys() - on_source.keys())]
        found += [f"{table}: column {c} is {on_source[c]} on the source, {on_target[c]} on the target"
                  for c in sorted(on_source.keys() & on_target.keys()) if on_source[c] != on_target[c]]
    return found
