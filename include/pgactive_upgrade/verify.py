"""Every row of both nodes compared while writes go on, without stopping them.

1. Each table is cut into key-ordered chunks; each chunk's row count and sum of 64-bit row hashes is computed on
   both nodes in parallel.
2. Both nodes are read at slightly different moments, so a chunk that differs is read again after a replication
   barrier: a marker row written on each writing node and awaited on the other.
3. A chunk that still differs is cut into small chunks (again after a barrier), and those that differ are compared
   row by row. Each differing row is then read on the writing node(s) with its row version (ctid, xmin), a barrier
   is passed, and the row is read on the receiving node and again on the writing node(s). A row whose version did not
   change across the barrier has been applied on the other node by then: if the two differ, the difference is real.
   A row missing on every writing node needs two such findings.
4. A row that changed in every try (a hot row) is, with one writing node, locked `FOR SHARE` for one barrier;
   failing that it is reported as unchecked (a warning: each of its changes replicates the whole row).
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from collections.abc import Callable, Iterator

import psycopg2
from psycopg2 import sql

from pgactive_upgrade import schema_drift
from pgactive_upgrade.catalog import META_SCHEMA, Table
from pgactive_upgrade.db import Credentials, Endpoint, connect, execute, qualified, query
from pgactive_upgrade.replication.base import MARKER_TABLE  # replicated with the tables


# Settings that change a value's text form (pinned so that equal rows hash equally), and those that keep the sessions
# harmless and alive: no parallel workers, row security on error rather than hidden rows, no idle timeouts.
PINNED_SETTINGS = {
    "TimeZone": "UTC",
    "DateStyle": "ISO, MDY",
    "IntervalStyle": "postgres",
    "extra_float_digits": "1",
    "bytea_output": "hex",
    "lc_monetary": "C",
    "xmloption": "content",
    "search_path": "pg_catalog",
    "row_security": "off",
    "max_parallel_workers_per_gather": "0",
    "idle_in_transaction_session_timeout": "0",
}
PINNED_SINCE_14 = {"idle_session_timeout": "0"}
ROW = "pgu_row"  # the row alias
ROW_VERSION = sql.SQL("{row}.ctid::text || '/' || {row}.xmin::text").format(row=sql.Identifier(ROW))
SMALL_CHUNK_ROWS = 1000
ABSENT = (None, None)  # (hash, version) of a key a node does not hold


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
class RowFinding:
    chunk: Chunk
    keys: list[tuple]

    def describe(self, what: str = "differ") -> str:
        shown = ", ".join(_render(k) for k in self.keys[:3])
        return (f"{self.chunk.table.qualified_name}: {len(self.keys)} row(s) {what} in key range "
                f"{self.chunk.describe()} (e.g. {shown})")


@dataclass
class Report:
    tables: int = 0
    chunks: int = 0
    rows: int = 0
    rechecked_chunks: int = 0
    rechecked_rows: int = 0
    seconds: float = 0.0
    divergences: list[RowFinding] = field(default_factory=list)
    unchecked: list[RowFinding] = field(default_factory=list)  # rows that changed in every check

    @property
    def rows_per_second(self) -> float:
        return round(self.rows / self.seconds, 1) if self.seconds else 0.0

    def as_dict(self) -> dict:
        return {"tables": self.tables, "chunks": self.chunks, "rows": self.rows, "seconds": round(self.seconds, 2),
                "rows_per_second": self.rows_per_second, "rechecked_chunks": self.rechecked_chunks,
                "rechecked_rows": self.rechecked_rows, "divergences": [d.describe() for d in self.divergences],
                "unchecked": [u.describe("changed in every check") for u in self.unchecked]}


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
                if not connection.autocommit:
                    connection.rollback()
                    connection.autocommit = True
            except BaseException:
                connection.close()  # its state is unknown: never reused
                raise
            self._idle.put(connection)

    def _open(self):
        connection = connect(self.node.endpoint, self.credentials, statement_timeout_ms=30 * 60 * 1000)
        settings = dict(PINNED_SETTINGS)
        if int(query(connection, "SHOW server_version_num")[0][0]) >= 140000:
            settings.update(PINNED_SINCE_14)
        pinned = sql.SQL(", ").join(sql.SQL("set_config({}, {}, false)").format(sql.Literal(k), sql.Literal(v))
                                    for k, v in settings.items())
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
                 progress: Callable[[dict], None] | None = None):
        if len(nodes) != 2 or not any(n.writer for n in nodes):
            raise ValueError("verification compares two nodes, at least one of them taking writes")
        missing_key = [t.qualified_name for t in tables if not t.primary_key]
        if missing_key:
            raise VerificationError(f"tables without a primary key cannot be compared row by row: {missing_key}")
        self.nodes, self.tables = nodes, list(tables)
        # a locked check holds a writer connection while its barrier takes another
        self.pools = {n.name: Pool(n, credentials, 2 * parallelism + 1) for n in nodes}
        self.parallelism, self.chunk_rows, self.rounds = parallelism, chunk_rows, rounds
        self.barrier_timeout = barrier_timeout
        self.progress = progress or (lambda _: None)
        self.report = Report(tables=len(self.tables))
        self._report_lock = threading.Lock()

    @property
    def writers(self) -> list[VerifyNode]:
        return [n for n in self.nodes if n.writer]

    @property
    def readers(self) -> list[VerifyNode]:
        return [n for n in self.nodes if not n.writer]

    def run(self) -> Report:
        started = time.monotonic()
        try:
            self.columns = self._common_columns()
            with ThreadPoolExecutor(max_workers=self.parallelism, thread_name_prefix="verify") as pool:
                self.executor = pool
                whole = [Chunk(t, None, None) for t in self.tables]
                chunks = [c for cs in pool.map(lambda c: self.split(c, self.chunk_rows), whole) for c in cs]
                self.report.chunks = len(chunks)
                differing = self._still_differing(chunks, first=True)
                for finding in pool.map(self._examine, differing):
                    self.report.divergences += finding[0]
                    self.report.unchecked += finding[1]
        finally:
            for p in self.pools.values():
                p.close()
        self.report.seconds = time.monotonic() - started
        return self.report

    # --- columns, chunks and digests --------------------------------------------------------------------------
    def _common_columns(self) -> dict[str, list[str]]:
        """Each table's columns by name, the same on both nodes (a column only the target has, added there first,
        holds nothing replication brought, and is left out); otherwise rows could not be compared at all."""
        def read(node: VerifyNode) -> dict[str, dict[str, schema_drift.Column]]:
            with self.pools[node.name].connection() as connection:
                return schema_drift.columns(connection, self.tables)

        on = dict(zip((n.name for n in self.nodes), _concurrently([lambda n=n: read(n) for n in self.nodes])))
        columns, problems = {}, []
        for table in self.tables:
            name = table.qualified_name
            source, target = on["source"][name], on["target"][name]
            for node, found in (("source", source), ("target", target)):
                if not found:
                    problems.append(f"{name}: no such table on the {node}")
            problems += [f"{name}: column {c} is missing on the target" for c in sorted(source.keys() - target.keys())]
            problems += [f"{name}: column {c} is {source[c]} on the source, {target[c]} on the target"
                         for c in sorted(source.keys() & target.keys()) if source[c] != target[c]]
            columns[name] = sorted(source)
        if problems:
            raise VerificationError("the tables cannot be compared: " + "; ".join(problems[:20]))
        return columns

    def _row_hash(self, table: Table) -> sql.Composable:
        """A row's hash over its columns in name order (the nodes may hold them in another order)."""
        values = sql.SQL(", ").join(sql.SQL("{}.{}").format(sql.Identifier(ROW), sql.Identifier(c))
                                    for c in self.columns[table.qualified_name])
        return sql.SQL("hashtextextended(ROW({})::text, 0)").format(values)

    def split(self, chunk: Chunk, rows: int) -> list[Chunk]:
        """The chunk cut into key-ordered chunks of `rows` rows, bounded by keys read on a writing node."""
        table = chunk.table
        statement = sql.SQL("SELECT {keys} FROM {table} AS {row} WHERE {range} ORDER BY {keys} OFFSET %s LIMIT 1")
        bounds: list[tuple] = []
        with self.pools[self.writers[0].name].connection() as connection:
            while True:
                lower = bounds[-1] if bounds else chunk.lower
                part = Chunk(table, lower, chunk.upper)
                found = query(connection, statement.format(keys=_keys(table, ROW), table=_table(table),
                                                           row=sql.Identifier(ROW), range=_range(part)),
                              (*_range_params(part), rows))
                if not found:
                    break
                bounds.append(tuple(found[0]))
        edges = [chunk.lower, *bounds, chunk.upper]
        return [Chunk(table, lower, upper) for lower, upper in zip(edges, edges[1:])]

    def _still_differing(self, chunks: list[Chunk], *, in_worker: bool = False, first: bool = False) -> list[Chunk]:
        """Chunks that differ on the two nodes, read again after a barrier up to `rounds` times.
        in_worker: called from one of the executor's threads, which may all be busy: digest here, one by one."""
        digests = self._digest_all(chunks, in_worker, first)
        differing = [c for c in chunks if self._differ(digests, c)]
        for _ in range(self.rounds):
            if not differing:
                break
            self.barrier()
            with self._report_lock:
                self.report.rechecked_chunks += len(differing)
            digests.update(self._digest_all(differing, in_worker))
            differing = [c for c in differing if self._differ(digests, c)]
        return differing

    def _digest_all(self, chunks: list[Chunk], in_worker: bool, first: bool = False) -> dict:
        jobs = [(node, chunk) for chunk in chunks for node in self.nodes]
        results = map(lambda job: self.digest(*job), jobs) if in_worker else self.executor.map(lambda job: self.digest(*job), jobs)
        digests, done, last_report = {}, 0, 0.0
        for (node, chunk), result in zip(jobs, results):
            digests[(node.name, chunk)] = result
            if first and node is self.writers[0]:
                self.report.rows += result.rows
                done += 1
                if time.monotonic() - last_report > 2 or done == len(chunks):
                    last_report = time.monotonic()
                    self.progress({"chunks_done": done, "chunks": len(chunks), "rows": self.report.rows})
        return digests

    def digest(self, node: VerifyNode, chunk: Chunk) -> Digest:
        statement = sql.SQL("SELECT count(*), coalesce(sum({hash}), 0) FROM {table} AS {row} WHERE {range}").format(
            hash=self._row_hash(chunk.table), table=_table(chunk.table), row=sql.Identifier(ROW), range=_range(chunk),
        )
        with self.pools[node.name].connection() as connection:
            rows, checksum = query(connection, statement, _range_params(chunk))[0]
        return Digest(rows, int(checksum))

    def _differ(self, digests: dict, chunk: Chunk) -> bool:
        first, second = (digests[(node.name, chunk)] for node in self.nodes)
        return first != second

    # --- the replication barrier ------------------------------------------------------------------------------
    def barrier(self, timeout: float | None = None) -> None:
        """When this returns, every write committed on a writing node before the call is applied on the other."""
        timeout = self.barrier_timeout if timeout is None else timeout
        tokens = {w.name: f"verify-{uuid.uuid4()}" for w in self.writers}
        try:
            for writer_name, token in tokens.items():
                with self.pools[writer_name].connection() as connection:
                    execute(connection, sql.SQL("INSERT INTO {} (token) VALUES (%s)").format(_marker()), (token,))
            deadline = time.monotonic() + timeout
            for writer_name, token in tokens.items():
                other = next(n for n in self.nodes if n.name != writer_name)
                with self.pools[other.name].connection() as connection:
                    while not query(connection, sql.SQL("SELECT 1 FROM {} WHERE token = %s").format(_marker()), (token,)):
                        if time.monotonic() > deadline:
                            raise VerificationError(
                                f"replication barrier: a marker written on the {writer_name} did not reach the "
                                f"{other.name} within {timeout:.0f} s; is replication running?")
                        time.sleep(0.02)
        finally:
            for writer_name, token in tokens.items():
                with self.pools[writer_name].connection() as connection:
                    execute(connection, sql.SQL("DELETE FROM {} WHERE token = %s").format(_marker()), (token,))

    # --- row by row -------------------------------------------------------------------------------------------
    def _examine(self, chunk: Chunk) -> tuple[list[RowFinding], list[RowFinding]]:
        """(divergences, unchecked rows) of a chunk that kept differing: narrowed to small chunks, then row by row."""
        small = self.split(chunk, SMALL_CHUNK_ROWS)
        if len(small) > 1:
            self.barrier()
            small = self._still_differing(small, in_worker=True)
        divergences, unchecked = [], []
        for part in small:
            candidates = self._differing_keys(part)
            with self._report_lock:
                self.report.rechecked_rows += len(candidates)
            differ, changing = self._confirm(part.table, candidates)
            divergences += [RowFinding(part, _ordered(differ))] if differ else []
            unchecked += [RowFinding(part, _ordered(changing))] if changing else []
        return divergences, unchecked

    def _differing_keys(self, chunk: Chunk) -> set[tuple]:
        statement = self._rows_statement(chunk.table, _range(chunk))
        first, second = _concurrently(
            [lambda node=node: self._rows(node, chunk.table, statement, _range_params(chunk)) for node in self.nodes])
        return {k for k in first.keys() | second.keys() if first.get(k, ABSENT)[0] != second.get(k, ABSENT)[0]}

    def _confirm(self, table: Table, keys: set[tuple]) -> tuple[set[tuple], set[tuple]]:
        """(rows that really differ, rows that changed in every check)."""
        strikes: Counter = Counter()
        differ, pending = set(), set(keys)
        for attempt in range(self.rounds + 1):
            if not pending:
                break
            time.sleep(0.05 * attempt)
            proven, suspect, pending = self._versioned_compare(table, pending)
            strikes.update(suspect)
            differ |= proven | {k for k in suspect if strikes[k] >= 2}
            pending |= {k for k in suspect if strikes[k] < 2}
        if pending and len(self.writers) == 1:
            locked_differ, pending = self._locked_compare(table, pending)
            differ |= locked_differ
        return differ, pending

    def _versioned_compare(self, table: Table, keys: set[tuple]) -> tuple[set, set, set]:
        """(differ with a settled version on every writing node, held only by a non-writing node, changed meanwhile)."""
        statement = self._rows_statement(table, sql.SQL("({}) IN %s").format(_keys(table, ROW)))
        proven: set[tuple] = set()
        suspect: set[tuple] = set()
        changed: set[tuple] = set()
        for batch in _batches(_ordered(keys), 1000):
            params = (tuple(batch),)
            before = dict(zip((w.name for w in self.writers), _concurrently(
                [lambda w=w, params=params: self._rows(w, table, statement, params) for w in self.writers])))
            self.barrier()
            after = {r.name: self._rows(r, table, statement, params) for r in self.readers}  # readers first
            after.update({w.name: self._rows(w, table, statement, params) for w in self.writers})
            for key in batch:
                if any(before[w.name].get(key, ABSENT)[1] != after[w.name].get(key, ABSENT)[1] for w in self.writers):
                    changed.add(key)
                elif len({after[n.name].get(key, ABSENT)[0] for n in self.nodes}) > 1:
                    held_by_writer = any(key in after[w.name] for w in self.writers)
                    (proven if held_by_writer else suspect).add(key)
        return proven, suspect, changed

    def _locked_compare(self, table: Table, keys: set[tuple], tries: int = 3) -> tuple[set[tuple], set[tuple]]:
        """One writing node: its rows locked FOR SHARE across one short barrier; a locked row cannot change, so the
        other node must hold the same. The lock waits at most 100 ms (well before the deadlock detector, so an
        application transaction is never the one aborted). (differ, could not be locked or timed out)."""
        differ, pending = set(), set(keys)
        for _ in range(tries):
            if not pending:
                break
            found, pending = self._locked_compare_once(table, pending)
            differ |= found
        return differ, pending

    def _locked_compare_once(self, table: Table, keys: set[tuple]) -> tuple[set[tuple], set[tuple]]:
        writer, reader = self.writers[0], self.readers[0]
        statement = self._rows_statement(table, sql.SQL("({}) IN %s").format(_keys(table, ROW)))
        locking = statement + sql.SQL(" ORDER BY {} FOR SHARE").format(_keys(table, ROW))
        differ, unsettled = set(), set()
        for batch in _batches(_ordered(keys), 100):
            params = (tuple(batch),)
            try:
                with self.pools[writer.name].connection() as connection:
                    connection.autocommit = False  # the locks end when the pool rolls this back
                    execute(connection, "SET LOCAL lock_timeout = '100ms'")
                    on_writer = self._rows(writer, table, locking, params, connection)
                    self.barrier(timeout=10.0)
                    on_reader = self._rows(reader, table, statement, params)
            except (psycopg2.errors.LockNotAvailable, psycopg2.errors.QueryCanceled,
                    psycopg2.errors.InsufficientPrivilege, VerificationError):
                unsettled.update(batch)
                continue
            differ |= {k for k in batch if on_writer.get(k, ABSENT)[0] != on_reader.get(k, ABSENT)[0]}
        return differ, unsettled

    def _rows_statement(self, table: Table, condition: sql.Composable) -> sql.Composable:
        return sql.SQL("SELECT {keys}, {hash}, {version} FROM {table} AS {row} WHERE {condition}").format(
            keys=_keys(table, ROW), hash=self._row_hash(table), version=ROW_VERSION, table=_table(table),
            row=sql.Identifier(ROW),
            condition=condition,
        )

    def _rows(self, node: VerifyNode, table: Table, statement, params, connection=None) -> dict[tuple, tuple]:
        """key -> (row hash, row version)."""
        if connection is None:
            with self.pools[node.name].connection() as connection:
                return self._rows(node, table, statement, params, connection)
        width = len(table.primary_key)
        return {tuple(r[:width]): (r[width], r[width + 1]) for r in query(connection, statement, params)}


def _concurrently(functions: list[Callable]) -> list:
    """Run each function in its own thread (not the executor's: its threads may all be waiting on this)."""
    results: list = [None] * len(functions)

    def run(index: int) -> None:
        try:
            results[index] = (True, functions[index]())
        except BaseException as error:  # re-raised below, in the caller's thread
            results[index] = (False, error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(functions))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for ok, value in results:
        if not ok:
            raise value
    return [value for _, value in results]


def _batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _table(table: Table) -> sql.Composable:
    return qualified(table.schema, table.name)


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
    shown = [f"'\\x{bytes(v).hex()}'" if isinstance(v, (memoryview, bytes)) else repr(v) for v in key]
    return shown[0] if len(shown) == 1 else "(" + ", ".join(shown) + ")"


def _ordered(keys) -> list[tuple]:
    try:
        return sorted(keys)
    except TypeError:  # keys of a type Python cannot order (bytea)
        return sorted(keys, key=repr)
