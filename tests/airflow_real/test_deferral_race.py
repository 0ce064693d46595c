"""A busy scheduler must not fail a deferred step: Airflow 3.3's resume-after-defer race (apache/airflow#67287,
#72716) under a real scheduler.

When a deferral's trigger fires before the scheduler has handled the executor's "success" of the process that
deferred, the scheduler queues the resumed try first, then takes that stale success for the resumed try's own end
and fails it ("finished with state success, but the task instance's state attribute is queued"). Under a fleet of
upgrades (bench/fleet.py) the scheduler fell 20 s behind and this failed health checks and the cutover watchdog
after a cutover that had worked. The test makes the scheduler late on purpose (SIGSTOP before the step defers,
SIGCONT once its trigger has fired) and asserts the race happened and the run still succeeded.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.airflow_real.runs import states_of
from topology.demo import demo_conf

pytestmark = [pytest.mark.integration, pytest.mark.airflow]

UPGRADE = "pgactive_rolling_upgrade"
MISMATCH = "but the task instance's state attribute is"


def mismatches(airflow, run_id: str) -> list[str]:
    log = airflow.log_path("scheduler").read_text(errors="replace")
    return [line for line in log.splitlines() if MISMATCH in line and run_id in line]


def hold_scheduler_until_resumed(airflow, run_id: str, task: str, timeout: float = 90) -> None:
    """Stop the scheduler once a worker runs the task (best before it defers; just after, the scheduler has seldom
    read the deferring process's exit yet). The task defers and its process exits while the scheduler sleeps, the
    trigger fires and the task is scheduled again. Let go, the scheduler's next loop queues the resumed try, then
    reads the deferring process's stale success."""
    deadline = time.monotonic() + 240
    while (state := states_of(airflow, UPGRADE, run_id).get(task)) not in ("running", "deferred"):
        assert state not in ("success", "failed") and time.monotonic() < deadline, f"{task} ended unseen: {state}"
        time.sleep(0.05)
    scheduler = airflow._read_pid("scheduler")
    os.kill(scheduler, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + timeout
        while states_of(airflow, UPGRADE, run_id).get(task) != "scheduled":  # deferred, then its trigger fired
            assert time.monotonic() < deadline, f"{task} was not scheduled again: {states_of(airflow, UPGRADE, run_id)}"
            time.sleep(0.2)
        time.sleep(1)  # the deferring process's exit reaches the executor's result queue
    finally:
        os.kill(scheduler, signal.SIGCONT)


def test_a_late_scheduler_does_not_fail_a_resumed_health_check(ready):
    airflow, topo = ready
    conf = {**demo_conf(topo), "shift_percentages": [50], "phase_settle_seconds": 3, "decommission": "keep"}
    run_id = airflow.trigger(UPGRADE, conf)

    hold_scheduler_until_resumed(airflow, run_id, "traffic_phase.health_check[0]")

    final = airflow.wait_for_run(UPGRADE, run_id, timeout=300)
    seen = mismatches(airflow, run_id)
    assert seen, "the race was not reproduced: the scheduler handled the stale success before queueing the resumed try"
    assert final == "success", (seen[0][:400], states_of(airflow, UPGRADE, run_id))
    check = next(ti for ti in airflow.task_instances(UPGRADE, run_id) if ti["task_id"] == "traffic_phase.health_check")
    # Airflow marks the resumed try up_for_retry; a worker that had already started it may still finish it and its
    # success stands (try 1), else the retry checks the phase again (try 2; without the retries, that run failed).
    assert check["state"] == "success" and check["try_number"] in (1, 2), check
    assert topo.port_behind(topo.haproxy.write_port) == topo.new_pg.port
