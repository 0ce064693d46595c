"""Under a real scheduler: an apply error made (and fixed) while traffic is split, with replication flowing again by
the time the phase's check runs, stops the run at the phase's decision gate, the error named; the split holds while
it waits; an Accept through the REST API lets the run go on and the next phase's check does not ask about it again.

Native logical replication (PostgreSQL 17 subscriber: pg_stat_subscription_stats counts the apply errors).
"""

from __future__ import annotations

import time

import pytest

from tests.airflow_real.runs import (
    UPGRADE, accept_at_phase_0_and_never_asked_again, pending_gates, record, split_holds_while_the_gate_waits,
    states_of, wait_for_state, wait_until,
)
from tests.replication.replication_helpers import sql_all as sql
from topology.demo import demo_conf

pytestmark = [pytest.mark.integration, pytest.mark.airflow]

DECIDE, HEALTH_CHECK = "traffic_phase.decide", "traffic_phase.health_check"
SETTLE_SECONDS = 25  # the error is made and fixed while phase 0's check settles
CLASH_ID, CLASH_EMAIL = 900_000_001, "apply-clash@example.com"


def apply_errors_counted(topo) -> int:
    rows = sql(topo.new_pg, "SELECT coalesce(sum(apply_error_count), 0) FROM pg_stat_subscription_stats")
    return int(rows[0][0])


def an_apply_error_that_recovers(topo) -> None:
    """The target already holds the email the source then inserts: the apply fails (unique violation) until the
    target's row is deleted; then the source's row arrives."""
    before = apply_errors_counted(topo)
    sql(topo.new_pg, "INSERT INTO public.accounts (id, email) OVERRIDING SYSTEM VALUE VALUES (%s, %s)",
        (CLASH_ID, CLASH_EMAIL))
    sql(topo.old_pg, "INSERT INTO public.accounts (email) VALUES (%s)", (CLASH_EMAIL,))
    wait_until(lambda: apply_errors_counted(topo) > before, 15, "the apply error counted on the target")
    sql(topo.new_pg, "DELETE FROM public.accounts WHERE id = %s", (CLASH_ID,))
    wait_until(lambda: sql(topo.new_pg, "SELECT 1 FROM public.accounts WHERE email = %s", (CLASH_EMAIL,)), 20,
               "the source's row applied once the clash is gone")


def test_an_apply_error_while_split_asks_and_an_accept_through_the_api_lets_the_run_go_on(ready):
    airflow, topo = ready
    started = time.monotonic()
    conf = {**demo_conf(topo), "replication_driver": "native", "phase_settle_seconds": SETTLE_SECONDS,
            "decommission": "keep", "shift_percentages": [30, 60]}
    run_id = airflow.trigger(UPGRADE, conf)
    wait_for_state(airflow, UPGRADE, run_id, f"{HEALTH_CHECK}[0]", "deferred", timeout=300)  # settling at the split
    an_apply_error_that_recovers(topo)
    made = time.monotonic()
    assert states_of(airflow, UPGRADE, run_id).get(f"{HEALTH_CHECK}[0]") == "deferred", "settle longer"

    wait_for_state(airflow, UPGRADE, run_id, f"{DECIDE}[0]", "awaiting_input", timeout=120)
    asked_after = time.monotonic() - made
    (gate,) = pending_gates(airflow, run_id)
    assert (gate["task_instance"]["task_id"], gate["task_instance"]["map_index"]) == (DECIDE, 0)
    assert gate["subject"] == "Replication apply errors after phase 0 (30 %) of orders-db", gate["subject"]
    assert gate["options"] == ["Accept and continue", "Roll back", "Stop"] and gate["defaults"] == ["Stop"]
    shown = [line[2:] for line in gate["body"].splitlines() if line.startswith("- ")]
    assert len(shown) == 1 and shown[0].startswith("orders-db-pg17: subscription pgu_orders_db_fwd: "), gate["body"]
    assert "new apply error(s)" in shown[0] and CLASH_EMAIL not in gate["body"], gate["body"]
    waiting = record(airflow)
    assert waiting["run_state"] == "awaiting_input" and waiting["pending_gate"]["kind"] == "apply_errors", waiting
    states = states_of(airflow, UPGRADE, run_id)
    assert states[f"{HEALTH_CHECK}[0]"] == "success", "the check handed the errors to the gate; it did not fail"
    split_holds_while_the_gate_waits(airflow, topo, run_id, 30)  # not restored

    accept_at_phase_0_and_never_asked_again(airflow, run_id, timeout=600)
    took = time.monotonic() - started
    done = wait_until(lambda: (r := record(airflow))["run_state"] == "success" and r, 90, "run_state success")
    (decision,) = done["gates"]
    assert (decision["task"], decision["kind"], decision["answer"], decision["by"], decision["timed_out"]) == (
        f"{DECIDE}[0]", "apply_errors", "Accept and continue", airflow.username, False), decision
    print(f"\napply-error gate (accept): shown {shown}; asked {asked_after:.1f} s after the error was fixed; "
          f"run {took:.0f} s")
