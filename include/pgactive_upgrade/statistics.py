"""Planner statistics and extension versions on the target: logical replication copies rows, not what the planner
knows about them, and the schema copy installs the extension versions the source had."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from collections.abc import Callable

from psycopg2 import sql

from pgactive_upgrade.db import Credentials, Endpoint, connect, execute, qualified, query

# Extensions installed on the target whose default version there is newer and reachable by an update path.
_OUTDATED_EXTENSIONS = """
SELECT e.extname, e.extversion, a.default_version
FROM pg_extension e JOIN pg_available_extensions a ON a.name = e.extname
WHERE a.default_version IS DISTINCT FROM e.extversion
  AND EXISTS (SELECT 1 FROM pg_extension_update_paths(e.extname) p
              WHERE p.source = e.extversion AND p.target = a.default_version AND p.path IS NOT NULL)
ORDER BY 1
"""


def update_extensions(connection) -> list[dict]:
    """ALTER EXTENSION ... UPDATE for each extension the target can move to its default version; returns each
    as {name, from, to}. Idempotent: an extension already at its default version is not listed."""
    updated = []
    for name, installed, default in query(connection, _OUTDATED_EXTENSIONS):
        execute(connection, sql.SQL("ALTER EXTENSION {} UPDATE").format(sql.Identifier(name)))
        updated.append({"name": name, "from": installed, "to": default})
    return updated


def analyze(endpoint: Endpoint, credentials: Credentials, relations: list[tuple[str, str]], parallelism: int,
            progress: Callable[[dict], None] = lambda figures: None, progress_seconds: float = 2.0) -> dict:
    """ANALYZE each (schema, name) on the node, `parallelism` at a time (one connection each); progress is called
    with {done, total, relation, seconds} after the first relation, then at most every progress_seconds, and after
    the last. Returns the figures of the whole pass."""
    started = time.monotonic()
    reported = [float("-inf")]
    total, done, lock = len(relations), [0], threading.Lock()
    local = threading.local()
    connections: list = []

    def analyze_one(relation: tuple[str, str]) -> str:
        if not hasattr(local, "connection"):
            local.connection = connect(endpoint, credentials)
            with lock:
                connections.append(local.connection)
        execute(local.connection, sql.SQL("ANALYZE {}").format(qualified(*relation)))
        return f"{relation[0]}.{relation[1]}"

    try:
        with ThreadPoolExecutor(max_workers=max(1, min(parallelism, total or 1))) as pool:
            for future in as_completed([pool.submit(analyze_one, relation) for relation in relations]):
                name = future.result()
                with lock:
                    done[0] += 1
                    figures = {"done": done[0], "total": total, "relation": name,
                               "seconds": round(time.monotonic() - started, 2)}
                if done[0] == total or time.monotonic() - reported[0] >= progress_seconds:
                    reported[0] = time.monotonic()
                    progress(figures)
    finally:
        for connection in connections:
            connection.close()
    return {"analyzed": total, "parallelism": parallelism, "seconds": round(time.monotonic() - started, 2)}

