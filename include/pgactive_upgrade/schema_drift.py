"""DDL during the upgrade: neither driver replicates it, so a change made on one node after the schema copy stalls
(native) or silently splits (pgactive) replication. The selected tables' columns are compared between the nodes.

Only drift that breaks the apply fails a health check: a column that a publishing node has and the other lacks,
a column whose type differs, a column on the receiving node only that is NOT NULL without a default, a selected
table the target lacks. A nullable column added on the receiving node first (the safe order for native
replication: the target, then the source) is a warning.

Not caught here: enum values added on one node (an apply of the new value fails), constraints, indexes, triggers
and column defaults that differ, and tables created after the build on both nodes (the native driver checks that
each selected table is in its publication)."""

from __future__ import annotations

from dataclasses import dataclass

from pgactive_upgrade.catalog import Table
from pgactive_upgrade.db import query

NODES = ("source", "target")


@dataclass(frozen=True)
class Column:
    type: str
    required: bool  # NOT NULL without a default: a row arriving without it is refused


@dataclass(frozen=True)
class Drift:
    message: str  # names the table, the column and the fix
    breaks_apply: bool


_COLUMNS = """
SELECT t.schema || '.' || t.name, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull AND NOT a.atthasdef
FROM unnest(%s::text[], %s::text[]) AS t(schema, name)
JOIN pg_namespace n ON n.nspname = t.schema
JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = t.name
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
"""


def columns(connection, tables: list[Table]) -> dict[str, dict[str, Column]]:
    """table -> column -> its type, for each table (a table missing on this node has no columns)."""
    found: dict[str, dict[str, Column]] = {t.qualified_name: {} for t in tables}
    for table, column, type_name, required in query(connection, _COLUMNS, ([t.schema for t in tables],
                                                                         [t.name for t in tables])):
        found[table][column] = Column(type_name, required)
    return found


def differences(source: dict[str, dict[str, Column]], target: dict[str, dict[str, Column]],
                publishing: frozenset[str] | set[str] = frozenset(NODES)) -> list[Drift]:
    """publishing: the nodes whose changes replicate to the other now ("source", "target" or both)."""
    found = []
    for table in sorted(source):
        on = {"source": source[table], "target": target.get(table, {})}
        if not on["target"]:
            found.append(Drift(f"{table}: exists on the source only (created after the schema copy), so its rows "
                               "are not replicated; create it on the target with the source's definition and add "
                               "it to the replication (or leave it out with exclude_tables)", breaks_apply=True))
            continue
        for node, other in (NODES, NODES[::-1]):
            found += [_one_sided(table, name, column, node, other, node in publishing)
                      for name, column in sorted(on[node].items()) if name not in on[other]]
        found += [Drift(f"{table}: column {name} is {on['source'][name].type} on the source, "
                        f"{on['target'][name].type} on the target; ALTER it on one node to match", breaks_apply=True)
                  for name in sorted(on["source"].keys() & on["target"].keys())
                  if on["source"][name].type != on["target"][name].type]
    return found


def _one_sided(table: str, name: str, column: Column, node: str, other: str, publishes: bool) -> Drift:
    where = f"{table}: column {name} ({column.type}) exists on the {node} only"
    if publishes:
        return Drift(f"{where}: the {other} cannot apply rows carrying it; add it on the {other}", breaks_apply=True)
    if column.required:
        return Drift(f"{where} and is NOT NULL without a default: rows from the {other} are refused; give it a "
                     f"default or add it on the {other}", breaks_apply=True)
    return Drift(f"{where}; add it on the {other} too before replication runs from the {node} to the {other}",
                 breaks_apply=False)
