"""Under a real scheduler: phases in strict order, a failed health check, and the rollback DAG."""

from __future__ import annotations

import json
import re
import time
from datetime import datetime

import psycopg2
import pytest

from tests.airflow_real.runs import states_of, wait_for_state
from topology.airflow_local import AirflowApiError
from topology.demo import demo_conf

pytestmark = [pytest.mark.integration, pytest.mark.airflow]

UPGRADE, ROLLBACK = "pgactive_rolling_upgrade", "pgactive_upgrade_rollback"
FAIL_PROBE = "SELECT 1 / (to_regclass('public.fail_probe') IS NULL)::int"


def times_of(airflow, run_id: str) -> dict[str, tuple[datetime, datetime]]:
    spans = {}
    for ti in airflow.task_instances(UPGRADE, run_id):
        if ti["start_date"] and ti["end_date"]:
            key = ti["task_id"] if ti["map_index"] == -1 else f"{ti['task_id']}[{ti['map_index']}]"
            spans[key] = (datetime.fromisoformat(ti["start_date"]), datetime.fromisoformat(ti["end_date"]))
    return spans


def test_phases_run_in_strict_order_and_the_upgrade_completes(ready):
    airflow, topo = ready
    conf = {**demo_conf(topo), "shift_percentages": [20, 40, 60], "phase_settle_seconds": 1, "decommission": "keep"}
    run_id = airflow.trigger(UPGRADE, conf)
    assert airflow.wait_for_run(UPGRADE, run_id, timeout=300) == "success", states_of(airflow, UPGRADE, run_id)

    spans = times_of(airflow, run_id)
    start, end = (lambda task: spans[task][0]), (lambda task: spans[task][1])
    for index in range(3):
        gate, shift, check = (f"traffic_phase.{name}[{index}]" for name in ("wait_for_previous_phase", "shift", "health_check"))
        assert end(gate) <= start(shift) and end(shift) <= start(check), index
        if index:  # gates start early and wait: each ends only after the previous phase's check succeeded
            assert end(f"traffic_phase.health_check[{index - 1}]") <= end(gate) <= start(shift), index
    assert end("traffic_phase.health_check[2]") <= start("cutover")
    assert airflow.saw_deferred(UPGRADE, run_id, "traffic_phase.wait_for_previous_phase", map_index=2), \
        "a waiting gate holds no worker slot: it defers to the triggerer"
    assert topo.port_behind(topo.haproxy.write_port) == topo.new_pg.port
    assert_progress_endpoint(airflow, run_id)


def assert_progress_endpoint(airflow, run_id: str) -> None:
    """The plugin's Progress query: the recorded phase and split, authenticated, well under a second."""
    started = time.monotonic()
    answer = airflow._request("GET", "/pgactive-upgrade/progress/orders-db", None, token=airflow.token())
    assert time.monotonic() - started < 1.0
    assert answer["run_id"] == run_id and answer["state"] == "done"
    assert answer["step"] == "decommission_source" or answer["phase"] == "cutover"
    assert answer["split"] == {"pg_write": 100, "pg_read": 100}
    assert isinstance(answer["replicationLagBytes"], int) and answer["lag_measured_at"]
    with pytest.raises(AirflowApiError) as refused:
        airflow._request("GET", "/pgactive-upgrade/progress/orders-db", None, token=None)
    assert refused.value.status == 401


