"""After a phase: the same read-only statements timed on the source and on the target, so a new major's planner (or
statistics it lacks) cannot make the new instance slower unnoticed.

Statements: the conf's probe queries, and where pg_stat_statements answers on the source, its top statements by total
time that are safe to run again (see unsafe_reason). Each runs as EXPLAIN ANALYZE (server time: planning plus
execution, no rows sent) in a READ ONLY transaction that is rolled back, under a statement_timeout, once to warm the
cache and then RUNS times on each node, alternately. A statement regressed when the target's median exceeds the
source's by more than max_ratio and by more than floor_ms.
"""

from __future__ import annotations

import re
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from collections.abc import Iterator

import psycopg2
from psycopg2 import errorcodes, sql

from pgactive_upgrade.db import Credentials, Endpoint, connect, query

RUNS = 5
CANDIDATES_PER_STATEMENT = 10  # pg_stat_statements rows read per statement wanted: most are not re-runnable

# Words that precede "(" without being a function call.
_KEYWORDS = frozenset("""
select from where and or not in exists any all some as on join left right full inner outer cross lateral using
group by order having limit offset union intersect except distinct case when then else end values row array
with recursive over partition filter within window between like ilike similar is null true false asc desc nulls
first last rows range groups preceding following current unbounded escape
""".split())

# Built-in functions without side effects that statements commonly call; anything else is not re-run.
SAFE_FUNCTIONS = frozenset("""
count sum avg min max every bool_and bool_or array_agg string_agg json_agg jsonb_agg json_object_agg
jsonb_object_agg stddev stddev_pop stddev_samp variance var_pop var_samp percentile_cont percentile_disc mode
row_number rank dense_rank percent_rank cume_dist ntile lag lead first_value last_value nth_value
coalesce nullif greatest least cast extract
lower upper length char_length octet_length substr substring trim btrim ltrim rtrim replace concat concat_ws
left right position strpos split_part starts_with regexp_replace regexp_match regexp_matches format md5 initcap
lpad rpad repeat reverse to_char to_date to_timestamp to_number abs round floor ceil ceiling trunc mod power
sqrt sign date_trunc date_part age make_date make_interval justify_interval now
array_length cardinality unnest array_position array_to_string string_to_array
json_build_object jsonb_build_object json_build_array jsonb_build_array to_json to_jsonb row_to_json
jsonb_array_length jsonb_extract_path jsonb_extract_path_text json_extract_path json_extract_path_text
""".split())

# Anywhere in a statement, these make it unsafe or pointless to run again.
_FORBIDDEN = frozenset("""
insert update delete merge into for copy call do lock truncate create alter drop grant revoke execute notify
listen unlisten vacuum analyze refresh prepare declare cluster reindex
""".split())

# standard_conforming_strings (on since PostgreSQL 9.1): a backslash escapes only inside E'...'.
_TOKEN = re.compile(r"""
    (?P<space>\s+) | (?P<comment>--[^\n]*|/\*.*?\*/) | (?P<string>[eE]'(?:''|\\.|[^'\\])*'|'(?:''|[^'])*')
  | (?P<dollar>\$(?P<tag>[A-Za-z_][A-Za-z0-9_]*)?\$.*?\$(?P=tag)?\$) | (?P<param>\$[0-9]+)
  | (?P<quoted>"(?:""|[^"])*") | (?P<word>[A-Za-z_][A-Za-z0-9_$]*) | (?P<number>[0-9][0-9.eE]*)
  | (?P<cast>::) | (?P<other>.)
""", re.VERBOSE | re.DOTALL)


def _tokens(text: str) -> list[tuple[str, str]]:
    """(kind, value) pairs, comments and white space left out; words lower-cased, quoted names unquoted."""
    found: list[tuple[str, str]] = []
    for match in _TOKEN.finditer(text):
        kind = match.lastgroup or "other"
        if kind == "tag":
            kind = "dollar"
        if kind in ("space", "comment"):
            continue
        value = match.group(kind)
        if kind == "word":
            value = value.lower()
        elif kind == "quoted":
            value, kind = value[1:-1].replace('""', '"'), "name"
        found.append((kind, value))
    return found


NOT_A_SELECT = "not a SELECT"
HAS_LITERAL = ("contains a literal constant (pg_stat_statements keeps them in an entry deallocated and recorded "
               "again; it could be a row value or a secret): not run, its text not kept")
