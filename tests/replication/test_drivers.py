"""The replication drivers against the real local PostgreSQL 15 (old) and 17 (new) servers."""

from __future__ import annotations

import threading
import time

import psycopg2
import pytest

from pgactive_upgrade import catalog, join_repair, sequences, verify
from pgactive_upgrade.replication.pgactive import JoinFailed
from replication_helpers import FILTERS, sql_all, sql_one, synced, wait_for
from topology.load import Churn

pytestmark = pytest.mark.integration


def build(driver):
    driver.install()
    result = driver.build()
    wait_for(lambda: synced(driver), timeout=60, what="replication in sync")
    return result


def test_build_replicates_and_reports_lag_in_bytes(driver, topology):
    build(driver)
    sql_one(topology.old_pg, "INSERT INTO public.accounts (email) VALUES ('lag-probe@example.com') RETURNING id")

    row = wait_for(lambda: sql_one(topology.new_pg, "SELECT email FROM public.accounts WHERE email = 'lag-probe@example.com'"),
                   what="the new row on the target")
    lag = wait_for(lambda: synced(driver), what="lag back in sync")

    assert row == ("lag-probe@example.com",)
    assert isinstance(lag.bytes, int) and 0 <= lag.bytes <= 65536
    assert sql_one(topology.new_pg, "SELECT count(*) FROM billing.invoices") == sql_one(
        topology.old_pg, "SELECT count(*) FROM billing.invoices")
    assert sql_one(topology.new_pg, "SELECT to_regclass('scratch.import_log')") == (None,)


def test_mixed_15_and_17_group_replicates_both_ways(driver, topology, pgactive_only):
    build(driver)
    versions = [sql_one(s, "SHOW server_version_num")[0][:2] for s in (topology.old_pg, topology.new_pg)]
    statuses = {server.name: dict(sql_all(server, "SELECT node_name, node_status::text FROM pgactive.pgactive_nodes"))
                for server in (topology.old_pg, topology.new_pg)}

    sql_one(topology.new_pg, "INSERT INTO public.accounts (email) VALUES ('from-17@example.com') RETURNING id")
    sql_one(topology.old_pg, "INSERT INTO public.accounts (email) VALUES ('from-15@example.com') RETURNING id")
    wait_for(lambda: sql_one(topology.old_pg, "SELECT 1 FROM public.accounts WHERE email = 'from-17@example.com'"),
             what="17 -> 15")
    wait_for(lambda: sql_one(topology.new_pg, "SELECT 1 FROM public.accounts WHERE email = 'from-15@example.com'"),
             what="15 -> 17")

    assert versions == ["15", "17"]
    expected = {"orders-db": "r", "orders-db-pg17": "r"}
    assert statuses == {"old": expected, "new": expected}
    lag = driver.lag()
    assert set(lag.detail["nodes"]) == {"orders-db", "orders-db-pg17"} and lag.bytes is not None


def test_lag_with_a_node_missing_is_unknown_never_zero(driver, topology, pgactive_only):
    build(driver)
    other = type(driver)(driver.link)
    # A group whose lag rows lack the target (as when it is unreachable) must not read as in sync.
    other.link = driver.link.__class__(**{**driver.link.__dict__, "target": driver.link.target.__class__(
        "not-a-member", driver.link.target.endpoint, driver.link.target.peer_endpoint)})

    lag = other.lag()

    assert lag.bytes is None and not lag.synced and lag.detail["missing"] == ["not-a-member"]
    assert any("lag unknown" in problem for problem in other.problems())