def test_failed_health_check_returns_to_the_last_healthy_split_and_stops(ready):
    airflow, topo = ready
    conf = {**demo_conf(topo), "shift_percentages": [20, 40, 60], "phase_settle_seconds": 4,
            "health_probes": [FAIL_PROBE], "decommission": "keep"}
    run_id = airflow.trigger(UPGRADE, conf)
    wait_for_state(airflow, UPGRADE, run_id, "traffic_phase.shift[1]", "success", timeout=180)
    with topo.new_pg.connect("postgres", dbname="app") as connection, connection.cursor() as cursor:
        cursor.execute("CREATE TABLE public.fail_probe ()")

    assert airflow.wait_for_run(UPGRADE, run_id, timeout=120) == "failed"
    states = states_of(airflow, UPGRADE, run_id)
    assert states["traffic_phase.health_check[0]"] == "success"
    assert states["traffic_phase.health_check[1]"] == "failed"
    assert states["traffic_phase.shift[2]"] in ("upstream_failed", None, "removed"), states
    assert states["cutover"] in ("upstream_failed", None), states
    assert topo.haproxy.get_weight("pg_read", "target") == 20 and topo.haproxy.get_weight("pg_read", "source") == 80
    assert topo.haproxy.get_weight("pg_write", "target") == 0
    log = str(airflow.task_log(UPGRADE, run_id, "traffic_phase.health_check", 1, map_index=1))
    assert "health_probes[0]" in log and "traffic restored to" in log
    first_check = str(airflow.task_log(UPGRADE, run_id, "traffic_phase.health_check", 1, map_index=0))
    assert "health_checked" in first_check and "phase_shifted" not in first_check, "the shift right before set the split"

    # Fixed, then "clear only failed": the check runs again at its own phase's split, not the restored one.
    with topo.new_pg.connect("postgres", dbname="app") as connection, connection.cursor() as cursor:
        cursor.execute("DROP TABLE public.fail_probe")
    airflow.api("POST", f"dags/{UPGRADE}/clearTaskInstances",
                {"dag_run_id": run_id, "only_failed": True, "dry_run": False})
    wait_for_state(airflow, UPGRADE, run_id, "traffic_phase.health_check[1]", "success", timeout=120)
    again = str(airflow.task_log(UPGRADE, run_id, "traffic_phase.health_check", 2, map_index=1))
    assert re.search(r"phase_shifted.{0,200}pg_read\W+40", again), again[-2000:]
    assert airflow.wait_for_run(UPGRADE, run_id, timeout=300) == "success", states_of(airflow, UPGRADE, run_id)


def test_two_runs_of_one_source_triggered_together_only_one_claims_it(ready):
    airflow, topo = ready
    # A target version preflight refuses: the run that claims the source stops right after, changing nothing.
    conf = {**demo_conf(topo), "shift_percentages": [], "decommission": "keep", "target_engine_version": "15.9"}
    runs = [airflow.trigger(UPGRADE, conf) for _ in range(2)]
    outcomes = []
    for run_id in runs:
        deadline = time.monotonic() + 120
        while states_of(airflow, UPGRADE, run_id).get("validate_request") not in ("success", "failed"):
            assert time.monotonic() < deadline, states_of(airflow, UPGRADE, run_id)
            time.sleep(0.2)
        outcomes.append(states_of(airflow, UPGRADE, run_id)["validate_request"])
    assert sorted(outcomes) == ["failed", "success"], outcomes
    for run_id in runs:
        assert airflow.wait_for_run(UPGRADE, run_id, timeout=120) == "failed"