_LITERALS = frozenset({"string", "dollar", "number"})
_STRAY_QUOTES = frozenset({("other", "'"), ("other", '"'), ("other", "$")})


def unsafe_reason(text: str, user_functions: frozenset[str] = frozenset(),
                  opaque_relations: dict[str, str] | None = None) -> str | None:
    """Why a statement may not be run again on both nodes, or None when it is a plain read: one SELECT (or WITH ...
    SELECT), no literal constant (pg_stat_statements replaces them by $n unless an entry was deallocated: then the
    text may hold row values), no parameters, no locking clause, no INTO, calling only built-in functions known to
    have no side effects, naming no function defined in the database (user_functions: any mention counts, a call
    may be written t.f in attribute notation), reading no view, foreign table or table with row-level security
    (opaque_relations: name -> kind; what they run is not in the text), and no system catalog or statistics view
    (they differ between nodes by design). Operators are not inspected: the probe role's privileges and the READ
    ONLY transaction are the guard."""
    tokens = _tokens(text.strip())
    while tokens and tokens[-1] == ("other", ";"):
        tokens.pop()
    if not tokens or tokens[0] not in (("word", "select"), ("word", "with")):
        return NOT_A_SELECT
    if has_literal(tokens):
        return HAS_LITERAL
    for index, (kind, value) in enumerate(tokens):
        if (kind, value) == ("other", ";"):
            return "several statements"
        if kind == "param":
            return "has parameters ($n): their values are unknown, so it is not re-run"
        if kind in ("word", "name") and value in user_functions:
            return f"names {value}, a function defined in the database (a call, possibly in attribute notation)"
        if kind in ("word", "name") and value in (opaque_relations or {}):
            return f"reads {value}, a {(opaque_relations or {})[value]} (what it runs is not in the statement)"
        if kind in ("word", "name") and index + 1 < len(tokens) and tokens[index + 1] == ("other", "("):
            problem = _call_problem(value, tokens[index - 1] if index else ("", ""))
            if problem:
                return problem
        if kind == "word" and value in _FORBIDDEN:
            return f"contains {value.upper()} (a write, a lock or a side effect)"
        if kind in ("word", "name") and (value.startswith("pg_") or value == "information_schema"):
            return f"reads {value} (system catalogs and statistics differ between nodes by design)"
    return None


def has_literal(tokens: list[tuple[str, str]] | str) -> bool:
    """A string, dollar-quoted or numeric constant, or a quote left open."""
    if isinstance(tokens, str):
        tokens = _tokens(tokens)
    return any(kind in _LITERALS or (kind, value) in _STRAY_QUOTES for kind, value in tokens)


def _call_problem(name: str, before: tuple[str, str]) -> str | None:
    if before in (("cast", "::"), ("word", "as")):  # a type modifier such as numeric(10, 2)
        return None
    if name in SAFE_FUNCTIONS or name in _KEYWORDS:
        return None
    return f"calls {name}(), not known to be free of side effects"


@dataclass(frozen=True)
class Statement:
    name: str
    text: str
    explainable: bool = True  # False: timed by the client (EXPLAIN refuses it, e.g. SHOW)
    from_source: bool = False  # one of the source's statements (pg_stat_statements), not a probe from the conf


@dataclass
class Comparison:
    max_ratio: float
    floor_ms: float
    statements_from: str  # "pg_stat_statements and health_probes", or why only the probes
    compared: list[dict] = field(default_factory=list)
    regressed: list[dict] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)  # succeeded on the source, failed on the target
    skipped: list[dict] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        return [f"{r['name']} is slower on the target: median {r['target_ms']} ms there, {r['source_ms']} ms on the "
                f"source ({r['ratio']}x, over max_latency_ratio {self.max_ratio}): {_short(r['statement'])}"
                for r in self.regressed] + [
                f"{f['name']} fails on the target ({f['target_error']}) but runs on the source: {_short(f['statement'])}"
                for f in self.failed]

    def as_dict(self) -> dict:
        return {"max_latency_ratio": self.max_ratio, "latency_floor_ms": self.floor_ms, "runs": RUNS,
                "statements_from": self.statements_from, "compared": self.compared, "regressed": self.regressed,
                "failed": self.failed, "skipped": self.skipped}

    def explained(self) -> str:
        """The regressed statements' plans, source and target side by side (for the task log)."""
        parts = []
        for r in self.regressed:
            parts.append(f"{r['name']}: source {r['source_ms']} ms | target {r['target_ms']} ms\n{r['statement']}")
            parts.append(side_by_side(r["explain"]["source"], r["explain"]["target"]))
        return "\n".join(parts)


