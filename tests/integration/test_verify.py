"""Verification on a busy database: it passes while writes go on (a hot row included) and fails naming the table
and key range of a row that really differs, before and after cutover."""

from __future__ import annotations

import time

import pytest

from integration_parts import replicating
from pgactive_upgrade import verify
from pgactive_upgrade.catalog import Table
from pgactive_upgrade.db import Credentials
from topology.load import Churn

pytestmark = pytest.mark.integration

# Settings that change a value's text: the target's database defaults differ from the source's on purpose.
SKEWED_TARGET_SETTINGS = {"timezone": "Pacific/Chatham", "DateStyle": "SQL, DMY", "IntervalStyle": "sql_standard",
                          "extra_float_digits": "-3", "bytea_output": "escape"}


def app_dsn(topo, port: int) -> str:
    return f"host=127.0.0.1 port={port} dbname=app user=app password={topo.credentials['app']}"


def admin_sql(server, *statements) -> None:
    with server.connect("postgres", dbname="app") as connection, connection.cursor() as cursor:
        for statement in statements:
            cursor.execute(statement)


def source_writes(upgrade) -> list[verify.VerifyNode]:
    """Before cutover (native): the source takes the writes, the target receives them."""
    return [verify.VerifyNode("source", upgrade.endpoint(upgrade.source), writer=True),
            verify.VerifyNode("target", upgrade.endpoint(upgrade.target()), writer=False)]


def skew_settings(server) -> None:
    connection = server.connect("postgres", dbname="app")
    connection.autocommit = True
    with connection.cursor() as cursor:
        for name, value in SKEWED_TARGET_SETTINGS.items():
            cursor.execute(f"ALTER DATABASE app SET {name} = %s", (value,))
    connection.close()


def test_before_cutover_passes_under_load_and_names_rows_changed_on_the_target(build):
    topo, make = build
    skew_settings(topo.new_pg)
    upgrade = replicating(make(), in_sync=True)

    with Churn(app_dsn(topo, topo.old_pg.port), rate=300) as churn:
        time.sleep(1)
        before = churn.committed
        results = [upgrade.verify() for _ in range(5)]
        assert churn.committed - before > 50, "the database was busy while it verified"
        assert all(r["after_cutover"] is False and r["tables"] == 4 and r["rows"] > 1000 for r in results), results
        assert all(r["unchecked"] == [] for r in results), "one writing node: even the hot row is checked, locked"

        admin_sql(topo.new_pg, "UPDATE billing.invoices SET total = total + 1 WHERE id = 3",
                  "DELETE FROM billing.invoice_lines WHERE (invoice_id, line_no) = (1, 2)")
        with pytest.raises(verify.VerificationError) as failure:
            upgrade.verify()
    assert churn.errors == 0
    message = str(failure.value)
    assert "billing.invoices: 1 row(s) differ in key range id from start to end (e.g. 3)" in message
    assert "billing.invoice_lines: 1 row(s) differ in key range (invoice_id, line_no) from start to end (e.g. (1, 2))" in message
    assert "public.orders" not in message and "public.accounts" not in message


def test_after_cutover_passes_under_load_and_names_a_row_changed_on_the_source(build):
    topo, make = build
    upgrade = replicating(make(), in_sync=True)

    with Churn(app_dsn(topo, topo.haproxy.write_port), rate=300) as churn:
        time.sleep(1)
        upgrade.cutover("verify-after")
        time.sleep(1)
        before = churn.committed
        results = [upgrade.verify() for _ in range(5)]
        assert churn.committed - before > 50, "the database was busy while it verified"
        assert all(r["after_cutover"] is True and r["sequences"] == 3 for r in results), results
        assert all(r["unchecked"] == [] for r in results), "one writing node: even the hot row is checked, locked"

        admin_sql(topo.old_pg, "UPDATE public.accounts SET email = 'changed@example.com' WHERE id = 7")
        with pytest.raises(verify.VerificationError, match=r"public\.accounts: 1 row\(s\) differ in key range id from "
                                                          r"start to end \(e\.g\. 7\)"):
            upgrade.verify()