def test_failed_join_is_reported_and_cleaned_so_a_rerun_works(driver, topology, pgactive_only):
    # The target holds an object the source's dump also creates: the restore of the join fails.
    sql_one(topology.new_pg, "CREATE SCHEMA billing; SELECT 1")
    driver.install()
    started = time.monotonic()

    with pytest.raises(JoinFailed) as failure:
        driver.build()
    failed_after = time.monotonic() - started

    assert "join failed" in str(failure.value) and "cleaned up" in str(failure.value)
    assert failed_after < 60
    assert sql_all(topology.new_pg, "SELECT node_name FROM pgactive.pgactive_nodes") == []
    assert sql_all(topology.old_pg, "SELECT node_name, node_status::text FROM pgactive.pgactive_nodes") == [("orders-db", "r")]
    assert sql_all(topology.old_pg, "SELECT slot_name FROM pg_replication_slots WHERE NOT active AND plugin = 'pgactive'") == []

    driver.build()
    wait_for(lambda: synced(driver), timeout=60, what="sync after the re-run")
    assert sql_one(topology.new_pg, "SELECT count(*) FROM public.orders") == sql_one(topology.old_pg, "SELECT count(*) FROM public.orders")


def insert_many(server, rows: int, label: str, errors: list) -> None:
    connection = server.connect(dbname="app")
    try:
        with connection.cursor() as cursor:
            for number in range(rows):
                cursor.execute("INSERT INTO public.accounts (email) VALUES (%s) RETURNING id", (f"{label}-{number}@example.com",))
                account = cursor.fetchone()[0]
                cursor.execute("INSERT INTO public.orders (account_id, amount) VALUES (%s, 1)", (account,))
    except Exception as error:
        errors.append(f"{label}: {error}")
    finally:
        connection.close()


def test_sequences_do_not_collide_under_concurrent_inserts_on_both_nodes(driver, topology, pgactive_only):
    build(driver)
    errors: list[str] = []
    writers = [threading.Thread(target=insert_many, args=(server, 300, label, errors))
               for server, label in ((topology.old_pg, "old"), (topology.new_pg, "new"))]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
    wait_for(lambda: synced(driver), what="sync after the writes")
    count = "SELECT count(*), count(DISTINCT id) FROM public.orders"
    wait_for(lambda: sql_one(topology.old_pg, count) == sql_one(topology.new_pg, count), what="equal orders")

    assert errors == []
    assert sql_one(topology.old_pg, count) == sql_one(topology.new_pg, count)
    orders, distinct = sql_one(topology.new_pg, count)
    assert orders == distinct
    assert sql_one(topology.new_pg, "SELECT count(*) FROM public.accounts WHERE email LIKE 'old-%' OR email LIKE 'new-%'") == (600,)
    assert driver.problems() == []


def test_one_sided_ddl_stalls_apply_and_is_reported_unhealthy(driver, topology, pgactive_only):
    build(driver)
    assert driver.problems() == []

    sql_one(topology.new_pg, "ALTER TABLE public.orders ADD COLUMN coupon text; SELECT 1")
    sql_one(topology.new_pg, "INSERT INTO public.orders (account_id, amount, coupon) VALUES (1, 5, 'x') RETURNING id")

    problems = wait_for(driver.problems, timeout=30, what="a reported problem")
    assert any("not active" in p or "worker errors" in p or "lag" in p for p in problems), problems


def insert_on_both_while_apply_paused(driver, topology, invoice_id: int) -> None:
    """The same primary key inserted on both nodes before either sees the other's row: an insert/insert conflict."""
    servers = (topology.old_pg, topology.new_pg)
    try:
        for server in servers:
            sql_one(server, "SELECT pgactive.pgactive_apply_pause()")
        # An apply worker pauses only after its next message: send one each way and give it time to arrive.
        for server in servers:
            with server.connect(dbname="app") as connection:
                driver.write_marker(connection, f"pause-{server.name}-{invoice_id}")
        time.sleep(2)
        for server in servers:
            sql_one(server, "INSERT INTO billing.invoice_lines (invoice_id, line_no, sku) VALUES (%s, 1, %s) RETURNING 1",
                    (invoice_id, server.name))
    finally:
        for server in servers:
            sql_one(server, "SELECT pgactive.pgactive_apply_resume()")


