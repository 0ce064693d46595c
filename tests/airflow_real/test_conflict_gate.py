"""Under a real scheduler with real pgactive: a conflict made while traffic is split stops the run at the phase's
decision gate, the conflict rows named; an answer through the REST API accepts it (the run goes on, not asked again)
or rolls back (traffic returns to the source); the audit trail names who answered, when and what.

Needs PostgreSQL 15 and 17 servers built with pgactive (PGU_OLD_PG_BIN / PGU_NEW_PG_BIN); skipped otherwise.
"""

from __future__ import annotations

import os
import time
import warnings

import pytest

from pgactive_upgrade.config import Filters
from pgactive_upgrade.db import Credentials, Endpoint
from pgactive_upgrade.replication import Link, Node, driver_for
from tests.airflow_real.runs import (
    ROLLBACK, SOURCE, UPGRADE, accept_at_phase_0_and_never_asked_again, answer, audit_of, pending_gates, record,
    split_holds_while_the_gate_waits, states_of, wait_for_state, wait_until,
)
from tests.replication.replication_helpers import sql_all as sql
from topology.demo import TARGET, demo_conf
from topology.pgbinaries import pgactive_available
from topology.postgres import DRIVER_ENV, HOST

pytestmark = [pytest.mark.integration, pytest.mark.airflow]

DECIDE, HEALTH_CHECK = "traffic_phase.decide", "traffic_phase.health_check"
# Long enough to make the conflict while the first phase's check settles (the split is in place by then).
SETTLE_SECONDS = 12
CONFLICTING_INVOICE = 424242


@pytest.fixture(scope="session")
def pgactive_servers(topology):
    """Session-scoped so that a skip happens before the package's Airflow starts."""
    if os.environ.get(DRIVER_ENV) == "native":
        pytest.skip(f"{DRIVER_ENV}=native: the servers run without pgactive")
    missing = [f"{server.name} PostgreSQL {server.major} ({server.bin_dir})"
               for server in (topology.old_pg, topology.new_pg) if not pgactive_available(server.bin_dir)]
    if missing:
        pytest.skip("pgactive is not installed for " + ", ".join(missing) + "; build aws/pgactive and point "
                    "PGU_OLD_PG_BIN / PGU_NEW_PG_BIN at the pgactive-enabled bin dirs")
    return topology


@pytest.fixture
def pgactive_ready(pgactive_servers, ready):
    airflow, topo = ready
    yield airflow, topo
    leave_no_pgactive_node(topo)


def pgactive_conf(topo) -> dict:
    return {**demo_conf(topo), "replication_driver": "pgactive", "phase_settle_seconds": SETTLE_SECONDS,
            "decommission": "keep"}


def insert_the_same_key_on_both_nodes(topo, invoice_id: int) -> None:
    """The same primary key inserted on both nodes before either sees the other's row: an insert/insert conflict,
    made deterministic by pausing pgactive's apply on both nodes meanwhile."""
    servers = (topo.old_pg, topo.new_pg)
    try:
        for server in servers:
            sql(server, "SELECT pgactive.pgactive_apply_pause()")
        # An apply worker pauses only at its next message: one harmless write each way, and time for it to arrive.
        for order_id, server in enumerate(servers, start=1):
            sql(server, "UPDATE public.orders SET note = note WHERE id = %s", (order_id,))
        time.sleep(2)
        for server in servers:
            sql(server, "INSERT INTO billing.invoice_lines (invoice_id, line_no, sku) VALUES (%s, 1, %s)",
                (invoice_id, f"from-{server.name}"))
    finally:
        for server in servers:
            sql(server, "SELECT pgactive.pgactive_apply_resume()")


def conflict_rows(topo) -> list[str]:
    """The application's conflict rows in pgactive_conflict_history on each node, as the gate names them."""
    named = []
    for identifier, server in ((SOURCE, topo.old_pg), (TARGET, topo.new_pg)):
        rows = sql(server, "SELECT conflict_id, conflict_type::text, object_schema, object_name, "
                           "conflict_resolution::text FROM pgactive.pgactive_conflict_history "
                           "WHERE object_schema IS DISTINCT FROM 'pgactive' ORDER BY conflict_id")
        named += [f"{identifier}: conflict_id {cid} {kind} on {schema}.{table}, {resolution}"
                  for cid, kind, schema, table, resolution in rows]
    return named