def test_chunks_cover_every_row_once_and_a_difference_is_named_by_its_chunk(build):
    topo, make = build
    upgrade = replicating(make(), in_sync=True)
    tables = [t for t in upgrade.tables() if t.qualified_name == "public.orders"]
    nodes = source_writes(upgrade)
    admin = Credentials("postgres", topo.credentials["postgres"])
    with topo.old_pg.connect("postgres", dbname="app") as connection, connection.cursor() as cursor:
        cursor.execute("ANALYZE public.orders")
        cursor.execute("SELECT count(*), max(id) FROM public.orders")
        rows, max_id = cursor.fetchone()
    # A churn update of the changed row, replicated, would overwrite its change: it stays out of the churn's reach.
    changed_id, reach = 250, 500
    assert changed_id < max_id - reach
    seen = []

    with Churn(app_dsn(topo, topo.old_pg.port), rate=300, reach=reach):
        report = verify.Verification(nodes, admin, tables, parallelism=3, chunk_rows=100, progress=seen.append).run()
        assert report.divergences == [] and report.chunks >= rows // 100
        assert seen and seen[-1]["chunks_done"] == seen[-1]["chunks"] == report.chunks

        admin_sql(topo.new_pg, f"UPDATE public.orders SET note = 'changed' WHERE id = {changed_id}")
        report = verify.Verification(nodes, admin, tables, parallelism=3, chunk_rows=100).run()
    [divergence] = report.divergences
    assert divergence.keys == [(changed_id,)]
    lower, upper = divergence.chunk.lower[0], divergence.chunk.upper[0]
    assert lower <= changed_id < upper and upper - lower < 200, divergence.describe()
    assert f"key range id from {lower} to {upper}" in divergence.describe()


def test_a_large_chunk_is_narrowed_to_the_rows_that_differ_whatever_the_columns_are_called(build):
    """A column may be called like the row alias; a chunk of 5000 rows that differs is narrowed to a small one."""
    topo, make = build
    upgrade = replicating(make(), in_sync=True)
    create = ("CREATE TABLE public.odd (id int PRIMARY KEY, pgu_row int, payload text)",
              "INSERT INTO public.odd SELECT g, g, md5(g::text) FROM generate_series(1, 5000) AS g")
    admin_sql(topo.old_pg, *create)  # outside the publication: the same rows created on both nodes
    admin_sql(topo.new_pg, *create, "UPDATE public.odd SET payload = 'changed' WHERE id = 2345")
    tables = [Table("public", "odd", ("id",))]
    nodes = source_writes(upgrade)

    report = verify.Verification(nodes, Credentials("postgres", topo.credentials["postgres"]), tables).run()

    [divergence] = report.divergences
    assert divergence.keys == [(2345,)] and report.chunks == 1
    lower, upper = divergence.chunk.lower[0], divergence.chunk.upper[0]
    assert lower <= 2345 < upper and upper - lower <= verify.SMALL_CHUNK_ROWS, divergence.describe()


def test_a_row_updated_all_the_time_is_checked_row_by_row_and_not_reported(build):
    topo, make = build
    upgrade = replicating(make(), in_sync=True)
    tables = [t for t in upgrade.tables() if t.qualified_name == "public.orders"]
    nodes = source_writes(upgrade)
    admin = Credentials("postgres", topo.credentials["postgres"])

    with Churn(app_dsn(topo, topo.old_pg.port), rate=2000), Churn(app_dsn(topo, topo.old_pg.port), rate=2000):
        time.sleep(1)
        # rounds=0: a chunk that differs goes row by row at once (else the barrier's re-read mostly settles it)
        reports = [verify.Verification(nodes, admin, tables, rounds=0).run() for _ in range(5)]
        # and the hot row itself, checked row by row whatever the chunk digests said
        verification = verify.Verification(nodes, admin, tables)
        verification.columns = verification._common_columns()
        differ, unchecked = verification._confirm(tables[0], {(1,)})
    assert [r.divergences for r in reports] == [[]] * 5
    assert [r.unchecked for r in reports] == [[]] * 5, "one writing node: the hot row is checked locked"
    assert (differ, unchecked) == (set(), set())


def test_columns_are_compared_by_name_and_one_missing_on_the_target_is_named(build):
    topo, make = build
    upgrade = replicating(make(), in_sync=True)
    admin_sql(topo.old_pg, "CREATE TABLE public.cols (id int PRIMARY KEY, a text, b int)",
              "INSERT INTO public.cols SELECT g, md5(g::text), g FROM generate_series(1, 100) AS g")
    admin_sql(topo.new_pg, "CREATE TABLE public.cols (id int PRIMARY KEY, b int, a text, added_here_first text)",
              "INSERT INTO public.cols (id, a, b) SELECT g, md5(g::text), g FROM generate_series(1, 100) AS g")
    nodes = source_writes(upgrade)
    admin = Credentials("postgres", topo.credentials["postgres"])
    tables = [Table("public", "cols", ("id",))]

    assert verify.Verification(nodes, admin, tables).run().divergences == []

    admin_sql(topo.old_pg, "ALTER TABLE public.cols ADD COLUMN c int")
    with pytest.raises(verify.VerificationError, match="public.cols: column c is missing on the target"):
        verify.Verification(nodes, admin, tables).run()