def compare(source: Endpoint, target: Endpoint, credentials: Credentials, probes: tuple[str, ...], *,
            max_ratio: float, floor_ms: float, top_statements: int, timeout_ms: int) -> Comparison:
    """Raises psycopg2.OperationalError/InterfaceError when a node cannot be reached or the connection is lost."""
    with _reader(source, credentials) as on_source, _reader(target, credentials) as on_target:
        functions_there, relations_there = _database_objects(on_source)
        functions_here, relations_here = _database_objects(on_target)
        statements = [Statement(f"health_probes[{i}]", text) for i, text in enumerate(probes)]
        found, skipped, why = top_of_source(on_source, top_statements, functions_there | functions_here,
                                            {**relations_here, **relations_there})
        comparison = Comparison(max_ratio, floor_ms, why, skipped=skipped)
        for statement in statements + found:
            _compare_one(comparison, statement, on_source, on_target, timeout_ms)
    return comparison


@contextmanager
def _reader(endpoint: Endpoint, credentials: Credentials) -> Iterator:
    connection = connect(endpoint, credentials, autocommit=False, connect_timeout=10)
    try:
        connection.set_session(readonly=True, autocommit=False)
        yield connection
    finally:
        connection.close()


_OPAQUE_RELATIONS = """
SELECT c.relname, CASE WHEN c.relkind = 'v' THEN 'view' WHEN c.relkind = 'f' THEN 'foreign table'
                       ELSE 'table with row-level security' END
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE (c.relkind IN ('v', 'f') OR c.relrowsecurity) AND n.nspname NOT IN ('pg_catalog', 'information_schema')
"""


def _database_objects(connection) -> tuple[frozenset[str], dict[str, str]]:
    """Names of the functions defined outside pg_catalog, and the views, foreign tables and tables with row-level
    security (name -> kind): a statement naming one is not run again."""
    try:
        functions = frozenset(row[0] for row in query(
            connection, "SELECT DISTINCT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
                        "WHERE n.nspname <> 'pg_catalog'"))
        return functions, {name: kind for name, kind in query(connection, _OPAQUE_RELATIONS)}
    finally:
        _rollback(connection)


_HIDDEN_TEXT = "<insufficient privilege>"  # pg_stat_statements' text of another role's statement without pg_read_all_stats


def top_of_source(connection, wanted: int, user_functions: frozenset[str],
                  opaque_relations: dict[str, str] | None = None) -> tuple[list[Statement], list[dict], str]:
    """Up to `wanted` of the source's statements by total time that are safe to run again, the skipped ones (queryid
    and reason; the text only of SELECTs without a literal constant), and where they came from."""
    if wanted == 0:
        return [], [], "health_probes only (latency_top_statements is 0)"
    rows, unavailable = _statements_by_total_time(connection, wanted * CANDIDATES_PER_STATEMENT)
    if unavailable:
        return [], [], f"health_probes only: pg_stat_statements is not available on the source ({unavailable})"
    if rows and all(text == _HIDDEN_TEXT for _, text in rows):
        return [], [], ("health_probes only: the probe role cannot read the statements' texts in pg_stat_statements "
                        "(grant it pg_read_all_stats)")
    found, skipped = [], []
    for queryid, text in rows:
        reason = "its text is hidden from the probe role" if text == _HIDDEN_TEXT else unsafe_reason(
            text or "", user_functions, opaque_relations)
        name = f"pg_stat_statements queryid {queryid}"
        if reason is None:
            found.append(Statement(name, text.strip().rstrip(";"), from_source=True))
            if len(found) == wanted:
                break
        else:
            shown = reason not in (NOT_A_SELECT, HAS_LITERAL) and text != _HIDDEN_TEXT and not has_literal(text or "")
            skipped.append({"name": name, "reason": reason, **({"statement": _short(text)} if shown else {})})
    return found, skipped, "health_probes and the source's top statements by total time (pg_stat_statements)"


