"""Per-table row counts and checksums, compared between the two instances."""

from __future__ import annotations

from dataclasses import dataclass

from psycopg2 import sql

from pgactive_upgrade.catalog import Table
from pgactive_upgrade.db import qualified, query


@dataclass(frozen=True)
class TableDigest:
    rows: int
    checksum: str


def digest(connection, table: Table) -> TableDigest:
    """Row count and an md5 over every row's text form, ordered by primary key."""
    if not table.primary_key:
        raise ValueError(f"{table.qualified_name}: no primary key to order rows by")
    order = sql.SQL(", ").join(sql.SQL("t.{}").format(sql.Identifier(c)) for c in table.primary_key)
    statement = sql.SQL(
        "SELECT count(*), coalesce(md5(string_agg(md5(t::text), '' ORDER BY {order})), '') FROM {table} AS t"
    ).format(order=order, table=qualified(table.schema, table.name))
    rows, checksum = query(connection, statement)[0]
    return TableDigest(rows, checksum)


def compare(source, target, tables: list[Table]) -> tuple[dict[str, TableDigest], dict[str, tuple]]:
    """Digest every table on both sides: (source digests, differences as name -> (source, target))."""
    digests, differences = {}, {}
    for table in tables:
        on_source, on_target = digest(source, table), digest(target, table)
        digests[table.qualified_name] = on_source
        if on_source != on_target:
            differences[table.qualified_name] = (on_source, on_target)
    return digests, differences