def test_a_conflict_on_both_nodes_is_reported(driver, topology, pgactive_only):
    build(driver)
    insert_on_both_while_apply_paused(driver, topology, 424242)

    problems = wait_for(driver.problems, timeout=30, what="the conflict reported")
    skus = wait_for(lambda: [sql_one(s, "SELECT sku FROM billing.invoice_lines WHERE invoice_id = 424242")
                             for s in (topology.old_pg, topology.new_pg)], what="the row on both")

    assert any("conflict" in problem for problem in problems), problems
    named = driver.conflicts()  # what the phase's decision gate shows the operator, row by row
    assert named and all("conflict_id" in row and "billing.invoice_lines" in row for row in named), named
    assert not any("conflict" in problem for problem in driver.problems(conflicts=False))
    wait_for(lambda: len({sql_one(s, "SELECT sku FROM billing.invoice_lines WHERE invoice_id = 424242")
                          for s in (topology.old_pg, topology.new_pg)}) == 1, what="both nodes agree on the winner")
    driver.conflict_baseline = driver.conflict_marks()
    assert not any("conflict" in problem for problem in driver.problems())
    assert driver.conflicts() == [], "accepted conflicts are not named again"
    assert skus


def test_conflicts_listed_are_the_ones_the_marks_cover_and_the_rest_are_counted(driver, topology, pgactive_only):
    """A health check takes the marks, then lists up to them: a conflict logged meanwhile is not in the baseline
    the operator's answer accepts, and the next check names it. Past the limit, the rest are counted, not dropped."""
    build(driver)
    driver.conflict_baseline = driver.conflict_marks()
    insert_on_both_while_apply_paused(driver, topology, 5001)
    wait_for(driver.conflicts, timeout=30, what="the first conflict")
    marks = driver.conflict_marks()
    insert_on_both_while_apply_paused(driver, topology, 5002)  # logged while a check would be listing
    wait_for(lambda: driver.conflict_marks() != marks, timeout=30, what="the second conflict")

    listed = driver.conflicts(up_to=marks)
    assert len(listed) == 1 and "billing.invoice_lines" in listed[0], listed
    node = listed[0].split(":", 1)[0]
    assert listed[0].startswith(f"{node}: conflict_id {marks[node]} "), (listed, marks)
    first = driver.conflict_baseline
    driver.conflict_baseline = marks  # the operator accepted what was listed
    later = driver.conflicts()
    assert len(later) == 1 and later != listed and "billing.invoice_lines" in later[0], later

    driver.conflict_baseline = first
    both = driver.conflicts(limit=1)
    newest = driver.conflict_marks()
    if newest[node] - first[node] == 2:  # the node that kept its own row logged both (last commit wins)
        assert both[:1] == listed and both[1:] == [f"{node}: 1 more conflict(s) up to conflict_id {newest[node]} "
                                                   "(pgactive.pgactive_conflict_history)"], both
    else:
        assert sorted(both) == sorted(listed + later), both


def move_sequences_as_the_cutover_does(topology) -> None:
    source, target = topology.old_pg.connect(dbname="app"), topology.new_pg.connect(dbname="app")
    try:
        sequences.move_forward(source, target, catalog.sequences(source, FILTERS))
    finally:
        source.close()
        target.close()


def test_cutover_hooks_keep_writes_on_the_target_flowing_back(driver, topology):
    build(driver)
    move_sequences_as_the_cutover_does(topology)
    driver.prepare_reverse()
    driver.after_switch()
    sql_one(topology.new_pg, "INSERT INTO public.accounts (email) VALUES ('after-switch@example.com') RETURNING id")

    row = wait_for(lambda: sql_one(topology.old_pg, "SELECT email FROM public.accounts WHERE email = 'after-switch@example.com'"),
                   what="target -> source after the switch")
    assert row == ("after-switch@example.com",)