def test_rollback_mid_phase_halts_the_upgrade_and_returns_traffic_in_seconds(ready):
    airflow, topo = ready
    conf = {**demo_conf(topo), "shift_percentages": [30, 60], "phase_settle_seconds": 60, "decommission": "keep"}
    run_id = airflow.trigger(UPGRADE, conf)
    wait_for_state(airflow, UPGRADE, run_id, "traffic_phase.health_check[0]", "running", timeout=180)
    time.sleep(3)  # well inside the 60 s settle time
    assert topo.haproxy.get_weight("pg_read", "target") == 30
    second = airflow.trigger(UPGRADE, conf)
    assert airflow.wait_for_run(UPGRADE, second, timeout=60) == "failed"
    assert states_of(airflow, UPGRADE, second)["validate_request"] == "failed", "one upgrade per source at a time"
    assert topo.haproxy.get_weight("pg_read", "target") == 30

    asked = time.monotonic()
    rollback_id = airflow.trigger(ROLLBACK, {"source_instance": "orders-db", "reason": "latency regression",
                                             "requested_by": "sre-on-call"})
    while read_lands_on(topo) != topo.old_pg.port or topo.haproxy.get_weight("pg_read", "target"):
        assert time.monotonic() - asked < 60, "traffic did not return to the source"
        time.sleep(0.1)
    returned_after = time.monotonic() - asked

    assert airflow.wait_for_run(ROLLBACK, rollback_id, timeout=60) == "success"
    assert airflow.wait_for_run(UPGRADE, run_id, timeout=120) == "failed"
    states = states_of(airflow, UPGRADE, run_id)
    assert states["traffic_phase.shift[1]"] != "success" and states["cutover"] != "success", states
    assert topo.haproxy.get_weight("pg_read", "target") == 0, "the halted upgrade must not move traffic again"
    result = airflow.api("GET", f"dags/{ROLLBACK}/dagRuns/{rollback_id}/taskInstances/roll_back/xcomEntries/return_value")
    assert "sre-on-call" in str(result) and "latency regression" in str(result)
    print(f"rollback mid-phase: traffic back on the source {returned_after:.2f} s after the trigger")


def test_rollback_after_cutover_keeps_every_write_and_is_harmless_twice(ready):
    airflow, topo = ready
    conf = {**demo_conf(topo), "shift_percentages": [], "decommission": "keep"}
    run_id = airflow.trigger(UPGRADE, conf)
    assert airflow.wait_for_run(UPGRADE, run_id, timeout=300) == "success", states_of(airflow, UPGRADE, run_id)
    app = psycopg2.connect(host="127.0.0.1", port=topo.haproxy.write_port, dbname="app", user="app",
                           password=topo.credentials["app"])
    with app, app.cursor() as cursor:
        cursor.execute("INSERT INTO public.accounts (email, created_at) VALUES ('after-cutover@example.com', now())")
    app.close()

    for attempt in range(2):
        rollback_id = airflow.trigger(ROLLBACK, {"source_instance": "orders-db", "reason": f"drill {attempt}"})
        assert airflow.wait_for_run(ROLLBACK, rollback_id, timeout=120) == "success", attempt

    assert topo.port_behind(topo.haproxy.write_port) == topo.old_pg.port
    with topo.old_pg.connect("app", dbname="app") as source, source.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM public.accounts WHERE email = 'after-cutover@example.com'")
        assert cursor.fetchone()[0] == 1, "the write made on the target after cutover must be on the source"
        cursor.execute("INSERT INTO public.accounts (email, created_at) VALUES ('after-rollback@example.com', now())")
    with topo.new_pg.connect("postgres", dbname="app") as target, target.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_subscription")
        assert cursor.fetchone()[0] == 0
    with topo.old_pg.connect("postgres", dbname="app") as source, source.cursor() as cursor:
        cursor.execute("SELECT subenabled FROM pg_subscription WHERE subname = 'pgu_orders_db_rev'")
        assert cursor.fetchone() == (True,), "replication keeps running after the rollback"


SLOW_PROBE = "SELECT count(*), max(payload) FROM public.latency_events WHERE k = 42"


