"""Which of the source's statements the latency comparison may run again on both nodes (latency.unsafe_reason)."""

import pytest

from pgactive_upgrade.latency import side_by_side, unsafe_reason

SAFE = [
    "SELECT count(*) FROM billing.invoices WHERE id < 100",
    "select a.id, coalesce(sum(l.amount), 0) from accounts a join orders o on (o.account_id = a.id) group by a.id",
    'SELECT x::numeric(10, 2), lower("Name") FROM "Weird Table" ORDER BY 1 LIMIT 10',
    "WITH recent AS (SELECT * FROM orders ORDER BY id DESC LIMIT 5) SELECT * FROM recent",
    "SELECT 'for update; delete' AS text_only FROM t",  # keywords inside a literal do not count
    "SELECT * FROM t FETCH FIRST 3 ROWS ONLY",
    "SELECT 1;",
]

UNSAFE = [
    ("SELECT * FROM orders WHERE id = $1", "has parameters"),
    ("SELECT * FROM orders FOR UPDATE", "contains FOR"),
    ("SELECT * FROM orders FOR NO KEY UPDATE SKIP LOCKED", "contains FOR"),
    ("SELECT * INTO copy FROM orders", "contains INTO"),
    ("WITH gone AS (DELETE FROM orders RETURNING *) SELECT count(*) FROM gone", "contains DELETE"),
    ("SELECT nextval('orders_id_seq')", "calls nextval()"),
    ("SELECT pg_terminate_backend(pid) FROM x", "calls pg_terminate_backend()"),
    ("SELECT public.audit_read(id) FROM orders", "calls audit_read()"),
    ('SELECT "setval"(1)', "calls setval()"),
    ("SELECT count(*) FROM pg_class", "reads pg_class"),
    ("SELECT * FROM information_schema.tables", "reads information_schema"),
    ("SELECT 1; DROP TABLE orders", "several statements"),
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
