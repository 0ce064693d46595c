"""Every row of both nodes compared while writes go on.

Each table is cut into key-ordered chunks; each chunk's row count and sum of 64-bit row hashes is computed on both
nodes in parallel. Both sides read at slightly different moments, so a chunk that differs is read again after a
replication barrier (a marker row written on each writing node and awaited on the others). A chunk that still
differs is compared row by row, and each differing row is checked once more with the row locked on the writing
node(s) across a barrier: a locked row cannot change, so after the barrier the other node must hold the same
row. Only rows that differ in every such check are reported, with their table and key range.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import psycopg2
from psycopg2 import sql

from pgactive_upgrade.catalog import META_SCHEMA, Table
from pgactive_upgrade.db import Credentials, Endpoint, connect, execute, qualified, query

MARKER_TABLE = "cutover_marker"  # replicated with the tables (see replication.base)

# Settings that change a value's text form: pinned on both nodes so that equal rows hash equally.
PINNED_SETTINGS = {
    "TimeZone": "UTC",
    "DateStyle": "ISO, MDY",
    "IntervalStyle": "postgres",
    "extra_float_digits": "1",
    "bytea_output": "hex",
    "lc_monetary": "C",
    "xmloption": "content",
}
ROW = "pgu_row"  # the row alias: a column may be called anything, even "t"
ROW_HASH = sql.SQL("hashtextextended({}::text, 0)").format(sql.Identifier(ROW))


class VerificationError(RuntimeError):
    pass


@dataclass(frozen=True)
class VerifyNode:
    name: str  # "source" or "target"
    endpoint: Endpoint
    writer: bool  # takes application writes now


@dataclass(frozen=True)
class Chunk:
    table: Table
    lower: tuple | None  # inclusive; None: from the first row
    upper: tuple | None  # exclusive; None: to the last row

    def describe(self) -> str:
        columns = ", ".join(self.table.primary_key)
        key = f"({columns})" if len(self.table.primary_key) > 1 else columns
        lower = "start" if self.lower is None else _render(self.lower)
        upper = "end" if self.upper is None else _render(self.upper)
        return f"{key} from {lower} to {upper}"


@dataclass(frozen=True)
class Digest:
    rows: int
    checksum: int


@dataclass
class Divergence:
    chunk: Chunk
    keys: list[tuple]  # keys whose rows differ in every check (missing on one side counts)
    more: bool = False  # more rows differ than were checked one by one
    unsettled: bool = False  # the last check could not lock the rows or pass the barrier

    def describe(self) -> str:
        shown = ", ".join(_render(k) for k in self.keys[:3])
        count = f"at least {len(self.keys)}" if self.more else str(len(self.keys))
        why = " (the last re-check could not lock them: busy rows)" if self.unsettled else ""
        return (f"{self.chunk.table.qualified_name}: {count} row(s) differ in key range {self.chunk.describe()} "
                f"(e.g. {shown}){why}")


@dataclass
class Report:
    tables: int = 0
    chunks: int = 0
    rows: int = 0
    rechecked_chunks: int = 0
    rechecked_rows: int = 0
    seconds: float = 0.0
    divergences: list[Divergence] = field(default_factory=list)

    @property
    def rows_per_second(self) -> float:
        return round(self.rows / self.seconds, 1) if self.seconds else 0.0

    def as_dict(self) -> dict:
        return {"tables": self.tables, "chunks": self.chunks, "rows": self.rows, "seconds": round(self.seconds, 2),
                "rows_per_second": self.rows_per_second, "rechecked_chunks": self.rechecked_chunks,
                "rechecked_rows": self.rechecked_rows,
                "divergences": [d.describe() for d in self.divergences]}


class Pool:
    """Connections to one node, each with the pinned settings; at most `size` open, reused across threads."""

    def __init__(self, node: VerifyNode, credentials: Credentials, size: int):
        self.node, self.credentials = node, credentials
        self._idle: queue.LifoQueue = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(size)
        self._opened: list = []
        self._lock = threading.Lock()

    @contextmanager
    def connection(self) -> Iterator:
        with self._slots:
            try:
                connection = self._idle.get_nowait()
            except queue.Empty:
                connection = self._open()
            try:
                yield connection
            except BaseException:
                connection.close()  # its state is unknown: never reused
                raise
            if connection.closed:
                return
            if not connection.autocommit:
                connection.rollback()
                connection.autocommit = True
            self._idle.put(connection)

    def _open(self):
        connection = connect(self.node.endpoint, self.credentials, statement_timeout_ms=30 * 60 * 1000)
        pinned = sql.SQL(", ").join(sql.SQL("set_config({}, {}, false)").format(sql.Literal(k), sql.Literal(v))
                                    for k, v in PINNED_SETTINGS.items())
        query(connection, sql.SQL("SELECT ") + pinned)
        with self._lock:
            self._opened.append(connection)
        return connection

    def close(self) -> None:
        with self._lock:
            for connection in self._opened:
                connection.close()
            self._opened.clear()


class Verification:
    """One comparison of the tables on two nodes; `run` returns a Report whose divergences are real differences."""

    def __init__(self, nodes: list[VerifyNode], credentials: Credentials, tables: list[Table], *,
                 parallelism: int = 4, chunk_rows: int = 100_000, rounds: int = 3, barrier_timeout: float = 120.0,
                 max_keys: int = 10_000, progress: Callable[[dict], None] | None = None):
        if len(nodes) != 2 or not any(n.writer for n in nodes):
            raise ValueError("verification compares two nodes, at least one of them taking writes")
        self.nodes = nodes
        self.tables = [t for t in tables if t.primary_key]
        missing_key = [t.qualified_name for t in tables if not t.primary_key]
        if missing_key:
            raise VerificationError(f"tables without a primary key cannot be compared row by row: {missing_key}")
        # a row check holds a writer connection and passes a barrier with another one
        self.pools = {n.name: Pool(n, credentials, 2 * parallelism + 1) for n in nodes}
        self.parallelism, self.chunk_rows, self.rounds = parallelism, chunk_rows, rounds
        self.barrier_timeout, self.max_keys = barrier_timeout, max_keys
        self.progress = progress or (lambda _: None)
        self.report = Report(tables=len(self.tables))

    @property
    def writers(self) -> list[VerifyNode]:
        return [n for n in self.nodes if n.writer]

    def run(self) -> Report:
        started = time.monotonic()
        try:
            with ThreadPoolExecutor(max_workers=self.parallelism, thread_name_prefix="verify") as pool:
                self.executor = pool
                chunks = [c for cs in pool.map(self.chunks, self.tables) for c in cs]
                self.report.chunks = len(chunks)
                digests = self._digest_all(chunks, first=True)
                differing = [c for c in chunks if self._differ(digests, c)]
                for _ in range(self.rounds):
                    if not differing:
                        break
                    self.barrier()
                    self.report.rechecked_chunks += len(differing)
                    digests.update(self._digest_all(differing))
                    differing = [c for c in differing if self._differ(digests, c)]
                self.report.divergences = [d for d in pool.map(self._confirm_chunk, differing) if d]
        finally:
            for p in self.pools.values():
                p.close()
        self.report.seconds = time.monotonic() - started
        return self.report

    # --- chunks and digests ----------------------------------------------------------------------------------
    def chunks(self, table: Table) -> list[Chunk]:
        """Key-ordered chunks of about chunk_rows rows each, bounded by keys read on a writer."""
        with self.pools[self.writers[0].name].connection() as connection:
            estimate = _row_estimate(connection, table)
            if estimate <= self.chunk_rows:
                return [Chunk(table, None, None)]
            step = sql.SQL("SELECT {keys} FROM {table} WHERE ({keys}) >= ({lower}) ORDER BY {keys} OFFSET %s LIMIT 1")
            first = sql.SQL("SELECT {keys} FROM {table} ORDER BY {keys} OFFSET %s LIMIT 1")
            bounds: list[tuple] = []
            while True:
                statement = (step if bounds else first).format(
                    keys=_keys(table), table=qualified(table.schema, table.name),
                    lower=sql.SQL(", ").join(sql.Placeholder() * len(table.primary_key)),
                )
                rows = query(connection, statement, (*(bounds[-1] if bounds else ()), self.chunk_rows))
                if not rows:
                    break
                bounds.append(tuple(rows[0]))
        edges = [None, *bounds, None]
        return [Chunk(table, lower, upper) for lower, upper in zip(edges, edges[1:])]

    def _digest_all(self, chunks: list[Chunk], first: bool = False) -> dict:
        jobs = [(node, chunk) for chunk in chunks for node in self.nodes]
        digests, done, last_report = {}, 0, 0.0
        for (node, chunk), result in zip(jobs, self.executor.map(lambda job: self.digest(*job), jobs)):
            digests[(node.name, chunk)] = result
            if first and node.writer and node is self.writers[0]:
                self.report.rows += result.rows
                done += 1
                if time.monotonic() - last_report > 2 or done == len(chunks):
                    last_report = time.monotonic()
                    self.progress({"chunks_done": done, "chunks": len(chunks), "rows": self.report.rows})
        return digests

    def digest(self, node: VerifyNode, chunk: Chunk) -> Digest:
        statement = sql.SQL("SELECT count(*), coalesce(sum({hash}), 0) FROM {table} AS {row} WHERE {range}").format(
            hash=ROW_HASH, table=qualified(chunk.table.schema, chunk.table.name), row=sql.Identifier(ROW),
            range=_range(chunk),
        )
        with self.pools[node.name].connection() as connection:
            try:
                rows, checksum = query(connection, statement, _range_params(chunk))[0]
            except psycopg2.errors.UndefinedTable:
                raise VerificationError(f"{chunk.table.qualified_name}: no such table on the {node.name}") from None
        return Digest(rows, int(checksum))

    # --- the replication barrier ------------------------------------------------------------------------------
    def barrier(self, timeout: float | None = None) -> None:
        """When this returns, every write committed on a writing node before the call is applied on the other."""
        tokens = {}
        for writer in self.writers:
            token = f"verify-{uuid.uuid4()}"
            with self.pools[writer.name].connection() as connection:
                execute(connection, sql.SQL("INSERT INTO {} (token) VALUES (%s)").format(_marker()), (token,))
            tokens[writer.name] = token
        timeout = self.barrier_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        for writer_name, token in tokens.items():
            other = next(n for n in self.nodes if n.name != writer_name)
            with self.pools[other.name].connection() as connection:
                while not query(connection, sql.SQL("SELECT 1 FROM {} WHERE token = %s").format(_marker()), (token,)):
                    if time.monotonic() > deadline:
                        raise VerificationError(
                            f"replication barrier: a marker written on the {writer_name} did not reach the {other.name} "
                            f"within {timeout:.0f} s; is replication running?"
                        )
                    time.sleep(0.02)
            with self.pools[writer_name].connection() as connection:
                execute(connection, sql.SQL("DELETE FROM {} WHERE token = %s").format(_marker()), (token,))

    # --- row by row -------------------------------------------------------------------------------------------
    def _confirm_chunk(self, chunk: Chunk) -> Divergence | None:
        keys = self._differing_keys(chunk)
        if len(keys) > self.max_keys:
            self.barrier()
            keys = self._differing_keys(chunk)
            if len(keys) > self.max_keys:
                return Divergence(chunk, _ordered(keys)[: self.max_keys], more=True)
        self.report.rechecked_rows += len(keys)
        unsettled = False
        for _ in range(self.rounds):
            if not keys:
                return None
            keys, unsettled = self._still_differing(chunk.table, keys)
        return Divergence(chunk, _ordered(keys), unsettled=unsettled) if keys else None

    def _differing_keys(self, chunk: Chunk) -> set[tuple]:
        statement = sql.SQL("SELECT {keys}, {hash} FROM {table} AS {row} WHERE {range}").format(
            keys=_keys(chunk.table, ROW), hash=ROW_HASH, table=qualified(chunk.table.schema, chunk.table.name),
            row=sql.Identifier(ROW), range=_range(chunk),
        )
        first, second = (self._hashes(node, chunk.table, statement, _range_params(chunk)) for node in self.nodes)
        return {k for k in first.keys() | second.keys() if first.get(k) != second.get(k)}

    def _hashes(self, node: VerifyNode, table: Table, statement, params, connection=None) -> dict[tuple, int]:
        if connection is None:
            with self.pools[node.name].connection() as connection:
                return self._hashes(node, table, statement, params, connection)
        width = len(table.primary_key)
        return {tuple(r[:width]): r[width] for r in query(connection, statement, params)}

    def _still_differing(self, table: Table, keys: set[tuple]) -> tuple[set[tuple], bool]:
        """(keys that differ again, whether some check could not conclude: busy rows or a stalled barrier)."""
        ordered = _ordered(keys)
        still, unsettled = set(), False
        for batch in (ordered[i:i + 1000] for i in range(0, len(ordered), 1000)):
            differing, concluded = self._locked_compare(table, batch)
            still |= differing
            unsettled |= not concluded
        return still, unsettled

    def _locked_compare(self, table: Table, keys: list[tuple]) -> tuple[set[tuple], bool]:
        """Rows locked on every writing node cannot change (local writes and replicated ones wait for the lock), so
        once a barrier has passed the other node must hold the same rows. With two writing nodes a replicated change
        to a locked row holds the barrier up: a short timeout, and the next round tries again."""
        statement = sql.SQL("SELECT {keys}, {hash} FROM {table} AS {row} WHERE ({keys}) IN %s").format(
            keys=_keys(table, ROW), hash=ROW_HASH, table=qualified(table.schema, table.name), row=sql.Identifier(ROW),
        )
        params = (tuple(keys),)
        rows: dict[str, dict] = {}
        with ExitStack() as stack:
            for writer in self.writers:
                connection = stack.enter_context(self.pools[writer.name].connection())
                connection.autocommit = False  # the row locks last until the pool rolls this back
                try:
                    execute(connection, "SET LOCAL lock_timeout = '2s'")
                    rows[writer.name] = self._hashes(writer, table, statement + sql.SQL(" FOR SHARE"), params, connection)
                except psycopg2.errors.LockNotAvailable:
                    return set(keys), False
            try:
                self.barrier(timeout=self.barrier_timeout if len(self.writers) == 1 else 5.0)
            except VerificationError:
                return set(keys), False
            for node in self.nodes:
                if node.name not in rows:
                    rows[node.name] = self._hashes(node, table, statement, params)
        first, second = (rows[n.name] for n in self.nodes)
        return {k for k in keys if first.get(k) != second.get(k)}, True

    def _differ(self, digests: dict, chunk: Chunk) -> bool:
        first, second = (digests[(node.name, chunk)] for node in self.nodes)
        return first != second


def _row_estimate(connection, table: Table) -> int:
    found = query(
        connection,
        "SELECT c.reltuples FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s",
        (table.schema, table.name),
    )
    if not found:
        raise VerificationError(f"{table.qualified_name}: no such table on the writing node")
    estimate = found[0][0]
    if estimate is None or estimate < 0:  # never analyzed (or a partitioned root): count
        return query(connection, sql.SQL("SELECT count(*) FROM {}").format(qualified(table.schema, table.name)))[0][0]
    return int(estimate)


def _keys(table: Table, alias: str | None = None) -> sql.Composable:
    return sql.SQL(", ").join(
        sql.SQL("{}.{}").format(sql.Identifier(alias), sql.Identifier(c)) if alias else sql.Identifier(c)
        for c in table.primary_key
    )


def _range(chunk: Chunk) -> sql.Composable:
    keys, width = _keys(chunk.table, ROW), len(chunk.table.primary_key)
    values = sql.SQL(", ").join(sql.Placeholder() * width)
    parts = [sql.SQL("({}) >= ({})").format(keys, values)] if chunk.lower is not None else []
    parts += [sql.SQL("({}) < ({})").format(keys, values)] if chunk.upper is not None else []
    return sql.SQL(" AND ").join(parts) if parts else sql.SQL("true")


def _range_params(chunk: Chunk) -> tuple:
    return (*(chunk.lower or ()), *(chunk.upper or ()))


def _marker() -> sql.Composable:
    return qualified(META_SCHEMA, MARKER_TABLE)


def _render(key: tuple) -> str:
    return repr(key[0]) if len(key) == 1 else "(" + ", ".join(repr(v) for v in key) + ")"


def _ordered(keys) -> list[tuple]:
    try:
        return sorted(keys)
    except TypeError:  # keys of a type Python cannot order (bytea)
        return sorted(keys, key=repr)