def conflict_while_split(airflow, topo, run_id: str) -> tuple[list[str], float]:
    """Once phase 0 moved the split and its check settles (deferred): the conflict. Returns the rows and when."""
    wait_for_state(airflow, UPGRADE, run_id, f"{HEALTH_CHECK}[0]", "deferred", timeout=300)  # settling at the split
    assert topo.haproxy.get_weight("pg_write", "target") > 0, "writes reach both nodes in this phase"
    insert_the_same_key_on_both_nodes(topo, CONFLICTING_INVOICE)
    rows = wait_until(lambda: conflict_rows(topo), 30, "the conflict in pgactive_conflict_history")
    made = time.monotonic()
    check = states_of(airflow, UPGRADE, run_id).get(f"{HEALTH_CHECK}[0]")
    assert check == "deferred", f"the conflict must land before the phase's check runs (check {check}): settle longer"
    return rows, made


def gate_shows_the_conflict(airflow, run_id: str, rows: list[str]) -> dict:
    (gate,) = pending_gates(airflow, run_id)
    assert (gate["task_instance"]["task_id"], gate["task_instance"]["map_index"]) == (DECIDE, 0)
    assert "conflict" in gate["subject"].lower() and gate["options"] == ["Accept and continue", "Roll back", "Stop"]
    assert gate["defaults"] == ["Stop"], "a gate never continues on its own"
    shown = [line[2:] for line in gate["body"].splitlines() if line.startswith("- ")]
    # What the operator reads names each row: node, conflict id, type, table, resolution (and when).
    assert [line.rsplit(", at ", 1)[0] for line in shown] == rows, gate["body"]
    waiting = record(airflow)
    assert waiting["run_state"] == "awaiting_input" and waiting["pending_gate"]["kind"] == "conflicts", waiting
    return gate


def test_a_conflict_while_split_asks_and_an_accept_through_the_api_lets_the_run_go_on(pgactive_ready):
    airflow, topo = pgactive_ready
    started = time.monotonic()
    run_id = airflow.trigger(UPGRADE, {**pgactive_conf(topo), "shift_percentages": [30, 60]})
    rows, made = conflict_while_split(airflow, topo, run_id)
    assert len(rows) == 1 and "insert_insert on billing.invoice_lines" in rows[0], rows

    wait_for_state(airflow, UPGRADE, run_id, f"{DECIDE}[0]", "awaiting_input", timeout=120)
    asked_after = time.monotonic() - made
    gate = gate_shows_the_conflict(airflow, run_id, rows)
    split_holds_while_the_gate_waits(airflow, topo, run_id, 30)

    accept_at_phase_0_and_never_asked_again(airflow, run_id, timeout=420)
    took = time.monotonic() - started
    assert topo.port_behind(topo.haproxy.write_port) == topo.new_pg.port
    # Last commit wins: both nodes kept the same row.
    skus = {sql(server, "SELECT sku FROM billing.invoice_lines WHERE invoice_id = %s", (CONFLICTING_INVOICE,))[0]
            for server in (topo.old_pg, topo.new_pg)}
    assert len(skus) == 1, skus

    done = wait_until(lambda: (r := record(airflow))["run_state"] == "success" and r, 90, "run_state success")
    (decision,) = done["gates"]
    assert (decision["task"], decision["kind"], decision["answer"], decision["by"], decision["timed_out"]) == (
        f"{DECIDE}[0]", "conflicts", "Accept and continue", airflow.username, False), decision
    trail = audit_of(airflow)
    audit_lines = [entry for entry in trail["entries"] if entry["what"] in (
        "update_hitl_detail", "gate answered", "gate decision applied")]
    assert [(e["origin"], e["who"]) for e in audit_lines] == [
        ("event_log", airflow.username), ("hitl", airflow.username), ("package", airflow.username)], trail
    logged, responded, applied = audit_lines
    assert logged["task_id"] == DECIDE and logged["map_index"] == 0 and logged["request"]["chosen_options"] == [
        "Accept and continue"], logged
    assert responded["chosen"] == ["Accept and continue"] and responded["subject"] == gate["subject"], responded
    assert applied["kind"] == "conflicts" and applied["answer"] == "Accept and continue", applied
    assert all(e["at"] for e in audit_lines)
    print(f"\nconflict gate (accept): rows shown {rows}; asked {asked_after:.1f} s after the conflict; run "
          f"{took:.0f} s; audit: " + "; ".join(f"{e['at']} {e['who']} {e['what']}" for e in audit_lines))


