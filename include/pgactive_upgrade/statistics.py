"""Planner statistics and extension versions on the target: logical replication copies rows, not what the planner
knows about them, and the schema copy installs the extension versions the source had."""

from __future__ import annotations

import threading
import time
from contextlib import closing
from concurrent.futures import CancelledError, ThreadPoolExecutor, as_completed
from collections.abc import Callable

from psycopg2 import errors, sql

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


class AnalyzeFailed(RuntimeError):
    """ANALYZE could not give every relation statistics: the message names them."""


# Per relation: dropped since listed (no oid), and whether this login may ANALYZE it (PostgreSQL 17: the MAINTAIN
# privilege; before: the owner's privileges or the database owner's; a superuser always). Without it ANALYZE only
# warns "permission denied to analyze ..., skipping it" and succeeds.
_MAY_ANALYZE = """
SELECT r.s, r.n, c.oid IS NULL,
       CASE WHEN c.oid IS NULL THEN true
            WHEN current_setting('server_version_num')::int >= 170000 THEN has_table_privilege(c.oid, 'MAINTAIN')
            ELSE pg_has_role(c.relowner, 'USAGE')
                 OR pg_has_role((SELECT datdba FROM pg_database WHERE datname = current_database()), 'USAGE') END
FROM unnest(%s::text[], %s::text[]) WITH ORDINALITY AS r(s, n, i)
LEFT JOIN pg_class c ON c.oid = to_regclass(quote_ident(r.s) || '.' || quote_ident(r.n))
ORDER BY r.i
"""


def analyze(endpoint: Endpoint, credentials: Credentials, relations: list[tuple[str, str]], parallelism: int,
            progress: Callable[[dict], None] = lambda figures: None, progress_seconds: float = 2.0, *,
            lock_timeout_ms: int = 5000, lock_tries: int = 3) -> dict:
    """ANALYZE each (schema, name) on the node, `parallelism` at a time (one connection each); progress is called
    with {done, total, relation, seconds} after the first relation, then at most every progress_seconds, and after
    the last. Returns the figures of the whole pass; a relation dropped meanwhile is skipped with a note.
    Raises AnalyzeFailed, before any ANALYZE, when the login may not analyze some relations, and when a relation's
    lock stays taken (lock_timeout_ms, lock_tries times). On any error (or the task's timeout) queued work is
    cancelled and running ANALYZEs are cancelled on the server."""
    started = time.monotonic()
    with closing(connect(endpoint, credentials)) as connection:
        relations, skipped = _analyzable(connection, relations)
    reported = [float("-inf")]
    total, done, lock = len(relations), [0], threading.Lock()
    local = threading.local()
    connections: list = []

    stop = threading.Event()  # set by the first failure: no worker starts another relation

    def analyze_one(relation: tuple[str, str]) -> tuple[str, bool]:
        if stop.is_set():
            raise CancelledError
        try:
            if not hasattr(local, "connection"):
                local.connection = connect(endpoint, credentials)
                execute(local.connection, "SELECT set_config('lock_timeout', %s, false)",
                        (str(int(lock_timeout_ms)),))
                with lock:
                    connections.append(local.connection)
            return _analyze_one(local.connection, relation, lock_tries)
        except BaseException:
            stop.set()
            raise

    pool = ThreadPoolExecutor(max_workers=max(1, min(parallelism, total or 1)))
    try:
        for future in as_completed([pool.submit(analyze_one, relation) for relation in relations]):
            name, dropped = future.result()
            if dropped:
                skipped.append({"relation": name, "note": "dropped meanwhile: not analyzed"})
            with lock:
                done[0] += 1
                figures = {"done": done[0], "total": total, "relation": name,
                           "seconds": round(time.monotonic() - started, 2)}
            if done[0] == total or time.monotonic() - reported[0] >= progress_seconds:
                reported[0] = time.monotonic()
                progress(figures)
    except BaseException:
        stop.set()
        pool.shutdown(wait=False, cancel_futures=True)
        with lock:
            for connection in connections:
                connection.cancel()  # the ANALYZEs running now end on the server too
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        for connection in connections:
            connection.close()
    analyzed = total - sum(1 for s in skipped if s["note"].startswith("dropped meanwhile"))
    return {"analyzed": analyzed, "skipped": skipped, "parallelism": parallelism, "seconds": round(time.monotonic() - started, 2)}


def _analyzable(connection, relations: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], list[dict]]:
    """The relations that still exist, and the skipped ones with a note; AnalyzeFailed naming those the login may not
    analyze."""
    rows = query(connection, _MAY_ANALYZE, ([s for s, _ in relations], [n for _, n in relations]))
    refused = [f"{schema}.{name}" for schema, name, gone, may in rows if not gone and not may]
    if refused:
        raise AnalyzeFailed(f"the login {connection.info.user!r} may not ANALYZE {', '.join(refused)} (the owner's "
                            "privileges, or MAINTAIN on PostgreSQL 17+, are needed): no statistics would be collected")
    skipped = [{"relation": f"{schema}.{name}", "note": "dropped since listed: not analyzed"}
               for schema, name, gone, _ in rows if gone]
    return [(schema, name) for schema, name, gone, _ in rows if not gone], skipped


def _analyze_one(connection, relation: tuple[str, str], lock_tries: int) -> tuple[str, bool]:
    """ANALYZE one relation: its name, and whether it was dropped meanwhile."""
    name = f"{relation[0]}.{relation[1]}"
    for attempt in range(1, lock_tries + 1):
        del connection.notices[:]
        try:
            execute(connection, sql.SQL("ANALYZE {}").format(qualified(*relation)))
        except errors.LockNotAvailable:
            if attempt == lock_tries:
                raise AnalyzeFailed(f"ANALYZE {name}: its lock stayed taken by another session ({lock_tries} tries "
                                    "of lock_timeout): no statistics collected for it") from None
            continue
        except errors.UndefinedTable:
            return name, True
        refused = [notice for notice in connection.notices if "skipping" in notice]
        if refused:  # the privilege changed since the check: ANALYZE only warns
            raise AnalyzeFailed(f"ANALYZE {name} was skipped by the server (permission denied): no statistics "
                                "collected for it")
        return name, False
    return name, False