def _statements_by_total_time(connection, limit: int) -> tuple[list[tuple], str | None]:
    try:
        schema = query(connection, "SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace "
                                   "WHERE e.extname = 'pg_stat_statements'")
        if not schema:
            return [], "the extension is not created in this database"
        view = sql.SQL("{}.pg_stat_statements").format(sql.Identifier(schema[0][0]))
        column = "total_exec_time" if query(connection, (
            "SELECT 1 FROM pg_attribute WHERE attrelid = (quote_ident(%s) || '.pg_stat_statements')::regclass "
            "AND attname = 'total_exec_time'"), (schema[0][0],)) else "total_time"  # before PostgreSQL 13
        rows = query(connection, sql.SQL(
            "SELECT queryid, query FROM {} WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())"
            " AND query IS NOT NULL ORDER BY {} DESC LIMIT %s").format(view, sql.Identifier(column)), (limit,))
        return rows, None
    except (psycopg2.OperationalError, psycopg2.InterfaceError):
        raise
    except psycopg2.Error as error:
        return [], reason(error)
    finally:
        _rollback(connection)


class _Failed(Exception):
    def __init__(self, node: str, error: psycopg2.Error):
        super().__init__(f"failed on the {node}: {reason(error)}")
        self.node = node
        self.reason = reason(error)
        self.timed_out = isinstance(error, psycopg2.errors.QueryCanceled)


def _compare_one(comparison: Comparison, statement: Statement, on_source, on_target, timeout_ms: int) -> None:
    """Warm each node once (a timeout then does not count: a cold cache), then RUNS timings on each, alternately (a
    load burst then hits both). Failing on the target only is a problem; failing on the source, a skip."""
    source_runs: list[float] = []
    target_runs: list[float] = []
    target_timed_out = False
    try:
        statement = replace(statement, explainable=_explainable(on_source, statement, timeout_ms))
        hidden = _reads_foreign_data(on_source, statement, timeout_ms) if statement.from_source else None
        if hidden:
            comparison.skipped.append({"name": statement.name, "reason": hidden, "statement": _short(statement.text)})
            return
        for run in range(RUNS + 1):
            source_runs += _measured("source", on_source, statement, timeout_ms, warming=run == 0)
            if not target_timed_out:
                try:
                    target_runs += _measured("target", on_target, statement, timeout_ms, warming=run == 0)
                except _Failed as failure:
                    if not failure.timed_out:
                        raise
                    target_timed_out = True
    except _Failed as failure:
        if failure.node == "target":
            comparison.failed.append({"name": statement.name, "statement": statement.text,
                                      "target_error": failure.reason})
        else:
            comparison.skipped.append({"name": statement.name, "reason": str(failure),
                                       "statement": _short(statement.text)})
        return
    source_ms = round(statistics.median(source_runs), 2)
    # Timed out on the target only: its median is at least the timeout.
    target_ms = float(timeout_ms) if target_timed_out else round(statistics.median(target_runs), 2)
    row: dict = {"name": statement.name, "statement": statement.text, "source_ms": source_ms, "target_ms": target_ms,
                 "ratio": round(target_ms / source_ms, 2) if source_ms > 0 else None, "source_runs": source_runs,
                 "target_runs": target_runs, "timed_by": "EXPLAIN ANALYZE" if statement.explainable else "client",
                 **({"target_error": f"statement_timeout of {timeout_ms} ms"} if target_timed_out else {})}
    comparison.compared.append(row)
    if target_ms > source_ms * comparison.max_ratio and target_ms - source_ms > comparison.floor_ms:
        row["explain"] = {"source": _plan(on_source, statement.text), "target": _plan(on_target, statement.text)}
        comparison.regressed.append(row)


def _measured(node: str, connection, statement: Statement, timeout_ms: int, warming: bool) -> list[float]:
    """[milliseconds] of one run, [] for the warm-up run (whose timeout is ignored)."""
    try:
        timing = _timed(node, connection, statement, timeout_ms)
    except _Failed as failure:
        if warming and failure.timed_out:
            return []
        raise
    return [] if warming else [timing]


def _timed(node: str, connection, statement: Statement, timeout_ms: int) -> float:
    with _failing_as(node):
        return _run(connection, statement, timeout_ms)


