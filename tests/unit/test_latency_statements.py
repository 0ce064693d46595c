"""Which of the source's statements the latency comparison may run again on both nodes (latency.unsafe_reason)."""

import pytest

import psycopg2

from pgactive_upgrade.latency import HAS_LITERAL, _tokens, reason, side_by_side, unsafe_reason

SAFE = [
    "SELECT count(*) FROM billing.invoices WHERE id < other_id",
    "select a.id, coalesce(sum(l.amount), a.zero) from accounts a join orders o on (o.account_id = a.id) group by a.id",
    'SELECT x::numeric, lower("Name") FROM "Weird Table" ORDER BY x',
    "WITH recent AS (SELECT * FROM orders ORDER BY id DESC) SELECT * FROM recent",
    "SELECT * FROM t FETCH FIRST ROWS ONLY",
    "SELECT true;",
]

# pg_stat_statements keeps constants when an entry was deallocated and recorded again: the text may hold row
# values or secrets. LIMIT 10 and the like are normalized to $n otherwise, so a literal left means deallocation.
LITERALS = [
    "SELECT * FROM accounts WHERE email = 'a@b.com'",
    "SELECT * FROM accounts WHERE id = 7",
    "SELECT * FROM accounts WHERE balance > 1.5e3",
    "SELECT * FROM accounts WHERE note = $$secret$$",
    "SELECT * FROM accounts WHERE note = $q$secret$q$",
    "SELECT * FROM accounts WHERE note = E'it\\'s'",
    "SELECT 'for update; delete' AS text_only FROM t",
    "SELECT * FROM t ORDER BY 1 LIMIT 10",
    "SELECT * FROM t WHERE a = 'unterminated",
]

UNSAFE = [
    ("SELECT * FROM orders WHERE id = $1", "has parameters"),
    ("SELECT * FROM orders FOR UPDATE", "contains FOR"),
    ("SELECT * FROM orders FOR NO KEY UPDATE SKIP LOCKED", "contains FOR"),
    ("SELECT * INTO copy FROM orders", "contains INTO"),
    ("WITH gone AS (DELETE FROM orders RETURNING *) SELECT count(*) FROM gone", "contains DELETE"),
    ("SELECT nextval(seq_name) FROM seqs", "calls nextval()"),
    ("SELECT pg_terminate_backend(pid) FROM x", "calls pg_terminate_backend()"),
    ("SELECT public.audit_read(id) FROM orders", "calls audit_read()"),
    ('SELECT "setval"(s, n) FROM t', "calls setval()"),
    ("SELECT count(*) FROM pg_class", "reads pg_class"),
    ("SELECT * FROM information_schema.tables", "reads information_schema"),
    ("SELECT a; DROP TABLE orders", "several statements"),
    ("UPDATE orders SET note = 'x'", "not a SELECT"),
    ("EXPLAIN ANALYZE SELECT 1", "not a SELECT"),
    ("", "not a SELECT"),
]


@pytest.mark.parametrize("statement", SAFE)
def test_plain_reads_are_run_again(statement):
    assert unsafe_reason(statement) is None


@pytest.mark.parametrize("statement,reason", UNSAFE)
def test_anything_that_could_write_lock_or_differ_by_design_is_skipped_with_its_reason(statement, reason):
    assert reason in (unsafe_reason(statement) or "")


def test_a_builtin_name_the_database_redefines_is_not_trusted():
    assert unsafe_reason("SELECT lower(name) FROM t") is None
    assert "defined in the database" in unsafe_reason("SELECT lower(name) FROM t", frozenset({"lower"}))


def test_plans_are_shown_side_by_side():
    text = side_by_side(["Index Scan using t_pkey on t"], ["Seq Scan on t", "  Filter: (id < 100)"], width=30)
    lines = text.splitlines()
    assert lines[0].startswith("source") and "| target" in lines[0]
    assert lines[2] == f"{'Index Scan using t_pkey on t':<30} | Seq Scan on t"
    assert lines[3] == f"{'':<30} |   Filter: (id < 100)"


@pytest.mark.parametrize("statement", LITERALS)
def test_a_text_that_kept_a_literal_constant_is_not_run(statement):
    assert unsafe_reason(statement) == HAS_LITERAL
    assert "a@b.com" not in HAS_LITERAL


def test_a_backslash_ends_nothing_in_a_standard_string():
    # standard_conforming_strings: '\' is a one-character string, so nextval(...) is outside any literal.
    tokens = _tokens("SELECT * FROM t WHERE a = '\\' AND nextval('s')>0 AND c = 'y'")
    assert ("string", "'\\'") in tokens and ("word", "nextval") in tokens
    assert ("string", "E'\\' AND x'") in _tokens("SELECT E'\\' AND x'")  # in E'...' it escapes the quote


def test_a_database_function_named_anywhere_counts_as_a_call():
    # Attribute notation: t.audit_fn is audit_fn(t).
    assert "audit_fn, a function defined in the database" in unsafe_reason("SELECT t.audit_fn FROM t",
                                                                            frozenset({"audit_fn"}))
    assert "audit_fn" in unsafe_reason('SELECT t."audit_fn" FROM t', frozenset({"audit_fn"}))


def test_views_foreign_tables_and_row_security_are_not_read_again():
    opaque = {"recent_orders": "view", "remote": "foreign table", "secured": "table with row-level security"}
    assert unsafe_reason("SELECT count(*) FROM public.recent_orders", opaque_relations=opaque) == (
        "reads recent_orders, a view (what it runs is not in the statement)")
    assert "foreign table" in unsafe_reason('SELECT * FROM "remote"', opaque_relations=opaque)
    assert "row-level security" in unsafe_reason("SELECT * FROM secured", opaque_relations=opaque)
    assert unsafe_reason("SELECT * FROM orders", opaque_relations=opaque) is None


def test_an_error_is_reported_by_sqlstate_never_by_its_message():
    class Invalid(psycopg2.DataError):
        pgcode = "22P02"

    error = Invalid('invalid input syntax for type integer: "s3cret"')
    assert reason(error) == "SQLSTATE 22P02 (invalid_text_representation)"
    assert reason(psycopg2.OperationalError("could not connect to host h")) == (
        "the connection failed or was lost (OperationalError)")