def test_a_probe_slower_on_the_target_fails_its_phase_naming_both_timings_with_both_plans(ready):
    airflow, topo = ready
    with topo.old_pg.connect("postgres", dbname="app") as connection, connection.cursor() as cursor:
        cursor.execute("CREATE TABLE public.latency_events (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, "
                       "k int NOT NULL, payload text)")
        cursor.execute("INSERT INTO public.latency_events (k, payload) SELECT g % 5000, md5(g::text) "
                       "FROM generate_series(1, 300000) g")
        cursor.execute("CREATE INDEX latency_events_k ON public.latency_events (k)")
    conf = {**demo_conf(topo), "shift_percentages": [20, 40], "phase_settle_seconds": 10,
            "health_probes": [SLOW_PROBE], "decommission": "keep"}
    run_id = airflow.trigger(UPGRADE, conf)
    wait_for_state(airflow, UPGRADE, run_id, "prepare_target", "success", timeout=240)
    with topo.new_pg.connect("postgres", dbname="app") as connection, connection.cursor() as cursor:
        cursor.execute("DROP INDEX public.latency_events_k")  # behind replication's back, during the settle time
    record = json.loads(airflow.api("GET", "variables/pgactive_upgrade__orders-db")["value"])
    analyzed = record["statistics_progress"]
    assert analyzed["done"] == analyzed["analyzed"] == 5 and record["extensions_updated"] == [], record

    assert airflow.wait_for_run(UPGRADE, run_id, timeout=180) == "failed"
    states = states_of(airflow, UPGRADE, run_id)
    assert states["traffic_phase.health_check[0]"] == "failed", states
    assert states["cutover"] in ("upstream_failed", None), states
    assert topo.haproxy.get_weight("pg_read", "target") == 0, "back to the split before the first phase"
    log = str(airflow.task_log(UPGRADE, run_id, "traffic_phase.health_check", 1, map_index=0))
    found = re.search(r"health_probes\[0\] is slower on the target: median ([0-9.]+) ms there, ([0-9.]+) ms on "
                      r"the source", log)
    assert found, log[-3000:]
    assert float(found.group(1)) > 1.5 * float(found.group(2))
    assert "Seq Scan on latency_events" in log and "latency_events_k" in log, "both plans side by side"
    entry = airflow.api("GET", f"dags/{UPGRADE}/dagRuns/{run_id}/taskInstances/traffic_phase.health_check/"
                               "xcomEntries/latency?map_index=0")
    assert "Seq Scan on latency_events" in str(entry) and "regressed" in str(entry)


def test_plan_only_skips_every_later_task_under_a_real_scheduler(ready):
    airflow, topo = ready
    conf = {**demo_conf(topo), "shift_percentages": [20, 40], "plan_only": True}
    run_id = airflow.trigger(UPGRADE, conf)
    assert airflow.wait_for_run(UPGRADE, run_id, timeout=180) == "success", states_of(airflow, UPGRADE, run_id)
    states = states_of(airflow, UPGRADE, run_id)
    assert {k: v for k, v in states.items() if v != "skipped"} == {
        "validate_request": "success", "preflight": "success"}, states
    plan = airflow.api("GET", f"dags/{UPGRADE}/dagRuns/{run_id}/taskInstances/preflight/xcomEntries/plan")
    assert "orders-db-pg17" in str(plan) and "copy_estimate" in str(plan)

    # Cleared later with everything after it, a plan still changes nothing: the scheduler skips provision_target
    # again (preflight skipped it), and verify_before_cutover (which runs after skipped phases) refuses a plan.
    airflow.api("POST", f"dags/{UPGRADE}/clearTaskInstances", {"dag_run_id": run_id, "task_ids": ["provision_target"],
                                                               "include_downstream": True, "only_failed": False,
                                                               "dry_run": False})
    airflow.wait_for_run(UPGRADE, run_id, timeout=180)
    states = states_of(airflow, UPGRADE, run_id)
    assert states["provision_target"] == "skipped", states
    assert {k for k, v in states.items() if v not in ("success", "skipped", "upstream_failed")} == \
        {"verify_before_cutover"}, states
    refused = str(airflow.task_log(UPGRADE, run_id, "verify_before_cutover", 1))
    assert "this run is plan_only: it makes a plan and changes nothing" in refused, refused[-1500:]
    assert [i["DBInstanceIdentifier"] for i in topo.aws_client("rds").describe_db_instances()["DBInstances"]] == \
        ["orders-db"]


def read_lands_on(topo) -> int | None:
    """The port a new read connection lands on; None when the switch cut it: the rollback shuts the target's
    sessions, and a connection opened on the target just before that is closed (an application reconnects)."""
    try:
        return topo.port_behind(topo.haproxy.read_port)
    except psycopg2.OperationalError:
        return None