def test_a_reverse_slot_left_mid_creation_by_a_dead_actor_is_ended_and_dropped(driver, topology, driver_name):
    """An actor killed while pg_create_logical_replication_slot runs leaves the server still creating (and holding)
    the slot; the cutover's undo must not leave it pinning the target's WAL, nor block the next cutover."""
    if driver_name != "native":
        pytest.skip("only the native driver creates a reverse slot at cutover")
    build(driver)
    blocker = topology.new_pg.connect(dbname="app")  # an open transaction with an xid: slot creation waits for it
    blocker.autocommit = False
    blocker.cursor().execute("SELECT txid_current()")
    creator = topology.new_pg.connect(dbname="app")
    creator.autocommit = True
    outcome: list = []

    def create_like_a_dead_actor():
        try:
            creator.cursor().execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (driver.reverse,))
            outcome.append("created")
        except psycopg2.Error as error:
            outcome.append(type(error).__name__)

    thread = threading.Thread(target=create_like_a_dead_actor, daemon=True)
    thread.start()
    held = "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s"
    def slot_state():
        return (outcome, sql_all(topology.new_pg, "SELECT slot_name, active_pid FROM pg_replication_slots"),
                sql_all(topology.new_pg, "SELECT pid, wait_event, left(query, 50) FROM pg_stat_activity "
                                         "WHERE query LIKE '%%create_logical%%'"))

    try:
        wait_for(lambda: (sql_one(topology.new_pg, held, (driver.reverse,)) or (None,))[0], timeout=10,
                 what="the slot being created")
    except AssertionError:
        raise AssertionError(slot_state()) from None

    driver.abort_cutover()

    assert sql_all(topology.new_pg, held, (driver.reverse,)) == []
    thread.join(timeout=10)
    assert outcome and outcome[0] != "created", outcome
    blocker.rollback()
    driver.prepare_reverse()  # the next cutover creates it again
    assert sql_one(topology.new_pg, "SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s",
                   (driver.reverse,)) == (1,)
    driver.abort_cutover()
    for connection in (blocker, creator):
        connection.close()


def test_detach_removes_everything_and_returns_the_conflict_history(driver, topology, driver_name):
    build(driver)
    if driver_name == "pgactive":
        insert_on_both_while_apply_paused(driver, topology, 777)
        wait_for(lambda: any("conflict" in p for p in driver.problems()), what="a conflict to export")

    move_sequences_as_the_cutover_does(topology)
    started = time.monotonic()
    result = driver.detach()
    again = driver.detach()
    seconds = time.monotonic() - started

    assert seconds < 60
    for server in (topology.old_pg, topology.new_pg):
        assert sql_all(server, "SELECT slot_name FROM pg_replication_slots WHERE database = 'app'") == []
        assert sql_all(server, "SELECT subname FROM pg_subscription") == []
        assert sql_all(server, "SELECT srvname FROM pg_foreign_server") == []
        assert sql_all(server, "SELECT umid FROM pg_user_mappings") == []
        assert sql_all(server, "SELECT extname FROM pg_extension WHERE extname = 'pgactive'") == []
        assert sql_all(server, "SELECT evtname FROM pg_event_trigger") == []
    new_id = sql_one(topology.new_pg, "INSERT INTO public.accounts (email) VALUES ('standalone@example.com') RETURNING id")
    assert new_id[0] > 0
    if driver_name == "pgactive":
        counts = result["conflict_history"]  # counts only: the rows hold application data
        assert set(counts) == {"orders-db", "orders-db-pg17"} and sum(counts.values()) >= 1
        kept = sql_all(topology.new_pg, "SELECT node, conflict->>'object_name' FROM "
                                        "pgactive_upgrade.pgactive_conflict_history_export")
        assert len(kept) == sum(counts.values()) and ("invoice_lines" in {name for _, name in kept})
        assert again["was_attached"] is False


def test_servers_start_with_the_settings_pgactive_needs(topology, driver_name, pgactive_only):
    for server in (topology.old_pg, topology.new_pg):
        preload = sql_one(server, "SHOW shared_preload_libraries", dbname="postgres")[0]
        commit_timestamps = sql_one(server, "SHOW track_commit_timestamp", dbname="postgres")[0]
        plugins = sql_one(server, "SELECT setting FROM pg_settings WHERE name = 'output_plugin_libraries'", dbname="postgres")
        workers = int(sql_one(server, "SHOW max_worker_processes", dbname="postgres")[0])

        assert "pgactive" in preload and commit_timestamps == "on" and workers >= 16
        # 17.11 (and newer minor releases of older majors) refuse unlisted output plugins.
        assert plugins is None or "pgactive" in plugins[0]
    assert sql_one(topology.new_pg, "SELECT setting FROM pg_settings WHERE name = 'output_plugin_libraries'",
                   dbname="postgres")[0].replace(" ", "") == "pgoutput,test_decoding,pgactive"


