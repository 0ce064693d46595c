"""Under a real scheduler and triggerer: the cutover's worker dies with SIGKILL while it holds the fence."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from contextlib import closing

import pytest

from pgactive_upgrade import switch_state
from tests.airflow_real.runs import states_of, wait_for_state
from tests.airflow_real.test_phases_and_rollback import ROLLBACK, UPGRADE
from topology import faults
from topology.demo import demo_conf

pytestmark = [pytest.mark.integration, pytest.mark.airflow]
KEY = "pgu_orders_db"


def switch_row(topo) -> switch_state.SwitchState | None:
    with closing(topo.old_pg.connect("postgres", dbname="app")) as source:
        return switch_state.read(source, KEY)


def slow_marker(topo, seconds: int) -> None:
    """A trigger that fires in the apply worker too (ENABLE ALWAYS) and sleeps on each marker row; 0 ends a sleep
    in progress by restarting the apply worker."""
    with closing(topo.new_pg.connect("postgres", dbname="app")) as target, target.cursor() as cursor:
        cursor.execute(f"CREATE OR REPLACE FUNCTION public.slow_marker() RETURNS trigger LANGUAGE plpgsql AS "
                       f"$$ BEGIN PERFORM pg_sleep({int(seconds)}); RETURN NEW; END $$")
        if seconds:
            cursor.execute("CREATE TRIGGER slow_marker BEFORE INSERT ON pgactive_upgrade.cutover_marker "
                           "FOR EACH ROW EXECUTE FUNCTION public.slow_marker()")
            cursor.execute("ALTER TABLE pgactive_upgrade.cutover_marker ENABLE ALWAYS TRIGGER slow_marker")
        else:
            cursor.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_subscription WHERE pid IS NOT NULL")


def test_a_cutover_killed_inside_the_fence_is_undone_by_the_watchdog_and_the_rollback_is_quick(ready):
    airflow, topo = ready
    faults.add_bench_table(topo)
    conf = {**demo_conf(topo), "shift_percentages": [50], "phase_settle_seconds": 15, "decommission": "keep",
            "cutover_deadline_seconds": 60}
    run_id = airflow.trigger(UPGRADE, conf)
    wait_for_state(airflow, UPGRADE, run_id, "wait_for_sync", "success", timeout=180)
    # Harness fault: the forward apply stalls on the marker row, so the cutover waits inside its fence (alive).
    slow_marker(topo, seconds=120)
    assert states_of(airflow, UPGRADE, run_id).get("cutover") in (None, "scheduled", "queued"), "too late to stall"
    ports = {"source": topo.old_pg.port, "target": topo.new_pg.port}
    try:
        with faults.WritableProbe(ports, topo.credentials["app"]) as probe:
            deadline, seen = time.monotonic() + 120, []
            while not ((row := switch_row(topo)) and row.phase == "fenced"):
                seen.append(row and row.phase)
                assert time.monotonic() < deadline, (seen[-5:], states_of(airflow, UPGRADE, run_id))
                time.sleep(0.1)
            task_pid = int(row.holder.rsplit(":", 1)[1])
            supervisor_pid = int(Path(f"/proc/{task_pid}/stat").read_text().rsplit(")", 1)[1].split()[1])  # its parent
            assert not faults.writable(topo.old_pg.port, topo.credentials["app"]), "the source is fenced"
            for pid in (supervisor_pid, task_pid):
                os.kill(pid, signal.SIGKILL)
            killed = time.monotonic()
            slow_marker(topo, seconds=0)
            while not faults.writable(topo.old_pg.port, topo.credentials["app"]):
                assert time.monotonic() - killed < 30, (switch_row(topo), states_of(airflow, UPGRADE, run_id))
                time.sleep(0.1)
            resumed_s = time.monotonic() - killed
        assert probe.overlaps() == 0
        assert switch_row(topo).phase == "undone"
        assert not faults.writable(topo.new_pg.port, topo.credentials["app"]), "the target stays read-only"
        wait_for_state(airflow, UPGRADE, run_id, "cutover_watchdog", "success", timeout=30)
        assert states_of(airflow, UPGRADE, run_id)["cutover"] == "running", "Airflow has not noticed the dead worker"

        began = time.monotonic()
        rollback = airflow.trigger(ROLLBACK, {"source_instance": "orders-db", "reason": "dead cutover"})
        assert airflow.wait_for_run(ROLLBACK, rollback, timeout=60) == "success", states_of(airflow, ROLLBACK, rollback)
        rollback_s = time.monotonic() - began
        assert rollback_s < 30
        assert topo.haproxy.get_weight("pg_read", "target") == 0 and topo.haproxy.get_weight("pg_write", "source") == 100
        print(f"writes resumed {resumed_s:.1f} s after the kill; rollback run took {rollback_s:.1f} s")
    finally:
        try:
            airflow.api("PATCH", f"dags/{UPGRADE}/dagRuns/{run_id}", {"state": "failed"})
        except Exception:
            pass


def test_scheduler_and_triggerer_killed_while_the_upgrade_waits_and_the_run_completes(ready):
    """Deferred waits live in the metadata database: SIGKILL the scheduler and the triggerer during wait_for_sync,
    and the triggerer alone during a phase gate; restarted, they pick the waits up and the run completes."""
    airflow, topo = ready
    faults.add_bench_table(topo)
    conf = {**demo_conf(topo), "shift_percentages": [30, 60], "phase_settle_seconds": 8, "decommission": "keep",
            "lag_threshold_bytes": 1024}
    load = faults.Load(faults.app_dsn(topo), clients=2, rate_per_client=150, max_seconds=300)
    load.start()  # keeps the lag above the threshold, so wait_for_sync defers
    try:
        run_id = airflow.trigger(UPGRADE, conf)
        wait_for_state(airflow, UPGRADE, run_id, "wait_for_sync", "deferred", timeout=180)
        for component in ("scheduler", "triggerer"):
            assert airflow.kill(component)
        time.sleep(3)
        airflow.restart("scheduler", "triggerer")
    finally:
        load.stop()
    wait_for_state(airflow, UPGRADE, run_id, "traffic_phase.wait_for_previous_phase[1]", "deferred", timeout=180)
    assert airflow.kill("triggerer")
    time.sleep(2)
    airflow.restart("triggerer")
    assert airflow.wait_for_run(UPGRADE, run_id, timeout=300) == "success", states_of(airflow, UPGRADE, run_id)
    assert topo.port_behind(topo.haproxy.write_port) == topo.new_pg.port