def test_a_conflict_while_split_rolled_back_through_the_api_returns_traffic_to_the_source(pgactive_ready):
    airflow, topo = pgactive_ready
    started = time.monotonic()
    run_id = airflow.trigger(UPGRADE, {**pgactive_conf(topo), "shift_percentages": [50]})
    rows, _ = conflict_while_split(airflow, topo, run_id)
    wait_for_state(airflow, UPGRADE, run_id, f"{DECIDE}[0]", "awaiting_input", timeout=120)
    gate_shows_the_conflict(airflow, run_id, rows)
    earlier = {r["dag_run_id"] for r in airflow.api("GET", f"dags/{ROLLBACK}/dagRuns")["dag_runs"]}

    answer(airflow, run_id, DECIDE, "Roll back", map_index=0)
    rollback = wait_until(lambda: [r for r in airflow.api("GET", f"dags/{ROLLBACK}/dagRuns")["dag_runs"]
                                   if r["conf"].get("source_instance") == SOURCE and r["dag_run_id"] not in earlier],
                          60, "the rollback run the answer triggered")[0]
    assert airflow.wait_for_run(ROLLBACK, rollback["dag_run_id"], timeout=180) == "success"
    assert airflow.wait_for_run(UPGRADE, run_id, timeout=180) == "failed"
    took = time.monotonic() - started
    states = states_of(airflow, UPGRADE, run_id)
    assert states["cutover"] != "success" and states.get("verify_before_cutover") != "success", states
    for route in ("pg_write", "pg_read"):
        assert topo.haproxy.get_weight(route, "target") == 0, route
    assert topo.port_behind(topo.haproxy.write_port) == topo.old_pg.port

    halted = record(airflow)
    assert halted["run_state"] == "halted" and halted["halted_by"]["requested_by"] == airflow.username, halted
    trail = audit_of(airflow)
    (rolled,) = trail["rollbacks"]
    assert rolled["requested_by"] == airflow.username and rolled["state"] == "success", rolled
    assert rolled["reason"] == f"conflicts gate {DECIDE}[0]: answered Roll back by {airflow.username}", rolled
    answered = [e for e in trail["entries"] if e["what"] == "update_hitl_detail"]
    assert [(e["who"], e["task_id"], e["map_index"], e["request"]["chosen_options"]) for e in answered] == [
        (airflow.username, DECIDE, 0, ["Roll back"])], trail
    assert [e["who"] for e in trail["entries"] if e["what"] == "halted by rollback"] == [airflow.username]
    print(f"\nconflict gate (roll back): rows shown {rows}; run and rollback {took:.0f} s; audit: "
          + "; ".join(f"{e['at']} {e['who']} {e['what']}" for e in trail["entries"]))


def leave_no_pgactive_node(topo) -> None:
    """The next test reseeds the databases: no pgactive group is left replicating into them."""
    def node(identifier, server):
        endpoint = Endpoint(HOST, server.port, "app")
        return Node(identifier, endpoint, endpoint)

    link = Link(source=node(SOURCE, topo.old_pg), target=node(TARGET, topo.new_pg),
                admin=Credentials("postgres", topo.credentials["postgres"]),
                replication=Credentials("replicator", topo.credentials["replicator"]), tables=(), filters=Filters())
    try:
        for server in (topo.old_pg, topo.new_pg):  # a test that failed while apply was paused
            sql(server, "SELECT pgactive.pgactive_apply_resume() FROM pg_extension WHERE extname = 'pgactive'")
        driver_for("pgactive", link).detach()
    except Exception as error:  # the reseed still drops the databases; say why this did not work
        warnings.warn(f"pgactive left behind after the test: {type(error).__name__}: {error}", stacklevel=1)