def test_detach_turns_snowflake_defaults_back_into_plain_sequences(driver, topology, pgactive_only):
    build(driver)
    sql_one(topology.new_pg, "ALTER TABLE billing.invoices ALTER COLUMN id SET DEFAULT "
                             "pgactive.pgactive_snowflake_id_nextval('billing.invoices_id_seq'); SELECT 1")

    driver.detach()

    default = sql_one(topology.new_pg, "SELECT pg_get_expr(d.adbin, d.adrelid) FROM pg_attrdef d "
                                       "JOIN pg_attribute a ON a.attrelid = d.adrelid AND a.attnum = d.adnum "
                                       "WHERE d.adrelid = 'billing.invoices'::regclass AND a.attname = 'id'")[0]
    assert "snowflake" not in default and "nextval('billing.invoices_id_seq'" in default
    assert sql_one(topology.new_pg, "INSERT INTO billing.invoices (order_id, total, issued_at) "
                                    "VALUES (1, 1, now()) RETURNING id")[0] > 0


def test_verify_passes_with_writes_on_both_nodes_and_names_a_row_changed_behind_replication(driver, topology,
                                                                                             pgactive_only):
    """Before cutover pgactive takes writes on both nodes: verify locks on both and passes a barrier both ways."""
    build(driver)
    admin = driver.link.admin
    nodes = [verify.VerifyNode("source", driver.link.source.endpoint, writer=True),
             verify.VerifyNode("target", driver.link.target.endpoint, writer=True)]
    tables = list(driver.link.tables)

    with Churn(app_dsn(topology, topology.old_pg), rate=100, hot_id=1) as on_source, \
            Churn(app_dsn(topology, topology.new_pg), rate=100, hot_id=2) as on_target:
        time.sleep(1)
        reports = [verify.Verification(nodes, admin, tables, chunk_rows=200).run() for _ in range(3)]
        assert [r.divergences for r in reports] == [[], [], []]
        assert on_source.committed > 50 and on_target.committed > 50

        unreplicated = psycopg2.connect(topology.new_pg.dsn("postgres", "app"), options="-c pgactive.do_not_replicate=on")
        with unreplicated, unreplicated.cursor() as cursor:
            cursor.execute("UPDATE billing.invoices SET total = total + 1 WHERE id = 3")
        unreplicated.close()
        report = verify.Verification(nodes, admin, tables, chunk_rows=200).run()
    assert [d.chunk.table.qualified_name for d in report.divergences] == ["billing.invoices"]
    assert report.divergences[0].keys == [(3,)]


def app_dsn(topology, server) -> str:
    return f"host=127.0.0.1 port={server.port} dbname=app user=app password={topology.credentials['app']}"


def test_a_join_under_updates_loses_them_and_the_repair_sends_them_again(driver, topology, pgactive_only):
    """pgactive's join: an UPDATE made during the copy loses to the restored row (last commit wins, the restore
    commits later); join_repair finds such rows and sends them again."""
    with Churn(app_dsn(topology, topology.old_pg), rate=300) as churn:
        time.sleep(0.5)
        build(driver)
        time.sleep(1)
    wait_for(lambda: synced(driver), what="sync after the writes")
    statement = "SELECT id, amount, note FROM public.orders ORDER BY id"
    lost = set(sql_all(topology.old_pg, statement)) - set(sql_all(topology.new_pg, statement))
    assert churn.committed > 100 and churn.errors == 0

    result = join_repair.repair(driver.link.source.endpoint, driver.link.target.endpoint, driver.link.admin,
                                list(driver.link.tables), parallelism=2)

    wait_for(lambda: synced(driver), what="sync after the repair")
    assert sql_all(topology.old_pg, statement) == sql_all(topology.new_pg, statement)
    assert result["rows_resent"].get("public.orders", 0) >= len({row[0] for row in lost})
