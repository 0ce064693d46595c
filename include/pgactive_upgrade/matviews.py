"""Materialized views: the schema copy creates them empty on the target, and replication never fills them."""

from __future__ import annotations

from graphlib import TopologicalSorter

from psycopg2 import sql

from pgactive_upgrade.catalog import SYSTEM_SCHEMAS
from pgactive_upgrade.config import Filters
from pgactive_upgrade.db import execute, qualified, query

_VIEWS = """
SELECT c.oid::int, n.nspname, c.relname,
       c.relispopulated AND EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisunique
                                    AND i.indpred IS NULL AND i.indexprs IS NULL)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'm' AND n.nspname <> ALL(%s)
  AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = c.oid AND d.deptype = 'e')
ORDER BY 2, 3
"""

# (view or materialized view, the view or materialized view it reads from)
_READS_FROM = """
SELECT DISTINCT r.ev_class::int, d.refobjid::int
FROM pg_rewrite r
JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid AND d.refclassid = 'pg_class'::regclass
JOIN pg_class c ON c.oid = d.refobjid AND c.relkind IN ('v', 'm')
WHERE d.refobjid <> r.ev_class
"""


def refresh_all(connection, filters: Filters) -> list[tuple[str, str]]:
    """Refresh every selected materialized view, those it reads from first; returns them, (schema, name), in that
    order.
    A populated view with a usable unique index is refreshed CONCURRENTLY, so readers are not blocked."""
    views = {oid: (schema, name, concurrent) for oid, schema, name, concurrent
             in query(connection, _VIEWS, (list(SYSTEM_SCHEMAS),)) if filters.selects(schema, name)}
    refreshed = []
    for oid in TopologicalSorter(_matviews_read(connection, list(views))).static_order():
        schema, name, concurrent = views[oid]
        verb = "REFRESH MATERIALIZED VIEW CONCURRENTLY {}" if concurrent else "REFRESH MATERIALIZED VIEW {}"
        execute(connection, sql.SQL(verb).format(qualified(schema, name)))
        refreshed.append((schema, name))
    return refreshed


def _matviews_read(connection, matviews: list[int]) -> dict[int, set[int]]:
    """Each materialized view -> the materialized views (of `matviews`) it reads, directly or through plain views;
    in the order of `matviews`."""
    reads: dict[int, set[int]] = {}
    for reader, source in query(connection, _READS_FROM):
        reads.setdefault(reader, set()).add(source)
    return {oid: _through_views(oid, reads, set(matviews)) for oid in matviews}


def _through_views(start: int, reads: dict[int, set[int]], matviews: set[int]) -> set[int]:
    found, seen, pending = set(), {start}, list(reads.get(start, ()))
    while pending:
        oid = pending.pop()
        if oid in seen:
            continue
        seen.add(oid)
        if oid in matviews:
            found.add(oid)
        elif oid in reads:  # a view: what it reads counts
            pending.extend(reads[oid])
    return found