@contextmanager
def _failing_as(node: str) -> Iterator[None]:
    """A statement's error as _Failed; a lost connection propagates (the caller reports that the comparison could
    not run). A timeout is an OperationalError too, but the statement's own."""
    try:
        yield
    except psycopg2.errors.QueryCanceled as error:
        raise _Failed(node, error) from error
    except (psycopg2.OperationalError, psycopg2.InterfaceError):
        raise
    except psycopg2.Error as error:
        raise _Failed(node, error) from error


def _reads_foreign_data(connection, statement: Statement, timeout_ms: int) -> str | None:
    """Why not to run it again when its plan (EXPLAIN VERBOSE, not executed) scans a foreign table, e.g. a foreign
    partition of a table the statement names."""
    def plan(cursor):
        cursor.execute("EXPLAIN (VERBOSE, FORMAT JSON) " + statement.text)
        return cursor.fetchone()[0][0]["Plan"]

    with _failing_as("source"):
        pending = [_in_read_only(connection, timeout_ms, plan)]
    while pending:
        node = pending.pop()
        if node.get("Node Type") in ("Foreign Scan", "Custom Scan"):
            return f"its plan has a {node['Node Type']} (what it runs is not in the statement)"
        pending += node.get("Plans", [])
    return None


def _explainable(connection, statement: Statement, timeout_ms: int) -> bool:
    """EXPLAIN takes SELECT, VALUES, TABLE and the like; a probe such as SHOW is timed by the client."""
    with _failing_as("source"):
        try:
            _in_read_only(connection, timeout_ms, lambda cursor: cursor.execute("EXPLAIN " + statement.text))
            return True
        except psycopg2.errors.SyntaxError:
            return False


def _run(connection, statement: Statement, timeout_ms: int) -> float:
    """Milliseconds: planning plus execution on the server (EXPLAIN ANALYZE), or the client's when not explainable."""
    if not statement.explainable:
        started = time.monotonic()
        _in_read_only(connection, timeout_ms, lambda cursor: (cursor.execute(statement.text), cursor.fetchall()))
        return round((time.monotonic() - started) * 1000, 3)

    def explain(cursor):
        cursor.execute("EXPLAIN (ANALYZE, TIMING OFF, FORMAT JSON) " + statement.text)
        return cursor.fetchone()[0][0]

    plan = _in_read_only(connection, timeout_ms, explain)
    return round(plan["Planning Time"] + plan["Execution Time"], 3)


def _plan(connection, text: str) -> list[str]:
    try:
        return [row[0] for row in _in_read_only(connection, 10_000, lambda cursor: (
            cursor.execute("EXPLAIN " + text), cursor.fetchall())[1])]
    except (psycopg2.OperationalError, psycopg2.InterfaceError):
        raise
    except psycopg2.Error as error:
        return [f"EXPLAIN failed: {reason(error)}"]


def _in_read_only(connection, timeout_ms: int, work):
    """work(cursor) inside the session's READ ONLY transaction, under statement_timeout, always rolled back."""
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT set_config('statement_timeout', %s, true)", (str(int(timeout_ms)),))
            return work(cursor)
    finally:
        _rollback(connection)


def side_by_side(left: list[str], right: list[str], width: int = 72) -> str:
    lines = [f"{'source':<{width}} | target", f"{'-' * width}-+-{'-' * width}"]
    for index in range(max(len(left), len(right))):
        a = left[index] if index < len(left) else ""
        b = right[index] if index < len(right) else ""
        lines.append(f"{a[:width]:<{width}} | {b[:width]}")
    return "\n".join(lines)


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def reason(error: Exception) -> str:
    """SQLSTATE and its name, never the server's message: it can quote a row value ("invalid input syntax for type
    integer: ...")."""
    code = getattr(error, "pgcode", None)
    if code:
        return f"SQLSTATE {code} ({(errorcodes.lookup(code) or 'unknown').lower()})"
    if isinstance(error, (psycopg2.OperationalError, psycopg2.InterfaceError)):
        return f"the connection failed or was lost ({type(error).__name__})"
    return type(error).__name__


def _rollback(connection) -> None:
    """Ends the READ ONLY transaction; a connection the server closed keeps the error that closed it."""
    if not connection.closed:
        connection.rollback()
